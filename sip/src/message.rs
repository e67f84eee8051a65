//! Parsing, building and inspecting SIP messages.
//!
//! rsip does the heavy parsing; this module puts a guard in front of it (size limit, header
//! folding, compact header names, Content-Length) and offers small accessors that return `Option`
//! instead of errors, because anything read from the network may be missing or malformed.

use rsip::prelude::*;
use rsip::{Header, Method, Request, Response, SipMessage};
use thiserror::Error;

/// Largest message we accept, on UDP and on a TCP stream alike.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;

/// The `Server`/`User-Agent` token we put on what we generate.
pub const SERVER: &str = concat!("Sautikit/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    #[error("message larger than {MAX_MESSAGE_SIZE} bytes")]
    TooLarge,
    #[error("no empty line ends the headers")]
    NoHeaderEnd,
    #[error("malformed header line")]
    BadHeaderLine,
    #[error("invalid Content-Length")]
    BadContentLength,
    #[error("body shorter than Content-Length")]
    Truncated,
    #[error("malformed Request-Line")]
    BadRequestLine,
    #[error("SIP version not supported")]
    Version,
    #[error("syntax: {0}")]
    Syntax(String),
}

impl ParseError {
    /// The status and reason phrase a request that failed this way is answered with.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            ParseError::TooLarge => (513, "Message Too Large"),
            ParseError::NoHeaderEnd => (400, "Incomplete Message"),
            ParseError::BadHeaderLine => (400, "Bad Header Line"),
            ParseError::BadContentLength => (400, "Bad Content-Length"),
            ParseError::Truncated => (400, "Content-Length Exceeds Body"),
            ParseError::BadRequestLine => (400, "Bad Request-Line"),
            ParseError::Version => (505, "Version Not Supported"),
            ParseError::Syntax(_) => (400, "Bad Request"),
        }
    }
}

/// Parse one SIP message (a whole UDP datagram or one framed TCP message).
///
/// Before rsip sees the bytes we unfold continuation lines and expand compact header names
/// (`v:`, `f:`, `l:`...), which rsip 0.4 does not know; we also apply RFC 3261 §18.3: a body longer
/// than Content-Length is cut, a shorter one is an error.
pub fn parse(bytes: &[u8]) -> Result<SipMessage, ParseError> {
    if bytes.len() > MAX_MESSAGE_SIZE {
        return Err(ParseError::TooLarge);
    }
    let (head, body) = match find(bytes, b"\r\n\r\n") {
        Some(end) => (
            bytes.get(..end).ok_or(ParseError::NoHeaderEnd)?,
            bytes.get(end + 4..).unwrap_or_default(),
        ),
        // A datagram whose last header line lacks the blank line after it (RFC 4475's baddn,
        // inv2543): its end is the end of the headers, and it has no body.
        None => match bytes.strip_suffix(b"\r\n") {
            Some(head) if !head.is_empty() => (head, &[][..]),
            _ => return Err(ParseError::NoHeaderEnd),
        },
    };

    let mut lines = head.split(|&b| b == b'\n').map(strip_cr);
    let start = lines.next().ok_or(ParseError::NoHeaderEnd)?;
    if start.is_empty() || start.contains(&b'\r') {
        return Err(ParseError::BadHeaderLine);
    }
    let start = if start.starts_with(b"SIP/") {
        start.to_vec()
    } else {
        request_line(start)?
    };
    let headers = normalize_headers(lines)?;

    let mut content_length: Option<usize> = None;
    for (name, value) in &headers {
        if name.eq_ignore_ascii_case("Content-Length") {
            let n = parse_decimal(value).ok_or(ParseError::BadContentLength)?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err(ParseError::BadContentLength);
            }
            content_length = Some(n);
        }
    }
    let body = match content_length {
        Some(n) if n > body.len() => return Err(ParseError::Truncated),
        Some(n) => body.get(..n).unwrap_or_default(),
        None => body,
    };

    let mut buf = Vec::with_capacity(bytes.len() + 64);
    buf.extend_from_slice(&start);
    buf.extend_from_slice(b"\r\n");
    for (name, value) in &headers {
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(body);

    rsip_parse(&buf)
}

