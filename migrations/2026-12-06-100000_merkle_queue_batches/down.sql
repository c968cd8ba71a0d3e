-- Back to one queue row per ledger row, in the same order.
ALTER TABLE merkle_queue RENAME TO merkle_queue_batches;
ALTER SEQUENCE merkle_queue_id_seq RENAME TO merkle_queue_batches_id_seq;

CREATE TABLE merkle_queue (
    id          BIGSERIAL   PRIMARY KEY,
    occurred_at TIMESTAMPTZ NOT NULL,
    event_id    TEXT        NOT NULL,
    leaf_hash   BYTEA       CHECK (leaf_hash IS NULL OR length(leaf_hash) = 32)
);
INSERT INTO merkle_queue (occurred_at, event_id, leaf_hash)
SELECT u.occurred_at, u.event_id, u.leaf_hash
FROM merkle_queue_batches b,
     unnest(b.occurred_ats, b.event_ids, b.leaf_hashes) WITH ORDINALITY
       AS u(occurred_at, event_id, leaf_hash, ord)
ORDER BY b.id, u.ord;
DROP TABLE merkle_queue_batches;

DROP INDEX merkle_leaves_event_id_hash;
ALTER TABLE merkle_leaves DROP CONSTRAINT merkle_leaves_occurred_at_event_id_key;
ALTER TABLE merkle_leaves ADD CONSTRAINT merkle_leaves_event_id_occurred_at_key
    UNIQUE (event_id, occurred_at);
CREATE INDEX merkle_leaves_time_brin ON merkle_leaves USING brin (occurred_at);

SELECT caracal_apply_grants();
