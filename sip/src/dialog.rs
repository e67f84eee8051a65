//! SIP dialogs (RFC 3261 §12): the state two user agents share after a 2xx to an INVITE, and the
//! in-dialog requests built from it.
//!
//! From/To values and route entries are kept as the raw text received, so what we send back is
//! byte-for-byte what the peer (and any proxy on the route) gave us; rsip is used only to read
//! URIs out of them.

use crate::message::{self, header_param, header_uri, split_top_level};
use crate::transaction::Transport;
use rsip::prelude::*;
use rsip::{Header, Method, Request};
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DialogError {
    #[error("request is not an INVITE")]
    NotInvite,
    #[error("missing or malformed {0}")]
    Missing(&'static str),
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CSeqError {
    #[error("CSeq {got} is lower than the last one seen ({last})")]
    OutOfOrder { got: u32, last: u32 },
    #[error("missing or malformed CSeq")]
    Malformed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dialog {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: String,
    /// Our address-of-record (the To of the INVITE we received, the From of one we sent).
    pub local_uri: rsip::Uri,
    pub remote_uri: rsip::Uri,
    /// Where in-dialog requests go: the peer's Contact.
    pub remote_target: rsip::Uri,
    /// Record-Route entries as raw `<uri;params>` text, in the order requests must follow.
    pub route_set: Vec<String>,
    /// Highest CSeq seen from the peer.
    pub remote_cseq: u32,
    /// CSeq of the last request we sent in this dialog.
    pub local_cseq: u32,
    pub local_contact: rsip::Uri,
    /// Raw header values used to build our requests: our From, and their To.
    local_header: String,
    remote_header: String,
}

impl Dialog {
    /// The dialog a UAS creates when it answers `invite` with a 2xx carrying `local_tag`.
    pub fn uas(
        invite: &Request,
        local_tag: &str,
        local_contact: rsip::Uri,
    ) -> Result<Dialog, DialogError> {
        if invite.method != Method::Invite {
            return Err(DialogError::NotInvite);
        }
        let msg = invite;
        let call_id = message::call_id(msg).ok_or(DialogError::Missing("Call-ID"))?;
        let from = invite
            .from_header()
            .map_err(|_| DialogError::Missing("From"))?;
        let to = invite.to_header().map_err(|_| DialogError::Missing("To"))?;
        let remote_tag = message::from_tag(msg).ok_or(DialogError::Missing("From tag"))?;
        let remote_uri = header_uri(from.value()).ok_or(DialogError::Missing("From"))?;
        let local_uri = header_uri(to.value()).ok_or(DialogError::Missing("To"))?;
        let remote_target = message::contact_uri(msg).ok_or(DialogError::Missing("Contact"))?;
        let (remote_cseq, _) = message::cseq(msg).ok_or(DialogError::Missing("CSeq"))?;
        let local_header = match header_param(to.value(), "tag") {
            Some(_) => to.value().to_string(),
            None => format!("{};tag={local_tag}", to.value()),
        };
        Ok(Dialog {
            call_id,
            local_tag: local_tag.to_string(),
            remote_tag,
            local_uri,
            remote_uri,
            remote_target,
            // RFC 3261 §12.1.1: the UAS keeps Record-Route in received order.
            route_set: record_routes(invite),
            remote_cseq,
            // RFC 3261 §8.1.1.5: our first CSeq is arbitrary but below 2^31.
            local_cseq: message::random_u32() % 0x10000 + 1,
            local_contact,
            local_header,
            remote_header: from.value().to_string(),
        })
    }

    /// The dialog a UAC creates from the INVITE it sent and a 2xx it received.
    pub fn uac(invite: &Request, response: &rsip::Response) -> Result<Dialog, DialogError> {
        if invite.method != Method::Invite {
            return Err(DialogError::NotInvite);
        }
        let (req, resp) = (invite, response);
        let call_id = message::call_id(req).ok_or(DialogError::Missing("Call-ID"))?;
        let from = invite
            .from_header()
            .map_err(|_| DialogError::Missing("From"))?;
        let to = response
            .to_header()
            .map_err(|_| DialogError::Missing("To"))?;
        let local_tag = message::from_tag(req).ok_or(DialogError::Missing("From tag"))?;
        let remote_tag = message::to_tag(resp).ok_or(DialogError::Missing("To tag"))?;
        let local_uri = header_uri(from.value()).ok_or(DialogError::Missing("From"))?;
        let remote_uri = header_uri(to.value()).ok_or(DialogError::Missing("To"))?;
        let remote_target = message::contact_uri(resp).ok_or(DialogError::Missing("Contact"))?;
        let local_contact = message::contact_uri(req).ok_or(DialogError::Missing("Contact"))?;
        let (local_cseq, _) = message::cseq(req).ok_or(DialogError::Missing("CSeq"))?;
        let mut route_set = record_routes(response);
        // RFC 3261 §12.1.2: the UAC reverses the Record-Route of the response.
        route_set.reverse();
        Ok(Dialog {
            call_id,
            local_tag,
            remote_tag,
            local_uri,
            remote_uri,
            remote_target,
            route_set,
            remote_cseq: 0,
            local_cseq,
            local_contact,
            local_header: from.value().to_string(),
            remote_header: to.value().to_string(),
        })
    }

    /// Whether `req` belongs to this dialog (Call-ID, and their tag in From, ours in To).
    pub fn matches(&self, req: &Request) -> bool {
        let msg = req;
        message::call_id(msg).as_deref() == Some(self.call_id.as_str())
            && message::from_tag(msg).as_deref() == Some(self.remote_tag.as_str())
            && message::to_tag(msg).as_deref() == Some(self.local_tag.as_str())
    }

    /// RFC 3261 §12.2.2: a CSeq lower than the last one seen is out of order (answer `500`);
    /// a higher one becomes the new remote CSeq. ACK and CANCEL repeat their INVITE's number and
    /// do not move it.
    pub fn check_remote_cseq(&mut self, req: &Request) -> Result<(), CSeqError> {
        let msg = req;
        let (seq, _) = message::cseq(msg).ok_or(CSeqError::Malformed)?;
        if matches!(req.method, Method::Ack | Method::Cancel) {
            return Ok(());
        }
        if seq < self.remote_cseq {
            return Err(CSeqError::OutOfOrder {
                got: seq,
                last: self.remote_cseq,
            });
        }
        self.remote_cseq = seq;
        Ok(())
    }

    /// An in-dialog request (RFC 3261 §12.2.1.1) with the next local CSeq and a new branch.
    pub fn request(
        &mut self,
        method: Method,
        via_host: &str,
        via_port: u16,
        transport: Transport,
    ) -> Request {
        self.local_cseq = self.local_cseq.wrapping_add(1);
        let seq = self.local_cseq;
        self.build(
            method,
            seq,
            via_host,
            via_port,
            transport,
            &message::new_branch(),
        )
    }

    /// An in-dialog BYE.
    pub fn bye(&mut self, via_host: &str, via_port: u16, transport: Transport) -> Request {
        self.request(Method::Bye, via_host, via_port, transport)
    }

    /// The ACK for a 2xx to our INVITE with CSeq `invite_cseq` (UAC side): a new transaction with
    /// its own branch, the INVITE's CSeq number.
    pub fn ack(
        &self,
        invite_cseq: u32,
        via_host: &str,
        via_port: u16,
        transport: Transport,
    ) -> Request {
        self.build(
            Method::Ack,
            invite_cseq,
            via_host,
            via_port,
            transport,
            &message::new_branch(),
        )
    }

    fn build(
        &self,
        method: Method,
        seq: u32,
        via_host: &str,
        via_port: u16,
        transport: Transport,
        branch: &str,
    ) -> Request {
        let mut headers = rsip::Headers::default();
        let host = if via_host.contains(':') && !via_host.starts_with('[') {
            format!("[{via_host}]")
        } else {
            via_host.to_string()
        };
        headers.push(Header::Via(rsip::headers::Via::new(format!(
            "SIP/2.0/{} {host}:{via_port};branch={branch};rport",
            transport.via_token()
        ))));
        headers.push(Header::MaxForwards(70u32.into()));

        // Loose routing when the first route has `lr`; otherwise the strict-routing dance of
        // RFC 3261 §12.2.1.1 (first route becomes the Request-URI, remote target goes last).
        let first = self.route_set.first().and_then(|r| route_uri(r));
        let strict = first
            .as_ref()
            .is_some_and(|u| !u.params.contains(&rsip::Param::Lr));
        let uri = match (strict, first) {
            (true, Some(first)) => {
                let mut uri = first;
                uri.params.retain(|p| !matches!(p, rsip::Param::Other(..)));
                uri
            }
            _ => self.remote_target.clone(),
        };
        let routes: Vec<String> = if strict {
            let mut r: Vec<String> = self.route_set.iter().skip(1).cloned().collect();
            r.push(format!("<{}>", self.remote_target));
            r
        } else {
            self.route_set.clone()
        };
        for r in routes {
            headers.push(Header::Route(rsip::headers::Route::new(r)));
        }
        headers.push(Header::From(rsip::headers::From::new(
            self.local_header.clone(),
        )));
        headers.push(Header::To(rsip::headers::To::new(
            self.remote_header.clone(),
        )));
        headers.push(Header::CallId(rsip::headers::CallId::new(
            self.call_id.clone(),
        )));
        headers.push(Header::CSeq(rsip::headers::CSeq::new(format!(
            "{seq} {method}"
        ))));
        if matches!(method, Method::Invite | Method::Update | Method::Ack) {
            headers.push(Header::Contact(rsip::headers::Contact::new(format!(
                "<{}>",
                self.local_contact
            ))));
        }
        headers.push(Header::UserAgent(rsip::headers::UserAgent::new(
            message::SERVER,
        )));
        headers.push(Header::ContentLength(0u32.into()));
        Request {
            method,
            uri,
            version: rsip::Version::V2,
            headers,
            body: Vec::new(),
        }
    }
}

/// What an out-of-dialog INVITE we send (a new call leg) says.
#[derive(Debug, Clone)]
pub struct NewInvite<'a> {
    /// The Request-URI (a device's Contact, a trunk's `sip:+2547…@carrier`).
    pub target: &'a str,
    /// The To header's URI (the called party's address of record).
    pub to: &'a str,
    /// The From header's URI (who calls) and an optional display name.
    pub from: &'a str,
    pub from_display: Option<&'a str>,
    /// Our Contact URI.
    pub contact: &'a str,
    pub via_host: &'a str,
    pub via_port: u16,
    pub transport: Transport,
    /// Extra headers (name, value), e.g. `P-Asserted-Identity`.
    pub extra: &'a [(&'a str, String)],
    pub sdp: &'a str,
    /// The Call-ID to use; a fresh one when `None`.
    pub call_id: Option<&'a str>,
}

