DROP TABLE IF EXISTS dlq_replays;
