-- The ledger of record: every charge event of caracal.metering.events, written by
-- the ledger-writer (consumers/). Append-only; money is BIGINT micro-units.
--
-- Partitioned by month on occurred_at (native range partitions) so old months can
-- be detached/archived and agent+time queries touch few partitions. Partitions are
-- created ahead of time by ledger_ensure_partitions() (the writer calls it at start
-- and every hour: current month + next 2); the DEFAULT partition takes whatever
-- falls outside them (events older than the first partition, clock skew), so an
-- insert is never refused for want of a partition.
--
-- Idempotency: PostgreSQL requires the partition key in every unique constraint of
-- a partitioned table, so the key is (event_id, occurred_at). That is as strong as
-- a unique event_id: occurred_at is part of the event itself (set once by the
-- budget script that emitted it, carried unchanged by the outbox relay and by
-- every Kafka redelivery), so the same event always comes back with the same pair
-- and `INSERT ... ON CONFLICT DO NOTHING` makes a redelivery a no-op. (A separate
-- non-partitioned ledger_event_ids table would cost a second index write per event
-- for no extra guarantee.)
--
-- Superseded charges: a Settle that arrives after its reservation expired emits a
-- `late_settle` event carrying the reservation's FINAL charge, which supersedes the
-- earlier `expire_charge` event of the same reservation. Both rows are kept (the
-- ledger is append-only); totals must count, per reservation, only its final
-- charge: the `late_settle` row when there is one, else the latest charge row.
-- The view ledger_final_charges is that rule; every total should read it.

CREATE TABLE ledger_events (
    event_id            TEXT        NOT NULL CHECK (length(event_id) BETWEEN 1 AND 200),
    kind                TEXT        NOT NULL CHECK (kind IN ('settle', 'expire_charge', 'late_settle')),
    reservation_id      TEXT        NOT NULL CHECK (length(reservation_id) BETWEEN 1 AND 200),
    request_id          TEXT        NOT NULL DEFAULT '',
    agent_id            UUID        NOT NULL,
    root_agent_id       UUID        NOT NULL,
    -- Every policy (of the agent and its ancestors) the charge counts against.
    policy_ids          TEXT[]      NOT NULL DEFAULT '{}',
    currency            TEXT        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    reserved_micros     BIGINT      NOT NULL CHECK (reserved_micros >= 0),
    charged_micros      BIGINT      NOT NULL CHECK (charged_micros >= 0),
    overshoot_micros    BIGINT      NOT NULL CHECK (overshoot_micros >= 0),
    input_tokens        BIGINT      NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
    output_tokens       BIGINT      NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    cached_input_tokens BIGINT      NOT NULL DEFAULT 0 CHECK (cached_input_tokens >= 0),
    provider            TEXT        NOT NULL DEFAULT '',
    model               TEXT        NOT NULL DEFAULT '',
    -- Price-book version the charge was priced with (0 when a cost was given).
    price_version       INTEGER     NOT NULL DEFAULT 0,
    schema_version      INTEGER     NOT NULL,
    occurred_at         TIMESTAMPTZ NOT NULL,
    -- Ingest metadata: where the writer read it, and when it wrote it.
    kafka_topic         TEXT        NOT NULL,
    kafka_partition     INTEGER     NOT NULL,
    kafka_offset        BIGINT      NOT NULL,
    ingested_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);

CREATE TABLE ledger_events_default PARTITION OF ledger_events DEFAULT;

-- Partitioned indexes: each partition gets its own.
CREATE INDEX ledger_events_agent_time_idx ON ledger_events (agent_id, occurred_at);
CREATE INDEX ledger_events_root_time_idx ON ledger_events (root_agent_id, occurred_at);
CREATE INDEX ledger_events_reservation_idx ON ledger_events (reservation_id);

-- Creates the monthly partitions of the current month (UTC) and the next `ahead`
-- months when missing; returns how many it created. Rows of such a month that
-- already sit in the DEFAULT partition are moved into the new partition (in the
-- same transaction), since PostgreSQL refuses a partition whose range the default
-- partition already holds rows for. Serialised by an advisory lock: replicas call
-- it concurrently.
CREATE FUNCTION ledger_ensure_partitions(ahead INTEGER DEFAULT 2) RETURNS INTEGER
LANGUAGE plpgsql AS $$
DECLARE
    month_start TIMESTAMP;
    lo          TIMESTAMPTZ;
    hi          TIMESTAMPTZ;
    part        TEXT;
    created     INTEGER := 0;
    moved       BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(7368223503);
    FOR i IN 0 .. greatest(ahead, 0) LOOP
        month_start := date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => i);
        lo := month_start AT TIME ZONE 'UTC';
        hi := (month_start + interval '1 month') AT TIME ZONE 'UTC';
        part := format('ledger_events_%s', to_char(month_start, 'YYYY_MM'));
        IF to_regclass(part) IS NOT NULL THEN
            CONTINUE;
        END IF;
        CREATE TEMP TABLE IF NOT EXISTS ledger_partition_move
            (LIKE ledger_events INCLUDING DEFAULTS) ON COMMIT DROP;
        DELETE FROM ledger_partition_move;
        WITH d AS (
            DELETE FROM ledger_events_default
            WHERE occurred_at >= lo AND occurred_at < hi
            RETURNING *
        )
        INSERT INTO ledger_partition_move SELECT * FROM d;
        GET DIAGNOSTICS moved = ROW_COUNT;
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF ledger_events FOR VALUES FROM (%L) TO (%L)',
            part, lo, hi);
        IF moved > 0 THEN
            INSERT INTO ledger_events SELECT * FROM ledger_partition_move;
        END IF;
        created := created + 1;
    END LOOP;
    RETURN created;
END
$$;

SELECT ledger_ensure_partitions(2);

-- Per reservation, its final charge (see the header): the late_settle row when
-- there is one, else the latest charge row.
CREATE VIEW ledger_final_charges AS
SELECT DISTINCT ON (reservation_id) *
FROM ledger_events
ORDER BY reservation_id, (kind = 'late_settle') DESC, occurred_at DESC, event_id DESC;
