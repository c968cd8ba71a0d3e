//! Budget windows: which spend counts against a limit at a given instant.
//!
//! A policy limits spend per [`TimeWindow`] (hourly … monthly, or in total),
//! counted either on the UTC calendar ([`WindowType::Calendar`]: "this
//! month") or over a trailing span ([`WindowType::Rolling`]: "the last 30
//! days"). All instants are UTC so that every service, whatever its local
//! time zone, puts a charge into the same window.
//!
//! Rolling windows cannot be kept as one counter (spend has to fall out of
//! the window as time passes), so the hot path counts them in fixed-width
//! sub-buckets and sums the buckets that are still inside the span; see
//! [`rolling_buckets`] for the exact rule and its trade-off.

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, Months, NaiveTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;

const MINUTE_SECS: i64 = 60;
const HOUR_SECS: i64 = 60 * MINUTE_SECS;
const DAY_SECS: i64 = 24 * HOUR_SECS;
const WEEK_SECS: i64 = 7 * DAY_SECS;
/// The Unix epoch (1970-01-01) was a Thursday; the first Monday after it is
/// four days later. ISO weeks are aligned to that Monday.
const FIRST_MONDAY_SECS: i64 = 4 * DAY_SECS;

/// Why a window name was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WindowError {
    /// Not one of `hourly|daily|weekly|monthly|total`.
    #[error("unknown time window {0:?}: expected hourly, daily, weekly, monthly or total")]
    UnknownWindow(String),
    /// Not one of `calendar|rolling`.
    #[error("unknown window type {0:?}: expected calendar or rolling")]
    UnknownWindowType(String),
}

/// How long a budget period is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeWindow {
    /// One hour.
    Hourly,
    /// One day (calendar) or 24 hours (rolling).
    Daily,
    /// One ISO week, Monday to Sunday (calendar) or 7 days (rolling).
    Weekly,
    /// One calendar month (calendar) or 30 days (rolling).
    Monthly,
    /// All time: the budget never resets.
    Total,
}

impl TimeWindow {
    /// Every window, shortest first.
    pub const ALL: [TimeWindow; 5] = [
        TimeWindow::Hourly,
        TimeWindow::Daily,
        TimeWindow::Weekly,
        TimeWindow::Monthly,
        TimeWindow::Total,
    ];

    /// The lowercase name used in the API, the CLI and the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            TimeWindow::Hourly => "hourly",
            TimeWindow::Daily => "daily",
            TimeWindow::Weekly => "weekly",
            TimeWindow::Monthly => "monthly",
            TimeWindow::Total => "total",
        }
    }
}

impl fmt::Display for TimeWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TimeWindow {
    type Err = WindowError;

    /// Accepts the names of [`TimeWindow::as_str`], ignoring ASCII case and
    /// surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim();
        TimeWindow::ALL
            .into_iter()
            .find(|w| w.as_str().eq_ignore_ascii_case(name))
            .ok_or_else(|| WindowError::UnknownWindow(name.chars().take(40).collect()))
    }
}

/// Whether a window follows the calendar or trails the current instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowType {
    /// Resets at UTC calendar boundaries (top of the hour, midnight, Monday,
    /// the 1st of the month).
    Calendar,
    /// Counts the spend of the trailing [`rolling_span`].
    Rolling,
}

impl WindowType {
    /// Both window types.
    pub const ALL: [WindowType; 2] = [WindowType::Calendar, WindowType::Rolling];

    /// The lowercase name used in the API, the CLI and the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            WindowType::Calendar => "calendar",
            WindowType::Rolling => "rolling",
        }
    }
}

impl fmt::Display for WindowType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WindowType {
    type Err = WindowError;

    /// Accepts `calendar` or `rolling`, ignoring ASCII case and surrounding
    /// whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim();
        WindowType::ALL
            .into_iter()
            .find(|w| w.as_str().eq_ignore_ascii_case(name))
            .ok_or_else(|| WindowError::UnknownWindowType(name.chars().take(40).collect()))
    }
}

