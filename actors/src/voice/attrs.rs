//! Reading one verb's attribute object with exact JSON paths in every error. Shared by the verb
//! files so that every verb reports types, bounds and unknown attributes the same way.

use serde_json::{Map, Number, Value};

use super::ScriptError;

/// Longest URL we accept in a script; longer ones are almost certainly generated garbage.
pub(super) const MAX_URL_CHARS: usize = 2048;

/// Keys and verb names are echoed in errors (and so in logs): keep them short.
const MAX_ECHO_CHARS: usize = 64;

pub(super) fn error(path: impl Into<String>, message: impl Into<String>) -> ScriptError {
    ScriptError {
        path: path.into(),
        message: message.into(),
    }
}

/// `parent.key`, or `parent["odd key"]` when the key is not a plain identifier, so a path is
/// never ambiguous.
pub(super) fn child_path(parent: &str, key: &str) -> String {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        format!("{parent}.{}", truncate(key))
    } else {
        format!("{parent}[{}]", quoted(key))
    }
}

/// A JSON string literal of `s`, truncated, for error messages.
pub(super) fn quoted(s: &str) -> String {
    Value::String(truncate(s)).to_string()
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= MAX_ECHO_CHARS {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(MAX_ECHO_CHARS).collect();
        t.push('…');
        t
    }
}

/// "a string", "an array", … for "must be X, not Y" messages.
pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The attributes of one verb, e.g. `actions[1].getDigits`.
pub(super) struct Attrs<'a> {
    path: String,
    map: Option<&'a Map<String, Value>>,
}

impl<'a> Attrs<'a> {
    /// `value` must be an object whose keys are all in `known`. `null` is accepted only when
    /// `allow_null` (hangup), and then reads as no attributes.
    pub(super) fn new(
        path: String,
        value: &'a Value,
        known: &[&str],
        allow_null: bool,
    ) -> Result<Self, ScriptError> {
        let map = match value {
            Value::Object(m) => m,
            Value::Null if allow_null => return Ok(Attrs { path, map: None }),
            other => {
                return Err(error(
                    path,
                    format!("must be an object of attributes, not {}", kind(other)),
                ));
            }
        };
        // Reject unknown keys before reading anything: a misspelt attribute would otherwise
        // silently fall back to its default.
        if let Some(key) = map.keys().find(|k| !known.contains(&k.as_str())) {
            let message = if known.is_empty() {
                "unknown attribute (this verb takes none)".to_owned()
            } else {
                format!("unknown attribute (expected one of: {})", known.join(", "))
            };
            return Err(error(child_path(&path, key), message));
        }
        Ok(Attrs {
            path,
            map: Some(map),
        })
    }

    pub(super) fn path(&self) -> &str {
        &self.path
    }

    pub(super) fn path_of(&self, name: &str) -> String {
        child_path(&self.path, name)
    }

    pub(super) fn err(&self, name: &str, message: impl Into<String>) -> ScriptError {
        error(self.path_of(name), message)
    }

    /// The attribute's value; `null` counts as absent, since many serializers write unset
    /// optional fields as null.
    pub(super) fn get(&self, name: &str) -> Option<&'a Value> {
        self.map?.get(name).filter(|v| !v.is_null())
    }

    pub(super) fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub(super) fn string(&self, name: &str) -> Result<Option<&'a str>, ScriptError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.err(name, format!("must be a string, not {}", kind(other)))),
        }
    }

    pub(super) fn required_string(&self, name: &str) -> Result<&'a str, ScriptError> {
        self.string(name)?.ok_or_else(|| self.err(name, "required"))
    }

    pub(super) fn boolean(&self, name: &str, default: bool) -> Result<bool, ScriptError> {
        match self.get(name) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => {
                Err(self.err(name, format!("must be true or false, not {}", kind(other))))
            }
        }
    }

    /// A whole number in `min..=max`, or `default` when absent. `5.0` counts as whole (Python
    /// clients write floats); `"5"` does not: types are never coerced.
    pub(super) fn uint(
        &self,
        name: &str,
        default: u32,
        min: u32,
        max: u32,
    ) -> Result<u32, ScriptError> {
        let bound = if max == u32::MAX {
            format!("must be a whole number ≥ {min}")
        } else {
            format!("must be a whole number from {min} to {max}")
        };
        let Some(v) = self.get(name) else {
            return Ok(default);
        };
        let Value::Number(n) = v else {
            return Err(self.err(name, format!("{bound}, not {}", kind(v))));
        };
        match whole(n) {
            Some(w) if w >= i128::from(min) && w <= i128::from(max) => {
                u32::try_from(w).map_err(|_| self.err(name, bound))
            }
            _ => Err(self.err(name, bound)),
        }
    }

    /// An optional URL reference (absolute http(s) or relative), as written.
    pub(super) fn url(&self, name: &str) -> Result<Option<String>, ScriptError> {
        match self.string(name)? {
            None => Ok(None),
            Some(s) => check_url_reference(s)
                .map(|()| Some(s.to_owned()))
                .map_err(|m| self.err(name, m)),
        }
    }

    pub(super) fn required_url(&self, name: &str) -> Result<String, ScriptError> {
        let s = self.required_string(name)?;
        check_url_reference(s).map_err(|m| self.err(name, m))?;
        Ok(s.to_owned())
    }
}

fn whole(n: &Number) -> Option<i128> {
    if let Some(u) = n.as_u64() {
        return Some(i128::from(u));
    }
    if let Some(i) = n.as_i64() {
        return Some(i128::from(i));
    }
    let f = n.as_f64()?;
    // The magnitude check keeps the cast exact; anything that large is out of range anyway.
    (f.fract() == 0.0 && f.abs() < 1e30).then_some(f as i128)
}

/// A reference that is either an absolute http(s) URL or relative to the document's URL.
pub(super) fn check_url_reference(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.chars().count() > MAX_URL_CHARS {
        return Err(format!("must be at most {MAX_URL_CHARS} characters"));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must be a URL without spaces or control characters".into());
    }
    match url::Url::parse(s) {
        Ok(u) => check_http(&u),
        Err(url::ParseError::RelativeUrlWithoutBase) => {
            // Any http base will do to check that the relative part itself is well formed.
            let base = url::Url::parse("https://base.invalid/").map_err(|e| e.to_string())?;
            base.join(s)
                .map_err(|e| format!("is not a valid relative URL: {e}"))
                .and_then(|u| check_http(&u))
        }
        Err(e) => Err(format!("is not a valid URL: {e}")),
    }
}

pub(super) fn check_http(u: &url::Url) -> Result<(), String> {
    match u.scheme() {
        "http" | "https" if u.host().is_some() => Ok(()),
        "http" | "https" => Err("must have a host".into()),
        other => Err(format!(
            "must be an http or https URL (or relative to the callback's URL), not {other}:"
        )),
    }
}

/// `+` then 2 to 15 digits, the first not 0 (ITU-T E.164).
pub(super) fn is_e164(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else {
        return false;
    };
    (2..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// A single DTMF key.
pub(super) fn is_dtmf(c: char) -> bool {
    c.is_ascii_digit() || c == '*' || c == '#'
}
