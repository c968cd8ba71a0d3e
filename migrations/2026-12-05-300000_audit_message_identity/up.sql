-- The audit trail's identity of a message and the time it is kept by (issue 22,
-- items 5 and 9).
--
-- 1. Identity. audit_logs was unique on (topic, partition, kafka_offset) alone, so
--    once a topic is re-created (or the cluster migrated) every new message at an
--    old position was dropped as a "redelivery". A row is now identified by its
--    position AND the hash of the message itself (key, payload, the producer's
--    timestamp, headers: event_id and event_type included), so
--    - a redelivery (the same message at the same position) is still a no-op;
--    - a different message at an already used position is a new row;
--    - the same bytes re-sent at a new offset are a new row (as before).
--    audit_message_hash() is the one definition: the audit-logger's INSERT calls it
--    on the message as received, and the rows already here are filled from their
--    stored columns (occurred_at stands for the message timestamp there, which it
--    is, except for a message that had none: a rewind over such an old message
--    would add it once more). The column is filled as a generated column, then
--    made a plain one, so no UPDATE touches the append-only table.
-- 2. Time. occurred_at is the producer's Kafka timestamp: whoever produces chooses
--    it. Retention and `caracal audit export` go by ingested_at (set by the
--    database when the row is written; the audit-logger's role cannot set it), so
--    a message stamped ten years back is kept as long as any other.

-- SHA-256 of the message: key and payload (NULL and empty told apart, each length
-- prefixed), the timestamp in ms (NULL: the message had none), then the headers
-- array's canonical jsonb text (order kept; see consumers/src/audit.rs).
CREATE FUNCTION audit_message_hash(key BYTEA, headers JSONB, payload BYTEA, ts_ms BIGINT)
RETURNS BYTEA
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
SELECT pg_catalog.sha256(
       CASE WHEN key IS NULL THEN '\x00'::bytea
            ELSE '\x01'::bytea || pg_catalog.int4send(pg_catalog.length(key)) || key END
    || CASE WHEN payload IS NULL THEN '\x00'::bytea
            ELSE '\x01'::bytea || pg_catalog.int4send(pg_catalog.length(payload)) || payload END
    || CASE WHEN ts_ms IS NULL THEN '\x00'::bytea
            ELSE '\x01'::bytea || pg_catalog.int8send(ts_ms) END
    || pg_catalog.convert_to(headers::text, 'UTF8'))
$$;

ALTER TABLE audit_logs ADD COLUMN message_hash BYTEA GENERATED ALWAYS AS (
    audit_message_hash(key, headers, payload,
        (extract(epoch FROM (occurred_at - TIMESTAMPTZ '1970-01-01 00:00:00+00')) * 1000)::bigint)
) STORED;
ALTER TABLE audit_logs ALTER COLUMN message_hash DROP EXPRESSION;
ALTER TABLE audit_logs ALTER COLUMN message_hash SET NOT NULL;
ALTER TABLE audit_logs ADD CONSTRAINT audit_logs_message_hash CHECK (length(message_hash) = 32);

ALTER TABLE audit_logs
    DROP CONSTRAINT audit_logs_message,
    ADD CONSTRAINT audit_logs_message UNIQUE (topic, "partition", kafka_offset, message_hash);

-- Retention (ingested_at < cutoff) and export (a range of ingested_at, keyset on id).
DROP INDEX audit_logs_occurred_at;
CREATE INDEX audit_logs_ingested_at ON audit_logs (ingested_at, id);
