//! Twilio's Media Streams messages, as agents written for Twilio expect them: the names, the
//! fields, and the numbers written as strings (`sequenceNumber`, `chunk`, `timestamp`).
//! Pure: JSON in and out, no socket.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

/// What the stream is about, as `start` tells it.
#[derive(Debug, Clone)]
pub struct StartInfo<'a> {
    pub stream_sid: &'a str,
    /// Twilio's account: the workspace.
    pub account_sid: &'a str,
    /// Our call id.
    pub call_sid: &'a str,
    pub tracks: &'a [&'static str],
    pub custom_parameters: &'a [(String, String)],
    pub format: crate::voice::MediaFormat,
}

/// Numbers our messages: `sequenceNumber` counts every message after `connected`.
#[derive(Debug)]
pub struct Outgoing {
    stream_sid: String,
    /// `stream_sid` as a JSON string, quotes included, for `media`.
    stream_sid_json: String,
    sequence: u64,
}

impl Outgoing {
    pub fn new(stream_sid: &str) -> Self {
        Outgoing {
            stream_sid: stream_sid.to_owned(),
            stream_sid_json: Value::from(stream_sid).to_string(),
            sequence: 0,
        }
    }

    fn next(&mut self) -> String {
        self.sequence += 1;
        self.sequence.to_string()
    }

    pub fn connected() -> String {
        json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}).to_string()
    }

    pub fn start(&mut self, s: &StartInfo<'_>) -> String {
        let params: serde_json::Map<String, Value> = s
            .custom_parameters
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let (encoding, rate) = s.format.encoding();
        json!({
            "event": "start",
            "sequenceNumber": self.next(),
            "start": {
                "accountSid": s.account_sid,
                "streamSid": s.stream_sid,
                "callSid": s.call_sid,
                "tracks": s.tracks,
                "customParameters": params,
                "mediaFormat": {"encoding": encoding, "sampleRate": rate, "channels": 1},
            },
            "streamSid": s.stream_sid,
        })
        .to_string()
    }

    /// 20 ms of audio (µ-law, or L16 bytes) on `track` (`inbound` or `outbound`); `timestamp`
    /// in ms since the stream started. Fifty a second per stream: written straight into one string (the same text
    /// `json!` would give, without building a `Value` first). The track is one of ours and the
    /// numbers and base64 need no escaping; the stream's sid was escaped once.
    pub fn media(
        &mut self,
        track: &'static str,
        chunk: u64,
        timestamp_ms: u64,
        audio: &[u8],
    ) -> String {
        use std::fmt::Write as _;
        self.sequence += 1;
        let mut text =
            String::with_capacity(140 + self.stream_sid_json.len() + audio.len().div_ceil(3) * 4);
        let _ = write!(
            text,
            r#"{{"event":"media","sequenceNumber":"{}","media":{{"track":"{track}","chunk":"{chunk}","timestamp":"{timestamp_ms}","payload":""#,
            self.sequence
        );
        STANDARD.encode_string(audio, &mut text);
        text.push_str(r#""},"streamSid":"#);
        text.push_str(&self.stream_sid_json);
        text.push('}');
        text
    }

    pub fn dtmf(&mut self, digit: char) -> String {
        json!({
            "event": "dtmf",
            "streamSid": self.stream_sid,
            "sequenceNumber": self.next(),
            "dtmf": {"track": "inbound_track", "digit": digit.to_string()},
        })
        .to_string()
    }

    /// A mark echoed: its audio has played, or (`cleared`) it was dropped by `clear`.
    pub fn mark(&mut self, name: &str, cleared: bool) -> String {
        let mut mark = json!({"name": name});
        if cleared {
            mark["cleared"] = Value::Bool(true);
        }
        json!({
            "event": "mark",
            "sequenceNumber": self.next(),
            "streamSid": self.stream_sid,
            "mark": mark,
        })
        .to_string()
    }

    pub fn stop(&mut self, account_sid: &str, call_sid: &str) -> String {
        json!({
            "event": "stop",
            "sequenceNumber": self.next(),
            "streamSid": self.stream_sid,
            "stop": {"accountSid": account_sid, "callSid": call_sid},
        })
        .to_string()
    }
}

/// What the server may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Audio to play to the caller: the payload's bytes (µ-law, or L16).
    Media(Vec<u8>),
    Mark(String),
    Clear,
    /// An event we do not act on (kept for forward compatibility, as Twilio does).
    Other(String),
}

/// Why a server's message was refused (the stream ends).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadMessage {
    #[error("not a JSON object")]
    NotJson,
    #[error("no \"event\"")]
    NoEvent,
    #[error("media without a base64 payload")]
    BadPayload,
    #[error("mark without a name")]
    BadMark,
}

