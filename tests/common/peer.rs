//! Test peers for bridged calls: a SIP caller that places a call by hand, the answering side
//! of a registered device, and RTP endpoints that send numbered frames and read them back, so
//! a test can tell which frame came through, in what order, and whether its audio survived.

use std::net::SocketAddr;
use std::time::Duration;

use sautikit_sip::rtp::{RtpHeader, g711};
use sautikit_sip::sdp::Codec;
use tokio::net::UdpSocket;

use super::uac::{header, headers, status_code};

/// A response to `request` echoing Via, From, To (with `to_tag` added), Call-ID and CSeq.
pub fn reply(request: &str, code: u16, reason: &str, to_tag: &str, body: Option<&str>) -> String {
    let mut out = format!("SIP/2.0 {code} {reason}\r\n");
    for v in headers(request, "Via") {
        out.push_str(&format!("Via: {v}\r\n"));
    }
    for name in ["From", "Call-ID", "CSeq"] {
        if let Some(v) = header(request, name) {
            out.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    let to = header(request, "To").unwrap_or_default();
    if to.contains("tag=") {
        out.push_str(&format!("To: {to}\r\n"));
    } else {
        out.push_str(&format!("To: {to};tag={to_tag}\r\n"));
    }
    match body {
        Some(b) => out.push_str(&format!(
            "Contact: <sip:device@127.0.0.1>\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => out.push_str("Content-Length: 0\r\n\r\n"),
    }
    out
}

#[allow(unused_imports)]
pub use sautikit::loadtest::trunk::{sdp, sdp_rtp};

/// A caller placing a call to `number` by hand over UDP.
pub struct SipCaller {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub call_id: String,
    pub number: String,
    pub to_tag: Option<String>,
    cseq: u32,
}

impl SipCaller {
    pub async fn new(server: SocketAddr, number: &str) -> SipCaller {
        SipCaller {
            sock: UdpSocket::bind("127.0.0.1:0").await.expect("bind"),
            server,
            call_id: format!("{}@caller", uuid::Uuid::now_v7().simple()),
            number: number.to_owned(),
            to_tag: None,
            cseq: 1,
        }
    }

    fn request(&mut self, method: &str, cseq: u32, body: Option<&str>) -> String {
        let me = self.sock.local_addr().expect("addr");
        let to_tag = self
            .to_tag
            .as_ref()
            .map(|t| format!(";tag={t}"))
            .unwrap_or_default();
        let body_headers = match body {
            Some(b) => format!(
                "Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ),
            None => "Content-Length: 0\r\n\r\n".to_owned(),
        };
        format!(
            "{method} sip:{n}@{s} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{b}\r\n\
             From: <sip:+254711000002@{me}>;tag=caller\r\nTo: <sip:{n}@{s}>{to_tag}\r\n\
             Call-ID: {c}\r\nCSeq: {cseq} {method}\r\nContact: <sip:caller@{me}>\r\n\
             Max-Forwards: 70\r\n{body_headers}",
            n = self.number,
            s = self.server,
            b = uuid::Uuid::now_v7().simple(),
            c = self.call_id,
        )
    }

    pub async fn send(&self, text: &str) {
        self.sock
            .send_to(text.as_bytes(), self.server)
            .await
            .expect("send");
    }

    pub async fn recv(&self, wait: Duration) -> Option<String> {
        let mut buf = vec![0u8; 65_535];
        let (n, _) = tokio::time::timeout(wait, self.sock.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Send the INVITE; returns its text (for CANCEL).
    pub async fn invite(&mut self, offer: &str) -> String {
        let text = self.request("INVITE", 1, Some(offer));
        self.send(&text).await;
        text
    }

    /// Statuses of the INVITE's responses until a final one; returns (provisional codes, final).
    pub async fn await_final(&mut self, wait: Duration) -> (Vec<u16>, String) {
        let mut provisional = Vec::new();
        loop {
            let msg = self
                .recv(wait)
                .await
                .expect("a response to the INVITE in time");
            let Some(code) = status_code(&msg) else {
                continue;
            };
            if !header(&msg, "CSeq").is_some_and(|c| c.ends_with("INVITE")) {
                continue;
            }
            if code < 200 {
                provisional.push(code);
                continue;
            }
            self.to_tag = header(&msg, "To")
                .and_then(|t| t.split(";tag=").nth(1))
                .map(|t| t.split(';').next().unwrap_or(t).to_owned());
            return (provisional, msg);
        }
    }

    pub async fn ack(&mut self) {
        let text = self.request("ACK", 1, None);
        self.send(&text).await;
    }

    /// BYE and wait for its 200.
    pub async fn bye(&mut self) {
        self.cseq += 1;
        let text = self.request("BYE", self.cseq, None);
        self.send(&text).await;
        loop {
            let msg = self.recv(Duration::from_secs(5)).await.expect("200 to BYE");
            if status_code(&msg) == Some(200)
                && header(&msg, "CSeq").is_some_and(|c| c.ends_with("BYE"))
            {
                return;
            }
        }
    }

    pub async fn cancel(&mut self, invite: &str) {
        let via = header(invite, "Via").unwrap_or_default().to_owned();
        let me = self.sock.local_addr().expect("addr");
        let text = format!(
            "CANCEL sip:{n}@{s} SIP/2.0\r\nVia: {via}\r\nFrom: <sip:+254711000002@{me}>;tag=caller\r\n\
             To: <sip:{n}@{s}>\r\nCall-ID: {c}\r\nCSeq: 1 CANCEL\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
            n = self.number,
            s = self.server,
            c = self.call_id,
        );
        self.send(&text).await;
    }

    /// A new call to `number` offering PCMU: its final answer, how long that took from the
    /// INVITE, and the caller (to ACK and hang up an answered call).
    pub async fn timed_call(server: SocketAddr, number: &str) -> (String, Duration, SipCaller) {
        let mut caller = SipCaller::new(server, number).await;
        let asked = std::time::Instant::now();
        caller
            .invite(&sdp("127.0.0.1:9".parse().expect("addr"), Codec::Pcmu, 101))
            .await;
        let (_, answer) = caller.await_final(Duration::from_secs(10)).await;
        (answer, asked.elapsed(), caller)
    }

    /// Wait for the engine's BYE and answer it.
    pub async fn await_bye(&self, wait: Duration) -> String {
        loop {
            let msg = self.recv(wait).await.expect("a BYE in time");
            if msg.starts_with("BYE ") {
                self.send(&reply(&msg, 200, "OK", "caller", None)).await;
                return msg;
            }
        }
    }
}

/// An RTP endpoint sending numbered frames: frame `i` carries the 16 bits of `i` as the signs
/// of ten-sample runs at a large amplitude, which survive G.711 and PCMU↔PCMA transcoding
/// exactly, so a receiver can tell which frame it got.
pub struct RtpPeer {
    pub sock: UdpSocket,
    pub codec: Codec,
    pub ssrc: u32,
}

const LEVEL: i16 = 8000;

/// The audio of frame `i`.
pub fn frame_audio(i: u32) -> Vec<i16> {
    (0..160)
        .map(|k| {
            if (i >> (k / 10)) & 1 == 1 {
                LEVEL
            } else {
                -LEVEL
            }
        })
        .collect()
}

impl RtpPeer {
    pub async fn new(codec: Codec, ssrc: u32) -> RtpPeer {
        RtpPeer {
            sock: UdpSocket::bind("127.0.0.1:0").await.expect("bind rtp"),
            codec,
            ssrc,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.sock.local_addr().expect("addr")
    }

    /// Send frames `from..to`, one every 20 ms.
    pub async fn send_frames(&self, to_addr: SocketAddr, from: u32, to: u32) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for i in from..to {
            tick.tick().await;
            let mut payload = Vec::with_capacity(160);
            g711::encode_into(self.codec, &frame_audio(i), &mut payload);
            let mut p = Vec::with_capacity(172);
            p.push(0x80);
            p.push(self.codec.payload_type() | if i == from { 0x80 } else { 0 });
            p.extend_from_slice(&(i as u16).to_be_bytes());
            p.extend_from_slice(&(i * 160).to_be_bytes());
            p.extend_from_slice(&self.ssrc.to_be_bytes());
            p.extend_from_slice(&payload);
            let _ = self.sock.send_to(&p, to_addr).await;
        }
    }

    /// Receive for `wait` (or until `want` frames); returns (header, frame index) of each, the
    /// index read back from the decoded audio (None for silence or a non-audio payload type).
    pub async fn receive(&self, want: usize, wait: Duration) -> Vec<(RtpHeader, Option<u32>)> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        let mut buf = [0u8; 2048];
        while out.len() < want {
            let Ok(Ok((n, _))) =
                tokio::time::timeout_at(deadline, self.sock.recv_from(&mut buf)).await
            else {
                break;
            };
            let Ok((h, payload)) = RtpHeader::parse(&buf[..n]) else {
                continue;
            };
            let index = (h.payload_type == self.codec.payload_type())
                .then(|| frame_index(self.codec, payload))
                .flatten();
            out.push((h, index));
        }
        out
    }
}

impl RtpPeer {
    /// Send `samples` as 20 ms packets, one every 20 ms, numbered from `seq`.
    pub async fn send_pcm(&self, to_addr: SocketAddr, samples: &[i16], seq: u16) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for (i, frame) in samples.chunks(160).enumerate() {
            tick.tick().await;
            let mut payload = Vec::with_capacity(160);
            g711::encode_into(self.codec, frame, &mut payload);
            let n = seq.wrapping_add(i as u16);
            let mut p = Vec::with_capacity(172);
            p.push(0x80);
            p.push(self.codec.payload_type() | if i == 0 { 0x80 } else { 0 });
            p.extend_from_slice(&n.to_be_bytes());
            p.extend_from_slice(&(u32::from(n) * 160).to_be_bytes());
            p.extend_from_slice(&self.ssrc.to_be_bytes());
            p.extend_from_slice(&payload);
            let _ = self.sock.send_to(&p, to_addr).await;
        }
    }

    /// An RFC 4733 key press (`event` 0–9 = the digit) with payload type `pt`: three updates and
    /// the end, 20 ms apart.
    pub async fn send_dtmf(&self, to_addr: SocketAddr, event: u8, pt: u8, seq: u16) {
        let ts = u32::from(seq) * 160;
        for (i, end) in [false, false, false, true].into_iter().enumerate() {
            let duration = (i as u16 + 1) * 160;
            let mut p = Vec::with_capacity(16);
            p.push(0x80);
            p.push(pt | if i == 0 { 0x80 } else { 0 });
            p.extend_from_slice(&seq.wrapping_add(i as u16).to_be_bytes());
            p.extend_from_slice(&ts.to_be_bytes());
            p.extend_from_slice(&self.ssrc.to_be_bytes());
            p.push(event);
            p.push(if end { 0x80 | 10 } else { 10 });
            p.extend_from_slice(&duration.to_be_bytes());
            let _ = self.sock.send_to(&p, to_addr).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every audio packet heard for `wait`, decoded, with when it arrived (wall clock).
    pub async fn receive_timed(&self, wait: Duration) -> Vec<(std::time::SystemTime, Vec<i16>)> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        let mut buf = [0u8; 2048];
        while let Ok(got) = tokio::time::timeout_at(deadline, self.sock.recv_from(&mut buf)).await {
            let Ok((n, _)) = got else {
                continue;
            };
            if let Ok((h, payload)) = RtpHeader::parse(&buf[..n])
                && h.payload_type == self.codec.payload_type()
            {
                let mut pcm = Vec::with_capacity(160);
                g711::decode_into(self.codec, payload, &mut pcm);
                out.push((std::time::SystemTime::now(), pcm));
            }
        }
        out
    }

    /// Everything heard for `wait`, decoded, in arrival order: every packet's audio appended.
    pub async fn receive_pcm(&self, wait: Duration) -> Vec<i16> {
        let mut pcm = Vec::new();
        // `decode_into` replaces what its output holds: each packet is decoded on its own, then
        // appended (decoding straight into `pcm` kept only the last packet).
        let mut packet_pcm = Vec::with_capacity(240);
        let deadline = tokio::time::Instant::now() + wait;
        let mut buf = [0u8; 2048];
        while let Ok(got) = tokio::time::timeout_at(deadline, self.sock.recv_from(&mut buf)).await {
            // A receive error (an ICMP report of an earlier send) does not end the listening:
            // only the deadline does.
            let Ok((n, _)) = got else {
                continue;
            };
            if let Ok((h, payload)) = RtpHeader::parse(&buf[..n])
                && h.payload_type == self.codec.payload_type()
            {
                g711::decode_into(self.codec, payload, &mut packet_pcm);
                pcm.extend_from_slice(&packet_pcm);
            }
        }
        pcm
    }
}

/// Which numbered frame a payload carries (None for silence or anything else).
pub fn frame_index(codec: Codec, payload: &[u8]) -> Option<u32> {
    let mut pcm = Vec::with_capacity(160);
    g711::decode_into(codec, payload, &mut pcm);
    if pcm.len() != 160 {
        return None;
    }
    let mut i = 0u32;
    for bit in 0..16 {
        let run = &pcm[bit * 10..bit * 10 + 10];
        if run.iter().any(|s| s.unsigned_abs() < LEVEL as u16 / 2) {
            return None;
        }
        if run.iter().all(|s| *s > 0) {
            i |= 1 << bit;
        } else if !run.iter().all(|s| *s < 0) {
            return None;
        }
    }
    Some(i)
}
