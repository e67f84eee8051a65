//! The VoiceAction DSL (DESIGN §7): parsing and validation; the executor lives in `calls`.
//!
//! `{"actions": [ {"verb": {attributes}}, … ]}`, exactly one key per action object, at most
//! [`MAX_ACTIONS`], attributes lowerCamelCase, unknown attributes rejected, types never coerced.
//! Every error names its JSON path (`actions[1].getDigits.numDigits: must be a whole number ≥ 0`)
//! because it becomes the call's failure message that the customer reads.
//!
//! Conventions shared by all verbs:
//! - an attribute set to `null` is treated as absent (many serializers write unset fields so);
//! - whole numbers may be written `5` or `5.0`, never `"5"`;
//! - URLs (`play.url`, `action`, `redirect.url`) are kept as written: absolute http(s) or relative.
//!   Relative ones resolve against the URL of the document that contained them (Twilio
//!   semantics) with [`resolve_url`] or [`Script::resolve_urls`].

use serde_json::Value;

mod attrs;
mod dial;
mod get_digits;
mod hangup;
mod pause;
mod play;
mod record;
mod redirect;
mod reject;
mod say;
mod stream;

pub use dial::{DeviceTarget, Dial, DialTarget, MAX_DIAL_NUMBERS};
pub use get_digits::GetDigits;
pub use pause::Pause;
pub use play::Play;
pub use record::Record;
pub use redirect::Redirect;
pub use reject::{Reject, RejectReason};
pub use say::{MAX_LOOP, MAX_SAY_CHARS, Say};
pub use stream::{MAX_CUSTOM_PARAMETERS_BYTES, MediaFormat, Stream, StreamTrack};

use attrs::{child_path, error, kind, quoted};

/// Most actions in one script (and in one `getDigits.nested`).
pub const MAX_ACTIONS: usize = 50;

/// A validated script. Empty `actions` means "nothing to do here, continue".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Script {
    pub actions: Vec<Action>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Say(Say),
    Play(Play),
    Pause(Pause),
    GetDigits(GetDigits),
    Record(Record),
    Dial(Dial),
    Redirect(Redirect),
    Reject(Reject),
    Stream(Stream),
    StopStream,
    Hangup,
}

impl Action {
    /// The verb as written in JSON.
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Say(_) => "say",
            Action::Play(_) => "play",
            Action::Pause(_) => "pause",
            Action::GetDigits(_) => "getDigits",
            Action::Record(_) => "record",
            Action::Dial(_) => "dial",
            Action::Redirect(_) => "redirect",
            Action::Reject(_) => "reject",
            Action::Stream(_) => "stream",
            Action::StopStream => "stopStream",
            Action::Hangup => "hangup",
        }
    }
}

/// Why a script was refused: `path` is where in the document (`actions[1].getDigits.numDigits`,
/// `$` for the whole document).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ScriptError {
    pub path: String,
    pub message: String,
}

const VERBS: [&str; 11] = [
    "say",
    "play",
    "pause",
    "getDigits",
    "record",
    "dial",
    "redirect",
    "reject",
    "stream",
    "stopStream",
    "hangup",
];

/// Parse and validate a callback's reply body.
pub fn parse_script(body: &[u8]) -> Result<Script, ScriptError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| error("$", format!("not valid JSON: {e}")))?;
    script_from_value(&value)
}

/// Validate an already parsed JSON document (the HTTP client separates "not JSON" from "not a
/// valid script").
pub fn script_from_value(value: &Value) -> Result<Script, ScriptError> {
    let Value::Object(top) = value else {
        return Err(error("$", "not a JSON object"));
    };
    // Same strictness as attributes: a stray top-level key is most likely a mistake.
    if let Some(key) = top.keys().find(|k| k.as_str() != "actions") {
        return Err(error(
            child_path("$", key),
            "unknown key (a script has only \"actions\")",
        ));
    }
    let list = match top.get("actions") {
        None => return Err(error("actions", "required")),
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(error(
                "actions",
                format!("must be an array, not {}", kind(other)),
            ));
        }
    };
    Ok(Script {
        actions: parse_list("actions", list, false)?,
    })
}