/// rsip's parser is nom-based and has shown no panics in our property test (10,000 mutated
/// messages) nor in the fuzz target; the `catch_unwind` is a last line of defence so that a parser
/// bug seen by one remote peer cannot take the whole SIP stack down.
fn rsip_parse(buf: &[u8]) -> Result<SipMessage, ParseError> {
    match std::panic::catch_unwind(|| SipMessage::try_from(buf)) {
        Ok(Ok(msg)) => Ok(msg),
        Ok(Err(e)) => Err(ParseError::Syntax(truncate(&e.to_string(), 200))),
        Err(_) => {
            tracing::error!("rsip panicked while parsing a message");
            Err(ParseError::Syntax("parser panic".into()))
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Strict decimal (digits only, surrounding whitespace allowed), no overflow.
pub(crate) fn parse_decimal(value: &str) -> Option<usize> {
    let v = value.trim();
    if v.is_empty() || v.len() > 9 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// Unfold continuation lines and expand compact names; values are trimmed UTF-8.
fn normalize_headers<'a>(
    lines: impl Iterator<Item = &'a [u8]>,
) -> Result<Vec<(String, String)>, ParseError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.iter().any(|&b| b == b'\r' || b == 0) {
            return Err(ParseError::BadHeaderLine);
        }
        let text = std::str::from_utf8(line).map_err(|_| ParseError::BadHeaderLine)?;
        if text.starts_with([' ', '\t']) {
            // RFC 3261 §7.3.1: a line starting with whitespace continues the previous header.
            let (_, value) = out.last_mut().ok_or(ParseError::BadHeaderLine)?;
            value.push(' ');
            value.push_str(text.trim());
            continue;
        }
        let (name, value) = text.split_once(':').ok_or(ParseError::BadHeaderLine)?;
        let name = name.trim_end();
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(ParseError::BadHeaderLine);
        }
        out.push((expand_compact(name).to_string(), value.trim().to_string()));
    }
    Ok(out)
}

/// RFC 3261 §25.1 `Method SP Request-URI SP SIP-Version`, exactly: single spaces, a token
/// method, a URI without spaces, quotes or angle brackets (RFC 4475's lwsstart, trws, lwsruri,
/// ltgtruri), version 2.0. rsip cannot read `;` in a SIP URI's user part (RFC 4475's semiuri), so
/// there it is escaped, which names the same user.
fn request_line(line: &[u8]) -> Result<Vec<u8>, ParseError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::BadRequestLine);
    };
    if method.is_empty() || !method.iter().copied().all(is_token_byte) {
        return Err(ParseError::BadRequestLine);
    }
    if !version.eq_ignore_ascii_case(b"SIP/2.0") {
        return Err(
            if version.len() > 4 && version[..4].eq_ignore_ascii_case(b"SIP/") {
                ParseError::Version
            } else {
                ParseError::BadRequestLine
            },
        );
    }
    if uri.is_empty()
        || uri
            .iter()
            .any(|&b| b.is_ascii_control() || b.is_ascii_whitespace() || b"<>\"".contains(&b))
    {
        return Err(ParseError::BadRequestLine);
    }
    let mut out = Vec::with_capacity(line.len() + 8);
    out.extend_from_slice(method);
    out.push(b' ');
    let is_sip = uri.len() > 4
        && (uri[..4].eq_ignore_ascii_case(b"sip:") || uri[..4].eq_ignore_ascii_case(b"sips"));
    let before_headers = uri.iter().position(|&b| b == b'?').unwrap_or(uri.len());
    match uri[..before_headers].iter().rposition(|&b| b == b'@') {
        Some(at) if is_sip => {
            let colon = uri.iter().position(|&b| b == b':').unwrap_or(0);
            for (i, &b) in uri.iter().enumerate() {
                if b == b';' && i > colon && i < at {
                    out.extend_from_slice(b"%3B");
                } else {
                    out.push(b);
                }
            }
        }
        _ => out.extend_from_slice(uri),
    }
    out.push(b' ');
    out.extend_from_slice(version);
    Ok(out)
}

