-- When each charge's reservation was made (ChargeEvent.reserved_at). A charge counts
-- in the policy windows that were open at that moment (a Settle just after midnight
-- charges yesterday's daily counter, the one its reservation was made on), so this,
-- not occurred_at, is what ties a ledger row to a budget window: `caracal ledger
-- reconcile` compares the ledger with the Redis counters on it. NULL for events
-- written before the field existed; readers fall back to occurred_at.
ALTER TABLE ledger_events ADD COLUMN reserved_at TIMESTAMPTZ NULL;

-- The view was expanded with the columns of its time: recreate it so it carries
-- the new column too (same rule, see 2026-12-02-100000_ledger_events).
CREATE OR REPLACE VIEW ledger_final_charges AS
SELECT DISTINCT ON (reservation_id) *
FROM ledger_events
ORDER BY reservation_id, (kind = 'late_settle') DESC, occurred_at DESC, event_id DESC;
