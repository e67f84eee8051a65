//! A minimal SIP device for registrar tests: builds REGISTERs by hand, answers digest challenges
//! (computed here from the RFC formulas, independently of the server's code), and reads what the
//! server sends, over UDP or TCP.

use std::net::SocketAddr;
use std::time::Duration;

use md5::Md5;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::uac::{header, headers, status_code};

enum Flow {
    Udp(UdpSocket),
    Tcp(TcpStream, Vec<u8>),
}

/// A challenge as read from `WWW-Authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub algorithm: String,
    pub stale: bool,
}

pub struct Device {
    flow: Flow,
    pub server: SocketAddr,
    pub local: SocketAddr,
    pub user: String,
    pub password: String,
    /// The AOR's host.
    pub domain: String,
    pub call_id: String,
    pub cseq: u32,
    /// The last challenge seen and the nonce count used with it.
    pub challenge: Option<Challenge>,
    pub nc: u32,
}

fn param(value: &str, name: &str) -> Option<String> {
    let re = regex::Regex::new(&format!(r#"(?i)(?:^|[\s,]){name}=("([^"]*)"|[^,\s]+)"#)).ok()?;
    let c = re.captures(value)?;
    c.get(2).or_else(|| c.get(1)).map(|m| m.as_str().to_owned())
}

pub fn parse_challenge(value: &str) -> Challenge {
    Challenge {
        realm: param(value, "realm").unwrap_or_default(),
        nonce: param(value, "nonce").unwrap_or_default(),
        algorithm: param(value, "algorithm").unwrap_or_else(|| "MD5".into()),
        stale: param(value, "stale").is_some_and(|s| s.eq_ignore_ascii_case("true")),
    }
}

/// Every challenge in headers `name` (`WWW-Authenticate`, `Proxy-Authenticate`), in order.
pub fn challenges_named(msg: &str, name: &str) -> Vec<Challenge> {
    headers(msg, name)
        .into_iter()
        .map(parse_challenge)
        .collect()
}

/// Every challenge of a 401, in order.
pub fn challenges(msg: &str) -> Vec<Challenge> {
    headers(msg, "WWW-Authenticate")
        .into_iter()
        .map(parse_challenge)
        .collect()
}

fn h(algorithm: &str, text: &str) -> String {
    if algorithm.eq_ignore_ascii_case("SHA-256") {
        hex(&Sha256::digest(text.as_bytes()))
    } else {
        hex(&Md5::digest(text.as_bytes()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An `Authorization` value for `method uri` (qop=auth).
#[allow(clippy::too_many_arguments)]
pub fn authorization(
    c: &Challenge,
    user: &str,
    password: &str,
    method: &str,
    uri: &str,
    nc: u32,
    cnonce: &str,
) -> String {
    let ha1 = h(&c.algorithm, &format!("{user}:{}:{password}", c.realm));
    let ha2 = h(&c.algorithm, &format!("{method}:{uri}"));
    let nc = format!("{nc:08x}");
    let response = h(
        &c.algorithm,
        &format!("{ha1}:{}:{nc}:{cnonce}:auth:{ha2}", c.nonce),
    );
    format!(
        "Digest username=\"{user}\", realm=\"{}\", nonce=\"{}\", uri=\"{uri}\", \
         response=\"{response}\", algorithm={}, cnonce=\"{cnonce}\", qop=auth, nc={nc}",
        c.realm, c.nonce, c.algorithm
    )
}

impl Device {
    pub async fn udp(server: SocketAddr, user: &str, password: &str) -> Device {
        Self::udp_from("127.0.0.1:0", server, user, password).await
    }

    /// A UDP device bound to `bind` (another loopback address is another source).
    pub async fn udp_from(bind: &str, server: SocketAddr, user: &str, password: &str) -> Device {
        let sock = UdpSocket::bind(bind).await.expect("bind udp");
        let local = sock.local_addr().expect("local addr");
        Self::new(Flow::Udp(sock), server, local, user, password)
    }

    pub async fn tcp(server: SocketAddr, user: &str, password: &str) -> Device {
        let stream = TcpStream::connect(server).await.expect("connect tcp");
        let local = stream.local_addr().expect("local addr");
        Self::new(Flow::Tcp(stream, Vec::new()), server, local, user, password)
    }

    fn new(
        flow: Flow,
        server: SocketAddr,
        local: SocketAddr,
        user: &str,
        password: &str,
    ) -> Device {
        Device {
            flow,
            server,
            local,
            user: user.to_owned(),
            password: password.to_owned(),
            domain: server.ip().to_string(),
            call_id: format!("reg-{}", uuid::Uuid::now_v7().simple()),
            cseq: 0,
            challenge: None,
            nc: 0,
        }
    }

    fn transport(&self) -> &'static str {
        match self.flow {
            Flow::Udp(_) => "UDP",
            Flow::Tcp(..) => "TCP",
        }
    }

    /// This device's own contact URI.
    pub fn contact(&self) -> String {
        format!(
            "sip:{}@{};transport={}",
            self.user,
            self.local,
            self.transport().to_ascii_lowercase()
        )
    }

    pub fn request_uri(&self) -> String {
        format!("sip:{}", self.domain)
    }

    /// A REGISTER with the next CSeq; `extra` is raw header lines, each ending in CRLF.
    pub fn register_text(&mut self, extra: &str) -> String {
        self.cseq += 1;
        format!(
            "REGISTER {uri} SIP/2.0\r\n\
             Via: SIP/2.0/{t} {local};branch=z9hG4bK{branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{user}@{domain}>;tag={tag}\r\n\
             To: <sip:{user}@{domain}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             User-Agent: sautikit-test-device/1\r\n\
             {extra}\
             Content-Length: 0\r\n\r\n",
            uri = self.request_uri(),
            t = self.transport(),
            local = self.local,
            branch = uuid::Uuid::now_v7().simple(),
            user = self.user,
            domain = self.domain,
            tag = uuid::Uuid::now_v7().simple(),
            call_id = self.call_id,
            cseq = self.cseq,
        )
    }

    pub async fn send(&mut self, text: &str) {
        match &mut self.flow {
            Flow::Udp(s) => {
                s.send_to(text.as_bytes(), self.server).await.expect("send");
            }
            Flow::Tcp(s, _) => s.write_all(text.as_bytes()).await.expect("send"),
        }
    }

    /// The next message from the server, or None after `wait`.
    pub async fn recv(&mut self, wait: Duration) -> Option<String> {
        match &mut self.flow {
            Flow::Udp(s) => {
                let mut buf = vec![0u8; 65_535];
                let (n, _) = tokio::time::timeout(wait, s.recv_from(&mut buf))
                    .await
                    .ok()?
                    .ok()?;
                Some(String::from_utf8_lossy(&buf[..n]).into_owned())
            }
            Flow::Tcp(s, pending) => {
                let deadline = tokio::time::Instant::now() + wait;
                loop {
                    if let Some(end) = find(pending, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&pending[..end]).into_owned();
                        let len: usize = header(&format!("{head}\r\n\r\n"), "Content-Length")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        if pending.len() >= end + 4 + len {
                            let msg: Vec<u8> = pending.drain(..end + 4 + len).collect();
                            return Some(String::from_utf8_lossy(&msg).into_owned());
                        }
                    }
                    let mut buf = [0u8; 16 * 1024];
                    let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
                        .await
                        .ok()?
                        .ok()?;
                    if n == 0 {
                        return None;
                    }
                    pending.extend_from_slice(&buf[..n]);
                }
            }
        }
    }

    /// Send a request and return the final response to it (provisional ones are skipped;
    /// requests from the server in between are answered 200 and skipped).
    pub async fn transact(&mut self, text: &str) -> String {
        self.send(text).await;
        let cseq = header(text, "CSeq").unwrap_or_default().to_owned();
        loop {
            let msg = self
                .recv(Duration::from_secs(10))
                .await
                .unwrap_or_else(|| panic!("no response to:\n{text}"));
            match status_code(&msg) {
                Some(code) if code >= 200 && header(&msg, "CSeq") == Some(cseq.as_str()) => {
                    return msg;
                }
                Some(_) => continue,
                None => {
                    let ok = super::uac::response_to(&msg, 200, "OK");
                    self.send(&ok).await;
                }
            }
        }
    }

    /// Send a fresh (unauthenticated) REGISTER with `extra` headers; the final response.
    pub async fn register_plain(&mut self, extra: &str) -> String {
        let text = self.register_text(extra);
        self.transact(&text).await
    }

    /// REGISTER with `extra` headers, answering one challenge (the first whose algorithm is
    /// `algorithm`). Returns the final response.
    pub async fn register(&mut self, extra: &str, algorithm: &str) -> String {
        let first = self.register_text(extra);
        let resp = self.transact(&first).await;
        if status_code(&resp) != Some(401) {
            return resp;
        }
        let c = challenges(&resp)
            .into_iter()
            .find(|c| c.algorithm.eq_ignore_ascii_case(algorithm))
            .unwrap_or_else(|| panic!("no {algorithm} challenge in:\n{resp}"));
        self.challenge = Some(c);
        self.nc = 0;
        self.register_again(extra).await
    }

    /// REGISTER answering the last challenge with the next nonce count.
    pub async fn register_again(&mut self, extra: &str) -> String {
        let text = self.authorized_register(extra);
        self.transact(&text).await
    }

    /// A REGISTER answering the last challenge with the next nonce count (not sent).
    pub fn authorized_register(&mut self, extra: &str) -> String {
        let c = self.challenge.clone().expect("a challenge first");
        self.nc += 1;
        let auth = authorization(
            &c,
            &self.user,
            &self.password,
            "REGISTER",
            &self.request_uri(),
            self.nc,
            "0a4f113b",
        );
        self.register_text(&format!("Authorization: {auth}\r\n{extra}"))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The first number of the seeded inventory (`+254700000001`).
pub const FIRST_INVENTORY_ID: &str = "01900000-0000-7000-8000-000000000001";

/// Claim inventory number `inventory_id`: the tenant number's id.
pub async fn claim(api: &super::Api, inventory_id: &str) -> String {
    let claimed = api
        .post(&format!("/v1/numbers/{inventory_id}/claim"), None)
        .await;
    assert_eq!(claimed.status, 201, "{}", claimed.text);
    claimed.json()["id"].as_str().unwrap().to_owned()
}

/// A new SIP credential of the number: (id, username, password).
pub async fn new_credential(
    api: &super::Api,
    number_id: &str,
    label: &str,
) -> (String, String, String) {
    let r = api
        .post(
            &format!("/v1/numbers/{number_id}/sip-credentials"),
            Some(serde_json::json!({"label": label})),
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

/// The number's registrations as the API lists them.
pub async fn registrations(api: &super::Api, number_id: &str) -> Vec<serde_json::Value> {
    let r = api
        .get(&format!("/v1/numbers/{number_id}/registrations"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json().as_array().cloned().expect("a list")
}
