//! Kafka settings, the producer configuration and topic creation: shared with the
//! consumers, so they live in [`caracal_service_kit::kafka`].

pub use caracal_service_kit::kafka::{
    client_config, consumer_config, ensure_topics, producer_config, KafkaConfig, KafkaError,
};
