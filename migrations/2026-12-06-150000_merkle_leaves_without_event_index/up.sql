-- merkle_leaves loses its hash index on event_id (issue 26, the ingest ratio).
--
-- Every leaf paid for three indexes: the leaf index, (occurred_at, event_id) and
-- this one. Measured on 1,000,000 rows (2 cores): 4.9 s to insert with it, 3.1 s
-- without; the sequencer shares the cores with the ledger-writer, so that time
-- came out of ingest. `merkle prove --event-id` now finds the row's time in
-- ledger_events through its reservation_id index (the services' event ids are
-- `<reservation id>/<kind>`) and then the leaf by (occurred_at, event_id); an
-- event id of another shape scans the leaves (merkle-log/src/proofs.rs).
DROP INDEX IF EXISTS merkle_leaves_event_id_hash;
