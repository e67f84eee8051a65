//! Bytes a `play` URL may answer with into the decoders behind it: sniffing, WAV (PCM, float,
//! G.711, ADPCM) and MP3 through symphonia, mixing down and resampling to 8 kHz; and the WAV
//! reader of our own recordings and cache files.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sautikit_actors::decode::decode_to_8k;
use sautikit_sip::wav;

fuzz_target!(|data: &[u8]| {
    // Ten seconds at most: the fuzzer's time goes to finding bugs, not decoding long files.
    if let Ok(samples) = decode_to_8k(data, Some("audio/mpeg"), 10) {
        assert!(!samples.is_empty());
        assert!(
            samples.len() <= 10 * 8000 + 8000,
            "{} samples",
            samples.len()
        );
    }
    let _ = wav::parse_wav(data);
});