/// A half-open interval `[start, end)` of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowBounds {
    /// First instant inside the window.
    pub start: DateTime<Utc>,
    /// First instant after the window (exclusive). `None` means unbounded:
    /// always for [`TimeWindow::Total`], and otherwise only for a window
    /// that would end beyond chrono's range (about year 262,000).
    pub end: Option<DateTime<Utc>>,
}

impl WindowBounds {
    /// Whether `t` lies in `[start, end)`.
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.start <= t && self.end.is_none_or(|end| t < end)
    }
}

/// The calendar window of kind `window` that contains `at`.
///
/// Hours and days follow UTC; weeks are ISO weeks starting Monday 00:00 UTC;
/// months are calendar months (their real lengths, leap years included).
/// [`TimeWindow::Total`] starts at the Unix epoch and never ends.
pub fn calendar_bounds(window: TimeWindow, at: DateTime<Utc>) -> WindowBounds {
    match window {
        TimeWindow::Hourly => aligned_bounds(at, HOUR_SECS, 0),
        TimeWindow::Daily => aligned_bounds(at, DAY_SECS, 0),
        TimeWindow::Weekly => aligned_bounds(at, WEEK_SECS, FIRST_MONDAY_SECS),
        TimeWindow::Monthly => month_bounds(at),
        TimeWindow::Total => WindowBounds {
            start: DateTime::<Utc>::UNIX_EPOCH,
            end: None,
        },
    }
}

/// Bounds of the fixed-length window containing `at`, where windows are
/// `width` seconds long and one of them starts `offset` seconds after the
/// epoch. Exact for UTC because UTC days are 86,400 seconds in chrono's
/// timestamps (leap seconds are folded into the preceding second).
fn aligned_bounds(at: DateTime<Utc>, width: i64, offset: i64) -> WindowBounds {
    let start_secs = (at.timestamp() - offset).div_euclid(width) * width + offset;
    WindowBounds {
        // Only out of range if the window began before chrono's minimum date;
        // clamping to that minimum is then the honest answer.
        start: DateTime::from_timestamp(start_secs, 0).unwrap_or(DateTime::<Utc>::MIN_UTC),
        end: DateTime::from_timestamp(start_secs + width, 0),
    }
}

fn month_bounds(at: DateTime<Utc>) -> WindowBounds {
    // with_day(1) cannot fail for a valid date; the Option is only chrono's
    // general signature.
    let first_day = at.date_naive().with_day(1);
    let midnight = |d: chrono::NaiveDate| d.and_time(NaiveTime::MIN).and_utc();
    WindowBounds {
        start: first_day.map_or(DateTime::<Utc>::MIN_UTC, midnight),
        // checked_add_months handles December -> January of the next year.
        end: first_day
            .and_then(|d| d.checked_add_months(Months::new(1)))
            .map(midnight),
    }
}

/// Length of a rolling window: 1 hour, 24 hours, 7 days, 30 days; `None`
/// for [`TimeWindow::Total`], whose rolling and calendar forms are the same
/// thing (all time).
pub fn rolling_span(window: TimeWindow) -> Option<Duration> {
    let secs = match window {
        TimeWindow::Hourly => HOUR_SECS,
        TimeWindow::Daily => DAY_SECS,
        TimeWindow::Weekly => WEEK_SECS,
        TimeWindow::Monthly => 30 * DAY_SECS,
        TimeWindow::Total => return None,
    };
    Some(Duration::seconds(secs))
}

