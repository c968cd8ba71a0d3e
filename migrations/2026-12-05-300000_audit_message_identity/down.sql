-- Fails when two rows share a position (messages of a re-created topic): the old
-- key cannot hold them.
DROP INDEX audit_logs_ingested_at;
CREATE INDEX audit_logs_occurred_at ON audit_logs (occurred_at);
ALTER TABLE audit_logs
    DROP CONSTRAINT audit_logs_message,
    ADD CONSTRAINT audit_logs_message UNIQUE (topic, "partition", kafka_offset);
ALTER TABLE audit_logs DROP COLUMN message_hash;
DROP FUNCTION audit_message_hash(BYTEA, JSONB, BYTEA, BIGINT);
