//! Real softphones as devices: Debian's baresip 1.0.0 registering with the registrar over UDP and
//! TCP, driven headless through tests/common/baresip.rs.
//!
//! This baresip (libre 1.1) answers MD5 digest challenges only, and refuses a whole 401 that holds
//! any SHA-256 challenge. The server therefore runs with `SAUTIKIT_SIP_DIGEST_ALGORITHMS=MD5`
//! here, except in the test that shows why that setting exists.
//!
//! baresip is needed: with `SAUTIKIT_REQUIRE_BARESIP=1` (scripts/test.sh) a missing baresip fails
//! the tests; without it they print a note and return.

mod common;

use common::baresip::{self, Baresip, BaresipConfig};
use common::{Api, Backend, Mode, Server, TestDb};
use serde_json::{Value, json};

const INVENTORY_ID: &str = "01900000-0000-7000-8000-000000000001";
const MD5_ONLY: &[(&str, &str)] = &[("SAUTIKIT_SIP_DIGEST_ALGORITHMS", "MD5")];

struct Ctx {
    // Fields drop in order: the server stops before its database goes.
    server: Server,
    api: Api,
    number_id: String,
    /// Where the phones' `sndfile` recordings would go (no calls here).
    scratch: tempfile::TempDir,
    _db: TestDb,
}

async fn setup(backend: Backend, env: &[(&str, &str)]) -> Ctx {
    let db = TestDb::new(backend).await;
    let server = Server::start_with(&db, Mode::Dev, env);
    let (_, key) = db.workspace("devices", 100_000);
    let api = server.api(&key);
    let claimed = api
        .post(&format!("/v1/numbers/{INVENTORY_ID}/claim"), None)
        .await;
    assert_eq!(claimed.status, 201, "{}", claimed.text);
    let number_id = claimed.json()["id"].as_str().unwrap().to_owned();
    Ctx {
        server,
        api,
        number_id,
        scratch: tempfile::tempdir().expect("temp dir"),
        _db: db,
    }
}

