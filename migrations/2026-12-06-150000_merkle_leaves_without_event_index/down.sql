CREATE INDEX IF NOT EXISTS merkle_leaves_event_id_hash ON merkle_leaves USING hash (event_id);
