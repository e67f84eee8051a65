//! `getDigits`: collect DTMF keys, optionally playing prompts (`nested` say/play) meanwhile.

use serde_json::Value;

use super::attrs::{Attrs, is_dtmf, kind};
use super::{Action, ScriptError, parse_list};

#[derive(Debug, Clone, PartialEq)]
pub struct GetDigits {
    /// JSON `numDigits`: stop after this many keys; 0 (default) = no count limit.
    pub num_digits: u32,
    /// JSON `timeout`: seconds to wait for the next key, default 5, 1..=60.
    pub timeout_seconds: u32,
    /// JSON `finishOnKey`: default `#`; `""` reads as `None` (no key finishes).
    pub finish_on_key: Option<char>,
    /// Prompts played while waiting: only `say` and `play`.
    pub nested: Vec<Action>,
    /// Where the digits go; `None` = the voice callback. As written (maybe relative).
    pub action: Option<String>,
}

pub(super) fn parse(path: String, value: &Value) -> Result<GetDigits, ScriptError> {
    let a = Attrs::new(
        path,
        value,
        &["numDigits", "timeout", "finishOnKey", "nested", "action"],
        false,
    )?;
    let finish_on_key = match a.string("finishOnKey")? {
        None => Some('#'),
        Some(s) => {
            let mut chars = s.chars();
            match (chars.next(), chars.next()) {
                (None, _) => None,
                (Some(c), None) if is_dtmf(c) => Some(c),
                _ => {
                    return Err(a.err(
                        "finishOnKey",
                        "must be one key (0-9, * or #), or \"\" for none",
                    ));
                }
            }
        }
    };
    let nested = match a.get("nested") {
        None => Vec::new(),
        Some(Value::Array(list)) => parse_list(&a.path_of("nested"), list, true)?,
        Some(other) => {
            return Err(a.err("nested", format!("must be an array, not {}", kind(other))));
        }
    };
    Ok(GetDigits {
        num_digits: a.uint("numDigits", 0, 0, u32::MAX)?,
        timeout_seconds: a.uint("timeout", 5, 1, 60)?,
        finish_on_key,
        nested,
        action: a.url("action")?,
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{err, one};
    use super::super::{Play, Say};
    use super::*;

    fn gd(attrs: &str) -> GetDigits {
        match one(&format!(r#"{{"getDigits": {attrs}}}"#)) {
            Ok(Action::GetDigits(g)) => g,
            other => panic!("expected getDigits, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        assert_eq!(
            gd("{}"),
            GetDigits {
                num_digits: 0,
                timeout_seconds: 5,
                finish_on_key: Some('#'),
                nested: vec![],
                action: None
            }
        );
    }

    #[test]
    fn num_digits() {
        assert_eq!(gd(r#"{"numDigits": 4}"#).num_digits, 4);
        assert_eq!(gd(r#"{"numDigits": 4294967295}"#).num_digits, u32::MAX);
        let body = r#"{"actions": [{"hangup": {}}, {"getDigits": {"numDigits": -1}}]}"#;
        assert_eq!(
            super::super::parse_script(body.as_bytes()).map_err(|e| e.to_string()),
            Err("actions[1].getDigits.numDigits: must be a whole number ≥ 0".into())
        );
        assert_eq!(
            err(r#"{"getDigits": {"numDigits": 1.5}}"#),
            "actions[0].getDigits.numDigits: must be a whole number ≥ 0"
        );
        assert_eq!(
            err(r#"{"getDigits": {"numDigits": "4"}}"#),
            "actions[0].getDigits.numDigits: must be a whole number ≥ 0, not a string"
        );
        assert!(
            err(r#"{"getDigits": {"numDigits": 4294967296}}"#)
                .starts_with("actions[0].getDigits.numDigits:")
        );
    }

    #[test]
    fn timeout_bounds() {
        assert_eq!(gd(r#"{"timeout": 1}"#).timeout_seconds, 1);
        assert_eq!(gd(r#"{"timeout": 60}"#).timeout_seconds, 60);
        for bad in ["0", "61"] {
            assert_eq!(
                err(&format!(r#"{{"getDigits": {{"timeout": {bad}}}}}"#)),
                "actions[0].getDigits.timeout: must be a whole number from 1 to 60"
            );
        }
    }

    #[test]
    fn finish_on_key() {
        assert_eq!(gd(r#"{"finishOnKey": ""}"#).finish_on_key, None);
        assert_eq!(gd(r#"{"finishOnKey": null}"#).finish_on_key, Some('#'));
        for k in ['0', '9', '*', '#'] {
            assert_eq!(
                gd(&format!(r#"{{"finishOnKey": "{k}"}}"#)).finish_on_key,
                Some(k)
            );
        }
        for bad in ["A", "##", "12", " "] {
            assert_eq!(
                err(&format!(r#"{{"getDigits": {{"finishOnKey": "{bad}"}}}}"#)),
                "actions[0].getDigits.finishOnKey: must be one key (0-9, * or #), or \"\" for none",
                "{bad}"
            );
        }
        assert_eq!(
            err(r##"{"getDigits": {"finishOnKey": ["#"]}}"##),
            "actions[0].getDigits.finishOnKey: must be a string, not an array"
        );
    }

    #[test]
    fn nested_say_and_play_only() {
        let g = gd(
            r#"{"nested": [{"say": {"text": "Press 1"}}, {"play": {"url": "m.wav", "loop": 2}}], "action": "/menu"}"#,
        );
        assert_eq!(
            g.nested,
            vec![
                Action::Say(Say {
                    text: "Press 1".into(),
                    voice: None,
                    language: None,
                    loop_count: 1
                }),
                Action::Play(Play {
                    url: "m.wav".into(),
                    loop_count: 2
                }),
            ]
        );
        assert_eq!(g.action.as_deref(), Some("/menu"));
        let body = r#"{"actions": [{"pause": {}}, {"getDigits": {"nested": [{"say": {"text": "a"}}, {"pause": {}}]}}]}"#;
        assert_eq!(
            super::super::parse_script(body.as_bytes()).map_err(|e| e.to_string()),
            Err("actions[1].getDigits.nested[1]: only say and play may be nested in getDigits, not pause".into())
        );
        assert_eq!(
            err(r#"{"getDigits": {"nested": [{"getDigits": {}}]}}"#),
            "actions[0].getDigits.nested[0]: only say and play may be nested in getDigits, not getDigits"
        );
        assert_eq!(
            err(r#"{"getDigits": {"nested": [{"dance": {}}]}}"#),
            r#"actions[0].getDigits.nested[0]: unknown verb "dance""#
        );
        assert_eq!(
            err(r#"{"getDigits": {"nested": [{"say": {}}]}}"#),
            "actions[0].getDigits.nested[0].say.text: required"
        );
        assert_eq!(
            err(r#"{"getDigits": {"nested": {"say": {"text": "a"}}}}"#),
            "actions[0].getDigits.nested: must be an array, not an object"
        );
        let many = vec![r#"{"say": {"text": "a"}}"#; 51].join(",");
        assert_eq!(
            err(&format!(r#"{{"getDigits": {{"nested": [{many}]}}}}"#)),
            "actions[0].getDigits.nested: at most 50 actions"
        );
    }

    #[test]
    fn action_url_and_unknown_attribute() {
        assert!(
            err(r#"{"getDigits": {"action": "gopher://x"}}"#)
                .starts_with("actions[0].getDigits.action: must be an http")
        );
        assert_eq!(
            err(r#"{"getDigits": {"numdigits": 1}}"#),
            "actions[0].getDigits.numdigits: unknown attribute (expected one of: numDigits, timeout, finishOnKey, nested, action)"
        );
    }
}
