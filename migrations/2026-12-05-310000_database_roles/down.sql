-- The group roles stay (cluster-wide: other databases may use them); they lose
-- what this migration granted them here.
DO $$
DECLARE
    r TEXT;
BEGIN
    FOREACH r IN ARRAY ARRAY['caracal_authz', 'caracal_ledger_writer', 'caracal_audit_logger',
                             'caracal_audit_retention'] LOOP
        CONTINUE WHEN to_regrole(r) IS NULL;
        EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA public FROM %I', r);
        EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM %I', r);
        EXECUTE format('REVOKE ALL ON FUNCTION ledger_ensure_partitions(INTEGER) FROM %I', r);
    END LOOP;
END
$$;
DROP FUNCTION caracal_apply_grants();

DO $$
DECLARE
    part REGCLASS;
BEGIN
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits
                WHERE inhparent = 'ledger_events'::regclass LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS ledger_events_no_truncate ON %s', part);
    END LOOP;
END
$$;
DROP TRIGGER ledger_events_no_truncate ON ledger_events;
DROP TRIGGER ledger_events_no_update_delete ON ledger_events;
DROP FUNCTION ledger_events_append_only();

CREATE OR REPLACE FUNCTION ledger_ensure_partitions(ahead INTEGER DEFAULT 2) RETURNS INTEGER
LANGUAGE plpgsql SECURITY INVOKER AS $$
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
ALTER FUNCTION ledger_ensure_partitions(INTEGER) RESET ALL;
GRANT EXECUTE ON FUNCTION ledger_ensure_partitions(INTEGER) TO PUBLIC;

CREATE OR REPLACE FUNCTION audit_logs_append_only() RETURNS trigger
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
