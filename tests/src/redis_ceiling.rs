//! The Redis-only ceiling of the hot path: what Redis allows when nothing but
//! `redis-benchmark` (Debian `redis-tools`) drives scripts of the same shape as the
//! budget scripts — reserve: check 3 counters, reserve on 3, record, index, XADD;
//! settle: read the record, move reserved to spent on 3 counters, done marker,
//! unindex, XADD — over 64 connections, keys spread over 10,000 agents. A pair
//! costs one of each, so the ceiling in pairs/s is 1 / (1/reserve + 1/settle).
//! `authz-bench` prints its pairs/s as a fraction of this.

use std::process::Command;

use anyhow::{bail, Context};

/// Reserve shape. KEYS: record, expiry index, outbox, 3 counters; ARGV: now,
/// amount, record text, limit.
const RESERVE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return {'dup'} end
local a = tonumber(ARGV[2])
local used = {}
for i = 4, 6 do
  local v = redis.call('HMGET', KEYS[i], 's', 'r')
  local u = (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0)
  if u + a > tonumber(ARGV[4]) then return {'deny', i} end
  used[#used + 1] = u
end
for i = 4, 6 do redis.call('HINCRBY', KEYS[i], 'r', a) end
redis.call('SET', KEYS[1], ARGV[3], 'PX', 600000)
redis.call('ZADD', KEYS[2], ARGV[1], KEYS[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'type', 'decision', 'meta', ARGV[3])
return {'allow', used[1], used[2], used[3]}
"#;

/// Settle shape. Same keys; ARGV: now, amount, event text.
const SETTLE: &str = r#"
local rec = redis.call('GET', KEYS[1])
local a = tonumber(ARGV[2])
for i = 4, 6 do
  redis.call('HINCRBY', KEYS[i], 'r', -a)
  redis.call('HINCRBY', KEYS[i], 's', a)
end
redis.call('SET', KEYS[1], 'D\tsettle\t' .. ARGV[2], 'EX', 86400)
redis.call('ZREM', KEYS[2], KEYS[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'type', 'charge', 'meta', ARGV[3])
return {'settle', a, rec and 1 or 0}
"#;

/// Ceiling figures: script calls per second of each shape, and pairs per second.
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    pub reserve: Shape,
    pub settle: Shape,
}

/// What `redis-benchmark` measured for one script shape: calls/s, and the latency
/// of one call as its 64 connections saw it (ms). At a closed loop of 64 the
/// latency is set by the rate (Little: 64 / calls/s on average), so this is the
/// per-call latency Redis alone gives at the concurrency the service is run at.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Redis's own CPU per call (µs, user + system from INFO over the run).
    pub redis_cpu_us: f64,
}

impl Ceiling {
    pub fn pairs_per_s(&self) -> f64 {
        1.0 / (1.0 / self.reserve.per_s + 1.0 / self.settle.per_s)
    }

    /// Redis's CPU per reserve + settle pair (µs).
    pub fn redis_cpu_us_per_pair(&self) -> f64 {
        self.reserve.redis_cpu_us + self.settle.redis_cpu_us
    }
}

/// Redis's CPU seconds so far (user + system), from `INFO cpu`.
fn redis_cpu(port: u16) -> anyhow::Result<f64> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "info", "cpu"])
        .output()
        .context("redis-cli (Debian redis-tools)")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
        .filter_map(|l| l.split_once(':')?.1.trim().parse::<f64>().ok())
        .sum())
}

fn load(port: u16, script: &str) -> anyhow::Result<String> {
    let out = Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "script",
            "load",
            script,
        ])
        .output()
        .context("redis-cli (Debian redis-tools)")?;
    let sha = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || sha.len() != 40 {
        bail!("SCRIPT LOAD failed: {sha}");
    }
    Ok(sha)
}

