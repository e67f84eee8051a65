//! A caller in the test process that receives RTP: INVITE with a PCMU offer, ACK, then it
//! records every RTP packet with the kernel's receive timestamp (so arrival times are not skewed
//! by the test process's own scheduling) until the engine's BYE, which it answers.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::socket::{MsgFlags, setsockopt, sockopt};

use sautikit_sip::rtp::{RtpHeader, g711};

use super::calls::NUMBER;

/// One RTP packet as the caller received it.
pub struct Received {
    /// When the kernel received it (`SO_TIMESTAMPNS`, wall clock).
    pub at: Duration,
    pub header: RtpHeader,
    pub payload: Vec<u8>,
}

/// A caller in this process: INVITE with a PCMU offer, ACK, then it listens on its RTP port
/// (on a thread of its own, so arrival times are not skewed by the test's runtime) until the
/// engine's BYE, which it answers.
pub struct Caller {
    sip: std::net::UdpSocket,
    rtp: std::net::UdpSocket,
    server: SocketAddr,
    call_id: String,
    /// Behind a NAT: the SDP names a port nobody reads, and the caller's packets come from
    /// another; the engine must answer to where they come from.
    behind_nat: Option<std::net::UdpSocket>,
}

fn header_value<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

impl Caller {
    pub fn new(server: SocketAddr) -> Caller {
        let sip = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let rtp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sip.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Caller {
            sip,
            rtp,
            server,
            call_id: format!("{}@media-test", uuid::Uuid::now_v7().simple()),
            behind_nat: None,
        }
    }

    pub fn behind_nat(mut self) -> Caller {
        self.behind_nat = Some(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        self
    }

    fn headers(&self, method: &str, cseq: u32, branch: &str, to_tag: &str) -> String {
        let me = self.sip.local_addr().unwrap();
        format!(
            "Via: SIP/2.0/UDP {me};branch={branch}\r\nFrom: <sip:254711000002@{me}>;tag=caller\r\n\
             To: <sip:{NUMBER}@{s}>{to_tag}\r\nCall-ID: {c}\r\nCSeq: {cseq} {method}\r\n\
             Contact: <sip:caller@{me}>\r\nMax-Forwards: 70\r\n",
            s = self.server,
            c = self.call_id,
        )
    }

    fn recv_sip(&self) -> String {
        let mut buf = vec![0u8; 65535];
        let (n, _) = self
            .sip
            .recv_from(&mut buf)
            .expect("a SIP message within 30 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Place the call and take everything the engine sends until its BYE.
    pub fn call(self) -> Vec<Received> {
        let rtp_addr = match &self.behind_nat {
            Some(decoy) => decoy.local_addr().unwrap(),
            None => self.rtp.local_addr().unwrap(),
        };
        let sdp = format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio {} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n",
            rtp_addr.port()
        );
        let invite = format!(
            "INVITE sip:{NUMBER}@{} SIP/2.0\r\n{}Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{sdp}",
            self.server,
            self.headers("INVITE", 1, "z9hG4bKmediainv", ""),
            sdp.len()
        );
        self.sip.send_to(invite.as_bytes(), self.server).unwrap();
        let ok = loop {
            let m = self.recv_sip();
            let first = m.lines().next().unwrap_or("").to_owned();
            if first.starts_with("SIP/2.0 200") {
                break m;
            }
            assert!(
                first.starts_with("SIP/2.0 1"),
                "unexpected answer to INVITE: {first}"
            );
        };
        let to_tag = header_value(&ok, "To")
            .and_then(|t| t.split(";tag=").nth(1))
            .map(|t| format!(";tag={t}"))
            .unwrap_or_default();
        let ack = format!(
            "ACK sip:{NUMBER}@{} SIP/2.0\r\n{}Content-Length: 0\r\n\r\n",
            self.server,
            self.headers("ACK", 1, "z9hG4bKmediaack", &to_tag)
        );
        self.sip.send_to(ack.as_bytes(), self.server).unwrap();
        if self.behind_nat.is_some() {
            // One packet of silence from the real port to the engine's media address.
            let media = engine_media(&ok);
            let mut packet = vec![0x80, 0x00, 0, 1, 0, 0, 0, 160, 0x12, 0x34, 0x56, 0x78];
            packet.extend(std::iter::repeat_n(0xFFu8, 160));
            self.rtp.send_to(&packet, media).unwrap();
        }

        // RTP on its own thread until the BYE.
        let rtp = self.rtp.try_clone().unwrap();
        rtp.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        setsockopt(&rtp, sockopt::ReceiveTimestampns, &true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_rx = stop.clone();
        let listener = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while !stop_rx.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, Some(at))) =
                    recv_stamped(rtp.as_raw_fd(), &mut buf, MsgFlags::empty())
                    && let Ok((header, payload)) = RtpHeader::parse(&buf[..n])
                {
                    got.push(Received {
                        at,
                        header,
                        payload: payload.to_vec(),
                    });
                }
            }
            got
        });
        loop {
            let m = self.recv_sip();
            if m.starts_with("BYE ") {
                let mut resp = String::from("SIP/2.0 200 OK\r\n");
                for name in ["Via", "From", "To", "Call-ID", "CSeq"] {
                    if let Some(v) = header_value(&m, name) {
                        resp.push_str(&format!("{name}: {v}\r\n"));
                    }
                }
                resp.push_str("Content-Length: 0\r\n\r\n");
                self.sip.send_to(resp.as_bytes(), self.server).unwrap();
                break;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        listener.join().unwrap()
    }
}

#[allow(unused_imports)]
pub use sautikit::loadtest::trunk::recv_stamped;

/// Where the engine's SDP answer says its RTP is.
fn engine_media(ok: &str) -> SocketAddr {
    let body = ok.split("\r\n\r\n").nth(1).unwrap_or("");
    let ip = body
        .lines()
        .find_map(|l| l.strip_prefix("c=IN IP4 "))
        .expect("c= line")
        .trim();
    let port = body
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|m| m.split_whitespace().next())
        .expect("m= line");
    format!("{ip}:{port}").parse().unwrap()
}

/// The caller's audio in sequence order, decoded from µ-law.
pub fn decode(packets: &[Received]) -> Vec<i16> {
    let mut sorted: Vec<&Received> = packets.iter().collect();
    sorted.sort_by_key(|p| p.header.sequence_number_unwrapped());
    let mut out = Vec::new();
    for p in sorted {
        if p.header.payload_type == 0 {
            out.extend(p.payload.iter().map(|&b| g711::ulaw::decode(b)));
        }
    }
    out
}

trait SeqExt {
    fn sequence_number_unwrapped(&self) -> u32;
}

impl SeqExt for RtpHeader {
    // Calls here are far shorter than a 16-bit wrap (21 minutes).
    fn sequence_number_unwrapped(&self) -> u32 {
        u32::from(self.sequence)
    }
}

/// Spacing of consecutive packets' arrivals, in ms, sorted.
pub fn spacings(packets: &[Received]) -> Vec<f64> {
    let mut d: Vec<f64> = packets
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_secs_f64() * 1000.0)
        .collect();
    d.sort_by(f64::total_cmp);
    d
}

pub fn deviation_p99(spacing: &[f64]) -> f64 {
    let mut dev: Vec<f64> = spacing.iter().map(|s| (s - 20.0).abs()).collect();
    dev.sort_by(f64::total_cmp);
    dev[((dev.len() - 1) as f64 * 0.99) as usize]
}
