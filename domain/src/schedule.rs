//! Cron schedules for scheduled snapshots (`snapshots.schedule`, default
//! [`DEFAULT_SNAPSHOT_SCHEDULE`], daily at 00:00 UTC).
//!
//! The schedule is the standard 5-field cron form operators already know
//! (minute, hour, day of month, month, day of week, plus the `@daily`-style
//! macros) so that it can be written in the config without learning a new
//! syntax. Times are always UTC, never the host's zone: every replica then
//! computes the same instants, derives the same snapshot id from them and only
//! one of them takes each snapshot.
//!
//! The day rule is Vixie cron's: when both day of month and day of week are
//! restricted, a day matches if *either* does (`0 0 13 * FRI` fires on every
//! 13th and on every Friday); when one of them is `*`, both must. As in Vixie
//! cron, a field counts as `*` when it starts with `*` (so `*/2` is still
//! "unrestricted" for this rule).
//!
//! Evaluation is a pure function of the instant passed in: no clock reads, so
//! the scheduler, the admin API's "next snapshot" and the tests agree.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, Timelike, Utc};
use thiserror::Error;

/// Snapshots are taken daily at 00:00 UTC unless the config says otherwise.
pub const DEFAULT_SNAPSHOT_SCHEDULE: &str = "0 0 * * *";

/// How many months [`CronSchedule::next_after`] looks at before giving up. The
/// Gregorian calendar repeats every 400 years (146,097 days, a whole number of
/// weeks), so a schedule that does not fire within 400 years never fires: the
/// bound makes `0 0 30 2 *` end with `None` instead of looping, and is never
/// reached by a schedule that can fire (even `0 0 29 2 *` across 2100, which
/// is not a leap year, waits only 8 years).
const MONTHS_SEARCHED: u32 = 400 * 12 + 1;

/// The five fields of a cron expression, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CronField {
    /// 0-59.
    Minute,
    /// 0-23.
    Hour,
    /// 1-31.
    DayOfMonth,
    /// 1-12 or `JAN`-`DEC`.
    Month,
    /// 0-7 (0 and 7 are Sunday) or `SUN`-`SAT`.
    DayOfWeek,
}

impl CronField {
    /// The field's name as written in messages and the cron documentation.
    pub const fn as_str(self) -> &'static str {
        match self {
            CronField::Minute => "minute",
            CronField::Hour => "hour",
            CronField::DayOfMonth => "day-of-month",
            CronField::Month => "month",
            CronField::DayOfWeek => "day-of-week",
        }
    }
}

impl fmt::Display for CronField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a cron expression was refused. Each message names the field and the
/// offending token, so a bad `snapshots.schedule` is fixed from the log line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CronError {
    /// Nothing but whitespace.
    #[error("empty cron expression: expected 5 fields (minute hour day-of-month month day-of-week) or a macro such as @daily")]
    Empty,
    /// Not five whitespace-separated fields.
    #[error("expected 5 fields (minute hour day-of-month month day-of-week), found {found}")]
    FieldCount {
        /// How many fields there were.
        found: usize,
    },
    /// An `@` macro that is not one of the standard ones.
    #[error("unknown macro {0:?}: expected @hourly, @daily, @midnight, @weekly, @monthly, @yearly or @annually")]
    UnknownMacro(String),
    /// A value or step that is neither a number nor a name of the field.
    #[error("{field} field: {token:?} is not a number{}", if matches!(field, CronField::Month | CronField::DayOfWeek) { " or a name" } else { "" })]
    InvalidValue {
        /// The field it was in.
        field: CronField,
        /// The token as written.
        token: String,
    },
    /// A number outside the field's range.
    #[error("{field} field: {value} is out of range {min}-{max}")]
    OutOfRange {
        /// The field it was in.
        field: CronField,
        /// The value as parsed.
        value: u32,
        /// The field's smallest value.
        min: u32,
        /// The field's largest value.
        max: u32,
    },
    /// `*/0` and the like: a step has to advance.
    #[error("{field} field: step 0 in {token:?} (a step must be at least 1)")]
    ZeroStep {
        /// The field it was in.
        field: CronField,
        /// The stepped term as written.
        token: String,
    },
    /// `17-9`: cron ranges do not wrap around.
    #[error("{field} field: range {token:?} is reversed (its start is after its end)")]
    ReversedRange {
        /// The field it was in.
        field: CronField,
        /// The range as written.
        token: String,
    },
}

