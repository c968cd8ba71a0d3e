-- Database roles (issue 22 item 4). Until now the service, every consumer and the
-- migrations shared one role that owned audit_logs and ledger_events: it could
-- disable their triggers, and any of its sessions could `SET
-- caracal.audit_retention = 'on'` and delete audit rows. Now:
--
-- | role (NOLOGIN group)      | used by                   | may                                          |
-- |---------------------------|---------------------------|----------------------------------------------|
-- | (the migrator)            | `caracal-authz-service migrate` | owns every object; runs migrations    |
-- | caracal_authz             | authz-service             | the admin tables; reads the ledger           |
-- | caracal_ledger_writer     | ledger-writer             | INSERT/SELECT ledger_events, its leases,     |
-- |                           |                           | EXECUTE ledger_ensure_partitions()           |
-- | caracal_audit_logger      | audit-logger              | INSERT/SELECT audit_logs (not ingested_at),  |
-- |                           |                           | its leases                                   |
-- | caracal_audit_retention   | `caracal-consumers audit-retention` | SELECT/DELETE audit_logs          |
--
-- Roles are cluster-wide: this migration creates the four group roles only when
-- they are missing and the migrating role may (superuser or CREATEROLE); otherwise
-- it says so (NOTICE) and grants to those that exist. A DBA then creates them and
-- runs `SELECT caracal_apply_grants();` as the migrator. The deployment creates the
-- LOGIN users, members of these roles (README "Database roles", k8s/README.md).
-- Every later migration that adds a table grants on it (and extends
-- caracal_apply_grants()).
--
-- Append-only, enforced by triggers:
-- - audit_logs: UPDATE and TRUNCATE always refused; DELETE only by a member of
--   caracal_audit_retention (current_user, checked by the trigger: not a setting
--   anyone can set) inside a transaction that also set `SET LOCAL
--   caracal.audit_retention = 'on'` (a second guard: a retention session deletes
--   nothing by accident). A superuser counts as a member of every role.
-- - ledger_events (new): UPDATE, DELETE and TRUNCATE always refused (no retention
--   for the ledger of record), on the partitioned table and on each partition. One
--   exception: ledger_ensure_partitions() moves rows out of the DEFAULT partition
--   when it creates their month's partition (the table's owner, inside the
--   function: SECURITY DEFINER, fixed search_path).
-- The owner (the migrator) and superusers can still disable triggers; the Merkle
-- log (a later issue) is what makes such edits detectable. Keep the migrator's
-- credentials out of the running processes.

-- 1. The group roles.
DO $$
DECLARE
    r   TEXT;
    may BOOLEAN;
BEGIN
    SELECT rolsuper OR rolcreaterole INTO may FROM pg_roles WHERE rolname = current_user;
    FOREACH r IN ARRAY ARRAY['caracal_authz', 'caracal_ledger_writer', 'caracal_audit_logger',
                             'caracal_audit_retention'] LOOP
        CONTINUE WHEN to_regrole(r) IS NOT NULL;
        IF NOT coalesce(may, false) THEN
            RAISE NOTICE 'role % is missing and % may not create roles: create it (CREATE ROLE % NOLOGIN), then run SELECT caracal_apply_grants()',
                r, current_user, r;
            CONTINUE;
        END IF;
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL; -- created meanwhile by the migration of another database
        END;
    END LOOP;
END
$$;

-- 2. The append-only triggers.
CREATE OR REPLACE FUNCTION audit_logs_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND coalesce(current_setting('caracal.audit_retention', true), '') = 'on'
       AND coalesce(pg_has_role(current_user, to_regrole('caracal_audit_retention'), 'MEMBER'),
                    false) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_logs is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'only the retention job deletes: a member of caracal_audit_retention, '
                     'in a transaction with SET LOCAL caracal.audit_retention = ''on''';
END
$$;

CREATE FUNCTION ledger_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- ledger_ensure_partitions() moving rows out of the DEFAULT partition: it runs
    -- as the table's owner and sets the flag for its own duration only.
    IF TG_OP = 'DELETE'
       AND coalesce(current_setting('caracal.ledger_partition_move', true), '') = 'on'
       AND pg_has_role(current_user,
                       (SELECT relowner FROM pg_catalog.pg_class WHERE oid = TG_RELID),
                       'MEMBER') THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'ledger_events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'the ledger of record is never changed: a correction is a new event';
