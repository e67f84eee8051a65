//! `say`: speak text with text-to-speech.

use serde_json::Value;

use super::ScriptError;
use super::attrs::Attrs;

/// Longest `say.text`, in characters: about four minutes of speech, and bounded TTS cost.
pub const MAX_SAY_CHARS: usize = 4_000;

/// Most repetitions of a `say` or `play`. Twilio's `loop: 0` ("repeat many times") means this.
pub const MAX_LOOP: u32 = 100;

/// Longest `voice` name.
const MAX_VOICE_CHARS: usize = 64;

/// Longest BCP-47 tag we accept (RFC 5646 advises supporting at least 35).
const MAX_LANGUAGE_CHARS: usize = 35;

#[derive(Debug, Clone, PartialEq)]
pub struct Say {
    /// Trimmed, non-empty, at most [`MAX_SAY_CHARS`].
    pub text: String,
    /// A TTS voice name such as `alice` or `en-KE-Standard-A`; the engine picks when absent.
    pub voice: Option<String>,
    /// A BCP-47 tag such as `en-KE` or `sw`.
    pub language: Option<String>,
    /// JSON `loop`: how many times, 1..=[`MAX_LOOP`]; `0` is read as [`MAX_LOOP`].
    pub loop_count: u32,
}

pub(super) fn parse(path: String, value: &Value) -> Result<Say, ScriptError> {
    let a = Attrs::new(path, value, &["text", "voice", "language", "loop"], false)?;
    let text = a.required_string("text")?.trim();
    if text.is_empty() {
        return Err(a.err("text", "must not be empty"));
    }
    if text.chars().count() > MAX_SAY_CHARS {
        return Err(a.err(
            "text",
            format!("must be at most {MAX_SAY_CHARS} characters"),
        ));
    }
    let voice = a.string("voice")?;
    if let Some(v) = voice {
        // Voice names are passed on to TTS engines: keep them to a safe alphabet.
        let ok = (1..=MAX_VOICE_CHARS).contains(&v.len())
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !ok {
            return Err(a.err(
                "voice",
                format!("must be 1 to {MAX_VOICE_CHARS} letters, digits, '.', '-' or '_'"),
            ));
        }
    }
    let language = a.string("language")?;
    if let Some(l) = language
        && !is_bcp47(l)
    {
        return Err(a.err(
            "language",
            "must be a BCP-47 language tag such as en-KE or sw",
        ));
    }
    Ok(Say {
        text: text.to_owned(),
        voice: voice.map(str::to_owned),
        language: language.map(str::to_owned),
        loop_count: loop_count(&a)?,
    })
}

/// `loop` for say and play: default 1; 0 (Twilio's "repeat many") becomes [`MAX_LOOP`] so the
/// executor always has a finite count.
pub(super) fn loop_count(a: &Attrs<'_>) -> Result<u32, ScriptError> {
    match a.uint("loop", 1, 0, MAX_LOOP)? {
        0 => Ok(MAX_LOOP),
        n => Ok(n),
    }
}

/// The shape of a BCP-47 tag: a 2–3 letter language, then subtags of 1–8 letters or digits
/// (`en`, `en-KE`, `sw-TZ`, `zh-Hant-TW`). Registry membership is not checked.
fn is_bcp47(tag: &str) -> bool {
    if tag.len() > MAX_LANGUAGE_CHARS {
        return false;
    }
    let mut parts = tag.split('-');
    let lang_ok = parts
        .next()
        .is_some_and(|p| (2..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphabetic()));
    lang_ok
        && parts.all(|p| (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::super::Action;
    use super::super::test_support::{err, one};
    use super::*;

    fn say(attrs: &str) -> Say {
        match one(&format!(r#"{{"say": {attrs}}}"#)) {
            Ok(Action::Say(s)) => s,
            other => panic!("expected say, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        assert_eq!(
            say(r#"{"text": "  Karibu  "}"#),
            Say {
                text: "Karibu".into(),
                voice: None,
                language: None,
                loop_count: 1
            }
        );
    }

    #[test]
    fn all_attributes() {
        let s =
            say(r#"{"text": "Habari", "voice": "Polly.Joanna", "language": "sw-KE", "loop": 3}"#);
        assert_eq!(s.voice.as_deref(), Some("Polly.Joanna"));
        assert_eq!(s.language.as_deref(), Some("sw-KE"));
        assert_eq!(s.loop_count, 3);
        // null reads as absent.
        assert_eq!(
            say(r#"{"text": "a", "voice": null, "loop": null}"#).loop_count,
            1
        );
    }

    #[test]
    fn text_bounds() {
        assert_eq!(err(r#"{"say": {}}"#), "actions[0].say.text: required");
        assert_eq!(
            err(r#"{"say": {"text": " \n "}}"#),
            "actions[0].say.text: must not be empty"
        );
        assert_eq!(
            err(r#"{"say": {"text": 5}}"#),
            "actions[0].say.text: must be a string, not a number"
        );
        let max = "é".repeat(MAX_SAY_CHARS);
        assert_eq!(
            say(&format!(r#"{{"text": "{max}"}}"#)).text.chars().count(),
            MAX_SAY_CHARS
        );
        assert_eq!(
            err(&format!(r#"{{"say": {{"text": "{max}x"}}}}"#)),
            "actions[0].say.text: must be at most 4000 characters"
        );
    }

    #[test]
    fn loop_bounds() {
        assert_eq!(say(r#"{"text": "a", "loop": 1}"#).loop_count, 1);
        assert_eq!(say(r#"{"text": "a", "loop": 100}"#).loop_count, 100);
        assert_eq!(say(r#"{"text": "a", "loop": 2.0}"#).loop_count, 2);
        assert_eq!(say(r#"{"text": "a", "loop": 0}"#).loop_count, MAX_LOOP);
        for bad in ["101", "-1", "1.5", "\"2\"", "true"] {
            assert!(
                err(&format!(r#"{{"say": {{"text": "a", "loop": {bad}}}}}"#))
                    .starts_with("actions[0].say.loop: must be a whole number from 0 to 100"),
                "{bad}"
            );
        }
        assert_eq!(
            err(r#"{"say": {"text": "a", "loop": "2"}}"#),
            "actions[0].say.loop: must be a whole number from 0 to 100, not a string"
        );
    }

    #[test]
    fn voice_and_language_shapes() {
        for ok in ["en", "sw", "en-KE", "zh-Hant-TW", "yue", "es-419"] {
            assert_eq!(
                say(&format!(r#"{{"text": "a", "language": "{ok}"}}"#))
                    .language
                    .as_deref(),
                Some(ok)
            );
        }
        for bad in [
            "",
            "e",
            "english",
            "en_KE",
            "en-",
            "en--KE",
            "en-toolongsubtag",
        ] {
            assert_eq!(
                err(&format!(
                    r#"{{"say": {{"text": "a", "language": "{bad}"}}}}"#
                )),
                "actions[0].say.language: must be a BCP-47 language tag such as en-KE or sw",
                "{bad}"
            );
        }
        assert!(
            err(r#"{"say": {"text": "a", "voice": "a b"}}"#)
                .starts_with("actions[0].say.voice: must be 1 to 64")
        );
        assert!(err(r#"{"say": {"text": "a", "voice": ""}}"#).starts_with("actions[0].say.voice:"));
    }

    #[test]
    fn unknown_attribute() {
        assert_eq!(
            err(r#"{"say": {"text": "a", "Loop": 2}}"#),
            "actions[0].say.Loop: unknown attribute (expected one of: text, voice, language, loop)"
        );
    }
}
