//! Small helpers for SIP/RTP load generators and process measurements: building and reading SIP
//! text messages without a parser, RTP header fields, and a process's CPU time and memory from
//! `/proc`. Nothing here talks to the network.

use std::time::Duration;

// Each test uses some of these.
#[allow(unused_imports)]
pub use sautikit::loadtest::sip_text::{
    body, contact_uri, cseq, first_line, header, headers, quantile, request_method, response_to,
    sdp_offer_pcmu, status_code, tag_param,
};

/// The fields of an RTP header (RFC 3550 §5.1) this harness checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    pub version: u8,
    pub marker: bool,
    pub payload_type: u8,
    pub sequence: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    /// Bytes after the fixed header and CSRCs.
    pub payload_len: usize,
}

pub fn rtp_header(p: &[u8]) -> Option<RtpHeader> {
    if p.len() < 12 {
        return None;
    }
    let cc = usize::from(p[0] & 0x0f);
    let header_len = 12 + 4 * cc;
    if p.len() < header_len {
        return None;
    }
    Some(RtpHeader {
        version: p[0] >> 6,
        marker: p[1] & 0x80 != 0,
        payload_type: p[1] & 0x7f,
        sequence: u16::from_be_bytes([p[2], p[3]]),
        timestamp: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
        ssrc: u32::from_be_bytes([p[8], p[9], p[10], p[11]]),
        payload_len: p.len() - header_len,
    })
}

#[allow(unused_imports)]
pub use sautikit::loadtest::procfs::cpu_time;

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB; 0 when it cannot be read.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    sautikit::loadtest::procfs::status_kib(pid, field).unwrap_or(0)
}

/// Threads of a process by name with their CPU time (ticks of 10 ms), busiest first: which thread
/// of a server is the bottleneck.
pub fn thread_cpu(pid: u32) -> Vec<(String, Duration)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let tid = entry.file_name().to_string_lossy().into_owned();
        let Ok(tid) = tid.parse::<u32>() else {
            continue;
        };
        let stat =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
        let name = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map(|(n, _)| n.to_owned())
            .unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.push((
            format!("{name}/{tid}"),
            Duration::from_millis((ticks(11) + ticks(12)) * 10),
        ));
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.1));
    out
}

/// The soft limit on open files; raised to `want` (up to the hard limit) with util-linux's
/// `prlimit` when lower. Returns the limit in force afterwards.
pub fn ensure_nofile(want: u64) -> u64 {
    let read = || -> (u64, u64) {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let n = |s: Option<&&str>| s.and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
                (n(f.get(3)), n(f.get(4)))
            })
            .unwrap_or((0, 0))
    };
    let (soft, hard) = read();
    if soft >= want {
        return soft;
    }
    let target = want.min(hard);
    let _ = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={target}:{hard}"),
        ])
        .status();
    read().0
}

/// Machine load at this moment: the 1-minute load average and the busiest other processes, for
/// a benchmark report on a shared machine.
pub fn machine_load() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let top = std::process::Command::new("ps")
        .args(["-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .take(4)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!("loadavg {} | top: {top}", load.join(" "))
}
