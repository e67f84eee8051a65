//! `pause`: silence for a while.

use serde_json::Value;

use super::ScriptError;
use super::attrs::Attrs;

/// Longest pause: an hour.
pub const MAX_PAUSE_SECONDS: u32 = 3600;

#[derive(Debug, Clone, PartialEq)]
pub struct Pause {
    /// JSON `length`: default 1, 0..=3600.
    pub length_seconds: u32,
}

pub(super) fn parse(path: String, value: &Value) -> Result<Pause, ScriptError> {
    let a = Attrs::new(path, value, &["length"], false)?;
    Ok(Pause {
        length_seconds: a.uint("length", 1, 0, MAX_PAUSE_SECONDS)?,
    })
}

#[cfg(test)]
mod tests {
    use super::super::Action;
    use super::super::test_support::{err, one};

    fn length(attrs: &str) -> u32 {
        match one(&format!(r#"{{"pause": {attrs}}}"#)) {
            Ok(Action::Pause(p)) => p.length_seconds,
            other => panic!("expected pause, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_bounds() {
        assert_eq!(length("{}"), 1);
        assert_eq!(length(r#"{"length": 0}"#), 0);
        assert_eq!(length(r#"{"length": 3600}"#), 3600);
        assert_eq!(
            err(r#"{"pause": {"length": 3601}}"#),
            "actions[0].pause.length: must be a whole number from 0 to 3600"
        );
        assert_eq!(
            err(r#"{"pause": {"length": -1}}"#),
            "actions[0].pause.length: must be a whole number from 0 to 3600"
        );
        assert_eq!(
            err(r#"{"pause": {"length": "2"}}"#),
            "actions[0].pause.length: must be a whole number from 0 to 3600, not a string"
        );
        assert_eq!(
            err(r#"{"pause": {"seconds": 2}}"#),
            "actions[0].pause.seconds: unknown attribute (expected one of: length)"
        );
    }
}
