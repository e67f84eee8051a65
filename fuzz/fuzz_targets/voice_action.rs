//! A voice callback's reply body into the VoiceAction script parser and validator: any bytes a
//! customer's server may answer with must give a script or a `callback.invalid_actions` path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sautikit_actors::voice;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = voice::parse_script(data) {
        let _ = e.to_string();
    }
});
