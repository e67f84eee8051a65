//! HTTP digest primitives as SIP uses them (RFC 2617, RFC 7616, RFC 8760).
//!
//! A registrar cannot verify a digest response from an Argon2 hash, so at credential creation we
//! keep `HA1 = H(username ":" realm ":" password)` for each algorithm we offer. HA1 of a random
//! 128-bit password reveals nothing usable about the password, but it is a credential in itself:
//! store it like one.

use md5::Md5;
use sha2::{Digest, Sha256};

/// The digest algorithms a Sautikit registrar offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    pub const ALL: [Algorithm; 2] = [Algorithm::Md5, Algorithm::Sha256];

    /// The token used in `WWW-Authenticate: Digest algorithm=...`.
    pub fn token(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    /// `MD5` or `SHA-256` (case-insensitive), as in an `algorithm=` parameter or a setting.
    pub fn from_token(token: &str) -> Option<Algorithm> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.token().eq_ignore_ascii_case(token.trim()))
    }

    fn hash_hex(self, parts: &[&[u8]]) -> String {
        match self {
            Algorithm::Md5 => {
                let mut h = Md5::new();
                for p in parts {
                    h.update(p);
                }
                hex::encode(h.finalize())
            }
            Algorithm::Sha256 => {
                let mut h = Sha256::new();
                for p in parts {
                    h.update(p);
                }
                hex::encode(h.finalize())
            }
        }
    }
}

/// `HA1 = H(username:realm:password)`, lowercase hex.
pub fn ha1(algorithm: Algorithm, username: &str, realm: &str, password: &str) -> String {
    algorithm.hash_hex(&[
        username.as_bytes(),
        b":",
        realm.as_bytes(),
        b":",
        password.as_bytes(),
    ])
}

/// The expected `response=` for a request, from a stored HA1 (qop=auth or no qop).
///
/// `uri` must be the raw text of the `uri=` parameter as the client sent it: re-printing a parsed
/// URI can change its bytes and therefore the hash.
pub struct ResponseInput<'a> {
    pub algorithm: Algorithm,
    pub ha1: &'a str,
    pub method: &'a str,
    pub uri: &'a str,
    pub nonce: &'a str,
    /// `Some((nc, cnonce))` for `qop=auth`; `None` for the RFC 2069 form.
    pub qop_auth: Option<(&'a str, &'a str)>,
}

pub fn expected_response(input: &ResponseInput<'_>) -> String {
    let alg = input.algorithm;
    let ha2 = alg.hash_hex(&[input.method.as_bytes(), b":", input.uri.as_bytes()]);
    match input.qop_auth {
        Some((nc, cnonce)) => alg.hash_hex(&[
            input.ha1.as_bytes(),
            b":",
            input.nonce.as_bytes(),
            b":",
            nc.as_bytes(),
            b":",
            cnonce.as_bytes(),
            b":auth:",
            ha2.as_bytes(),
        ]),
        None => alg.hash_hex(&[
            input.ha1.as_bytes(),
            b":",
            input.nonce.as_bytes(),
            b":",
            ha2.as_bytes(),
        ]),
    }
}

/// Constant-time comparison of two hex digests.
pub fn digests_equal(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| {
        acc | (x.to_ascii_lowercase() ^ y.to_ascii_lowercase())
    }) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 2617 §3.5: Mufasa / testrealm@host.com / "Circle Of Life".
    #[test]
    fn rfc2617_md5_example() {
        let ha1 = ha1(
            Algorithm::Md5,
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
        );
        let resp = expected_response(&ResponseInput {
            algorithm: Algorithm::Md5,
            ha1: &ha1,
            method: "GET",
            uri: "/dir/index.html",
            nonce: "dcd98b7102dd2f0e8b11d0f600bfb0c093",
            qop_auth: Some(("00000001", "0a4f113b")),
        });
        assert_eq!(resp, "6629fae49393a05397450978507c4ef1");
    }

    // RFC 7616 §3.9.1: Mufasa / http-auth@example.org / "Circle of Life", SHA-256.
    #[test]
    fn rfc7616_sha256_example() {
        let ha1 = ha1(
            Algorithm::Sha256,
            "Mufasa",
            "http-auth@example.org",
            "Circle of Life",
        );
        let resp = expected_response(&ResponseInput {
            algorithm: Algorithm::Sha256,
            ha1: &ha1,
            method: "GET",
            uri: "/dir/index.html",
            nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
            qop_auth: Some(("00000001", "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ")),
        });
        assert_eq!(
            resp,
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"
        );
    }

    #[test]
    fn digest_compare_is_case_insensitive_and_length_checked() {
        assert!(digests_equal("ABCdef", "abcDEF"));
        assert!(!digests_equal("abc", "abcd"));
        assert!(!digests_equal("abc", "abd"));
    }
}
