//! The registrar end to end: a real server, REGISTERs over UDP and TCP sockets with digest
//! answers computed in the test, and the registrations API (DESIGN §8).

mod common;

use std::time::Duration;

use common::device::{Device, challenges};
use common::uac::{header, headers, status_code};
use common::{Api, Backend, Mode, Server, TestDb, wait_for_json};
use sautikit_sip::digest::{Algorithm, ha1};
use serde_json::Value;

struct Ctx {
    db: TestDb,
    server: Server,
    api: Api,
    key: String,
    workspace_id: String,
    number_id: String,
}

async fn setup(backend: Backend, env: &[(&str, &str)]) -> Ctx {
    let db = TestDb::new(backend).await;
    let server = Server::start_with(&db, Mode::Dev, env);
    let (workspace_id, key) = db.workspace("devices", 100_000);
    let api = server.api(&key);
    let number_id = common::device::claim(&api, common::device::FIRST_INVENTORY_ID).await;
    Ctx {
        db,
        server,
        api,
        key,
        workspace_id,
        number_id,
    }
}

impl Ctx {
    /// A new credential: (id, username, password).
    async fn credential(&self, label: &str) -> (String, String, String) {
        common::device::new_credential(&self.api, &self.number_id, label).await
    }

    async fn registrations(&self) -> Vec<Value> {
        common::device::registrations(&self.api, &self.number_id).await
    }

    async fn wait_registrations(&self, n: usize) -> Vec<Value> {
        let v = wait_for_json(
            &self.api,
            &format!("/v1/numbers/{}/registrations", self.number_id),
            Duration::from_secs(15),
            |v| v.as_array().is_some_and(|a| a.len() == n),
        )
        .await;
        v.as_array().cloned().unwrap_or_default()
    }

    /// Rows in the table, expired or not (the API hides expired ones at once).
    async fn stored_bindings(&self) -> i64 {
        let db = sautikit::db::Db::connect(&self.db.url).await.expect("db");
        let row = sqlx::query("SELECT COUNT(*) AS n FROM sip_registrations")
            .fetch_one(&db.read)
            .await
            .expect("count");
        sqlx::Row::try_get::<i64, _>(&row, "n").expect("n")
    }
}

fn contact_expires(resp: &str) -> Vec<(String, u32)> {
    headers(resp, "Contact")
        .into_iter()
        .filter_map(|c| {
            let uri = c.split('<').nth(1)?.split('>').next()?.to_owned();
            let exp = c.split("expires=").nth(1)?.trim().parse().ok()?;
            Some((uri, exp))
        })
        .collect()
}

