-- The audit trail: every message of every Caracal topic (metering, decisions,
-- agent lifecycle, policy changes; not the dead-letter topic), written as is by
-- the audit-logger (consumers/src/audit.rs). Payloads are stored byte for byte
-- (no decoding), so the trail holds exactly what was published.
--
-- Idempotency: one row per Kafka message, UNIQUE (topic, partition, kafka_offset);
-- the logger inserts with ON CONFLICT DO NOTHING, so a redelivery is a no-op.
--
-- Append-only, enforced by the database:
-- - UPDATE is always refused (row trigger).
-- - DELETE is refused unless the transaction has set
--   `SET LOCAL caracal.audit_retention = 'on'`, which only the retention job does
--   (consumers/src/audit.rs: rows older than retentionDays, in bounded batches).
-- - TRUNCATE is always refused (statement trigger).
-- Limit: a superuser (or the table owner) can still disable the triggers
-- (ALTER TABLE ... DISABLE TRIGGER, session_replication_role = replica) or set the
-- flag by hand. These triggers stop mistakes and compromised application
-- credentials, not a DBA; tamper evidence against a DBA is the job of the Merkle
-- log (a later issue). Grant the application role INSERT/SELECT only.

CREATE TABLE audit_logs (
    id            BIGSERIAL   PRIMARY KEY,
    topic         TEXT        NOT NULL,
    "partition"   INTEGER     NOT NULL,
    kafka_offset  BIGINT      NOT NULL,
    key           BYTEA,
    -- [{"key": "...", "value": "<utf-8 text>"} | {"key": "...", "value_hex": "..."}
    --  | {"key": "...", "value": null}], in the message's order.
    headers       JSONB       NOT NULL DEFAULT '[]'::jsonb,
    payload       BYTEA,
    -- From the `event_type` / `event_id` headers, when the producer set them.
    event_type    TEXT,
    event_id      TEXT,
    -- The message timestamp (UTC); ingested_at when the message had none.
    occurred_at   TIMESTAMPTZ NOT NULL,
    ingested_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT audit_logs_message UNIQUE (topic, "partition", kafka_offset)
);

-- Retention (occurred_at < cutoff) and export (a time range).
CREATE INDEX audit_logs_occurred_at ON audit_logs (occurred_at);
CREATE INDEX audit_logs_event_id ON audit_logs (event_id) WHERE event_id IS NOT NULL;

CREATE FUNCTION audit_logs_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND coalesce(current_setting('caracal.audit_retention', true), '') = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_logs is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'only the retention job deletes (SET LOCAL caracal.audit_retention = ''on'')';
END
$$;

CREATE TRIGGER audit_logs_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_logs
    FOR EACH ROW EXECUTE FUNCTION audit_logs_append_only();

CREATE TRIGGER audit_logs_no_truncate
    BEFORE TRUNCATE ON audit_logs
    FOR EACH STATEMENT EXECUTE FUNCTION audit_logs_append_only();
