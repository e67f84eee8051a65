//! Audio checks shared by the media and `dial` tests: sip-tester's captures and how close what
//! was heard is to what was sent.

use std::path::Path;

use sautikit_sip::rtp::{RtpHeader, g711};

pub const SIP_TESTER: &str = "/usr/share/sip-tester";

/// Copy sip-tester's captures next to a scenario (sipp reads them from its working directory).
pub fn copy_pcaps(dir: &Path) {
    for entry in std::fs::read_dir(SIP_TESTER).expect("sip-tester's captures (scripts/test.sh)") {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
}

/// First and last sample louder than a quiet floor: the spoken span.
pub fn voiced_span(s: &[i16]) -> Option<(usize, usize)> {
    let loud = |x: &i16| x.unsigned_abs() > 600;
    Some((s.iter().position(loud)?, s.iter().rposition(loud)?))
}

/// The best normalised cross-correlation of `a` against `b`, spoken spans aligned, within
/// ±`search` samples.
pub fn correlation(a: &[i16], b: &[i16], search: i64) -> f64 {
    let (Some((a0, a1)), Some((b0, _))) = (voiced_span(a), voiced_span(b)) else {
        return 0.0;
    };
    let a = &a[a0..=a1];
    let mut best = 0.0f64;
    for lag in -search..=search {
        let start = b0 as i64 + lag;
        if start < 0 {
            continue;
        }
        let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
        for (i, &x) in a.iter().enumerate() {
            let j = start as usize + i;
            let y = b.get(j).copied().unwrap_or(0);
            ab += f64::from(x) * f64::from(y);
            aa += f64::from(x) * f64::from(x);
            bb += f64::from(y) * f64::from(y);
        }
        if aa > 0.0 && bb > 0.0 {
            best = best.max(ab / (aa.sqrt() * bb.sqrt()));
        }
    }
    best
}

/// A-law audio from sip-tester's g711a.pcap, as the engine should have recorded it.
pub fn pcap_alaw(path: &Path) -> Vec<i16> {
    let f = std::fs::read(path).unwrap();
    let mut off = 24;
    let mut out = Vec::new();
    while off + 16 <= f.len() {
        let incl = u32::from_le_bytes(f[off + 8..off + 12].try_into().unwrap()) as usize;
        off += 16;
        let pkt = &f[off..off + incl];
        off += incl;
        let ip = &pkt[14..];
        let ihl = usize::from(ip[0] & 15) * 4;
        let rtp = &ip[ihl + 8..];
        if let Ok((h, payload)) = RtpHeader::parse(rtp)
            && h.payload_type == 8
        {
            out.extend(payload.iter().map(|&b| g711::alaw::decode(b)));
        }
    }
    out
}

/// espeak-ng's own rendering, brought to 8 kHz with a windowed-sinc low-pass written here (not
/// the engine's resampler), as i16.
pub fn espeak_reference(text: &str, voice: &str, dir: &Path) -> Vec<i16> {
    let wav = dir.join("reference.wav");
    let status = std::process::Command::new("espeak-ng")
        .args(["-v", voice, "-w"])
        .arg(&wav)
        .arg(text)
        .status()
        .expect("espeak-ng (scripts/test.sh installs it)");
    assert!(status.success());
    let bytes = std::fs::read(&wav).unwrap();
    let (rate, channels, samples) = sautikit_sip::wav::parse_wav(&bytes).expect("espeak WAV");
    assert_eq!(channels, 1);
    downsample(&samples, rate, 8000)
}

fn downsample(input: &[i16], from: u32, to: u32) -> Vec<i16> {
    let ratio = f64::from(from) / f64::from(to);
    let cutoff = 0.9 * 0.5 / ratio; // cycles per input sample, below the new Nyquist
    let half = 64i64;
    let n_out = (input.len() as f64 / ratio) as usize;
    (0..n_out)
        .map(|i| {
            let centre = i as f64 * ratio;
            let c = centre.floor() as i64;
            let mut acc = 0.0;
            for k in (c - half)..=(c + half) {
                if k < 0 || k as usize >= input.len() {
                    continue;
                }
                let x = k as f64 - centre;
                let sinc = if x.abs() < 1e-9 {
                    2.0 * cutoff
                } else {
                    (2.0 * std::f64::consts::PI * cutoff * x).sin() / (std::f64::consts::PI * x)
                };
                let w = 0.5 + 0.5 * (std::f64::consts::PI * x / (half as f64 + 1.0)).cos();
                acc += f64::from(input[k as usize]) * sinc * w;
            }
            acc.clamp(-32768.0, 32767.0) as i16
        })
        .collect()
}
