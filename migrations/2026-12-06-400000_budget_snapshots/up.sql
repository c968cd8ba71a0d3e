-- Budget snapshots (issue 23 items 1, 2, 5): `caracal snapshot create` writes one
-- document per consistent point (spend per policy window, open reservations, the
-- ledger's offsets per partition, consumer group offsets, the newest Merkle
-- checkpoint, the configuration rows) with its BLAKE3 checksum
-- (service-kit/src/snapshot.rs). Kept here unless `snapshots.store` names a
-- directory; the summary columns are copies of the document's for `list`.
CREATE TABLE budget_snapshots (
    snapshot_id   TEXT PRIMARY KEY CHECK (snapshot_id ~ '^snapshot-[0-9]{8}-[0-9]{6}$'),
    format        INTEGER     NOT NULL,
    taken_at      TIMESTAMPTZ NOT NULL,
    checksum      TEXT        NOT NULL CHECK (checksum ~ '^blake3:[0-9a-f]{64}$'),
    size_bytes    BIGINT      NOT NULL CHECK (size_bytes >= 0),
    counters      BIGINT      NOT NULL,
    reservations  BIGINT      NOT NULL,
    ledger_events BIGINT      NOT NULL,
    body          BYTEA       NOT NULL,
    stored_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every create and restore, running or finished, whatever store holds the
-- snapshot: `caracal snapshot status` shows their progress. One create per id
-- at a time (the scheduled create of every replica claims the same id; one wins).
CREATE TABLE snapshot_runs (
    id           BIGSERIAL PRIMARY KEY,
    kind         TEXT        NOT NULL CHECK (kind IN ('create', 'restore')),
    snapshot_id  TEXT        NOT NULL,
    dry_run      BOOLEAN     NOT NULL DEFAULT false,
    scheduled    BOOLEAN     NOT NULL DEFAULT false,
    state        TEXT        NOT NULL CHECK (state IN ('running', 'done', 'failed')),
    phase        TEXT        NOT NULL DEFAULT '',
    done_items   BIGINT      NOT NULL DEFAULT 0,
    total_items  BIGINT      NOT NULL DEFAULT 0,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at  TIMESTAMPTZ,
    error        TEXT,
    -- What it did (counters, reservations, sizes), as the RPC answered.
    detail       JSONB
);
CREATE UNIQUE INDEX snapshot_runs_one_create ON snapshot_runs (snapshot_id)
    WHERE kind = 'create' AND state <> 'failed';
CREATE INDEX snapshot_runs_started ON snapshot_runs (started_at DESC);

-- A replay from a snapshot's cut names the snapshot (from_time is its time).
ALTER TABLE ledger_replays ADD COLUMN snapshot_id TEXT;

CREATE OR REPLACE FUNCTION caracal_apply_grants() RETURNS VOID
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    r TEXT;
BEGIN
    FOREACH r IN ARRAY ARRAY['caracal_authz', 'caracal_ledger_writer', 'caracal_audit_logger',
                             'caracal_audit_retention'] LOOP
        CONTINUE WHEN to_regrole(r) IS NULL;
        EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA public FROM %I', r);
        EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM %I', r);
        EXECUTE format('REVOKE ALL ON FUNCTION ledger_ensure_partitions(INTEGER) FROM %I', r);
        -- Every process checks at start that the schema is up to date.
        IF to_regclass('__diesel_schema_migrations') IS NOT NULL THEN
            EXECUTE format('GRANT SELECT ON __diesel_schema_migrations TO %I', r);
        END IF;
    END LOOP;

    IF to_regrole('caracal_authz') IS NOT NULL THEN
        GRANT SELECT, INSERT, UPDATE, DELETE
            ON agents, agent_api_keys, agent_identities, policies, policy_versions,
               allowlist_entries, price_book, config_epoch, admin_outbox, dlq_replays
            TO caracal_authz;
        GRANT USAGE, SELECT ON SEQUENCE admin_outbox_id_seq TO caracal_authz;
        -- Ledger queries, reconciliation, consumer status: read only.
        GRANT SELECT ON ledger_events, ledger_final_charges, consumer_partitions
            TO caracal_authz;
        -- Merkle proofs, checkpoints and verify-range (the MerkleService): read only.
        GRANT SELECT ON merkle_queue, merkle_leaves, merkle_tiles, merkle_state, merkle_keys,
               merkle_checkpoints
            TO caracal_authz;
        -- Whether Redis holds the budget state (authz-service budget::state).
        GRANT SELECT, INSERT, UPDATE ON budget_state TO caracal_authz;
        -- Replays are read by operators over the admin credentials too.
        GRANT SELECT ON ledger_replays TO caracal_authz;
        -- Snapshots: created, listed, restored and cleaned up by the SnapshotService.
        GRANT SELECT, INSERT, DELETE ON budget_snapshots TO caracal_authz;
        GRANT SELECT, INSERT, UPDATE ON snapshot_runs TO caracal_authz;
        GRANT USAGE ON SEQUENCE snapshot_runs_id_seq TO caracal_authz;
    END IF;

    IF to_regrole('caracal_ledger_writer') IS NOT NULL THEN
        GRANT SELECT, INSERT ON ledger_events TO caracal_ledger_writer;
        GRANT EXECUTE ON FUNCTION ledger_ensure_partitions(INTEGER) TO caracal_ledger_writer;
        -- Partition leases (consumers/src/lease.rs; pg_locks is readable by all).
        GRANT SELECT, INSERT, UPDATE ON consumer_partitions TO caracal_ledger_writer;
        -- Each new row's leaf hash is queued with it; the sequencer (a task of the
        -- ledger-writer) drains the queue into the log and signs checkpoints.
        GRANT SELECT, INSERT, DELETE ON merkle_queue TO caracal_ledger_writer;
        GRANT USAGE ON SEQUENCE merkle_queue_id_seq TO caracal_ledger_writer;
        GRANT SELECT, INSERT ON merkle_leaves, merkle_keys, merkle_checkpoints
            TO caracal_ledger_writer;
        GRANT SELECT, INSERT, UPDATE ON merkle_tiles, merkle_state TO caracal_ledger_writer;
        -- `caracal replay start` runs with the ledger-writer's credentials.
        GRANT SELECT, INSERT, UPDATE ON ledger_replays TO caracal_ledger_writer;
        GRANT USAGE ON SEQUENCE ledger_replays_id_seq TO caracal_ledger_writer;
        -- `caracal replay start --from-snapshot` reads where the snapshot cut the ledger.
        GRANT SELECT ON budget_snapshots TO caracal_ledger_writer;
    END IF;

    IF to_regrole('caracal_audit_logger') IS NOT NULL THEN
        GRANT SELECT ON audit_logs TO caracal_audit_logger;
        -- Not id (the sequence) nor ingested_at (the database's clock: retention and
        -- export go by it).
        GRANT INSERT (topic, "partition", kafka_offset, key, headers, payload, event_type,
                      event_id, occurred_at, message_hash)
            ON audit_logs TO caracal_audit_logger;
        GRANT USAGE ON SEQUENCE audit_logs_id_seq TO caracal_audit_logger;
        GRANT SELECT, INSERT, UPDATE ON consumer_partitions TO caracal_audit_logger;
    END IF;

    IF to_regrole('caracal_audit_retention') IS NOT NULL THEN
        GRANT SELECT, DELETE ON audit_logs TO caracal_audit_retention;
    END IF;
END
$$;
REVOKE ALL ON FUNCTION caracal_apply_grants() FROM PUBLIC;

SELECT caracal_apply_grants();
