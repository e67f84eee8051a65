//! G.711 µ-law (PCMU) and A-law (PCMA), bit-exact with the classic Sun Microsystems reference
//! implementation (g711.c) that most telephony stacks derive from.

/// µ-law encoding of silence (linear 0).
pub const SILENCE_PCMU: u8 = 0xFF;
/// A-law encoding of silence (linear 0 encodes to 0xD5).
pub const SILENCE_PCMA: u8 = 0xD5;

const SEG_UEND: [i32; 8] = [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF];
const SEG_AEND: [i32; 8] = [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF];
const BIAS: i32 = 0x84;
const CLIP: i32 = 8159;

fn segment(val: i32, table: &[i32; 8]) -> i32 {
    table
        .iter()
        .position(|&end| val <= end)
        .map_or(8, |i| i as i32)
}

pub mod ulaw {
    use super::*;

    /// 16-bit linear PCM to µ-law.
    pub fn encode(sample: i16) -> u8 {
        let mut pcm = i32::from(sample) >> 2;
        let mask = if pcm < 0 {
            pcm = -pcm;
            0x7F
        } else {
            0xFF
        };
        pcm = pcm.min(CLIP) + (BIAS >> 2);
        let seg = segment(pcm, &SEG_UEND);
        if seg >= 8 {
            return (0x7F ^ mask) as u8;
        }
        let uval = (seg << 4) | ((pcm >> (seg + 1)) & 0xF);
        (uval ^ mask) as u8
    }

    /// µ-law to 16-bit linear PCM.
    pub fn decode(code: u8) -> i16 {
        let u = i32::from(!code);
        let mut t = ((u & 0x0F) << 3) + BIAS;
        t <<= (u & 0x70) >> 4;
        let v = if u & 0x80 != 0 { BIAS - t } else { t - BIAS };
        v as i16
    }
}

pub mod alaw {
    use super::*;

    /// 16-bit linear PCM to A-law.
    pub fn encode(sample: i16) -> u8 {
        let mut pcm = i32::from(sample) >> 3;
        let mask = if pcm >= 0 {
            0xD5
        } else {
            pcm = -pcm - 1;
            0x55
        };
        let seg = segment(pcm, &SEG_AEND);
        if seg >= 8 {
            return (0x7F ^ mask) as u8;
        }
        let mut aval = seg << 4;
        aval |= if seg < 2 {
            (pcm >> 1) & 0xF
        } else {
            (pcm >> seg) & 0xF
        };
        (aval ^ mask) as u8
    }

    /// A-law to 16-bit linear PCM.
    pub fn decode(code: u8) -> i16 {
        let a = i32::from(code ^ 0x55);
        let mut t = (a & 0x0F) << 4;
        let seg = (a & 0x70) >> 4;
        match seg {
            0 => t += 8,
            1 => t += 0x108,
            _ => {
                t += 0x108;
                t <<= seg - 1;
            }
        }
        (if a & 0x80 != 0 { t } else { -t }) as i16
    }
}

/// Encode a buffer of linear samples into `out`, replacing what it held (it is cleared first).
pub fn encode_into(codec: crate::sdp::Codec, samples: &[i16], out: &mut Vec<u8>) {
    out.clear();
    match codec {
        crate::sdp::Codec::Pcmu => out.extend(samples.iter().map(|&s| ulaw::encode(s))),
        crate::sdp::Codec::Pcma => out.extend(samples.iter().map(|&s| alaw::encode(s))),
    }
}

/// Decode a buffer of G.711 bytes into `out`, replacing what it held (it is cleared first): to
/// collect several packets' audio, decode each into a scratch buffer and append that.
pub fn decode_into(codec: crate::sdp::Codec, bytes: &[u8], out: &mut Vec<i16>) {
    out.clear();
    match codec {
        crate::sdp::Codec::Pcmu => out.extend(bytes.iter().map(|&b| ulaw::decode(b))),
        crate::sdp::Codec::Pcma => out.extend(bytes.iter().map(|&b| alaw::decode(b))),
    }
}

