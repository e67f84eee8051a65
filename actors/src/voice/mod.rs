//! The VoiceAction DSL (DESIGN §7): parsing and validation. SPEC — implemented by the voice
//! helper; the executor lives in `calls`.
//!
//! `{"actions": [ {"verb": {attributes}}, … ]}`, one key per action, at most 50.
