//! `caracal audit export`: the audit trail (`audit_logs`, written by the
//! audit-logger) for a time range, as JSON lines or RFC 5424 syslog lines.
//!
//! There is no admin RPC for the audit trail yet, so this reads PostgreSQL
//! directly (`--database-url` / `CARACAL_DATABASE_URL`, TLS as the service
//! handles it), in a session set READ ONLY: the export cannot change the trail.
//! Lines go to stdout, a file, or a syslog server over UDP or TCP.
//! The range is on `ingested_at`, when the audit-logger wrote the row (the
//! database's clock), not on the producer's Kafka timestamp (`occurred_at`, which
//! whoever produces chooses; it is in every record). Rows are read in pages of
//! [`PAGE`] (keyset on ingested_at, id), so memory stays flat whatever the range.

use std::{fs::File, io::Write};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Bytea, Integer, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use crate::args::{AuditCmd, AuditFormat};

/// Rows per query.
const PAGE: i64 = 1000;
/// Syslog facility 13 (log audit), severity 6 (informational): 13 * 8 + 6.
const SYSLOG_PRI: u8 = 110;
/// The structured-data id (32473 is the private enterprise number reserved for
/// examples by RFC 5612; replace with an assigned one if the SIEM needs it).
const SD_ID: &str = "caracal@32473";

/// One `audit_logs` row.
#[derive(Debug, Clone, PartialEq, diesel::QueryableByName)]
pub struct AuditRecord {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub topic: String,
    #[diesel(sql_type = Integer)]
    pub partition: i32,
    #[diesel(sql_type = BigInt)]
    pub kafka_offset: i64,
    #[diesel(sql_type = Nullable<Bytea>)]
    pub key: Option<Vec<u8>>,
    /// The jsonb headers array, as text.
    #[diesel(sql_type = Text)]
    pub headers: String,
    #[diesel(sql_type = Nullable<Bytea>)]
    pub payload: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<Text>)]
    pub event_type: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub event_id: Option<String>,
    #[diesel(sql_type = Timestamptz)]
    pub occurred_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    pub ingested_at: DateTime<Utc>,
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// The record as one JSON object (bytes as lowercase hex).
pub fn json_value(r: &AuditRecord) -> serde_json::Value {
    let headers: serde_json::Value =
        serde_json::from_str(&r.headers).unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "id": r.id,
        "topic": r.topic,
        "partition": r.partition,
        "offset": r.kafka_offset,
        "key_hex": r.key.as_deref().map(hex),
        "headers": headers,
        "payload_hex": r.payload.as_deref().map(hex),
        "event_type": r.event_type,
        "event_id": r.event_id,
        "occurred_at": time(&r.occurred_at),
        "ingested_at": time(&r.ingested_at),
    })
}

/// Whether `c` could end a line for some reader: the control characters (C0,
/// DEL, C1 with NEL) and the Unicode line and paragraph separators.
fn breaks_lines(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// The record as one JSON line (without the newline). serde_json escapes the C0
/// controls; DEL, the C1 controls and U+2028/U+2029 (raw in its output, and line
/// ends for some readers) become `\uXXXX` too. They only occur inside JSON
/// strings, where that escape means the same character.
pub fn json_line(r: &AuditRecord) -> String {
    let text = json_value(r).to_string();
    if !text.chars().any(breaks_lines) {
        return text;
    }
    let mut s = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if breaks_lines(c) {
            s.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            s.push(c);
        }
    }
    s
}

/// An RFC 5424 header field: printable US-ASCII without spaces, at most `max`
/// characters; `-` (NILVALUE) when nothing is left.
fn field(text: &str, max: usize) -> String {
    let s: String = text
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if s.is_empty() {
        "-".to_owned()
    } else {
        s
    }
}

/// An SD-PARAM value: `"`, `\` and `]` escaped with a backslash (RFC 5424 6.3.3),
/// and every character that could end the line (CR, LF, the other control
/// characters, U+2028/U+2029) written as `\n`, `\r`, `\t` or `\uXXXX`: a value
/// (an event id from a Kafka header, say) can never start a forged record. A
/// receiver reads those as the literal backslash sequences (RFC 5424 leaves a
/// backslash before any other character as is); a literal backslash is always
/// `\\`, so the escapes stay unambiguous.
fn sd_value(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' | '\\' | ']' => {
                s.push('\\');
                s.push(c);
            }
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if breaks_lines(c) => s.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => s.push(c),
        }
    }
    s
}

