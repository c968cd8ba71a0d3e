-- Admin change events (issue 8 item 1): every admin write appends its event here in
-- the same transaction as the change, so a rolled-back change leaves no event and a
-- committed one cannot lose it. The service's relay (authz-service/src/admin_events.rs)
-- sends the rows to Kafka in id order and deletes each once the broker has it.
--
-- The insert comes after the writer's update of config_epoch (a row every admin
-- write locks until it commits), so ids are handed out in commit order: the relay,
-- reading from the head, never sees a later event of a key before an earlier one.
CREATE TABLE admin_outbox (
    id          BIGSERIAL PRIMARY KEY,
    -- Stable event id (UUID v7), the Kafka `event_id` header; consumers dedupe on it.
    event_id    UUID NOT NULL UNIQUE,
    -- Logical stream, mapped to a configured topic by the relay.
    topic       TEXT NOT NULL CHECK (topic IN ('agent_lifecycle', 'policy_changes')),
    -- Kafka key: the hierarchy's root agent id, or provider/model for prices.
    key         TEXT NOT NULL CHECK (length(key) BETWEEN 1 AND 512),
    -- Event kind (agent_created, policy_updated, ...): the `event_type` header.
    event_type  TEXT NOT NULL CHECK (length(event_type) BETWEEN 1 AND 64),
    -- The encoded protobuf event (AgentLifecycleEvent or PolicyChangeEvent).
    payload     BYTEA NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
