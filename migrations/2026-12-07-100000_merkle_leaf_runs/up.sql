-- merkle_leaves as runs of leaves (issue 26, the ingest ratio): one row per up to
-- 1024 consecutive leaves instead of one row per leaf.
--
-- Each leaf cost a heap tuple and two B-tree entries (leaf_index, and
-- (occurred_at, event_id)); on 2 cores that was most of what the sequencer took
-- from the ledger-writer's ingest. A run is one tuple and one entry in each of
-- two indexes for up to 1024 leaves. The sequencer writes a transaction's leaves
-- as one or a few runs (merkle-log/src/leaves.rs).
--
-- merkle_leaf_runs   leaves first_index .. first_index + leaves - 1 are the events
--                    (occurred_ats[k], event_ids[k]), k from 1. Runs never overlap
--                    and never change; dense, no gap (verify-range checks both).
--                    Lookup by index: first_index > i - 1024 AND first_index <= i.
--                    Lookup by time: the GiST index over the span of the run's
--                    own times (computed from the array, so it cannot disagree
--                    with what the run holds).
-- merkle_leaves      a view: one row per leaf, as before, for operators' queries.
--                    The services read runs directly (a view cannot narrow the
--                    runs it unnests).
--
-- An event is no longer unique in the log by a constraint: the ledger-writer
-- queues only rows its INSERT created, so an event reaches the log twice only if
-- its ledger row was deleted and written again; verify-range names that.

CREATE FUNCTION merkle_time_span(occurred_ats TIMESTAMPTZ[]) RETURNS TSTZRANGE
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT tstzrange(min(t), max(t), '[]') FROM unnest(occurred_ats) AS t $$;

CREATE TABLE merkle_leaf_runs (
    first_index  BIGINT        PRIMARY KEY CHECK (first_index >= 0),
    leaves       INTEGER       NOT NULL CHECK (leaves BETWEEN 1 AND 1024),
    occurred_ats TIMESTAMPTZ[] NOT NULL,
    event_ids    TEXT[]        NOT NULL,
    CHECK (cardinality(occurred_ats) = leaves AND cardinality(event_ids) = leaves)
);
-- Ids barely compress: out of line without trying.
ALTER TABLE merkle_leaf_runs ALTER COLUMN occurred_ats SET STORAGE EXTERNAL;
ALTER TABLE merkle_leaf_runs ALTER COLUMN event_ids SET STORAGE EXTERNAL;
CREATE INDEX merkle_leaf_runs_time ON merkle_leaf_runs USING gist (merkle_time_span(occurred_ats));

-- The leaves as they are, 1000 a run; a gap (there should be none) stays a gap.
INSERT INTO merkle_leaf_runs (first_index, leaves, occurred_ats, event_ids)
SELECT min(leaf_index), count(*), array_agg(occurred_at ORDER BY leaf_index),
       array_agg(event_id ORDER BY leaf_index)
FROM (SELECT leaf_index, occurred_at, event_id,
             leaf_index - row_number() OVER (ORDER BY leaf_index) AS island
      FROM merkle_leaves) l
GROUP BY island, leaf_index / 1000;

DROP TABLE merkle_leaves;

CREATE VIEW merkle_leaves AS
SELECT r.first_index + u.ord - 1 AS leaf_index, u.occurred_at, u.event_id
FROM merkle_leaf_runs r
CROSS JOIN LATERAL unnest(r.occurred_ats, r.event_ids) WITH ORDINALITY AS u(occurred_at, event_id, ord);

CREATE TRIGGER merkle_leaf_runs_append_only BEFORE UPDATE OR DELETE ON merkle_leaf_runs
    FOR EACH ROW EXECUTE FUNCTION merkle_append_only();
CREATE TRIGGER merkle_no_truncate BEFORE TRUNCATE ON merkle_leaf_runs
    FOR EACH STATEMENT EXECUTE FUNCTION merkle_append_only();

-- The grants: merkle_leaf_runs where merkle_leaves was; the view read only.
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
        GRANT SELECT ON merkle_queue, merkle_leaf_runs, merkle_leaves, merkle_tiles,
               merkle_state, merkle_keys, merkle_checkpoints
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
        GRANT SELECT, INSERT ON merkle_leaf_runs, merkle_keys, merkle_checkpoints
            TO caracal_ledger_writer;
        GRANT SELECT ON merkle_leaves TO caracal_ledger_writer;
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
