//! `dial`: connect the caller to a number, the first answering of several numbers, a SIP URI,
//! or the number's registered devices.

use serde_json::Value;

use super::ScriptError;
use super::attrs::{Attrs, error, is_e164, kind};

/// Most numbers dialled at once (`numbers`).
pub const MAX_DIAL_NUMBERS: usize = 10;

/// Longest dialled call: four hours (the `timeLimit` default and bound).
const MAX_TIME_LIMIT_SECONDS: u32 = 14_400;

/// Longest SIP URI we accept.
const MAX_SIP_CHARS: usize = 256;

const E164_MESSAGE: &str = "must be an E.164 number such as +254700000001";

#[derive(Debug, Clone, PartialEq)]
pub enum DialTarget {
    /// JSON `number`: one E.164 number.
    Number(String),
    /// JSON `numbers`: 1..=10 E.164 numbers rung together; the first to answer wins.
    Numbers(Vec<String>),
    /// JSON `sip`: a `sip:` or `sips:` URI.
    Sip(String),
    /// JSON `device`: `true` for every registered device of the number, or the label of one
    /// of its SIP credentials for the devices registered with that credential.
    Device(DeviceTarget),
}

#[derive(Debug, Clone, PartialEq)]
pub enum DeviceTarget {
    All,
    Label(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dial {
    pub target: DialTarget,
    /// JSON `callerId`: E.164; `None` = the caller's number. Whether the workspace may present
    /// it is the executor's decision.
    pub caller_id: Option<String>,
    /// JSON `timeout`: seconds to ring before giving up, default 30, 1..=600.
    pub timeout_seconds: u32,
    /// JSON `timeLimit`: longest connected time, default and at most 14400 s.
    pub time_limit_seconds: u32,
    /// JSON `answerOnBridge`, default false: the caller keeps ringing until the dialled party
    /// answers, instead of being answered at once and hearing ringback.
    pub answer_on_bridge: bool,
    /// Where `DialStatus`/`DialDuration` go; `None` = the voice callback. As written.
    pub action: Option<String>,
}

pub(super) fn parse(path: String, value: &Value) -> Result<Dial, ScriptError> {
    let a = Attrs::new(
        path,
        value,
        &[
            "number",
            "numbers",
            "sip",
            "device",
            "callerId",
            "timeout",
            "timeLimit",
            "answerOnBridge",
            "action",
        ],
        false,
    )?;
    let given = ["number", "numbers", "sip", "device"]
        .into_iter()
        .filter(|k| a.has(k))
        .count();
    if given != 1 {
        return Err(error(
            a.path(),
            "give exactly one of number, numbers, sip or device",
        ));
    }
    let target = if let Some(n) = a.string("number")? {
        if !is_e164(n) {
            return Err(a.err("number", E164_MESSAGE));
        }
        DialTarget::Number(n.to_owned())
    } else if let Some(list) = a.get("numbers") {
        DialTarget::Numbers(numbers(&a, list)?)
    } else if let Some(device) = a.get("device") {
        DialTarget::Device(device_target(&a, device)?)
    } else {
        let sip = a.required_string("sip")?;
        if !is_sip_uri(sip) {
            return Err(a.err("sip", "must be a SIP URI such as sip:alice@pbx.example.com"));
        }
        DialTarget::Sip(sip.to_owned())
    };
    let caller_id = a.string("callerId")?;
    if let Some(c) = caller_id
        && !is_e164(c)
    {
        return Err(a.err("callerId", E164_MESSAGE));
    }
    Ok(Dial {
        target,
        caller_id: caller_id.map(str::to_owned),
        timeout_seconds: a.uint("timeout", 30, 1, 600)?,
        time_limit_seconds: a.uint(
            "timeLimit",
            MAX_TIME_LIMIT_SECONDS,
            1,
            MAX_TIME_LIMIT_SECONDS,
        )?,
        answer_on_bridge: a.boolean("answerOnBridge", false)?,
        action: a.url("action")?,
    })
}

/// Longest credential label (as the credentials API allows).
const MAX_LABEL_CHARS: usize = 64;

fn device_target(a: &Attrs<'_>, v: &Value) -> Result<DeviceTarget, ScriptError> {
    const MESSAGE: &str = "must be true or the label of one of the number's SIP credentials";
    match v {
        Value::Bool(true) => Ok(DeviceTarget::All),
        Value::String(label)
            if !label.trim().is_empty() && label.chars().count() <= MAX_LABEL_CHARS =>
        {
            Ok(DeviceTarget::Label(label.clone()))
        }
        _ => Err(a.err("device", MESSAGE)),
    }
}

fn numbers(a: &Attrs<'_>, list: &Value) -> Result<Vec<String>, ScriptError> {
    let Value::Array(list) = list else {
        return Err(a.err("numbers", format!("must be an array, not {}", kind(list))));
    };
    if list.is_empty() || list.len() > MAX_DIAL_NUMBERS {
        return Err(a.err(
            "numbers",
            format!("must list 1 to {MAX_DIAL_NUMBERS} numbers"),
        ));
    }
    let base = a.path_of("numbers");
    list.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(n) if is_e164(n) => Ok(n.clone()),
            _ => Err(error(format!("{base}[{i}]"), E164_MESSAGE)),
        })
        .collect()
}

