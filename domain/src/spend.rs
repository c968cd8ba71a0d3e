//! Spend history in Redis: the key layout the metrics-aggregator writes and the
//! authz-service's `SpendTrend` reads, and the anomaly rule. One place, so both
//! sides always agree on a name.
//!
//! Per agent (every key of an agent carries its hash tag `{<agent id>}`, so the
//! aggregator's one script per event runs on one Redis Cluster slot):
//! - `<prefix>:spend:{<agent>}:day:<YYYY-MM-DD>:<CUR>` and
//!   `<prefix>:spend:{<agent>}:hour:<YYYY-MM-DDTHH>:<CUR>`: hashes, field
//!   [`TOTAL_FIELD`] plus one [`model_field`] per model, exact integer micros,
//!   bucketed by the charge's `occurred_at` (UTC). Days kept [`DAY_TTL_S`], hours
//!   [`HOUR_TTL_S`] (enough for the anomaly rule's 8 days).
//! - `...:day:<YYYY-MM-DD>:<CUR>:events`: the ids of the events counted in that
//!   day bucket (set), kept [`DAY_TTL_S`] after its last addition: a redelivery
//!   however late (a `dlq replay`, an offset reset) counts nothing. Only events
//!   of the last [`MAX_EVENT_AGE_S`] are counted, so an event's id is still in
//!   its set whenever it could count again.
//! - `...:seen:<event id>`: the event was just counted (the deltas it applied, for
//!   the cross-agent totals after a crash between the aggregator's two steps),
//!   kept [`SEEN_TTL_S`].
//! - `...:rsv:<reservation id>`: what an `expire_charge` counted and where, so a
//!   `late_settle` replaces it by the final charge.
//! - `...:currencies`: the currencies the agent spent in; `...:root`: its root agent.
//! - `...:anomaly:<YYYY-MM-DD>`: an anomaly was reported that UTC day.
//!
//! Across agents (hash tag `{all}`): per day totals by currency, per-minute totals
//! for the spend rate, the day's agents ranked by spend, and the currencies seen.

use chrono::{DateTime, Duration, NaiveDate, Timelike, Utc};

/// Field of the bucket hashes holding the bucket's total.
pub const TOTAL_FIELD: &str = "total";
/// Day buckets are kept this long after their last write (about 13 months).
pub const DAY_TTL_S: u64 = 400 * 86_400;
/// Hour buckets: the anomaly rule reads 8 days of them; a day more of margin.
pub const HOUR_TTL_S: u64 = 9 * 86_400;
/// Counted-event markers (with the deltas for the cross-agent totals) and
/// reservation records: longer than any late settle can come (the hour buckets
/// they correct live as long). A redelivery after them is caught by the day's
/// event set ([`SpendKeys::day_events`]).
pub const SEEN_TTL_S: u64 = 9 * 86_400;
/// Events that occurred longer ago than this count nothing: their day buckets
/// are at the end of their retention, and their day's event set (kept
/// [`DAY_TTL_S`], a day longer) could be gone when they come again.
pub const MAX_EVENT_AGE_S: u64 = DAY_TTL_S - 86_400;
/// Minute buckets across agents (the spend rate reads the last hour).
pub const MINUTE_TTL_S: u64 = 2 * 3600;
/// The day's ranking of agents by spend (today's and yesterday's are read).
pub const RANKING_TTL_S: u64 = 3 * 86_400;
/// An anomaly marker outlives its day.
pub const ANOMALY_TTL_S: u64 = 2 * 86_400;
/// Most days one spend trend covers (day buckets are kept [`DAY_TTL_S`]).
pub const MAX_TREND_DAYS: u32 = 400;

/// The hash field of one model's spend in a bucket.
pub fn model_field(model: &str) -> String {
    format!("model:{model}")
}

/// The model named by a bucket field, or `None` for [`TOTAL_FIELD`] and others.
pub fn model_of_field(field: &str) -> Option<&str> {
    field.strip_prefix("model:")
}

/// The UTC day of an instant, as its key part (`2026-02-01`).
pub fn day_part(day: NaiveDate) -> String {
    day.format("%Y-%m-%d").to_string()
}

/// The start of the UTC hour containing `t`.
pub fn hour_start(t: DateTime<Utc>) -> DateTime<Utc> {
    let secs = t.timestamp() - i64::from(t.minute()) * 60 - i64::from(t.second());
    DateTime::from_timestamp(secs, 0).unwrap_or(t)
}

/// The hour key part (`2026-02-01T13`).
pub fn hour_part(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H").to_string()
}