/// A new INVITE (RFC 3261 §8.1.1) with a fresh Call-ID, From tag and branch; `None` when a URI
/// does not parse.
pub fn new_invite(n: &NewInvite<'_>) -> Option<Request> {
    let uri = rsip::Uri::try_from(n.target).ok()?;
    rsip::Uri::try_from(n.to).ok()?;
    rsip::Uri::try_from(n.from).ok()?;
    rsip::Uri::try_from(n.contact).ok()?;
    let host = if n.via_host.contains(':') && !n.via_host.starts_with('[') {
        format!("[{}]", n.via_host)
    } else {
        n.via_host.to_string()
    };
    let mut headers = rsip::Headers::default();
    headers.push(Header::Via(rsip::headers::Via::new(format!(
        "SIP/2.0/{} {host}:{};branch={};rport",
        n.transport.via_token(),
        n.via_port,
        message::new_branch()
    ))));
    headers.push(Header::MaxForwards(70u32.into()));
    let display = n
        .from_display
        .map(|d| format!("\"{}\" ", d.replace(['"', '\\'], "")))
        .unwrap_or_default();
    headers.push(Header::From(rsip::headers::From::new(format!(
        "{display}<{}>;tag={}",
        n.from,
        message::new_tag()
    ))));
    headers.push(Header::To(rsip::headers::To::new(format!("<{}>", n.to))));
    headers.push(Header::CallId(rsip::headers::CallId::new(
        n.call_id.map_or_else(message::new_call_id, str::to_owned),
    )));
    headers.push(Header::CSeq(rsip::headers::CSeq::new("1 INVITE")));
    headers.push(Header::Contact(rsip::headers::Contact::new(format!(
        "<{}>",
        n.contact
    ))));
    for (name, value) in n.extra {
        headers.push(Header::Other((*name).to_owned(), value.clone()));
    }
    headers.push(Header::UserAgent(rsip::headers::UserAgent::new(
        message::SERVER,
    )));
    let req = Request {
        method: Method::Invite,
        uri,
        version: rsip::Version::V2,
        headers,
        body: Vec::new(),
    };
    Some(message::request_with_body(
        req,
        "application/sdp",
        n.sdp.as_bytes().to_vec(),
    ))
}

