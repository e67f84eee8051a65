//! `redirect`: fetch the next script from another URL; the rest of this script is dropped.

use serde_json::Value;

use super::ScriptError;
use super::attrs::{Attrs, quoted};
use crate::callback::CallbackMethod;

#[derive(Debug, Clone, PartialEq)]
pub struct Redirect {
    /// Absolute http(s), or relative to the document's URL. As written.
    pub url: String,
    /// JSON `method`: `"POST"` (default) or `"GET"`, exactly so (HTTP methods are
    /// case-sensitive).
    pub method: CallbackMethod,
}

pub(super) fn parse(path: String, value: &Value) -> Result<Redirect, ScriptError> {
    let a = Attrs::new(path, value, &["url", "method"], false)?;
    let method = match a.string("method")? {
        None | Some("POST") => CallbackMethod::Post,
        Some("GET") => CallbackMethod::Get,
        Some(other) => {
            return Err(a.err(
                "method",
                format!("must be \"POST\" or \"GET\", not {}", quoted(other)),
            ));
        }
    };
    Ok(Redirect {
        url: a.required_url("url")?,
        method,
    })
}

#[cfg(test)]
mod tests {
    use super::super::Action;
    use super::super::test_support::{err, one};
    use super::*;

    fn redirect(attrs: &str) -> Redirect {
        match one(&format!(r#"{{"redirect": {attrs}}}"#)) {
            Ok(Action::Redirect(r)) => r,
            other => panic!("expected redirect, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_methods() {
        assert_eq!(
            redirect(r#"{"url": "/next"}"#),
            Redirect {
                url: "/next".into(),
                method: CallbackMethod::Post
            }
        );
        assert_eq!(
            redirect(r#"{"url": "/n", "method": "GET"}"#).method,
            CallbackMethod::Get
        );
        assert_eq!(
            redirect(r#"{"url": "/n", "method": "POST"}"#).method,
            CallbackMethod::Post
        );
        assert_eq!(
            err(r#"{"redirect": {"url": "/n", "method": "get"}}"#),
            r#"actions[0].redirect.method: must be "POST" or "GET", not "get""#
        );
        assert_eq!(
            err(r#"{"redirect": {"url": "/n", "method": "PUT"}}"#),
            r#"actions[0].redirect.method: must be "POST" or "GET", not "PUT""#
        );
    }

    #[test]
    fn url_required() {
        assert_eq!(
            err(r#"{"redirect": {}}"#),
            "actions[0].redirect.url: required"
        );
        assert_eq!(
            err(r#"{"redirect": {"url": "javascript:alert(1)"}}"#),
            "actions[0].redirect.url: must be an http or https URL (or relative to the callback's URL), not javascript:"
        );
        assert_eq!(
            err(r#"{"redirect": {"url": "/n", "href": "/m"}}"#),
            "actions[0].redirect.href: unknown attribute (expected one of: url, method)"
        );
    }
}
