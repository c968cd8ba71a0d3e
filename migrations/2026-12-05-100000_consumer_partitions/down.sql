DROP TABLE consumer_partitions;
