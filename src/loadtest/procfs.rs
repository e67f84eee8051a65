//! A process's CPU time and memory, from `/proc`: the load test's own cost, and the target's
//! when it runs on this machine (the benches read the same).

use std::time::Duration;

/// CPU time (user and system, all threads) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    cpu_of(&format!("/proc/{pid}/stat"))
}

/// This process's CPU time so far.
pub fn cpu_time_self() -> Duration {
    cpu_of("/proc/self/stat")
}

fn cpu_of(path: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return Duration::ZERO;
    };
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at indices 11 and 12, in
    // clock ticks of 10 ms (USER_HZ is 100 on Linux).
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    Status::read(pid)?.kib(field)
}

/// `/proc/<pid>/status` as read once, for several of its fields.
pub struct Status(String);

impl Status {
    pub fn read(pid: u32) -> Option<Status> {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .map(Status)
    }

    /// A `kB` field, in KiB.
    pub fn kib(&self, field: &str) -> Option<u64> {
        self.0
            .lines()
            .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}
