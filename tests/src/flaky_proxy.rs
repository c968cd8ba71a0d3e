//! A TCP proxy in front of a server a consumer depends on (PostgreSQL, Redis)
//! that a test can take down, every connection cut and new ones closed at once,
//! and bring back: an outage without stopping the shared server.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// The proxy; stops (and cuts what it carries) on drop.
pub struct FlakyProxy {
    /// Its port on 127.0.0.1.
    pub port: u16,
    down: Arc<AtomicBool>,
    kill: Arc<watch::Sender<u64>>,
    task: JoinHandle<()>,
}

impl FlakyProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let port = listener.local_addr()?.port();
        let down = Arc::new(AtomicBool::new(false));
        let kill = Arc::new(watch::channel(0u64).0);
        let (d, k) = (down.clone(), kill.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    break;
                };
                if d.load(Ordering::SeqCst) {
                    let _ = client.shutdown().await;
                    continue;
                }
                let mut killed = k.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = killed.changed() => {}
                    }
                });
            }
        });
        Ok(Self {
            port,
            down,
            kill,
            task,
        })
    }

    /// Down: every open connection is cut and new ones are closed at once.
    /// Up: connections are forwarded again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.kill.send_modify(|g| *g += 1);
        }
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.kill.send_modify(|g| *g += 1);
    }
}