/// One parsed field: bit `v` is set when value `v` matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bits {
    set: u64,
    /// The field started with `*`: unrestricted for the day-of-month /
    /// day-of-week rule.
    star: bool,
}

impl Bits {
    fn has(self, v: u32) -> bool {
        v < 64 && self.set & (1u64 << v) != 0
    }

    /// The smallest matching value `>= from`.
    fn first_from(self, from: u32) -> Option<u32> {
        if from >= 64 {
            return None;
        }
        let rest = self.set & (u64::MAX << from);
        (rest != 0).then(|| rest.trailing_zeros())
    }
}

/// What a field admits and how it is written.
struct Spec {
    field: CronField,
    min: u32,
    max: u32,
    /// Where `*` and an open-ended `N/S` stop. Only differs from `max` for the
    /// day of week, where 7 is an alias of Sunday rather than a day after
    /// Saturday: `*/2` is Sun, Tue, Thu, Sat, not also "day 7".
    last: u32,
    /// Three-letter names, the first one meaning `first_name`.
    names: &'static [&'static str],
    first_name: u32,
}

const MINUTE: Spec = Spec {
    field: CronField::Minute,
    min: 0,
    max: 59,
    last: 59,
    names: &[],
    first_name: 0,
};
const HOUR: Spec = Spec {
    field: CronField::Hour,
    min: 0,
    max: 23,
    last: 23,
    names: &[],
    first_name: 0,
};
const DAY_OF_MONTH: Spec = Spec {
    field: CronField::DayOfMonth,
    min: 1,
    max: 31,
    last: 31,
    names: &[],
    first_name: 1,
};
const MONTH: Spec = Spec {
    field: CronField::Month,
    min: 1,
    max: 12,
    last: 12,
    names: &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ],
    first_name: 1,
};
const DAY_OF_WEEK: Spec = Spec {
    field: CronField::DayOfWeek,
    min: 0,
    max: 7,
    last: 6,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
    first_name: 0,
};

impl Spec {
    fn invalid(&self, token: &str) -> CronError {
        CronError::InvalidValue {
            field: self.field,
            token: token.to_owned(),
        }
    }

    /// One value: a number in range or a name.
    fn value(&self, token: &str) -> Result<u32, CronError> {
        if let Some(i) = self
            .names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(token))
        {
            return Ok(self.first_name + i as u32);
        }
        // `parse` alone would accept a leading `+`.
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.invalid(token));
        }
        let value: u32 = token.parse().map_err(|_| self.invalid(token))?;
        if value < self.min || value > self.max {
            return Err(CronError::OutOfRange {
                field: self.field,
                value,
                min: self.min,
                max: self.max,
            });
        }
        Ok(value)
    }

    /// One comma-separated term: `*`, `N`, `A-B`, each optionally `/S`.
    fn term(&self, term: &str) -> Result<u64, CronError> {
        let (range, step) = match term.split_once('/') {
            Some((range, step)) => {
                if step.is_empty() || !step.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(self.invalid(step));
                }
                let step: u32 = step.parse().map_err(|_| self.invalid(step))?;
                if step == 0 {
                    return Err(CronError::ZeroStep {
                        field: self.field,
                        token: term.to_owned(),
                    });
                }
                (range, Some(step))
            }
            None => (term, None),
        };
        let (from, to) = if range == "*" {
            (self.min, self.last)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (self.value(a)?, self.value(b)?);
            if a > b {
                return Err(CronError::ReversedRange {
                    field: self.field,
                    token: range.to_owned(),
                });
            }
            (a, b)
        } else {
            let v = self.value(range)?;
            // `N/S`: from N to the end of the field, every S.
            (v, if step.is_some() { self.last.max(v) } else { v })
        };
        let step = step.unwrap_or(1) as usize;
        Ok((from..=to)
            .step_by(step)
            .fold(0u64, |bits, v| bits | 1u64 << v))
    }

    fn parse(&self, text: &str) -> Result<Bits, CronError> {
        let mut set = 0u64;
        for term in text.split(',') {
            set |= self.term(term)?;
        }
        if self.field == CronField::DayOfWeek && set & (1 << 7) != 0 {
            set = (set | 1) & !(1 << 7);
        }
        Ok(Bits {
            set,
            star: text.starts_with('*'),
        })
    }
}