/// `actions` or a `getDigits.nested` list.
pub(super) fn parse_list(
    path: &str,
    list: &[Value],
    nested: bool,
) -> Result<Vec<Action>, ScriptError> {
    if list.len() > MAX_ACTIONS {
        return Err(error(path, format!("at most {MAX_ACTIONS} actions")));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| parse_action(&format!("{path}[{i}]"), v, nested))
        .collect()
}

fn parse_action(path: &str, value: &Value, nested: bool) -> Result<Action, ScriptError> {
    let Value::Object(obj) = value else {
        return Err(error(
            path,
            format!(
                "must be an object such as {{\"say\": {{\"text\": \"…\"}}}}, not {}",
                kind(value)
            ),
        ));
    };
    let mut entries = obj.iter();
    let (verb, attrs) = match (entries.next(), entries.next()) {
        (Some(only), None) => only,
        _ => return Err(error(path, "an action has exactly one verb")),
    };
    if !VERBS.contains(&verb.as_str()) {
        return Err(error(path, format!("unknown verb {}", quoted(verb))));
    }
    if nested && verb != "say" && verb != "play" {
        return Err(error(
            path,
            format!("only say and play may be nested in getDigits, not {verb}"),
        ));
    }
    let vpath = child_path(path, verb);
    Ok(match verb.as_str() {
        "say" => Action::Say(say::parse(vpath, attrs)?),
        "play" => Action::Play(play::parse(vpath, attrs)?),
        "pause" => Action::Pause(pause::parse(vpath, attrs)?),
        "getDigits" => Action::GetDigits(get_digits::parse(vpath, attrs)?),
        "record" => Action::Record(record::parse(vpath, attrs)?),
        "dial" => Action::Dial(dial::parse(vpath, attrs)?),
        "redirect" => Action::Redirect(redirect::parse(vpath, attrs)?),
        "reject" => Action::Reject(reject::parse(vpath, attrs)?),
        "stream" => Action::Stream(stream::parse(vpath, attrs)?),
        "stopStream" => {
            stream::parse_stop(vpath, attrs)?;
            Action::StopStream
        }
        _ => {
            hangup::parse(vpath, attrs)?;
            Action::Hangup
        }
    })
}

/// Resolve `reference` (absolute, or relative like `/ivr/step2` or `step2`) against `base`, the
/// URL of the document that contained it. The result is always an absolute http(s) URL.
///
/// `resolve_url` does not know where `reference` came from, so errors name the reference itself
/// as their path; [`Script::resolve_urls`] reports real JSON paths.
pub fn resolve_url(base: &str, reference: &str) -> Result<String, ScriptError> {
    resolve_at(&quoted(reference), base, reference)
}

fn resolve_at(path: &str, base: &str, reference: &str) -> Result<String, ScriptError> {
    let base_url = url::Url::parse(base).map_err(|e| {
        error(
            path,
            format!("the base URL {} is invalid: {e}", quoted(base)),
        )
    })?;
    attrs::check_http(&base_url)
        .map_err(|m| error(path, format!("the base URL {} {m}", quoted(base))))?;
    attrs::check_url_reference(reference).map_err(|m| error(path, m))?;
    let joined = base_url
        .join(reference)
        .map_err(|e| error(path, format!("cannot be resolved: {e}")))?;
    attrs::check_http(&joined).map_err(|m| error(path, m))?;
    Ok(joined.into())
}

impl Script {
    /// Make every URL in the script absolute (`play.url`, every `action`, `redirect.url`),
    /// resolving relative ones against `base`, the URL this script was fetched from.
    pub fn resolve_urls(mut self, base: &str) -> Result<Script, ScriptError> {
        resolve_list("actions", &mut self.actions, base)?;
        Ok(self)
    }
}

