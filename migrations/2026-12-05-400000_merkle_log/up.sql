-- The tamper-evident ledger (SPEC section 5, issue 26): an RFC 9162 Merkle log with
-- BLAKE3 over every ledger row, and signed checkpoints (domain/src/merkle, merkle-log/).
--
-- merkle_queue       rows written but not yet in the log. The ledger-writer inserts
--                    each NEW ledger row's (occurred_at, event_id, leaf hash) in the
--                    same statement as the row (a CTE over the INSERT's RETURNING),
--                    so a row inserted any other way has no queue entry and never a
--                    leaf: `merkle verify-range` names it. leaf_hash NULL = computed
--                    by the sequencer from the stored row (the backfill below).
-- merkle_leaves      leaf index -> event, dense from 0 (the sequencer assigns them in
--                    one transaction with the tiles and the state; never changed).
-- merkle_tiles       the tree's perfect-subtree hashes in tiles of height 8: tile
--                    (level L, idx i) holds the hashes of tree level 8L at positions
--                    256i .. 256i+255 (32 bytes each, fewer in the rightmost tile). Any
--                    perfect subtree's hash is one tile read (plus at most 127
--                    hashings), so a proof reads O(log n) rows. A tile only grows.
-- merkle_state       the one sequencer's position: tree size, last checkpoint size.
-- merkle_keys        every public key that ever signed a checkpoint (rotation keeps
--                    the old ones: older checkpoints verify by their key id).
-- merkle_checkpoints signed C2SP tlog-checkpoint notes, one per published size.

CREATE TABLE merkle_queue (
    id          BIGSERIAL   PRIMARY KEY,
    occurred_at TIMESTAMPTZ NOT NULL,
    event_id    TEXT        NOT NULL,
    leaf_hash   BYTEA       CHECK (leaf_hash IS NULL OR length(leaf_hash) = 32)
);

CREATE TABLE merkle_leaves (
    leaf_index  BIGINT      PRIMARY KEY CHECK (leaf_index >= 0),
    occurred_at TIMESTAMPTZ NOT NULL,
    event_id    TEXT        NOT NULL,
    -- An event once; leads with event_id: `merkle prove --event-id` finds it alone.
    UNIQUE (event_id, occurred_at)
);
-- verify-range reads the leaves of a time range; leaves arrive in about
-- occurred_at order, so a BRIN index (nearly free to maintain) narrows the scan.
CREATE INDEX merkle_leaves_time_brin ON merkle_leaves USING brin (occurred_at);

CREATE TABLE merkle_tiles (
    level  SMALLINT NOT NULL CHECK (level >= 0 AND level < 8),
    idx    BIGINT   NOT NULL CHECK (idx >= 0),
    hashes BYTEA    NOT NULL CHECK (length(hashes) BETWEEN 32 AND 8192 AND length(hashes) % 32 = 0),
    PRIMARY KEY (level, idx)
);
-- Hashes do not compress: store them out of line without trying.
ALTER TABLE merkle_tiles ALTER COLUMN hashes SET STORAGE EXTERNAL;

CREATE TABLE merkle_state (
    id              SMALLINT    PRIMARY KEY CHECK (id = 1),
    tree_size       BIGINT      NOT NULL DEFAULT 0 CHECK (tree_size >= 0),
    checkpoint_size BIGINT      NOT NULL DEFAULT 0 CHECK (checkpoint_size >= 0),
    -- When the oldest leaf not yet under a checkpoint was sequenced (NULL: none).
    pending_since   TIMESTAMPTZ,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO merkle_state (id) VALUES (1);

CREATE TABLE merkle_keys (
    key_id         TEXT        PRIMARY KEY CHECK (key_id ~ '^[0-9a-f]{8}$'),
    key_name       TEXT        NOT NULL,
    public_key_pem TEXT        NOT NULL,
    registered_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE merkle_checkpoints (
    tree_size    BIGINT      PRIMARY KEY CHECK (tree_size > 0),
    root         BYTEA       NOT NULL CHECK (length(root) = 32),
    key_id       TEXT        NOT NULL REFERENCES merkle_keys (key_id),
    -- The whole signed note: what an auditor verifies (tree_size/root are copies
    -- for queries; verify-range checks that they agree with the note).
    note         TEXT        NOT NULL,
    published_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Append-only: leaves, keys and checkpoints are never changed; a tile only grows
-- (its new value starts with its old one). A superuser can still disable these;
-- verify-range is what detects it.
CREATE FUNCTION merkle_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'merkle_tiles'
       AND NEW.level = OLD.level AND NEW.idx = OLD.idx
       AND length(NEW.hashes) >= length(OLD.hashes)
       AND substring(NEW.hashes FROM 1 FOR length(OLD.hashes)) = OLD.hashes THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER merkle_leaves_append_only BEFORE UPDATE OR DELETE ON merkle_leaves
    FOR EACH ROW EXECUTE FUNCTION merkle_append_only();
CREATE TRIGGER merkle_tiles_append_only BEFORE UPDATE OR DELETE ON merkle_tiles
    FOR EACH ROW EXECUTE FUNCTION merkle_append_only();
CREATE TRIGGER merkle_keys_append_only BEFORE UPDATE OR DELETE ON merkle_keys
    FOR EACH ROW EXECUTE FUNCTION merkle_append_only();
CREATE TRIGGER merkle_checkpoints_append_only BEFORE UPDATE OR DELETE ON merkle_checkpoints
    FOR EACH ROW EXECUTE FUNCTION merkle_append_only();
CREATE TRIGGER merkle_no_truncate BEFORE TRUNCATE ON merkle_leaves
    FOR EACH STATEMENT EXECUTE FUNCTION merkle_append_only();
CREATE TRIGGER merkle_no_truncate BEFORE TRUNCATE ON merkle_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION merkle_append_only();

-- Backfill: every row written before this migration is queued, oldest first; the
-- sequencer hashes them from the stored rows.
INSERT INTO merkle_queue (occurred_at, event_id)
SELECT occurred_at, event_id FROM ledger_events ORDER BY occurred_at, event_id;

-- The grants (2026-12-05-310000_database_roles), now with the Merkle tables.
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
