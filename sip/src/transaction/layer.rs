//! The transaction layer: matches messages to transactions, creates server transactions, drives
//! timers, and answers what needs no TU (100 Trying, CANCEL, 400/481/483).

use super::invite_client::InviteClient;
use super::invite_server::InviteServer;
use super::non_invite_client::NonInviteClient;
use super::non_invite_server::NonInviteServer;
use super::{Out, Peer, Timers, Transmit, TuEvent, TxError, TxKey};
use crate::message::{self, expand_compact, find, header_param};
use rsip::prelude::*;
use rsip::{Method, Request, Response, SipMessage};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

enum Tx {
    InviteServer(InviteServer),
    /// Boxed: it keeps the whole INVITE to build the ACK of a non-2xx.
    InviteClient(Box<InviteClient>),
    NonInviteServer(NonInviteServer),
    NonInviteClient(NonInviteClient),
}

impl Tx {
    fn deadline(&self) -> Option<Instant> {
        match self {
            Tx::InviteServer(t) => t.deadline(),
            Tx::InviteClient(t) => t.deadline(),
            Tx::NonInviteServer(t) => t.deadline(),
            Tx::NonInviteClient(t) => t.deadline(),
        }
    }

    fn is_terminated(&self) -> bool {
        match self {
            Tx::InviteServer(t) => t.is_terminated(),
            Tx::InviteClient(t) => t.is_terminated(),
            Tx::NonInviteServer(t) => t.is_terminated(),
            Tx::NonInviteClient(t) => t.is_terminated(),
        }
    }
}

/// What matches an ACK for a 2xx to the INVITE it acknowledges: the ACK is a new transaction
/// (new branch), so only dialog identifiers tie it to the INVITE (RFC 3261 §17.2.3 does not
/// apply).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AckMatch {
    call_id: String,
    cseq: u32,
    from_tag: String,
}

struct Entry {
    key: TxKey,
    tx: Tx,
    /// The deadline most recently pushed on the heap; heap items that disagree are stale.
    scheduled: Option<Instant>,
    /// For INVITE server transactions: how its 2xx ACK will be recognised.
    ack_match: Option<AckMatch>,
}

pub struct TransactionLayer {
    timers: Timers,
    next_id: u64,
    ids: HashMap<TxKey, u64>,
    /// Boxed: the table stays small (a pointer a slot), so growing it under load moves 16 bytes
    /// per transaction instead of the whole entry (a 57,000-entry table of entries inline stalled
    /// the endpoint for about 150 ms as it grew).
    txs: HashMap<u64, Box<Entry>>,
    /// Min-heap of (deadline, transaction id), lazily pruned.
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    /// INVITE server transactions by the identifiers an ACK shares with its INVITE, for ACKs
    /// that arrive with a branch of their own (always for a 2xx, by mistake for some non-2xx).
    by_dialog: HashMap<AckMatch, u64>,
    out: Out,
}

/// The parts of a request that every transaction-layer decision needs.
struct RequestInfo {
    branch: String,
    sent_by: String,
    call_id: String,
    cseq: u32,
    from_tag: Option<String>,
}

impl TransactionLayer {
    pub fn new(timers: Timers) -> Self {
        Self::with_capacity(timers, 0)
    }

    /// A layer whose indexes hold `transactions` before they first grow. Growing a table means
    /// hashing every key again at once: at 1,000 calls/s (two transactions a call, each kept 32 s
    /// after it ends) the key index grew past 57,344 entries mid-load and the endpoint stalled
    /// for tens of milliseconds. Only the control bytes are written up front; the slots become
    /// resident as keys land in them (for 100,000, about 17 MiB once under load).
    pub fn with_capacity(timers: Timers, transactions: usize) -> Self {
        Self {
            timers,
            next_id: 0,
            ids: HashMap::with_capacity(transactions),
            txs: HashMap::with_capacity(transactions),
            // Room for as many stale timer entries as live ones (see `prune_heap`): never
            // regrown under load. Untouched room costs address space only.
            heap: BinaryHeap::with_capacity(2 * transactions + 1024),
            // Only INVITE server transactions are found by dialog.
            by_dialog: HashMap::with_capacity(transactions / 2),
            out: Out::default(),
        }
    }

    pub fn timers(&self) -> Timers {
        self.timers
    }

    /// Live transactions.
    pub fn len(&self) -> usize {
        self.txs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.txs.is_empty()
    }

