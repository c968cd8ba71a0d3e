//! The part of a budget rebuild that is not in the ledger: reservations open when
//! Redis lost its data, and Settles / Releases that arrived while it was lost.
//!
//! - Open reservations come back from the decisions topic. Every allow of kind
//!   `authorize` carries the reservation's record and expiry (authorize.lua). An
//!   allow is still open when no release (`release`, `expire_release`) on the
//!   topic and no charge in the ledger names its reservation id. Its record, its
//!   expiry-index entry and its reserved amount on each counter are put back as
//!   they were, once (a record already there is left alone), before the counters'
//!   spent fields are written and the markers set.
//! - Parked finishes: finish.lua keeps a Settle or Release that found the marker
//!   missing (one per reservation). Once the markers are back they are applied as
//!   the calls they were, through the same script: a charge made during the loss
//!   lands once, and a release frees the reservation instead of letting it expire.
//!
//! What cannot come back: an allow whose outbox entry had not reached Kafka when
//! Redis lost it (nothing holds it any more), and the done markers of finished
//! reservations (a retried Settle of one is then `unknown`: its charge is in the
//! ledger already).

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use caracal_proto::v1 as pb;
use caracal_service_kit::{
    kafka::KafkaConfig,
    redis::query_each,
    snapshot,
    topic_range::{RangeError, TopicRange},
};
use diesel::sql_types::{Array, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use prost::Message as _;
use rdkafka::Message;

use crate::{
    budget::{
        keys::partition_of_reservation,
        store::{Finish, FinishKind, FinishOutcome},
        BudgetStore,
    },
    error::{ServiceError, ServiceResult},
};

/// How a rebuild reads the decisions topic.
#[derive(Debug, Clone)]
pub struct DecisionsSource {
    pub kafka: KafkaConfig,
    /// `reservations.provisionalChargeExpiration`: no reservation is open longer
    /// (the topic is read from twice that, and a minute, before now).
    pub reservation_ttl: Duration,
    /// Longest the read may take.
    pub timeout: Duration,
}

/// One reservation to put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReservation {
    pub reservation_id: String,
    pub partition: u16,
    pub agent_id: String,
    pub record: String,
    pub expires_at_ms: i64,
    /// (counter key, field, amount): what the reservation holds on each counter.
    pub holds: Vec<(String, String, i64)>,
}

/// Puts a reservation back: KEYS[1] record, KEYS[2] expiry index; ARGV[1] record,
/// ARGV[2] expires at (ms), ARGV[3] stem, then (counter key, field, amount)
/// triples (counter keys share the record's hash tag). 0 when a record was there.
const RESTORE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
for i = 4, #ARGV, 3 do
  redis.call('HINCRBY', ARGV[i], ARGV[i + 1], ARGV[i + 2])
end
return 1
";

/// What a reservation holds on each of its counters, from its record (see
/// `budget::store::reservation_record`): `L amount currency n`, then n policy
/// lines `key id limit c|r bucket width older on-expiry`, then the metadata.
pub fn holds_of(record: &str) -> Option<Vec<(String, String, i64)>> {
    let mut lines = record.split('\n');
    let mut head = lines.next()?.split('\t');
    let (Some("L"), Some(amount), Some(_currency), Some(n)) =
        (head.next(), head.next(), head.next(), head.next())
    else {
        return None;
    };
    let amount: i64 = amount.parse().ok()?;
    let n: usize = n.parse().ok()?;
    let mut holds = Vec::with_capacity(n);
    for _ in 0..n {
        let fields: Vec<&str> = lines.next()?.split('\t').collect();
        let [key, _id, _limit, mode, bucket, ..] = fields.as_slice() else {
            return None;
        };
        let field = match *mode {
            "c" => "r".to_owned(),
            "r" => format!("r:{}", bucket.parse::<i64>().ok()?),
            _ => return None,
        };
        holds.push(((*key).to_owned(), field, amount));
    }
    Some(holds)
}

