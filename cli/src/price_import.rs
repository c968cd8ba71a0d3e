//! Reading a price file for `caracal pricebook import`: a JSON array of objects or a simple
//! CSV (no quoting), chosen by extension. Amounts stay decimal text; the server validates
//! them, and rejects the whole import if any row is invalid.

use std::path::Path;

use anyhow::{bail, Context, Result};
use caracal_proto::v1::SetPriceRequest;
use serde_json::Value;

/// Every column, in the documented order.
const COLUMNS: [&str; 7] = [
    "provider",
    "model",
    "currency",
    "input",
    "output",
    "cached_input",
    "per_request",
];

/// Columns a row must fill; `cached_input` and `per_request` default to 0 on the server.
const REQUIRED: [&str; 5] = ["provider", "model", "currency", "input", "output"];

/// Reads and parses `path` by its extension (`.json` or `.csv`).
pub fn read_file(path: &Path) -> Result<Vec<SetPriceRequest>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let parse: fn(&str) -> Result<Vec<SetPriceRequest>> = match ext.as_deref() {
        Some("json") => parse_json,
        Some("csv") => parse_csv,
        _ => bail!(
            "cannot tell the format of {}: the file name must end in .json or .csv",
            path.display()
        ),
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let prices = parse(&text).with_context(|| format!("{}", path.display()))?;
    if prices.is_empty() {
        bail!("{}: no prices in the file", path.display());
    }
    Ok(prices)
}

/// One row's fields by column name, before they become a request.
#[derive(Default)]
struct Row {
    values: [Option<String>; 7],
}

impl Row {
    /// Stores a field; false when `column` is not one of [`COLUMNS`].
    fn set(&mut self, column: &str, value: String) -> bool {
        match COLUMNS.iter().position(|c| *c == column) {
            Some(index) => {
                self.values[index] = Some(value);
                true
            }
            None => false,
        }
    }

    fn into_request(self) -> Result<SetPriceRequest> {
        for (column, value) in COLUMNS.iter().zip(&self.values) {
            if REQUIRED.contains(column) && value.as_deref().is_none_or(|v| v.trim().is_empty()) {
                bail!("missing {column}");
            }
        }
        let [provider, model, currency, input, output, cached_input, per_request] = self
            .values
            .map(|v| v.map(|t| t.trim().to_owned()).unwrap_or_default());
        Ok(SetPriceRequest {
            provider,
            model,
            currency,
            input_per_mtok: input,
            output_per_mtok: output,
            cached_input_per_mtok: cached_input,
            per_request,
        })
    }
}

/// A JSON array of objects with the keys of [`COLUMNS`]; amounts as strings or numbers.
pub fn parse_json(text: &str) -> Result<Vec<SetPriceRequest>> {
    let doc: Value = serde_json::from_str(text).context("not valid JSON")?;
    let Value::Array(items) = doc else {
        bail!("expected a JSON array of price objects");
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| json_row(item).with_context(|| format!("row {}", i + 1)))
        .collect()
}

fn json_row(item: Value) -> Result<SetPriceRequest> {
    let Value::Object(fields) = item else {
        bail!("expected an object, found {}", kind(&item));
    };
    let mut row = Row::default();
    for (key, value) in fields {
        let text = match value {
            Value::Null => continue,
            Value::String(s) => s,
            Value::Number(n) => number_text(&n),
            other => bail!(
                "{key}: expected a string or a number, found {}",
                kind(&other)
            ),
        };
        if !row.set(&key, text) {
            bail!("unknown key {key:?} (expected {})", COLUMNS.join(", "));
        }
    }
    row.into_request()
}

/// A JSON number as decimal text: serde_json's own rendering (integers exactly, fractions
/// as the shortest text that reads back as the same number, so `2.5` stays `2.5`), with any
/// exponent form (`1e-7`) spelled out by moving the decimal point, never via float math.
fn number_text(n: &serde_json::Number) -> String {
    let text = n.to_string();
    match text.find(['e', 'E']) {
        None => text,
        Some(at) => expand_exponent(&text[..at], &text[at + 1..]).unwrap_or(text),
    }
}