/// `sip:`/`sips:` then an optional `user@`, a host (name, IPv4 or `[IPv6]`), an optional port,
/// and optional `;params`. Enough to refuse obvious garbage; the SIP stack does the rest.
fn is_sip_uri(s: &str) -> bool {
    if s.len() > MAX_SIP_CHARS || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let lower = s.to_ascii_lowercase();
    let Some(rest) = lower
        .strip_prefix("sip:")
        .or_else(|| lower.strip_prefix("sips:"))
    else {
        return false;
    };
    let rest = rest.split([';', '?']).next().unwrap_or_default();
    let hostport = match rest.rsplit_once('@') {
        Some((user, host)) if !user.is_empty() => host,
        Some(_) => return false,
        None => rest,
    };
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        match v6.split_once(']') {
            Some((addr, port)) => {
                if addr.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                match port.strip_prefix(':') {
                    None => return port.is_empty(),
                    Some(p) => return p.parse::<u16>().is_ok(),
                }
            }
            None => return false,
        }
    } else {
        match hostport.split_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => h,
            Some(_) => return false,
            None => hostport,
        }
    };
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::super::Action;
    use super::super::test_support::{err, one};
    use super::*;

    fn dial(attrs: &str) -> Dial {
        match one(&format!(r#"{{"dial": {attrs}}}"#)) {
            Ok(Action::Dial(d)) => d,
            other => panic!("expected dial, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        assert_eq!(
            dial(r#"{"number": "+254700000001"}"#),
            Dial {
                target: DialTarget::Number("+254700000001".into()),
                caller_id: None,
                timeout_seconds: 30,
                time_limit_seconds: 14400,
                answer_on_bridge: false,
                action: None
            }
        );
    }

    #[test]
    fn exactly_one_target() {
        let msg = "actions[0].dial: give exactly one of number, numbers, sip or device";
        assert_eq!(err(r#"{"dial": {}}"#), msg);
        assert_eq!(err(r#"{"dial": {"callerId": "+254700000001"}}"#), msg);
        assert_eq!(
            err(r#"{"dial": {"number": "+254700000001", "sip": "sip:a@b.example"}}"#),
            msg
        );
        // null reads as absent, so this is one target.
        assert_eq!(
            dial(r#"{"number": null, "sip": "sip:a@b.example"}"#).target,
            DialTarget::Sip("sip:a@b.example".into())
        );
    }

    #[test]
    fn devices_and_answer_on_bridge() {
        assert_eq!(
            dial(r#"{"device": true}"#).target,
            DialTarget::Device(DeviceTarget::All)
        );
        let d = dial(r#"{"device": "front desk", "answerOnBridge": true}"#);
        assert_eq!(
            d.target,
            DialTarget::Device(DeviceTarget::Label("front desk".into()))
        );
        assert!(d.answer_on_bridge);
        let msg = "actions[0].dial.device: must be true or the label of one of the number's SIP credentials";
        assert_eq!(err(r#"{"dial": {"device": false}}"#), msg);
        assert_eq!(err(r#"{"dial": {"device": "  "}}"#), msg);
        assert_eq!(err(r#"{"dial": {"device": 1}}"#), msg);
        assert_eq!(
            err(r#"{"dial": {"device": true, "number": "+254700000001"}}"#),
            "actions[0].dial: give exactly one of number, numbers, sip or device"
        );
        assert!(
            err(r#"{"dial": {"device": true, "answerOnBridge": "yes"}}"#)
                .starts_with("actions[0].dial.answerOnBridge:")
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(
            dial(r#"{"numbers": ["+254700000001", "+255700000002"]}"#).target,
            DialTarget::Numbers(vec!["+254700000001".into(), "+255700000002".into()])
        );
        let ten = ["\"+254700000001\""; 10].join(",");
        assert!(
            matches!(dial(&format!(r#"{{"numbers": [{ten}]}}"#)).target, DialTarget::Numbers(v) if v.len() == 10)
        );
        let eleven = ["\"+254700000001\""; 11].join(",");
        assert_eq!(
            err(&format!(r#"{{"dial": {{"numbers": [{eleven}]}}}}"#)),
            "actions[0].dial.numbers: must list 1 to 10 numbers"
        );
        assert_eq!(
            err(r#"{"dial": {"numbers": []}}"#),
            "actions[0].dial.numbers: must list 1 to 10 numbers"
        );
        assert_eq!(
            err(r#"{"dial": {"numbers": ["+254700000001", "0700000002"]}}"#),
            "actions[0].dial.numbers[1]: must be an E.164 number such as +254700000001"
        );
        assert_eq!(
            err(r#"{"dial": {"numbers": "+254700000001"}}"#),
            "actions[0].dial.numbers: must be an array, not a string"
        );
    }

    #[test]
    fn e164() {
        for bad in [
            "0700000001",
            "+0700000001",
            "+2547000000011234",
            "+2547 00",
            "254700000001",
            "+",
        ] {
            assert_eq!(
                err(&format!(r#"{{"dial": {{"number": "{bad}"}}}}"#)),
                "actions[0].dial.number: must be an E.164 number such as +254700000001",
                "{bad}"
            );
        }
        assert_eq!(
            err(r#"{"dial": {"number": 254700000001}}"#),
            "actions[0].dial.number: must be a string, not a number"
        );
        assert_eq!(
            dial(r#"{"number": "+254700000001", "callerId": "+254711000000"}"#)
                .caller_id
                .as_deref(),
            Some("+254711000000")
        );
        assert_eq!(
            err(r#"{"dial": {"number": "+254700000001", "callerId": "Alice"}}"#),
            "actions[0].dial.callerId: must be an E.164 number such as +254700000001"
        );
    }

    #[test]
    fn sip_uris() {
        for ok in [
            "sip:alice@pbx.example.com",
            "sips:alice@pbx.example.com:5061",
            "sip:pbx.example.com",
            "sip:+254700000001@10.0.0.5;transport=tcp",
            "SIP:bob@[2001:db8::1]:5060",
        ] {
            assert_eq!(
                dial(&format!(r#"{{"sip": "{ok}"}}"#)).target,
                DialTarget::Sip(ok.into())
            );
        }
        for bad in [
            "alice@pbx.example.com",
            "sip:",
            "sip:@host",
            "sip:a@",
            "sip:a@host:99999",
            "sip:a b@host",
            "tel:+254700000001",
            "sip:a@[::1",
            "sip:a@-x.example",
        ] {
            assert_eq!(
                err(&format!(r#"{{"dial": {{"sip": "{bad}"}}}}"#)),
                "actions[0].dial.sip: must be a SIP URI such as sip:alice@pbx.example.com",
                "{bad}"
            );
        }
    }

    #[test]
    fn bounds_and_action() {
        let d = dial(
            r#"{"number": "+254700000001", "timeout": 600, "timeLimit": 1, "action": "dialed"}"#,
        );
        assert_eq!((d.timeout_seconds, d.time_limit_seconds), (600, 1));
        assert_eq!(d.action.as_deref(), Some("dialed"));
        assert_eq!(
            dial(r#"{"number": "+254700000001", "timeout": 1}"#).timeout_seconds,
            1
        );
        for bad in ["0", "601"] {
            assert_eq!(
                err(&format!(
                    r#"{{"dial": {{"number": "+254700000001", "timeout": {bad}}}}}"#
                )),
                "actions[0].dial.timeout: must be a whole number from 1 to 600"
            );
        }
        for bad in ["0", "14401"] {
            assert_eq!(
                err(&format!(
                    r#"{{"dial": {{"number": "+254700000001", "timeLimit": {bad}}}}}"#
                )),
                "actions[0].dial.timeLimit: must be a whole number from 1 to 14400"
            );
        }
        assert_eq!(
            err(r#"{"dial": {"number": "+254700000001", "record": true}}"#),
            "actions[0].dial.record: unknown attribute (expected one of: number, numbers, sip, device, callerId, timeout, timeLimit, answerOnBridge, action)"
        );
    }
}