/// The record as one RFC 5424 line (without the newline; none inside: see
/// [`sd_value`] and [`json_line`]):
/// `<110>1 TIMESTAMP HOSTNAME caracal - MSGID [caracal@32473 topic= partition= offset= event_id=] BOM JSON`.
/// MSGID is the event type; the message is the JSON record, UTF-8 with its BOM.
pub fn syslog_line(r: &AuditRecord, hostname: &str) -> String {
    let mut sd = format!(
        "[{SD_ID} topic=\"{}\" partition=\"{}\" offset=\"{}\"",
        sd_value(&r.topic),
        r.partition,
        r.kafka_offset
    );
    if let Some(id) = &r.event_id {
        sd.push_str(&format!(" event_id=\"{}\"", sd_value(id)));
    }
    sd.push(']');
    format!(
        "<{SYSLOG_PRI}>1 {} {} caracal - {} {sd} \u{feff}{}",
        time(&r.occurred_at),
        field(hostname, 255),
        field(r.event_type.as_deref().unwrap_or(""), 32),
        json_line(r)
    )
}

fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

const SELECT: &str = "\
SELECT id, topic, \"partition\", kafka_offset, key, headers::text AS headers, payload,
    event_type, event_id, occurred_at, ingested_at
FROM audit_logs
WHERE ingested_at >= $1 AND ingested_at < $2 AND (ingested_at, id) > ($3, $4)
ORDER BY ingested_at, id
LIMIT $5";

