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

/// Redis's per-command counters (`INFO commandstats`: calls and µs inside each
/// command, summed over every node), for where a script's time goes: an EVALSHA's
/// µs include the commands it calls, so what is left is the script's own work
/// (the Lua interpreter, making Lua strings of its arguments and replies).
#[derive(Clone, Debug, Default)]
pub struct CommandStats {
    /// command -> (calls, µs)
    pub commands: std::collections::BTreeMap<String, (u64, u64)>,
}

impl CommandStats {
    pub async fn take(stack: &TestStack) -> anyhow::Result<Self> {
        let replies = stack
            .redis_conn()?
            .on_each_node(redis::cmd("INFO").arg("commandstats"), false)
            .await
            .map_err(anyhow::Error::msg)?;
        let mut stats = Self::default();
        for (_, reply) in replies {
            stats.add(&redis::from_redis_value::<String>(reply)?);
        }
        Ok(stats)
    }

    /// Adds one node's `INFO commandstats` text.
    pub fn add(&mut self, info: &str) {
        for line in info.lines() {
            let Some((name, rest)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let field = |key: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let e = self.commands.entry(name.to_owned()).or_default();
            e.0 += field("calls");
            e.1 += field("usec");
        }
    }

    /// What ran since `before`, per unit of work (`units`): a line of the script
    /// runs and their time, and a line of the commands they called.
    pub fn describe_since(&self, before: &Self, units: u64, unit: &str) -> String {
        let per = units.max(1) as f64;
        let delta = |name: &str| {
            let (c, u) = self.commands.get(name).copied().unwrap_or_default();
            let (bc, bu) = before.commands.get(name).copied().unwrap_or_default();
            (c.saturating_sub(bc), u.saturating_sub(bu))
        };
        let scripts = ["evalsha", "eval"];
        let (mut runs, mut script_us) = (0, 0);
        for s in scripts {
            let (c, u) = delta(s);
            runs += c;
            script_us += u;
        }
        let (mut inner_us, mut inner) = (0, Vec::new());
        for name in self.commands.keys() {
            if scripts.contains(&name.as_str())
                || ["info", "wait", "ping", "config|resetstat", "client|setname"]
                    .contains(&name.as_str())
            {
                continue;
            }
            let (c, u) = delta(name);
            if c > 0 {
                inner_us += u;
                inner.push(format!("{name} {:.2}", c as f64 / per));
            }
        }
        format!(
            "redis commandstats per {unit}: {:.2} script runs, {:.1} µs in scripts = {:.1} µs in the commands they call + {:.1} µs of script work; calls per {unit}: {}",
            runs as f64 / per,
            script_us as f64 / per,
            inner_us as f64 / per,
            script_us.saturating_sub(inner_us) as f64 / per,
            inner.join(", ")
        )
    }
}

/// How this machine's idle CPUs wait, for the header of a latency run: the cpuidle
/// driver and governor, and haltpoll's guest poll window when that driver is in use.
/// On a VM whose idle vCPUs halt at once (`haltpoll.guest_halt_poll_ns=0`), every
/// hop between processes at a low request rate wakes a halted vCPU (measured here:
/// an idle Redis PING 0.15-0.20 ms against 0.015 ms back to back).
pub fn idle_policy() -> String {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".to_owned())
    };
    let mut text = format!(
        "cpuidle driver {}, governor {}",
        read("/sys/devices/system/cpu/cpuidle/current_driver"),
        read("/sys/devices/system/cpu/cpuidle/current_governor_ro"),
    );
    let poll_ns = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";
    if std::path::Path::new(poll_ns).exists() {
        text.push_str(&format!(", haltpoll.guest_halt_poll_ns={}", read(poll_ns)));
    }
    text
}

/// A PM QoS request that idle CPUs wake within `max_us` microseconds, held while
/// this value lives (the kernel drops it when the file closes). With 0 the cpuidle
/// governor keeps idle CPUs polling instead of halting: what `tuned`'s
/// latency-performance profile and `cyclictest` do. It is machine-wide, burns idle
/// CPU, and needs root; a benchmark option, not something the services do.
pub struct CpuLatencyQos {
    _file: std::fs::File,
}

impl CpuLatencyQos {
    pub fn hold(max_us: i32) -> std::io::Result<Self> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/cpu_dma_latency")?;
        // The binary form: one native-endian s32.
        file.write_all(&max_us.to_ne_bytes())?;
        Ok(Self { _file: file })
    }
}