    /// Parse and dispatch one datagram / framed TCP message. Malformed requests are answered
    /// `400` when Via, From, To, Call-ID and CSeq can be recovered, otherwise dropped.
    pub fn handle_datagram(&mut self, bytes: &[u8], from: Peer, now: Instant) {
        match message::parse(bytes) {
            Ok(msg) => self.handle_message(msg, from, now),
            Err(e) => {
                tracing::debug!(error = %e, peer = %from.addr, "unparseable SIP message");
                if let Some(resp) = error_response(bytes, e.status(), &e.to_string()) {
                    self.out.send(from, resp);
                }
            }
        }
    }

    pub fn handle_message(&mut self, msg: SipMessage, from: Peer, now: Instant) {
        match msg {
            SipMessage::Request(req) => self.handle_request(req, from, now),
            SipMessage::Response(resp) => self.handle_response(resp, now),
        }
        self.prune_heap();
    }

    fn handle_request(&mut self, req: Request, from: Peer, now: Instant) {
        let is_ack = req.method == Method::Ack;
        if let Some(why) = crate::uas::malformed(&req) {
            tracing::debug!(why, peer = %from.addr, "malformed request");
            if !is_ack {
                self.reject(&req, 400, why, from);
            }
            return;
        }
        let info = match request_info(&req) {
            Ok(info) => info,
            Err(why) => {
                tracing::debug!(why, peer = %from.addr, "malformed request");
                if !is_ack {
                    self.reject(&req, 400, why, from);
                }
                return;
            }
        };
        // Max-Forwards: 0 is a proxy's business (483); as the endpoint we process the request.
        match req.method {
            Method::Ack => self.handle_ack(req, info, from, now),
            Method::Cancel => self.handle_cancel(req, info, from, now),
            _ => self.handle_new_or_retransmit(req, info, from, now),
        }
    }

    fn handle_new_or_retransmit(
        &mut self,
        req: Request,
        info: RequestInfo,
        from: Peer,
        now: Instant,
    ) {
        let key = TxKey::server(&info.branch, &req.method, &info.sent_by);
        if let Some(&id) = self.ids.get(&key) {
            if let Some(entry) = self.txs.get_mut(&id).map(Box::as_mut) {
                match &mut entry.tx {
                    Tx::InviteServer(t) => t.on_invite_retransmit(&mut self.out),
                    Tx::NonInviteServer(t) => t.on_retransmit(&mut self.out),
                    _ => {}
                }
            }
            return;
        }
        let (tx, ack_match) = if req.method == Method::Invite {
            let trying = message::to_bytes(message::response_to(&req, 100, None, None));
            let t = InviteServer::new(from, self.timers, trying, now, &mut self.out);
            let ack_match = info.from_tag.map(|from_tag| AckMatch {
                call_id: info.call_id,
                cseq: info.cseq,
                from_tag,
            });
            (Tx::InviteServer(t), ack_match)
        } else {
            (
                Tx::NonInviteServer(NonInviteServer::new(from, self.timers, now)),
                None,
            )
        };
        let id = self.insert(key.clone(), tx, ack_match.clone());
        if let Some(m) = ack_match {
            self.by_dialog.insert(m, id);
        }
        self.out.event(TuEvent::RequestReceived {
            key,
            request: req,
            from,
        });
    }

    fn handle_ack(&mut self, req: Request, info: RequestInfo, from: Peer, now: Instant) {
        let key = TxKey::server(&info.branch, &Method::Invite, &info.sent_by);
        let mut to_tu = true;
        if let Some(&id) = self.ids.get(&key) {
            if let Some(Entry {
                tx: Tx::InviteServer(t),
                ..
            }) = self.txs.get_mut(&id).map(Box::as_mut)
            {
                // Same branch: the ACK of our non-2xx (absorbed), or a 2xx ACK from a UA that
                // reused the INVITE branch.
                to_tu = t.on_ack(now);
                self.reschedule(id);
            }
        } else if let Some(from_tag) = &info.from_tag {
            let m = AckMatch {
                call_id: info.call_id,
                cseq: info.cseq,
                from_tag: from_tag.clone(),
            };
            if let Some(&id) = self.by_dialog.get(&m)
                && let Some(Entry {
                    tx: Tx::InviteServer(t),
                    ..
                }) = self.txs.get_mut(&id).map(Box::as_mut)
            {
                to_tu = t.on_ack(now);
                self.reschedule(id);
            }
        }
        if to_tu {
            self.out.event(TuEvent::AckReceived { request: req, from });
        }
    }

