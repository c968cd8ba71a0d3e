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

    /// The reservation of a request: its live record (`L...`) until it is
    /// settled, released or expired, then a marker of how it ended (`D...`, kept
    /// `finishedMarkerTtl`) that answers retries of the Settle and of the
    /// Authorize that made it. One key per (agent, request id): a reservation id's
    /// generation (see [`reservation_id`]) is not part of it, so every
    /// reservation of a request id, and a retried Authorize that does not know
    /// the generation yet, find the same key.
    pub fn reservation(&self, partition: u16, reservation_id: &str) -> String {
        let (stem, _) = split_reservation_id(reservation_id);
        format!("{}:rsv:{stem}", self.tag(partition))
    }
    /// Live reservations of the partition by expiry time (zset, score = ms). Members
    /// are reservation id stems, one per record: each names the reservation its
    /// record holds (a new reservation of the request id replaces the score).
    pub fn expiry(&self, partition: u16) -> String {
        format!("{}:expiry", self.tag(partition))
    }
    /// The partition's budget-state marker: written when the deployment's budget
    /// state is first established (and by `caracal budget rebuild`), checked by
    /// every budget script. A Redis that lost its data lost it too, and the scripts
    /// then decide nothing on that partition (see `budget::state`).
    pub fn state_marker(&self, partition: u16) -> String {
        format!("{}:state", self.tag(partition))
    }
    /// Settles and Releases that arrived while the partition's state was lost
    /// (hash: reservation id stem -> the call's arguments), applied by `caracal
    /// budget rebuild` (finish.lua).
    pub fn parked(&self, partition: u16) -> String {
        format!("{}:parked", self.tag(partition))
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

/// Reservation ids carry their partition, so Settle and Release find the
/// hierarchy's keys without a lookup: `rsv_<partition>_<32 hex>_<generation>`.
///
/// The stem, `rsv_<partition>_<32 hex>`, is derived from the agent and its request
/// id (SHA-256, first 128 bits; [`reservation_stem`]): a retried Authorize names the
/// same record, so the record is the idempotency key and no separate request key
/// is written. Request ids are per agent: two agents using the same id get
/// different reservations.
///
/// The generation is the time (ms) of the Authorize that made the reservation. A
/// request id used again once the done marker of its earlier reservation has aged
/// out (`finishedMarkerTtl`) makes a new reservation in the same record; the
/// generation gives it an id of its own, and so event ids of its own
/// (`<reservation id>/settle` ...): the ledger keeps one final charge per
/// reservation id and deduplicates on event ids. Two reservations of one request
/// id are at least `finishedMarkerTtl` apart (the second is made only after the
/// first's marker is gone), so their generations differ as long as the replicas'
/// clocks agree that closely. The scripts refuse an id whose generation is not
/// the record's (an id of an earlier reservation never finishes a later one).
///
/// Ids without a generation (the stem alone) were issued before generations
/// existed, and name the request's record whatever its generation: they still
/// work, and ReleaseByRequest, which cannot know the generation, and the expiry
/// index (see [`KeySpace::expiry`]) use them.
pub fn reservation_stem(partition: u16, agent_id: &str, request_id: &str) -> String {
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

/// The id of the reservation of generation `generation` (the Authorize's time, ms)
/// of a request's stem (see [`reservation_stem`]).
pub fn reservation_id(stem: &str, generation: i64) -> String {
    format!("{stem}_{generation}")
}

/// Longest generation accepted: the digits of `i64::MAX`.
const MAX_GENERATION_DIGITS: usize = 19;

/// A reservation id's stem and generation (None: the id names none). An id that
/// is not well formed is its own stem.
pub fn split_reservation_id(reservation_id: &str) -> (&str, Option<&str>) {
    match reservation_id.rsplit_once('_') {
        Some((stem, generation))
            if (1..=MAX_GENERATION_DIGITS).contains(&generation.len())
                && generation.bytes().all(|b| b.is_ascii_digit())
                && well_formed_stem(stem).is_some() =>
        {
            (stem, Some(generation))
        }
        _ => (reservation_id, None),
    }
}

/// The partition of a well-formed stem, `rsv_<partition>_<32 hex>`.
fn well_formed_stem(stem: &str) -> Option<u16> {
    let rest = stem.strip_prefix("rsv_")?;
    let (p, id) = rest.split_once('_')?;
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    p.parse().ok()
}

/// The partition encoded in a reservation id (with or without its generation), if
/// it is well formed.
pub fn partition_of_reservation(reservation_id: &str, partitions: u16) -> Option<u16> {
    let (stem, _) = split_reservation_id(reservation_id);
    let p = well_formed_stem(stem)?;
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
        let stem = reservation_stem(7, "agent-a", "req-1");
        assert_eq!(partition_of_reservation(&stem, 16), Some(7));
        // Same agent and request id: same stem; another agent: another one.
        assert_eq!(stem, reservation_stem(7, "agent-a", "req-1"));
        assert_ne!(stem, reservation_stem(7, "agent-b", "req-1"));
        assert_ne!(stem, reservation_stem(7, "agent-a", "req-2"));
        // No ambiguity from concatenation.
        assert_ne!(
            reservation_stem(7, "ab", "c"),
            reservation_stem(7, "a", "bc")
        );
        assert_eq!(partition_of_reservation(&stem, 4), None);
        for bad in [
            "",
            "rsv_",
            "rsv_1_",
            "rsv_x_0190",
            "abc",
            "rsv_1_zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
            "rsv_1_0123456789abcdef0123456789abcdef_",
            "rsv_1_0123456789abcdef0123456789abcdef_12x",
            "rsv_1_0123456789abcdef0123456789abcdef_12345678901234567890",
            "rsv_1_0123456789abcdef_1733400000000",
        ] {
            assert_eq!(partition_of_reservation(bad, 16), None, "{bad}");
        }
    }

    #[test]
    fn generations_name_reservations_of_one_request_in_one_record() {
        let ks = KeySpace::new("caracal", 16);
        let stem = reservation_stem(3, "agent-a", "req-1");
        let first = reservation_id(&stem, 1_733_400_000_000);
        let second = reservation_id(&stem, 1_733_486_400_000);
        assert_ne!(first, second);
        assert_eq!(
            split_reservation_id(&first),
            (stem.as_str(), Some("1733400000000"))
        );
        assert_eq!(split_reservation_id(&stem), (stem.as_str(), None));
        assert_eq!(partition_of_reservation(&first, 16), Some(3));
        // One record per request: the stem, either generation, same key.
        assert_eq!(ks.reservation(3, &first), ks.reservation(3, &second));
        assert_eq!(ks.reservation(3, &first), ks.reservation(3, &stem));
        assert!(ks.reservation(3, &first).ends_with(&format!(":rsv:{stem}")));
        // An id that is not well formed is its own stem (nothing is cut off).
        for odd in ["x", "rsv_1_ab_123", "a_1"] {
            assert_eq!(split_reservation_id(odd), (odd, None));
        }
    }
}
