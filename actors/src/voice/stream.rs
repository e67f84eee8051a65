//! `stream`: the call's live audio over a WebSocket, in Twilio's Media Streams protocol, for AI
//! voice agents; and `stopStream`, which ends the forked streams of the call.
//!
//! `bidirectional: true` holds the call: what the server sends is played to the caller, and the
//! script goes on when the socket closes (Twilio's `<Connect><Stream>`). Otherwise the stream is
//! a fork: the script goes on at once, and the stream lasts until the call ends or `stopStream`
//! (Twilio's `<Start><Stream>`).

use serde_json::Value;

use super::ScriptError;
use super::attrs::{Attrs, kind, quoted};

/// Most bytes of `customParameters` (names and values together).
pub const MAX_CUSTOM_PARAMETERS_BYTES: usize = 2048;

/// Which audio a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamTrack {
    /// What the caller says.
    Inbound,
    /// What the caller hears.
    Outbound,
    Both,
}

impl StreamTrack {
    /// Twilio's names in `start.tracks`.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            StreamTrack::Inbound => &["inbound"],
            StreamTrack::Outbound => &["outbound"],
            StreamTrack::Both => &["inbound", "outbound"],
        }
    }

    pub fn inbound(self) -> bool {
        self != StreamTrack::Outbound
    }

    pub fn outbound(self) -> bool {
        self != StreamTrack::Inbound
    }
}

/// How audio is carried in `media` payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaFormat {
    /// `audio/x-mulaw`, 8 kHz (Twilio's, the default).
    Mulaw,
    /// `audio/l16;rate=16000`: 16-bit linear PCM at 16 kHz, network byte order (big-endian, as
    /// RFC 3551 defines L16), for agents that prefer PCM.
    L16,
}