/// Runs `requests` EVALSHA calls of `sha` at `connections`, `pipeline` calls in
/// flight per connection (`-P`), and returns what `redis-benchmark` measured.
fn run(
    port: u16,
    sha: &str,
    requests: u64,
    connections: u16,
    pipeline: u16,
    prefix: &str,
) -> anyhow::Result<Shape> {
    // Each __rand_int__ is replaced by its own random number below -r: a record
    // key with two of them is (almost always) new; counters spread over 10,000.
    let rec = format!("{prefix}:rsv:__rand_int__:__rand_int__");
    let (exp, outbox) = (format!("{prefix}:expiry"), format!("{prefix}:outbox"));
    let counters: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|c| format!("{prefix}:{c}:__rand_int__"))
        .collect();
    // As long as a real record and its metadata (one line: redis-benchmark's CSV
    // puts the command on one line).
    let record = "L\t25000\tUSD\t3\tcaracal:{p3}:c:0194f1c2-6d0e-7c55-9a4e-54a1d7e2b1aa:2026-12-02\t{\"request_id\":\"r-000001\",\"agent_id\":\"0194f1c2-6d0e-7c55-9a4e-54a1d7e2b1aa\",\"model\":\"gpt-4o\"}";
    let cpu_before = redis_cpu(port)?;
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", &connections.to_string(), "-n", &requests.to_string()])
        .args(["-P", &pipeline.max(1).to_string()])
        .args(["-r", "10000", "-q", "--csv"])
        .args(["EVALSHA", sha, "6", &rec, &exp, &outbox])
        .args(&counters)
        .args(["1770000000000", "25000", record, "1000000000000000"])
        .output()
        .context("redis-benchmark (Debian redis-tools)")?;
    let redis_cpu_us = (redis_cpu(port)? - cpu_before) * 1e6 / requests.max(1) as f64;
    let text = String::from_utf8_lossy(&out.stdout);
    let shape = parse_csv(&text);
    match shape {
        Some(s) if s.per_s > 0.0 && out.status.success() => Ok(Shape { redis_cpu_us, ..s }),
        _ => bail!(
            "redis-benchmark printed no rate: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The figures of the last result line of `redis-benchmark --csv`: a header, then
/// "name","rps","avg",min,p50,p95,p99,max per test. Counted from the end: the name
/// (the command line) may hold anything, commas and quotes included.
fn parse_csv(text: &str) -> Option<Shape> {
    text.lines().rev().find_map(|l| {
        let f: Vec<f64> = l
            .rsplit("\",\"")
            .take(7)
            .map(|v| v.trim_matches('"').parse::<f64>())
            .collect::<Result<_, _>>()
            .ok()?;
        // Reversed: max, p99, p95, p50, min, avg, rps.
        (f.len() == 7).then(|| Shape {
            per_s: f[6],
            p50_ms: f[3],
            p99_ms: f[1],
            redis_cpu_us: 0.0,
        })
    })
}

/// Measures the ceiling on the Redis at 127.0.0.1:`port` (keys under a prefix of
/// their own, deleted afterwards), each connection with `pipeline` calls in
/// flight (1: one at a time; 16: the reference issue 24 measures against).
pub fn measure(
    port: u16,
    requests: u64,
    connections: u16,
    pipeline: u16,
) -> anyhow::Result<Ceiling> {
    let prefix = format!("ceiling-{}", uuid::Uuid::new_v4().simple());
    let (reserve, settle) = (load(port, RESERVE)?, load(port, SETTLE)?);
    let reserve = run(port, &reserve, requests, connections, pipeline, &prefix)?;
    let settle = run(port, &settle, requests, connections, pipeline, &prefix)?;
    // Clean up: the bench's keys (counters, records) under the prefix.
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "redis-cli -h 127.0.0.1 -p {port} --scan --pattern '{prefix}:*' | xargs -r -n 500 redis-cli -h 127.0.0.1 -p {port} unlink > /dev/null"
        ))
        .status();
    Ok(Ceiling { reserve, settle })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_and_latency_come_from_the_last_result_line() {
        // As redis-benchmark 7.0 prints it, a name with commas and quotes in it.
        let text = concat!(
            "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n",
            "\"EVALSHA abc 6 k \"{\"a\":1,\"b\":2}\"\",\"30312.15\",\"2.101\",\"0.312\",\"2.015\",\"3.001\",\"3.655\",\"9.871\"\n",
        );
        let s = parse_csv(text).expect("a result line");
        assert_eq!(s.per_s, 30312.15);
        assert_eq!(s.p50_ms, 2.015);
        assert_eq!(s.p99_ms, 3.655);
        assert!(parse_csv("\"test\",\"rps\"\nERR unknown command\n").is_none());
    }
}
