//! Rendering: aligned tables and key/value blocks for people, JSON documents for programs,
//! plus the shared renderings of timestamps and money.

use std::io::Write;

use anyhow::Result;
use caracal_proto::v1 as pb;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

pub use crate::args::OutputFormat;

/// Columns are separated by this many spaces.
const GAP: usize = 2;

/// A table with a header row. Each row may carry note lines, printed indented under it
/// (used for policy-history diffs); notes do not affect column widths.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<(Vec<String>, Vec<String>)>,
}

impl Table {
    pub fn new<I, S>(headers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push((cells, Vec::new()));
    }

    pub fn row_with_notes(&mut self, cells: Vec<String>, notes: Vec<String>) {
        self.rows.push((cells, notes));
    }

    /// The table as CSV: the header row, then one line per row (notes left out).
    pub fn render_csv(&self) -> String {
        let mut text = csv_line(&self.headers);
        text.push('\n');
        for (cells, _) in &self.rows {
            text.push_str(&csv_line(cells));
            text.push('\n');
        }
        text
    }

    /// Renders the table: every column padded to its widest cell, no trailing spaces.
    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(|(cells, _)| cells.len())
            .chain(std::iter::once(self.headers.len()))
            .max()
            .unwrap_or(0);
        let header: Vec<String> = self.headers.iter().map(|h| clean(h)).collect();
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|(cells, _)| cells.iter().map(|c| clean(c)).collect())
            .collect();
        let mut widths = vec![0usize; columns];
        for line in std::iter::once(&header).chain(rows.iter()) {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut text = String::new();
        push_line(&mut text, &header, &widths);
        for (line, (_, notes)) in rows.iter().zip(&self.rows) {
            push_line(&mut text, line, &widths);
            for note in notes {
                text.push_str("    ");
                text.push_str(&clean(note));
                text.push('\n');
            }
        }
        text
    }
}

fn push_line(text: &mut String, cells: &[String], widths: &[usize]) {
    let mut line = String::new();
    for (i, width) in widths.iter().enumerate() {
        let cell = cells.get(i).map(String::as_str).unwrap_or("");
        line.push_str(cell);
        let pad = width.saturating_sub(cell.chars().count()) + GAP;
        line.extend(std::iter::repeat_n(' ', pad));
    }
    text.push_str(line.trim_end());
    text.push('\n');
}

/// A two-column key/value block for a single object.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for (key, value) in pairs {
        let line = format!("{key:<width$}{:GAP$}{}", "", clean(value));
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// One CSV record (RFC 4180): a field holding a comma, quote or line break is
/// quoted, its quotes doubled.
pub fn csv_line<S: AsRef<str>>(cells: &[S]) -> String {
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        let cell = cell.as_ref();
        if i > 0 {
            line.push(',');
        }
        if cell.contains([',', '"', '\n', '\r']) {
            line.push('"');
            line.push_str(&cell.replace('"', "\"\""));
            line.push('"');
        } else {
            line.push_str(cell);
        }
    }
    line
}

/// Control characters would break alignment (or drive the terminal): show them escaped.
fn clean(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Writes one pretty JSON document and a newline.
pub fn write_json(out: &mut dyn Write, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    writeln!(out, "{text}")?;
    Ok(())
}

/// Writes already rendered text.
pub fn write_text(out: &mut dyn Write, text: &str) -> Result<()> {
    out.write_all(text.as_bytes())?;
    Ok(())
}

/// Writes a single object: JSON document or key/value block.
pub fn write_object(
    out: &mut dyn Write,
    format: OutputFormat,
    json: Value,
    pairs: &[(&str, String)],
) -> Result<()> {
    match format {
        OutputFormat::Json => write_json(out, &json),
        OutputFormat::Table => write_text(out, &key_values(pairs)),
        OutputFormat::Csv => {
            let mut text = csv_line(&["field", "value"]);
            text.push('\n');
            for (key, value) in pairs {
                text.push_str(&csv_line(&[*key, value.as_str()]));
                text.push('\n');
            }
            write_text(out, &text)
        }
    }
}

/// Writes a list: JSON array or table.
pub fn write_list(
    out: &mut dyn Write,
    format: OutputFormat,
    json: Vec<Value>,
    table: &Table,
) -> Result<()> {
    match format {
        OutputFormat::Json => write_json(out, &Value::Array(json)),
        OutputFormat::Table => write_text(out, &table.render()),
        OutputFormat::Csv => write_text(out, &table.render_csv()),
    }
}

// ------------------------------------------------------------- value shapes

fn to_datetime(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(ts.nanos).ok()?;
    DateTime::from_timestamp(ts.seconds, nanos)
}

/// RFC 3339 UTC with the precision the server sent (`2025-01-31T12:00:00.123Z`), or null.
pub fn ts_json(ts: Option<&prost_types::Timestamp>) -> Value {
    match ts {
        None => Value::Null,
        Some(t) => match to_datetime(t) {
            Some(d) => Value::String(d.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            None => Value::String(format!("{}s{}n", t.seconds, t.nanos)),
        },
    }
}

/// RFC 3339 UTC to the second for tables; empty when absent.
pub fn ts_text(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        None => String::new(),
        Some(t) => match to_datetime(t) {
            Some(d) => d.to_rfc3339_opts(SecondsFormat::Secs, true),
            None => format!("{}s{}n", t.seconds, t.nanos),
        },
    }
}

/// `{"amount": "1000.00", "currency": "USD", "micros": 1000000000}`, or null.
pub fn money_json(money: Option<&pb::Money>) -> Value {
    match money {
        None => Value::Null,
        Some(m) => json!({ "amount": m.amount, "currency": m.currency, "micros": m.micros }),
    }
}

/// Micro-units as decimal text with at least two decimals (`2500000` -> `2.50`).
pub fn micros_text(micros: i64) -> String {
    let magnitude = micros.unsigned_abs();
    let units = magnitude / 1_000_000;
    let mut fraction = format!("{:06}", magnitude % 1_000_000);
    while fraction.len() > 2 && fraction.ends_with('0') {
        fraction.pop();
    }
    let sign = if micros < 0 { "-" } else { "" };
    format!("{sign}{units}.{fraction}")
}

pub fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_owned()
}

