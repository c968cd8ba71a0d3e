//! Kafka settings shared by every process: connection and security
//! (`SASL_SSL` in production), the producer and consumer configurations and topic
//! creation.
//!
//! The producer is configured for "never lose, never reorder": `acks=all`,
//! idempotence, at most 5 requests in flight (the idempotent producer keeps order
//! with up to 5) and no message timeout, so during a broker outage events wait in
//! librdkafka's queue and in the Redis outbox until the broker is back, however
//! long that takes. Nothing is dropped on a timer.

use std::{fmt, time::Duration};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    types::RDKafkaErrorCode,
    ClientConfig,
};
use serde::Deserialize;

use crate::config::{ConfigError, EnvOverrides};

/// Kafka connection, producer tuning and topic names (`kafka:` in the config file).
#[derive(Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated (`host:port,host:port`).
    pub brokers: String,
    /// `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL` (production: `SASL_SSL`).
    pub security_protocol: String,
    /// SASL mechanism when the protocol is `SASL_*`, e.g. `SCRAM-SHA-512`.
    pub sasl_mechanism: String,
    pub sasl_username: String,
    pub sasl_password: String,
    /// CA bundle (PEM) that signs the brokers' certificates; empty: system roots.
    pub ssl_ca_location: String,
    /// `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    pub compression_type: String,
    /// How long the producer waits to fill a batch, ms.
    pub linger_ms: u64,
    /// Maximum batch size, bytes.
    pub batch_size: u64,
    /// Partitions of each topic created by [`ensure_topics`].
    pub topic_partitions: i32,
    /// Replication factor of each topic created by [`ensure_topics`] (production: 3).
    pub replication_factor: i32,
    /// Settled charges (`caracal.v1.ChargeEvent`).
    pub metering_topic: String,
    /// Authorization decisions (`caracal.v1.DecisionEvent`).
    pub decisions_topic: String,
    pub lifecycle_topic: String,
    pub policy_changes_topic: String,
    /// Dead-letter topic: what could not be converted or processed, as JSON.
    pub dlq_topic: String,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".to_owned(),
            security_protocol: "PLAINTEXT".to_owned(),
            sasl_mechanism: "SCRAM-SHA-512".to_owned(),
            sasl_username: String::new(),
            sasl_password: String::new(),
            ssl_ca_location: String::new(),
            compression_type: "none".to_owned(),
            linger_ms: 10,
            batch_size: 32_768,
            topic_partitions: 6,
            replication_factor: 1,
            metering_topic: "caracal.metering.events".to_owned(),
            decisions_topic: "caracal.policy.decisions".to_owned(),
            lifecycle_topic: "caracal.agent.lifecycle".to_owned(),
            policy_changes_topic: "caracal.policy.changes".to_owned(),
            dlq_topic: "caracal.dlq".to_owned(),
        }
    }
}

// The password must not reach logs.
impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field(
                "sasl_password",
                &if self.sasl_password.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("compression_type", &self.compression_type)
            .field("linger_ms", &self.linger_ms)
            .field("batch_size", &self.batch_size)
            .field("topic_partitions", &self.topic_partitions)
            .field("replication_factor", &self.replication_factor)
            .field("metering_topic", &self.metering_topic)
            .field("decisions_topic", &self.decisions_topic)
            .field("lifecycle_topic", &self.lifecycle_topic)
            .field("policy_changes_topic", &self.policy_changes_topic)
            .field("dlq_topic", &self.dlq_topic)
            .finish()
    }
}

impl KafkaConfig {
    /// The five topic names, metering first.
    pub fn topics(&self) -> [&str; 5] {
        [
            &self.metering_topic,
            &self.decisions_topic,
            &self.lifecycle_topic,
            &self.policy_changes_topic,
            &self.dlq_topic,
        ]
    }
}

