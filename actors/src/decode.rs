//! Audio files to the media path's 8 kHz mono: what `play` fetched, sniffed (WAV or MP3),
//! decoded with symphonia, mixed down and resampled. Pure functions over bytes, so the fuzz
//! targets reach them without a server.

use crate::audio::PlayError;
use crate::resample;

/// What the bytes look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Wav,
    Mp3,
}

/// Decides from the bytes; `Content-Type` only names what we got when it is not audio.
fn sniff(bytes: &[u8], content_type: Option<&str>) -> Result<Container, String> {
    if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WAVE" {
        return Ok(Container::Wav);
    }
    if bytes.starts_with(b"ID3") || is_mpeg_frame_header(bytes) {
        return Ok(Container::Mp3);
    }
    let got = describe_non_audio(bytes);
    Err(match content_type {
        Some(ct) => format!("got {got} (Content-Type {ct})"),
        None => format!("got {got}"),
    })
}

/// An MPEG-1/2/2.5 audio frame header at the start: sync, a valid layer, bitrate and rate.
fn is_mpeg_frame_header(b: &[u8]) -> bool {
    b.len() >= 4
        && b[0] == 0xFF
        && b[1] & 0xE0 == 0xE0
        && b[1] & 0x18 != 0x08 // version "reserved"
        && b[1] & 0x06 != 0 // layer "reserved"
        && b[2] & 0xF0 != 0xF0 // bitrate "bad"
        && b[2] & 0x0C != 0x0C // sample rate "reserved"
}

fn describe_non_audio(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "an empty body".into();
    }
    let head = &bytes[..bytes.len().min(512)];
    let text = String::from_utf8_lossy(head);
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    let lower = trimmed.to_ascii_lowercase();
    if lower.starts_with("<!doctype html") || lower.starts_with("<html") {
        return "an HTML page".into();
    }
    if lower.starts_with("<?xml") || lower.starts_with('<') {
        return "an XML/HTML document".into();
    }
    if lower.starts_with('{') || lower.starts_with('[') {
        return "JSON".into();
    }
    if bytes.starts_with(b"OggS") {
        return "Ogg, which play does not support (use WAV or MP3)".into();
    }
    if bytes.starts_with(b"fLaC") {
        return "FLAC, which play does not support (use WAV or MP3)".into();
    }
    if bytes.len() >= 8 && &bytes[4..8] == b"ftyp" {
        return "MP4/M4A, which play does not support (use WAV or MP3)".into();
    }
    if bytes.starts_with(b"RIFF") {
        return "a RIFF file that is not WAVE".into();
    }
    if std::str::from_utf8(head).is_ok() {
        return "text".into();
    }
    let hex: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("unrecognised data starting {}", hex.join(" "))
}

/// Refuses a WAV whose data chunk declares more bytes than arrived: a cut download, not a
/// prompt. Streaming writers' placeholder sizes are tolerated.
fn check_wav_complete(bytes: &[u8]) -> Result<(), String> {
    let mut pos = 12usize;
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let declared = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]);
        let available = bytes.len() - (pos + 8);
        if id == b"data" {
            let placeholder = matches!(declared, 0 | 0x7fff_f000 | 0xffff_ffff);
            if declared as usize > available && !placeholder {
                return Err(format!(
                    "truncated WAV: the data chunk declares {declared} bytes, {available} arrived"
                ));
            }
            return Ok(());
        }
        // Chunks are padded to an even length.
        pos = (pos + 8)
            .saturating_add(declared as usize)
            .saturating_add(declared as usize & 1);
    }
    Err("truncated WAV: no data chunk".into())
}

/// Bytes to 8 kHz mono i16: sniff, decode with symphonia, mix down, resample.
pub fn decode_to_8k(
    bytes: &[u8],
    content_type: Option<&str>,
    max_seconds: u32,
) -> Result<Vec<i16>, PlayError> {
    let not_audio = |message: String| PlayError::NotAudio { message };
    let container = sniff(bytes, content_type).map_err(not_audio)?;
    if container == Container::Wav {
        check_wav_complete(bytes).map_err(not_audio)?;
    }
    let (rate, mono) = decode_mono(bytes.to_vec(), container, max_seconds).map_err(not_audio)?;
    let out = resample::to_8k_mono(&mono, rate).map_err(|e| not_audio(e.to_string()))?;
    if out.is_empty() {
        return Err(not_audio("the file holds no audio".into()));
    }
    Ok(out)
}

