DROP VIEW IF EXISTS ledger_final_charges;
DROP FUNCTION IF EXISTS ledger_ensure_partitions(INTEGER);
DROP TABLE IF EXISTS ledger_events;
