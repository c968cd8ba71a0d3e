DROP VIEW IF EXISTS ledger_final_charges;
ALTER TABLE ledger_events DROP COLUMN IF EXISTS reserved_at;
CREATE VIEW ledger_final_charges AS
SELECT DISTINCT ON (reservation_id) *
FROM ledger_events
ORDER BY reservation_id, (kind = 'late_settle') DESC, occurred_at DESC, event_id DESC;