/// The reservations still open on `partitions` (of `agent` alone when given),
/// from the decisions topic (when the relay runs), the reservations a snapshot
/// held (`snapshot`: those not expired yet; the topic may be gone with a region)
/// and the ledger.
pub async fn open_reservations(
    conn: &mut AsyncPgConnection,
    source: Option<&DecisionsSource>,
    store: &BudgetStore,
    partitions: &[u16],
    agent: Option<&str>,
    snapshot: &[snapshot::Reservation],
) -> ServiceResult<Vec<OpenReservation>> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let events = match source {
        None => Vec::new(),
        Some(source) => {
            let since_ms = now_ms
                - i64::try_from(source.reservation_ttl.as_millis() * 2).unwrap_or(i64::MAX / 2)
                - 60_000;
            let since = chrono::DateTime::from_timestamp_millis(since_ms).unwrap_or_default();
            read_decisions(source, since).await.map_err(|e| {
                ServiceError::Unavailable(format!(
                    "cannot read the decisions topic for the reservations open at the loss: {e}"
                ))
            })?
        }
    };
    let mut allows: HashMap<String, pb::DecisionEvent> = HashMap::new();
    for r in snapshot.iter().filter(|r| r.expires_at_ms > now_ms) {
        allows.insert(
            r.reservation_id.clone(),
            pb::DecisionEvent {
                kind: "authorize".to_owned(),
                decision: pb::Decision::Allow as i32,
                reservation_id: r.reservation_id.clone(),
                agent_id: r.agent_id.clone(),
                reservation_record: r.record.clone(),
                expires_at: Some(prost_types::Timestamp {
                    seconds: r.expires_at_ms.div_euclid(1000),
                    nanos: i32::try_from(r.expires_at_ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
                }),
                ..Default::default()
            },
        );
    }
    let mut released: HashSet<String> = HashSet::new();
    for e in events {
        match e.kind.as_str() {
            "authorize"
                if e.decision == pb::Decision::Allow as i32 && !e.reservation_record.is_empty() =>
            {
                allows.insert(e.reservation_id.clone(), e);
            }
            "release" | "expire_release" => {
                released.insert(e.reservation_id);
            }
            _ => {}
        }
    }
    allows.retain(|rid, e| {
        !released.contains(rid)
            && agent.is_none_or(|a| e.agent_id == a)
            && partition_of_reservation(rid, store.keys().partitions())
                .is_some_and(|p| partitions.binary_search(&p).is_ok())
    });
    // Those the ledger has a charge of are finished (settled or expired).
    let ids: Vec<String> = allows.keys().cloned().collect();
    #[derive(diesel::QueryableByName)]
    struct Charged {
        #[diesel(sql_type = Text)]
        reservation_id: String,
    }
    let mut charged: HashSet<String> = HashSet::new();
    for chunk in ids.chunks(5_000) {
        let rows: Vec<Charged> = diesel::sql_query(
            "SELECT DISTINCT reservation_id FROM ledger_events WHERE reservation_id = ANY($1)",
        )
        .bind::<Array<Text>, _>(chunk)
        .load(conn)
        .await?;
        charged.extend(rows.into_iter().map(|r| r.reservation_id));
    }
    let mut open = Vec::new();
    for (rid, e) in allows {
        if charged.contains(&rid) {
            continue;
        }
        let Some(partition) = partition_of_reservation(&rid, store.keys().partitions()) else {
            continue;
        };
        let Some(holds) = holds_of(&e.reservation_record) else {
            tracing::warn!(reservation = %rid, "an allow event's record does not parse; not restored");
            continue;
        };
        let expires_at_ms = e.expires_at.as_ref().map_or(0, |t| {
            t.seconds
                .saturating_mul(1000)
                .saturating_add(i64::from(t.nanos / 1_000_000))
        });
        open.push(OpenReservation {
            reservation_id: rid,
            partition,
            agent_id: e.agent_id,
            record: e.reservation_record,
            expires_at_ms,
            holds,
        });
    }
    open.sort_by(|a, b| a.reservation_id.cmp(&b.reservation_id));
    Ok(open)
}

/// Writes the reservations back; returns how many were restored (a record already
/// there is not).
pub async fn restore(store: &BudgetStore, open: &[OpenReservation]) -> ServiceResult<u64> {
    let keys = store.keys();
    let redis = store.connection();
    let mut restored = 0u64;
    for batch in open.chunks(500) {
        let cmds = batch
            .iter()
            .map(|r| {
                let (stem, _) = crate::budget::keys::split_reservation_id(&r.reservation_id);
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(RESTORE)
                    .arg(2)
                    .arg(keys.reservation(r.partition, &r.reservation_id))
                    .arg(keys.expiry(r.partition))
                    .arg(&r.record)
                    .arg(r.expires_at_ms)
                    .arg(stem);
                for (key, field, amount) in &r.holds {
                    cmd.arg(key).arg(field).arg(amount);
                }
                cmd
            })
            .collect();
        let replies = query_each(&redis, cmds).await.map_err(|e| {
            ServiceError::Unavailable(format!(
                "budget store unavailable while restoring reservations (run the rebuild again: \
                 a restored one is not restored twice): {e}"
            ))
        })?;
        restored += replies
            .iter()
            .filter(|v| matches!(v, redis::Value::Int(1)))
            .count() as u64;
    }
    Ok(restored)
}

