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

    /// Idempotency record of an Authorize request id.
    pub fn request(&self, partition: u16, request_id: &str) -> String {
        format!("{}:req:{request_id}", self.tag(partition))
    }
    /// A reservation record (hash).
    pub fn reservation(&self, partition: u16, reservation_id: &str) -> String {
        format!("{}:rsv:{reservation_id}", self.tag(partition))
    }
    /// Marker holding the outcome of a finished reservation, for retries.
    pub fn finished(&self, partition: u16, reservation_id: &str) -> String {
        format!("{}:done:{reservation_id}", self.tag(partition))
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
    pub fn rolling_counter(&self, partition: u16, policy_id: &str) -> String {
        format!("{}:r:{policy_id}", self.tag(partition))
    }
}

/// Reservation ids carry their partition (`rsv_<partition>_<uuid>`), so Settle and
/// Release find the hierarchy's keys without a lookup.
pub fn reservation_id(partition: u16, id: uuid::Uuid) -> String {
    format!("rsv_{partition}_{}", id.simple())
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
            ks.request(p, "r"),
            ks.reservation(p, "x"),
            ks.finished(p, "x"),
            ks.expiry(p),
            ks.outbox(p),
            ks.calendar_counter(p, "pol", "d:2026-02-03"),
            ks.rolling_counter(p, "pol"),
        ] {
            assert!(key.contains(&tag), "{key}");
            assert_eq!(key.matches('{').count(), 1, "{key}");
        }
        // Stable: the same root always maps to the same partition.
        assert_eq!(
            p,
            KeySpace::new("x", 16).partition_of("0190aaaa-0000-7000-8000-000000000001")
        );
    }

    #[test]
    fn reservation_ids_round_trip_and_reject_garbage() {
        let id = reservation_id(7, uuid::Uuid::now_v7());
        assert_eq!(partition_of_reservation(&id, 16), Some(7));
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