pub async fn run(cmd: AuditCmd, out: &mut dyn Write) -> Result<()> {
    let AuditCmd::Export {
        start,
        end,
        format,
        file,
        syslog_server,
        database_url,
    } = cmd;
    if end <= start {
        anyhow::bail!("--end must be after --start");
    }
    let mut remote = match &syslog_server {
        Some(_) if format != AuditFormat::Syslog => {
            anyhow::bail!("--syslog-server needs --format syslog")
        }
        Some(url) => Some(Syslog::connect(url)?),
        None => None,
    };
    let mut conn: AsyncPgConnection = caracal_service_kit::db::tls::establish(&database_url)
        .await
        .context("cannot connect to the audit database")?;
    conn.batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        .await
        .context("cannot make the session read-only")?;
    let mut file_out = match &file {
        Some(path) => Some(std::io::BufWriter::new(
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => None,
    };
    let sink: &mut dyn Write = match file_out.as_mut() {
        Some(f) => f,
        None => out,
    };
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let total: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM audit_logs WHERE ingested_at >= $1 AND ingested_at < $2",
    )
    .bind::<Timestamptz, _>(start)
    .bind::<Timestamptz, _>(end)
    .get_result(&mut conn)
    .await
    .context("cannot count audit records")?;
    let hostname = local_hostname();
    // Keyset paging; bounded by the rows present at the start (rows written
    // meanwhile into the range may add pages, so allow a few more).
    let mut after: (DateTime<Utc>, i64) = (start, i64::MIN);
    for _ in 0..(total.n / PAGE + 10) {
        let page: Vec<AuditRecord> = diesel::sql_query(SELECT)
            .bind::<Timestamptz, _>(start)
            .bind::<Timestamptz, _>(end)
            .bind::<Timestamptz, _>(after.0)
            .bind::<BigInt, _>(after.1)
            .bind::<BigInt, _>(PAGE)
            .load(&mut conn)
            .await
            .context("cannot read audit records")?;
        for r in &page {
            let line = match format {
                AuditFormat::Json => json_line(r),
                AuditFormat::Syslog => syslog_line(r, &hostname),
            };
            match remote.as_mut() {
                Some(server) => server.send(&line)?,
                None => writeln!(sink, "{line}").context("cannot write the export")?,
            }
        }
        match page.last() {
            Some(last) if page.len() as i64 == PAGE => after = (last.ingested_at, last.id),
            _ => break,
        }
    }
    sink.flush().context("cannot write the export")?;
    if let Some(server) = remote.as_mut() {
        server.flush()?;
    }
    Ok(())
}

/// Longest record sent in one UDP datagram (IPv4's limit minus headers).
const MAX_DATAGRAM: usize = 65_000;

/// A syslog destination.
enum Syslog {
    /// RFC 5426: one message per datagram.
    Udp(std::net::UdpSocket),
    /// RFC 6587 octet counting: `LEN SP MSG`.
    Tcp(std::io::BufWriter<std::net::TcpStream>),
}

impl Syslog {
    fn connect(url: &str) -> Result<Self> {
        let (scheme, addr) = url.split_once("://").with_context(|| {
            format!("--syslog-server {url}: expected udp://HOST:PORT or tcp://HOST:PORT")
        })?;
        match scheme {
            "udp" => {
                let bind = if addr.starts_with('[') {
                    "[::]:0"
                } else {
                    "0.0.0.0:0"
                };
                let socket = std::net::UdpSocket::bind(bind).context("cannot open a UDP socket")?;
                socket
                    .connect(addr)
                    .with_context(|| format!("cannot reach syslog server {addr}"))?;
                Ok(Self::Udp(socket))
            }
            "tcp" => {
                let stream = std::net::TcpStream::connect(addr)
                    .with_context(|| format!("cannot connect to syslog server {addr}"))?;
                stream
                    .set_write_timeout(Some(std::time::Duration::from_secs(30)))
                    .context("cannot configure the syslog connection")?;
                Ok(Self::Tcp(std::io::BufWriter::new(stream)))
            }
            other => anyhow::bail!("--syslog-server: unknown scheme {other:?} (udp or tcp)"),
        }
    }

    fn send(&mut self, line: &str) -> Result<()> {
        match self {
            Self::Udp(socket) => {
                if line.len() > MAX_DATAGRAM {
                    anyhow::bail!(
                        "a record of {} bytes does not fit a UDP datagram; use tcp://",
                        line.len()
                    );
                }
                socket
                    .send(line.as_bytes())
                    .context("cannot send to the syslog server")?;
            }
            Self::Tcp(stream) => write!(stream, "{} {line}", line.len())
                .context("cannot send to the syslog server")?,
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if let Self::Tcp(stream) = self {
            stream.flush().context("cannot send to the syslog server")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AuditRecord {
        AuditRecord {
            id: 7,
            topic: "caracal.policy.changes".into(),
            partition: 1,
            kafka_offset: 42,
            key: Some(b"k".to_vec()),
            headers: r#"[{"key":"event_type","value":"policy updated"}]"#.into(),
            payload: Some(vec![0, 255]),
            event_type: Some("policy updated".into()),
            event_id: Some("a\"b]c".into()),
            occurred_at: DateTime::from_timestamp(1_700_000_000, 5_000).unwrap(),
            ingested_at: DateTime::from_timestamp(1_700_000_001, 0).unwrap(),
        }
    }

    #[test]
    fn rfc5424_line() {
        let line = syslog_line(&record(), "host 1");
        assert!(
            line.starts_with(
                "<110>1 2023-11-14T22:13:20.000005Z host1 caracal - policyupdated \
                 [caracal@32473 topic=\"caracal.policy.changes\" partition=\"1\" offset=\"42\" \
                 event_id=\"a\\\"b\\]c\"] \u{feff}{"
            ),
            "{line}"
        );
        let json: serde_json::Value =
            serde_json::from_str(line.split('\u{feff}').nth(1).unwrap()).unwrap();
        assert_eq!(json["payload_hex"], "00ff");
        let mut r = record();
        r.event_type = None;
        r.event_id = None;
        assert!(syslog_line(&r, "").contains(" - caracal - - [caracal@32473 topic="));
    }

    /// A header (event id, event type) or header value holding a newline and a
    /// forged syslog header must not start a second record: one row, one line.
    #[test]
    fn a_row_is_always_one_line() {
        let forged = "x\n<13>1 2026-01-01T00:00:00Z evil caracal - forged - oops";
        let mut r = record();
        r.event_id = Some(forged.to_owned());
        r.event_type = Some(format!("t\r\n{forged}"));
        r.topic = format!("caracal.policy.changes\r{forged}");
        r.headers = serde_json::json!([
            {"key": "event_id", "value": forged},
            {"key": "x\u{2028}y", "value": "a\u{85}b\u{2029}c\u{7f}"},
        ])
        .to_string();
        let line = syslog_line(&r, "host\n1");
        let breaks = |s: &str| {
            s.chars()
                .filter(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
                .count()
        };
        assert_eq!(line.lines().count(), 1, "{line}");
        assert_eq!(breaks(&line), 0, "{line:?}");
        // Escaped, not dropped: the SD-PARAMs still say what the row holds.
        assert!(
            line.contains(
                "event_id=\"x\\n<13>1 2026-01-01T00:00:00Z evil caracal - forged - oops\""
            ),
            "{line}"
        );
        assert!(line.contains("topic=\"caracal.policy.changes\\r"), "{line}");
        // The JSON message parses back to the row's values.
        let json: serde_json::Value =
            serde_json::from_str(line.split('\u{feff}').nth(1).unwrap()).unwrap();
        assert_eq!(json["event_id"], forged);
        assert_eq!(json["headers"][1]["value"], "a\u{85}b\u{2029}c\u{7f}");

        let json_line = json_line(&r);
        assert_eq!(json_line.lines().count(), 1, "{json_line}");
        assert_eq!(breaks(&json_line), 0, "{json_line:?}");
        let back: serde_json::Value = serde_json::from_str(&json_line).unwrap();
        assert_eq!(back, json_value(&r));
    }
}