async fn registers_refreshes_and_removes(backend: Backend) {
    let ctx = setup(backend, &[]).await;
    let (cred_id, user, password) = ctx.credential("main-agent").await;
    let sip = ctx.server.sip_addr();

    // The first REGISTER is challenged: SHA-256 first, then MD5, realm = the workspace id.
    let mut desk = Device::udp(sip, &user, &password).await;
    let contact = format!("Contact: <{}>\r\n", desk.contact());
    let challenge = desk.register_plain(&contact).await;
    assert_eq!(status_code(&challenge), Some(401), "{challenge}");
    let offered = challenges(&challenge);
    assert_eq!(offered.len(), 2, "{challenge}");
    assert_eq!(offered[0].algorithm, "SHA-256");
    assert_eq!(offered[1].algorithm, "MD5");
    assert!(
        offered
            .iter()
            .all(|c| c.realm == ctx.workspace_id && !c.stale)
    );
    assert!(
        headers(&challenge, "WWW-Authenticate")
            .iter()
            .all(|h| h.contains("qop=\"auth\""))
    );

    // SHA-256 answer: bound for the default hour.
    let ok = desk.register(&contact, "SHA-256").await;
    assert_eq!(status_code(&ok), Some(200), "{ok}");
    let bound = contact_expires(&ok);
    assert_eq!(bound.len(), 1, "{ok}");
    assert_eq!(bound[0].0, desk.contact());
    assert!((3595..=3600).contains(&bound[0].1), "{ok}");

    let regs = ctx.registrations().await;
    assert_eq!(regs.len(), 1, "{regs:?}");
    let r = &regs[0];
    assert_eq!(r["contact"], desk.contact());
    assert_eq!(r["source"], desk.local.to_string());
    assert_eq!(r["transport"], "udp");
    assert_eq!(r["user_agent"], "sautikit-test-device/1");
    assert_eq!(r["credential_id"], cred_id.as_str());
    assert_eq!(r["credential_label"], "main-agent");
    assert_eq!(r["number_id"], ctx.number_id.as_str());
    assert!(r["expires_at"].as_str().is_some_and(|s| s.ends_with('Z')));

    // A refresh with a rising nonce count is accepted; the same count again is a replay.
    let again = desk.register_again(&contact).await;
    assert_eq!(status_code(&again), Some(200), "{again}");
    desk.nc -= 1;
    let replay = desk.register_again(&contact).await;
    assert_eq!(status_code(&replay), Some(401), "{replay}");
    assert!(challenges(&replay).iter().all(|c| c.stale), "{replay}");

    // A second device answers with MD5; the 200 lists both contacts.
    let mut phone = Device::udp(sip, &user, &password).await;
    let phone_contact = format!("Contact: <{}>\r\nExpires: 86400\r\n", phone.contact());
    let ok = phone.register(&phone_contact, "MD5").await;
    assert_eq!(status_code(&ok), Some(200), "{ok}");
    let listed = contact_expires(&ok);
    assert_eq!(listed.len(), 2, "{ok}");
    let mine = listed.iter().find(|(u, _)| *u == phone.contact());
    assert!(
        mine.is_some_and(|(_, e)| *e <= 3600 && *e >= 3595),
        "86400 is clamped to 3600: {ok}"
    );
    assert_eq!(ctx.registrations().await.len(), 2);

    // Below the minimum: 423 with Min-Expires, nothing changes.
    let brief = phone
        .register_again(&format!(
            "Contact: <{}>\r\nExpires: 10\r\n",
            phone.contact()
        ))
        .await;
    assert_eq!(status_code(&brief), Some(423), "{brief}");
    assert_eq!(header(&brief, "Min-Expires"), Some("60"));

    // A query (no Contact) lists the bindings and changes nothing.
    let query = phone.register_again("").await;
    assert_eq!(status_code(&query), Some(200), "{query}");
    assert_eq!(contact_expires(&query).len(), 2);

    // Expires: 0 removes one contact.
    let gone = phone
        .register_again(&format!("Contact: <{}>\r\nExpires: 0\r\n", phone.contact()))
        .await;
    assert_eq!(status_code(&gone), Some(200), "{gone}");
    assert_eq!(contact_expires(&gone).len(), 1, "{gone}");
    assert_eq!(ctx.registrations().await.len(), 1);

    // `*` removes every contact of the number.
    let ok = phone
        .register_again(&format!("Contact: <{}>\r\n", phone.contact()))
        .await;
    assert_eq!(status_code(&ok), Some(200), "{ok}");
    assert_eq!(ctx.registrations().await.len(), 2);
    let all = phone.register_again("Contact: *\r\nExpires: 0\r\n").await;
    assert_eq!(status_code(&all), Some(200), "{all}");
    assert!(headers(&all, "Contact").is_empty(), "{all}");
    assert!(ctx.registrations().await.is_empty());
    assert_eq!(ctx.stored_bindings().await, 0);

    // The API deletes a registration.
    let ok = desk.register_again(&contact).await;
    assert_eq!(status_code(&ok), Some(200), "{ok}");
    let regs = ctx.registrations().await;
    let id = regs[0]["id"].as_str().unwrap();
    let path = format!("/v1/numbers/{}/registrations/{id}", ctx.number_id);
    assert_eq!(ctx.api.delete(&path).await.status, 204);
    ctx.api
        .delete(&path)
        .await
        .assert_error(404, "registrations.not_found");
    assert!(ctx.registrations().await.is_empty());
}
on_both_backends!(registers_refreshes_and_removes);