/// Decodes to mono 16-bit at the file's rate, stopping at `max_seconds`.
fn decode_mono(
    bytes: Vec<u8>,
    container: Container,
    max_seconds: u32,
) -> Result<(u32, Vec<i16>), String> {
    use symphonia::core::audio::SampleBuffer;
    use symphonia::core::codecs::{CODEC_TYPE_NULL, DecoderOptions};
    use symphonia::core::errors::Error as SymphoniaError;
    use symphonia::core::formats::FormatOptions;
    use symphonia::core::io::MediaSourceStream;
    use symphonia::core::meta::MetadataOptions;
    use symphonia::core::probe::Hint;

    let kind = match container {
        Container::Wav => "WAV",
        Container::Mp3 => "MP3",
    };
    let mut hint = Hint::new();
    hint.with_extension(match container {
        Container::Wav => "wav",
        Container::Mp3 => "mp3",
    });
    let source = MediaSourceStream::new(Box::new(std::io::Cursor::new(bytes)), Default::default());
    let probed = symphonia::default::get_probe()
        .format(
            &hint,
            source,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| format!("unreadable {kind}: {e}"))?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| format!("{kind} without an audio track"))?;
    let track_id = track.id;
    let rate = track
        .codec_params
        .sample_rate
        .ok_or_else(|| format!("{kind} without a sample rate"))?;
    if !(resample::MIN_RATE..=resample::MAX_RATE).contains(&rate) {
        return Err(format!("{kind} at an unsupported sample rate of {rate} Hz"));
    }
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| format!("unsupported {kind} encoding: {e}"))?;

    let max_frames = u64::from(max_seconds) * u64::from(rate);
    let mut mono: Vec<i16> = Vec::new();
    let mut buffer: Option<SampleBuffer<f32>> = None;
    let mut bad_packets = 0usize;
    let mut last_error = String::new();
    loop {
        let packet = match format.next_packet() {
            Ok(packet) => packet,
            // The normal end of the stream, or a final partial frame.
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break;
            }
            Err(SymphoniaError::ResetRequired) => break,
            Err(e) => {
                if mono.is_empty() {
                    return Err(format!("unreadable {kind}: {e}"));
                }
                // Trailing junk after real audio: keep what decoded.
                tracing::debug!(error = %e, "play: stopping at an unreadable packet");
                break;
            }
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(decoded) => decoded,
            // A corrupt frame is skipped, as players do.
            Err(SymphoniaError::DecodeError(e)) => {
                bad_packets += 1;
                last_error = e.to_string();
                continue;
            }
            Err(e) => return Err(format!("cannot decode {kind}: {e}")),
        };
        let spec = *decoded.spec();
        let channels = spec.channels.count().max(1);
        let needed = decoded.capacity() as u64;
        let buf = match &mut buffer {
            Some(buf) if buf.capacity() as u64 >= needed * channels as u64 => buf,
            _ => buffer.insert(SampleBuffer::new(needed, spec)),
        };
        buf.copy_interleaved_ref(decoded);
        for frame in buf.samples().chunks_exact(channels) {
            if mono.len() as u64 >= max_frames {
                break;
            }
            let sum: f32 = frame.iter().sum();
            let mixed = sum / channels as f32;
            mono.push((mixed * 32768.0).round().clamp(-32768.0, 32767.0) as i16);
        }
        if mono.len() as u64 >= max_frames {
            tracing::info!(max_seconds, "play: audio longer than the limit, cut");
            break;
        }
    }
    if mono.is_empty() {
        return Err(if bad_packets > 0 {
            format!("no decodable {kind} frames ({bad_packets} corrupt; last: {last_error})")
        } else {
            format!("{kind} without audio frames")
        });
    }
    Ok((rate, mono))
}
