-- The Merkle log's ingest cost (issue 26: the ledger-writer with the sequencer
-- running must keep >= 0.80 of its rate without it).
--
-- merkle_queue: one entry per writer statement instead of one per row. The writer
-- binds the batch's (occurred_at, event_id, leaf hash) arrays anyway; storing them
-- as they are is one heap tuple and one index entry per statement, where a row
-- each cost about 9 us to insert and 7 us to delete. Element k of each array is
-- one ledger row; leaf_hashes[k] NULL = the sequencer hashes the stored row (the
-- backfill of rows written before the log). The sequencer takes whole entries,
-- oldest first, and appends their rows in array order.
--
-- merkle_leaves: UNIQUE (occurred_at, event_id), the ledger's own key order, so
-- inserts land at the right edge of the index (leaves arrive in about time order)
-- and time ranges are index ranges; a hash index serves lookups by event_id
-- alone (`merkle prove --event-id`). The BRIN index is no longer needed.

ALTER TABLE merkle_queue RENAME TO merkle_queue_rows;
ALTER SEQUENCE merkle_queue_id_seq RENAME TO merkle_queue_rows_id_seq;

CREATE TABLE merkle_queue (
    id           BIGSERIAL     PRIMARY KEY,
    leaves       INTEGER       NOT NULL CHECK (leaves > 0),
    occurred_ats TIMESTAMPTZ[] NOT NULL,
    event_ids    TEXT[]        NOT NULL,
    leaf_hashes  BYTEA[]       NOT NULL,
    CHECK (cardinality(occurred_ats) = leaves
           AND cardinality(event_ids) = leaves
           AND cardinality(leaf_hashes) = leaves)
);
-- Ids and hashes barely compress: out of line without trying.
ALTER TABLE merkle_queue ALTER COLUMN occurred_ats SET STORAGE EXTERNAL;
ALTER TABLE merkle_queue ALTER COLUMN event_ids SET STORAGE EXTERNAL;
ALTER TABLE merkle_queue ALTER COLUMN leaf_hashes SET STORAGE EXTERNAL;

-- What was queued, in its order, 5,000 rows an entry.
INSERT INTO merkle_queue (leaves, occurred_ats, event_ids, leaf_hashes)
SELECT count(*), array_agg(occurred_at ORDER BY id), array_agg(event_id ORDER BY id),
       array_agg(leaf_hash ORDER BY id)
FROM (SELECT id, occurred_at, event_id, leaf_hash,
             (row_number() OVER (ORDER BY id) - 1) / 5000 AS chunk
      FROM merkle_queue_rows) r
GROUP BY chunk
ORDER BY chunk;

DROP TABLE merkle_queue_rows;

ALTER TABLE merkle_leaves DROP CONSTRAINT merkle_leaves_event_id_occurred_at_key;
DROP INDEX merkle_leaves_time_brin;
ALTER TABLE merkle_leaves ADD CONSTRAINT merkle_leaves_occurred_at_event_id_key
    UNIQUE (occurred_at, event_id);
CREATE INDEX merkle_leaves_event_id_hash ON merkle_leaves USING hash (event_id);

-- The new table gets the queue's grants (caracal_apply_grants names merkle_queue
-- and merkle_queue_id_seq, as before).
SELECT caracal_apply_grants();