impl Ctx {
    /// A new credential: (id, username, password).
    async fn credential(&self, label: &str) -> (String, String, String) {
        let r = self
            .api
            .post(
                &format!("/v1/numbers/{}/sip-credentials", self.number_id),
                Some(json!({"label": label})),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        let v = r.json();
        (
            v["id"].as_str().unwrap().to_owned(),
            v["username"].as_str().unwrap().to_owned(),
            v["password"].as_str().unwrap().to_owned(),
        )
    }

    async fn registrations(&self) -> Vec<Value> {
        let r = self
            .api
            .get(&format!("/v1/numbers/{}/registrations", self.number_id))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.json().as_array().cloned().expect("a list")
    }

    /// A baresip that starts registering with the server at once, AOR `sip:{user}@127.0.0.1`.
    async fn phone(&self, transport: &'static str, user: &str, password: &str) -> Baresip {
        Baresip::start(BaresipConfig {
            registrar: self.server.sip_addr(),
            transport,
            username: user.to_owned(),
            password: password.to_owned(),
            domain: "127.0.0.1".to_owned(),
            source_wav: None,
            record_dir: self
                .scratch
                .path()
                .join(format!("rec-{}", uuid::Uuid::now_v7().simple())),
            auto_answer: true,
        })
        .await
        .expect("start baresip")
    }
}

async fn baresip_registers_with_md5_and_is_listed(backend: Backend) {
    if !baresip::present_or_required("baresip_registers_with_md5_and_is_listed") {
        return;
    }
    let ctx = setup(backend, MD5_ONLY).await;
    let (cred_id, user, password) = ctx.credential("softphone").await;

    // Over UDP: baresip sends from the address it listens on.
    let udp = ctx.phone("udp", &user, &password).await;
    udp.wait_registered()
        .await
        .expect("baresip registers over UDP");
    let regs = ctx.registrations().await;
    assert_eq!(regs.len(), 1, "{regs:#?}");
    let r = &regs[0];
    assert_eq!(r["transport"], "udp", "{r:#}");
    assert_eq!(r["source"], udp.sip_addr().to_string(), "{r:#}");
    // baresip's Contact user is `USER-0x<pointer>`, at the address it listens on.
    let contact = r["contact"].as_str().unwrap_or_default();
    assert!(
        contact.starts_with(&format!("sip:{user}-"))
            && contact.ends_with(&format!("@{}", udp.sip_addr())),
        "{r:#}"
    );
    assert!(
        r["user_agent"]
            .as_str()
            .is_some_and(|ua| ua.contains("baresip")),
        "{r:#}"
    );
    assert_eq!(r["credential_id"], cred_id.as_str(), "{r:#}");
    assert_eq!(r["credential_label"], "softphone", "{r:#}");
    assert_eq!(r["number_id"], ctx.number_id.as_str(), "{r:#}");

    // A second phone over TCP, same credential: two bindings, one of each.
    let tcp = ctx.phone("tcp", &user, &password).await;
    tcp.wait_registered()
        .await
        .expect("baresip registers over TCP");
    let regs = ctx.registrations().await;
    assert_eq!(regs.len(), 2, "{regs:#?}");
    let by = |t: &str| {
        let of: Vec<&Value> = regs.iter().filter(|r| r["transport"] == t).collect();
        assert_eq!(of.len(), 1, "one {t} binding: {regs:#?}");
        of[0].clone()
    };
    let (u, t) = (by("udp"), by("tcp"));
    assert_eq!(u["source"], udp.sip_addr().to_string(), "{u:#}");
    // baresip opens the TCP connection from an ephemeral port, not the one it listens on (which
    // its Contact names): the source is that connection's far end.
    let tcp_source: std::net::SocketAddr = t["source"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a socket address: {t:#}"));
    assert_eq!(tcp_source.ip(), tcp.sip_addr().ip(), "{t:#}");
    assert_ne!(tcp_source, udp.sip_addr(), "{t:#}");
    assert!(
        t["contact"]
            .as_str()
            .is_some_and(|c| c.ends_with(&format!("@{};transport=tcp", tcp.sip_addr()))),
        "{t:#}"
    );
    for r in [&u, &t] {
        assert!(
            r["user_agent"]
                .as_str()
                .is_some_and(|ua| ua.contains("baresip")),
            "{r:#}"
        );
        assert_eq!(r["credential_label"], "softphone", "{r:#}");
    }

    // Rotating the credential ends both registrations at once.
    let rotated = ctx
        .api
        .post(
            &format!(
                "/v1/numbers/{}/sip-credentials/{cred_id}/rotate",
                ctx.number_id
            ),
            None,
        )
        .await;
    assert_eq!(rotated.status, 200, "{}", rotated.text);
    let regs = ctx.registrations().await;
    assert!(regs.is_empty(), "rotation leaves no binding: {regs:#?}");
}
on_both_backends!(baresip_registers_with_md5_and_is_listed);

/// Why `SAUTIKIT_SIP_DIGEST_ALGORITHMS` exists: with the default challenges (SHA-256, then MD5)
/// this baresip gives up on the whole 401, though an MD5 challenge is in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baresip_with_default_challenges_fails_clearly() {
    if !baresip::present_or_required("baresip_with_default_challenges_fails_clearly") {
        return;
    }
    let ctx = setup(Backend::Sqlite, &[]).await;
    let (_, user, password) = ctx.credential("softphone").await;
    let phone = ctx.phone("udp", &user, &password).await;
    let why = phone
        .wait_register_failed()
        .await
        .expect("baresip 1.0 cannot answer a 401 that offers SHA-256");
    // libre 1.1 fails the 401 with ENOSYS before it looks for the MD5 challenge.
    assert!(
        why.contains("Function not implemented"),
        "REGISTER_FAIL {why:?}\n{}",
        phone.log_tail(60)
    );
    let regs = ctx.registrations().await;
    assert!(regs.is_empty(), "{regs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_from_baresip_is_refused() {
    if !baresip::present_or_required("wrong_password_from_baresip_is_refused") {
        return;
    }
    let ctx = setup(Backend::Sqlite, MD5_ONLY).await;
    let (_, user, _) = ctx.credential("softphone").await;
    let phone = ctx.phone("udp", &user, "not-the-password").await;
    let why = phone
        .wait_register_failed()
        .await
        .expect("a wrong password is refused");
    assert!(
        why.contains("403"),
        "REGISTER_FAIL {why:?}\n{}",
        phone.log_tail(60)
    );
    let regs = ctx.registrations().await;
    assert!(regs.is_empty(), "{regs:#?}");
}
