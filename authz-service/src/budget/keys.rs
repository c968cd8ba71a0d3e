//! Redis key layout of the budget state.
//!
//! Every key of one agent hierarchy carries the hash tag of the hierarchy's
//! partition, `{pN}` with N = hash(root agent id) mod `partitions`. So the scripts that
//! touch a hierarchy's counters, reservations, expiry index and outbox run on one
//! Redis Cluster slot, and the expiry sweeper and the outbox relay have a fixed,
//! small set of places to look (one expiry index and one outbox per partition)
//! instead of one per hierarchy.
//!
//! `partitions` must not change while state exists (it would move hierarchies).

/// Key builder for one deployment (prefix + partition count).
#[derive(Debug, Clone)]
pub struct KeySpace {
    prefix: String,
    partitions: u16,
}

impl KeySpace {
    pub fn new(prefix: impl Into<String>, partitions: u16) -> Self {
        Self {
            prefix: prefix.into(),
            partitions: partitions.max(1),
        }
    }

    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The partition of a hierarchy, from its root agent id (FNV-1a: stable across
    /// processes and releases, unlike std's randomised hasher).
    pub fn partition_of(&self, root_agent_id: &str) -> u16 {
        let mut h: u32 = 0x811c_9dc5;
        for b in root_agent_id.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        (h % u32::from(self.partitions)) as u16
    }

    fn tag(&self, partition: u16) -> String {
        format!("{}:{{p{partition}}}", self.prefix)
    }

    /// A reservation: its live record (`L...`) until it is settled, released or
    /// expired, then a marker of how it ended (`D...`, kept `finishedMarkerTtl`) that
    /// answers retries of the Settle and of the Authorize that made it.
    pub fn reservation(&self, partition: u16, reservation_id: &str) -> String {
        format!("{}:rsv:{reservation_id}", self.tag(partition))
    }
    /// Reservations of the partition by expiry time (zset, score = ms).
    pub fn expiry(&self, partition: u16) -> String {
        format!("{}:expiry", self.tag(partition))
    }
    /// Events waiting for the Kafka relay (stream).
    pub fn outbox(&self, partition: u16) -> String {
        format!("{}:outbox", self.tag(partition))
    }
    /// Lease that lets one relay at a time drain a partition's outbox.
    pub fn relay_lease(&self, partition: u16) -> String {
        format!("{}:relay-lease", self.tag(partition))
    }
    /// Counter of one calendar window of a policy (hash {s: spent, r: reserved}).
    pub fn calendar_counter(&self, partition: u16, policy_id: &str, window_key: &str) -> String {
        format!("{}:c:{policy_id}:{window_key}", self.tag(partition))
    }
    /// Sub-bucket counters of a rolling policy (hash {s:<bucket>, r:<bucket>}).
    ///
    /// The key carries the bucket width: bucket numbers only mean something for
    /// one width (bucket 29000000 of 60 s is not bucket 29000000 of 900 s), so a
    /// policy whose window changes (hourly -> daily) must never read or write the
    /// old width's fields. Every rolling window has its own width (see
    /// `caracal_domain::window::rolling_bucket_width`), so the width also names
    /// the window. Whether a window change may happen at all while the old
    /// counter holds spend is the admin API's call (`admin::counters`).
    ///
    /// Upgrade note: counters written before the width was part of the key
    /// (`...:r:<policy>`) are not read any more; a rolling window restarts once at
    /// that upgrade, and the old keys (no TTL) can be deleted after one window.
    pub fn rolling_counter(&self, partition: u16, policy_id: &str, width_s: i64) -> String {
        format!("{}:r:{policy_id}:{width_s}", self.tag(partition))
    }
}

/// Reservation ids carry their partition (`rsv_<partition>_<32 hex>`), so Settle and
/// Release find the hierarchy's keys without a lookup.
///
/// The hex part is derived from the agent and its request id (SHA-256, first 128
/// bits): a retried Authorize names the same reservation, so the reservation's own
/// record is the idempotency key and no separate request key is written. Request ids
/// are per agent: two agents using the same id get different reservations.
pub fn reservation_id_for(partition: u16, agent_id: &str, request_id: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write as _;
    let digest = Sha256::new()
        .chain_update(agent_id.as_bytes())
        .chain_update([0u8])
        .chain_update(request_id.as_bytes())
        .finalize();
    let mut id = String::with_capacity(40);
    let _ = write!(id, "rsv_{partition}_");
    for b in &digest[..16] {
        let _ = write!(id, "{b:02x}");
    }
    id
}

/// The partition encoded in a reservation id, if it is well formed.
pub fn partition_of_reservation(reservation_id: &str, partitions: u16) -> Option<u16> {
    let rest = reservation_id.strip_prefix("rsv_")?;
    let (p, id) = rest.split_once('_')?;
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let p: u16 = p.parse().ok()?;
    (p < partitions).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_a_hierarchy_share_one_hash_tag() {
        let ks = KeySpace::new("caracal", 16);
        let p = ks.partition_of("0190aaaa-0000-7000-8000-000000000001");
        assert!(p < 16);
        let tag = format!("{{p{p}}}");
        for key in [
            ks.reservation(p, "x"),
            ks.expiry(p),
            ks.outbox(p),
            ks.calendar_counter(p, "pol", "d:2026-02-03"),
            ks.rolling_counter(p, "pol", 60),
        ] {
            assert!(key.contains(&tag), "{key}");
            assert_eq!(key.matches('{').count(), 1, "{key}");
        }
        // Another bucket width is another counter: a window change never reuses
        // the old width's bucket fields.
        assert_ne!(
            ks.rolling_counter(p, "pol", 60),
            ks.rolling_counter(p, "pol", 900)
        );
        // Stable: the same root always maps to the same partition.
        assert_eq!(
            p,
            KeySpace::new("x", 16).partition_of("0190aaaa-0000-7000-8000-000000000001")
        );
    }

    #[test]
    fn reservation_ids_round_trip_and_reject_garbage() {
        let id = reservation_id_for(7, "agent-a", "req-1");
        assert_eq!(partition_of_reservation(&id, 16), Some(7));
        // Same agent and request id: same reservation; another agent: another one.
        assert_eq!(id, reservation_id_for(7, "agent-a", "req-1"));
        assert_ne!(id, reservation_id_for(7, "agent-b", "req-1"));
        assert_ne!(id, reservation_id_for(7, "agent-a", "req-2"));
        // No ambiguity from concatenation.
        assert_ne!(
            reservation_id_for(7, "ab", "c"),
            reservation_id_for(7, "a", "bc")
        );
        assert_eq!(partition_of_reservation(&id, 4), None);
        for bad in [
            "",
            "rsv_",
            "rsv_1_",
            "rsv_x_0190",
            "abc",
            "rsv_1_zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
        ] {
            assert_eq!(partition_of_reservation(bad, 16), None, "{bad}");
        }
    }
}