/// Applies the finishes parked on `partitions` (their markers must be back);
/// returns how many finished a reservation. One that fails stays parked.
pub async fn apply_parked(store: &BudgetStore, partitions: &[u16]) -> ServiceResult<u64> {
    let mut applied = 0u64;
    let mut conn = store.connection();
    for &p in partitions {
        let parked_key = store.keys().parked(p);
        let entries: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&parked_key)
            .query_async(&mut conn)
            .await
            .map_err(|e| ServiceError::Unavailable(format!("reading parked finishes: {e}")))?;
        for (stem, line) in entries {
            let f: Vec<&str> = line.splitn(12, '\t').collect();
            let [mode, now, generation, cost, input, output, cached, pv, currency, tombstone, ttl, reason] =
                f.as_slice()
            else {
                tracing::warn!(%stem, "a parked finish does not parse; left parked");
                continue;
            };
            let kind = match *mode {
                "settle" => FinishKind::Settle,
                "release" => FinishKind::Release,
                _ => continue,
            };
            let rid = if generation.is_empty() {
                stem.clone()
            } else {
                format!("{stem}_{generation}")
            };
            let num = |t: &str| t.parse::<i64>().unwrap_or(0);
            let unsigned = |t: &str| t.parse::<u64>().unwrap_or(0);
            let finish = Finish {
                cost_micros: num(cost),
                input_tokens: unsigned(input),
                output_tokens: unsigned(output),
                cached_input_tokens: unsigned(cached),
                price_version: i32::try_from(num(pv)).unwrap_or(0),
                reason,
                currency,
                tombstone: *tombstone == "1",
                ..Finish::new(kind, p, &rid, num(now), unsigned(ttl))
            };
            match store.finish(&finish).await {
                Ok(outcome) => {
                    if matches!(outcome, FinishOutcome::Finished { .. }) {
                        applied += 1;
                    } else {
                        tracing::info!(reservation = %rid, ?outcome, "a parked finish found nothing to finish");
                    }
                    let _: i64 = redis::cmd("HDEL")
                        .arg(&parked_key)
                        .arg(&stem)
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| {
                            ServiceError::Unavailable(format!("clearing a parked finish: {e}"))
                        })?;
                }
                Err(error) => {
                    tracing::warn!(reservation = %rid, %error, "a parked finish failed; left parked");
                }
            }
        }
    }
    Ok(applied)
}

/// Every decision event on the topic from `since` to its end as it is now.
async fn read_decisions(
    source: &DecisionsSource,
    since: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<pb::DecisionEvent>, RangeError> {
    // Retention deleting decisions older than `since` is no loss here.
    let mut range = TopicRange::open(
        &source.kafka,
        &source.kafka.decisions_topic,
        since,
        None,
        source.timeout,
        false,
    )?;
    let mut events = Vec::new();
    while let Some(m) = range.next().await? {
        // Other messages share the topic (spending anomalies): only what decodes
        // as a decision with an id counts.
        if let Some(Ok(e)) = m.payload().map(pb::DecisionEvent::decode) {
            if !e.event_id.is_empty() && !e.reservation_id.is_empty() {
                events.push(e);
            }
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_says_what_it_holds_on_each_counter() {
        let record = "L\t500000\tUSD\t2\n\
                      p:{p1}:c:pol1:2026-12-06\tpol1\t10000000\tc\t0\t0\t0\tcharge\n\
                      p:{p1}:r:pol2:60\tpol2\t5000000\tr\t29463000\t60\t59\trelease\n\
                      {\"generation\":\"1\"}";
        assert_eq!(
            holds_of(record),
            Some(vec![
                (
                    "p:{p1}:c:pol1:2026-12-06".to_owned(),
                    "r".to_owned(),
                    500_000
                ),
                (
                    "p:{p1}:r:pol2:60".to_owned(),
                    "r:29463000".to_owned(),
                    500_000
                ),
            ])
        );
        assert_eq!(holds_of("D\tsettle\t1\t1\tUSD"), None);
        assert_eq!(
            holds_of("L\t5\tUSD\t2\nonly-one\tp\t1\tc\t0\t0\t0\tcharge"),
            None
        );
    }
}
