//! The carrier trunk as a UDP socket of the test: what our INVITEs, CANCELs, BYEs and ACKs reach,
//! and where the test answers them from.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;

pub struct Trunk {
    sock: UdpSocket,
}

impl Trunk {
    pub async fn bind() -> Trunk {
        Trunk {
            sock: UdpSocket::bind("127.0.0.1:0").await.expect("trunk socket"),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.sock.local_addr().expect("the trunk's address")
    }

    /// `SAUTIKIT_OUTBOUND_TRUNK` for it.
    pub fn uri(&self) -> String {
        format!("sip:{}", self.addr())
    }

    pub async fn recv(&self, wait: Duration) -> Option<(String, SocketAddr)> {
        let mut buf = vec![0u8; 65_535];
        let (n, from) = tokio::time::timeout(wait, self.sock.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    }

    /// The next request of `method` (retransmissions and other requests skipped).
    pub async fn request(&self, method: &str) -> (String, SocketAddr) {
        loop {
            let (msg, from) = self
                .recv(Duration::from_secs(15))
                .await
                .unwrap_or_else(|| panic!("a {method} at the trunk"));
            if msg.starts_with(&format!("{method} ")) {
                return (msg, from);
            }
        }
    }

    pub async fn send(&self, text: &str, to: SocketAddr) {
        self.sock.send_to(text.as_bytes(), to).await.expect("send");
    }
}
