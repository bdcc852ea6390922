//! What the accept loop learns about a connection: the caller's kernel
//! credentials (and executable, while the process surely exists), plus a
//! slot for the attestation result, filled by the first request and kept for
//! the connection's life.

use std::sync::Arc;

use tessera_attestor::{AttestedPeer, PeerError, PeerInfo, ProcRoot};
use tokio::sync::OnceCell;

/// Per-connection facts, available in every request's extensions.
#[derive(Clone, Debug)]
pub struct PeerConnection {
    pub peer: PeerInfo,
    /// Filled by the first request on this connection (attestation is lazy,
    /// so the accept loop never waits on /proc or hashing).
    pub attested: Arc<OnceCell<Arc<AttestedPeer>>>,
    /// Open requests and streams, for closing the connection when idle.
    pub activity: Arc<super::idle::Activity>,
}

impl PeerConnection {
    /// Reads the peer's kernel credentials (SO_PEERCRED and a pidfd) and
    /// notes its executable.
    pub fn from_stream(
        stream: &impl std::os::fd::AsFd,
        proc_root: &ProcRoot,
    ) -> Result<Self, PeerError> {
        let mut peer = PeerInfo::from_socket(stream)?;
        peer.record_exe(proc_root);
        Ok(Self {
            peer,
            attested: Arc::new(OnceCell::new()),
            activity: super::idle::Activity::new(),
        })
    }
}
