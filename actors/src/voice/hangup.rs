//! `hangup`: end the call. `{"hangup": {}}` or `{"hangup": null}`; it takes no attributes.

use serde_json::Value;

use super::ScriptError;
use super::attrs::Attrs;

pub(super) fn parse(path: String, value: &Value) -> Result<(), ScriptError> {
    Attrs::new(path, value, &[], true).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::super::Action;
    use super::super::test_support::{err, one};

    #[test]
    fn empty_or_null() {
        assert_eq!(one(r#"{"hangup": {}}"#), Ok(Action::Hangup));
        assert_eq!(one(r#"{"hangup": null}"#), Ok(Action::Hangup));
        assert_eq!(
            err(r#"{"hangup": {"reason": "x"}}"#),
            "actions[0].hangup.reason: unknown attribute (this verb takes none)"
        );
        assert_eq!(
            err(r#"{"hangup": true}"#),
            "actions[0].hangup: must be an object of attributes, not a boolean"
        );
    }
}