    fn handle_cancel(&mut self, req: Request, info: RequestInfo, from: Peer, now: Instant) {
        let key = TxKey::server(&info.branch, &Method::Cancel, &info.sent_by);
        if let Some(&id) = self.ids.get(&key) {
            if let Some(Entry {
                tx: Tx::NonInviteServer(t),
                ..
            }) = self.txs.get_mut(&id).map(Box::as_mut)
            {
                t.on_retransmit(&mut self.out);
            }
            return;
        }
        // RFC 3261 §9.2: the CANCEL carries the INVITE's branch and sent-by.
        let invite_key = TxKey::server(&info.branch, &Method::Invite, &info.sent_by);
        let invite = self.ids.get(&invite_key).and_then(|id| self.txs.get(id));
        let (code, pending) = match invite.map(|e| &e.tx) {
            Some(Tx::InviteServer(t)) => (200, !t.has_final()),
            _ => (481, false),
        };
        let mut t = NonInviteServer::new(from, self.timers, now);
        let tag = (code == 200).then(message::new_tag);
        let resp = message::response_to(&req, code, None, tag.as_deref());
        // A fresh transaction in Trying accepts any final response.
        let _ = t.respond(code, message::to_bytes(resp), now, &mut self.out);
        self.insert(key, Tx::NonInviteServer(t), None);
        if pending {
            self.out.event(TuEvent::CancelReceived {
                invite: invite_key,
                from,
            });
        }
    }

    fn handle_response(&mut self, resp: Response, now: Instant) {
        let (Some(branch), Some((_, method))) =
            (message::top_via_branch(&resp), message::cseq(&resp))
        else {
            tracing::debug!("response without branch or CSeq dropped");
            return;
        };
        let key = TxKey::client(&branch, &method);
        let Some(&id) = self.ids.get(&key) else {
            tracing::debug!(
                ?key,
                status = resp.status_code.code(),
                "stray response dropped"
            );
            return;
        };
        if let Some(entry) = self.txs.get_mut(&id).map(Box::as_mut) {
            match &mut entry.tx {
                Tx::InviteClient(t) => t.on_response(&entry.key, resp, now, &mut self.out),
                Tx::NonInviteClient(t) => t.on_response(&entry.key, resp, now, &mut self.out),
                _ => {}
            }
        }
        self.reschedule(id);
    }

    /// Send a response on a server transaction (provisional or final).
    pub fn respond(
        &mut self,
        key: &TxKey,
        response: Response,
        now: Instant,
    ) -> Result<(), TxError> {
        let id = *self.ids.get(key).ok_or(TxError::NotFound)?;
        let entry = self
            .txs
            .get_mut(&id)
            .map(Box::as_mut)
            .ok_or(TxError::NotFound)?;
        let code = response.status_code.code();
        let bytes = message::to_bytes(response);
        match &mut entry.tx {
            Tx::InviteServer(t) => {
                t.respond(code, bytes, now, &mut self.out)?;
            }
            Tx::NonInviteServer(t) => t.respond(code, bytes, now, &mut self.out)?,
            _ => return Err(TxError::NotServer),
        }
        self.reschedule(id);
        self.prune_heap();
        Ok(())
    }

    /// Start a client transaction. The request must carry a top Via with an RFC 3261 branch.
    pub fn send_request(
        &mut self,
        request: Request,
        to: Peer,
        now: Instant,
    ) -> Result<TxKey, TxError> {
        if request.method == Method::Ack {
            return Err(TxError::AckIsNotATransaction);
        }
        let branch = message::top_via_branch(&request)
            .filter(|b| b.starts_with("z9hG4bK"))
            .ok_or(TxError::MissingBranch)?;
        let key = TxKey::client(&branch, &request.method);
        if self.ids.contains_key(&key) {
            return Err(TxError::Duplicate);
        }
        let bytes = message::to_bytes(request.clone());
        let tx = if request.method == Method::Invite {
            Tx::InviteClient(Box::new(InviteClient::new(
                to,
                self.timers,
                request,
                bytes,
                now,
                &mut self.out,
            )))
        } else {
            Tx::NonInviteClient(NonInviteClient::new(
                to,
                self.timers,
                bytes,
                now,
                &mut self.out,
            ))
        };
        self.insert(key.clone(), tx, None);
        self.prune_heap();
        Ok(key)
    }

