//! `play`: play an audio file (WAV or MP3) fetched from a URL.

use serde_json::Value;

use super::ScriptError;
use super::attrs::Attrs;
use super::say::loop_count;

#[derive(Debug, Clone, PartialEq)]
pub struct Play {
    /// Absolute http(s), or relative to the document's URL (see [`super::resolve_url`]).
    pub url: String,
    /// JSON `loop`, as for `say`: 1..=100, `0` read as 100.
    pub loop_count: u32,
}

pub(super) fn parse(path: String, value: &Value) -> Result<Play, ScriptError> {
    let a = Attrs::new(path, value, &["url", "loop"], false)?;
    Ok(Play {
        url: a.required_url("url")?,
        loop_count: loop_count(&a)?,
    })
}

#[cfg(test)]
mod tests {
    use super::super::Action;
    use super::super::test_support::{err, one};
    use super::*;

    fn play(attrs: &str) -> Play {
        match one(&format!(r#"{{"play": {attrs}}}"#)) {
            Ok(Action::Play(p)) => p,
            other => panic!("expected play, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_loop() {
        assert_eq!(
            play(r#"{"url": "https://cdn.example.com/a.mp3"}"#),
            Play {
                url: "https://cdn.example.com/a.mp3".into(),
                loop_count: 1
            }
        );
        assert_eq!(play(r#"{"url": "a.wav", "loop": 0}"#).loop_count, 100);
        assert_eq!(play(r#"{"url": "a.wav", "loop": 100}"#).loop_count, 100);
        assert!(
            err(r#"{"play": {"url": "a.wav", "loop": 101}}"#).starts_with("actions[0].play.loop:")
        );
    }

    #[test]
    fn urls() {
        for ok in [
            "http://x.example/a.wav",
            "/audio/a.wav",
            "a.wav",
            "//cdn.example/a.mp3",
            "?f=1",
        ] {
            assert_eq!(play(&format!(r#"{{"url": "{ok}"}}"#)).url, ok);
        }
        assert_eq!(err(r#"{"play": {}}"#), "actions[0].play.url: required");
        assert_eq!(
            err(r#"{"play": {"url": ""}}"#),
            "actions[0].play.url: must not be empty"
        );
        assert_eq!(
            err(r#"{"play": {"url": "a b.wav"}}"#),
            "actions[0].play.url: must be a URL without spaces or control characters"
        );
        assert_eq!(
            err(r#"{"play": {"url": "file:///etc/passwd"}}"#),
            "actions[0].play.url: must be an http or https URL (or relative to the callback's URL), not file:"
        );
        assert!(
            err(r#"{"play": {"url": "http://[::1"}}"#)
                .starts_with("actions[0].play.url: is not a valid URL")
        );
        let long = format!("https://x.example/{}", "a".repeat(2048));
        assert_eq!(
            err(&format!(r#"{{"play": {{"url": "{long}"}}}}"#)),
            "actions[0].play.url: must be at most 2048 characters"
        );
        assert_eq!(
            err(r#"{"play": {"url": "a.wav", "uri": "b"}}"#),
            "actions[0].play.uri: unknown attribute (expected one of: url, loop)"
        );
    }
}