impl KafkaConfig {
    /// `CARACAL_KAFKA_BROKERS`, `CARACAL_KAFKA_SECURITY_PROTOCOL`,
    /// `CARACAL_KAFKA_SASL_MECHANISM`, `CARACAL_KAFKA_SASL_USERNAME`,
    /// `CARACAL_KAFKA_SASL_PASSWORD`, `CARACAL_KAFKA_SSL_CA_LOCATION`.
    pub fn apply_env<F: Fn(&str) -> Option<String>>(
        &mut self,
        env: &EnvOverrides<F>,
    ) -> Result<(), ConfigError> {
        env.text("CARACAL_KAFKA_BROKERS", &mut self.brokers);
        env.text(
            "CARACAL_KAFKA_SECURITY_PROTOCOL",
            &mut self.security_protocol,
        );
        env.text("CARACAL_KAFKA_SASL_MECHANISM", &mut self.sasl_mechanism);
        env.text("CARACAL_KAFKA_SASL_USERNAME", &mut self.sasl_username);
        env.text("CARACAL_KAFKA_SASL_PASSWORD", &mut self.sasl_password);
        env.text("CARACAL_KAFKA_SSL_CA_LOCATION", &mut self.ssl_ca_location);
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka client error: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    #[error("creating topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("invalid kafka configuration: {0}")]
    Config(String),
}

/// Connection and security settings shared by producers, consumers and the admin
/// client.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    let protocol = cfg.security_protocol.trim().to_ascii_uppercase();
    let protocol = if protocol.is_empty() {
        "PLAINTEXT".to_owned()
    } else {
        protocol
    };
    c.set("security.protocol", &protocol);
    if protocol.starts_with("SASL") {
        c.set("sasl.mechanism", &cfg.sasl_mechanism);
        c.set("sasl.username", &cfg.sasl_username);
        c.set("sasl.password", &cfg.sasl_password);
    }
    if protocol.ends_with("SSL") && !cfg.ssl_ca_location.is_empty() {
        c.set("ssl.ca.location", &cfg.ssl_ca_location);
    }
    c
}

/// Producer settings: idempotent, `acks=all`, order-preserving, never times a
/// message out (see the module documentation), plus [`client_config`].
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = client_config(cfg);
    c.set("acks", "all")
        .set("enable.idempotence", "true")
        .set("max.in.flight.requests.per.connection", "5")
        .set("message.timeout.ms", "0")
        .set("compression.type", &cfg.compression_type)
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("batch.size", cfg.batch_size.to_string())
        // Reconnect quickly once a broker is back (librdkafka's default backs off to 10 s).
        .set("reconnect.backoff.max.ms", "1000");
    c
}

/// Consumer settings for a consumer group that commits by hand: no automatic
/// commit and no automatic offset store (an offset is committed only once what it
/// covers is durable), reading from the earliest offset when the group has none,
/// plus [`client_config`].
pub fn consumer_config(cfg: &KafkaConfig, group_id: &str) -> ClientConfig {
    let mut c = client_config(cfg);
    c.set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("reconnect.backoff.max.ms", "1000");
    c
}

/// Creates the five topics when missing (an existing topic counts as success).
pub async fn ensure_topics(cfg: &KafkaConfig) -> Result<(), KafkaError> {
    let partitions = cfg.topic_partitions.max(1);
    let replication = cfg.replication_factor.max(1);
    let admin: AdminClient<DefaultClientContext> = client_config(cfg).create()?;
    let topics: Vec<NewTopic<'_>> = cfg
        .topics()
        .into_iter()
        .filter(|t| !t.is_empty())
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    if topics.len() != 5 {
        return Err(KafkaError::Config(
            "every topic name must be set".to_owned(),
        ));
    }
    let opts = AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(30)))
        .operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(topics.iter(), &opts).await? {
        match result {
            Ok(topic) => tracing::info!(%topic, partitions, replication, "created Kafka topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(KafkaError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_camel_case_keys() {
        let cfg: KafkaConfig = serde_yaml::from_str(
            "brokers: a:1,b:2\nsecurityProtocol: SASL_SSL\nsaslUsername: u\nsaslPassword: secret\n\
             sslCaLocation: /ca.pem\nreplicationFactor: 3\n",
        )
        .unwrap();
        assert_eq!(cfg.brokers, "a:1,b:2");
        assert_eq!(cfg.replication_factor, 3);
        assert_eq!(cfg.topic_partitions, 6);
        assert_eq!(cfg.dlq_topic, "caracal.dlq");
        assert!(!format!("{cfg:?}").contains("secret"));
        let p = producer_config(&cfg);
        assert_eq!(p.get("acks"), Some("all"));
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("message.timeout.ms"), Some("0"));
        assert_eq!(p.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(p.get("ssl.ca.location"), Some("/ca.pem"));
        assert!(serde_yaml::from_str::<KafkaConfig>("nope: 1").is_err());
        let plain = producer_config(&KafkaConfig::default());
        assert_eq!(plain.get("sasl.username"), None);
        let c = consumer_config(&cfg, "g");
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.get("sasl.password"), Some("secret"));
    }
}
