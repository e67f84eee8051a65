//! Small helpers for SIP/RTP load generators and process measurements: building and reading SIP
//! text messages without a parser, RTP header fields, and a process's CPU time and memory from
//! `/proc`. Nothing here talks to the network.

use std::net::SocketAddr;
use std::time::Duration;

/// The first line of a SIP message.
pub fn first_line(msg: &str) -> &str {
    msg.split("\r\n").next().unwrap_or("")
}

/// `SIP/2.0 200 OK` → 200; requests → None.
pub fn status_code(msg: &str) -> Option<u16> {
    let line = first_line(msg);
    let rest = line.strip_prefix("SIP/2.0 ")?;
    rest.get(..3)?.parse().ok()
}

/// `BYE sip:… SIP/2.0` → "BYE"; responses → None.
pub fn request_method(msg: &str) -> Option<&str> {
    let line = first_line(msg);
    if line.starts_with("SIP/2.0") {
        return None;
    }
    line.split(' ').next()
}

/// Compact header forms (RFC 3261 §7.3.3) for the headers a UAC reads.
fn compact(name: &str) -> Option<&'static str> {
    Some(match name.to_ascii_lowercase().as_str() {
        "call-id" => "i",
        "via" => "v",
        "from" => "f",
        "to" => "t",
        "contact" => "m",
        "content-length" => "l",
        "content-type" => "c",
        _ => return None,
    })
}

/// The value of the first header `name` (case-insensitive, compact form too), trimmed.
pub fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    let short = compact(name);
    let head = msg.split("\r\n\r\n").next().unwrap_or(msg);
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        let n = n.trim();
        (n.eq_ignore_ascii_case(name) || short.is_some_and(|s| n.eq_ignore_ascii_case(s)))
            .then(|| v.trim())
    })
}

/// Every value of header `name`, in order (for Via, which a response must echo in full).
pub fn headers<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    let short = compact(name);
    let head = msg.split("\r\n\r\n").next().unwrap_or(msg);
    head.split("\r\n")
        .skip(1)
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            let n = n.trim();
            (n.eq_ignore_ascii_case(name) || short.is_some_and(|s| n.eq_ignore_ascii_case(s)))
                .then(|| v.trim())
        })
        .collect()
}

/// The body after the blank line.
pub fn body(msg: &str) -> &str {
    msg.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
}

/// `;tag=` of a From/To value.
pub fn tag_param(value: &str) -> Option<&str> {
    value
        .split(';')
        .skip(1)
        .find_map(|p| p.trim().strip_prefix("tag="))
}

/// `CSeq: 2 BYE` → (2, "BYE").
pub fn cseq(msg: &str) -> Option<(u32, &str)> {
    let v = header(msg, "CSeq")?;
    let (n, m) = v.split_once(' ')?;
    Some((n.trim().parse().ok()?, m.trim()))
}

/// The URI inside `<…>` of a Contact (or the bare value).
pub fn contact_uri(msg: &str) -> Option<&str> {
    let v = header(msg, "Contact")?;
    match (v.find('<'), v.find('>')) {
        (Some(a), Some(b)) if b > a => Some(&v[a + 1..b]),
        _ => v.split(';').next(),
    }
}

/// A `200 OK` (or any `code`) to a request from the peer: Via, From, To, Call-ID and CSeq echoed.
pub fn response_to(request: &str, code: u16, reason: &str) -> String {
    let mut out = format!("SIP/2.0 {code} {reason}\r\n");
    for v in headers(request, "Via") {
        out.push_str("Via: ");
        out.push_str(v);
        out.push_str("\r\n");
    }
    for name in ["From", "To", "Call-ID", "CSeq"] {
        if let Some(v) = header(request, name) {
            out.push_str(name);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
    }
    out.push_str("Content-Length: 0\r\n\r\n");
    out
}

/// An SDP offer for one PCMU audio stream at `rtp`.
pub fn sdp_offer_pcmu(rtp: SocketAddr, session_id: u64) -> String {
    format!(
        "v=0\r\no=- {session_id} 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\na=sendrecv\r\n",
        ip = rtp.ip(),
        port = rtp.port()
    )
}

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

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat` (clock ticks of
/// 10 ms: USER_HZ is 100 on Linux).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at indices 11 and 12.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
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

/// The `p`-quantile (0..=1) of sorted samples, nearest rank.
pub fn quantile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
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
