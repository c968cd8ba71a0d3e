-- Back to one merkle_leaves row per leaf (2026-12-06-150000's shape).
DROP VIEW merkle_leaves;
CREATE TABLE merkle_leaves (
    leaf_index  BIGINT      PRIMARY KEY CHECK (leaf_index >= 0),
    occurred_at TIMESTAMPTZ NOT NULL,
    event_id    TEXT        NOT NULL,
    CONSTRAINT merkle_leaves_occurred_at_event_id_key UNIQUE (occurred_at, event_id)
);
INSERT INTO merkle_leaves (leaf_index, occurred_at, event_id)
SELECT r.first_index + u.ord - 1, u.occurred_at, u.event_id
FROM merkle_leaf_runs r
CROSS JOIN LATERAL unnest(r.occurred_ats, r.event_ids) WITH ORDINALITY AS u(occurred_at, event_id, ord);
CREATE TRIGGER merkle_leaves_append_only BEFORE UPDATE OR DELETE ON merkle_leaves
    FOR EACH ROW EXECUTE FUNCTION merkle_append_only();
CREATE TRIGGER merkle_no_truncate BEFORE TRUNCATE ON merkle_leaves
    FOR EACH STATEMENT EXECUTE FUNCTION merkle_append_only();
DROP TABLE merkle_leaf_runs;
DROP FUNCTION merkle_time_span(TIMESTAMPTZ[]);

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
