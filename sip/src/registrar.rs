//! RFC 3261 §10.3 registrar rules, sans-IO: what a REGISTER asks for, and how it changes the
//! bindings of its address of record. Authentication, storage and the flows to devices live with
//! the caller; this module only decides.

use rsip::prelude::*;
use rsip::{Header, Request};
use thiserror::Error;

use crate::message::{self, split_top_level};

/// Limits on bindings (RFC 3261 §10.2.1.1, §10.3 step 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingLimits {
    /// Used when neither the contact nor the request says.
    pub default_expires: u32,
    /// Longer requests are clamped to this.
    pub max_expires: u32,
    /// Shorter (non-zero) requests get `423 Interval Too Brief`.
    pub min_expires: u32,
    /// Contacts one address of record may hold.
    pub max_contacts: usize,
}

impl Default for BindingLimits {
    fn default() -> Self {
        BindingLimits {
            default_expires: 3600,
            max_expires: 3600,
            min_expires: 60,
            max_contacts: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RegisterError {
    #[error("Contact \"*\" must be alone")]
    StarWithOthers,
    #[error("Contact \"*\" needs Expires: 0")]
    StarNeedsExpiresZero,
    #[error("a Contact is not a SIP URI")]
    BadContact,
    #[error("malformed Expires")]
    BadExpires,
    #[error("missing or malformed Call-ID or CSeq")]
    BadHeaders,
    #[error("registration interval shorter than {min} s")]
    IntervalTooBrief { min: u32 },
    #[error("more than {max} contacts for one address of record")]
    TooManyContacts { max: usize },
}

impl RegisterError {
    /// The SIP status that answers the REGISTER.
    pub fn status(&self) -> u16 {
        match self {
            RegisterError::IntervalTooBrief { .. } => 423,
            RegisterError::TooManyContacts { .. } => 403,
            _ => 400,
        }
    }
}

/// One contact of a REGISTER: the URI as written between `<` and `>` (or bare), and its own
/// `expires` parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedContact {
    pub uri: String,
    pub expires: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContactSet {
    /// No Contact: a query for the current bindings.
    Query,
    /// `Contact: *` with `Expires: 0`.
    RemoveAll,
    Bind(Vec<RequestedContact>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterRequest {
    pub contacts: ContactSet,
    /// The `Expires` header.
    pub expires: Option<u32>,
    pub call_id: String,
    pub cseq: u32,
}

/// What the caller holds of a current binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingBinding {
    pub contact: String,
    pub call_id: String,
    pub cseq: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Add or refresh this contact for `expires` seconds.
    Bind {
        contact: String,
        expires: u32,
    },
    Unbind {
        contact: String,
    },
}

/// Read the parts of a REGISTER a registrar acts on. Validates every contact.
pub fn parse_register(req: &Request) -> Result<RegisterRequest, RegisterError> {
    let call_id = message::call_id(req).ok_or(RegisterError::BadHeaders)?;
    let (cseq, _) = message::cseq(req).ok_or(RegisterError::BadHeaders)?;
    let mut expires = None;
    let mut values = Vec::new();
    for h in req.headers.iter() {
        match h {
            Header::Contact(c) => values.extend(split_top_level(c.value(), b',')),
            Header::Expires(e) => {
                if expires.is_some() {
                    return Err(RegisterError::BadExpires);
                }
                expires = Some(parse_delta(e.value()).ok_or(RegisterError::BadExpires)?);
            }
            _ => {}
        }
    }
    let values: Vec<&str> = values.into_iter().filter(|v| !v.is_empty()).collect();
    let contacts = if values.is_empty() {
        ContactSet::Query
    } else if values.contains(&"*") {
        if values.len() > 1 {
            return Err(RegisterError::StarWithOthers);
        }
        if expires != Some(0) {
            return Err(RegisterError::StarNeedsExpiresZero);
        }
        ContactSet::RemoveAll
    } else {
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            out.push(parse_contact(v)?);
        }
        ContactSet::Bind(out)
    };
    Ok(RegisterRequest {
        contacts,
        expires,
        call_id,
        cseq,
    })
}

fn parse_contact(value: &str) -> Result<RequestedContact, RegisterError> {
    let (uri, params) = match (value.find('<'), value.rfind('>')) {
        (Some(open), Some(close)) if open < close => (
            value.get(open + 1..close).unwrap_or_default(),
            value.get(close + 1..).unwrap_or_default(),
        ),
        (None, None) => match value.split_once(';') {
            // An addr-spec's parameters belong to the header, not to the URI (§20.10).
            Some((uri, rest)) => (uri, rest),
            None => (value, ""),
        },
        _ => return Err(RegisterError::BadContact),
    };
    let uri = uri.trim();
    let parsed = rsip::Uri::try_from(uri).map_err(|_| RegisterError::BadContact)?;
    let scheme_ok = matches!(
        parsed.scheme,
        Some(rsip::Scheme::Sip) | Some(rsip::Scheme::Sips)
    );
    if !scheme_ok || uri.len() > 512 || uri.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(RegisterError::BadContact);
    }
    let mut expires = None;
    for p in split_top_level(params, b';') {
        if let Some((k, v)) = p.split_once('=')
            && k.trim().eq_ignore_ascii_case("expires")
        {
            expires =
                Some(parse_delta(v.trim().trim_matches('"')).ok_or(RegisterError::BadExpires)?);
        }
    }
    Ok(RequestedContact {
        uri: uri.to_string(),
        expires,
    })
}

/// A delta-seconds value; larger than 2^32-1 is taken as 2^32-1 (RFC 3261 §20.19 says so for
/// Expires, and any such value is clamped anyway).
fn parse_delta(v: &str) -> Option<u32> {
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        v.parse::<u64>()
            .map_or(u32::MAX, |n| u32::try_from(n).unwrap_or(u32::MAX)),
    )
}

/// Two contacts are the same binding when their URIs match ignoring ASCII case. (RFC 3261
/// §19.1.4 compares user parts case-sensitively; devices re-send their contact byte for byte,
/// so the looser rule only ever merges what is the same device.)
pub fn same_contact(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// How a REGISTER changes the bindings of its address of record (§10.3 steps 6-7).
///
/// A contact whose binding was made with the same Call-ID and a CSeq at least as high is left as
/// it is: the request is a late or replayed one. An empty plan changes nothing, and the caller
/// answers `200` with the bindings as they are.
pub fn plan(
    existing: &[ExistingBinding],
    req: &RegisterRequest,
    limits: &BindingLimits,
) -> Result<Vec<Change>, RegisterError> {
    let stale = |b: &ExistingBinding| b.call_id == req.call_id && req.cseq <= b.cseq;
    match &req.contacts {
        ContactSet::Query => Ok(Vec::new()),
        ContactSet::RemoveAll => Ok(existing
            .iter()
            .filter(|b| !stale(b))
            .map(|b| Change::Unbind {
                contact: b.contact.clone(),
            })
            .collect()),
        ContactSet::Bind(contacts) => {
            if contacts.len() > limits.max_contacts {
                return Err(RegisterError::TooManyContacts {
                    max: limits.max_contacts,
                });
            }
            let mut changes = Vec::with_capacity(contacts.len());
            for c in contacts {
                let requested = c.expires.or(req.expires).unwrap_or(limits.default_expires);
                if requested != 0 && requested < limits.min_expires {
                    return Err(RegisterError::IntervalTooBrief {
                        min: limits.min_expires,
                    });
                }
                let current = existing.iter().find(|b| same_contact(&b.contact, &c.uri));
                if current.is_some_and(stale) {
                    continue;
                }
                let contact = current.map_or_else(|| c.uri.clone(), |b| b.contact.clone());
                if changes.iter().any(|ch| match ch {
                    Change::Bind { contact: x, .. } | Change::Unbind { contact: x } => {
                        same_contact(x, &contact)
                    }
                }) {
                    continue;
                }
                changes.push(if requested == 0 {
                    Change::Unbind { contact }
                } else {
                    Change::Bind {
                        contact,
                        expires: requested.min(limits.max_expires),
                    }
                });
            }
            let kept = existing
                .iter()
                .filter(|b| {
                    !changes.iter().any(|ch| match ch {
                        Change::Unbind { contact } | Change::Bind { contact, .. } => {
                            same_contact(contact, &b.contact)
                        }
                    })
                })
                .count();
            let bound = changes
                .iter()
                .filter(|ch| matches!(ch, Change::Bind { .. }))
                .count();
            if kept + bound > limits.max_contacts {
                return Err(RegisterError::TooManyContacts {
                    max: limits.max_contacts,
                });
            }
            Ok(changes)
        }
    }
}

/// An out-of-dialog OPTIONS to a registered device, sent to the flow its REGISTER came on to
/// learn whether it (and the NAT binding in front of it) is still there.
pub fn keepalive_options(
    contact: &str,
    from_domain: &str,
    via_host: &str,
    via_port: u16,
    transport: crate::transaction::Transport,
) -> Option<Request> {
    let uri = rsip::Uri::try_from(contact).ok()?;
    let host = if via_host.contains(':') && !via_host.starts_with('[') {
        format!("[{via_host}]")
    } else {
        via_host.to_string()
    };
    let mut headers = rsip::Headers::default();
    headers.push(Header::Via(rsip::headers::Via::new(format!(
        "SIP/2.0/{} {host}:{via_port};branch={};rport",
        transport.via_token(),
        message::new_branch()
    ))));
    headers.push(Header::MaxForwards(70u32.into()));
    headers.push(Header::From(rsip::headers::From::new(format!(
        "<sip:keepalive@{from_domain}>;tag={}",
        message::new_tag()
    ))));
    headers.push(Header::To(rsip::headers::To::new(format!("<{contact}>"))));
    headers.push(Header::CallId(rsip::headers::CallId::new(
        message::new_call_id(),
    )));
    headers.push(Header::CSeq(rsip::headers::CSeq::new("1 OPTIONS")));
    headers.push(Header::UserAgent(rsip::headers::UserAgent::new(
        message::SERVER,
    )));
    headers.push(Header::ContentLength(0u32.into()));
    Some(Request {
        method: rsip::Method::Options,
        uri,
        version: rsip::Version::V2,
        headers,
        body: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(extra: &str) -> Request {
        let text = format!(
            "REGISTER sip:example.com SIP/2.0\r\n\
             Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKabc\r\n\
             From: <sip:ts_1@example.com>;tag=1\r\n\
             To: <sip:ts_1@example.com>\r\n\
             Call-ID: reg-1\r\n\
             CSeq: 5 REGISTER\r\n\
             Max-Forwards: 70\r\n\
             {extra}\
             Content-Length: 0\r\n\r\n"
        );
        match message::parse(text.as_bytes()) {
            Ok(rsip::SipMessage::Request(r)) => r,
            other => panic!("test REGISTER did not parse: {other:?}"),
        }
    }

    fn binding(contact: &str, call_id: &str, cseq: u32) -> ExistingBinding {
        ExistingBinding {
            contact: contact.into(),
            call_id: call_id.into(),
            cseq,
        }
    }

    #[test]
    fn contacts_and_expires_are_read() {
        let r = parse_register(&register(
            "Contact: \"Desk\" <sip:ts_1@10.0.0.2:5060;transport=udp>;expires=120, <sip:ts_1@10.0.0.3>\r\nExpires: 600\r\n",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.expires, Some(600));
        assert_eq!(r.cseq, 5);
        assert_eq!(
            r.contacts,
            ContactSet::Bind(vec![
                RequestedContact {
                    uri: "sip:ts_1@10.0.0.2:5060;transport=udp".into(),
                    expires: Some(120)
                },
                RequestedContact {
                    uri: "sip:ts_1@10.0.0.3".into(),
                    expires: None
                },
            ])
        );
    }

    #[test]
    fn star_rules() {
        let r = parse_register(&register("Contact: *\r\nExpires: 0\r\n"));
        assert_eq!(r.map(|r| r.contacts), Ok(ContactSet::RemoveAll));
        assert_eq!(
            parse_register(&register("Contact: *\r\n")),
            Err(RegisterError::StarNeedsExpiresZero)
        );
        assert_eq!(
            parse_register(&register("Contact: *, <sip:a@b>\r\nExpires: 0\r\n")),
            Err(RegisterError::StarWithOthers)
        );
    }

    #[test]
    fn bad_contacts_are_refused() {
        for c in [
            "Contact: not a uri\r\n",
            "Contact: <http://example.com/>\r\n",
            "Contact: <sip:a@b\r\n",
            "Contact: <sip:a@b>;expires=soon\r\n",
        ] {
            let r = parse_register(&register(c));
            assert!(r.is_err(), "{c:?} was accepted: {r:?}");
            assert_eq!(r.map_err(|e| e.status()).err(), Some(400));
        }
        assert_eq!(
            parse_register(&register("Expires: -1\r\n")),
            Err(RegisterError::BadExpires)
        );
    }

    #[test]
    fn a_query_changes_nothing() {
        let r = parse_register(&register("")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.contacts, ContactSet::Query);
        assert_eq!(
            plan(&[binding("sip:a@b", "x", 1)], &r, &BindingLimits::default()),
            Ok(vec![])
        );
    }

    #[test]
    fn expiry_is_defaulted_clamped_and_bounded_below() {
        let limits = BindingLimits::default();
        let p = |extra: &str| {
            let r = parse_register(&register(extra)).unwrap_or_else(|e| panic!("{e}"));
            plan(&[], &r, &limits)
        };
        assert_eq!(
            p("Contact: <sip:a@b>\r\n"),
            Ok(vec![Change::Bind {
                contact: "sip:a@b".into(),
                expires: 3600
            }])
        );
        assert_eq!(
            p("Contact: <sip:a@b>\r\nExpires: 86400\r\n"),
            Ok(vec![Change::Bind {
                contact: "sip:a@b".into(),
                expires: 3600
            }])
        );
        assert_eq!(
            p("Contact: <sip:a@b>;expires=300\r\nExpires: 86400\r\n"),
            Ok(vec![Change::Bind {
                contact: "sip:a@b".into(),
                expires: 300
            }])
        );
        assert_eq!(
            p("Contact: <sip:a@b>\r\nExpires: 10\r\n"),
            Err(RegisterError::IntervalTooBrief { min: 60 })
        );
        assert_eq!(
            p("Contact: <sip:a@b>\r\nExpires: 0\r\n"),
            Ok(vec![Change::Unbind {
                contact: "sip:a@b".into()
            }])
        );
    }

    #[test]
    fn same_call_id_with_a_lower_cseq_is_ignored() {
        let limits = BindingLimits::default();
        let r =
            parse_register(&register("Contact: <sip:a@b>\r\n")).unwrap_or_else(|e| panic!("{e}"));
        // Our request has CSeq 5.
        assert_eq!(
            plan(&[binding("sip:a@b", "reg-1", 7)], &r, &limits),
            Ok(vec![])
        );
        assert_eq!(
            plan(&[binding("sip:a@b", "reg-1", 5)], &r, &limits),
            Ok(vec![])
        );
        assert_eq!(
            plan(&[binding("SIP:A@B", "reg-1", 4)], &r, &limits),
            Ok(vec![Change::Bind {
                contact: "SIP:A@B".into(),
                expires: 3600
            }])
        );
        // Another Call-ID (a rebooted device) always updates.
        assert_eq!(
            plan(&[binding("sip:a@b", "other", 9)], &r, &limits).map(|c| c.len()),
            Ok(1)
        );
    }

    #[test]
    fn remove_all_spares_newer_bindings_of_the_same_call_id() {
        let r = parse_register(&register("Contact: *\r\nExpires: 0\r\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        let existing = [
            binding("sip:a@b", "other", 1),
            binding("sip:c@d", "reg-1", 9),
        ];
        assert_eq!(
            plan(&existing, &r, &BindingLimits::default()),
            Ok(vec![Change::Unbind {
                contact: "sip:a@b".into()
            }])
        );
    }

    #[test]
    fn at_most_ten_contacts() {
        let limits = BindingLimits::default();
        let many: String = (0..11)
            .map(|i| format!("Contact: <sip:d{i}@10.0.0.{i}>\r\n"))
            .collect();
        let r = parse_register(&register(&many)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            plan(&[], &r, &limits),
            Err(RegisterError::TooManyContacts { max: 10 })
        );
        let existing: Vec<_> = (0..10)
            .map(|i| binding(&format!("sip:x{i}@h"), "o", 1))
            .collect();
        let one =
            parse_register(&register("Contact: <sip:new@h>\r\n")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            plan(&existing, &one, &limits).map_err(|e| e.status()),
            Err(403)
        );
        // Refreshing one of the ten is fine.
        let refresh =
            parse_register(&register("Contact: <sip:x3@h>\r\n")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plan(&existing, &refresh, &limits).map(|c| c.len()), Ok(1));
    }

    #[test]
    fn keepalive_is_a_well_formed_options() {
        let req = keepalive_options(
            "sip:ts_1@192.168.1.20:5062;transport=udp",
            "sip.example.com",
            "127.0.0.1",
            5060,
            crate::transaction::Transport::Udp,
        )
        .unwrap_or_else(|| panic!("no request"));
        let text = String::from_utf8(message::to_bytes(req)).unwrap_or_default();
        // rsip prints the transport parameter in capitals; its value is case-insensitive.
        assert!(
            text.to_ascii_lowercase()
                .starts_with("options sip:ts_1@192.168.1.20:5062;transport=udp sip/2.0\r\n"),
            "{text}"
        );
        let back = message::parse(text.as_bytes());
        assert!(matches!(back, Ok(rsip::SipMessage::Request(_))), "{text}");
        assert!(
            message::top_via_branch(&match back {
                Ok(rsip::SipMessage::Request(r)) => r,
                _ => unreachable!(),
            })
            .is_some_and(|b| b.starts_with("z9hG4bK"))
        );
    }
}