/// The whole machine's CPU time so far, from the `cpu` line of `/proc/stat` (clock
/// ticks): over a run, how busy the machine was and how much of its time the
/// hypervisor gave to other guests ("steal"). A run with steal is not a quiet run,
/// whatever its figures say: every process in it waited for a CPU it could not see.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineTicks {
    /// user + nice + system + irq + softirq (guest time is counted inside user).
    pub busy: u64,
    /// idle + iowait.
    pub idle: u64,
    pub steal: u64,
}

impl MachineTicks {
    /// Now (all zero when `/proc/stat` is unreadable: the line then says 0 %).
    pub fn read() -> Self {
        std::fs::read_to_string("/proc/stat")
            .map(|text| Self::parse(&text))
            .unwrap_or_default()
    }

    /// From the text of `/proc/stat`.
    pub fn parse(stat: &str) -> Self {
        let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
            return Self::default();
        };
        // user nice system idle iowait irq softirq steal guest guest_nice
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        Self {
            busy: at(0) + at(1) + at(2) + at(5) + at(6),
            idle: at(3) + at(4),
            steal: at(7),
        }
    }

    /// Shares of the machine's CPU time since `before`: (busy, idle, stolen), in %.
    pub fn shares_since(&self, before: &Self) -> (f64, f64, f64) {
        let d = |now: u64, then: u64| now.saturating_sub(then) as f64;
        let (busy, idle, steal) = (
            d(self.busy, before.busy),
            d(self.idle, before.idle),
            d(self.steal, before.steal),
        );
        let total = (busy + idle + steal).max(1.0);
        (
            100.0 * busy / total,
            100.0 * idle / total,
            100.0 * steal / total,
        )
    }

    /// One line for a bench's output: the machine over the run since `before`.
    pub fn describe_since(&self, before: &Self) -> String {
        let (busy, idle, steal) = self.shares_since(before);
        format!(
            "machine over the run: busy {busy:.0} %, idle {idle:.0} %, stolen by the hypervisor {steal:.0} % (quiet: ~0)"
        )
    }
}

/// CPU seconds used so far by this process, by Redis, by one more process (Envoy,
/// say) and by an authz-service run as its own process (0 for those not given),
/// and the machine's ticks: take one before a run and one after, and subtract.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSample {
    pub process: f64,
    pub redis: f64,
    pub other: f64,
    pub service: f64,
    pub machine: MachineTicks,
}

impl CpuSample {
    pub async fn take(
        stack: &TestStack,
        other_pid: Option<u32>,
        service_pid: Option<u32>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            process: cpu_seconds("/proc/self/stat"),
            redis: redis_cpu_seconds(stack).await?,
            other: other_pid.map_or(0.0, pid_cpu_seconds),
            service: service_pid.map_or(0.0, pid_cpu_seconds),
            machine: MachineTicks::read(),
        })
    }

    /// The CPU used since `before`, in µs per unit of work (`units` of them).
    pub fn per_unit_since(&self, before: &Self, units: u64) -> Self {
        let per = |after: f64, before: f64| (after - before) * 1e6 / units.max(1) as f64;
        Self {
            process: per(self.process, before.process),
            redis: per(self.redis, before.redis),
            other: per(self.other, before.other),
            service: per(self.service, before.service),
            machine: self.machine,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MachineTicks;

    #[test]
    fn machine_shares_come_from_the_cpu_line() {
        let before =
            MachineTicks::parse("cpu  100 0 20 1000 5 0 3 50 0 0\ncpu0 50 0 10 500 2 0 1 25 0 0\n");
        assert_eq!(
            before,
            MachineTicks {
                busy: 123,
                idle: 1005,
                steal: 50
            }
        );
        // +60 busy, +20 idle, +20 stolen ticks.
        let after = MachineTicks::parse("cpu  150 0 30 1015 10 0 3 70 0 0\n");
        let (busy, idle, steal) = after.shares_since(&before);
        assert!((busy - 60.0).abs() < 1e-9, "{busy}");
        assert!((idle - 20.0).abs() < 1e-9, "{idle}");
        assert!((steal - 20.0).abs() < 1e-9, "{steal}");
        assert_eq!(MachineTicks::parse("no cpu line"), MachineTicks::default());
        assert_eq!(after.shares_since(&after), (0.0, 0.0, 0.0));
    }
}
