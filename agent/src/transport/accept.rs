//! The one accept loop for every agent socket.
//!
//! Workloads are untrusted: a caller may open thousands of connections. At
//! most [`ConnectionCaps::total`] are held at once, and of those at most
//! `per_uid` from one user and `per_process` from one process, so one
//! caller can never take every slot and others always find room. A
//! connection past a cap is closed at once (and `on_refused` is called).
//! Accept errors (out of descriptors and the like) are logged and retried
//! after a pause, never fatal. The caller's credentials are read here, at
//! accept time, while the process that connected surely exists.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tessera_attestor::ProcRoot;
use tokio::net::UnixListener;
#[cfg(test)]
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::conn::{Listener, UnixConn};
use super::peer::PeerConnection;
use crate::sync::Mutex;

/// How many connections a socket holds: in all, per user, per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    pub total: usize,
    pub per_uid: usize,
    pub per_process: usize,
}

impl ConnectionCaps {
    /// `total`, with the per-caller shares given or derived from it (three
    /// quarters per user, a quarter per process), never above `total`.
    pub fn new(total: usize, per_uid: Option<usize>, per_process: Option<usize>) -> Self {
        let total = total.max(1);
        let per_uid = per_uid.unwrap_or(total * 3 / 4).clamp(1, total);
        let per_process = per_process.unwrap_or(total / 4).clamp(1, per_uid);
        Self {
            total,
            per_uid,
            per_process,
        }
    }
}

/// Who holds how many connections.
#[derive(Default)]
struct Holders {
    /// Callers without credentials count as one user, `u32::MAX`.
    by_uid: HashMap<u32, usize>,
    by_pid: HashMap<i32, usize>,
}

/// One caller's hold on a connection, given back when it closes.
struct Share {
    holders: Arc<Mutex<Holders>>,
    uid: u32,
    pid: Option<i32>,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut h = self.holders.lock();
        release(&mut h.by_uid, self.uid);
        if let Some(pid) = self.pid {
            release(&mut h.by_pid, pid);
        }
    }
}

fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

/// A connection's place under the caps, held for its life.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _share: Share,
}

/// How long to pause after a failed `accept` before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// An accepted connection.
pub struct Accepted {
    pub stream: UnixConn,
    /// None when the kernel would not give the peer's credentials; each
    /// protocol decides what such a caller gets (nothing, in practice).
    pub peer: Option<PeerConnection>,
    /// Held for the connection's life: its place under the caps.
    pub slot: Slot,
}

pub struct Acceptor {
    listener: Listener,
    slots: Arc<Semaphore>,
    caps: ConnectionCaps,
    holders: Arc<Mutex<Holders>>,
    proc_root: ProcRoot,
    on_refused: Box<dyn Fn() + Send + Sync>,
}

impl Acceptor {
    pub fn new(
        listener: UnixListener,
        proc_root: ProcRoot,
        caps: ConnectionCaps,
        on_refused: impl Fn() + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        Ok(Self {
            listener: Listener::new(listener)?,
            slots: Arc::new(Semaphore::new(caps.total)),
            caps,
            holders: Arc::default(),
            proc_root,
            on_refused: Box::new(on_refused),
        })
    }

    /// Takes a share for a caller, unless it holds its part already.
    fn share(&self, peer: Option<&PeerConnection>) -> Option<Share> {
        let uid = peer.map_or(u32::MAX, |p| p.peer.uid);
        let pid = peer.and_then(|p| p.peer.pid);
        let mut h = self.holders.lock();
        let by_uid = h.by_uid.get(&uid).copied().unwrap_or(0);
        let by_pid = pid.map_or(0, |pid| h.by_pid.get(&pid).copied().unwrap_or(0));
        if by_uid >= self.caps.per_uid || by_pid >= self.caps.per_process {
            return None;
        }
        *h.by_uid.entry(uid).or_default() += 1;
        if let Some(pid) = pid {
            *h.by_pid.entry(pid).or_default() += 1;
        }
        Some(Share {
            holders: self.holders.clone(),
            uid,
            pid,
        })
    }

    /// The next connection within the cap.
    pub async fn accept(&self) -> Accepted {
        loop {
            let stream = match self.listener.accept().await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; pausing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
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
            let Some(share) = self.share(peer.as_ref()) else {
                (self.on_refused)();
                continue;
            };
            let slot = Slot {
                _permit: permit,
                _share: share,
            };
            let stream = match UnixConn::new(stream) {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "could not register an accepted connection; pausing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
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
            ConnectionCaps::new(1, None, None),
            move || {
                counter.fetch_add(1, Ordering::SeqCst);
            },
        )
        .unwrap();
        let _first = UnixStream::connect(&path).await.unwrap();
        let held = acceptor.accept().await;
        let peer = held.peer.as_ref().expect("credentials of a local peer");
        assert_eq!(peer.peer.pid, Some(std::process::id() as i32));

        // Over the cap: closed at once and counted; the held one stays.
        let mut second = UnixStream::connect(&path).await.unwrap();
        let _third = UnixStream::connect(&path).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(1500), acceptor.accept()).await;
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

    #[test]
    fn caps_derive_per_caller_shares_and_never_exceed_the_total() {
        assert_eq!(
            ConnectionCaps::new(16_384, None, None),
            ConnectionCaps {
                total: 16_384,
                per_uid: 12_288,
                per_process: 4_096
            }
        );
        let small = ConnectionCaps::new(3, None, None);
        assert_eq!((small.per_uid, small.per_process), (2, 1));
        let given = ConnectionCaps::new(10, Some(50), Some(50));
        assert_eq!((given.per_uid, given.per_process), (10, 10));
    }

    #[tokio::test]
    async fn one_process_gets_its_share_and_others_keep_room() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let acceptor = Acceptor::new(
            UnixListener::bind(&path).unwrap(),
            ProcRoot::new("/proc"),
            ConnectionCaps::new(4, Some(4), Some(2)),
            || {},
        )
        .unwrap();
        let _a = UnixStream::connect(&path).await.unwrap();
        let _b = UnixStream::connect(&path).await.unwrap();
        let mut c = UnixStream::connect(&path).await.unwrap();
        let first = acceptor.accept().await;
        let _second = acceptor.accept().await;
        // The third from this process is over its share: closed at once.
        let waited = tokio::time::timeout(Duration::from_millis(1500), acceptor.accept()).await;
        assert!(waited.is_err());
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1];
        assert_eq!(c.read(&mut buf).await.unwrap(), 0, "closed by the agent");
        // A share comes back when its connection closes.
        drop(first);
        let _d = UnixStream::connect(&path).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), acceptor.accept())
            .await
            .expect("the share was given back");
    }
}
