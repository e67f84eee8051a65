//! A TCP proxy a test can cut, to take a database away from a running server and give it back:
//! `cut` drops every proxied connection and closes new ones at once (a database dying behind a
//! pooler or proxy); `refuse` drops every proxied connection and stops listening, so new ones
//! are refused (a stopped PostgreSQL on its own host); `restore` lets connections through again.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct CutProxy {
    addr: SocketAddr,
    target: SocketAddr,
    up: Arc<watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl CutProxy {
    pub async fn start(target: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let up = Arc::new(watch::Sender::new(true));
        let task = Some(tokio::spawn(serve(listener, target, up.clone())));
        CutProxy {
            addr,
            target,
            up,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// As `cut`, and the port is closed: connecting is refused.
    pub fn refuse(&mut self) {
        self.up.send_replace(false);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    pub async fn restore(&mut self) {
        self.up.send_replace(true);
        if self.task.is_none() {
            // The same port again (tokio binds with SO_REUSEADDR).
            let listener = TcpListener::bind(self.addr)
                .await
                .expect("bind proxy again");
            self.task = Some(tokio::spawn(serve(listener, self.target, self.up.clone())));
        }
    }
}

async fn serve(listener: TcpListener, target: SocketAddr, up: Arc<watch::Sender<bool>>) {
    while let Ok((client, _)) = listener.accept().await {
        if !*up.borrow() {
            drop(client);
            continue;
        }
        let mut cut = up.subscribe();
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(target).await else {
                return;
            };
            let mut client = client;
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = cut.wait_for(|up| !*up) => {}
            }
        });
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