/// A parsed cron schedule, evaluated in UTC.
///
/// Keeps the expression as written (trimmed) for [`fmt::Display`], logs and
/// the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronSchedule {
    expression: String,
    minute: Bits,
    hour: Bits,
    day_of_month: Bits,
    month: Bits,
    day_of_week: Bits,
}

impl CronSchedule {
    /// Parses a 5-field expression (`minute hour day-of-month month
    /// day-of-week`) or one of the macros `@hourly`, `@daily`/`@midnight`,
    /// `@weekly`, `@monthly`, `@yearly`/`@annually`.
    pub fn parse(expr: &str) -> Result<Self, CronError> {
        let expression = expr.trim();
        if expression.is_empty() {
            return Err(CronError::Empty);
        }
        let fields = if expression.starts_with('@') {
            match expression.to_ascii_lowercase().as_str() {
                "@hourly" => "0 * * * *",
                "@daily" | "@midnight" => "0 0 * * *",
                "@weekly" => "0 0 * * 0",
                "@monthly" => "0 0 1 * *",
                "@yearly" | "@annually" => "0 0 1 1 *",
                _ => return Err(CronError::UnknownMacro(expression.to_owned())),
            }
        } else {
            expression
        };
        let fields: Vec<&str> = fields.split_whitespace().collect();
        let [minute, hour, day_of_month, month, day_of_week] = fields.as_slice() else {
            return Err(CronError::FieldCount {
                found: fields.len(),
            });
        };
        Ok(Self {
            expression: expression.to_owned(),
            minute: MINUTE.parse(minute)?,
            hour: HOUR.parse(hour)?,
            day_of_month: DAY_OF_MONTH.parse(day_of_month)?,
            month: MONTH.parse(month)?,
            day_of_week: DAY_OF_WEEK.parse(day_of_week)?,
        })
    }

