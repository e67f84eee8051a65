//! What a UAS checks of a request before it acts on it.
//!
//! - [`malformed`]: a request rsip parsed but RFC 3261's grammar refuses (a mandatory header
//!   field missing, a single-valued one repeated, a name-addr with an unbalanced quote or spaces
//!   inside its `<>`, empty parameters). rsip is lenient about these, so they are checked here
//!   and answered `400` with a reason phrase naming the header field.
//! - [`refusal`]: RFC 3261 §8.2's checks, in its order: the method (`405` with `Allow`, or
//!   `501`), the Request-URI scheme (`416`), `Require` (`420` with `Unsupported`), the body
//!   (`415` with `Accept`, `Accept-Encoding` and `Accept-Language`), then what an INVITE's
//!   `Accept` leaves us to answer with (`406`).

use rsip::prelude::UntypedHeader;
use rsip::{Header, Method, Request};

/// Methods we answer; the rest get `405` (known) or `501` (unknown) with this list.
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, REGISTER";

/// Methods of RFC 3261 and its extensions that we know and do not take.
const KNOWN_UNSUPPORTED: &[&str] = &[
    "SUBSCRIBE",
    "NOTIFY",
    "MESSAGE",
    "REFER",
    "PUBLISH",
    "PRACK",
    "UPDATE",
];

/// Option tags we support: none, so any `Require` gets `420`.
const SUPPORTED: &[&str] = &[];

/// Why a request is refused, and the header fields that tell the sender what we take instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub headers: Vec<(&'static str, String)>,
}

impl Refusal {
    fn new(code: u16) -> Self {
        Refusal {
            code,
            headers: Vec::new(),
        }
    }

    fn with(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// `405` or `501` for a method we do not take, by its name; `None` for one we do.
pub fn method_refusal(method: &str) -> Option<Refusal> {
    let allowed = ALLOW.split(", ").any(|m| m == method);
    if allowed {
        return None;
    }
    let code = if KNOWN_UNSUPPORTED.contains(&method) {
        405
    } else {
        501
    };
    Some(Refusal::new(code).with("Allow", ALLOW))
}

/// RFC 3261 §8.2 for a request that is not an ACK or a CANCEL (those are never refused).
pub fn refusal(req: &Request) -> Option<Refusal> {
    if let Some(r) = method_refusal(&req.method.to_string()) {
        return Some(r);
    }
    // §8.2.2.1: we have no TLS listener, so `sips:` is as foreign to us as `tel:`.
    if !matches!(req.uri.scheme, Some(rsip::Scheme::Sip)) {
        return Some(Refusal::new(416));
    }
    let unsupported: Vec<&str> = headers_named(req, "Require")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !SUPPORTED.iter().any(|s| s.eq_ignore_ascii_case(t)))
        .collect();
    if !unsupported.is_empty() {
        return Some(Refusal::new(420).with("Unsupported", unsupported.join(", ")));
    }
    let accepted = accepted_bodies(&req.method);
    if !req.body.is_empty() {
        let content_type = headers_named(req, "Content-Type")
            .next()
            .map(media_type)
            .unwrap_or_default();
        let encoded = headers_named(req, "Content-Encoding")
            .flat_map(|v| v.split(','))
            .any(|e| !e.trim().eq_ignore_ascii_case("identity"));
        if encoded || !accepted.contains(&content_type.as_str()) {
            let accept = if accepted.is_empty() {
                "application/sdp".to_owned()
            } else {
                accepted.join(", ")
            };
            return Some(
                Refusal::new(415)
                    .with("Accept", accept)
                    .with("Accept-Encoding", "identity")
                    .with("Accept-Language", "en"),
            );
        }
    }
    // Our answer to an INVITE carries SDP: an Accept without it leaves us nothing to send.
    if req.method == Method::Invite {
        let mut ranges = headers_named(req, "Accept")
            .flat_map(|v| v.split(','))
            .map(media_type)
            .peekable();
        if ranges.peek().is_some()
            && !ranges.any(|r| r == "application/sdp" || r == "application/*" || r == "*/*")
        {
            return Some(Refusal::new(406).with("Accept", "application/sdp"));
        }
    }
    None
}

/// The body types a method of ours reads.
fn accepted_bodies(method: &Method) -> &'static [&'static str] {
    match method {
        Method::Invite | Method::Ack => &["application/sdp"],
        Method::Info => &["application/dtmf-relay", "application/dtmf"],
        _ => &[],
    }
}

