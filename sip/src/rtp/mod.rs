//! RTP (RFC 3550) headers, a sender that numbers packets, G.711 and real-time pacing.

pub mod g711;
mod relay;
mod wheel;

pub use relay::{RESYNC_GAP, RelayKind, RtpRelay, RtpView};
pub use wheel::{DueTicks, FrameWheel};

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RtpError {
    #[error("packet shorter than its header")]
    TooShort,
    #[error("RTP version {0}, expected 2")]
    BadVersion(u8),
    #[error("invalid padding length")]
    BadPadding,
}

/// A header extension (RFC 3550 §5.3.1): profile-defined id and data (a multiple of 4 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpExtension {
    pub profile: u16,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpHeader {
    /// Whether the packet carries padding (stripped from the payload by [`RtpHeader::parse`]).
    pub padding: bool,
    pub marker: bool,
    pub payload_type: u8,
    pub sequence: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    pub csrcs: Vec<u32>,
    pub extension: Option<RtpExtension>,
}

impl RtpHeader {
    /// A plain header: no padding, CSRCs or extension.
    pub fn new(payload_type: u8, sequence: u16, timestamp: u32, ssrc: u32, marker: bool) -> Self {
        Self {
            padding: false,
            marker,
            payload_type: payload_type & 0x7f,
            sequence,
            timestamp,
            ssrc,
            csrcs: Vec::new(),
            extension: None,
        }
    }

    /// Parse a packet into its header and payload (padding removed).
    pub fn parse(packet: &[u8]) -> Result<(RtpHeader, &[u8]), RtpError> {
        let fixed: &[u8; 12] = packet
            .get(..12)
            .and_then(|s| s.try_into().ok())
            .ok_or(RtpError::TooShort)?;
        let [b0, b1, s0, s1, t0, t1, t2, t3, c0, c1, c2, c3] = *fixed;
        let version = b0 >> 6;
        if version != 2 {
            return Err(RtpError::BadVersion(version));
        }
        let padding = b0 & 0x20 != 0;
        let has_ext = b0 & 0x10 != 0;
        let cc = usize::from(b0 & 0x0f);
        let mut pos = 12;
        let mut csrcs = Vec::with_capacity(cc);
        for _ in 0..cc {
            csrcs.push(read_u32(packet, pos)?);
            pos += 4;
        }
        let extension = if has_ext {
            let profile = read_u16(packet, pos)?;
            let words = usize::from(read_u16(packet, pos + 2)?);
            pos += 4;
            let data = packet.get(pos..pos + words * 4).ok_or(RtpError::TooShort)?;
            pos += words * 4;
            Some(RtpExtension {
                profile,
                data: data.to_vec(),
            })
        } else {
            None
        };
        let mut payload = packet.get(pos..).ok_or(RtpError::TooShort)?;
        if padding {
            let n = usize::from(*payload.last().ok_or(RtpError::BadPadding)?);
            if n == 0 || n > payload.len() {
                return Err(RtpError::BadPadding);
            }
            payload = payload
                .get(..payload.len() - n)
                .ok_or(RtpError::BadPadding)?;
        }
        Ok((
            RtpHeader {
                padding,
                marker: b1 & 0x80 != 0,
                payload_type: b1 & 0x7f,
                sequence: u16::from_be_bytes([s0, s1]),
                timestamp: u32::from_be_bytes([t0, t1, t2, t3]),
                ssrc: u32::from_be_bytes([c0, c1, c2, c3]),
                csrcs,
                extension,
            },
            payload,
        ))
    }

    /// Append the header's wire form to `buf`. With `padding` set, the caller appends the padding
    /// bytes (the last one holding their count) after the payload.
    pub fn write(&self, buf: &mut Vec<u8>) {
        let cc = self.csrcs.len().min(15);
        let b0 = 0x80
            | (u8::from(self.padding) << 5)
            | (u8::from(self.extension.is_some()) << 4)
            | cc as u8;
        buf.push(b0);
        buf.push((u8::from(self.marker) << 7) | (self.payload_type & 0x7f));
        buf.extend_from_slice(&self.sequence.to_be_bytes());
        buf.extend_from_slice(&self.timestamp.to_be_bytes());
        buf.extend_from_slice(&self.ssrc.to_be_bytes());
        for c in self.csrcs.iter().take(cc) {
            buf.extend_from_slice(&c.to_be_bytes());
        }
        if let Some(ext) = &self.extension {
            // The length field counts 32-bit words; pad the data up to a whole word.
            let words = ext.data.len().div_ceil(4).min(usize::from(u16::MAX));
            buf.extend_from_slice(&ext.profile.to_be_bytes());
            buf.extend_from_slice(&(words as u16).to_be_bytes());
            let mut data = ext.data.clone();
            data.resize(words * 4, 0);
            buf.extend_from_slice(&data);
        }
    }

    /// Header length on the wire.
    pub fn wire_len(&self) -> usize {
        12 + 4 * self.csrcs.len().min(15)
            + self
                .extension
                .as_ref()
                .map_or(0, |e| 4 + e.data.len().div_ceil(4) * 4)
    }
}

fn read_u32(b: &[u8], at: usize) -> Result<u32, RtpError> {
    let s: [u8; 4] = b
        .get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .ok_or(RtpError::TooShort)?;
    Ok(u32::from_be_bytes(s))
}

