//! SDP offer/answer (RFC 4566, RFC 3264) for one audio stream of G.711 plus telephone-event
//! (RFC 4733). A small line-based parser: we need v/o/s/c/t/m and a few attributes, and want
//! every malformed line to be an error rather than a panic.

use std::net::{IpAddr, SocketAddr};
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SdpError {
    #[error("SDP line {line}: {why}")]
    Syntax { line: usize, why: &'static str },
    #[error("no audio stream offered")]
    NoAudio,
    #[error("no codec in common (we support PCMU and PCMA)")]
    NoCommonCodec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    Pcmu,
    Pcma,
}

impl Codec {
    /// The static RTP payload type (RFC 3551).
    pub fn payload_type(self) -> u8 {
        match self {
            Codec::Pcmu => 0,
            Codec::Pcma => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Pcmu => "PCMU",
            Codec::Pcma => "PCMA",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl Direction {
    fn attr(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }

    /// The direction an answer takes for an offer with this one.
    fn answer(self) -> Self {
        match self {
            Direction::SendOnly => Direction::RecvOnly,
            Direction::RecvOnly => Direction::SendOnly,
            d => d,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpMap {
    pub payload_type: u8,
    pub encoding: String,
    pub clock_rate: u32,
    pub channels: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaDescription {
    pub media: String,
    pub port: u16,
    pub proto: String,
    /// Format tokens as offered (payload type numbers for RTP/AVP).
    pub formats: Vec<String>,
    pub connection: Option<IpAddr>,
    pub rtpmaps: Vec<RtpMap>,
    /// `a=fmtp:<pt> <params>`.
    pub fmtps: Vec<(u8, String)>,
    pub ptime: Option<u32>,
    pub direction: Option<Direction>,
}

impl MediaDescription {
    fn rtpmap(&self, pt: u8) -> Option<&RtpMap> {
        self.rtpmaps.iter().find(|m| m.payload_type == pt)
    }

    /// Payload types in offer order (non-numeric formats skipped).
    pub fn payload_types(&self) -> impl Iterator<Item = u8> + '_ {
        self.formats.iter().filter_map(|f| f.parse().ok())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDescription {
    /// The `o=` line's fields after `o=`.
    pub origin: String,
    pub session_name: String,
    pub connection: Option<IpAddr>,
    pub direction: Option<Direction>,
    pub media: Vec<MediaDescription>,
}

/// Parse an SDP body. Unknown lines and attributes are ignored, as RFC 4566 asks.
pub fn parse(text: &str) -> Result<SessionDescription, SdpError> {
    let mut sd = SessionDescription {
        origin: String::new(),
        session_name: String::new(),
        connection: None,
        direction: None,
        media: Vec::new(),
    };
    let mut saw_version = false;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |why| SdpError::Syntax { line: line_no, why };
        let line = raw.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let (kind, value) = line.split_once('=').ok_or(err("expected <type>=<value>"))?;
        if kind.len() != 1 {
            return Err(err("type must be one character"));
        }
        if !saw_version {
            if kind != "v" || value.trim() != "0" {
                return Err(err("must start with v=0"));
            }
            saw_version = true;
            continue;
        }
        match (kind, sd.media.last_mut()) {
            ("o", None) => sd.origin = value.to_string(),
            ("s", None) => sd.session_name = value.to_string(),
            ("c", None) => sd.connection = parse_connection(value).map_err(err)?,
            ("c", Some(m)) => m.connection = parse_connection(value).map_err(err)?,
            ("m", _) => sd.media.push(parse_media(value).map_err(err)?),
            ("a", None) => {
                if let Some(d) = parse_direction(value) {
                    sd.direction = Some(d);
                }
            }
            ("a", Some(m)) => parse_media_attr(m, value).map_err(err)?,
            _ => {}
        }
    }
    if !saw_version {
        return Err(SdpError::Syntax {
            line: 1,
            why: "empty SDP",
        });
    }
    Ok(sd)
}

fn parse_connection(value: &str) -> Result<Option<IpAddr>, &'static str> {
    let mut it = value.split_ascii_whitespace();
    let (Some(net), Some(addr_type), Some(addr)) = (it.next(), it.next(), it.next()) else {
        return Err("c= needs <nettype> <addrtype> <address>");
    };
    if net != "IN" {
        return Ok(None);
    }
    // Multicast forms carry "/ttl"; we only take the address.
    let addr = addr.split('/').next().unwrap_or(addr);
    match addr_type {
        "IP4" | "IP6" => addr.parse().map(Some).map_err(|_| "bad connection address"),
        _ => Ok(None),
    }
}

fn parse_media(value: &str) -> Result<MediaDescription, &'static str> {
    let mut it = value.split_ascii_whitespace();
    let (Some(media), Some(port), Some(proto)) = (it.next(), it.next(), it.next()) else {
        return Err("m= needs <media> <port> <proto> <fmt>...");
    };
    // "port/count" is allowed; we use the first port.
    let port = port
        .split('/')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or("bad media port")?;
    Ok(MediaDescription {
        media: media.to_string(),
        port,
        proto: proto.to_string(),
        formats: it.map(str::to_string).collect(),
        connection: None,
        rtpmaps: Vec::new(),
        fmtps: Vec::new(),
        ptime: None,
        direction: None,
    })
}

fn parse_direction(value: &str) -> Option<Direction> {
    match value.trim() {
        "sendrecv" => Some(Direction::SendRecv),
        "sendonly" => Some(Direction::SendOnly),
        "recvonly" => Some(Direction::RecvOnly),
        "inactive" => Some(Direction::Inactive),
        _ => None,
    }
}

fn parse_media_attr(m: &mut MediaDescription, value: &str) -> Result<(), &'static str> {
    if let Some(d) = parse_direction(value) {
        m.direction = Some(d);
        return Ok(());
    }
    let (name, rest) = value.split_once(':').unwrap_or((value, ""));
    match name {
        "rtpmap" => {
            let (pt, enc) = rest.trim().split_once(' ').ok_or("bad rtpmap")?;
            let payload_type = pt.parse::<u8>().map_err(|_| "bad rtpmap payload type")?;
            let mut parts = enc.trim().split('/');
            let encoding = parts.next().filter(|e| !e.is_empty()).ok_or("bad rtpmap")?;
            let clock_rate = parts
                .next()
                .and_then(|c| c.parse::<u32>().ok())
                .ok_or("bad rtpmap clock rate")?;
            let channels = match parts.next() {
                Some(c) => Some(c.parse::<u32>().map_err(|_| "bad rtpmap channels")?),
                None => None,
            };
            m.rtpmaps.push(RtpMap {
                payload_type,
                encoding: encoding.to_string(),
                clock_rate,
                channels,
            });
        }
        "fmtp" => {
            let (pt, params) = rest.trim().split_once(' ').unwrap_or((rest.trim(), ""));
            if let Ok(pt) = pt.parse::<u8>() {
                m.fmtps.push((pt, params.trim().to_string()));
            }
        }
        // A nonsensical ptime is ignored rather than failing the whole offer.
        "ptime" => {
            m.ptime = rest
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|p| (1..=1000).contains(p))
        }
        _ => {}
    }
    Ok(())
}

/// The result of answering an offer: the SDP to send and what the media side needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub sdp: String,
    pub codec: Codec,
    pub payload_type: u8,
    pub telephone_event: Option<u8>,
    /// Where to send RTP; `None` when the offer has no usable address (e.g. `0.0.0.0` hold).
    pub remote_rtp: Option<SocketAddr>,
    /// The packet time we send at.
    pub ptime_ms: u32,
}

/// Frames are 20 ms of G.711 (160 samples at 8 kHz).
pub const PTIME_MS: u32 = 20;

/// Answer `offer` with one audio stream at `local_ip:local_port`. Codec preference: PCMU, then
/// PCMA, as offered; telephone-event/8000 is echoed with the offer's payload type. Other streams
/// are declined with port 0, as RFC 3264 §6 requires (one m= line in the answer per offer line).
pub fn answer(
    offer: &SessionDescription,
    local_ip: IpAddr,
    local_port: u16,
    session_id: u64,
) -> Result<Answer, SdpError> {
    let mut chosen: Option<(usize, Codec, u8, Option<u8>)> = None;
    let mut saw_audio = false;
    for (idx, m) in offer.media.iter().enumerate() {
        if m.media != "audio" || m.port == 0 || !m.proto.starts_with("RTP/AVP") {
            continue;
        }
        saw_audio = true;
        let codec_pt = |want: Codec| {
            m.payload_types().find(|&pt| match m.rtpmap(pt) {
                Some(map) => {
                    map.encoding.eq_ignore_ascii_case(want.name()) && map.clock_rate == 8000
                }
                None => pt == want.payload_type(),
            })
        };
        let pick = codec_pt(Codec::Pcmu)
            .map(|pt| (Codec::Pcmu, pt))
            .or_else(|| codec_pt(Codec::Pcma).map(|pt| (Codec::Pcma, pt)));
        if let Some((codec, pt)) = pick {
            let te = m.payload_types().find(|&pt| {
                m.rtpmap(pt).is_some_and(|map| {
                    map.encoding.eq_ignore_ascii_case("telephone-event") && map.clock_rate == 8000
                })
            });
            chosen = Some((idx, codec, pt, te));
            break;
        }
    }
    let Some((idx, codec, pt, te)) = chosen else {
        return Err(if saw_audio {
            SdpError::NoCommonCodec
        } else {
            SdpError::NoAudio
        });
    };
    let m = offer.media.get(idx).ok_or(SdpError::NoAudio)?;
    let remote_ip = m.connection.or(offer.connection);
    let remote_rtp = remote_ip
        .filter(|ip| !ip.is_unspecified())
        .map(|ip| SocketAddr::new(ip, m.port));
    let direction = m
        .direction
        .or(offer.direction)
        .unwrap_or(Direction::SendRecv)
        .answer();

    let mut sdp = session_header(local_ip, session_id);
    for (i, om) in offer.media.iter().enumerate() {
        if i == idx {
            sdp.push_str(&audio_media(
                local_port,
                &[(codec, pt)],
                te,
                Some(direction),
            ));
        } else {
            let fmt = om.formats.first().map_or("0", String::as_str);
            sdp.push_str(&format!("m={} 0 {} {fmt}\r\n", om.media, om.proto));
        }
    }
    Ok(Answer {
        sdp,
        codec,
        payload_type: pt,
        telephone_event: te,
        remote_rtp,
        ptime_ms: PTIME_MS,
    })
}

/// An offer for outbound calls: PCMU, PCMA and telephone-event 101.
pub fn offer(local_ip: IpAddr, local_port: u16, session_id: u64) -> String {
    let mut sdp = session_header(local_ip, session_id);
    sdp.push_str(&audio_media(
        local_port,
        &[(Codec::Pcmu, 0), (Codec::Pcma, 8)],
        Some(101),
        Some(Direction::SendRecv),
    ));
    sdp
}

fn addr_type(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "IP4",
        IpAddr::V6(_) => "IP6",
    }
}

fn session_header(ip: IpAddr, session_id: u64) -> String {
    let at = addr_type(ip);
    format!(
        "v=0\r\no=Sautikit {session_id} {session_id} IN {at} {ip}\r\ns=Sautikit\r\nc=IN {at} {ip}\r\nt=0 0\r\n"
    )
}

fn audio_media(
    port: u16,
    codecs: &[(Codec, u8)],
    te: Option<u8>,
    dir: Option<Direction>,
) -> String {
    let mut fmts: Vec<String> = codecs.iter().map(|(_, pt)| pt.to_string()).collect();
    if let Some(te) = te {
        fmts.push(te.to_string());
    }
    let mut s = format!("m=audio {port} RTP/AVP {}\r\n", fmts.join(" "));
    for (codec, pt) in codecs {
        s.push_str(&format!("a=rtpmap:{pt} {}/8000\r\n", codec.name()));
    }
    if let Some(te) = te {
        s.push_str(&format!(
            "a=rtpmap:{te} telephone-event/8000\r\na=fmtp:{te} 0-16\r\n"
        ));
    }
    s.push_str(&format!("a=ptime:{PTIME_MS}\r\n"));
    if let Some(d) = dir {
        s.push_str(&format!("a={}\r\n", d.attr()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// What sipp's uac_pcap scenario and most softphones offer.
    const SIPP_OFFER: &str = "v=0\r\n\
o=user1 53655765 2353687637 IN IP4 192.168.1.20\r\n\
s=-\r\n\
c=IN IP4 192.168.1.20\r\n\
t=0 0\r\n\
m=audio 6000 RTP/AVP 8 0 101\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-11,16\r\n\
a=ptime:20\r\n";

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));

    #[test]
    fn answers_sipp_offer() {
        let offer = parse(SIPP_OFFER).expect("parse");
        assert_eq!(offer.media.len(), 1);
        let a = answer(&offer, LOCAL, 20000, 42).expect("answer");
        assert_eq!(a.codec, Codec::Pcmu);
        assert_eq!(a.payload_type, 0);
        assert_eq!(a.telephone_event, Some(101));
        assert_eq!(
            a.remote_rtp,
            Some("192.168.1.20:6000".parse().expect("addr"))
        );
        assert_eq!(a.ptime_ms, 20);
        assert!(
            a.sdp.contains("m=audio 20000 RTP/AVP 0 101\r\n"),
            "{}",
            a.sdp
        );
        assert!(a.sdp.contains("c=IN IP4 10.0.0.1\r\n"));
        assert!(a.sdp.contains("a=rtpmap:101 telephone-event/8000\r\n"));
        assert!(a.sdp.contains("a=sendrecv\r\n"));
        // Our answer parses back.
        let back = parse(&a.sdp).expect("reparse");
        assert_eq!(back.media.first().map(|m| m.port), Some(20000));
    }

    #[test]
    fn pcma_only_and_dynamic_te() {
        let text = SIPP_OFFER
            .replace("m=audio 6000 RTP/AVP 8 0 101", "m=audio 6000 RTP/AVP 8 96")
            .replace(
                "a=rtpmap:101 telephone-event/8000",
                "a=rtpmap:96 telephone-event/8000",
            )
            .replace("a=rtpmap:0 PCMU/8000\r\n", "");
        let a = answer(&parse(&text).expect("parse"), LOCAL, 20000, 1).expect("answer");
        assert_eq!(
            (a.codec, a.payload_type, a.telephone_event),
            (Codec::Pcma, 8, Some(96))
        );
    }

    #[test]
    fn g729_only_is_no_common_codec() {
        let text = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\n\
m=audio 4000 RTP/AVP 18\r\na=rtpmap:18 G729/8000\r\na=fmtp:18 annexb=no\r\n";
        let offer = parse(text).expect("parse");
        assert_eq!(answer(&offer, LOCAL, 1, 1), Err(SdpError::NoCommonCodec));
    }

    #[test]
    fn declines_video_and_handles_hold() {
        let text = "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=-\r\nt=0 0\r\n\
m=video 5000 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n\
m=audio 4000 RTP/AVP 0\r\nc=IN IP4 0.0.0.0\r\na=sendonly\r\n";
        let a = answer(&parse(text).expect("parse"), LOCAL, 7000, 1).expect("answer");
        assert_eq!(a.remote_rtp, None);
        assert!(a.sdp.contains("m=video 0 RTP/AVP 96\r\n"));
        assert!(a.sdp.contains("a=recvonly\r\n"));
        let video_at = a.sdp.find("m=video").expect("video");
        let audio_at = a.sdp.find("m=audio").expect("audio");
        assert!(video_at < audio_at);
    }

    #[test]
    fn offer_round_trip() {
        let o = offer(LOCAL, 30000, 7);
        let sd = parse(&o).expect("parse");
        let m = sd.media.first().expect("m");
        assert_eq!(m.formats, ["0", "8", "101"]);
        assert_eq!(sd.connection, Some(LOCAL));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse("").is_err());
        assert!(parse("hello").is_err());
        assert!(parse("v=0\r\nm=audio x RTP/AVP 0\r\n").is_err());
        assert!(parse("v=0\r\nc=IN IP4 999.1.1.1\r\n").is_err());
        assert!(parse("v=0\r\nm=audio 1 RTP/AVP 0\r\na=rtpmap:999 PCMU/8000\r\n").is_err());
    }
}
