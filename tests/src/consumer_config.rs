//! The consumers' configuration as the tests run them in-process: loopback, a
//! free HTTP port, and timings short enough for a test (quick group sessions, lag
//! published every 300 ms, three retries backing off at most 1 s).

use caracal_consumers::config::ConsumerConfig;

/// A consumer of `brokers` in consumer group `group`.
pub fn consumer_config(brokers: &str, group: &str) -> anyhow::Result<ConsumerConfig> {
    let mut c = ConsumerConfig::default();
    c.kafka.brokers = brokers.to_owned();
    c.consumer.http_addr = "127.0.0.1:0".parse()?;
    c.consumer.group_id = group.to_owned();
    c.consumer.session_timeout_ms = 6000;
    c.consumer.lag_interval_ms = 300;
    c.consumer.batch_wait_ms = 20;
    c.consumer.max_retries = 3;
    c.consumer.max_backoff_ms = 1000;
    Ok(c)
}

/// [`consumer_config`] of a consumer that writes to the database at `db_url`
/// (the ledger-writer, the audit-logger) through a small pool.
pub fn database_consumer_config(
    db_url: &str,
    brokers: &str,
    group: &str,
) -> anyhow::Result<ConsumerConfig> {
    let mut c = consumer_config(brokers, group)?;
    c.database.url = db_url.to_owned();
    c.database.db_pool_size = 1;
    c.database.db_max_overflow = 2;
    c.database.db_pool_timeout = 2;
    Ok(c)
}