fn expand_exponent(mantissa: &str, exponent: &str) -> Option<String> {
    let exponent: i64 = exponent.parse().ok()?;
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int}{frac}");
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || exponent.abs() > 400 {
        return None;
    }
    // Position of the decimal point within `digits` after the shift.
    let point = i64::try_from(int.len()).ok()? + exponent;
    let len = i64::try_from(digits.len()).ok()?;
    let (whole, fraction) = if point <= 0 {
        let zeros = usize::try_from(-point).ok()?;
        ("0".to_owned(), format!("{}{digits}", "0".repeat(zeros)))
    } else if point >= len {
        let zeros = usize::try_from(point - len).ok()?;
        (format!("{digits}{}", "0".repeat(zeros)), String::new())
    } else {
        let at = usize::try_from(point).ok()?;
        (digits[..at].to_owned(), digits[at..].to_owned())
    };
    let whole = whole.trim_start_matches('0');
    let whole = if whole.is_empty() { "0" } else { whole };
    let fraction = fraction.trim_end_matches('0');
    Some(if fraction.is_empty() {
        format!("{sign}{whole}")
    } else {
        format!("{sign}{whole}.{fraction}")
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// CSV with a header row naming the columns (`provider,model,currency,input,output,
/// cached_input,per_request`; the last two may be left out). No quoting: a field cannot
/// contain a comma. Blank lines and lines starting with `#` are skipped.
pub fn parse_csv(text: &str) -> Result<Vec<SetPriceRequest>> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim_start_matches('\u{feff}').trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'));
    let Some((header_line, header)) = lines.next() else {
        bail!("empty CSV: expected a header row {}", COLUMNS.join(","));
    };
    let header = split_csv(header).with_context(|| format!("header (line {header_line})"))?;
    for (i, column) in header.iter().enumerate() {
        if !COLUMNS.contains(&column.as_str()) {
            bail!(
                "header (line {header_line}): unknown column {column:?}; expected {}",
                COLUMNS.join(",")
            );
        }
        if header[..i].contains(column) {
            bail!("header (line {header_line}): column {column:?} appears twice");
        }
    }
    if let Some(missing) = REQUIRED.iter().find(|c| !header.iter().any(|h| h == *c)) {
        bail!("header (line {header_line}): missing column {missing:?}");
    }
    lines
        .enumerate()
        .map(|(i, (line_no, line))| {
            csv_row(&header, line).with_context(|| format!("row {} (line {line_no})", i + 1))
        })
        .collect()
}

fn csv_row(header: &[String], line: &str) -> Result<SetPriceRequest> {
    let fields = split_csv(line)?;
    if fields.len() != header.len() {
        bail!("expected {} fields, found {}", header.len(), fields.len());
    }
    let mut row = Row::default();
    for (column, value) in header.iter().zip(fields) {
        // The header was checked against COLUMNS already.
        row.set(column, value);
    }
    row.into_request()
}

fn split_csv(line: &str) -> Result<Vec<String>> {
    if line.contains('"') {
        bail!("quoted fields are not supported");
    }
    Ok(line.split(',').map(|f| f.trim().to_owned()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(
        provider: &str,
        model: &str,
        currency: &str,
        input: &str,
        output: &str,
        cached: &str,
        per_request: &str,
    ) -> SetPriceRequest {
        SetPriceRequest {
            provider: provider.into(),
            model: model.into(),
            currency: currency.into(),
            input_per_mtok: input.into(),
            output_per_mtok: output.into(),
            cached_input_per_mtok: cached.into(),
            per_request: per_request.into(),
        }
    }

    #[test]
    fn json_strings_and_numbers() {
        let prices = parse_json(
            r#"[
                {"provider":"openai","model":"gpt-4o","currency":"USD",
                 "input":"2.50","output":"10.00","cached_input":"1.25","per_request":"0"},
                {"provider":"anthropic","model":"claude","currency":"USD",
                 "input":2.5,"output":15,"cached_input":0.3}
            ]"#,
        )
        .unwrap();
        assert_eq!(
            prices,
            vec![
                req("openai", "gpt-4o", "USD", "2.50", "10.00", "1.25", "0"),
                req("anthropic", "claude", "USD", "2.5", "15", "0.3", ""),
            ]
        );
    }

    #[test]
    fn json_numbers_keep_their_decimal_text() {
        let n = |s: &str| number_text(&serde_json::from_str(s).unwrap());
        assert_eq!(n("2.5"), "2.5");
        assert_eq!(n("0.1"), "0.1");
        assert_eq!(n("0.000001"), "0.000001");
        assert_eq!(n("1.234567"), "1.234567");
        assert_eq!(n("10"), "10");
        assert_eq!(n("1e-7"), "0.0000001");
        assert_eq!(n("2.5e3"), "2500.0");
        assert_eq!(n("1.5E-2"), "0.015");
    }

    #[test]
    fn exponent_expansion() {
        assert_eq!(expand_exponent("1", "-7").as_deref(), Some("0.0000001"));
        assert_eq!(expand_exponent("-1.25", "1").as_deref(), Some("-12.5"));
        assert_eq!(expand_exponent("12.5", "-1").as_deref(), Some("1.25"));
        assert_eq!(
            expand_exponent("3", "21").as_deref(),
            Some("3000000000000000000000")
        );
        assert_eq!(expand_exponent("x", "2"), None);
    }

    #[test]
    fn json_errors_name_the_row() {
        let err = parse_json(
            r#"[{"provider":"openai","model":"a","currency":"USD","input":"1","output":"2"},
                {"provider":"openai","currency":"USD","input":"1","output":"2"}]"#,
        )
        .unwrap_err();
        assert_eq!(format!("{err:#}"), "row 2: missing model");

        let err = parse_json(
            r#"[{"provider":"p","model":"m","currency":"USD","input":true,"output":"1"}]"#,
        )
        .unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "row 1: input: expected a string or a number, found a boolean"
        );

        let err = parse_json(
            r#"[{"provider":"p","model":"m","currency":"USD","input":"1","output":"1","cached_inpt":"1"}]"#,
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").starts_with("row 1: unknown key \"cached_inpt\""),
            "{err:#}"
        );

        assert!(parse_json(r#"{"provider":"p"}"#).is_err());
        assert!(parse_json("[1]").is_err());
        assert!(parse_json("[").is_err());
    }

    #[test]
    fn csv_rows() {
        let prices = parse_csv(
            "provider,model,currency,input,output,cached_input,per_request\n\
             openai,gpt-4o,USD,2.50,10.00,1.25,0\n\
             \n\
             # comment\n\
             anthropic, claude ,USD,3,15,,\n",
        )
        .unwrap();
        assert_eq!(
            prices,
            vec![
                req("openai", "gpt-4o", "USD", "2.50", "10.00", "1.25", "0"),
                req("anthropic", "claude", "USD", "3", "15", "", ""),
            ]
        );
    }

    #[test]
    fn csv_optional_columns_and_order() {
        let prices = parse_csv("model,provider,currency,output,input\r\nm,p,EUR,2,1\r\n").unwrap();
        assert_eq!(prices, vec![req("p", "m", "EUR", "1", "2", "", "")]);
    }

    #[test]
    fn csv_malformed_row_is_named() {
        let err = parse_csv(
            "provider,model,currency,input,output,cached_input,per_request\n\
             openai,gpt-4o,USD,2.50,10.00,1.25,0\n\
             openai,gpt-4o-mini,USD,0.15\n",
        )
        .unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "row 2 (line 3): expected 7 fields, found 4"
        );

        let err = parse_csv("provider,model,currency,input,output\np,m,USD,,1\n").unwrap_err();
        assert_eq!(format!("{err:#}"), "row 1 (line 2): missing input");

        let err = parse_csv("provider,model,currency,input,output\n\"p\",m,USD,1,1\n").unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "row 1 (line 2): quoted fields are not supported"
        );
    }

    #[test]
    fn csv_header_errors() {
        assert!(format!("{:#}", parse_csv("").unwrap_err()).contains("header"));
        let err = parse_csv("provider,model,currency,input\n").unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "header (line 1): missing column \"output\""
        );
        let err = parse_csv("provider,model,currency,input,output,price\n").unwrap_err();
        assert!(format!("{err:#}").contains("unknown column \"price\""));
    }

    #[test]
    fn file_format_by_extension() {
        let dir = std::env::temp_dir().join(format!("caracal-cli-import-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("prices.CSV");
        std::fs::write(&csv, "provider,model,currency,input,output\np,m,USD,1,2\n").unwrap();
        assert_eq!(
            read_file(&csv).unwrap(),
            vec![req("p", "m", "USD", "1", "2", "", "")]
        );
        let json = dir.join("prices.json");
        std::fs::write(
            &json,
            r#"[{"provider":"p","model":"m","currency":"USD","input":1,"output":2}]"#,
        )
        .unwrap();
        assert_eq!(
            read_file(&json).unwrap(),
            vec![req("p", "m", "USD", "1", "2", "", "")]
        );
        let empty = dir.join("empty.json");
        std::fs::write(&empty, "[]").unwrap();
        assert!(read_file(&empty)
            .unwrap_err()
            .to_string()
            .contains("no prices"));
        let txt = dir.join("prices.txt");
        std::fs::write(&txt, "").unwrap();
        assert!(read_file(&txt)
            .unwrap_err()
            .to_string()
            .contains(".json or .csv"));
        let bad = dir.join("bad.csv");
        std::fs::write(&bad, "provider,model,currency,input,output\np,m\n").unwrap();
        let err = format!("{:#}", read_file(&bad).unwrap_err());
        assert!(
            err.ends_with("bad.csv: row 1 (line 2): expected 5 fields, found 2"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