    /// The expression as written (trimmed), macros unexpanded.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The first matching minute strictly after `t` (seconds and
    /// sub-seconds zero), or `None` when the schedule never fires (`0 0 30 2
    /// *`) or the next time is beyond chrono's range.
    ///
    /// Skips whole months whose month does not match, whole days whose day
    /// does not match and whole hours whose hour does not match, so the cost
    /// is a few operations per month searched.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let start = t
            .with_second(0)?
            .with_nanosecond(0)?
            .checked_add_signed(Duration::minutes(1))?;
        let (mut year, mut month) = (start.year(), start.month());
        // The start's day and minute of day: only on that day does the time
        // have to be at or after the start's; every later day starts at 00:00.
        let mut from = Some((start.day(), start.hour() * 60 + start.minute()));
        for _ in 0..MONTHS_SEARCHED {
            if self.month.has(month) {
                let (first_day, _) = from.unwrap_or((1, 0));
                let mut days = self.days_of(year, month)? & (u64::MAX << first_day);
                while days != 0 {
                    let day = days.trailing_zeros();
                    let from_minute = match from {
                        Some((start_day, start_minute)) if start_day == day => start_minute,
                        _ => 0,
                    };
                    if let Some((hour, minute)) = self.time_from(from_minute) {
                        let date = NaiveDate::from_ymd_opt(year, month, day)?;
                        let time = NaiveTime::from_hms_opt(hour, minute, 0)?;
                        return Some(date.and_time(time).and_utc());
                    }
                    days &= days - 1;
                }
            }
            from = None;
            (year, month) = if month == 12 {
                (year.checked_add(1)?, 1)
            } else {
                (year, month + 1)
            };
        }
        None
    }

    /// The days of `year`-`month` that match, as bits 1-31.
    fn days_of(&self, year: i32, month: u32) -> Option<u64> {
        let first = NaiveDate::from_ymd_opt(year, month, 1)?;
        let length = days_in_month(year, month);
        let in_month = (u64::MAX >> (63 - length)) & !1;
        let first_weekday = first.weekday().num_days_from_sunday();
        let by_weekday = (1..=length)
            .filter(|day| self.day_of_week.has((first_weekday + day - 1) % 7))
            .fold(0u64, |bits, day| bits | 1u64 << day);
        let by_day = self.day_of_month.set;
        let days = if self.day_of_month.star || self.day_of_week.star {
            by_day & by_weekday
        } else {
            by_day | by_weekday
        };
        Some(days & in_month)
    }

    /// The first matching (hour, minute) at or after minute-of-day `from`.
    fn time_from(&self, from: u32) -> Option<(u32, u32)> {
        let (hour, minute) = (from / 60, from % 60);
        if self.hour.has(hour) {
            if let Some(minute) = self.minute.first_from(minute) {
                return Some((hour, minute));
            }
        }
        let hour = self.hour.first_from(hour + 1).filter(|h| *h < 24)?;
        Some((hour, self.minute.first_from(0)?))
    }
}

/// Days in a month of the proleptic Gregorian calendar.
fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => 31,
    }
}