/// The `n` days ending with `today`, oldest first.
pub fn last_days(today: NaiveDate, n: u32) -> Vec<NaiveDate> {
    (0..i64::from(n))
        .rev()
        .filter_map(|back| today.checked_sub_signed(Duration::days(back)))
        .collect()
}

/// Key builder for one deployment (same prefix as the authz-service's `redis.keyPrefix`).
#[derive(Debug, Clone)]
pub struct SpendKeys {
    prefix: String,
}

impl SpendKeys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn agent(&self, agent_id: &str) -> String {
        format!("{}:spend:{{{agent_id}}}", self.prefix)
    }

    fn all(&self) -> String {
        format!("{}:spend:{{all}}", self.prefix)
    }

    /// An agent's spend of one UTC day in one currency (hash).
    pub fn day(&self, agent_id: &str, day: NaiveDate, currency: &str) -> String {
        format!("{}:day:{}:{currency}", self.agent(agent_id), day_part(day))
    }

    /// An agent's spend of one UTC hour (any instant inside it) in one currency (hash).
    pub fn hour(&self, agent_id: &str, t: DateTime<Utc>, currency: &str) -> String {
        format!("{}:hour:{}:{currency}", self.agent(agent_id), hour_part(t))
    }

    /// Ids of the events counted in the agent's day bucket (set; same day and
    /// currency as [`Self::day`]).
    pub fn day_events(&self, agent_id: &str, day: NaiveDate, currency: &str) -> String {
        format!("{}:events", self.day(agent_id, day, currency))
    }

    /// Marker of a counted event.
    pub fn seen(&self, agent_id: &str, event_id: &str) -> String {
        format!("{}:seen:{event_id}", self.agent(agent_id))
    }

    /// What a reservation's charge events counted so far (hash).
    pub fn reservation(&self, agent_id: &str, reservation_id: &str) -> String {
        format!("{}:rsv:{reservation_id}", self.agent(agent_id))
    }

    /// The agent's root agent id (the Kafka key of its anomaly events).
    pub fn root(&self, agent_id: &str) -> String {
        format!("{}:root", self.agent(agent_id))
    }

    /// Currencies the agent spent in (set).
    pub fn currencies(&self, agent_id: &str) -> String {
        format!("{}:currencies", self.agent(agent_id))
    }

    /// Marker of the anomaly reported for the agent on `day`.
    pub fn anomaly(&self, agent_id: &str, day: NaiveDate) -> String {
        format!("{}:anomaly:{}", self.agent(agent_id), day_part(day))
    }

    /// Marker of an event counted in the cross-agent totals.
    pub fn all_seen(&self, event_id: &str) -> String {
        format!("{}:seen:{event_id}", self.all())
    }

    /// Spend of one UTC day across agents (hash: currency -> micros).
    pub fn all_day(&self, day: NaiveDate) -> String {
        format!("{}:day:{}", self.all(), day_part(day))
    }

    /// Spend of one UTC minute across agents (hash: currency -> micros).
    pub fn all_minute(&self, t: DateTime<Utc>) -> String {
        format!("{}:minute:{}", self.all(), t.timestamp().div_euclid(60))
    }

    /// Agents ranked by spend on `day` (sorted set: agent id -> micros).
    pub fn ranking(&self, day: NaiveDate, currency: &str) -> String {
        format!("{}:ranking:{}:{currency}", self.all(), day_part(day))
    }

    /// Currencies seen across agents (set).
    pub fn all_currencies(&self) -> String {
        format!("{}:currencies", self.all())
    }
}

/// Whether spend looks anomalous: the last 24 hours spent more than twice the
/// average daily spend of the 7 days before them, when that average is above
/// zero. Exact: `last_24h > 2 * prior_7d / 7` as `7 * last_24h > 2 * prior_7d`.
pub fn is_anomalous(last_24h_micros: i64, prior_7d_micros: i64) -> bool {
    prior_7d_micros > 0 && i128::from(last_24h_micros) * 7 > 2 * i128::from(prior_7d_micros)
}

/// The hour buckets of the anomaly rule at `now`: the last 24 (the current hour
/// and the 23 before it) and the 168 before those, each newest first.
pub fn anomaly_hours(now: DateTime<Utc>) -> (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) {
    let current = hour_start(now);
    let hour = |back: i64| current - Duration::hours(back);
    ((0..24).map(hour).collect(), (24..192).map(hour).collect())
}

