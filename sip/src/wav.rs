//! WAV (RIFF) files: a streaming writer for 16-bit mono PCM recordings, and a reader.
//!
//! The writer is sans-IO: the I/O layer writes [`WavWriter::start`]'s header, then each batch of
//! bytes from [`WavWriter::write_samples`], and at the end seeks back and overwrites the first
//! 44 bytes with [`WavWriter::finish`]. A file cut short before that still has placeholder sizes
//! of 0xFFFFFFFF, which readers (this one, sox, ffmpeg) take as "to the end of the file".

use thiserror::Error;

use crate::rtp::g711;

/// Length of the canonical PCM header this writer produces.
pub const HEADER_LEN: usize = 44;

const PLACEHOLDER: u32 = u32::MAX;
const FORMAT_PCM: u16 = 1;
const FORMAT_ALAW: u16 = 6;
const FORMAT_ULAW: u16 = 7;
const FORMAT_EXTENSIBLE: u16 = 0xFFFE;
/// The data chunk's size must leave room in the RIFF size for the rest of the header.
const MAX_DATA_LEN: u32 = (u32::MAX - 36) & !1;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WavError {
    #[error("not a RIFF file")]
    NotRiff,
    #[error("RIFF file is not WAVE")]
    NotWave,
    #[error("WAV file truncated inside its {0} chunk")]
    Truncated(&'static str),
    #[error("WAV file has no fmt chunk before its data")]
    MissingFmt,
    #[error("WAV file has no data chunk")]
    MissingData,
    #[error("unsupported WAV encoding: format {format}, {bits} bits per sample")]
    Unsupported { format: u16, bits: u16 },
    #[error("invalid WAV fmt chunk: {0}")]
    BadFormat(&'static str),
}

/// Streams 16-bit mono PCM into a WAV file.
#[derive(Debug, Clone)]
pub struct WavWriter {
    sample_rate: u32,
    data_len: u32,
}

impl WavWriter {
    pub fn new(sample_rate: u32) -> Self {
        Self {
            sample_rate,
            data_len: 0,
        }
    }

    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// Bytes of sample data written so far.
    pub fn data_len(&self) -> u32 {
        self.data_len
    }

    /// Samples written so far.
    pub fn samples(&self) -> u32 {
        self.data_len / 2
    }

    /// The header to write first, with placeholder sizes.
    pub fn start(&self) -> [u8; HEADER_LEN] {
        wav_header(self.sample_rate, PLACEHOLDER)
    }

    /// Append the samples' little-endian bytes to `out`. Returns how many samples fitted: fewer
    /// only once the 4 GiB limit of a WAV file is reached (74 hours at 8 kHz).
    pub fn write_samples(&mut self, samples: &[i16], out: &mut Vec<u8>) -> usize {
        let room = ((MAX_DATA_LEN - self.data_len) / 2) as usize;
        let n = samples.len().min(room);
        out.reserve(n * 2);
        for s in samples.iter().take(n) {
            out.extend_from_slice(&s.to_le_bytes());
        }
        // n ≤ room, so this stays within MAX_DATA_LEN.
        self.data_len += (n * 2) as u32;
        n
    }

    /// The header for a file holding `data_len` bytes of samples.
    pub fn header(&self, data_len: u32) -> [u8; HEADER_LEN] {
        wav_header(self.sample_rate, data_len.min(MAX_DATA_LEN))
    }

    /// The final header, with the sizes of everything written.
    pub fn finish(&self) -> [u8; HEADER_LEN] {
        self.header(self.data_len)
    }
}

/// A whole canonical WAV file (44-byte header) of 16-bit mono PCM, for files written at once
/// (audio caches) rather than streamed.
pub fn encode_pcm16(sample_rate: u32, samples: &[i16]) -> Vec<u8> {
    let mut writer = WavWriter::new(sample_rate);
    let mut body = Vec::new();
    writer.write_samples(samples, &mut body);
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&writer.finish());
    out.extend_from_slice(&body);
    out
}

/// A 16-bit mono PCM header; `data_len` of [`u32::MAX`] marks the sizes as unknown.
fn wav_header(sample_rate: u32, data_len: u32) -> [u8; HEADER_LEN] {
    let riff_len = if data_len == PLACEHOLDER {
        PLACEHOLDER
    } else {
        data_len.saturating_add(36)
    };
    let mut h = [0u8; HEADER_LEN];
    let fields: [&[u8]; 13] = [
        b"RIFF",
        &riff_len.to_le_bytes(),
        b"WAVE",
        b"fmt ",
        &16u32.to_le_bytes(),
        &FORMAT_PCM.to_le_bytes(),
        &1u16.to_le_bytes(), // channels
        &sample_rate.to_le_bytes(),
        &sample_rate.saturating_mul(2).to_le_bytes(), // byte rate
        &2u16.to_le_bytes(),                          // block align
        &16u16.to_le_bytes(),                         // bits per sample
        b"data",
        &data_len.to_le_bytes(),
    ];
    let mut pos = 0;
    for f in fields {
        if let Some(dst) = h.get_mut(pos..pos + f.len()) {
            dst.copy_from_slice(f);
        }
        pos += f.len();
    }
    h
}

#[derive(Debug, Clone, Copy)]
struct Fmt {
    format: u16,
    channels: u16,
    sample_rate: u32,
    bits: u16,
}

/// Read a WAV file: (sample rate, channels, interleaved samples). 16-bit and 8-bit PCM, A-law and
/// µ-law are decoded to 16-bit linear. A data chunk whose size runs past the end of the file
/// (a recording never finalised) is read to the end.
pub fn parse_wav(bytes: &[u8]) -> Result<(u32, u16, Vec<i16>), WavError> {
    if bytes.get(..4) != Some(b"RIFF") {
        return Err(WavError::NotRiff);
    }
    if bytes.get(8..12) != Some(b"WAVE") {
        return Err(WavError::NotWave);
    }
    let mut fmt: Option<Fmt> = None;
    let mut pos = 12;
    while let Some(head) = bytes.get(pos..pos + 8) {
        let (id, size) = head.split_at(4);
        let size = u32::from_le_bytes(size.try_into().map_err(|_| WavError::Truncated("chunk"))?);
        let start = pos + 8;
        let end = start.saturating_add(size as usize);
        match id {
            b"fmt " => {
                let body = bytes.get(start..end).ok_or(WavError::Truncated("fmt"))?;
                fmt = Some(parse_fmt(body)?);
            }
            b"data" => {
                let fmt = fmt.ok_or(WavError::MissingFmt)?;
                let body = bytes.get(start..end.min(bytes.len())).unwrap_or_default();
                let samples = decode(fmt, body)?;
                return Ok((fmt.sample_rate, fmt.channels, samples));
            }
            _ => {} // LIST, fact, cue…: not needed
        }
        // Chunks are padded to an even length.
        pos = end.saturating_add(size as usize & 1);
    }
    Err(WavError::MissingData)
}

fn parse_fmt(body: &[u8]) -> Result<Fmt, WavError> {
    let u16_at = |at: usize| {
        body.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or(WavError::Truncated("fmt"))
    };
    let mut format = u16_at(0)?;
    let channels = u16_at(2)?;
    let sample_rate = u32::from(u16_at(4)?) | (u32::from(u16_at(6)?) << 16);
    let bits = u16_at(14)?;
    if format == FORMAT_EXTENSIBLE {
        // The real format is the first two bytes of the sub-format GUID.
        format = u16_at(24)?;
    }
    if channels == 0 {
        return Err(WavError::BadFormat("zero channels"));
    }
    if sample_rate == 0 {
        return Err(WavError::BadFormat("zero sample rate"));
    }
    Ok(Fmt {
        format,
        channels,
        sample_rate,
        bits,
    })
}

fn decode(fmt: Fmt, data: &[u8]) -> Result<Vec<i16>, WavError> {
    Ok(match (fmt.format, fmt.bits) {
        (FORMAT_PCM, 16) => data
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect(),
        // 8-bit PCM is unsigned, centred on 128.
        (FORMAT_PCM, 8) => data.iter().map(|&b| (i16::from(b) - 128) << 8).collect(),
        (FORMAT_ALAW, 8) => data.iter().map(|&b| g711::alaw::decode(b)).collect(),
        (FORMAT_ULAW, 8) => data.iter().map(|&b| g711::ulaw::decode(b)).collect(),
        (format, bits) => return Err(WavError::Unsupported { format, bits }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(n: usize) -> Vec<i16> {
        (0..n)
            .map(|i| ((i as i64 * 7919) % 65536 - 32768) as i16)
            .chain([i16::MIN, i16::MAX, 0, -1])
            .collect()
    }

    #[test]
    fn whole_file_equals_the_streamed_one() {
        let samples = sweep(500);
        let file = encode_pcm16(8000, &samples);
        let mut w = WavWriter::new(8000);
        let mut streamed = Vec::new();
        w.write_samples(&samples, &mut streamed);
        let mut expected = w.finish().to_vec();
        expected.extend(streamed);
        assert_eq!(file, expected);
        assert_eq!(parse_wav(&file), Ok((8000, 1, samples)));
        assert_eq!(encode_pcm16(8000, &[]).len(), HEADER_LEN);
    }

    #[test]
    fn streamed_round_trip() {
        let samples = sweep(1000);
        let mut w = WavWriter::new(8000);
        let mut file = w.start().to_vec();
        for chunk in samples.chunks(160) {
            let mut out = Vec::new();
            assert_eq!(w.write_samples(chunk, &mut out), chunk.len());
            file.extend(out);
        }
        assert_eq!(w.samples() as usize, samples.len());
        assert_eq!(w.data_len() as usize, samples.len() * 2);
        // Unfinalised: readable to the end anyway.
        assert_eq!(parse_wav(&file), Ok((8000, 1, samples.clone())));
        file[..HEADER_LEN].copy_from_slice(&w.finish());
        assert_eq!(parse_wav(&file), Ok((8000, 1, samples.clone())));
        // The canonical layout other tools expect.
        assert_eq!(&file[..4], b"RIFF");
        assert_eq!(
            u32::from_le_bytes(file[4..8].try_into().unwrap()) as usize,
            file.len() - 8
        );
        assert_eq!(&file[8..16], b"WAVEfmt ");
        assert_eq!(&file[36..40], b"data");
        assert_eq!(
            u32::from_le_bytes(file[40..44].try_into().unwrap()) as usize,
            samples.len() * 2
        );
        assert_eq!(w.header(10)[40..44], 10u32.to_le_bytes());
    }

    #[test]
    fn empty_recording() {
        let w = WavWriter::new(16000);
        let file = w.finish();
        assert_eq!(parse_wav(&file), Ok((16000, 1, Vec::new())));
    }

    /// A header as other tools write them: extra chunks, an odd-sized chunk, a longer fmt.
    fn build(format: u16, channels: u16, bits: u16, data: &[u8]) -> Vec<u8> {
        let mut fmt = Vec::new();
        fmt.extend(format.to_le_bytes());
        fmt.extend(channels.to_le_bytes());
        fmt.extend(8000u32.to_le_bytes());
        fmt.extend((8000u32 * u32::from(bits / 8)).to_le_bytes());
        fmt.extend((channels * bits / 8).to_le_bytes());
        fmt.extend(bits.to_le_bytes());
        fmt.extend(0u16.to_le_bytes()); // cbSize: an 18-byte fmt
        let mut body = b"WAVE".to_vec();
        body.extend(b"LIST");
        body.extend(3u32.to_le_bytes());
        body.extend(b"abc\0"); // 3 bytes + pad
        body.extend(b"fmt ");
        body.extend((fmt.len() as u32).to_le_bytes());
        body.extend(fmt);
        body.extend(b"data");
        body.extend((data.len() as u32).to_le_bytes());
        body.extend(data);
        let mut file = b"RIFF".to_vec();
        file.extend((body.len() as u32).to_le_bytes());
        file.extend(body);
        file
    }

    #[test]
    fn reads_other_encodings() {
        let wav = build(1, 2, 16, &[1, 0, 0xff, 0xff]);
        assert_eq!(parse_wav(&wav), Ok((8000, 2, vec![1, -1])));
        let wav = build(1, 1, 8, &[128, 0, 255]);
        assert_eq!(parse_wav(&wav), Ok((8000, 1, vec![0, -32768, 127 << 8])));
        let wav = build(7, 1, 8, &[0xff, 0x00]);
        assert_eq!(parse_wav(&wav), Ok((8000, 1, vec![0, -32124])));
        let wav = build(6, 1, 8, &[0xd5]);
        assert_eq!(parse_wav(&wav), Ok((8000, 1, vec![8])));
        assert_eq!(
            parse_wav(&build(3, 1, 32, &[0; 4])),
            Err(WavError::Unsupported {
                format: 3,
                bits: 32
            })
        );
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_wav(b""), Err(WavError::NotRiff));
        assert_eq!(parse_wav(b"RIFF\0\0\0\0AVI "), Err(WavError::NotWave));
        assert_eq!(
            parse_wav(b"RIFF\0\0\0\0WAVEdata\0\0\0\0"),
            Err(WavError::MissingFmt)
        );
        assert_eq!(
            parse_wav(b"RIFF\0\0\0\0WAVEfmt \x10\0\0\0\x01\0"),
            Err(WavError::Truncated("fmt"))
        );
        assert_eq!(parse_wav(b"RIFF\0\0\0\0WAVE"), Err(WavError::MissingData));
        assert_eq!(
            parse_wav(&build(1, 0, 16, &[])),
            Err(WavError::BadFormat("zero channels"))
        );
        // Chunk sizes near u32::MAX must not overflow.
        assert_eq!(
            parse_wav(b"RIFF\0\0\0\0WAVEJUNK\xff\xff\xff\xff"),
            Err(WavError::MissingData)
        );
        let mut truncated = WavWriter::new(8000).start().to_vec();
        truncated.push(7); // half a sample
        assert_eq!(parse_wav(&truncated), Ok((8000, 1, Vec::new())));
    }
}