    /// Send an ACK for a 2xx directly: it is not a transaction (RFC 3261 §13.2.2.4).
    pub fn send_ack(&mut self, ack: Request, to: Peer) {
        self.out.send(to, message::to_bytes(ack));
    }

    /// Send a message outside any transaction (e.g. a stateless response).
    pub fn send_stateless(&mut self, msg: impl Into<SipMessage>, to: Peer) {
        self.out.send(to, message::to_bytes(msg));
    }

    /// Fire every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&Reverse((at, id))) = self.heap.peek() {
            if at > now {
                break;
            }
            self.heap.pop();
            let Some(entry) = self.txs.get_mut(&id).map(Box::as_mut) else {
                continue;
            };
            if entry.scheduled != Some(at) {
                continue;
            }
            entry.scheduled = None;
            match &mut entry.tx {
                Tx::InviteServer(t) => t.on_timeout(&entry.key, now, &mut self.out),
                Tx::InviteClient(t) => t.on_timeout(&entry.key, now, &mut self.out),
                Tx::NonInviteServer(t) => t.on_timeout(&entry.key, now),
                Tx::NonInviteClient(t) => t.on_timeout(&entry.key, now, &mut self.out),
            }
            self.reschedule(id);
        }
        self.prune_heap();
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<TuEvent> {
        self.out.events.pop_front()
    }

    /// Earliest deadline of all transactions.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    fn insert(&mut self, key: TxKey, tx: Tx, ack_match: Option<AckMatch>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.ids.insert(key.clone(), id);
        self.txs.insert(
            id,
            Box::new(Entry {
                key,
                tx,
                scheduled: None,
                ack_match,
            }),
        );
        self.reschedule(id);
        id
    }

    /// After any change to a transaction: drop it when terminated, else make sure the heap holds
    /// its current deadline.
    fn reschedule(&mut self, id: u64) {
        let Some(entry) = self.txs.get_mut(&id).map(Box::as_mut) else {
            return;
        };
        if entry.tx.is_terminated() {
            if let Some(entry) = self.txs.remove(&id) {
                self.ids.remove(&entry.key);
                if let Some(m) = entry.ack_match
                    && self.by_dialog.get(&m) == Some(&id)
                {
                    self.by_dialog.remove(&m);
                }
            }
            return;
        }
        let deadline = entry.tx.deadline();
        if deadline != entry.scheduled {
            entry.scheduled = deadline;
            if let Some(at) = deadline {
                self.heap.push(Reverse((at, id)));
            }
        }
    }

    /// Drop stale heap tops so `poll_timeout` is exact, and drop every stale entry (left by
    /// transactions that ended or moved their deadline early) when they outnumber live ones, to
    /// keep memory bounded. In place: the heap keeps its room, so under steady load it settles at
    /// one size instead of being built anew and regrown (each a burst of megabytes allocated and
    /// copied at 1,000 calls/s).
    fn prune_heap(&mut self) {
        while let Some(&Reverse((at, id))) = self.heap.peek() {
            match self.txs.get(&id) {
                Some(e) if e.scheduled == Some(at) => break,
                _ => {
                    self.heap.pop();
                }
            }
        }
        if self.heap.len() > 2 * self.txs.len() + 1024 {
            let txs = &self.txs;
            self.heap
                .retain(|Reverse((at, id))| txs.get(id).is_some_and(|e| e.scheduled == Some(*at)));
        }
    }

    /// Answer a request that reached us but cannot be processed, outside any transaction.
    fn reject(&mut self, req: &Request, code: u16, reason: &str, to: Peer) {
        // Via says where the answer goes and CSeq what it answers; the rest is copied when
        // there (RFC 4475's insuf lacks From, To and Call-ID and still gets its 400).
        if req.via_header().is_err() || req.cseq_header().is_err() {
            tracing::debug!(code, "cannot answer: Via or CSeq missing");
            return;
        }
        let tag = message::new_tag();
        let resp = message::response_to(req, code, Some(reason), Some(&tag));
        self.out.send(to, message::to_bytes(resp));
    }
}

