//! The hot-path tests of `authorize.rs` — 1,000 concurrent authorizations, the
//! shared-parent race, idempotent retries, expiry, deny reasons, replicas — run
//! unchanged on the shared local Redis Cluster (3 primaries + 3 replicas,
//! `redis.mode: cluster`, one replica acknowledging every decision). A test binary
//! named `cluster_*` makes `caracal_tests::TestStack` use the cluster.

#[path = "authorize.rs"]
mod authorize;