pub(crate) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

/// RFC 3261 §7.3.3 compact forms (plus the common extension ones).
pub(crate) fn expand_compact(name: &str) -> &str {
    if name.len() != 1 {
        return name;
    }
    match name.as_bytes().first().map(u8::to_ascii_lowercase) {
        Some(b'v') => "Via",
        Some(b'f') => "From",
        Some(b't') => "To",
        Some(b'i') => "Call-ID",
        Some(b'm') => "Contact",
        Some(b'l') => "Content-Length",
        Some(b'c') => "Content-Type",
        Some(b'e') => "Content-Encoding",
        Some(b's') => "Subject",
        Some(b'k') => "Supported",
        Some(b'o') => "Event",
        Some(b'r') => "Refer-To",
        Some(b'u') => "Allow-Events",
        _ => name,
    }
}

/// Serialize a message, fixing Content-Length to the body's real length first (and giving a
/// response status its RFC reason phrase when it has none of its own).
pub fn to_bytes(msg: impl Into<SipMessage>) -> Vec<u8> {
    let mut msg = msg.into();
    if let SipMessage::Response(resp) = &mut msg
        && !matches!(resp.status_code, rsip::StatusCode::Other(..))
    {
        resp.status_code = status(resp.status_code.code(), None);
    }
    let len = u32::try_from(msg.body().len()).unwrap_or(u32::MAX);
    msg.headers_mut()
        .unique_push(Header::ContentLength(len.into()));
    msg.to_string().into_bytes()
}

/// Build a response to `req`: all Via headers, From, To (with `to_tag` added when the To has no
/// tag yet), Call-ID and CSeq are copied verbatim; Content-Length 0.
pub fn response_to(
    req: &Request,
    code: u16,
    reason: Option<&str>,
    to_tag: Option<&str>,
) -> Response {
    let mut headers = rsip::Headers::default();
    for h in req.headers.iter() {
        match h {
            Header::Via(_) | Header::From(_) | Header::CallId(_) | Header::CSeq(_) => {
                headers.push(h.clone())
            }
            Header::To(to) => {
                let value = match to_tag {
                    Some(tag) if header_param(to.value(), "tag").is_none() => {
                        format!("{};tag={}", to.value(), tag)
                    }
                    _ => to.value().to_string(),
                };
                headers.push(Header::To(rsip::headers::To::new(value)));
            }
            _ => {}
        }
    }
    headers.push(Header::Server(rsip::headers::Server::new(SERVER)));
    headers.push(Header::ContentLength(0u32.into()));
    Response {
        status_code: status(code, reason),
        version: rsip::Version::V2,
        headers,
        body: Vec::new(),
    }
}

/// rsip prints known status codes with its enum names ("486 BusyHere"), so every status we
/// build or send carries an explicit reason phrase instead.
fn status(code: u16, reason: Option<&str>) -> rsip::StatusCode {
    let reason = reason.unwrap_or_else(|| reason_phrase(code));
    rsip::StatusCode::Other(code, reason.to_string())
}

/// A received response's reason phrase as sent, for the ones rsip keeps ("486 User Busy Here"),
/// else the RFC's phrase: never rsip's enum name ("BusyHere"), so that what we received reads
/// like what we sent.
pub fn reason_of(status: &rsip::StatusCode) -> String {
    match status {
        rsip::StatusCode::Other(_, reason) => reason.clone(),
        known => reason_phrase(known.code()).to_owned(),
    }
}

