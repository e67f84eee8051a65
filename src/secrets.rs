//! Secrets we mint: API keys, webhook signing secrets, SIP usernames and passwords, and how each
//! is kept at rest.

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sautikit_sip::digest::{Algorithm, ha1};
use sha2::{Digest, Sha256};
use thiserror::Error;

const API_KEY_PREFIX: &str = "sk_";
const API_KEY_BYTES: usize = 32;

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // The OS RNG only fails on a broken system, where minting secrets must not go on.
    getrandom::fill(&mut buf).expect("the operating system's random number generator failed");
    buf
}

/// `sk_` + 32 random bytes, base64url: 256 bits, so a fast hash is a safe way to store it.
pub fn new_api_key() -> String {
    format!(
        "{API_KEY_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(random_bytes::<API_KEY_BYTES>())
    )
}

/// Whether `key` has the shape of one of our keys (checked before any database look-up).
pub fn is_well_formed_api_key(key: &str) -> bool {
    key.strip_prefix(API_KEY_PREFIX).is_some_and(|rest| {
        rest.len() == 43
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// SHA-256 of the key, hex: what the database keeps.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// `whsec_` + 32 random bytes, base64url. Kept in clear: we need it to sign.
pub fn new_webhook_secret() -> String {
    format!("whsec_{}", URL_SAFE_NO_PAD.encode(random_bytes::<32>()))
}

/// `ts_` + 8 hex digits (DESIGN §8).
pub fn new_sip_username() -> String {
    format!("ts_{}", hex::encode(random_bytes::<4>()))
}

/// 144 random bits, base64url (24 characters).
pub fn new_sip_password() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<18>())
}

/// Random lowercase hex for request ids and the like.
pub fn random_hex(bytes: usize) -> String {
    let raw = random_bytes::<16>();
    hex::encode(&raw[..bytes.min(16)])
}

/// What we keep of a SIP password: an Argon2id PHC string, plus the digest HA1 values a registrar
/// needs (HA1 cannot be derived from Argon2).
#[derive(Debug, Clone)]
pub struct StoredSipSecret {
    pub password_hash: String,
    pub ha1_md5: String,
    pub ha1_sha256: String,
}

#[derive(Debug, Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

/// CPU-heavy (Argon2id, ~19 MiB): call it from a blocking thread.
pub fn hash_sip_password(
    username: &str,
    realm: &str,
    password: &str,
) -> Result<StoredSipSecret, HashError> {
    let phc = Argon2::default()
        .hash_password(password.as_bytes())
        .map_err(|e| HashError(e.to_string()))?;
    Ok(StoredSipSecret {
        password_hash: phc.to_string(),
        ha1_md5: ha1(Algorithm::Md5, username, realm, password),
        ha1_sha256: ha1(Algorithm::Sha256, username, realm, password),
    })
}

/// CPU-heavy: call it from a blocking thread.
pub fn verify_password(password: &str, phc: &str) -> bool {
    Argon2::default()
        .verify_password(password.as_bytes(), phc)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_have_the_documented_shape() {
        let k = new_api_key();
        assert!(k.starts_with("sk_"));
        assert!(is_well_formed_api_key(&k), "{k}");
        assert!(!is_well_formed_api_key("sk_short"));
        assert!(!is_well_formed_api_key(&k.replace("sk_", "pk_")));
        assert_ne!(new_api_key(), k);
        assert_eq!(hash_api_key(&k).len(), 64);
    }

    #[test]
    fn sip_usernames_and_passwords() {
        let u = new_sip_username();
        assert_eq!(u.len(), 11);
        assert!(u[3..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(new_sip_password().len() * 6 >= 128);
    }

    #[test]
    fn sip_password_hashes_verify_only_the_right_password() {
        let s = hash_sip_password("ts_00000001", "ws", "right").unwrap();
        assert!(s.password_hash.starts_with("$argon2id$"));
        assert!(verify_password("right", &s.password_hash));
        assert!(!verify_password("wrong", &s.password_hash));
        assert_eq!(s.ha1_md5, ha1(Algorithm::Md5, "ts_00000001", "ws", "right"));
    }
}
