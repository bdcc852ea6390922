//! The one accept loop for every agent socket.
//!
//! Workloads are untrusted: a caller may open thousands of connections. At
//! most `max_connections` are held at once; past that a new connection is
//! closed at once (and `on_refused` is called), so a flood cannot exhaust
//! the agent's descriptors or memory. Accept errors (out of descriptors and
//! the like) are logged and retried after a pause, never fatal. The
//! caller's credentials are read here, at accept time, while the process
//! that connected surely exists.

use std::sync::Arc;
use std::time::Duration;

use tessera_attestor::ProcRoot;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::peer::PeerConnection;

/// How long to pause after a failed `accept` before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// An accepted connection.
pub struct Accepted {
    pub stream: UnixStream,
    /// None when the kernel would not give the peer's credentials; each
    /// protocol decides what such a caller gets (nothing, in practice).
    pub peer: Option<PeerConnection>,
    /// Held for the connection's life: its share of the connection cap.
    pub slot: OwnedSemaphorePermit,
}

pub struct Acceptor {
    listener: UnixListener,
    slots: Arc<Semaphore>,
    proc_root: ProcRoot,
    on_refused: Box<dyn Fn() + Send + Sync>,
}

impl Acceptor {
    pub fn new(
        listener: UnixListener,
        proc_root: ProcRoot,
        max_connections: usize,
        on_refused: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(max_connections)),
            proc_root,
            on_refused: Box::new(on_refused),
        }
    }

    /// The next connection within the cap.
    pub async fn accept(&self) -> Accepted {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; pausing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                (self.on_refused)();
                continue; // dropping the stream closes it
            };
            let peer = match PeerConnection::from_stream(&stream, &self.proc_root) {
                Ok(peer) => Some(peer),
                Err(e) => {
                    tracing::warn!(error = %e, "connection without peer credentials");
                    None
                }
            };
            return Accepted { stream, peer, slot };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn reads_credentials_and_refuses_past_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let refused = Arc::new(AtomicUsize::new(0));
        let counter = refused.clone();
        let acceptor = Acceptor::new(
            UnixListener::bind(&path).unwrap(),
            ProcRoot::new("/proc"),
            1,
            move || {
                counter.fetch_add(1, Ordering::SeqCst);
            },
        );
        let _first = UnixStream::connect(&path).await.unwrap();
        let held = acceptor.accept().await;
        let peer = held.peer.as_ref().expect("credentials of a local peer");
        assert_eq!(peer.peer.pid, Some(std::process::id() as i32));

        // Over the cap: closed at once and counted; the held one stays.
        let mut second = UnixStream::connect(&path).await.unwrap();
        let _third = UnixStream::connect(&path).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(300), acceptor.accept()).await;
        assert!(
            waited.is_err(),
            "nothing is accepted while the cap is reached"
        );
        assert_eq!(refused.load(Ordering::SeqCst), 2);
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        assert_eq!(
            second.read(&mut buf).await.unwrap(),
            0,
            "closed by the agent"
        );

        drop(held);
        let _fourth = UnixStream::connect(&path).await.unwrap();
        let after = tokio::time::timeout(Duration::from_secs(5), acceptor.accept())
            .await
            .expect("a slot frees when a connection ends");
        assert!(after.peer.is_some());
    }
}