fn resolve_list(path: &str, actions: &mut [Action], base: &str) -> Result<(), ScriptError> {
    for (i, action) in actions.iter_mut().enumerate() {
        let apath = child_path(&format!("{path}[{i}]"), action.verb());
        let fix = |url: &mut String, name: &str| -> Result<(), ScriptError> {
            *url = resolve_at(&child_path(&apath, name), base, url)?;
            Ok(())
        };
        let fix_opt = |url: &mut Option<String>| -> Result<(), ScriptError> {
            match url {
                Some(u) => fix(u, "action"),
                None => Ok(()),
            }
        };
        match action {
            Action::Play(p) => fix(&mut p.url, "url")?,
            Action::Redirect(r) => fix(&mut r.url, "url")?,
            Action::GetDigits(g) => {
                fix_opt(&mut g.action)?;
                resolve_list(&child_path(&apath, "nested"), &mut g.nested, base)?;
            }
            Action::Record(r) => fix_opt(&mut r.action)?,
            Action::Dial(d) => fix_opt(&mut d.action)?,
            Action::Stream(st) => {
                if let Some(u) = st.status_callback.as_mut() {
                    fix(u, "statusCallback")?;
                }
            }
            Action::Say(_)
            | Action::Pause(_)
            | Action::Reject(_)
            | Action::StopStream
            | Action::Hangup => {}
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod test_support {
    use super::*;

    /// Parse a single action `{"verb": attrs}` written as JSON text.
    pub fn one(action: &str) -> Result<Action, ScriptError> {
        let body = format!(r#"{{"actions": [{action}]}}"#);
        parse_script(body.as_bytes()).map(|mut s| s.actions.remove(0))
    }

    /// The error text for a single action.
    pub fn err(action: &str) -> String {
        match one(action) {
            Ok(a) => panic!("expected an error, got {a:?}"),
            Err(e) => e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    fn parse_err(body: &str) -> String {
        match parse_script(body.as_bytes()) {
            Ok(s) => panic!("expected an error, got {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn empty_script_means_continue() {
        assert_eq!(
            parse_script(br#"{"actions": []}"#),
            Ok(Script { actions: vec![] })
        );
    }

    #[test]
    fn document_shape() {
        assert_eq!(parse_err("[]"), "$: not a JSON object");
        assert_eq!(parse_err("\"x\""), "$: not a JSON object");
        assert!(parse_err("{").starts_with("$: not valid JSON"));
        assert_eq!(parse_err("{}"), "actions: required");
        assert_eq!(
            parse_err(r#"{"actions": {}}"#),
            "actions: must be an array, not an object"
        );
        assert_eq!(
            parse_err(r#"{"actions": [], "extra": 1}"#),
            "$.extra: unknown key (a script has only \"actions\")"
        );
    }

    #[test]
    fn at_most_fifty_actions() {
        let one = r#"{"hangup": {}}"#;
        let fifty = vec![one; MAX_ACTIONS].join(",");
        let s = parse_script(format!(r#"{{"actions": [{fifty}]}}"#).as_bytes()).expect("50 ok");
        assert_eq!(s.actions.len(), MAX_ACTIONS);
        let fifty_one = vec![one; MAX_ACTIONS + 1].join(",");
        assert_eq!(
            parse_err(&format!(r#"{{"actions": [{fifty_one}]}}"#)),
            "actions: at most 50 actions"
        );
    }

    #[test]
    fn action_objects_have_exactly_one_verb() {
        assert_eq!(
            parse_err(r#"{"actions": [{"hangup": {}}, {"pause": {}}, {}]}"#),
            "actions[2]: an action has exactly one verb"
        );
        assert_eq!(
            parse_err(r#"{"actions": [{"say": {"text": "a"}, "hangup": {}}]}"#),
            "actions[0]: an action has exactly one verb"
        );
        assert_eq!(
            parse_err(r#"{"actions": ["hangup"]}"#),
            r#"actions[0]: must be an object such as {"say": {"text": "…"}}, not a string"#
        );
    }

    #[test]
    fn unknown_verb() {
        assert_eq!(
            err(r#"{"dance": {}}"#),
            r#"actions[0]: unknown verb "dance""#
        );
        // Verbs are case-sensitive, like attributes.
        assert_eq!(err(r#"{"Say": {}}"#), r#"actions[0]: unknown verb "Say""#);
        assert_eq!(
            err(r#"{"get_digits": {}}"#),
            r#"actions[0]: unknown verb "get_digits""#
        );
    }

    #[test]
    fn verb_attributes_must_be_an_object() {
        assert_eq!(
            err(r#"{"say": "hello"}"#),
            "actions[0].say: must be an object of attributes, not a string"
        );
        assert_eq!(
            err(r#"{"pause": null}"#),
            "actions[0].pause: must be an object of attributes, not null"
        );
    }

    #[test]
    fn odd_keys_are_quoted_in_paths() {
        assert_eq!(
            err(r#"{"pause": {"len gth": 1}}"#),
            r#"actions[0].pause["len gth"]: unknown attribute (expected one of: length)"#
        );
    }

    #[test]
    fn verb_names() {
        let s = parse_script(
            br#"{"actions": [
                {"say": {"text": "a"}}, {"play": {"url": "a.wav"}}, {"pause": {}},
                {"getDigits": {}}, {"record": {}}, {"dial": {"number": "+254700000001"}},
                {"redirect": {"url": "/next"}}, {"reject": {}},
                {"stream": {"url": "wss://agent.example.com/media"}}, {"stopStream": {}},
                {"hangup": {}}
            ]}"#,
        )
        .expect("valid");
        let verbs: Vec<_> = s.actions.iter().map(Action::verb).collect();
        assert_eq!(verbs, VERBS);
    }

    #[test]
    fn relative_urls_resolve_against_the_document() {
        let base = "https://ivr.example.com/voice/menu?step=1";
        assert_eq!(
            resolve_url(base, "/voice/next").as_deref(),
            Ok("https://ivr.example.com/voice/next")
        );
        assert_eq!(
            resolve_url(base, "next").as_deref(),
            Ok("https://ivr.example.com/voice/next")
        );
        assert_eq!(
            resolve_url(base, "../up?x=1").as_deref(),
            Ok("https://ivr.example.com/up?x=1")
        );
        assert_eq!(
            resolve_url(base, "//cdn.example.net/a.wav").as_deref(),
            Ok("https://cdn.example.net/a.wav")
        );
        assert_eq!(
            resolve_url(base, "http://other.example.org/x").as_deref(),
            Ok("http://other.example.org/x")
        );
        assert_eq!(
            resolve_url(base, "ftp://x.example/a").map_err(|e| e.message),
            Err(
                "must be an http or https URL (or relative to the callback's URL), not ftp:".into()
            )
        );
        assert!(resolve_url("not a url", "next").is_err());
        assert!(resolve_url("file:///etc/", "passwd").is_err());
    }

    #[test]
    fn resolve_urls_covers_every_url_attribute() {
        let s = parse_script(
            br#"{"actions": [
                {"getDigits": {"action": "gathered", "nested": [{"play": {"url": "menu.wav"}}]}},
                {"record": {"action": "/rec"}},
                {"dial": {"number": "+254700000001", "action": "dialed"}},
                {"play": {"url": "https://cdn.example.net/x.mp3"}},
                {"redirect": {"url": "?again=1"}}
            ]}"#,
        )
        .expect("valid")
        .resolve_urls("https://ivr.example.com/v/start")
        .expect("resolves");
        let mut urls = Vec::new();
        for a in &s.actions {
            match a {
                Action::GetDigits(g) => {
                    urls.push(g.action.clone().unwrap_or_default());
                    if let Action::Play(p) = &g.nested[0] {
                        urls.push(p.url.clone());
                    }
                }
                Action::Record(r) => urls.push(r.action.clone().unwrap_or_default()),
                Action::Dial(d) => urls.push(d.action.clone().unwrap_or_default()),
                Action::Play(p) => urls.push(p.url.clone()),
                Action::Redirect(r) => urls.push(r.url.clone()),
                _ => {}
            }
        }
        assert_eq!(
            urls,
            [
                "https://ivr.example.com/v/gathered",
                "https://ivr.example.com/v/menu.wav",
                "https://ivr.example.com/rec",
                "https://ivr.example.com/v/dialed",
                "https://cdn.example.net/x.mp3",
                "https://ivr.example.com/v/start?again=1",
            ]
        );
        let e = parse_script(br#"{"actions": [{"redirect": {"url": "next"}}]}"#)
            .expect("valid")
            .resolve_urls("mailto:a@b.example")
            .expect_err("bad base");
        assert_eq!(e.path, "actions[0].redirect.url");
    }
}
