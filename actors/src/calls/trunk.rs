//! The outbound trunk (DESIGN §8): where calls to numbers that are not ours go, how our INVITE
//! presents the caller, and what a carrier's refusal means for the call.

use sautikit_sip::transaction::Peer;

use crate::call_store::CallStatus;

/// `SAUTIKIT_OUTBOUND_TRUNK`, resolved, with the credentials to answer its challenges.
#[derive(Clone, Debug)]
pub struct Trunk {
    /// Where INVITEs go.
    pub peer: Peer,
    /// The host part of the Request-URI and To (`sip:+2547…@host`), as configured.
    pub host: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl Trunk {
    /// The Request-URI for an E.164 number (with `+`).
    pub fn uri(&self, e164: &str) -> String {
        format!("sip:{e164}@{}", self.host)
    }
}

/// A carrier's final refusal as the call's status and `failure_reason` (486 busy; 408, 480 and
/// 487 no answer; anything else failed, with its code).
pub fn refusal(code: u16) -> (CallStatus, Option<String>) {
    match code {
        486 | 600 => (CallStatus::Busy, None),
        408 | 480 | 487 => (CallStatus::NoAnswer, None),
        c => (CallStatus::Failed, Some(format!("sip.{c}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carrier_codes_map_to_statuses() {
        assert_eq!(refusal(486).0, CallStatus::Busy);
        assert_eq!(refusal(480).0, CallStatus::NoAnswer);
        assert_eq!(refusal(408).0, CallStatus::NoAnswer);
        assert_eq!(refusal(487).0, CallStatus::NoAnswer);
        assert_eq!(
            refusal(503),
            (CallStatus::Failed, Some("sip.503".to_owned()))
        );
        assert_eq!(
            refusal(404),
            (CallStatus::Failed, Some("sip.404".to_owned()))
        );
    }
}