/// `type/subtype` of a media type or range, lower case, without parameters.
fn media_type(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// The raw values of the header fields called `name` (its compact form is expanded on parsing).
fn headers_named<'a>(req: &'a Request, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    req.headers.iter().filter_map(move |h| {
        let (n, v) = raw(h)?;
        n.eq_ignore_ascii_case(name).then_some(v)
    })
}

/// A header field's name and raw value, for the fields these checks read.
fn raw(h: &Header) -> Option<(&str, &str)> {
    Some(match h {
        Header::Via(v) => ("Via", v.value()),
        Header::From(v) => ("From", v.value()),
        Header::To(v) => ("To", v.value()),
        Header::CallId(v) => ("Call-ID", v.value()),
        Header::CSeq(v) => ("CSeq", v.value()),
        Header::MaxForwards(v) => ("Max-Forwards", v.value()),
        Header::Contact(v) => ("Contact", v.value()),
        Header::ContentType(v) => ("Content-Type", v.value()),
        Header::ContentEncoding(v) => ("Content-Encoding", v.value()),
        Header::Require(v) => ("Require", v.value()),
        Header::Accept(v) => ("Accept", v.value()),
        Header::Other(n, v) => (n.as_str(), v.as_str()),
        _ => return None,
    })
}

/// Why a request that parsed is not a well-formed request: the reason phrase of its `400`.
pub fn malformed(req: &Request) -> Option<&'static str> {
    const MANDATORY: [(&str, &str, &str); 5] = [
        ("Via", "Missing Via", "Bad Via"),
        ("From", "Missing From", "Duplicate From"),
        ("To", "Missing To", "Duplicate To"),
        ("Call-ID", "Missing Call-ID", "Duplicate Call-ID"),
        ("CSeq", "Missing CSeq", "Duplicate CSeq"),
    ];
    for (name, missing, repeated) in MANDATORY {
        let n = headers_named(req, name).count();
        if n == 0 {
            return Some(missing);
        }
        if n > 1 && name != "Via" {
            return Some(repeated);
        }
    }
    for (name, repeated) in [
        ("Max-Forwards", "Duplicate Max-Forwards"),
        ("Content-Type", "Duplicate Content-Type"),
    ] {
        if headers_named(req, name).count() > 1 {
            return Some(repeated);
        }
    }
    if headers_named(req, "Via").any(|v| !good_via(v)) {
        return Some("Bad Via");
    }
    if headers_named(req, "From").any(|v| !good_name_addr(v)) {
        return Some("Bad From");
    }
    if headers_named(req, "To").any(|v| !good_name_addr(v)) {
        return Some("Bad To");
    }
    let contacts_ok = headers_named(req, "Contact")
        .all(|v| v.trim() == "*" || split_outside(v, b',').iter().all(|c| good_name_addr(c)));
    if !contacts_ok {
        return Some("Bad Contact");
    }
    None
}

