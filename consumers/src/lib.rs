//! Kafka consumers of Caracal's spend events. Placeholder until the consumers issue lands:
//! ledger-writer, metrics-aggregator and audit-logger will live here.