/// Empty text shown as `-` in tables, so a blank cell is never ambiguous.
pub fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_are_aligned() {
        let mut t = Table::new(["ID", "NAME", "STATUS"]);
        t.row(vec![
            "1".into(),
            "a-much-longer-name".into(),
            "active".into(),
        ]);
        t.row(vec!["22222".into(), "b".into(), "inactive".into()]);
        let text = t.render();
        assert_eq!(
            text,
            "ID     NAME                STATUS\n\
             1      a-much-longer-name  active\n\
             22222  b                   inactive\n"
        );
        // Every column starts at the same offset on every line.
        let starts: Vec<usize> = text
            .lines()
            .map(|l| l.find("active").unwrap_or(0))
            .collect();
        assert_eq!(starts[1] + 2, starts[2]);
    }

    #[test]
    fn table_has_no_trailing_spaces_and_handles_empty_cells() {
        let mut t = Table::new(["A", "B", "C"]);
        t.row(vec!["x".into(), "".into(), "".into()]);
        t.row(vec!["yy".into()]);
        let text = t.render();
        assert_eq!(text, "A   B  C\nx\nyy\n");
        assert!(text.lines().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn table_header_only_when_empty() {
        assert_eq!(Table::new(["ID", "NAME"]).render(), "ID  NAME\n");
    }

    #[test]
    fn table_counts_characters_not_bytes() {
        let mut t = Table::new(["N", "X"]);
        t.row(vec!["héé".into(), "1".into()]);
        t.row(vec!["abc".into(), "2".into()]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "héé  1");
        assert_eq!(lines[2], "abc  2");
    }

    #[test]
    fn table_notes_go_under_their_row() {
        let mut t = Table::new(["V", "KIND"]);
        t.row_with_notes(vec!["1".into(), "create".into()], vec![]);
        t.row_with_notes(
            vec!["2".into(), "update".into()],
            vec!["limit: 100.00 USD -> 200.00 USD".into()],
        );
        assert_eq!(
            t.render(),
            "V  KIND\n1  create\n2  update\n    limit: 100.00 USD -> 200.00 USD\n"
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        let mut t = Table::new(["A", "B"]);
        t.row(vec!["x\ny".into(), "z".into()]);
        assert_eq!(t.render(), "A     B\nx\\ny  z\n");
    }

    #[test]
    fn key_values_are_aligned() {
        let text = key_values(&[
            ("id", "7".into()),
            ("status", "active".into()),
            ("parent", "".into()),
        ]);
        assert_eq!(text, "id      7\nstatus  active\nparent\n");
    }

    #[test]
    fn timestamps_render_as_rfc3339_utc() {
        let ts = prost_types::Timestamp {
            seconds: 1_738_324_800,
            nanos: 0,
        };
        assert_eq!(ts_json(Some(&ts)), json!("2025-01-31T12:00:00Z"));
        assert_eq!(ts_text(Some(&ts)), "2025-01-31T12:00:00Z");
        let ts = prost_types::Timestamp {
            seconds: 1_738_324_800,
            nanos: 5_000_000,
        };
        assert_eq!(ts_json(Some(&ts)), json!("2025-01-31T12:00:00.005Z"));
        assert_eq!(ts_json(None), Value::Null);
        assert_eq!(ts_text(None), "");
    }

    #[test]
    fn money_and_micros() {
        let m = pb::Money {
            currency: "USD".into(),
            micros: 1_000_000_000,
            amount: "1000.00".into(),
        };
        assert_eq!(
            money_json(Some(&m)),
            json!({"amount": "1000.00", "currency": "USD", "micros": 1_000_000_000})
        );
        assert_eq!(micros_text(2_500_000), "2.50");
        assert_eq!(micros_text(1_250_000), "1.25");
        assert_eq!(micros_text(1), "0.000001");
        assert_eq!(micros_text(0), "0.00");
        assert_eq!(micros_text(-3_250_000), "-3.25");
        assert_eq!(micros_text(i64::MIN), "-9223372036854.775808");
    }
}
