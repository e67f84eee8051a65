//! RFC 4475's SIP torture messages, byte-exact (tests/conformance/rfc4475), sent to a running
//! server over UDP and over TCP, each answered as the RFC says an endpoint should: valid ones
//! processed (a `404` for a user we do not have is processing), invalid ones refused with the
//! code the RFC names, responses without a transaction dropped. And RFC 3261 §8.2's checks in
//! its order.
//!
//! Several messages share a branch, sent-by and method (RFC 4475 reuses `z9hG4bKkdjuw`), which
//! makes the later one a retransmission of the earlier to any RFC 3261 server; such messages go
//! to servers of their own.

#[macro_use]
mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::{Backend, Mode, Server, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// What a message gets: the final status of each request in it, or nothing at all.
#[derive(Debug, Clone, Copy)]
enum Want {
    Final(&'static [u16]),
    Nothing,
}

use Want::{Final, Nothing};

struct Case {
    file: &'static str,
    section: &'static str,
    udp: Want,
    tcp: Want,
}

const fn both(file: &'static str, section: &'static str, want: Want) -> Case {
    Case {
        file,
        section,
        udp: want,
        tcp: want,
    }
}

/// Every RFC 4475 message and `test.dat` (not a SIP message: no version on its first line).
/// Where UDP and TCP differ it is framing: a stream needs Content-Length and the blank line.
const TABLE: &[Case] = &[
    both(
        "wsinv",
        "3.1.1.1 short tortuous INVITE (To-tag: no such dialog)",
        Final(&[481]),
    ),
    both(
        "intmeth",
        "3.1.1.2 wide range of valid characters",
        Final(&[501]),
    ),
    both("esc01", "3.1.1.3 valid use of % escaping", Final(&[404])),
    both("escnull", "3.1.1.4 escaped nulls in URIs", Final(&[404])),
    both(
        "esc02",
        "3.1.1.5 use of % when it is not an escape",
        Final(&[501]),
    ),
    both(
        "lwsdisp",
        "3.1.1.6 no LWS between display name and <",
        Final(&[200]),
    ),
    both(
        "longreq",
        "3.1.1.7 long values in header fields",
        Final(&[404]),
    ),
    Case {
        file: "dblreq",
        section: "3.1.1.8 extra trailing octets (UDP: ignored; TCP: a second request)",
        udp: Final(&[404]),
        tcp: Final(&[404, 404]),
    },
    both(
        "semiuri",
        "3.1.1.9 semicolon-separated parameters in URI user part",
        Final(&[200]),
    ),
    both(
        "transports",
        "3.1.1.10 varied and unknown transport types",
        Final(&[200]),
    ),
    both(
        "mpart01",
        "3.1.1.11 multipart MIME message (MESSAGE)",
        Final(&[405]),
    ),
    both(
        "unreason",
        "3.1.1.12 unusual reason phrase (a response)",
        Nothing,
    ),
    both(
        "noreason",
        "3.1.1.13 empty reason phrase (a response)",
        Nothing,
    ),
    both(
        "badinv01",
        "3.1.2.1 extraneous header field separators",
        Final(&[400]),
    ),
    Case {
        file: "clerr",
        section: "3.1.2.2 Content-Length larger than message (TCP: waits for the rest)",
        udp: Final(&[400]),
        tcp: Nothing,
    },
    both("ncl", "3.1.2.3 negative Content-Length", Final(&[400])),
    both(
        "scalar02",
        "3.1.2.4 request scalar fields with overlarge values",
        Final(&[400]),
    ),
    both(
        "scalarlg",
        "3.1.2.5 response scalar fields with overlarge values",
        Nothing,
    ),
    both(
        "quotbal",
        "3.1.2.6 unterminated quoted string in display name",
        Final(&[400]),
    ),
    both(
        "ltgtruri",
        "3.1.2.7 <> enclosing Request-URI",
        Final(&[400]),
    ),
    both(
        "lwsruri",
        "3.1.2.8 malformed SIP Request-URI (embedded LWS)",
        Final(&[400]),
    ),
    both(
        "lwsstart",
        "3.1.2.9 multiple SP separating Request-Line elements",
        Final(&[400]),
    ),
    both(
        "trws",
        "3.1.2.10 SP characters at end of Request-Line",
        Final(&[400]),
    ),
    both(
        "escruri",
        "3.1.2.11 escaped headers in SIP Request-URI",
        Final(&[400]),
    ),
    both(
        "baddate",
        "3.1.2.12 invalid time zone in Date (ignored)",
        Final(&[404]),
    ),
    both(
        "regbadct",
        "3.1.2.13 failure to enclose name-addr URI in <>",
        Final(&[400]),
    ),
    both(
        "badaspec",
        "3.1.2.14 spaces within addr-spec",
        Final(&[400]),
    ),
    Case {
        file: "baddn",
        section: "3.1.2.15 non-token characters in display name (TCP: no blank line ends it)",
        udp: Final(&[400]),
        tcp: Nothing,
    },
    both(
        "badvers",
        "3.1.2.16 unknown protocol version",
        Final(&[505]),
    ),
    both(
        "mismatch01",
        "3.1.2.17 start line and CSeq method mismatch",
        Final(&[400]),
    ),
    both(
        "mismatch02",
        "3.1.2.18 unknown method with CSeq method mismatch",
        Final(&[501]),
    ),
    both(
        "bigcode",
        "3.1.2.19 overlarge response code (a response)",
        Nothing,
    ),
    both(
        "badbranch",
        "3.2.1 missing transaction identifier",
        Final(&[200]),
    ),
    both(
        "insuf",
        "3.3.1 missing required header fields",
        Final(&[400]),
    ),
    both(
        "unkscm",
        "3.3.2 Request-URI with unknown scheme",
        Final(&[416]),
    ),
    both(
        "novelsc",
        "3.3.3 Request-URI with known but atypical scheme",
        Final(&[416]),
    ),
    both(
        "unksm2",
        "3.3.4 unknown URI schemes in header fields",
        Final(&[404]),
    ),
    both("bext01", "3.3.5 proxy-require and require", Final(&[420])),
    both("invut", "3.3.6 unknown content-type", Final(&[415])),
    both(
        "regaut01",
        "3.3.7 unknown authorization scheme",
        Final(&[404]),
    ),
    both(
        "multi01",
        "3.3.8 multiple values in single value required fields",
        Final(&[400]),
    ),
    both(
        "mcl01",
        "3.3.9 multiple Content-Length values",
        Final(&[400]),
    ),
    both(
        "bcast",
        "3.3.10 200 OK response with broadcast Via (a response)",
        Nothing,
    ),
    both(
        "zeromf",
        "3.3.11 Max-Forwards of zero (we are the endpoint)",
        Final(&[200]),
    ),
    both(
        "cparam01",
        "3.3.12 REGISTER with a Contact header parameter",
        Final(&[404]),
    ),
    both(
        "cparam02",
        "3.3.13 REGISTER with a URL parameter",
        Final(&[404]),
    ),
    both(
        "regescrt",
        "3.3.14 REGISTER with a URL escaped header",
        Final(&[404]),
    ),
    both(
        "sdp01",
        "3.3.15 unacceptable Accept offering",
        Final(&[406]),
    ),
    Case {
        file: "inv2543",
        section: "3.4.1 INVITE with RFC 2543 syntax (TCP: no Content-Length)",
        udp: Final(&[404]),
        tcp: Final(&[400]),
    },
    both("test", "not SIP: no version on the Request-Line", Nothing),
];

/// How long a message's answers are collected. Everything runs at once, so this is paid once
/// per server; the absence of an answer cannot be awaited any other way.
const WINDOW: Duration = Duration::from_secs(3);

fn message(file: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/conformance/rfc4475/{file}.dat",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The top Via's branch and sent-by with the CSeq method: what RFC 3261 §17.2.3 matches a
/// server transaction by (an INVITE's ACK and CANCEL aside).
fn transaction_key(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let head = text.split("\r\n\r\n").next()?;
    let mut via = None;
    let mut cseq = None;
    for line in head.split("\r\n").skip(1) {
        let (name, value) = line.split_once(':')?;
        let name = name.trim().to_ascii_lowercase();
        if (name == "via" || name == "v") && via.is_none() {
            via = Some(value.split(',').next()?.trim().to_ascii_lowercase());
        } else if name == "cseq" {
            cseq = Some(value.split_whitespace().last()?.to_owned());
        }
    }
    Some(format!("{}|{}", via?, cseq?))
}

/// The final responses in `bytes` (one or more messages), as (CSeq, status), without the
/// retransmissions of one.
fn finals(bytes: &[u8], seen: &mut Vec<(String, u16)>) {
    let text = String::from_utf8_lossy(bytes);
    for msg in text.split("SIP/2.0 ").skip(1) {
        let Some(code) = msg.get(..3).and_then(|c| c.parse::<u16>().ok()) else {
            continue;
        };
        if code < 200 {
            continue;
        }
        let cseq = msg
            .split("\r\n")
            .find_map(|l| l.strip_prefix("CSeq:").or_else(|| l.strip_prefix("CSeq :")))
            .unwrap_or_default()
            .trim()
            .to_owned();
        if !seen.contains(&(cseq.clone(), code)) {
            seen.push((cseq, code));
        }
    }
}

async fn over_udp(server: SocketAddr, bytes: Vec<u8>) -> Vec<u16> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket.send_to(&bytes, server).await.expect("send");
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let deadline = tokio::time::Instant::now() + WINDOW;
    while let Ok(Ok((n, _))) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
        finals(&buf[..n], &mut seen);
    }
    seen.into_iter().map(|(_, code)| code).collect()
}

async fn over_tcp(server: SocketAddr, bytes: Vec<u8>) -> Vec<u16> {
    let mut stream = TcpStream::connect(server).await.expect("connect");
    stream.write_all(&bytes).await.expect("write");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let deadline = tokio::time::Instant::now() + WINDOW;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let mut seen = Vec::new();
    finals(&got, &mut seen);
    seen.into_iter().map(|(_, code)| code).collect()
}

async fn run_table(tcp: bool) {
    // Servers enough that no two messages of one transaction key share a server.
    let mut groups: Vec<(HashSet<String>, Vec<&Case>)> = Vec::new();
    for case in TABLE {
        let key = transaction_key(&message(case.file));
        let slot = groups
            .iter()
            .position(|(keys, _)| key.as_ref().is_none_or(|k| !keys.contains(k)));
        let slot = slot.unwrap_or_else(|| {
            groups.push((HashSet::new(), Vec::new()));
            groups.len() - 1
        });
        if let Some(k) = key {
            groups[slot].0.insert(k);
        }
        groups[slot].1.push(case);
    }
    let mut failures = Vec::new();
    for (_, cases) in groups {
        let db = TestDb::new(Backend::Sqlite).await;
        let server = Server::start(&db, Mode::Dev);
        let sip = server.sip_addr();
        let runs: Vec<_> = cases
            .iter()
            .map(|case| {
                let bytes = message(case.file);
                if tcp {
                    tokio::spawn(over_tcp(sip, bytes))
                } else {
                    tokio::spawn(over_udp(sip, bytes))
                }
            })
            .collect();
        for (case, run) in cases.iter().zip(runs) {
            let mut got = run.await.expect("task");
            got.sort_unstable();
            let want = if tcp { case.tcp } else { case.udp };
            let ok = match want {
                Final(codes) => {
                    let mut codes = codes.to_vec();
                    codes.sort_unstable();
                    got == codes
                }
                Nothing => got.is_empty(),
            };
            if !ok {
                failures.push(format!(
                    "{}.dat ({}): want {want:?}, got {got:?}",
                    case.file, case.section
                ));
            }
        }
        assert!(
            !server.log_text().contains("panicked"),
            "the server panicked:\n{}",
            server.log_text()
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} messages answered wrongly over {}:\n{}",
        failures.len(),
        TABLE.len(),
        if tcp { "TCP" } else { "UDP" },
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc4475_torture_messages_over_udp() {
    run_table(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc4475_torture_messages_over_tcp() {
    run_table(true).await;
}

/// One request over UDP and the status line of its final answer.
async fn final_status(server: SocketAddr, text: &str) -> String {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket
        .send_to(text.replace('\n', "\r\n").as_bytes(), server)
        .await
        .expect("send");
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut buf))
            .await
            .expect("an answer")
            .expect("recv");
        let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
        if !reply.starts_with("SIP/2.0 1") {
            return reply;
        }
    }
}

/// RFC 3261 §8.2 through the server: each request fails two checks and gets the earlier one's
/// answer, with the header fields that say what we take; a malformed request's `400` names the
/// header field; `Max-Forwards: 0` is processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uas_checks_answer_in_the_rfc_order() {
    let db = TestDb::new(Backend::Sqlite).await;
    let server = Server::start(&db, Mode::Dev);
    let sip = server.sip_addr();
    let request = |n: u32, method: &str, uri: &str, extra: &str, body: &str| {
        format!(
            "{method} {uri} SIP/2.0\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK-order-{n}\n\
             From: <sip:a@example.com>;tag=order{n}\nTo: <sip:b@example.com>\n\
             Call-ID: order-{n}@test\nCSeq: 1 {method}\nMax-Forwards: 70\n{extra}\
             Content-Length: {}\n\n{body}",
            body.len()
        )
    };
    let cases: Vec<(String, &str, &[&str])> = vec![
        // Method before scheme: 405 with Allow.
        (
            request(1, "SUBSCRIBE", "tel:+254700000001", "Require: foo\n", ""),
            "SIP/2.0 405 ",
            &["Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, REGISTER"],
        ),
        (
            request(2, "FROB", "sip:b@example.com", "", ""),
            "SIP/2.0 501 ",
            &["Allow: "],
        ),
        // Scheme before Require.
        (
            request(3, "OPTIONS", "tel:+254700000001", "Require: foo\n", ""),
            "SIP/2.0 416 ",
            &[],
        ),
        // Require before the body.
        (
            request(
                4,
                "INVITE",
                "sip:b@example.com",
                "Require: foo, bar\nContent-Type: text/plain\n",
                "hi",
            ),
            "SIP/2.0 420 ",
            &["Unsupported: foo, bar"],
        ),
        // The body before Accept.
        (
            request(
                5,
                "INVITE",
                "sip:b@example.com",
                "Accept: text/x\nContent-Type: text/plain\n",
                "hi",
            ),
            "SIP/2.0 415 ",
            &[
                "Accept: application/sdp",
                "Accept-Encoding: identity",
                "Accept-Language: en",
            ],
        ),
        (
            request(6, "INVITE", "sip:b@example.com", "Accept: text/x\n", ""),
            "SIP/2.0 406 ",
            &["Accept: application/sdp"],
        ),
        // Malformed: the reason phrase says which header field.
        (
            request(
                7,
                "OPTIONS",
                "sip:b@example.com",
                "Call-ID: again@test\n",
                "",
            ),
            "SIP/2.0 400 Duplicate Call-ID",
            &[],
        ),
        (
            request(8, "OPTIONS", "sip:b@example.com", "Content-Length: 5\n", ""),
            "SIP/2.0 400 Bad Content-Length",
            &[],
        ),
        (
            request(9, "OPTIONS", "sip:b@example.com", "", "")
                .replace("From: <sip:a@example.com>;tag=order9\n", ""),
            "SIP/2.0 400 Missing From",
            &[],
        ),
        (
            request(10, "OPTIONS", "sip:b@example.com", "", "")
                .replace("SIP/2.0\nVia", "SIP/3.0\nVia"),
            "SIP/2.0 505 ",
            &[],
        ),
        // Max-Forwards: 0 to us as the endpoint is processed.
        (
            request(11, "OPTIONS", "sip:b@example.com", "", "")
                .replace("Max-Forwards: 70", "Max-Forwards: 0"),
            "SIP/2.0 200 ",
            &[],
        ),
    ];
    for (text, status, headers) in cases {
        let reply = final_status(sip, &text).await;
        assert!(reply.starts_with(status), "{text}\n→ {reply}");
        for h in headers {
            assert!(reply.contains(h), "{text}\n→ {reply}\nlacks {h}");
        }
    }
}
