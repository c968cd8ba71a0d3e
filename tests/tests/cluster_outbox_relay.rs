//! The outbox relay tests of `outbox_relay.rs` — exactly-once delivery, poison
//! entries, a broker outage, two relays sharing partitions through leases — run
//! unchanged on the shared local Redis Cluster: the relay visits every partition's
//! stream on whichever shard serves it. A test binary named `cluster_*` makes
//! `caracal_tests::test_redis` connect to the cluster.

#[path = "outbox_relay.rs"]
mod outbox_relay;