fn request_info(req: &Request) -> Result<RequestInfo, &'static str> {
    let msg = req;
    let sent_by = message::top_via_sent_by(msg).ok_or("Bad Via")?;
    let call_id = message::call_id(msg).ok_or("Bad Call-ID")?;
    let (cseq, cseq_method) = message::cseq(msg).ok_or("Bad CSeq")?;
    if cseq_method != req.method {
        return Err("CSeq Method Mismatch");
    }
    req.from_header().map_err(|_| "Missing From")?;
    req.to_header().map_err(|_| "Missing To")?;
    let from_tag = message::from_tag(msg);
    let branch = match message::top_via_branch(msg) {
        Some(b) if b.starts_with("z9hG4bK") => b,
        // RFC 2543 peers: no usable branch, so identify the transaction by the dialog
        // identifiers and CSeq number, which a retransmission, its ACK and CANCEL all share.
        _ => format!(
            "rfc2543|{call_id}|{cseq}|{}",
            from_tag.as_deref().unwrap_or_default()
        ),
    };
    Ok(RequestInfo {
        branch,
        sent_by,
        call_id,
        cseq,
        from_tag,
    })
}

/// The stateless answer to a request that could not be parsed (or framed, on a stream), built
/// from its raw text when its Via, From, To, Call-ID and CSeq lines can be recovered: `505` for
/// another SIP version, `405`/`501` for a method we do not take, `416` for a Request-URI scheme
/// other than SIP, otherwise `status`, with `why` in a Warning. Never for an ACK or a response. Header values are copied
/// as bytes: a quoted-pair may hold any octet but CR and LF (RFC 4475's intmeth).
pub fn error_response(bytes: &[u8], status: (u16, &str), why: &str) -> Option<Vec<u8>> {
    error_response_with(bytes, status, why, &[])
}

/// [`error_response`] with more header fields (`Retry-After` on a `503`).
pub fn error_response_with(
    bytes: &[u8],
    status: (u16, &str),
    why: &str,
    extra: &[(&str, &str)],
) -> Option<Vec<u8>> {
    let head = RawHead::of(bytes)?;
    let scheme_is_sip = head.uri.len() > 4
        && (head.uri[..4].eq_ignore_ascii_case(b"sip:")
            || head.uri[..4].eq_ignore_ascii_case(b"sips"));
    let method_refused = crate::uas::method_refusal(head.method).map(|r| r.code);
    let (code, reason, allow) = if !head.version.eq_ignore_ascii_case(b"SIP/2.0") {
        (505, "Version Not Supported", false)
    } else if let Some(code) = method_refused {
        (code, message::reason_phrase(code), true)
    } else if !scheme_is_sip && !head.uri.is_empty() && !head.uri.starts_with(b"<") {
        (416, message::reason_phrase(416), false)
    } else {
        (status.0, status.1, false)
    };
    Some(head.answer(code, reason, allow, why, extra))
}

/// The stateless answer to a new INVITE (SIP/2.0, no To tag) turned away before it reaches a
/// transaction, as when the engine sheds load (RFC 3261 §8.2.7: a stateless UAS). `None` for
/// anything else: an in-dialog INVITE, another request, or one whose key header fields cannot
/// be found; those take the usual way.
pub fn refuse_new_invite(
    bytes: &[u8],
    status: (u16, &str),
    extra: &[(&str, &str)],
) -> Option<Vec<u8>> {
    let head = RawHead::new_invite(bytes)?;
    Some(head.answer(status.0, status.1, false, "", extra))
}

/// The Call-ID, CSeq and top Via of a new INVITE (SIP/2.0, no To tag) as written, which its
/// retransmissions repeat byte for byte (RFC 3261 §17.1.1.2); `None` where [`refuse_new_invite`]
/// would answer nothing.
pub fn new_invite_identity(bytes: &[u8]) -> Option<[&[u8]; 3]> {
    let head = RawHead::new_invite(bytes)?;
    Some([head.call_id, head.cseq, head.vias.first()?])
}

/// The start line and the header fields a stateless answer copies, found in a request's raw
/// text without parsing the rest.
struct RawHead<'a> {
    method: &'a str,
    uri: &'a [u8],
    version: &'a [u8],
    vias: Vec<&'a [u8]>,
    from: &'a [u8],
    to: &'a [u8],
    call_id: &'a [u8],
    cseq: &'a [u8],
}