fn read_u16(b: &[u8], at: usize) -> Result<u16, RtpError> {
    let s: [u8; 2] = b
        .get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .ok_or(RtpError::TooShort)?;
    Ok(u16::from_be_bytes(s))
}

/// Numbers outgoing packets of one stream: sequence +1 per packet, timestamp + samples.
#[derive(Debug, Clone)]
pub struct RtpSender {
    pub ssrc: u32,
    pub seq: u16,
    pub timestamp: u32,
    pub payload_type: u8,
    marker_next: bool,
}

impl RtpSender {
    /// Random SSRC, initial sequence number and timestamp (RFC 3550 §5.1); the first packet
    /// starts a talkspurt.
    pub fn new(payload_type: u8) -> Self {
        let r = crate::message::random_bytes::<10>();
        Self {
            ssrc: u32::from_be_bytes([r[0], r[1], r[2], r[3]]),
            seq: u16::from_be_bytes([r[4], r[5]]),
            timestamp: u32::from_be_bytes([r[6], r[7], r[8], r[9]]),
            payload_type: payload_type & 0x7f,
            marker_next: true,
        }
    }

    /// Set the marker bit on the next packet (first packet after silence, RFC 3551 §4.1).
    pub fn start_talkspurt(&mut self) {
        self.marker_next = true;
    }

    /// Write one packet carrying `payload` (worth `samples` samples) into `buf` (cleared first).
    pub fn next_packet(&mut self, payload: &[u8], samples: u32, buf: &mut Vec<u8>) {
        self.packet_with(self.payload_type, payload, samples, buf);
    }

    /// Like [`RtpSender::next_packet`] with another payload type on the same stream (RFC 4733
    /// telephone-events share SSRC and sequence numbering with the audio).
    pub fn packet_with(
        &mut self,
        payload_type: u8,
        payload: &[u8],
        samples: u32,
        buf: &mut Vec<u8>,
    ) {
        buf.clear();
        RtpHeader::new(
            payload_type,
            self.seq,
            self.timestamp,
            self.ssrc,
            self.marker_next,
        )
        .write(buf);
        buf.extend_from_slice(payload);
        self.marker_next = false;
        self.seq = self.seq.wrapping_add(1);
        self.timestamp = self.timestamp.wrapping_add(samples);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let mut h = RtpHeader::new(0, 65535, u32::MAX, 0xdeadbeef, true);
        let mut buf = Vec::new();
        h.write(&mut buf);
        assert_eq!(buf.len(), 12);
        assert_eq!(
            buf,
            [
                0x80, 0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xde, 0xad, 0xbe, 0xef
            ]
        );
        buf.extend_from_slice(&[1, 2, 3]);
        let (back, payload) = RtpHeader::parse(&buf).expect("parse");
        assert_eq!(back, h);
        assert_eq!(payload, [1, 2, 3]);

        h.csrcs = vec![1, 2];
        h.extension = Some(RtpExtension {
            profile: 0xbede,
            data: vec![9, 9, 9, 9],
        });
        h.padding = true;
        h.marker = false;
        h.payload_type = 101;
        let mut buf = Vec::new();
        h.write(&mut buf);
        assert_eq!(buf.len(), h.wire_len());
        buf.extend_from_slice(&[7, 7, 0, 0, 3]);
        let (back, payload) = RtpHeader::parse(&buf).expect("parse");
        assert_eq!(back, h);
        assert_eq!(payload, [7, 7]);
    }

    #[test]
    fn rejects_bad_packets() {
        assert_eq!(RtpHeader::parse(&[0x80; 5]), Err(RtpError::TooShort));
        assert_eq!(
            RtpHeader::parse(&[0x40; 12]).map(|_| ()),
            Err(RtpError::BadVersion(1))
        );
        // Four CSRCs announced, none present.
        let mut b = vec![0x84, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(RtpHeader::parse(&b), Err(RtpError::TooShort));
        b[0] = 0xa0; // padding with an empty payload
        assert_eq!(RtpHeader::parse(&b), Err(RtpError::BadPadding));
        b.push(9); // padding longer than the payload
        assert_eq!(RtpHeader::parse(&b), Err(RtpError::BadPadding));
    }

    #[test]
    fn sender_numbers_packets() {
        let mut s = RtpSender::new(8);
        s.seq = u16::MAX;
        let (ts, ssrc) = (s.timestamp, s.ssrc);
        let mut buf = Vec::new();
        s.next_packet(&[0xd5; 160], 160, &mut buf);
        let (h, p) = RtpHeader::parse(&buf).expect("parse");
        assert!(h.marker);
        assert_eq!(
            (h.sequence, h.timestamp, h.ssrc, h.payload_type),
            (u16::MAX, ts, ssrc, 8)
        );
        assert_eq!(p.len(), 160);
        s.next_packet(&[0xd5; 160], 160, &mut buf);
        let (h, _) = RtpHeader::parse(&buf).expect("parse");
        assert!(!h.marker);
        assert_eq!((h.sequence, h.timestamp), (0, ts.wrapping_add(160)));
        s.start_talkspurt();
        s.next_packet(&[], 160, &mut buf);
        assert!(RtpHeader::parse(&buf).expect("parse").0.marker);
    }
}