/// Per-byte tables that turn one law's codes into the other's (decode, then encode), for relaying
/// between a PCMU leg and a PCMA leg without a detour through linear samples per packet. Built on
/// first use, then shared.
static ULAW_TO_ALAW: std::sync::LazyLock<[u8; 256]> =
    std::sync::LazyLock::new(|| std::array::from_fn(|c| alaw::encode(ulaw::decode(c as u8))));
static ALAW_TO_ULAW: std::sync::LazyLock<[u8; 256]> =
    std::sync::LazyLock::new(|| std::array::from_fn(|c| ulaw::encode(alaw::decode(c as u8))));

/// The table that turns `from` codes into `to` codes (index by the code); `None` when the codecs
/// are the same and the bytes pass unchanged.
pub fn transcode_table(
    from: crate::sdp::Codec,
    to: crate::sdp::Codec,
) -> Option<&'static [u8; 256]> {
    use crate::sdp::Codec;
    match (from, to) {
        (Codec::Pcmu, Codec::Pcma) => Some(&ULAW_TO_ALAW),
        (Codec::Pcma, Codec::Pcmu) => Some(&ALAW_TO_ULAW),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulaw_reference_values() {
        assert_eq!(ulaw::decode(0x00), -32124);
        assert_eq!(ulaw::decode(0x80), 32124);
        assert_eq!(ulaw::decode(0xFF), 0);
        assert_eq!(ulaw::decode(0x7F), 0);
        assert_eq!(ulaw::decode(0x7E), -8);
        assert_eq!(ulaw::decode(0xFE), 8);
        assert_eq!(ulaw::decode(0x0F), -16764);
        assert_eq!(ulaw::encode(0), SILENCE_PCMU);
        assert_eq!(ulaw::encode(i16::MAX), 0x80);
        assert_eq!(ulaw::encode(i16::MIN), 0x00);
        assert_eq!(ulaw::encode(-1), 0x7E);
    }

    #[test]
    fn alaw_reference_values() {
        assert_eq!(alaw::decode(0xD5), 8);
        assert_eq!(alaw::decode(0x55), -8);
        assert_eq!(alaw::decode(0xAA), 32256);
        assert_eq!(alaw::decode(0x2A), -32256);
        assert_eq!(alaw::encode(0), SILENCE_PCMA);
        assert_eq!(alaw::encode(-1), 0x55);
        assert_eq!(alaw::encode(i16::MAX), 0xAA);
        assert_eq!(alaw::encode(i16::MIN), 0x2A);
    }

    #[test]
    fn every_code_round_trips() {
        // Decoding then encoding any code gives the code back (except µ-law's two zeros).
        for code in 0..=255u8 {
            if code != 0x7F {
                assert_eq!(ulaw::encode(ulaw::decode(code)), code, "ulaw {code:#x}");
            }
            assert_eq!(alaw::encode(alaw::decode(code)), code, "alaw {code:#x}");
        }
    }

    #[test]
    fn transcode_tables_match_decode_then_encode() {
        use crate::sdp::Codec;
        assert!(transcode_table(Codec::Pcmu, Codec::Pcmu).is_none());
        assert!(transcode_table(Codec::Pcma, Codec::Pcma).is_none());
        let u2a = transcode_table(Codec::Pcmu, Codec::Pcma).expect("table");
        let a2u = transcode_table(Codec::Pcma, Codec::Pcmu).expect("table");
        for code in 0..=255u8 {
            assert_eq!(u2a[usize::from(code)], alaw::encode(ulaw::decode(code)));
            assert_eq!(a2u[usize::from(code)], ulaw::encode(alaw::decode(code)));
        }
        assert_eq!(u2a[usize::from(SILENCE_PCMU)], SILENCE_PCMA);
        // Silence maps to (near) silence both ways; loud codes stay within one step.
        assert!(ulaw::decode(a2u[usize::from(SILENCE_PCMA)]).abs() <= 8);
        for code in 0..=255u8 {
            let (x, y) = (ulaw::decode(code), alaw::decode(u2a[usize::from(code)]));
            let tolerance = i32::from(x).abs() / 16 + 16;
            assert!(
                (i32::from(x) - i32::from(y)).abs() <= tolerance,
                "{code:#x}: {x} vs {y}"
            );
        }
    }
}
