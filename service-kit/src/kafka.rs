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
    /// Prefer `CARACAL_KAFKA_SASL_PASSWORD` from a secret, or `saslPasswordFile`.
    /// Never logged (`Debug` says `<redacted>`).
    pub sasl_password: String,
    /// A file holding the SASL password (a mounted secret; one trailing newline is
    /// dropped), read when the configuration is loaded. Exclusive with
    /// `saslPassword`.
    pub sasl_password_file: String,
    /// CA bundle (PEM) that signs the brokers' certificates; empty: system roots.
    /// The brokers' host names are checked against their certificates
    /// (librdkafka's `ssl.endpoint.identification.algorithm=https`).
    pub ssl_ca_location: String,
    /// Client certificate (PEM) for brokers that authenticate clients by TLS
    /// (`SSL`), with `sslKeyLocation`; empty: none. The guide's JKS keystore and
    /// truststore are Java's; librdkafka reads PEM.
    pub ssl_certificate_location: String,
    pub ssl_key_location: String,
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
            sasl_password_file: String::new(),
            ssl_ca_location: String::new(),
            ssl_certificate_location: String::new(),
            ssl_key_location: String::new(),
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
            .field("sasl_password_file", &self.sasl_password_file)
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("ssl_certificate_location", &self.ssl_certificate_location)
            .field("ssl_key_location", &self.ssl_key_location)
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
    /// `CARACAL_KAFKA_SASL_PASSWORD`, `CARACAL_KAFKA_SASL_PASSWORD_FILE`,
    /// `CARACAL_KAFKA_SSL_CA_LOCATION`, `CARACAL_KAFKA_SSL_CERTIFICATE_LOCATION`,
    /// `CARACAL_KAFKA_SSL_KEY_LOCATION`; then the password file is read
    /// ([`KafkaConfig::read_password_file`]).
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
        env.text(
            "CARACAL_KAFKA_SASL_PASSWORD_FILE",
            &mut self.sasl_password_file,
        );
        env.text("CARACAL_KAFKA_SSL_CA_LOCATION", &mut self.ssl_ca_location);
        env.text(
            "CARACAL_KAFKA_SSL_CERTIFICATE_LOCATION",
            &mut self.ssl_certificate_location,
        );
        env.text("CARACAL_KAFKA_SSL_KEY_LOCATION", &mut self.ssl_key_location);
        self.read_password_file()
    }

    /// Reads `saslPasswordFile` into the password (once: the file name is then
    /// cleared). Both a password and a file is an error: which one is meant?
    pub fn read_password_file(&mut self) -> Result<(), ConfigError> {
        let path = self.sasl_password_file.trim();
        if path.is_empty() {
            return Ok(());
        }
        if !self.sasl_password.is_empty() {
            return Err(ConfigError::Invalid(
                "kafka.saslPassword and kafka.saslPasswordFile are both set".to_owned(),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let password = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(&text);
        if password.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "kafka.saslPasswordFile {path} is empty"
            )));
        }
        self.sasl_password = password.to_owned();
        self.sasl_password_file.clear();
        Ok(())
    }

    /// Refuses what librdkafka would only refuse at the first connection, or not at
    /// all: an unknown protocol or mechanism, SASL without a user or password, a
    /// client certificate without its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let protocol = normalized_protocol(&self.security_protocol);
        if !matches!(
            protocol.as_str(),
            "PLAINTEXT" | "SSL" | "SASL_PLAINTEXT" | "SASL_SSL"
        ) {
            return bad(format!(
                "kafka.securityProtocol {:?}: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
                self.security_protocol
            ));
        }
        if protocol.starts_with("SASL") {
            if !matches!(
                self.sasl_mechanism.trim(),
                "SCRAM-SHA-512" | "SCRAM-SHA-256" | "PLAIN"
            ) {
                return bad(format!(
                    "kafka.saslMechanism {:?}: SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN",
                    self.sasl_mechanism
                ));
            }
            if self.sasl_username.is_empty() || self.sasl_password.is_empty() {
                return bad(format!(
                    "kafka.securityProtocol {protocol} needs saslUsername and a password \
                     (CARACAL_KAFKA_SASL_PASSWORD or saslPasswordFile)"
                ));
            }
        }
        if self.ssl_certificate_location.is_empty() != self.ssl_key_location.is_empty() {
            return bad("kafka.sslCertificateLocation and sslKeyLocation go together".to_owned());
        }
        Ok(())
    }
}

