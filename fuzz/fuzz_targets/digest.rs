//! Header values into the digest code: as an `Authorization` (the registrar's side: parse, then
//! verify against a password, then the nonce checks) and as a `WWW-Authenticate` challenge (the
//! trunk client's side: answer it, and our answer must parse and verify).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sautikit_sip::auth::{self, NonceCounts, NonceKey};
use sautikit_sip::digest;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(creds) = auth::parse_authorization(value) {
        let ha1 = digest::ha1(creds.algorithm, &creds.username, &creds.realm, "secret");
        let _ = auth::verify(&creds, "REGISTER", &ha1);
        let key = NonceKey::new([7; 32]);
        let _ = key.check(&creds.nonce, 1_800_000_000);
        if let Some(nc) = creds.nc {
            let mut counts = NonceCounts::with_max_tracked(4);
            let first = counts.accept(&creds.nonce, 1_800_000_000, nc, 1_800_000_010);
            // The same nonce count twice is a replay.
            assert!(!(first && counts.accept(&creds.nonce, 1_800_000_000, nc, 1_800_000_010)));
        }
    }

    let uri = "sip:carrier.example.com";
    if let Ok(answer) = auth::answer_challenge(value, "INVITE", uri, "alice", "secret", "0a4f113b")
        // A challenge near the length limit gives an answer over it, which a server refuses.
        && answer.len() <= auth::MAX_AUTHORIZATION_LEN
    {
        let creds = auth::parse_authorization(&answer)
            .unwrap_or_else(|e| panic!("our answer {answer:?} does not parse: {e}"));
        let ha1 = digest::ha1(creds.algorithm, "alice", &creds.realm, "secret");
        assert!(
            auth::verify(&creds, "INVITE", &ha1),
            "our answer does not verify: {answer:?}"
        );
    }
});