impl<'a> RawHead<'a> {
    /// `None` for a response, an ACK, or a request missing one of the fields.
    fn of(bytes: &'a [u8]) -> Option<RawHead<'a>> {
        let head = match find(bytes, b"\r\n\r\n") {
            Some(end) => bytes.get(..end)?,
            None => bytes,
        };
        let mut lines = head
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let start = lines.next()?.trim_ascii();
        // Lenient on the middle: a Request-URI with spaces in it is exactly what we answer 400 to.
        let method_end = start.iter().position(|&b| b == b' ')?;
        let method = std::str::from_utf8(start.get(..method_end)?).ok()?;
        let version_start = start.iter().rposition(|&b| b == b' ')?;
        let version = start.get(version_start + 1..)?;
        let uri = start.get(method_end + 1..version_start)?.trim_ascii();
        if version.len() < 4
            || !version[..4].eq_ignore_ascii_case(b"SIP/")
            || method.starts_with("SIP/")
            || method.is_empty()
            || method.eq_ignore_ascii_case("ACK")
        {
            return None;
        }
        let (mut vias, mut from, mut to, mut call_id, mut cseq) =
            (Vec::new(), None, None, None, None);
        for line in lines {
            if line.starts_with(b" ") || line.starts_with(b"\t") {
                continue;
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let Ok(name) = std::str::from_utf8(line.get(..colon)?) else {
                continue;
            };
            let value = line.get(colon + 1..)?.trim_ascii();
            if value.is_empty() {
                continue;
            }
            let name = expand_compact(name.trim());
            if name.eq_ignore_ascii_case("Via") {
                vias.push(value);
            } else if name.eq_ignore_ascii_case("From") {
                from.get_or_insert(value);
            } else if name.eq_ignore_ascii_case("To") {
                to.get_or_insert(value);
            } else if name.eq_ignore_ascii_case("Call-ID") {
                call_id.get_or_insert(value);
            } else if name.eq_ignore_ascii_case("CSeq") {
                cseq.get_or_insert(value);
            }
        }
        let (from, to, call_id, cseq) = (from?, to?, call_id?, cseq?);
        if vias.is_empty() || cseq.to_ascii_uppercase().ends_with(b"ACK") {
            return None;
        }
        Some(RawHead {
            method,
            uri,
            version,
            vias,
            from,
            to,
            call_id,
            cseq,
        })
    }

    /// A new INVITE's: SIP/2.0 and no To tag.
    fn new_invite(bytes: &'a [u8]) -> Option<RawHead<'a>> {
        let head = RawHead::of(bytes)?;
        (head.method == "INVITE"
            && !head.to_tagged()
            && head.version.eq_ignore_ascii_case(b"SIP/2.0"))
        .then_some(head)
    }

    fn to_tagged(&self) -> bool {
        std::str::from_utf8(self.to)
            .ok()
            .is_some_and(|t| header_param(t, "tag").is_some())
    }

    fn answer(
        &self,
        code: u16,
        reason: &str,
        allow: bool,
        why: &str,
        extra: &[(&str, &str)],
    ) -> Vec<u8> {
        let mut out = format!("SIP/2.0 {code} {reason}\r\n").into_bytes();
        for via in &self.vias {
            out.extend_from_slice(b"Via: ");
            out.extend_from_slice(via);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"From: ");
        out.extend_from_slice(self.from);
        out.extend_from_slice(b"\r\nTo: ");
        out.extend_from_slice(self.to);
        if !self.to_tagged() {
            out.extend_from_slice(format!(";tag={}", message::new_tag()).as_bytes());
        }
        out.extend_from_slice(b"\r\nCall-ID: ");
        out.extend_from_slice(self.call_id);
        out.extend_from_slice(b"\r\nCSeq: ");
        out.extend_from_slice(self.cseq);
        out.extend_from_slice(format!("\r\nServer: {}\r\n", message::SERVER).as_bytes());
        if allow {
            out.extend_from_slice(format!("Allow: {}\r\n", crate::uas::ALLOW).as_bytes());
        }
        for (name, value) in extra {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        if code == 400 {
            // Warning 399 tells the sender what we objected to, which helps debugging interop.
            let why: String = why
                .chars()
                .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
                .take(120)
                .collect();
            out.extend_from_slice(format!("Warning: 399 sautikit \"{why}\"\r\n").as_bytes());
        }
        out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
        out
    }
}