/// `security.protocol` as librdkafka spells it; empty is `PLAINTEXT`.
fn normalized_protocol(protocol: &str) -> String {
    let protocol = protocol.trim().to_ascii_uppercase();
    if protocol.is_empty() {
        "PLAINTEXT".to_owned()
    } else {
        protocol
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
    let protocol = normalized_protocol(&cfg.security_protocol);
    c.set("security.protocol", &protocol);
    if protocol.starts_with("SASL") {
        c.set("sasl.mechanism", cfg.sasl_mechanism.trim());
        c.set("sasl.username", &cfg.sasl_username);
        c.set("sasl.password", &cfg.sasl_password);
    }
    if protocol.ends_with("SSL") {
        if !cfg.ssl_ca_location.is_empty() {
            c.set("ssl.ca.location", &cfg.ssl_ca_location);
        }
        if !cfg.ssl_certificate_location.is_empty() {
            c.set("ssl.certificate.location", &cfg.ssl_certificate_location);
            c.set("ssl.key.location", &cfg.ssl_key_location);
        }
        // librdkafka's default since 2.0, stated so no build or setting turns it off.
        c.set("ssl.endpoint.identification.algorithm", "https");
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

    fn loaded(yaml: &str, env: &[(&str, &str)]) -> Result<KafkaConfig, ConfigError> {
        let mut cfg: KafkaConfig = crate::config::from_yaml(yaml).unwrap();
        cfg.apply_env(&EnvOverrides::new(|k: &str| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }))?;
        Ok(cfg)
    }

    /// The production settings (guide: `SASL_SSL`, `SCRAM-SHA-512`, a user and a
    /// password from a secret, the brokers' CA) become exactly librdkafka's keys,
    /// which librdkafka accepts (its SSL and SCRAM support are built in), and the
    /// password shows in no `Debug` output.
    #[test]
    fn sasl_ssl_with_scram_sha_512() {
        const PASSWORD: &str = "s3cret-Kafka-pw";
        let cfg = loaded(
            "brokers: kafka-0.kafka:9093,kafka-1.kafka:9093\n\
             securityProtocol: sasl_ssl\nsaslMechanism: SCRAM-SHA-512\n\
             saslUsername: caracal-producer\nsslCaLocation: /etc/caracal/kafka/ca.crt\n",
            &[("CARACAL_KAFKA_SASL_PASSWORD", PASSWORD)],
        )
        .unwrap();
        cfg.validate().unwrap();
        for c in [
            client_config(&cfg),
            producer_config(&cfg),
            consumer_config(&cfg, "caracal-ledger-writer"),
        ] {
            assert_eq!(
                c.get("bootstrap.servers"),
                Some("kafka-0.kafka:9093,kafka-1.kafka:9093")
            );
            assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
            assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
            assert_eq!(c.get("sasl.username"), Some("caracal-producer"));
            assert_eq!(c.get("sasl.password"), Some(PASSWORD));
            assert_eq!(c.get("ssl.ca.location"), Some("/etc/caracal/kafka/ca.crt"));
            assert_eq!(
                c.get("ssl.endpoint.identification.algorithm"),
                Some("https")
            );
            assert_eq!(c.get("ssl.certificate.location"), None);
            assert!(!format!("{c:?}").contains(PASSWORD), "{c:?}");
        }
        assert!(!format!("{cfg:?}").contains(PASSWORD));
        assert!(format!("{cfg:?}").contains("<redacted>"));

        // librdkafka takes every key and value (an unknown key, a mechanism or
        // protocol it was built without, fails here). No CA file here: system roots.
        let mut no_ca = cfg.clone();
        no_ca.ssl_ca_location.clear();
        no_ca.brokers = "127.0.0.1:9".to_owned();
        let producer: rdkafka::producer::BaseProducer = producer_config(&no_ca).create().unwrap();
        drop(producer);
        let consumer: rdkafka::consumer::BaseConsumer =
            consumer_config(&no_ca, "g").create().unwrap();
        drop(consumer);
    }

    #[test]
    fn the_password_can_come_from_a_file() {
        let path = std::env::temp_dir().join(format!(
            "caracal-kafka-pw-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::write(&path, "from-a-secret\n").unwrap();
        let file = path.display().to_string();
        let yaml = "securityProtocol: SASL_SSL\nsaslUsername: u\n";
        let cfg = loaded(yaml, &[("CARACAL_KAFKA_SASL_PASSWORD_FILE", &file)]).unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            client_config(&cfg).get("sasl.password"),
            Some("from-a-secret")
        );
        assert!(!format!("{cfg:?}").contains("from-a-secret"));
        // Both: refused; a missing file: named.
        let both = loaded(
            yaml,
            &[
                ("CARACAL_KAFKA_SASL_PASSWORD_FILE", &file),
                ("CARACAL_KAFKA_SASL_PASSWORD", "x"),
            ],
        );
        assert!(both.is_err());
        std::fs::remove_file(&path).unwrap();
        let err = loaded(yaml, &[("CARACAL_KAFKA_SASL_PASSWORD_FILE", &file)]).unwrap_err();
        assert!(err.to_string().contains(&file), "{err}");
    }

    #[test]
    fn incomplete_security_settings_are_refused() {
        KafkaConfig::default().validate().unwrap();
        let refused = [
            ("securityProtocol: SASL_SSL\nsaslUsername: u\n", "password"),
            ("securityProtocol: SASL_SSL\nsaslPassword: p\n", "saslUsername"),
            (
                "securityProtocol: SASL_SSL\nsaslMechanism: GSSAPI\nsaslUsername: u\nsaslPassword: p\n",
                "saslMechanism",
            ),
            ("securityProtocol: TLS\n", "securityProtocol"),
            ("securityProtocol: SSL\nsslCertificateLocation: /c.pem\n", "sslKeyLocation"),
        ];
        for (yaml, named) in refused {
            let err = loaded(yaml, &[]).unwrap().validate().unwrap_err();
            assert!(err.to_string().contains(named), "{yaml}: {err}");
        }
        // TLS client authentication to the brokers (SSL, no SASL).
        let mtls = loaded(
            "securityProtocol: SSL\nsslCertificateLocation: /c.pem\nsslKeyLocation: /k.pem\n",
            &[],
        )
        .unwrap();
        mtls.validate().unwrap();
        let c = client_config(&mtls);
        assert_eq!(c.get("ssl.certificate.location"), Some("/c.pem"));
        assert_eq!(c.get("ssl.key.location"), Some("/k.pem"));
        assert_eq!(c.get("sasl.mechanism"), None);
    }
}