async fn rotation_revocation_and_release_remove_bindings(backend: Backend) {
    let ctx = setup(backend, &[]).await;
    let (cred_id, user, password) = ctx.credential("desk").await;
    let sip = ctx.server.sip_addr();
    let mut dev = Device::udp(sip, &user, &password).await;
    let contact = format!("Contact: <{}>\r\n", dev.contact());
    assert_eq!(
        status_code(&dev.register(&contact, "SHA-256").await),
        Some(200)
    );
    assert_eq!(ctx.registrations().await.len(), 1);

    // Rotation: the binding goes at once and the old password stops working.
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
    let new_password = rotated.json()["password"].as_str().unwrap().to_owned();
    assert!(ctx.registrations().await.is_empty());
    assert_eq!(ctx.stored_bindings().await, 0);
    let refused = dev.register_again(&contact).await;
    assert_eq!(status_code(&refused), Some(403), "{refused}");
    let fresh = dev.register(&contact, "MD5").await;
    assert_eq!(status_code(&fresh), Some(403), "the old password: {fresh}");
    dev.password = new_password;
    assert_eq!(status_code(&dev.register(&contact, "MD5").await), Some(200));
    assert_eq!(ctx.registrations().await.len(), 1);

    // Revocation removes it too.
    let revoked = ctx
        .api
        .delete(&format!(
            "/v1/numbers/{}/sip-credentials/{cred_id}",
            ctx.number_id
        ))
        .await;
    assert_eq!(revoked.status, 200, "{}", revoked.text);
    assert_eq!(ctx.stored_bindings().await, 0);
    assert_eq!(status_code(&dev.register(&contact, "MD5").await), Some(403));

    // Releasing the number removes every binding of it.
    let (_, user2, password2) = ctx.credential("other").await;
    let mut dev2 = Device::udp(sip, &user2, &password2).await;
    let contact2 = format!("Contact: <{}>\r\n", dev2.contact());
    assert_eq!(
        status_code(&dev2.register(&contact2, "SHA-256").await),
        Some(200)
    );
    assert_eq!(ctx.stored_bindings().await, 1);
    let released = ctx
        .api
        .delete(&format!("/v1/numbers/{}", ctx.number_id))
        .await;
    assert_eq!(released.status, 200, "{}", released.text);
    assert_eq!(ctx.stored_bindings().await, 0);
    assert_eq!(
        status_code(&dev2.register(&contact2, "SHA-256").await),
        Some(403)
    );
}
on_both_backends!(rotation_revocation_and_release_remove_bindings);

/// The registrar keeps recent logins in memory; a rotation made elsewhere (another engine on the
/// same PostgreSQL, here a direct write) never lets the old password bind, and the new one works
/// at once.
async fn a_rotation_elsewhere_never_lets_the_old_password_in(backend: Backend) {
    let ctx = setup(backend, &[]).await;
    let (cred_id, user, password) = ctx.credential("desk").await;
    let sip = ctx.server.sip_addr();
    let mut dev = Device::udp(sip, &user, &password).await;
    let contact = format!("Contact: <{}>\r\n", dev.contact());
    assert_eq!(
        status_code(&dev.register(&contact, "SHA-256").await),
        Some(200)
    );
    // Cached now: a refresh is accepted.
    assert_eq!(status_code(&dev.register_again(&contact).await), Some(200));

    let new_password = "another-password-0123456789";
    let db = sautikit::db::Db::connect(&ctx.db.url).await.expect("db");
    sqlx::query("UPDATE sip_credentials SET ha1_md5 = $1, ha1_sha256 = $2 WHERE id = $3")
        .bind(ha1(Algorithm::Md5, &user, &ctx.workspace_id, new_password))
        .bind(ha1(
            Algorithm::Sha256,
            &user,
            &ctx.workspace_id,
            new_password,
        ))
        .bind(&cred_id)
        .execute(&db.write)
        .await
        .expect("rotate behind the engine's back");
    sqlx::query("DELETE FROM sip_registrations WHERE credential_id = $1")
        .bind(&cred_id)
        .execute(&db.write)
        .await
        .expect("drop bindings");
    db.close().await;

    let refused = dev.register_again(&contact).await;
    assert_eq!(status_code(&refused), Some(403), "{refused}");
    let refused = dev.register(&contact, "SHA-256").await;
    assert_eq!(
        status_code(&refused),
        Some(403),
        "the old password: {refused}"
    );
    assert_eq!(ctx.stored_bindings().await, 0);
    dev.password = new_password.to_owned();
    let ok = dev.register(&contact, "MD5").await;
    assert_eq!(status_code(&ok), Some(200), "the new password: {ok}");
    assert_eq!(ctx.stored_bindings().await, 1);
}
on_both_backends!(a_rotation_elsewhere_never_lets_the_old_password_in);