/// The RFC 3261 §21 reason phrase (and a few from extensions) for a status code.
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        181 => "Call Is Being Forwarded",
        182 => "Queued",
        183 => "Session Progress",
        199 => "Early Dialog Terminated",
        200 => "OK",
        202 => "Accepted",
        204 => "No Notification",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Moved Temporarily",
        305 => "Use Proxy",
        380 => "Alternative Service",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        410 => "Gone",
        413 => "Request Entity Too Large",
        414 => "Request-URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        421 => "Extension Required",
        423 => "Interval Too Brief",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        484 => "Address Incomplete",
        485 => "Ambiguous",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        489 => "Bad Event",
        491 => "Request Pending",
        493 => "Undecipherable",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        505 => "Version Not Supported",
        513 => "Message Too Large",
        580 => "Precondition Failure",
        600 => "Busy Everywhere",
        603 => "Decline",
        604 => "Does Not Exist Anywhere",
        606 => "Not Acceptable",
        607 => "Unwanted",
        _ => match code / 100 {
            1 => "Provisional",
            2 => "Success",
            3 => "Redirection",
            4 => "Client Error",
            5 => "Server Error",
            _ => "Global Failure",
        },
    }
}

/// Set the body of a response, with Content-Type and Content-Length.
pub fn with_body(mut resp: Response, content_type: &str, body: Vec<u8>) -> Response {
    set_body(&mut resp.headers, &mut resp.body, content_type, body);
    resp
}

/// Set the body of a request, with Content-Type and Content-Length.
pub fn request_with_body(mut req: Request, content_type: &str, body: Vec<u8>) -> Request {
    set_body(&mut req.headers, &mut req.body, content_type, body);
    req
}

fn set_body(headers: &mut rsip::Headers, slot: &mut Vec<u8>, content_type: &str, body: Vec<u8>) {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    headers.unique_push(Header::ContentType(rsip::headers::ContentType::new(
        content_type,
    )));
    headers.unique_push(Header::ContentLength(len.into()));
    *slot = body;
}

