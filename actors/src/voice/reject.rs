//! `reject`: refuse an unanswered call, as rejected or busy.

use serde_json::Value;

use super::ScriptError;
use super::attrs::{Attrs, quoted};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RejectReason {
    /// JSON `"rejected"` (default).
    #[default]
    Rejected,
    /// JSON `"busy"`.
    Busy,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    pub reason: RejectReason,
}

pub(super) fn parse(path: String, value: &Value) -> Result<Reject, ScriptError> {
    let a = Attrs::new(path, value, &["reason"], false)?;
    let reason = match a.string("reason")? {
        None | Some("rejected") => RejectReason::Rejected,
        Some("busy") => RejectReason::Busy,
        Some(other) => {
            return Err(a.err(
                "reason",
                format!("must be \"rejected\" or \"busy\", not {}", quoted(other)),
            ));
        }
    };
    Ok(Reject { reason })
}

#[cfg(test)]
mod tests {
    use super::super::Action;
    use super::super::test_support::{err, one};
    use super::*;

    fn reason(attrs: &str) -> RejectReason {
        match one(&format!(r#"{{"reject": {attrs}}}"#)) {
            Ok(Action::Reject(r)) => r.reason,
            other => panic!("expected reject, got {other:?}"),
        }
    }

    #[test]
    fn reasons() {
        assert_eq!(reason("{}"), RejectReason::Rejected);
        assert_eq!(reason(r#"{"reason": "rejected"}"#), RejectReason::Rejected);
        assert_eq!(reason(r#"{"reason": "busy"}"#), RejectReason::Busy);
        assert_eq!(
            err(r#"{"reject": {"reason": "Busy"}}"#),
            r#"actions[0].reject.reason: must be "rejected" or "busy", not "Busy""#
        );
        assert_eq!(
            err(r#"{"reject": {"reason": 1}}"#),
            "actions[0].reject.reason: must be a string, not a number"
        );
        assert_eq!(
            err(r#"{"reject": {"why": "busy"}}"#),
            "actions[0].reject.why: unknown attribute (expected one of: reason)"
        );
    }
}