pub fn parse(text: &str) -> Result<Incoming, BadMessage> {
    let v: Value = serde_json::from_str(text).map_err(|_| BadMessage::NotJson)?;
    let Value::Object(o) = &v else {
        return Err(BadMessage::NotJson);
    };
    let event = o
        .get("event")
        .and_then(Value::as_str)
        .ok_or(BadMessage::NoEvent)?;
    match event {
        "media" => {
            let payload = o
                .get("media")
                .and_then(|m| m.get("payload"))
                .and_then(Value::as_str)
                .ok_or(BadMessage::BadPayload)?;
            STANDARD
                .decode(payload)
                .map(Incoming::Media)
                .map_err(|_| BadMessage::BadPayload)
        }
        "mark" => o
            .get("mark")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .map(|n| Incoming::Mark(n.to_owned()))
            .ok_or(BadMessage::BadMark),
        "clear" => Ok(Incoming::Clear),
        other => Ok(Incoming::Other(other.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_messages_have_twilios_shape() {
        let mut out = Outgoing::new("MZ1");
        let v: Value = serde_json::from_str(&Outgoing::connected()).unwrap();
        assert_eq!(v["event"], "connected");
        assert_eq!(v["protocol"], "Call");
        let params = [("lang".to_owned(), "sw".to_owned())];
        let start = out.start(&StartInfo {
            stream_sid: "MZ1",
            account_sid: "ws-1",
            call_sid: "call-1",
            tracks: &["inbound"],
            custom_parameters: &params,
            format: crate::voice::MediaFormat::Mulaw,
        });
        let v: Value = serde_json::from_str(&start).unwrap();
        assert_eq!(v["sequenceNumber"], "1");
        assert_eq!(v["start"]["callSid"], "call-1");
        assert_eq!(v["start"]["customParameters"]["lang"], "sw");
        assert_eq!(v["start"]["mediaFormat"]["encoding"], "audio/x-mulaw");
        assert_eq!(v["streamSid"], "MZ1");
        let v: Value = serde_json::from_str(&out.media("inbound", 1, 20, &[0xff; 160])).unwrap();
        assert_eq!(v["sequenceNumber"], "2");
        assert_eq!(v["media"]["chunk"], "1");
        assert_eq!(v["media"]["timestamp"], "20");
        assert_eq!(
            STANDARD
                .decode(v["media"]["payload"].as_str().unwrap())
                .unwrap(),
            vec![0xff; 160]
        );
        // Written by hand: the same text as `json!` gives.
        let text = Outgoing::new("MZ\"q").media("outbound", 7, 140, &[1, 2, 3, 250]);
        let expected = json!({
            "event": "media",
            "sequenceNumber": "1",
            "media": {
                "track": "outbound",
                "chunk": "7",
                "timestamp": "140",
                "payload": STANDARD.encode([1u8, 2, 3, 250]),
            },
            "streamSid": "MZ\"q",
        })
        .to_string();
        assert_eq!(text, expected);
        let v: Value = serde_json::from_str(&out.mark("m", true)).unwrap();
        assert_eq!(v["mark"]["name"], "m");
        assert_eq!(v["mark"]["cleared"], true);
        let v: Value = serde_json::from_str(&out.dtmf('5')).unwrap();
        assert_eq!(v["dtmf"]["digit"], "5");
        let v: Value = serde_json::from_str(&out.stop("ws-1", "call-1")).unwrap();
        assert_eq!(v["event"], "stop");
        assert_eq!(v["sequenceNumber"], "5");
    }

    #[test]
    fn server_messages() {
        let payload = STANDARD.encode([1u8, 2, 3]);
        assert_eq!(
            parse(&format!(
                r#"{{"event":"media","streamSid":"MZ1","media":{{"payload":"{payload}"}}}}"#
            )),
            Ok(Incoming::Media(vec![1, 2, 3]))
        );
        assert_eq!(
            parse(r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"x"}}"#),
            Ok(Incoming::Mark("x".into()))
        );
        assert_eq!(parse(r#"{"event":"clear"}"#), Ok(Incoming::Clear));
        assert_eq!(
            parse(r#"{"event":"later"}"#),
            Ok(Incoming::Other("later".into()))
        );
        assert_eq!(parse("not json"), Err(BadMessage::NotJson));
        assert_eq!(parse("[1]"), Err(BadMessage::NotJson));
        assert_eq!(parse(r#"{"media":{}}"#), Err(BadMessage::NoEvent));
        assert_eq!(
            parse(r#"{"event":"media","media":{"payload":"***"}}"#),
            Err(BadMessage::BadPayload)
        );
    }
}