/// Replace what a response echoes of its request (Via, From, To, Call-ID, CSeq), so two answers
/// can be compared byte for byte.
fn without_echoes(msg: &str) -> String {
    msg.split("\r\n")
        .filter(|l| {
            let name = l
                .split(':')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            !matches!(name.as_str(), "via" | "from" | "to" | "call-id" | "cseq")
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_refusals_say_nothing_and_change_nothing() {
    let ctx = setup(Backend::Sqlite, &[]).await;
    let (_, user, password) = ctx.credential("desk").await;
    let sip = ctx.server.sip_addr();

    // Wrong password and unknown user: the same answer.
    let mut wrong = Device::udp(sip, &user, "not-the-password").await;
    let contact = format!("Contact: <{}>\r\n", wrong.contact());
    let a = wrong.register(&contact, "SHA-256").await;
    let mut unknown = Device::udp(sip, "ts_00000000", "whatever").await;
    let contact_u = format!("Contact: <{}>\r\n", unknown.contact());
    let b = unknown.register(&contact_u, "SHA-256").await;
    assert_eq!(status_code(&a), Some(403), "{a}");
    assert_eq!(without_echoes(&a), without_echoes(&b), "\n{a}\n---\n{b}");
    assert!(header(&a, "To").is_some_and(|t| t.contains("tag=")));
    // Their first challenges look the same too: an unknown user is challenged with a real
    // realm (here the only workspace with numbers), so realms do not tell usernames apart.
    let ca = wrong.register_plain(&contact).await;
    let cb = unknown.register_plain(&contact_u).await;
    let (ca, cb) = (challenges(&ca), challenges(&cb));
    assert_eq!(ca.len(), 2);
    assert_eq!(cb.len(), 2);
    assert_eq!(ca[0].realm.len(), cb[0].realm.len());
    assert_eq!(ca[0].nonce.len(), cb[0].nonce.len());
    assert_eq!(cb[0].realm, ca[0].realm);

    // A foreign realm is refused.
    let mut dev = Device::udp(sip, &user, &password).await;
    let contact = format!("Contact: <{}>\r\n", dev.contact());
    let resp = dev.register_plain(&contact).await;
    let mut c = challenges(&resp).remove(0);
    c.realm = "01900000-0000-7000-8000-00000000ffff".into();
    dev.challenge = Some(c);
    let foreign = dev.register_again(&contact).await;
    assert_eq!(status_code(&foreign), Some(403), "{foreign}");

    // A malformed Authorization is a 400.
    let bad = dev
        .register_plain(&format!(
            "Authorization: Digest username=\"{user}\", realm=\"x\"\r\n{contact}"
        ))
        .await;
    assert_eq!(status_code(&bad), Some(400), "{bad}");

    // An expired nonce that is otherwise right gets a fresh challenge with stale=true. Nonces
    // are MACed with a key in the database; mint one issued 400 s ago.
    let store = sautikit::db::Db::connect(&ctx.db.url).await.expect("db");
    let row = sqlx::query("SELECT secret FROM server_secrets WHERE name = 'sip_nonce_key'")
        .fetch_one(&store.read)
        .await
        .expect("nonce key");
    let secret: String = sqlx::Row::try_get(&row, "secret").expect("secret");
    let key: [u8; 32] = hex_bytes(&secret).try_into().expect("32 bytes");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let old = sautikit_sip::auth::NonceKey::new(key).mint(now - 400, [1; 12]);
    let resp = dev.register_plain(&contact).await;
    let mut c = challenges(&resp).remove(0);
    c.nonce = old;
    dev.challenge = Some(c);
    dev.nc = 0;
    let stale = dev.register_again(&contact).await;
    assert_eq!(status_code(&stale), Some(401), "{stale}");
    assert!(challenges(&stale).iter().all(|c| c.stale), "{stale}");

    // Bad contacts: not a URI, more than ten.
    let not_uri = dev
        .register("Contact: this is not a uri\r\n", "SHA-256")
        .await;
    assert_eq!(status_code(&not_uri), Some(400), "{not_uri}");
    let eleven: String = (0..11)
        .map(|i| format!("Contact: <sip:{user}@127.0.0.{}:5060>\r\n", i + 1))
        .collect();
    let many = dev.register(&eleven, "SHA-256").await;
    assert_eq!(status_code(&many), Some(403), "{many}");

    // None of it left a binding.
    assert!(ctx.registrations().await.is_empty());
    assert_eq!(ctx.stored_bindings().await, 0);
    // And the right answer still works.
    assert_eq!(
        status_code(&dev.register(&contact, "SHA-256").await),
        Some(200)
    );
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_failures_ban_the_source() {
    let ctx = setup(Backend::Sqlite, &[]).await;
    let (_, user, password) = ctx.credential("desk").await;
    let sip = ctx.server.sip_addr();
    for i in 0..20 {
        let mut scanner = Device::udp(sip, &format!("ts_{i:08x}"), "guess").await;
        let contact = format!("Contact: <{}>\r\n", scanner.contact());
        let r = scanner.register(&contact, "MD5").await;
        assert_eq!(status_code(&r), Some(403), "{r}");
    }
    // Banned: even the right password from that address is refused, at once.
    let mut dev = Device::udp(sip, &user, &password).await;
    let contact = format!("Contact: <{}>\r\n", dev.contact());
    let r = dev.register_plain(&contact).await;
    assert_eq!(status_code(&r), Some(403), "{r}");
    // Another source is not.
    let sock = tokio::net::UdpSocket::bind("127.0.0.2:0").await;
    if let Ok(sock) = sock {
        drop(sock);
        let mut other = Device::udp_from("127.0.0.2:0", sip, &user, &password).await;
        let contact = format!("Contact: <{}>\r\n", other.contact());
        assert_eq!(
            status_code(&other.register(&contact, "SHA-256").await),
            Some(200)
        );
    }
    let metrics = ctx.server.anon().get("/metrics").await.text;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sautikit_sip_auth_bans_total") && l.contains("source")),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sautikit_sip_auth_failures_total")),
        "{metrics}"
    );
    assert!(ctx.server.log_text().contains("source banned"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_bindings_live_as_long_as_their_connection() {
    let ctx = setup(Backend::Sqlite, &[]).await;
    let (_, user, password) = ctx.credential("desk").await;
    let mut dev = Device::tcp(ctx.server.sip_addr(), &user, &password).await;
    let contact = format!("Contact: <{}>\r\n", dev.contact());
    assert_eq!(
        status_code(&dev.register(&contact, "SHA-256").await),
        Some(200)
    );
    let regs = ctx.registrations().await;
    assert_eq!(regs.len(), 1);
    assert_eq!(regs[0]["transport"], "tcp");
    assert_eq!(regs[0]["source"], dev.local.to_string());
    drop(dev);
    ctx.wait_registrations(0).await;
}

async fn expiry_restart_and_keepalives(backend: Backend) {
    let env = [
        ("SAUTIKIT_SIP_MIN_EXPIRES", "1"),
        ("SAUTIKIT_SIP_KEEPALIVE_SECS", "1"),
        ("SAUTIKIT_SIP_T1_MS", "50"),
        // PostgreSQL: the restarted process adopts the bindings of the killed one once that is
        // silent this long.
        ("SAUTIKIT_CALL_ORPHAN_SECS", "2"),
    ];
    let mut ctx = setup(backend, &env).await;
    let (_, user, password) = ctx.credential("desk").await;
    let sip = ctx.server.sip_addr();

    // A binding of 2 s is removed by the registrar itself, with no REGISTER.
    let mut short = Device::udp(sip, &user, &password).await;
    let c = format!("Contact: <{}>\r\nExpires: 2\r\n", short.contact());
    assert_eq!(status_code(&short.register(&c, "SHA-256").await), Some(200));
    let mut long = Device::udp(sip, &user, &password).await;
    let c = format!("Contact: <{}>\r\n", long.contact());
    assert_eq!(status_code(&long.register(&c, "SHA-256").await), Some(200));
    assert_eq!(ctx.stored_bindings().await, 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while ctx.stored_bindings().await != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the expired binding stayed"
        );
        // Both answer keepalives meanwhile: only expiry may remove the short one.
        for dev in [&mut short, &mut long] {
            if let Some(msg) = dev.recv(Duration::from_millis(100)).await {
                answer_options(dev, &msg).await;
            }
        }
    }

    // A restart keeps the UDP binding, and the new process keeps it alive.
    ctx.server.kill9();
    ctx.server = Server::start_with(&ctx.db, Mode::Dev, &env);
    ctx.api = ctx.server.api(&ctx.key);
    let regs = ctx.registrations().await;
    assert_eq!(regs.len(), 1, "{regs:?}");
    assert_eq!(regs[0]["contact"], long.contact());
    let ping = long
        .recv(Duration::from_secs(10))
        .await
        .expect("an OPTIONS keepalive after the restart");
    assert!(ping.starts_with("OPTIONS "), "{ping}");
    assert!(ping.contains(&long.contact()), "{ping}");
    answer_options(&mut long, &ping).await;
    assert_eq!(ctx.registrations().await.len(), 1);

    // A device that stops answering is dropped (64 × T1 after an unanswered OPTIONS).
    ctx.wait_registrations(0).await;
}
on_both_backends!(expiry_restart_and_keepalives);

async fn answer_options(dev: &mut Device, msg: &str) {
    if msg.starts_with("OPTIONS ") {
        let ok = common::uac::response_to(msg, 200, "OK");
        dev.send(&ok).await;
    }
}