/// Width of the sub-buckets a rolling window is counted in: 1 minute for
/// hourly, 15 minutes for daily, 1 hour for weekly, 6 hours for monthly;
/// `None` for [`TimeWindow::Total`], which has no rolling form.
///
/// Why these widths: they keep every window at 60–169 buckets, so summing
/// them in one Redis call stays cheap, while the over-count at the old edge
/// (at most one bucket, see [`rolling_buckets`]) stays a small fraction of
/// the span. Every width divides its span exactly.
pub fn rolling_bucket_width(window: TimeWindow) -> Option<Duration> {
    let secs = match window {
        TimeWindow::Hourly => MINUTE_SECS,
        TimeWindow::Daily => 15 * MINUTE_SECS,
        TimeWindow::Weekly => HOUR_SECS,
        TimeWindow::Monthly => 6 * HOUR_SECS,
        TimeWindow::Total => return None,
    };
    Some(Duration::seconds(secs))
}

/// Index of the `width`-wide bucket containing `at`: bucket `i` covers
/// `[epoch + i·width, epoch + (i+1)·width)`.
///
/// Floor division, so instants before the epoch get negative indexes and
/// bucket boundaries stay evenly spaced across the epoch. Widths are whole
/// seconds; a width under one second is treated as one second rather than
/// dividing by zero.
pub fn bucket_index(at: DateTime<Utc>, width: Duration) -> i64 {
    // timestamp() already floors sub-second parts (nanoseconds are never
    // negative), so flooring whole seconds is exact.
    at.timestamp().div_euclid(width.num_seconds().max(1))
}

/// First instant of bucket `index` of width `width` (see [`bucket_index`]);
/// `None` outside chrono's range.
pub fn bucket_start(index: i64, width: Duration) -> Option<DateTime<Utc>> {
    let secs = index.checked_mul(width.num_seconds().max(1))?;
    DateTime::from_timestamp(secs, 0)
}

/// Bucket indexes whose spend counts against the rolling `window` at `at`;
/// `None` for [`TimeWindow::Total`] (use its single all-time counter).
///
/// Invariant: every instant of `(at - span, at]` falls in one of these
/// buckets, so spend inside the window is never missed. The oldest bucket
/// usually only overlaps the window partly, and it is included whole: up to
/// one bucket width of spend from just before the window still counts. That
/// errs on the safe side for a hard limit: an agent may be refused slightly
/// early (by at most one bucket's spend, for at most one bucket width), but
/// it can never overspend because old spend was dropped too soon.
/// The range always has `span / width + 1` buckets.
pub fn rolling_buckets(window: TimeWindow, at: DateTime<Utc>) -> Option<RangeInclusive<i64>> {
    let span = rolling_span(window)?;
    let width = rolling_bucket_width(window)?;
    let newest = bucket_index(at, width);
    // (at - span) has the same sub-second part as `at`, so its whole-second
    // floor is at.timestamp() - span; the bucket holding it is the oldest
    // one that overlaps (at - span, at].
    let oldest = at
        .timestamp()
        .saturating_sub(span.num_seconds())
        .div_euclid(width.num_seconds().max(1));
    Some(oldest..=newest)
}

/// A stable identifier of the window that contains `at`, used to key budget
/// counters.
///
/// Calendar windows: `"h:2026-02-03T10"`, `"d:2026-02-03"`, `"w:2026-W06"`
/// (ISO week-year and week number, so 2027-01-01 is `"w:2026-W53"`),
/// `"m:2026-02"`. Rolling windows never roll over to a new key, so they are
/// `"r:hourly"`, `"r:daily"`, … (their buckets carry the time). Total is
/// `"t"` for both types, since rolling and calendar "all time" are the same
/// window and must share one counter.
pub fn window_key(window: TimeWindow, window_type: WindowType, at: DateTime<Utc>) -> String {
    if window == TimeWindow::Total {
        return "t".to_owned();
    }
    if window_type == WindowType::Rolling {
        return format!("r:{}", window.as_str());
    }
    match window {
        TimeWindow::Hourly => format!("h:{}", at.format("%Y-%m-%dT%H")),
        TimeWindow::Daily => format!("d:{}", at.format("%Y-%m-%d")),
        TimeWindow::Weekly => {
            let week = at.iso_week();
            format!("w:{:04}-W{:02}", week.year(), week.week())
        }
        TimeWindow::Monthly => format!("m:{}", at.format("%Y-%m")),
        TimeWindow::Total => "t".to_owned(),
    }
}