impl MediaFormat {
    /// `start.mediaFormat`'s encoding and sample rate.
    pub fn encoding(self) -> (&'static str, u32) {
        match self {
            MediaFormat::Mulaw => ("audio/x-mulaw", 8000),
            MediaFormat::L16 => ("audio/l16", 16000),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stream {
    /// `ws://` or `wss://`, absolute.
    pub url: String,
    pub track: StreamTrack,
    pub bidirectional: bool,
    /// Passed to the server in `start.customParameters`, in the order written.
    pub custom_parameters: Vec<(String, String)>,
    pub media_format: MediaFormat,
    /// Where `stream-started`, `stream-stopped` and `stream-error` are POSTed; absolute http(s)
    /// or relative to the document's URL.
    pub status_callback: Option<String>,
}

pub(super) fn parse(path: String, value: &Value) -> Result<Stream, ScriptError> {
    let a = Attrs::new(
        path,
        value,
        &[
            "url",
            "track",
            "bidirectional",
            "customParameters",
            "statusCallback",
            "mediaFormat",
        ],
        false,
    )?;
    let url = a.required_string("url")?;
    let parsed = url::Url::parse(url).map_err(|_| {
        a.err(
            "url",
            format!(
                "must be an absolute ws:// or wss:// URL, not {}",
                quoted(url)
            ),
        )
    })?;
    if !matches!(parsed.scheme(), "ws" | "wss") || parsed.host_str().is_none_or(str::is_empty) {
        return Err(a.err(
            "url",
            format!(
                "must be an absolute ws:// or wss:// URL, not {}",
                quoted(url)
            ),
        ));
    }
    let track = match a.string("track")? {
        None | Some("inbound") | Some("inbound_track") => StreamTrack::Inbound,
        Some("outbound") | Some("outbound_track") => StreamTrack::Outbound,
        Some("both") | Some("both_tracks") => StreamTrack::Both,
        Some(other) => {
            return Err(a.err(
                "track",
                format!(
                    "must be \"inbound\", \"outbound\" or \"both\", not {}",
                    quoted(other)
                ),
            ));
        }
    };
    let bidirectional = a.boolean("bidirectional", false)?;
    if bidirectional && track != StreamTrack::Inbound {
        // As Twilio's `<Connect><Stream>`: the caller's audio goes out, the server's comes back.
        return Err(a.err(
            "track",
            "a bidirectional stream carries the inbound track only",
        ));
    }
    let mut custom_parameters = Vec::new();
    match a.get("customParameters") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            let mut bytes = 0;
            for (k, v) in map {
                let Value::String(s) = v else {
                    return Err(a.err(
                        "customParameters",
                        format!("values must be strings; {} is {}", quoted(k), kind(v)),
                    ));
                };
                bytes += k.len() + s.len();
                custom_parameters.push((k.clone(), s.clone()));
            }
            if bytes > MAX_CUSTOM_PARAMETERS_BYTES {
                return Err(a.err(
                    "customParameters",
                    format!("at most {MAX_CUSTOM_PARAMETERS_BYTES} bytes of names and values"),
                ));
            }
        }
        Some(other) => {
            return Err(a.err(
                "customParameters",
                format!("must be an object of strings, not {}", kind(other)),
            ));
        }
    }
    let media_format = match a.string("mediaFormat")? {
        None | Some("audio/x-mulaw") => MediaFormat::Mulaw,
        Some("audio/l16;rate=16000") => MediaFormat::L16,
        Some(other) => {
            return Err(a.err(
                "mediaFormat",
                format!(
                    "must be \"audio/x-mulaw\" or \"audio/l16;rate=16000\", not {}",
                    quoted(other)
                ),
            ));
        }
    };
    Ok(Stream {
        url: url.to_owned(),
        track,
        bidirectional,
        custom_parameters,
        media_format,
        status_callback: a.url("statusCallback")?,
    })
}

/// `stopStream` takes no attributes.
pub(super) fn parse_stop(path: String, value: &Value) -> Result<(), ScriptError> {
    Attrs::new(path, value, &[], true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Action;
    use super::super::test_support::{err, one};
    use super::*;

    fn stream(attrs: &str) -> Stream {
        match one(&format!(r#"{{"stream": {attrs}}}"#)) {
            Ok(Action::Stream(s)) => s,
            other => panic!("expected stream, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_attributes() {
        let s = stream(r#"{"url": "wss://agent.example.com/media"}"#);
        assert_eq!(s.track, StreamTrack::Inbound);
        assert!(!s.bidirectional);
        assert!(s.custom_parameters.is_empty());
        let s = stream(
            r#"{"url": "ws://127.0.0.1:9000/a", "track": "both", "customParameters": {"lang": "sw", "agent": "reception"}, "statusCallback": "/stream-status"}"#,
        );
        assert_eq!(s.track, StreamTrack::Both);
        assert_eq!(
            s.custom_parameters,
            [
                ("lang".to_owned(), "sw".to_owned()),
                ("agent".to_owned(), "reception".to_owned())
            ]
        );
        assert_eq!(s.status_callback.as_deref(), Some("/stream-status"));
        assert!(stream(r#"{"url": "wss://a.example/x", "bidirectional": true}"#).bidirectional);
        assert_eq!(one(r#"{"stopStream": {}}"#), Ok(Action::StopStream));
    }

    #[test]
    fn bad_attributes_name_their_path() {
        assert_eq!(
            err(r#"{"stream": {"url": "https://a.example/x"}}"#),
            "actions[0].stream.url: must be an absolute ws:// or wss:// URL, not \"https://a.example/x\""
        );
        assert_eq!(err(r#"{"stream": {}}"#), "actions[0].stream.url: required");
        assert_eq!(
            err(r#"{"stream": {"url": "wss://a.example/x", "track": "left"}}"#),
            "actions[0].stream.track: must be \"inbound\", \"outbound\" or \"both\", not \"left\""
        );
        assert_eq!(
            err(r#"{"stream": {"url": "wss://a.example/x", "customParameters": {"n": 1}}}"#),
            "actions[0].stream.customParameters: values must be strings; \"n\" is a number"
        );
        let big = "x".repeat(2100);
        assert_eq!(
            err(&format!(
                r#"{{"stream": {{"url": "wss://a.example/x", "customParameters": {{"k": "{big}"}}}}}}"#
            )),
            "actions[0].stream.customParameters: at most 2048 bytes of names and values"
        );
        assert_eq!(
            err(
                r#"{"stream": {"url": "wss://a.example/x", "bidirectional": true, "track": "both"}}"#
            ),
            "actions[0].stream.track: a bidirectional stream carries the inbound track only"
        );
    }
}