/// The CANCEL for an INVITE we sent (RFC 3261 §9.1): same Request-URI, Call-ID, From, To, CSeq
/// number and Route, and only the INVITE's top Via, so it matches the INVITE's branch.
pub fn cancel_for(invite: &Request) -> Request {
    let mut headers = rsip::Headers::default();
    if let Ok(via) = invite.via_header() {
        headers.push(Header::Via(via.clone()));
    }
    headers.push(Header::MaxForwards(70u32.into()));
    for h in invite.headers.iter() {
        match h {
            Header::From(_) | Header::To(_) | Header::CallId(_) | Header::Route(_) => {
                headers.push(h.clone())
            }
            _ => {}
        }
    }
    let seq = cseq(invite).map_or(1, |(n, _)| n);
    headers.push(Header::CSeq(rsip::headers::CSeq::new(format!(
        "{seq} CANCEL"
    ))));
    headers.push(Header::ContentLength(0u32.into()));
    Request {
        method: Method::Cancel,
        uri: invite.uri.clone(),
        version: rsip::Version::V2,
        headers,
        body: Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Accessors. All return `None` on anything missing or malformed. They take a `SipMessage`, a
// `Request` or a `Response`.

pub fn call_id(msg: &impl HeadersExt) -> Option<String> {
    msg.call_id_header()
        .ok()
        .map(|h| h.value().trim().to_string())
        .filter(|s| !s.is_empty())
}

pub fn from_tag(msg: &impl HeadersExt) -> Option<String> {
    header_param(msg.from_header().ok()?.value(), "tag")
}

pub fn to_tag(msg: &impl HeadersExt) -> Option<String> {
    header_param(msg.to_header().ok()?.value(), "tag")
}

pub fn cseq(msg: &impl HeadersExt) -> Option<(u32, Method)> {
    parse_cseq(msg.cseq_header().ok()?.value())
}

pub(crate) fn parse_cseq(value: &str) -> Option<(u32, Method)> {
    let mut parts = value.split_ascii_whitespace();
    let num = parts.next()?;
    let method = parts.next()?;
    if parts.next().is_some() || num.len() > 10 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // RFC 3261 §8.1.1.5: the sequence number must fit in 32 bits.
    let num: u32 = num.parse().ok()?;
    let method: Method = method.parse().ok()?;
    Some((num, method))
}

/// The `branch` parameter of the topmost Via.
pub fn top_via_branch(msg: &impl HeadersExt) -> Option<String> {
    header_param(top_via_value(msg)?, "branch")
}

/// The first via-parm of the first Via header (a Via header may carry several, comma-separated).
pub(crate) fn top_via_value(msg: &impl HeadersExt) -> Option<&str> {
    let via = msg.via_header().ok()?.value();
    split_top_level(via, b',').into_iter().next()
}

/// `host[:port]` of the topmost Via, lowercased.
pub(crate) fn top_via_sent_by(msg: &impl HeadersExt) -> Option<String> {
    let via = top_via_value(msg)?;
    // "SIP/2.0/UDP host:port;params"
    let (_, rest) = via.trim().split_once(|c: char| c.is_ascii_whitespace())?;
    let sent_by = rest.trim_start().split(';').next()?.trim();
    if sent_by.is_empty() {
        return None;
    }
    Some(sent_by.to_ascii_lowercase())
}

/// The user part of the Request-URI.
pub fn request_user(req: &Request) -> Option<String> {
    req.uri.user().map(str::to_string).filter(|s| !s.is_empty())
}

/// The user part of the From URI.
pub fn from_user(msg: &impl HeadersExt) -> Option<String> {
    let uri = header_uri(msg.from_header().ok()?.value())?;
    uri.user().map(str::to_string).filter(|s| !s.is_empty())
}

/// The URI of the first Contact.
pub fn contact_uri(msg: &impl HeadersExt) -> Option<rsip::Uri> {
    let contact = msg.contact_header().ok()?.value();
    let first = split_top_level(contact, b',').into_iter().next()?;
    header_uri(first)
}

/// The URI of a name-addr or addr-spec header value (From, To, Contact, Route...). rsip's typed
/// headers reject some valid display names (e.g. quoted ones with `;` or `<`), so we cut the URI
/// out ourselves and let rsip parse only that.
pub fn header_uri(value: &str) -> Option<rsip::Uri> {
    let raw = match find_closing_angle(value) {
        Some(end) => {
            let open = value.get(..end)?.rfind('<')?;
            value.get(open + 1..end)?
        }
        None => value.split(';').next()?,
    };
    rsip::Uri::try_from(raw.trim()).ok()
}

pub fn max_forwards(req: &Request) -> Option<u32> {
    let v = req.max_forwards_header().ok()?.value().trim();
    if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// A `From`/`To` tag: 64 random bits in hex.
pub fn new_tag() -> String {
    hex::encode(random_bytes::<8>())
}

/// A Via branch with the RFC 3261 magic cookie.
pub fn new_branch() -> String {
    format!("z9hG4bK{}", hex::encode(random_bytes::<10>()))
}

/// A Call-ID: 128 random bits in hex.
pub fn new_call_id() -> String {
    hex::encode(random_bytes::<16>())
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    if getrandom::fill(&mut buf).is_err() {
        // The OS RNG failing is not something a SIP stack can fix; fall back to a
        // time-and-counter mix so tags stay unique within the process.
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let c = COUNTER.fetch_add(1, Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mix = (t ^ c.rotate_left(32)).to_le_bytes();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = mix[i % 8] ^ (i as u8);
        }
    }
    buf
}

pub(crate) fn random_u32() -> u32 {
    u32::from_le_bytes(random_bytes::<4>())
}

// ---------------------------------------------------------------------------------------------
// Small raw-text helpers: header values straight from the wire, so no re-printing by rsip.

/// Split on `sep` outside quoted strings and `<...>`.
pub(crate) fn split_top_level(value: &str, sep: u8) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut in_quote, mut in_angle, mut escaped) = (false, false, false);
    let mut start = 0;
    for (i, b) in value.bytes().enumerate() {
        if in_quote {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_quote = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_quote = true,
            b'<' => in_angle = true,
            b'>' => in_angle = false,
            _ if b == sep && !in_angle => {
                if let Some(p) = value.get(start..i) {
                    parts.push(p.trim());
                }
                start = i + 1;
            }
            _ => {}
        }
    }
    if let Some(p) = value.get(start..) {
        parts.push(p.trim());
    }
    parts.retain(|p| !p.is_empty());
    parts
}

/// A header parameter (`;name=value`) of a name-addr/addr-spec or Via value: params after the
/// `>` when there is one, else after the first `;`.
pub(crate) fn header_param(value: &str, name: &str) -> Option<String> {
    let params = match find_closing_angle(value) {
        Some(end) => value.get(end + 1..)?,
        None => value,
    };
    let mut it = split_top_level(params, b';').into_iter();
    if find_closing_angle(value).is_none() {
        // Without angle brackets the first segment is the URI (or Via sent-by) itself.
        it.next();
    } else {
        // After '>' the text starts with ';', so the first piece is the empty prefix (dropped).
    }
    for p in it {
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (p.trim(), None),
        };
        if k.eq_ignore_ascii_case(name) {
            return v
                .filter(|v| !v.is_empty())
                .map(|v| v.trim_matches('"').to_string());
        }
    }
    None
}