/// A window kind and type together, as stored on a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WindowSpec {
    /// Length of the window.
    pub window: TimeWindow,
    /// Calendar or rolling.
    pub window_type: WindowType,
}

impl WindowSpec {
    /// Combines a window and a type.
    pub const fn new(window: TimeWindow, window_type: WindowType) -> WindowSpec {
        WindowSpec {
            window,
            window_type,
        }
    }

    /// See [`window_key`].
    pub fn key(&self, at: DateTime<Utc>) -> String {
        window_key(self.window, self.window_type, at)
    }

    /// Whether spend made at `spent_at` counts against this window when
    /// evaluated at `at`: inside the calendar window containing `at`, or
    /// inside `(at - span, at]` for a rolling window (exactly, without the
    /// bucket rounding of [`rolling_buckets`]).
    pub fn counts(&self, spent_at: DateTime<Utc>, at: DateTime<Utc>) -> bool {
        match (self.window_type, rolling_span(self.window)) {
            (WindowType::Rolling, Some(span)) => match at.checked_sub_signed(span) {
                Some(oldest) => oldest < spent_at && spent_at <= at,
                None => spent_at <= at,
            },
            _ => calendar_bounds(self.window, at).contains(spent_at),
        }
    }
}

impl fmt::Display for WindowSpec {
    /// `"monthly/calendar"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.window, self.window_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .unwrap_or_else(|e| panic!("bad test instant {s}: {e}"))
            .with_timezone(&Utc)
    }

    #[test]
    fn names_round_trip() {
        for w in TimeWindow::ALL {
            assert_eq!(w.as_str().parse::<TimeWindow>(), Ok(w));
            assert_eq!(w.to_string(), w.as_str());
        }
        for w in WindowType::ALL {
            assert_eq!(w.as_str().parse::<WindowType>(), Ok(w));
            assert_eq!(w.to_string(), w.as_str());
        }
        assert_eq!(" Daily ".parse::<TimeWindow>(), Ok(TimeWindow::Daily));
        assert_eq!(
            "yearly".parse::<TimeWindow>(),
            Err(WindowError::UnknownWindow("yearly".into()))
        );
        assert_eq!(
            "sliding".parse::<WindowType>(),
            Err(WindowError::UnknownWindowType("sliding".into()))
        );
        assert_eq!(
            WindowSpec::new(TimeWindow::Monthly, WindowType::Calendar).to_string(),
            "monthly/calendar"
        );
    }

    /// (instant, window, expected start, expected end, expected calendar key)
    #[test]
    fn calendar_table() {
        use TimeWindow::*;
        #[rustfmt::skip]
        let cases: &[(&str, TimeWindow, &str, Option<&str>, &str)] = &[
            // instant                         window   start                   end (exclusive)               key
            ("2026-02-03T10:15:30Z",           Hourly,  "2026-02-03T10:00:00Z", Some("2026-02-03T11:00:00Z"), "h:2026-02-03T10"),
            ("2026-02-03T10:15:30Z",           Daily,   "2026-02-03T00:00:00Z", Some("2026-02-04T00:00:00Z"), "d:2026-02-03"),
            ("2026-02-03T10:15:30Z",           Weekly,  "2026-02-02T00:00:00Z", Some("2026-02-09T00:00:00Z"), "w:2026-W06"),
            ("2026-02-03T10:15:30Z",           Monthly, "2026-02-01T00:00:00Z", Some("2026-03-01T00:00:00Z"), "m:2026-02"),
            ("2026-02-03T10:15:30Z",           Total,   "1970-01-01T00:00:00Z", None,                         "t"),
            // Boundaries belong to the window they start.
            ("2026-02-03T10:00:00Z",           Hourly,  "2026-02-03T10:00:00Z", Some("2026-02-03T11:00:00Z"), "h:2026-02-03T10"),
            ("2026-02-03T10:59:59.999999999Z", Hourly,  "2026-02-03T10:00:00Z", Some("2026-02-03T11:00:00Z"), "h:2026-02-03T10"),
            // Leap day.
            ("2024-02-29T12:00:00Z",           Daily,   "2024-02-29T00:00:00Z", Some("2024-03-01T00:00:00Z"), "d:2024-02-29"),
            ("2024-02-29T12:00:00Z",           Monthly, "2024-02-01T00:00:00Z", Some("2024-03-01T00:00:00Z"), "m:2024-02"),
            ("2024-02-29T12:00:00Z",           Weekly,  "2024-02-26T00:00:00Z", Some("2024-03-04T00:00:00Z"), "w:2024-W09"),
            ("2100-02-15T00:00:00Z",           Monthly, "2100-02-01T00:00:00Z", Some("2100-03-01T00:00:00Z"), "m:2100-02"),
            // Year end.
            ("2026-12-31T23:59:59Z",           Monthly, "2026-12-01T00:00:00Z", Some("2027-01-01T00:00:00Z"), "m:2026-12"),
            ("2026-12-31T23:59:59Z",           Daily,   "2026-12-31T00:00:00Z", Some("2027-01-01T00:00:00Z"), "d:2026-12-31"),
            ("2026-12-31T23:59:59Z",           Hourly,  "2026-12-31T23:00:00Z", Some("2027-01-01T00:00:00Z"), "h:2026-12-31T23"),
            ("2026-01-31T08:00:00Z",           Monthly, "2026-01-01T00:00:00Z", Some("2026-02-01T00:00:00Z"), "m:2026-01"),
            ("2026-04-30T08:00:00Z",           Monthly, "2026-04-01T00:00:00Z", Some("2026-05-01T00:00:00Z"), "m:2026-04"),
            // ISO weeks across a year boundary: 2027-01-01 (Friday) is in 2026-W53.
            ("2027-01-01T00:00:00Z",           Weekly,  "2026-12-28T00:00:00Z", Some("2027-01-04T00:00:00Z"), "w:2026-W53"),
            ("2027-01-03T23:59:59Z",           Weekly,  "2026-12-28T00:00:00Z", Some("2027-01-04T00:00:00Z"), "w:2026-W53"),
            ("2027-01-04T00:00:00Z",           Weekly,  "2027-01-04T00:00:00Z", Some("2027-01-11T00:00:00Z"), "w:2027-W01"),
            // 2025-12-29 (Monday) starts 2026-W01.
            ("2025-12-31T12:00:00Z",           Weekly,  "2025-12-29T00:00:00Z", Some("2026-01-05T00:00:00Z"), "w:2026-W01"),
            // Sunday belongs to the week that started the Monday before.
            ("2026-02-08T23:59:59Z",           Weekly,  "2026-02-02T00:00:00Z", Some("2026-02-09T00:00:00Z"), "w:2026-W06"),
            ("2026-02-09T00:00:00Z",           Weekly,  "2026-02-09T00:00:00Z", Some("2026-02-16T00:00:00Z"), "w:2026-W07"),
            // Before the epoch (floor, not truncation towards zero).
            ("1969-12-31T23:30:00Z",           Hourly,  "1969-12-31T23:00:00Z", Some("1970-01-01T00:00:00Z"), "h:1969-12-31T23"),
            ("1970-01-01T00:00:00Z",           Weekly,  "1969-12-29T00:00:00Z", Some("1970-01-05T00:00:00Z"), "w:1970-W01"),
        ];
        for &(at, window, start, end, key) in cases {
            let bounds = calendar_bounds(window, t(at));
            let expected = WindowBounds {
                start: t(start),
                end: end.map(t),
            };
            assert_eq!(bounds, expected, "{window} bounds at {at}");
            assert!(bounds.contains(t(at)), "{window} at {at} contains itself");
            assert_eq!(
                window_key(window, WindowType::Calendar, t(at)),
                key,
                "{window} key at {at}"
            );
        }
    }

    #[test]
    fn rolling_keys_and_spans() {
        let at = t("2026-02-03T10:15:30Z");
        assert_eq!(
            window_key(TimeWindow::Daily, WindowType::Rolling, at),
            "r:daily"
        );
        assert_eq!(
            window_key(TimeWindow::Hourly, WindowType::Rolling, at),
            "r:hourly"
        );
        assert_eq!(window_key(TimeWindow::Total, WindowType::Rolling, at), "t");
        assert_eq!(rolling_span(TimeWindow::Hourly), Some(Duration::hours(1)));
        assert_eq!(rolling_span(TimeWindow::Daily), Some(Duration::hours(24)));
        assert_eq!(rolling_span(TimeWindow::Weekly), Some(Duration::days(7)));
        assert_eq!(rolling_span(TimeWindow::Monthly), Some(Duration::days(30)));
        assert_eq!(rolling_span(TimeWindow::Total), None);
        assert_eq!(
            rolling_bucket_width(TimeWindow::Hourly),
            Some(Duration::minutes(1))
        );
        assert_eq!(
            rolling_bucket_width(TimeWindow::Daily),
            Some(Duration::minutes(15))
        );
        assert_eq!(
            rolling_bucket_width(TimeWindow::Weekly),
            Some(Duration::hours(1))
        );
        assert_eq!(
            rolling_bucket_width(TimeWindow::Monthly),
            Some(Duration::hours(6))
        );
        assert_eq!(rolling_bucket_width(TimeWindow::Total), None);
        assert_eq!(rolling_buckets(TimeWindow::Total, at), None);
    }

    #[test]
    fn bucket_index_table() {
        let minute = Duration::minutes(1);
        let cases = [
            ("1970-01-01T00:00:00Z", 0),
            ("1970-01-01T00:00:59.999Z", 0),
            ("1970-01-01T00:01:00Z", 1),
            ("1969-12-31T23:59:59Z", -1),
            ("1969-12-31T23:59:59.5Z", -1),
            ("1969-12-31T23:59:00Z", -1),
            ("1969-12-31T23:58:59Z", -2),
        ];
        for (at, expected) in cases {
            assert_eq!(bucket_index(t(at), minute), expected, "{at}");
        }
        assert_eq!(bucket_index(t("1970-01-01T00:00:05Z"), Duration::zero()), 5);
        assert_eq!(bucket_start(-2, minute), Some(t("1969-12-31T23:58:00Z")));
    }

    #[test]
    fn rolling_buckets_table() {
        // 10:15:30 is inside minute bucket 10:15; the window (09:15:30, 10:15:30]
        // starts inside bucket 09:15, which is included whole.
        let at = t("2026-02-03T10:15:30Z");
        let range = rolling_buckets(TimeWindow::Hourly, at).unwrap();
        assert_eq!(
            bucket_start(*range.start(), Duration::minutes(1)),
            Some(t("2026-02-03T09:15:00Z"))
        );
        assert_eq!(
            bucket_start(*range.end(), Duration::minutes(1)),
            Some(t("2026-02-03T10:15:00Z"))
        );
        assert_eq!(range.end() - range.start() + 1, 61);
        for window in [
            TimeWindow::Hourly,
            TimeWindow::Daily,
            TimeWindow::Weekly,
            TimeWindow::Monthly,
        ] {
            let range = rolling_buckets(window, at).unwrap();
            let span = rolling_span(window).unwrap().num_seconds();
            let width = rolling_bucket_width(window).unwrap().num_seconds();
            assert_eq!(span % width, 0, "{window}: width divides span");
            assert_eq!(
                range.end() - range.start() + 1,
                span / width + 1,
                "{window}"
            );
        }
    }

    #[test]
    fn window_spec_counts() {
        let at = t("2026-02-03T10:15:30Z");
        let rolling = WindowSpec::new(TimeWindow::Hourly, WindowType::Rolling);
        assert!(rolling.counts(t("2026-02-03T09:15:31Z"), at));
        assert!(!rolling.counts(t("2026-02-03T09:15:30Z"), at));
        assert!(rolling.counts(at, at));
        assert!(!rolling.counts(t("2026-02-03T10:15:31Z"), at));
        let calendar = WindowSpec::new(TimeWindow::Hourly, WindowType::Calendar);
        assert!(calendar.counts(t("2026-02-03T10:00:00Z"), at));
        assert!(!calendar.counts(t("2026-02-03T09:59:59Z"), at));
        assert_eq!(calendar.key(at), "h:2026-02-03T10");
        let total = WindowSpec::new(TimeWindow::Total, WindowType::Rolling);
        assert!(total.counts(t("2000-01-01T00:00:00Z"), at));
    }

    fn instant() -> impl Strategy<Value = DateTime<Utc>> {
        // Roughly 1900 .. 2200, with sub-second parts.
        (-2_208_988_800i64..7_258_118_400, 0u32..1_000_000_000)
            .prop_map(|(secs, nanos)| DateTime::from_timestamp(secs, nanos).unwrap())
    }

    fn rolling_window() -> impl Strategy<Value = TimeWindow> {
        prop_oneof![
            Just(TimeWindow::Hourly),
            Just(TimeWindow::Daily),
            Just(TimeWindow::Weekly),
            Just(TimeWindow::Monthly),
        ]
    }

    proptest! {
        /// Every instant of (at - span, at] lands in a counted bucket, and the
        /// buckets reach back at most one width beyond the window.
        #[test]
        fn rolling_buckets_cover_the_window(
            window in rolling_window(),
            at in instant(),
            back_fraction in 0.0f64..1.0,
        ) {
            let span = rolling_span(window).unwrap();
            let width = rolling_bucket_width(window).unwrap();
            let range = rolling_buckets(window, at).unwrap();

            // Both ends of the window, and a random instant inside it.
            let span_nanos = span.num_nanoseconds().unwrap();
            let just_inside = at - span + Duration::nanoseconds(1);
            let inside = at - Duration::nanoseconds(((span_nanos - 1) as f64 * back_fraction) as i64);
            for spent_at in [just_inside, inside, at] {
                prop_assert!(range.contains(&bucket_index(spent_at, width)), "{} not covered", spent_at);
            }

            // Covered interval [start of oldest, end of newest) contains (at - span, at]
            // and starts less than one width before at - span.
            let covered_start = bucket_start(*range.start(), width).unwrap();
            let covered_end = bucket_start(*range.end() + 1, width).unwrap();
            prop_assert!(covered_start <= at - span);
            prop_assert!(covered_start > at - span - width);
            prop_assert!(covered_end > at);
        }

        #[test]
        fn calendar_bounds_contain_and_align(window in prop_oneof![
            Just(TimeWindow::Hourly), Just(TimeWindow::Daily),
            Just(TimeWindow::Weekly), Just(TimeWindow::Monthly)
        ], at in instant()) {
            let bounds = calendar_bounds(window, at);
            prop_assert!(bounds.contains(at));
            let end = bounds.end.unwrap();
            // The next window starts exactly where this one ends.
            prop_assert_eq!(calendar_bounds(window, end).start, end);
            // Every instant of the window has the same key, the next one differs.
            let key = window_key(window, WindowType::Calendar, at);
            prop_assert_eq!(window_key(window, WindowType::Calendar, bounds.start), key.clone());
            prop_assert_eq!(
                window_key(window, WindowType::Calendar, end - Duration::nanoseconds(1)),
                key.clone()
            );
            prop_assert_ne!(window_key(window, WindowType::Calendar, end), key);
        }
    }
}
