//! Reading and writing SIP as text, without a parser: what a load generator needs to place
//! thousands of calls a second (a full parse per message would cost more than the engine's own
//! work), and a quantile of sorted samples.

use std::net::SocketAddr;

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

/// The `p`-quantile (0..=1) of sorted samples, nearest rank.
pub fn quantile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}
