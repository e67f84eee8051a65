//! The scanners of sipvicious (from the test venv, tests/python) against a running server, as a
//! public SIP port meets them within minutes of going up: `svmap` finds the server, `svwar`
//! cannot tell our numbers and usernames from ones that do not exist, `svcrack` finds no password
//! and gets its source banned within seconds, and a carrier from another address is served
//! throughout.
//!
//! The server listens on 127.0.0.5 so that the scanners (from 127.0.0.1) are not our own address,
//! which the flood limits exempt; the carrier is 127.0.0.2. svcrack answers only MD5 challenges.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::device::{FIRST_INVENTORY_ID, claim, new_credential};
use common::{Backend, Mode, Server, TestDb, dev_key};
use tokio::net::UdpSocket;

fn sipvicious(tool: &str) -> Option<PathBuf> {
    common::venv_tool(&format!("sipvicious_{tool}"), "SAUTIKIT_REQUIRE_SIPVICIOUS")
}

/// Run a scanner for at most `limit`; its standard output and error together.
async fn scan(bin: &PathBuf, args: &[&str], limit: Duration) -> String {
    let run = tokio::process::Command::new(bin)
        .args(args)
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(limit, run).await {
        Ok(Ok(out)) => format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(Err(e)) => panic!("{}: {e}", bin.display()),
        // Killed at the limit: what it printed is lost, which the caller allows for.
        Err(_) => String::new(),
    }
}

/// An OPTIONS from the carrier; whether a `200` came back within a second.
async fn carrier_served(carrier: &UdpSocket, server: SocketAddr, n: u32) -> bool {
    let local = carrier.local_addr().expect("local");
    let msg = format!(
        "OPTIONS sip:ping@{server} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-carrier-{n}\r\n\
         From: <sip:carrier@example.com>;tag=c{n}\r\nTo: <sip:ping@{server}>\r\n\
         Call-ID: carrier-{n}@scan\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    );
    carrier.send_to(msg.as_bytes(), server).await.expect("send");
    let mut buf = vec![0u8; 65_536];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Ok((len, _))) =
        tokio::time::timeout_at(deadline, carrier.recv_from(&mut buf)).await
    {
        let text = String::from_utf8_lossy(&buf[..len]);
        if text.starts_with("SIP/2.0 200 ") && text.contains(&format!("carrier-{n}@scan")) {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sipvicious_finds_nothing_and_is_banned_while_a_carrier_is_served() {
    let (Some(svmap), Some(svwar), Some(svcrack)) = (
        sipvicious("svmap"),
        sipvicious("svwar"),
        sipvicious("svcrack"),
    ) else {
        return;
    };
    let db = TestDb::new(Backend::Sqlite).await;
    let server = Server::start_with(
        &db,
        Mode::Dev,
        &[
            ("SAUTIKIT_SIP_LISTEN", "127.0.0.5:0"),
            ("SAUTIKIT_CARRIER_ALLOW", "127.0.0.2/32"),
            ("SAUTIKIT_SIP_DIGEST_ALGORITHMS", "MD5"),
        ],
    );
    let sip = server.sip_addr();
    let port = sip.port().to_string();
    let api = server.api(&dev_key(&db.data_dir));
    let number_id = claim(&api, FIRST_INVENTORY_ID).await;
    let (_, username, password) = new_credential(&api, &number_id, "desk").await;
    let carrier = UdpSocket::bind("127.0.0.2:0")
        .await
        .expect("bind 127.0.0.2");
    assert!(carrier_served(&carrier, sip, 0).await);

    // svmap finds a SIP server (it is one).
    let found = scan(&svmap, &["-p", &port, "127.0.0.5"], Duration::from_secs(60)).await;
    assert!(found.contains("Sautikit"), "{found}");

    // svwar: our number (+254700000001) and the credential's username among ones that do not
    // exist, by REGISTER (its default) and by INVITE. It tells none of them apart.
    let dictionary = db.data_dir.join("extensions.txt");
    std::fs::write(
        &dictionary,
        format!("ts_00000000\n{username}\nts_ffffffff\n254700000001\n254700000009\n"),
    )
    .expect("dictionary");
    for method in ["REGISTER", "INVITE"] {
        let dict = dictionary.to_string_lossy();
        let out = scan(
            &svwar,
            &[
                "--force",
                "-m",
                method,
                "-d",
                &dict,
                "-p",
                &port,
                "127.0.0.5",
            ],
            Duration::from_secs(60),
        )
        .await;
        assert!(
            out.contains("found nothing"),
            "svwar ({method}) told an extension apart:\n{out}"
        );
    }

    // svcrack: guesses at the credential's password, again and again as a scanner does (it gives
    // up on a `503`). It finds none (the password is 144 random bits), and its source is banned
    // within seconds while the carrier is served throughout.
    let started = Instant::now();
    let crack = tokio::spawn({
        let svcrack = svcrack.clone();
        let (port, username) = (port.clone(), username.clone());
        async move {
            let mut all = String::new();
            while started.elapsed() < Duration::from_secs(20) {
                let args = [
                    "-u",
                    &username,
                    "-r",
                    "100000-999999",
                    "--maximumtime",
                    "2",
                    "-p",
                    &port,
                    "127.0.0.5",
                ];
                all.push_str(&scan(&svcrack, &args, Duration::from_secs(30)).await);
            }
            all
        }
    });
    let mut banned_after = None;
    let mut n = 1;
    while started.elapsed() < Duration::from_secs(25) {
        assert!(
            carrier_served(&carrier, sip, n).await,
            "the carrier went unanswered during the scan"
        );
        n += 1;
        let metrics = server.anon().get("/metrics").await.text;
        if banned_after.is_none()
            && (metrics.contains("sautikit_sip_flood_bans_total")
                || metrics.contains("sautikit_sip_auth_bans_total{kind=\"source\"}"))
        {
            banned_after = Some(started.elapsed());
        }
    }
    let out = crack.await.expect("svcrack");
    assert!(
        !out.contains(&password),
        "svcrack found the password:\n{out}"
    );
    let Some(banned_after) = banned_after else {
        panic!(
            "svcrack's source was never banned; it printed:\n{out}\nmetrics:\n{}",
            server.anon().get("/metrics").await.text
        );
    };
    // svcrack gives up on its first `503` and takes a few seconds to exit; the second run's
    // `503` is the source's second within a minute, which bans it.
    assert!(
        banned_after < Duration::from_secs(20),
        "banned after {banned_after:?}"
    );
    assert!(
        server.log_text().contains("banned"),
        "{}",
        server.log_text()
    );
}