/// `value` split at `sep` where it is outside quotes and `<>`.
fn split_outside(value: &str, sep: u8) -> Vec<&str> {
    let bytes = value.as_bytes();
    let (mut out, mut start, mut quoted, mut angle, mut escaped) =
        (Vec::new(), 0, false, false, false);
    for (i, &b) in bytes.iter().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if quoted => escaped = true,
            b'"' if !angle => quoted = !quoted,
            b'<' if !quoted => angle = true,
            b'>' if !quoted => angle = false,
            _ if b == sep && !quoted && !angle => {
                out.push(value.get(start..i).unwrap_or_default());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(value.get(start..).unwrap_or_default());
    out
}

/// Each comma-separated value: `SIP/2.0/transport host` with non-empty parameters.
fn good_via(value: &str) -> bool {
    split_outside(value, b',').iter().all(|v| {
        let mut parts = v.split(';');
        let sent = parts.next().unwrap_or_default().trim();
        let protocol: String = sent.chars().filter(|c| !c.is_whitespace()).collect();
        protocol.to_ascii_uppercase().starts_with("SIP/") && parts.all(|p| !p.trim().is_empty())
    })
}

/// RFC 3261 §20.10: `[display-name] <URI> *(;param)` or `addr-spec *(;param)`, where an
/// addr-spec has no `?`, `,` or `;` of its own and a display name is a quoted string or tokens.
fn good_name_addr(value: &str) -> bool {
    let value = value.trim();
    let bytes = value.as_bytes();
    // The end of the name-addr or addr-spec: after `>`, or at the first `;` of an addr-spec.
    let (mut quoted, mut escaped, mut uri_end) = (false, false, None);
    let mut open = None;
    for (i, &b) in bytes.iter().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match b {
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'<' if !quoted && open.is_none() => open = Some(i),
            b'>' if !quoted && open.is_some() => {
                uri_end = Some(i + 1);
                break;
            }
            _ => {}
        }
    }
    if quoted || escaped {
        return false;
    }
    let (addr, params) = match (open, uri_end) {
        (Some(o), Some(e)) => {
            let display = value.get(..o).unwrap_or_default().trim();
            let inner = value.get(o + 1..e - 1).unwrap_or_default();
            if inner.is_empty() || inner.bytes().any(|b| b.is_ascii_whitespace()) {
                return false;
            }
            if !good_display_name(display) {
                return false;
            }
            (inner, value.get(e..).unwrap_or_default())
        }
        (Some(_), None) => return false,
        (None, _) => {
            let end = value.find(';').unwrap_or(value.len());
            let spec = value.get(..end).unwrap_or_default().trim();
            if spec.is_empty()
                || spec.contains(['?', ',', '"', '>'])
                || spec.bytes().any(|b| b.is_ascii_whitespace())
            {
                return false;
            }
            (spec, value.get(end..).unwrap_or_default())
        }
    };
    if !addr.contains(':') {
        return false;
    }
    let params = params.trim();
    if params.is_empty() {
        return true;
    }
    params.starts_with(';') && params.split(';').skip(1).all(|p| !p.trim().is_empty())
}

