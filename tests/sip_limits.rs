//! Per-source SIP request-rate limits: a source past its limit is told `503` with `Retry-After`,
//! past twice its limit it is banned (dropped unanswered), and the ban is logged and counted in
//! `/metrics`; other sources are served throughout, and a carrier has its own, higher limit.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Backend, Mode, Server, TestDb};
use tokio::net::UdpSocket;

fn options(branch: &str, from: SocketAddr) -> String {
    format!(
        "OPTIONS sip:ping@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK-{branch}\r\n\
         From: <sip:probe@example.com>;tag={branch}\r\nTo: <sip:ping@127.0.0.1>\r\n\
         Call-ID: {branch}@limits\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
}

/// Send `n` OPTIONS at once from `socket`; the status lines of the answers that come within
/// `quiet` of the last one.
async fn burst(socket: &UdpSocket, server: SocketAddr, tag: &str, n: usize) -> Vec<String> {
    let local = socket.local_addr().expect("local");
    for i in 0..n {
        socket
            .send_to(options(&format!("{tag}-{i}"), local).as_bytes(), server)
            .await
            .expect("send");
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while let Ok(Ok((len, _))) =
        tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf)).await
    {
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        got.push(text);
        if got.len() == n {
            break;
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_source_is_refused_then_banned_while_others_are_served() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = Server::start_with(
        &db,
        Mode::Dev,
        &[
            // 127.0.0.1 (a caller) and 127.0.0.3 (a carrier); 127.0.0.2 is anybody.
            ("SAUTIKIT_CARRIER_ALLOW", "127.0.0.1/32,127.0.0.3/32"),
            ("SAUTIKIT_SIP_RATE_OTHER", "20"),
            ("SAUTIKIT_SIP_RATE_CARRIER", "1000"),
            ("SAUTIKIT_SIP_BAN_SECS", "300"),
        ],
    );
    let sip = server.sip_addr();

    let flooder = UdpSocket::bind("127.0.0.2:0")
        .await
        .expect("bind 127.0.0.2");
    let answers = burst(&flooder, sip, "flood", 60).await;
    let ok = answers
        .iter()
        .filter(|a| a.starts_with("SIP/2.0 200 "))
        .count();
    let refused: Vec<&String> = answers
        .iter()
        .filter(|a| a.starts_with("SIP/2.0 503 "))
        .collect();
    assert!((20..=25).contains(&ok), "{ok} answered 200: {answers:?}");
    assert!(!refused.is_empty(), "none refused: {answers:?}");
    assert!(
        refused.iter().all(|r| r.contains("Retry-After: ")),
        "{refused:?}"
    );
    assert!(
        ok + refused.len() < 60,
        "past twice the limit the flooder is dropped, not answered: {} answers",
        answers.len()
    );

    // Banned: a lone request from it goes unanswered, while another source is served.
    let caller = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    assert_eq!(
        burst(&caller, sip, "caller", 1)
            .await
            .first()
            .map(|a| a.starts_with("SIP/2.0 200 ")),
        Some(true)
    );
    assert!(burst(&flooder, sip, "after-ban", 1).await.is_empty());

    // A carrier sends the same burst: all of it is under the carrier limit.
    let carrier = UdpSocket::bind("127.0.0.3:0")
        .await
        .expect("bind 127.0.0.3");
    let answers = burst(&carrier, sip, "carrier", 60).await;
    assert_eq!(
        answers
            .iter()
            .filter(|a| a.starts_with("SIP/2.0 200 "))
            .count(),
        60
    );

    let metrics = server.anon().get("/metrics").await.text;
    assert!(
        metrics.contains("sautikit_sip_flood_bans_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sautikit_sip_rate_limited_total{class=\"other\"}"),
        "{metrics}"
    );
    assert!(server.log_text().contains("SIP source banned for flooding"));
}