/// The UTC days lying wholly inside the hours `first..=last` (hour starts): their
/// day totals add up to at most the spend of those hours, a cheap lower bound
/// that rules most agents out of the anomaly rule without reading 168 hours.
pub fn whole_days_within(first: DateTime<Utc>, last: DateTime<Utc>) -> Vec<NaiveDate> {
    let end = last + Duration::hours(1);
    let mut days = Vec::new();
    let mut day = day_of(first);
    // At most the days between the two, plus one.
    for _ in 0..=(end - first).num_days().max(0) + 1 {
        let start = day.and_time(chrono::NaiveTime::MIN).and_utc();
        if start >= first && start + Duration::days(1) <= end {
            days.push(day);
        }
        match day.succ_opt() {
            Some(next) => day = next,
            None => break,
        }
    }
    days
}

/// The UTC day of `t`.
pub fn day_of(t: DateTime<Utc>) -> NaiveDate {
    t.date_naive()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn keys_share_the_agent_hash_tag() {
        let k = SpendKeys::new("caracal");
        let t = at("2026-02-01T13:45:10Z");
        assert_eq!(
            k.day("a1", day_of(t), "USD"),
            "caracal:spend:{a1}:day:2026-02-01:USD"
        );
        assert_eq!(
            k.hour("a1", t, "EUR"),
            "caracal:spend:{a1}:hour:2026-02-01T13:EUR"
        );
        assert_eq!(
            k.day_events("a1", day_of(t), "USD"),
            "caracal:spend:{a1}:day:2026-02-01:USD:events"
        );
        assert_eq!(k.seen("a1", "r/settle"), "caracal:spend:{a1}:seen:r/settle");
        assert_eq!(k.reservation("a1", "r"), "caracal:spend:{a1}:rsv:r");
        assert_eq!(k.all_day(day_of(t)), "caracal:spend:{all}:day:2026-02-01");
        assert_eq!(
            k.all_minute(t),
            format!("caracal:spend:{{all}}:minute:{}", t.timestamp() / 60)
        );
        assert_eq!(model_of_field(&model_field("gpt-4o")), Some("gpt-4o"));
        assert_eq!(model_of_field(TOTAL_FIELD), None);
    }

    #[test]
    fn hours_and_days() {
        assert_eq!(
            hour_start(at("2026-02-01T13:45:10Z")),
            at("2026-02-01T13:00:00Z")
        );
        let days = last_days(day_of(at("2026-03-02T01:00:00Z")), 3);
        let text: Vec<String> = days.into_iter().map(day_part).collect();
        assert_eq!(text, ["2026-02-28", "2026-03-01", "2026-03-02"]);
        assert!(last_days(day_of(at("2026-03-02T01:00:00Z")), 0).is_empty());
        let (last, prior) = anomaly_hours(at("2026-02-10T05:30:00Z"));
        assert_eq!((last.len(), prior.len()), (24, 168));
        assert_eq!(last[0], at("2026-02-10T05:00:00Z"));
        assert_eq!(last[23], at("2026-02-09T06:00:00Z"));
        assert_eq!(prior[0], at("2026-02-09T05:00:00Z"));
        assert_eq!(prior[167], at("2026-02-02T06:00:00Z"));
        // Hours 2026-02-02T06 ..= 2026-02-09T05: whole days 02-03 ..= 02-08.
        let days = whole_days_within(prior[167], prior[0]);
        let text: Vec<String> = days.into_iter().map(day_part).collect();
        assert_eq!(
            text,
            [
                "2026-02-03",
                "2026-02-04",
                "2026-02-05",
                "2026-02-06",
                "2026-02-07",
                "2026-02-08"
            ]
        );
        // In the last hour of a day: the prior hours end with a whole day.
        let (_, prior) = anomaly_hours(at("2026-02-10T23:10:00Z"));
        assert_eq!(whole_days_within(prior[167], prior[0]).len(), 7);
        assert!(whole_days_within(prior[0], prior[0]).is_empty());
    }

    #[test]
    fn anomaly_rule_is_exact() {
        // Average 100/day over 7 days: 700. Twice the average is 200.
        assert!(!is_anomalous(200, 700));
        assert!(is_anomalous(201, 700));
        // Average 1/7 micro: anything above 2/7 micro, i.e. 1 micro, counts.
        assert!(is_anomalous(1, 1));
        assert!(!is_anomalous(0, 1));
        // No history: never.
        assert!(!is_anomalous(1_000_000, 0));
        assert!(!is_anomalous(5, -3));
        assert!(is_anomalous(i64::MAX, i64::MAX / 4));
    }
}
