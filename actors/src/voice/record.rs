//! `record`: record the caller until silence, a key, hang-up or the length limit.

use serde_json::Value;

use super::ScriptError;
use super::attrs::{Attrs, is_dtmf};

/// Longest recording: four hours, the same as a call's longest `dial`.
pub const MAX_RECORD_SECONDS: u32 = 14_400;

/// Every DTMF key: the default `finishOnKey`.
const ALL_KEYS: &str = "1234567890*#";

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// JSON `maxLength`: default 3600, 1..=14400.
    pub max_length_seconds: u32,
    /// JSON `timeout`: seconds of silence that end the recording, default 5, 0 = never.
    pub timeout_seconds: u32,
    /// JSON `finishOnKey`: any of these keys ends the recording; default every key, `""` = none.
    pub finish_on_key: String,
    /// JSON `playBeep`: default true.
    pub play_beep: bool,
    /// Where the recording's details go; `None` = the voice callback. As written.
    pub action: Option<String>,
}

pub(super) fn parse(path: String, value: &Value) -> Result<Record, ScriptError> {
    let a = Attrs::new(
        path,
        value,
        &["maxLength", "timeout", "finishOnKey", "playBeep", "action"],
        false,
    )?;
    let finish_on_key = a.string("finishOnKey")?.unwrap_or(ALL_KEYS);
    // Twelve keys exist; a longer string can only be repeats.
    if finish_on_key.chars().count() > ALL_KEYS.len() || !finish_on_key.chars().all(is_dtmf) {
        return Err(a.err(
            "finishOnKey",
            "must be up to 12 keys, each 0-9, * or #, or \"\" for none",
        ));
    }
    Ok(Record {
        max_length_seconds: a.uint("maxLength", 3600, 1, MAX_RECORD_SECONDS)?,
        // An hour of silence is already "never"; the bound only keeps the number sane.
        timeout_seconds: a.uint("timeout", 5, 0, 3600)?,
        finish_on_key: finish_on_key.to_owned(),
        play_beep: a.boolean("playBeep", true)?,
        action: a.url("action")?,
    })
}

#[cfg(test)]
mod tests {
    use super::super::Action;
    use super::super::test_support::{err, one};
    use super::*;

    fn rec(attrs: &str) -> Record {
        match one(&format!(r#"{{"record": {attrs}}}"#)) {
            Ok(Action::Record(r)) => r,
            other => panic!("expected record, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        assert_eq!(
            rec("{}"),
            Record {
                max_length_seconds: 3600,
                timeout_seconds: 5,
                finish_on_key: "1234567890*#".into(),
                play_beep: true,
                action: None
            }
        );
    }

    #[test]
    fn bounds() {
        assert_eq!(rec(r#"{"maxLength": 1}"#).max_length_seconds, 1);
        assert_eq!(rec(r#"{"maxLength": 14400}"#).max_length_seconds, 14400);
        for bad in ["0", "14401"] {
            assert_eq!(
                err(&format!(r#"{{"record": {{"maxLength": {bad}}}}}"#)),
                "actions[0].record.maxLength: must be a whole number from 1 to 14400"
            );
        }
        assert_eq!(rec(r#"{"timeout": 0}"#).timeout_seconds, 0);
        assert_eq!(rec(r#"{"timeout": 3600}"#).timeout_seconds, 3600);
        assert_eq!(
            err(r#"{"record": {"timeout": 3601}}"#),
            "actions[0].record.timeout: must be a whole number from 0 to 3600"
        );
    }

    #[test]
    fn keys_beep_and_action() {
        let r = rec(r##"{"finishOnKey": "#*", "playBeep": false, "action": "/recorded"}"##);
        assert_eq!(r.finish_on_key, "#*");
        assert!(!r.play_beep);
        assert_eq!(r.action.as_deref(), Some("/recorded"));
        assert_eq!(rec(r#"{"finishOnKey": ""}"#).finish_on_key, "");
        for bad in ["#a", "1234567890*##"] {
            assert_eq!(
                err(&format!(r#"{{"record": {{"finishOnKey": "{bad}"}}}}"#)),
                "actions[0].record.finishOnKey: must be up to 12 keys, each 0-9, * or #, or \"\" for none"
            );
        }
        assert_eq!(
            err(r#"{"record": {"playBeep": "false"}}"#),
            "actions[0].record.playBeep: must be true or false, not a string"
        );
        assert_eq!(
            err(r#"{"record": {"transcribe": true}}"#),
            "actions[0].record.transcribe: unknown attribute (expected one of: maxLength, timeout, finishOnKey, playBeep, action)"
        );
    }
}
