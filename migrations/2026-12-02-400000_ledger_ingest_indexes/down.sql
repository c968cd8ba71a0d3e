ALTER TABLE ledger_events
    DROP CONSTRAINT ledger_events_pkey,
    ADD CONSTRAINT ledger_events_pkey PRIMARY KEY (event_id, occurred_at);

CREATE INDEX ledger_events_root_time_idx ON ledger_events (root_agent_id, occurred_at);