END
$$;

CREATE TRIGGER ledger_events_no_update_delete
    BEFORE UPDATE OR DELETE ON ledger_events
    FOR EACH ROW EXECUTE FUNCTION ledger_events_append_only();

CREATE TRIGGER ledger_events_no_truncate
    BEFORE TRUNCATE ON ledger_events
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_events_append_only();

-- Row triggers are cloned onto partitions, statement triggers are not: a TRUNCATE
-- of one partition would pass. Every partition gets its own.
DO $$
DECLARE
    part REGCLASS;
BEGIN
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits
                WHERE inhparent = 'ledger_events'::regclass LOOP
        EXECUTE format('CREATE TRIGGER ledger_events_no_truncate BEFORE TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION ledger_events_append_only()', part);
    END LOOP;
END
$$;

-- 3. Partitions are created by the owner, on behalf of the ledger-writer: SECURITY
-- DEFINER (the migrator, who owns ledger_events), a fixed search_path, the temp
-- table named in pg_temp, and the move flag set around the move only (and only the
-- owner's DELETE honours it). Same behaviour as before otherwise
-- (2026-12-02-100000_ledger_events).
CREATE OR REPLACE FUNCTION ledger_ensure_partitions(ahead INTEGER DEFAULT 2) RETURNS INTEGER
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    month_start TIMESTAMP;
    lo          TIMESTAMPTZ;
    hi          TIMESTAMPTZ;
    part        TEXT;
    created     INTEGER := 0;
    moved       BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(7368223503);
    FOR i IN 0 .. least(greatest(ahead, 0), 24) LOOP
        month_start := date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => i);
        lo := month_start AT TIME ZONE 'UTC';
        hi := (month_start + interval '1 month') AT TIME ZONE 'UTC';
        part := format('ledger_events_%s', to_char(month_start, 'YYYY_MM'));
        IF to_regclass(format('public.%I', part)) IS NOT NULL THEN
            CONTINUE;
        END IF;
        CREATE TEMP TABLE IF NOT EXISTS ledger_partition_move
            (LIKE public.ledger_events INCLUDING DEFAULTS) ON COMMIT DROP;
        DELETE FROM pg_temp.ledger_partition_move;
        PERFORM set_config('caracal.ledger_partition_move', 'on', true);
        WITH d AS (
            DELETE FROM public.ledger_events_default
            WHERE occurred_at >= lo AND occurred_at < hi
            RETURNING *
        )
        INSERT INTO pg_temp.ledger_partition_move SELECT * FROM d;
        GET DIAGNOSTICS moved = ROW_COUNT;
        PERFORM set_config('caracal.ledger_partition_move', '', true);
        EXECUTE format(
            'CREATE TABLE public.%I PARTITION OF public.ledger_events FOR VALUES FROM (%L) TO (%L)',
            part, lo, hi);
        EXECUTE format(
            'CREATE TRIGGER ledger_events_no_truncate BEFORE TRUNCATE ON public.%I '
            'FOR EACH STATEMENT EXECUTE FUNCTION public.ledger_events_append_only()', part);
        IF moved > 0 THEN
            INSERT INTO public.ledger_events SELECT * FROM pg_temp.ledger_partition_move;
        END IF;
        created := created + 1;
    END LOOP;
    RETURN created;
END
$$;
REVOKE ALL ON FUNCTION ledger_ensure_partitions(INTEGER) FROM PUBLIC;

-- 4. The grants: each role gets exactly these (what it had before is revoked first),
-- for the roles that exist. Run again after creating a missing role.
CREATE FUNCTION caracal_apply_grants() RETURNS VOID
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
    END IF;

    IF to_regrole('caracal_ledger_writer') IS NOT NULL THEN
        GRANT SELECT, INSERT ON ledger_events TO caracal_ledger_writer;
        GRANT EXECUTE ON FUNCTION ledger_ensure_partitions(INTEGER) TO caracal_ledger_writer;
        -- Partition leases (consumers/src/lease.rs; pg_locks is readable by all).
        GRANT SELECT, INSERT, UPDATE ON consumer_partitions TO caracal_ledger_writer;
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
