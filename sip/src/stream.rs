//! Framing SIP messages on a byte stream (TCP), RFC 3261 §18.3.
//!
//! On a stream the end of a message is known only from Content-Length, so it is mandatory here.
//! Any framing error leaves the stream position unknown: the connection must be closed.

use crate::message::{MAX_MESSAGE_SIZE, expand_compact, find, parse_decimal};
use thiserror::Error;

/// Largest header block we buffer while looking for the blank line.
pub const MAX_HEADER_SIZE: usize = 16 * 1024;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FramingError {
    #[error("headers exceed {MAX_HEADER_SIZE} bytes")]
    HeadersTooLarge,
    #[error("message exceeds {MAX_MESSAGE_SIZE} bytes")]
    BodyTooLarge,
    #[error("missing Content-Length on a stream transport")]
    MissingContentLength,
    #[error("invalid Content-Length")]
    BadContentLength,
}

impl FramingError {
    /// The status and reason phrase of the answer to a request that failed this way, when one
    /// can be sent (the headers were read).
    pub fn status(&self) -> Option<(u16, &'static str)> {
        match self {
            FramingError::HeadersTooLarge => None,
            FramingError::BodyTooLarge => Some((513, "Message Too Large")),
            FramingError::MissingContentLength => Some((400, "Missing Content-Length")),
            FramingError::BadContentLength => Some((400, "Bad Content-Length")),
        }
    }
}

#[derive(Debug, Default)]
pub struct StreamFramer {
    buf: Vec<u8>,
    /// How far the search for the end of headers has already looked, so that a message arriving
    /// in many small segments is not rescanned from the start each time.
    scanned: usize,
    failed: bool,
}

impl StreamFramer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Append bytes read from the connection. Ignored once the framer has failed.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.failed {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes buffered and not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether a framing error occurred (the connection should be closed).
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// The next whole message, `None` when more bytes are needed. After an `Err` the framer stays
    /// failed and returns `None` forever: close the connection.
    pub fn next_message(&mut self) -> Option<Result<Vec<u8>, FramingError>> {
        if self.failed {
            return None;
        }
        // RFC 5626 keep-alives: CRLFCRLF pings and CRLF pongs between messages.
        let skip = self
            .buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        if skip > 0 {
            self.buf.drain(..skip);
            self.scanned = 0;
        }
        if self.buf.is_empty() {
            return None;
        }
        let from = self.scanned.saturating_sub(3);
        let window = self.buf.get(from..).unwrap_or_default();
        let head_end = match find(window, b"\r\n\r\n") {
            Some(i) => from + i,
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() > MAX_HEADER_SIZE {
                    return Some(self.fail(FramingError::HeadersTooLarge, 0));
                }
                return None;
            }
        };
        if head_end > MAX_HEADER_SIZE {
            return Some(self.fail(FramingError::HeadersTooLarge, 0));
        }
        let head = self.buf.get(..head_end).unwrap_or_default();
        let body_len = match content_length(head) {
            Ok(n) => n,
            Err(e) => return Some(self.fail(e, head_end + 4)),
        };
        let total = head_end + 4 + body_len;
        if total > MAX_MESSAGE_SIZE {
            return Some(self.fail(FramingError::BodyTooLarge, head_end + 4));
        }
        if self.buf.len() < total {
            self.scanned = head_end;
            return None;
        }
        let msg: Vec<u8> = self.buf.drain(..total).collect();
        self.scanned = 0;
        Some(Ok(msg))
    }

    /// Fail, keeping the first `head` bytes: the headers of the message that failed, to
    /// answer it from.
    fn fail(&mut self, e: FramingError, head: usize) -> Result<Vec<u8>, FramingError> {
        self.failed = true;
        self.buf.truncate(head);
        self.buf.shrink_to_fit();
        Err(e)
    }

    /// After a failure: the headers of the message that failed (empty if they were not read).
    pub fn failed_head(&self) -> &[u8] {
        if self.failed { &self.buf } else { &[] }
    }
}

fn content_length(head: &[u8]) -> Result<usize, FramingError> {
    let mut found: Option<usize> = None;
    for line in head.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line.get(..colon).unwrap_or_default();
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        if !expand_compact(name.trim_end()).eq_ignore_ascii_case("Content-Length") {
            continue;
        }
        let value = line.get(colon + 1..).unwrap_or_default();
        let value = std::str::from_utf8(value).map_err(|_| FramingError::BadContentLength)?;
        let n = parse_decimal(value).ok_or(FramingError::BadContentLength)?;
        if found.is_some_and(|prev| prev != n) {
            return Err(FramingError::BadContentLength);
        }
        found = Some(n);
    }
    found.ok_or(FramingError::MissingContentLength)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"OPTIONS sip:a@b SIP/2.0\r\nl: 5\r\n\r\nhello";

    #[test]
    fn frames_split_and_batched_messages() {
        let mut f = StreamFramer::new();
        let mut all = b"\r\n\r\n".to_vec();
        all.extend_from_slice(MSG);
        all.extend_from_slice(b"\r\n");
        all.extend_from_slice(MSG);
        for chunk in all.chunks(3) {
            f.push(chunk);
        }
        assert_eq!(f.next_message(), Some(Ok(MSG.to_vec())));
        assert_eq!(f.next_message(), Some(Ok(MSG.to_vec())));
        assert_eq!(f.next_message(), None);

        let mut f = StreamFramer::new();
        let (a, b) = MSG.split_at(20);
        f.push(a);
        assert_eq!(f.next_message(), None);
        f.push(b);
        assert_eq!(f.next_message(), Some(Ok(MSG.to_vec())));
    }

    #[test]
    fn errors_are_terminal() {
        let mut f = StreamFramer::new();
        f.push(b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\r\n\r\n");
        assert_eq!(
            f.next_message(),
            Some(Err(FramingError::MissingContentLength))
        );
        f.push(MSG);
        assert_eq!(f.next_message(), None);

        let mut f = StreamFramer::new();
        f.push(b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 99999999999999999999\r\n\r\n");
        assert_eq!(f.next_message(), Some(Err(FramingError::BadContentLength)));

        let mut f = StreamFramer::new();
        f.push(b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 70000\r\n\r\n");
        assert_eq!(f.next_message(), Some(Err(FramingError::BodyTooLarge)));

        let mut f = StreamFramer::new();
        f.push(&vec![b'a'; MAX_HEADER_SIZE + 10]);
        assert_eq!(f.next_message(), Some(Err(FramingError::HeadersTooLarge)));
    }
}