/// Empty, one quoted string, or tokens separated by whitespace.
fn good_display_name(display: &str) -> bool {
    if display.is_empty() {
        return true;
    }
    if let Some(inner) = display.strip_prefix('"') {
        return inner.ends_with('"');
    }
    display
        .split_ascii_whitespace()
        .all(|t| t.bytes().all(crate::message::is_token_byte))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Request {
        match crate::message::parse(text.replace('\n', "\r\n").as_bytes()) {
            Ok(rsip::SipMessage::Request(r)) => r,
            other => panic!("not a request: {other:?}"),
        }
    }

    const HEAD: &str = "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\nFrom: <sip:a@example.com>;tag=1\nTo: <sip:b@example.com>\nCall-ID: x\n";

    fn options(extra: &str, cseq: &str) -> Request {
        request(&format!(
            "OPTIONS sip:b@example.com SIP/2.0\n{HEAD}CSeq: 1 {cseq}\n{extra}Content-Length: 0\n\n"
        ))
    }

    #[test]
    fn name_addrs() {
        for good in [
            "<sip:a@b>",
            "\"A \\\"B\\\"\" <sip:a@b> ; tag = 1",
            "Alice Smith <sip:a@b>;tag=2",
            "sip:a@b;tag=3",
            "<sip:a@b?Route=%3Csip:c%3E>",
            "isbn:2983792873",
        ] {
            assert!(good_name_addr(good), "{good}");
        }
        for bad in [
            "\"Mr. J. User <sip:j.user@example.com>",
            "\"Watson, Thomas\" < sip:t.watson@example.org >",
            "Bell, Alexander <sip:a.g.bell@example.com>;tag=43",
            "sip:user@example.com?Route=%3Csip:sip.example.com%3E",
            "\"Joe\" <sip:joe@example.org>;;;;",
            "<sip:a@b",
            "",
        ] {
            assert!(!good_name_addr(bad), "{bad}");
        }
        assert!(good_via(
            "SIP  / 2.0  / TCP spindle.example.com ; branch = z9hG4bK9, SIP/2.0/UDP 192.0.2.1"
        ));
        assert!(!good_via("SIP/2.0/UDP 192.0.2.15;;,;,,"));
    }

    #[test]
    fn mandatory_and_single_valued_fields() {
        assert_eq!(malformed(&options("", "OPTIONS")), None);
        let twice = request(&format!(
            "OPTIONS sip:b@example.com SIP/2.0\n{HEAD}Call-ID: y\nCSeq: 1 OPTIONS\nContent-Length: 0\n\n"
        ));
        assert_eq!(malformed(&twice), Some("Duplicate Call-ID"));
        let none = request(
            "OPTIONS sip:b@example.com SIP/2.0\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\nCSeq: 1 OPTIONS\nContent-Length: 0\n\n",
        );
        assert_eq!(malformed(&none), Some("Missing From"));
    }

    /// RFC 3261 §8.2's order: each request fails two checks and gets the earlier one's answer.
    #[test]
    fn checks_run_in_the_rfc_order() {
        let code = |r: &Request| refusal(r).map(|r| r.code);
        // Method before scheme.
        let r = request(&format!(
            "SUBSCRIBE sips:b@example.com SIP/2.0\n{HEAD}CSeq: 1 SUBSCRIBE\nRequire: foo\nContent-Length: 0\n\n"
        ));
        assert_eq!(code(&r), Some(405));
        // Scheme before Require.
        let r = request(&format!(
            "OPTIONS sips:b@example.com SIP/2.0\n{HEAD}CSeq: 1 OPTIONS\nRequire: foo\nContent-Length: 0\n\n"
        ));
        assert_eq!(code(&r), Some(416));
        // Require before the body.
        let r = request(&format!(
            "INVITE sip:b@example.com SIP/2.0\n{HEAD}CSeq: 1 INVITE\nRequire: foo, bar\nContent-Type: text/plain\nContent-Length: 2\n\nhi"
        ));
        let refused = refusal(&r).expect("refused");
        assert_eq!(refused.code, 420);
        assert_eq!(
            refused.headers,
            vec![("Unsupported", "foo, bar".to_owned())]
        );
        // The body before Accept.
        let r = request(&format!(
            "INVITE sip:b@example.com SIP/2.0\n{HEAD}CSeq: 1 INVITE\nAccept: text/x\nContent-Type: text/plain\nContent-Length: 2\n\nhi"
        ));
        let refused = refusal(&r).expect("refused");
        assert_eq!(refused.code, 415);
        assert!(
            refused
                .headers
                .contains(&("Accept", "application/sdp".to_owned()))
        );
        assert!(
            refused
                .headers
                .contains(&("Accept-Encoding", "identity".to_owned()))
        );
        assert!(
            refused
                .headers
                .contains(&("Accept-Language", "en".to_owned()))
        );
        let r = request(&format!(
            "INVITE sip:b@example.com SIP/2.0\n{HEAD}CSeq: 1 INVITE\nAccept: text/x\nContent-Length: 0\n\n"
        ));
        assert_eq!(code(&r), Some(406));
        // An encoded body is refused like an unknown type.
        let r = request(&format!(
            "INVITE sip:b@example.com SIP/2.0\n{HEAD}CSeq: 1 INVITE\nContent-Type: application/sdp\nContent-Encoding: gzip\nContent-Length: 2\n\nhi"
        ));
        assert_eq!(code(&r), Some(415));
        // What we take passes.
        assert_eq!(code(&options("Accept: application/sdp\n", "OPTIONS")), None);
        let r = request(&format!(
            "INFO sip:b@example.com SIP/2.0\n{HEAD}CSeq: 1 INFO\nContent-Type: application/dtmf-relay\nContent-Length: 18\n\nSignal=5\nDuration=1"
        ));
        assert_eq!(code(&r), None);
        // An unknown method is 501 with Allow.
        assert_eq!(method_refusal("FOO").map(|r| r.code), Some(501));
    }
}
