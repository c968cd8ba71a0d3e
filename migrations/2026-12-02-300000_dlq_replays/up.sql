-- Replays of dead letters (issue 8 item 6): one row per dead letter of the DLQ topic
-- that an operator re-published to its original topic. The dead letter itself stays
-- in Kafka (a topic is append-only); this table is what makes a replay happen once.
--
-- The replay (service-kit/src/dlq_admin.rs) first claims the row (INSERT ... ON
-- CONFLICT DO NOTHING: of two concurrent replays of one dead letter only one
-- inserts), then produces with acks=all and waits for the broker's delivery report,
-- then marks the row done (replayed_at, target partition/offset). A row with
-- replayed_at set refuses every later replay of that dead letter. A claim whose
-- process died before the mark (replayed_at NULL, claimed_at old) may be taken over
-- by a later replay, which may then publish the message a second time: consumers
-- are idempotent on the event id, so that second copy changes nothing.
CREATE TABLE dlq_replays (
    dlq_topic        TEXT        NOT NULL CHECK (length(dlq_topic) BETWEEN 1 AND 249),
    dlq_partition    INTEGER     NOT NULL CHECK (dlq_partition >= 0),
    dlq_offset       BIGINT      NOT NULL CHECK (dlq_offset >= 0),
    -- Which admin credential asked for it (admin token or client certificate SAN).
    actor            TEXT        NOT NULL,
    -- Identifies the claim, so only the replay that holds it marks it done.
    claim_id         UUID        NOT NULL,
    claimed_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- NULL while the replay is in flight (or was interrupted, see above).
    replayed_at      TIMESTAMPTZ,
    target_topic     TEXT        NOT NULL,
    target_partition INTEGER,
    target_offset    BIGINT,
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset),
    CHECK (replayed_at IS NULL OR (target_partition IS NOT NULL AND target_offset IS NOT NULL))
);