impl FromStr for CronSchedule {
    type Err = CronError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expression)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// The next time of `expr` after `from`, as RFC 3339 (`Z`).
    fn next(expr: &str, from: &str) -> Option<String> {
        CronSchedule::parse(expr)
            .unwrap()
            .next_after(at(from))
            .map(|t| t.format("%Y-%m-%dT%H:%MZ").to_string())
    }

    fn err(expr: &str) -> CronError {
        CronSchedule::parse(expr).unwrap_err()
    }

    /// Whether `t` matches, checked field by field without the search's
    /// skipping: the reference the search is compared with.
    fn matches(s: &CronSchedule, t: DateTime<Utc>) -> bool {
        let dom = s.day_of_month.has(t.day());
        let dow = s.day_of_week.has(t.weekday().num_days_from_sunday());
        let day = if s.day_of_month.star || s.day_of_week.star {
            dom && dow
        } else {
            dom || dow
        };
        s.minute.has(t.minute()) && s.hour.has(t.hour()) && s.month.has(t.month()) && day
    }

    #[test]
    fn the_default_is_daily_at_midnight_utc() {
        assert_eq!(
            next(DEFAULT_SNAPSHOT_SCHEDULE, "2026-02-03T10:15:00Z").as_deref(),
            Some("2026-02-04T00:00Z")
        );
        // Strictly after: from exactly midnight, the next day's.
        assert_eq!(
            next(DEFAULT_SNAPSHOT_SCHEDULE, "2026-02-04T00:00:00Z").as_deref(),
            Some("2026-02-05T00:00Z")
        );
        // Seconds and sub-seconds are dropped, never carried into the result.
        let t = CronSchedule::parse(DEFAULT_SNAPSHOT_SCHEDULE)
            .unwrap()
            .next_after(at("2026-02-03T23:59:59.999Z"))
            .unwrap();
        assert_eq!(t, at("2026-02-04T00:00:00Z"));
        // Month and year ends roll over.
        assert_eq!(
            next(DEFAULT_SNAPSHOT_SCHEDULE, "2026-12-31T23:59:00Z").as_deref(),
            Some("2027-01-01T00:00Z")
        );
    }

    #[test]
    fn macros_expand_to_their_fields() {
        for (mac, fields) in [
            ("@daily", "0 0 * * *"),
            ("@midnight", "0 0 * * *"),
            ("@hourly", "0 * * * *"),
            ("@weekly", "0 0 * * 0"),
            ("@monthly", "0 0 1 * *"),
            ("@yearly", "0 0 1 1 *"),
            ("@annually", "0 0 1 1 *"),
            ("@DAILY", "0 0 * * *"),
        ] {
            let from = "2026-02-03T10:15:00Z";
            assert_eq!(next(mac, from), next(fields, from), "{mac}");
        }
        assert_eq!(
            next("@hourly", "2026-02-03T10:15:00Z").as_deref(),
            Some("2026-02-03T11:00Z")
        );
        assert_eq!(
            next("@weekly", "2026-02-03T10:15:00Z").as_deref(),
            Some("2026-02-08T00:00Z")
        );
        assert_eq!(
            err("@fortnightly"),
            CronError::UnknownMacro("@fortnightly".to_owned())
        );
    }

    #[test]
    fn steps() {
        assert_eq!(
            next("*/15 * * * *", "2026-02-03T10:15:00Z").as_deref(),
            Some("2026-02-03T10:30Z")
        );
        assert_eq!(
            next("*/15 * * * *", "2026-02-03T10:46:00Z").as_deref(),
            Some("2026-02-03T11:00Z")
        );
        // `N/S`: from N to the end of the field.
        assert_eq!(
            next("50/5 * * * *", "2026-02-03T10:56:00Z").as_deref(),
            Some("2026-02-03T11:50Z")
        );
        assert_eq!(
            next("10/1 * * * *", "2026-02-03T10:58:00Z").as_deref(),
            Some("2026-02-03T10:59Z")
        );
        // A step larger than the field leaves only its start.
        assert_eq!(
            next("5/100 * * * *", "2026-02-03T10:06:00Z").as_deref(),
            Some("2026-02-03T11:05Z")
        );
        let s = CronSchedule::parse("0 0 * * */2").unwrap();
        assert_eq!(s.day_of_week.set, 0b101_0101, "Sun, Tue, Thu, Sat");
    }

    #[test]
    fn working_hours_every_other_hour() {
        let expr = "0 9-17/2 * * MON-FRI";
        // Tuesday 2026-02-03.
        assert_eq!(
            next(expr, "2026-02-03T08:00:00Z").as_deref(),
            Some("2026-02-03T09:00Z")
        );
        assert_eq!(
            next(expr, "2026-02-03T09:00:00Z").as_deref(),
            Some("2026-02-03T11:00Z")
        );
        assert_eq!(
            next(expr, "2026-02-03T10:00:00Z").as_deref(),
            Some("2026-02-03T11:00Z")
        );
        // 17:00 is the last; after it, the next morning.
        assert_eq!(
            next(expr, "2026-02-03T16:59:00Z").as_deref(),
            Some("2026-02-03T17:00Z")
        );
        assert_eq!(
            next(expr, "2026-02-03T17:00:00Z").as_deref(),
            Some("2026-02-04T09:00Z")
        );
        // Friday evening: Monday morning.
        assert_eq!(
            next(expr, "2026-02-06T17:30:00Z").as_deref(),
            Some("2026-02-09T09:00Z")
        );
    }

    #[test]
    fn day_of_month_or_day_of_week_when_both_are_restricted() {
        let expr = "0 0 13 * FRI";
        // From Saturday 2026-02-07: Friday the 13th (both).
        assert_eq!(
            next(expr, "2026-02-07T00:00:00Z").as_deref(),
            Some("2026-02-13T00:00Z")
        );
        // Then the next Friday (only the day of week).
        assert_eq!(
            next(expr, "2026-02-13T00:00:00Z").as_deref(),
            Some("2026-02-20T00:00Z")
        );
        // From Saturday 2026-04-11: Monday the 13th (only the day of month).
        assert_eq!(
            next(expr, "2026-04-11T00:00:00Z").as_deref(),
            Some("2026-04-13T00:00Z")
        );
        // Only the day of week restricted: both must hold, so every Friday
        // and not the 13th.
        assert_eq!(
            next("0 0 * * FRI", "2026-04-11T00:00:00Z").as_deref(),
            Some("2026-04-17T00:00Z")
        );
        // Only the day of month restricted: the 13th whatever its weekday.
        assert_eq!(
            next("0 0 13 * *", "2026-02-13T00:00:00Z").as_deref(),
            Some("2026-03-13T00:00Z")
        );
        // A field starting with `*` counts as `*` (Vixie): odd days that are
        // Mondays, not odd days or Mondays. From Tuesday 2026-02-10, the 11th
        // is odd and Monday the 16th even: Monday the 23rd.
        assert_eq!(
            next("0 0 */2 * MON", "2026-02-10T00:00:00Z").as_deref(),
            Some("2026-02-23T00:00Z")
        );
    }

    #[test]
    fn leap_days_and_impossible_dates() {
        assert_eq!(
            next("0 0 29 2 *", "2026-01-01T00:00:00Z").as_deref(),
            Some("2028-02-29T00:00Z")
        );
        // 2100 is not a leap year: eight years to wait, still found.
        assert_eq!(
            next("0 0 29 2 *", "2096-03-01T00:00:00Z").as_deref(),
            Some("2104-02-29T00:00Z")
        );
        assert_eq!(next("0 0 30 2 *", "2026-01-01T00:00:00Z"), None);
        assert_eq!(next("0 0 31 4,6,9,11 *", "2026-01-01T00:00:00Z"), None);
        // The 31st only in months that have one.
        assert_eq!(
            next("0 0 31 * *", "2026-04-01T00:00:00Z").as_deref(),
            Some("2026-05-31T00:00Z")
        );
        // Near the end of chrono's range: `None`, not a panic.
        let s = CronSchedule::parse("0 0 30 2 *").unwrap();
        assert_eq!(s.next_after(DateTime::<Utc>::MAX_UTC), None);
    }

    #[test]
    fn month_and_day_names() {
        assert_eq!(
            next("30 1,13 * jan,Jul *", "2026-02-01T00:00:00Z").as_deref(),
            Some("2026-07-01T01:30Z")
        );
        assert_eq!(
            next("0 0 1 MAR-MAY *", "2026-05-01T00:00:00Z").as_deref(),
            Some("2027-03-01T00:00Z")
        );
        assert_eq!(
            CronSchedule::parse("0 0 * JAN-DEC SUN-SAT")
                .unwrap()
                .month
                .set,
            0b1_1111_1111_1110
        );
        assert_eq!(
            CronSchedule::parse("0 0 * * sat").unwrap().day_of_week.set,
            1 << 6
        );
    }

    #[test]
    fn seven_is_sunday_too() {
        // Sunday 2026-02-08.
        assert_eq!(
            next("0 0 * * 7", "2026-02-03T00:00:00Z").as_deref(),
            Some("2026-02-08T00:00Z")
        );
        assert_eq!(
            next("0 0 * * 0", "2026-02-03T00:00:00Z").as_deref(),
            Some("2026-02-08T00:00Z")
        );
        assert_eq!(
            next("0 0 * * 5-7", "2026-02-07T00:00:00Z").as_deref(),
            Some("2026-02-08T00:00Z")
        );
        assert_eq!(
            CronSchedule::parse("0 0 * * 7").unwrap().day_of_week,
            CronSchedule::parse("0 0 * * SUN").unwrap().day_of_week
        );
    }

    #[test]
    fn bad_expressions_name_the_field_and_the_token() {
        assert_eq!(err(""), CronError::Empty);
        assert_eq!(err("  \t "), CronError::Empty);
        assert_eq!(
            err("0 0 * * * *").to_string(),
            "expected 5 fields (minute hour day-of-month month day-of-week), found 6"
        );
        assert_eq!(err("0 0 * *"), CronError::FieldCount { found: 4 });
        assert_eq!(
            err("61 * * * *").to_string(),
            "minute field: 61 is out of range 0-59"
        );
        assert_eq!(
            err("0 24 * * *").to_string(),
            "hour field: 24 is out of range 0-23"
        );
        assert_eq!(
            err("0 0 0 * *").to_string(),
            "day-of-month field: 0 is out of range 1-31"
        );
        assert_eq!(
            err("0 0 32 * *").to_string(),
            "day-of-month field: 32 is out of range 1-31"
        );
        assert_eq!(
            err("0 0 * 13 *").to_string(),
            "month field: 13 is out of range 1-12"
        );
        assert_eq!(
            err("0 0 * * 8").to_string(),
            "day-of-week field: 8 is out of range 0-7"
        );
        assert_eq!(
            err("*/0 * * * *").to_string(),
            "minute field: step 0 in \"*/0\" (a step must be at least 1)"
        );
        assert_eq!(
            err("0 17-9 * * *").to_string(),
            "hour field: range \"17-9\" is reversed (its start is after its end)"
        );
        assert_eq!(
            err("0 0 * * FRI-MON"),
            CronError::ReversedRange {
                field: CronField::DayOfWeek,
                token: "FRI-MON".to_owned()
            }
        );
        assert_eq!(
            err("x * * * *").to_string(),
            "minute field: \"x\" is not a number"
        );
        assert_eq!(
            err("0 0 * JUNE *").to_string(),
            "month field: \"JUNE\" is not a number or a name"
        );
        // Names only where the field has them.
        assert_eq!(
            err("0 MON * * *"),
            CronError::InvalidValue {
                field: CronField::Hour,
                token: "MON".to_owned()
            }
        );
        for bad in [
            "1,,2 * * * *",
            "+5 * * * *",
            "-1 * * * *",
            "*/ * * * *",
            "*/x * * * *",
            "1-2-3 * * * *",
            "99999999999 * * * *",
        ] {
            assert!(
                matches!(
                    err(bad),
                    CronError::InvalidValue {
                        field: CronField::Minute,
                        ..
                    }
                ),
                "{bad}: {:?}",
                err(bad)
            );
        }
    }

    #[test]
    fn display_and_from_str_round_trip() {
        for expr in [
            "0 0 * * *",
            "*/15 9-17 * * MON-FRI",
            "0 0 13 * FRI",
            "@hourly",
            "5,10 0/6 1-15/3 jan,jul 7",
        ] {
            let s: CronSchedule = expr.parse().unwrap();
            assert_eq!(s.to_string(), expr);
            assert_eq!(s.expression(), expr);
            assert_eq!(s.to_string().parse::<CronSchedule>().unwrap(), s);
        }
        // Surrounding whitespace (from YAML) is not part of the expression.
        assert_eq!(
            CronSchedule::parse("  0 0 * * *\n").unwrap().to_string(),
            "0 0 * * *"
        );
    }

    proptest! {
        /// The skipping search finds exactly what a minute-by-minute scan
        /// finds.
        #[test]
        fn next_after_is_the_first_matching_minute(
            expr in prop::sample::select(vec![
                "0 0 * * *",
                "*/15 * * * *",
                "0 9-17/2 * * MON-FRI",
                "0 0 13 * FRI",
                "30 4 1,15 * 3",
                "7 */5 * * SUN",
                "0 12 * * */2",
                "59 23 28-31 * *",
                "0,30 0/7 */3 * *",
            ]),
            start in 1_700_000_000i64..1_900_000_000,
            nanos in 0u32..1_000_000_000,
        ) {
            let s = CronSchedule::parse(expr).unwrap();
            let t = DateTime::from_timestamp(start, nanos).unwrap();
            let found = s.next_after(t).unwrap();
            prop_assert!(found > t);
            prop_assert_eq!(found.second(), 0);
            prop_assert_eq!(found.nanosecond(), 0);
            prop_assert!(matches(&s, found));
            let mut m = t.with_second(0).unwrap().with_nanosecond(0).unwrap() + Duration::minutes(1);
            while m < found {
                prop_assert!(!matches(&s, m), "{} matches before {}", m, found);
                m += Duration::minutes(1);
            }
        }
    }
}