/// Byte index of the `>` closing the name-addr, skipping a quoted display name.
fn find_closing_angle(value: &str) -> Option<usize> {
    let (mut in_quote, mut escaped, mut open) = (false, false, false);
    for (i, b) in value.bytes().enumerate() {
        if in_quote {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_quote = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_quote = true,
            b'<' => open = true,
            b'>' if open => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:254700000001@10.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.2:5061;branch=z9hG4bK-1-0;rport\r\n\
Via: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKabc\r\n\
From: \"Alice; <x>\" <sip:alice@10.0.0.2:5061>;tag=abc;x=y\r\n\
To: <sip:254700000001@10.0.0.1:5060>\r\n\
Call-ID: 1-123@10.0.0.2\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:alice@10.0.0.2:5061;transport=udp>\r\n\
Max-Forwards: 70\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\r\nv=0\r\nEXTRA";

    #[test]
    fn received_reasons_read_like_sent_ones() {
        let busy = parse(b"SIP/2.0 486 User Busy Here\r\nContent-Length: 0\r\n\r\n");
        let Ok(rsip::SipMessage::Response(busy)) = busy else {
            panic!("a response: {busy:?}");
        };
        assert_eq!(reason_of(&busy.status_code), "Busy Here");
        let progress = rsip::StatusCode::SessionProgress;
        assert_eq!(reason_of(&progress), "Session Progress");
        let odd = rsip::StatusCode::Other(499, "Whatever It Said".into());
        assert_eq!(reason_of(&odd), "Whatever It Said");
    }

    #[test]
    fn parses_and_truncates_body_to_content_length() {
        let msg = parse(INVITE.as_bytes()).expect("parse");
        assert_eq!(msg.body(), b"v=0\r");
        assert_eq!(call_id(&msg).as_deref(), Some("1-123@10.0.0.2"));
        assert_eq!(from_tag(&msg).as_deref(), Some("abc"));
        assert_eq!(to_tag(&msg), None);
        assert_eq!(cseq(&msg), Some((1, Method::Invite)));
        assert_eq!(top_via_branch(&msg).as_deref(), Some("z9hG4bK-1-0"));
        assert_eq!(top_via_sent_by(&msg).as_deref(), Some("10.0.0.2:5061"));
        assert_eq!(from_user(&msg).as_deref(), Some("alice"));
        let SipMessage::Request(req) = &msg else {
            panic!("not a request")
        };
        assert_eq!(request_user(req).as_deref(), Some("254700000001"));
        assert_eq!(max_forwards(req), Some(70));
        let contact = contact_uri(&msg).expect("contact");
        assert_eq!(contact.user(), Some("alice"));
    }

    #[test]
    fn compact_and_folded_headers() {
        let text = "OPTIONS sip:a@b SIP/2.0\r\nv: SIP/2.0/UDP h;branch=z9hG4bKx\r\n\
f: <sip:x@y>\r\n ;tag=1\r\nt: <sip:a@b>\r\ni: cid\r\nCSeq: 7 OPTIONS\r\nl: 0\r\n\r\n";
        let msg = parse(text.as_bytes()).expect("parse");
        assert_eq!(from_tag(&msg).as_deref(), Some("1"));
        assert_eq!(call_id(&msg).as_deref(), Some("cid"));
        assert_eq!(top_via_branch(&msg).as_deref(), Some("z9hG4bKx"));
    }

    #[test]
    fn rejects_short_body_and_oversize() {
        let text = INVITE.replace("Content-Length: 4", "Content-Length: 400");
        assert_eq!(parse(text.as_bytes()), Err(ParseError::Truncated));
        let big = vec![b'a'; MAX_MESSAGE_SIZE + 1];
        assert_eq!(parse(&big), Err(ParseError::TooLarge));
        assert!(parse(b"garbage").is_err());
    }

    #[test]
    fn response_copies_headers_and_adds_tag() {
        let SipMessage::Request(req) = parse(INVITE.as_bytes()).expect("parse") else {
            panic!("not a request")
        };
        let resp = response_to(&req, 180, None, Some("t1"));
        let text = String::from_utf8(to_bytes(resp.clone())).expect("utf8");
        assert!(text.starts_with("SIP/2.0 180 Ringing\r\n"), "{text}");
        assert!(text.contains("Via: SIP/2.0/UDP 10.0.0.2:5061;branch=z9hG4bK-1-0;rport\r\n"));
        assert!(text.contains("Via: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKabc\r\n"));
        assert!(text.contains("To: <sip:254700000001@10.0.0.1:5060>;tag=t1\r\n"));
        assert!(text.contains("Content-Length: 0\r\n"));
        let back = parse(text.as_bytes()).expect("reparse");
        assert_eq!(to_tag(&back).as_deref(), Some("t1"));
        let resp = with_body(resp, "application/sdp", b"v=0\r\n".to_vec());
        let text = String::from_utf8(to_bytes(resp)).expect("utf8");
        assert!(text.contains("Content-Length: 5\r\n"));
        assert!(text.contains("Content-Type: application/sdp\r\n"));
        let custom = response_to(&req, 404, Some("No Such Number"), None);
        assert!(
            custom
                .to_string()
                .starts_with("SIP/2.0 404 No Such Number\r\n")
        );
    }

    #[test]
    fn cancel_matches_the_invite() {
        let SipMessage::Request(req) = parse(INVITE.as_bytes()).expect("parse") else {
            panic!("not a request")
        };
        let cancel = cancel_for(&req);
        assert_eq!(cancel.method, Method::Cancel);
        assert_eq!(top_via_branch(&cancel).as_deref(), Some("z9hG4bK-1-0"));
        assert_eq!(cseq(&cancel), Some((1, Method::Cancel)));
        assert_eq!(call_id(&cancel), call_id(&req));
        assert_eq!(from_tag(&cancel).as_deref(), Some("abc"));
        assert_eq!(
            cancel
                .headers
                .iter()
                .filter(|h| matches!(h, Header::Via(_)))
                .count(),
            1
        );
    }

    #[test]
    fn ids() {
        assert!(new_branch().starts_with("z9hG4bK"));
        assert_ne!(new_tag(), new_tag());
        assert_eq!(new_call_id().len(), 32);
    }

    #[test]
    fn header_params() {
        assert_eq!(
            header_param("<sip:a@b;tag=no>;tag=yes", "tag").as_deref(),
            Some("yes")
        );
        assert_eq!(header_param("sip:a@b;tag=x", "tag").as_deref(), Some("x"));
        assert_eq!(header_param("\"a>b\" <sip:a@b>", "tag"), None);
        assert_eq!(
            header_param("SIP/2.0/UDP h:5060;rport;branch=z9hG4bK1", "branch").as_deref(),
            Some("z9hG4bK1")
        );
        assert_eq!(parse_cseq("4294967296 INVITE"), None);
        assert_eq!(parse_cseq("4294967295 BYE"), Some((u32::MAX, Method::Bye)));
    }
}
