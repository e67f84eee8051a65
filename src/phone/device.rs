//! The phone as a softphone: it registers a SIP credential (digest, refreshed before it
//! expires, removed at the end) and answers the calls that ring it. Sans-IO, over the
//! transaction layer: time comes in; datagrams and events come out.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sautikit_sip::dialog::Dialog;
use sautikit_sip::message::{self as sipmsg, reason_of, response_to, with_body};
use sautikit_sip::rsip::prelude::UntypedHeader;
use sautikit_sip::rsip::{self, Method, Request};
use sautikit_sip::sdp;
use sautikit_sip::transaction::{
    Peer, Timers, TransactionLayer, Transmit, Transport, TuEvent, TxKey,
};

/// Who the device is and where it registers.
#[derive(Debug, Clone)]
pub struct DevicePlan {
    pub server: SocketAddr,
    pub transport: Transport,
    /// The registrar's domain (the address of record is `username@domain`).
    pub domain: String,
    pub username: String,
    pub password: String,
    /// Our address as the engine reaches it (Via and Contact).
    pub local: SocketAddr,
    /// Where our RTP is received.
    pub rtp: SocketAddr,
    /// Seconds asked for in `Expires`.
    pub expires: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The registrar took the binding for `expires` seconds.
    Registered { expires: u32 },
    /// The registrar refused it (a wrong password, a revoked credential, a ban).
    RegistrationFailed { code: u16, reason: String },
    /// The binding was removed at our request.
    Unregistered,
    /// A call rings us and is answered at once; `sdp` is the caller's offer.
    Ringing { from: String, offer: String },
    /// Our `200` was acknowledged: media flows.
    Answered { answer: sdp::Answer },
    /// The caller's side hung up, or we did.
    Ended { by_us: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registration {
    /// A REGISTER without credentials is out, waiting for its challenge.
    Asking,
    /// The answer to the challenge is out.
    Answering,
    Bound {
        refresh_at: Instant,
    },
    Removing,
    Failed,
    Removed,
}

/// The call being answered or talked on: one at a time; another INVITE meanwhile is busy.
struct ActiveCall {
    invite_key: TxKey,
    dialog: Dialog,
    answer: sdp::Answer,
    acked: bool,
    bye: Option<TxKey>,
}

pub struct PhoneDevice {
    plan: DevicePlan,
    layer: TransactionLayer,
    peer: Peer,
    call_id: String,
    from_tag: String,
    cseq: u32,
    registration: Registration,
    register_key: Option<TxKey>,
    call: Option<ActiveCall>,
    events: VecDeque<DeviceEvent>,
}

impl PhoneDevice {
    /// Send the first REGISTER.
    pub fn start(plan: DevicePlan, now: Instant) -> PhoneDevice {
        let peer = Peer {
            addr: plan.server,
            transport: plan.transport,
        };
        let mut device = PhoneDevice {
            plan,
            layer: TransactionLayer::new(Timers::default()),
            peer,
            call_id: sipmsg::new_call_id(),
            from_tag: sipmsg::new_tag(),
            cseq: 0,
            registration: Registration::Asking,
            register_key: None,
            call: None,
            events: VecDeque::new(),
        };
        device.send_register(None, device.plan.expires, now);
        device
    }

    /// Remove the binding (REGISTER with `Expires: 0`); hang up a call first.
    pub fn stop(&mut self, now: Instant) {
        self.hang_up(now);
        if matches!(
            self.registration,
            Registration::Bound { .. } | Registration::Asking | Registration::Answering
        ) {
            self.registration = Registration::Removing;
            self.send_register(None, 0, now);
        } else {
            self.registration = Registration::Removed;
        }
    }

    /// Whether there is nothing left to do: the binding is removed or was refused.
    pub fn is_done(&self) -> bool {
        matches!(
            self.registration,
            Registration::Removed | Registration::Failed
        ) && self.call.is_none()
    }

    /// Hang up the call in progress (BYE).
    pub fn hang_up(&mut self, now: Instant) {
        let (host, port, transport) = (
            self.plan.local.ip().to_string(),
            self.plan.local.port(),
            self.plan.transport,
        );
        if let Some(call) = self.call.as_mut()
            && call.bye.is_none()
        {
            let bye = call.dialog.bye(&host, port, transport);
            if let Ok(key) = self.layer.send_request(bye, self.peer, now) {
                call.bye = Some(key);
            }
        }
    }

    pub fn handle_message(&mut self, bytes: &[u8], from: SocketAddr, now: Instant) {
        let from = Peer {
            addr: from,
            transport: self.plan.transport,
        };
        self.layer.handle_datagram(bytes, from, now);
        self.drain(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.layer.handle_timeout(now);
        if let Registration::Bound { refresh_at } = self.registration
            && refresh_at <= now
        {
            self.registration = Registration::Asking;
            self.send_register(None, self.plan.expires, now);
        }
        self.drain(now);
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.layer.poll_transmit()
    }

    pub fn poll_event(&mut self) -> Option<DeviceEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let refresh = match self.registration {
            Registration::Bound { refresh_at } => Some(refresh_at),
            _ => None,
        };
        match (self.layer.poll_timeout(), refresh) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn contact(&self) -> String {
        format!(
            "<sip:{}@{}{}>",
            self.plan.username,
            self.plan.local,
            if self.plan.transport == Transport::Tcp {
                ";transport=tcp"
            } else {
                ""
            }
        )
    }

    fn send_register(&mut self, authorization: Option<String>, expires: u32, now: Instant) {
        self.cseq += 1;
        let aor = format!("sip:{}@{}", self.plan.username, self.plan.domain);
        let mut text = format!(
            "REGISTER sip:{domain} SIP/2.0\r\n\
             Via: SIP/2.0/{transport} {local};branch={branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <{aor}>;tag={tag}\r\n\
             To: <{aor}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Contact: {contact}\r\n\
             Expires: {expires}\r\n\
             User-Agent: sautikit-phone\r\n",
            domain = self.plan.domain,
            transport = self.plan.transport.via_token(),
            local = self.plan.local,
            branch = sipmsg::new_branch(),
            tag = self.from_tag,
            call_id = self.call_id,
            cseq = self.cseq,
            contact = self.contact(),
        );
        if let Some(value) = authorization {
            text.push_str(&format!("Authorization: {value}\r\n"));
        }
        text.push_str("Content-Length: 0\r\n\r\n");
        let Ok(rsip::SipMessage::Request(request)) = sipmsg::parse(text.as_bytes()) else {
            self.fail_registration(400, "the REGISTER we built did not parse");
            return;
        };
        match self.layer.send_request(request, self.peer, now) {
            Ok(key) => self.register_key = Some(key),
            Err(e) => self.fail_registration(500, &format!("{e:?}")),
        }
    }

    fn fail_registration(&mut self, code: u16, reason: &str) {
        self.registration = Registration::Failed;
        self.events.push_back(DeviceEvent::RegistrationFailed {
            code,
            reason: reason.to_owned(),
        });
    }

    fn drain(&mut self, now: Instant) {
        while let Some(event) = self.layer.poll_event() {
            match event {
                TuEvent::ResponseReceived { key, response } => {
                    if Some(&key) == self.register_key.as_ref() {
                        self.on_register_response(&response, now);
                    } else if let Some(call) = &self.call
                        && Some(&key) == call.bye.as_ref()
                        && response.status_code.code() >= 200
                    {
                        self.call = None;
                        self.events.push_back(DeviceEvent::Ended { by_us: true });
                    }
                }
                TuEvent::ClientTimeout { key } => {
                    if Some(&key) == self.register_key.as_ref() {
                        if self.registration == Registration::Removing {
                            self.registration = Registration::Removed;
                        } else {
                            self.fail_registration(408, "Request Timeout");
                        }
                    } else if let Some(call) = &self.call
                        && Some(&key) == call.bye.as_ref()
                    {
                        self.call = None;
                        self.events.push_back(DeviceEvent::Ended { by_us: true });
                    }
                }
                TuEvent::RequestReceived { key, request, .. } => {
                    self.on_request(key, request, now);
                }
                TuEvent::AckReceived { .. } => {
                    if let Some(call) = self.call.as_mut()
                        && !call.acked
                    {
                        call.acked = true;
                        self.events.push_back(DeviceEvent::Answered {
                            answer: call.answer.clone(),
                        });
                    }
                }
                TuEvent::CancelReceived { invite, .. } => {
                    if self.call.as_ref().is_some_and(|c| c.invite_key == invite) {
                        self.call = None;
                        self.events.push_back(DeviceEvent::Ended { by_us: false });
                    }
                }
                TuEvent::AckTimeout { .. } => {
                    if self.call.take().is_some() {
                        self.events.push_back(DeviceEvent::Ended { by_us: false });
                    }
                }
            }
        }
    }

    fn on_register_response(&mut self, response: &rsip::Response, now: Instant) {
        let code = response.status_code.code();
        if code < 200 {
            return;
        }
        match (self.registration, code) {
            (Registration::Asking | Registration::Removing, 401 | 407) => {
                let wanted = if code == 407 {
                    "proxy-authenticate"
                } else {
                    "www-authenticate"
                };
                let uri = format!("sip:{}", self.plan.domain);
                let cnonce = sipmsg::new_tag();
                // The first challenge we can answer, in the order offered (SHA-256 first).
                let answer = response.headers.iter().find_map(|h| {
                    let text = h.to_string();
                    let (name, value) = text.split_once(':')?;
                    if !name.trim().eq_ignore_ascii_case(wanted) {
                        return None;
                    }
                    sautikit_sip::auth::answer_challenge(
                        value.trim(),
                        "REGISTER",
                        &uri,
                        &self.plan.username,
                        &self.plan.password,
                        &cnonce,
                    )
                    .ok()
                });
                let Some(answer) = answer else {
                    self.fail_registration(code, "no challenge we can answer");
                    return;
                };
                let removing = self.registration == Registration::Removing;
                if !removing {
                    self.registration = Registration::Answering;
                }
                let expires = if removing { 0 } else { self.plan.expires };
                self.send_register(Some(answer), expires, now);
            }
            (Registration::Removing, 200..=299) => {
                self.registration = Registration::Removed;
                self.events.push_back(DeviceEvent::Unregistered);
            }
            (Registration::Removing, _) => self.registration = Registration::Removed,
            (_, 200..=299) => {
                let expires = granted_expires(response, &self.plan.username)
                    .unwrap_or(self.plan.expires)
                    .max(1);
                // Refresh halfway, as softphones do, so one lost refresh still leaves time.
                let refresh_at =
                    now + Duration::from_secs(u64::from(expires) / 2).max(Duration::from_secs(1));
                self.registration = Registration::Bound { refresh_at };
                self.events.push_back(DeviceEvent::Registered { expires });
            }
            _ => self.fail_registration(code, &reason_of(&response.status_code)),
        }
    }

    fn on_request(&mut self, key: TxKey, request: Request, now: Instant) {
        let in_dialog = self
            .call
            .as_ref()
            .is_some_and(|c| c.dialog.matches(&request));
        match request.method {
            Method::Invite if in_dialog => {
                // A session refresh: the same answer again.
                let sdp = self
                    .call
                    .as_ref()
                    .map(|c| c.answer.sdp.clone())
                    .unwrap_or_default();
                let local_tag = self
                    .call
                    .as_ref()
                    .map(|c| c.dialog.local_tag.clone())
                    .unwrap_or_default();
                let ok = with_body(
                    response_to(&request, 200, None, Some(&local_tag)),
                    "application/sdp",
                    sdp.into_bytes(),
                );
                let _ = self.layer.respond(&key, ok, now);
            }
            Method::Invite => self.on_invite(key, request, now),
            Method::Bye if in_dialog => {
                let _ = self
                    .layer
                    .respond(&key, response_to(&request, 200, None, None), now);
                self.call = None;
                self.events.push_back(DeviceEvent::Ended { by_us: false });
            }
            Method::Options | Method::Info => {
                let _ = self
                    .layer
                    .respond(&key, response_to(&request, 200, None, None), now);
            }
            Method::Bye => {
                let _ = self
                    .layer
                    .respond(&key, response_to(&request, 481, None, None), now);
            }
            _ => {
                let _ = self
                    .layer
                    .respond(&key, response_to(&request, 501, None, None), now);
            }
        }
    }

    /// Ring and answer at once with our SDP, or `486` while a call is up.
    fn on_invite(&mut self, key: TxKey, request: Request, now: Instant) {
        if self.call.is_some() {
            let _ = self.layer.respond(
                &key,
                response_to(&request, 486, None, Some(&sipmsg::new_tag())),
                now,
            );
            return;
        }
        let offer_text = String::from_utf8_lossy(&request.body).into_owned();
        let answer = sdp::parse(&offer_text).ok().and_then(|offer| {
            sdp::answer(
                &offer,
                self.plan.rtp.ip(),
                self.plan.rtp.port(),
                u64::from(self.cseq),
            )
            .ok()
        });
        let tag = sipmsg::new_tag();
        let Some(answer) = answer else {
            let _ = self
                .layer
                .respond(&key, response_to(&request, 488, None, Some(&tag)), now);
            return;
        };
        let contact = self.contact();
        let Ok(contact_uri) = rsip::Uri::try_from(contact.trim_matches(['<', '>'])) else {
            let _ = self
                .layer
                .respond(&key, response_to(&request, 500, None, Some(&tag)), now);
            return;
        };
        let Ok(dialog) = Dialog::uas(&request, &tag, contact_uri) else {
            let _ = self
                .layer
                .respond(&key, response_to(&request, 400, None, Some(&tag)), now);
            return;
        };
        let from = sipmsg::from_user(&request).unwrap_or_else(|| "anonymous".to_owned());
        let _ = self
            .layer
            .respond(&key, response_to(&request, 180, None, Some(&tag)), now);
        let mut ok = with_body(
            response_to(&request, 200, None, Some(&tag)),
            "application/sdp",
            answer.sdp.clone().into_bytes(),
        );
        ok.headers
            .push(rsip::Header::Contact(rsip::headers::Contact::new(contact)));
        let _ = self.layer.respond(&key, ok, now);
        self.events.push_back(DeviceEvent::Ringing {
            from,
            offer: offer_text,
        });
        self.call = Some(ActiveCall {
            invite_key: key,
            dialog,
            answer,
            acked: false,
            bye: None,
        });
    }
}

/// The expiry the registrar granted our contact: its `expires` parameter in the `200`'s
/// Contact list, else the `Expires` header.
fn granted_expires(response: &rsip::Response, username: &str) -> Option<u32> {
    let text = String::from_utf8_lossy(&sipmsg::to_bytes(response.clone())).into_owned();
    let mut header_expires = None;
    for line in text.split("\r\n") {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("Contact") || name.eq_ignore_ascii_case("m") {
            for contact in value.split(',') {
                if contact.contains(&format!("sip:{username}@"))
                    && let Some(e) = contact
                        .split(';')
                        .find_map(|p| p.trim().strip_prefix("expires="))
                {
                    return e.trim().parse().ok();
                }
            }
        } else if name.eq_ignore_ascii_case("Expires") {
            header_expires = value.trim().parse().ok();
        }
    }
    header_expires
}
