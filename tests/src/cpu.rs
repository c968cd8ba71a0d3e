//! CPU time of the processes a benchmark runs, for "µs of CPU per call" figures.

use crate::TestStack;

/// CPU seconds (user + system) of a process or thread, from `/proc/.../stat`
/// (`/proc/self/stat`, `/proc/thread-self/stat`, `/proc/<pid>/stat`); clock ticks
/// of 10 ms, good enough over a run of seconds. 0 when unreadable.
pub fn cpu_seconds(stat: &str) -> f64 {
    let Ok(text) = std::fs::read_to_string(stat) else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds of process `pid` (0 when it is gone).
pub fn pid_cpu_seconds(pid: u32) -> f64 {
    cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// Redis's own CPU seconds (user + system) from INFO: of the server, or of every
/// node of a cluster (replicas included: replication is part of the cost).
pub async fn redis_cpu_seconds(stack: &TestStack) -> anyhow::Result<f64> {
    let cpu = |info: &str| -> f64 {
        info.lines()
            .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
            .filter_map(|l| l.split_once(':')?.1.trim().parse::<f64>().ok())
            .sum()
    };
    let replies = stack
        .redis_conn()?
        .on_each_node(redis::cmd("INFO").arg("cpu"), false)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut total = 0.0;
    for (_, reply) in replies {
        total += cpu(&redis::from_redis_value::<String>(reply)?);
    }
    Ok(total)
}

/// CPU seconds used so far by this process, by Redis and by one more process
/// (Envoy, say; 0 when none): take one before a run and one after, and subtract.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSample {
    pub process: f64,
    pub redis: f64,
    pub other: f64,
}

impl CpuSample {
    pub async fn take(stack: &TestStack, other_pid: Option<u32>) -> anyhow::Result<Self> {
        Ok(Self {
            process: cpu_seconds("/proc/self/stat"),
            redis: redis_cpu_seconds(stack).await?,
            other: other_pid.map_or(0.0, pid_cpu_seconds),
        })
    }

    /// The CPU used since `before`, in µs per unit of work (`units` of them).
    pub fn per_unit_since(&self, before: &Self, units: u64) -> Self {
        let per = |after: f64, before: f64| (after - before) * 1e6 / units.max(1) as f64;
        Self {
            process: per(self.process, before.process),
            redis: per(self.redis, before.redis),
            other: per(self.other, before.other),
        }
    }
}