fn record_routes(msg: &impl HasHeaders) -> Vec<String> {
    msg.headers()
        .iter()
        .filter_map(|h| match h {
            Header::RecordRoute(rr) => Some(rr.value().to_string()),
            _ => None,
        })
        .flat_map(|v| {
            split_top_level(&v, b',')
                .into_iter()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The URI inside one route entry `<uri;lr>;params`.
fn route_uri(entry: &str) -> Option<rsip::Uri> {
    header_uri(entry)
}

#[cfg(test)]
mod tests {
    #[test]
    fn new_invite_starts_a_dialog_we_can_follow() {
        let req = super::new_invite(&super::NewInvite {
            target: "sip:ts_1-0x55@10.0.0.9:5062;transport=udp",
            to: "sip:+254700000001@sip.example.com",
            from: "sip:+254711000001@sip.example.com",
            from_display: Some("+254711000001"),
            contact: "sip:254700000001@127.0.0.1:5060",
            via_host: "127.0.0.1",
            via_port: 5060,
            transport: Transport::Udp,
            extra: &[(
                "P-Asserted-Identity",
                "<sip:+254711000001@sip.example.com>".into(),
            )],
            sdp: "v=0\r\n",
            call_id: None,
        })
        .unwrap_or_else(|| panic!("the INVITE builds"));
        let text = String::from_utf8(message::to_bytes(req.clone())).unwrap_or_default();
        // rsip prints the transport parameter in capitals; its value is case-insensitive.
        assert!(
            text.to_ascii_lowercase()
                .starts_with("invite sip:ts_1-0x55@10.0.0.9:5062;transport=udp sip/2.0\r\n"),
            "{text}"
        );
        assert!(text.contains("P-Asserted-Identity: <sip:+254711000001@sip.example.com>\r\n"));
        assert!(text.contains("Content-Type: application/sdp\r\n"));
        assert!(message::from_tag(&req).is_some());
        assert!(message::top_via_branch(&req).is_some_and(|b| b.starts_with("z9hG4bK")));
        assert!(matches!(
            message::parse(text.as_bytes()),
            Ok(rsip::SipMessage::Request(_))
        ));
        assert!(message::cancel_for(&req).method == Method::Cancel);
    }

    use super::*;
    use rsip::SipMessage;

    const INVITE: &str = "INVITE sip:254700000001@10.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.5;branch=z9hG4bKproxy\r\n\
Via: SIP/2.0/UDP 10.0.0.2:5061;branch=z9hG4bK-1-0\r\n\
Record-Route: <sip:10.0.0.5;lr>, <sip:10.0.0.6;lr;ftag=abc>\r\n\
Record-Route: <sip:10.0.0.7;lr>\r\n\
From: \"Alice\" <sip:alice@10.0.0.2:5061>;tag=abc\r\n\
To: <sip:254700000001@10.0.0.1:5060>\r\n\
Call-ID: 1-123@10.0.0.2\r\n\
CSeq: 5 INVITE\r\n\
Contact: <sip:alice@10.0.0.2:5061;transport=udp>\r\n\
Max-Forwards: 69\r\n\
Content-Length: 0\r\n\r\n";

    fn invite() -> Request {
        match message::parse(INVITE.as_bytes()) {
            Ok(SipMessage::Request(r)) => r,
            other => panic!("bad fixture: {other:?}"),
        }
    }

    fn local_contact() -> rsip::Uri {
        rsip::Uri::try_from("sip:sautikit@10.0.0.1:5060").expect("uri")
    }

    #[test]
    fn uas_dialog_and_bye() {
        let inv = invite();
        let mut d = Dialog::uas(&inv, "loc", local_contact()).expect("dialog");
        assert_eq!(d.call_id, "1-123@10.0.0.2");
        assert_eq!(d.remote_tag, "abc");
        assert_eq!(d.remote_cseq, 5);
        assert_eq!(d.route_set.len(), 3);
        assert_eq!(d.remote_target.user(), Some("alice"));
        let before = d.local_cseq;
        let bye = d.bye("10.0.0.1", 5060, Transport::Udp);
        assert_eq!(d.local_cseq, before + 1);
        let text = message::to_bytes(bye.clone());
        let text = String::from_utf8(text).expect("utf8");
        assert!(
            text.starts_with("BYE sip:alice@10.0.0.2:5061;transport=UDP SIP/2.0\r\n"),
            "{text}"
        );
        assert!(text.contains("Route: <sip:10.0.0.5;lr>\r\nRoute: <sip:10.0.0.6;lr;ftag=abc>\r\nRoute: <sip:10.0.0.7;lr>\r\n"), "{text}");
        assert!(text.contains("From: <sip:254700000001@10.0.0.1:5060>;tag=loc\r\n"));
        assert!(text.contains("To: \"Alice\" <sip:alice@10.0.0.2:5061>;tag=abc\r\n"));
        assert!(text.contains(&format!("CSeq: {} BYE\r\n", before + 1)));
        assert!(text.contains("Max-Forwards: 70\r\n"));
        let msg = message::parse(text.as_bytes()).expect("reparse");
        assert!(message::top_via_branch(&msg).is_some_and(|b| b.starts_with("z9hG4bK")));

        // An in-dialog request from the peer matches; ours does not.
        let mut theirs = inv.clone();
        theirs
            .headers
            .unique_push(Header::To(rsip::headers::To::new(
                "<sip:254700000001@10.0.0.1:5060>;tag=loc",
            )));
        theirs.method = Method::Bye;
        theirs
            .headers
            .unique_push(Header::CSeq(rsip::headers::CSeq::new("6 BYE")));
        assert!(d.matches(&theirs));
        assert!(!d.matches(&inv));
        assert!(d.check_remote_cseq(&theirs).is_ok());
        assert_eq!(d.remote_cseq, 6);
        theirs
            .headers
            .unique_push(Header::CSeq(rsip::headers::CSeq::new("4 BYE")));
        assert_eq!(
            d.check_remote_cseq(&theirs),
            Err(CSeqError::OutOfOrder { got: 4, last: 6 })
        );
    }

    #[test]
    fn strict_route() {
        let text = INVITE.replace(
            "Record-Route: <sip:10.0.0.5;lr>, <sip:10.0.0.6;lr;ftag=abc>\r\nRecord-Route: <sip:10.0.0.7;lr>\r\n",
            "Record-Route: <sip:10.0.0.5>\r\n",
        );
        let Ok(SipMessage::Request(inv)) = message::parse(text.as_bytes()) else {
            panic!("parse")
        };
        let mut d = Dialog::uas(&inv, "loc", local_contact()).expect("dialog");
        let bye = d.bye("10.0.0.1", 5060, Transport::Tcp);
        let text = bye.to_string();
        assert!(text.starts_with("BYE sip:10.0.0.5 SIP/2.0\r\n"), "{text}");
        assert!(
            text.contains("Route: <sip:alice@10.0.0.2:5061;transport=UDP>\r\n"),
            "{text}"
        );
        assert!(text.contains("Via: SIP/2.0/TCP 10.0.0.1:5060;branch=z9hG4bK"));
    }

    #[test]
    fn missing_contact_is_an_error() {
        let text = INVITE.replace("Contact: <sip:alice@10.0.0.2:5061;transport=udp>\r\n", "");
        let Ok(SipMessage::Request(inv)) = message::parse(text.as_bytes()) else {
            panic!("parse")
        };
        assert_eq!(
            Dialog::uas(&inv, "x", local_contact()),
            Err(DialogError::Missing("Contact"))
        );
    }
}
