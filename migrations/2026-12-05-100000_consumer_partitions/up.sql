-- Where each consumer group stands on each partition it reads (issue 22 item 2): the
-- partition's owner (the replica holding its lease, consumers/src/lease.rs), the
-- offset committed after the last durable batch, the partition's end offset as last
-- seen, and when each moved. Written by the owning replica every lease tick; read by
-- `caracal ledger status` and by anyone asking "is the ledger keeping up?". Not the
-- ledger of record: the offsets themselves live in Kafka's group, and a row here is
-- at most one tick old.
CREATE TABLE consumer_partitions (
    group_id          TEXT        NOT NULL CHECK (length(group_id) BETWEEN 1 AND 255),
    topic             TEXT        NOT NULL CHECK (length(topic) BETWEEN 1 AND 249),
    kafka_partition   INTEGER     NOT NULL CHECK (kafka_partition >= 0),
    -- The replica holding the lease (host/pid/member slot), NULL once released.
    owner             TEXT,
    -- The next offset to read, as committed after the last durable batch.
    committed_offset  BIGINT,
    -- The partition's high watermark when last sampled.
    end_offset        BIGINT,
    -- When committed_offset last moved (a write reached the ledger).
    last_commit_at    TIMESTAMPTZ,
    -- When the owner last reported (its lease tick).
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, kafka_partition)
);
