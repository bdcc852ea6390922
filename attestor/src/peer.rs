//! Kernel-reported identity of the process at the other end of a Unix socket.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::sys::socket::{getsockopt, sockopt};

/// What the kernel says about a connected peer, captured at accept time.
///
/// `SO_PEERCRED` is recorded by the kernel at `connect()`, so it names the
/// process that connected even if the socket was later passed elsewhere. The
/// pidfd pins that process: if it exits, the pidfd becomes readable, and a
/// recycled PID can never be confused with it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// `None` when the caller lives in a PID namespace the agent cannot see.
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
    pub pidfd: Option<Arc<OwnedFd>>,
    /// (device, inode) of the caller's executable when its connection was
    /// accepted (see [`Self::record_exe`]).
    pub exe_at_accept: Option<(u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("reading SO_PEERCRED: {0}")]
    PeerCred(#[source] nix::Error),
}

impl PeerInfo {
    /// Reads `SO_PEERCRED` and obtains a pidfd: `SO_PEERPIDFD` (Linux 6.5+) is
    /// race-free; on older kernels `pidfd_open` right away narrows the window,
    /// and the start-time check in [`crate::ProcessPin`] closes the rest.
    pub fn from_socket(socket: &impl AsFd) -> Result<Self, PeerError> {
        let cred = getsockopt(socket, sockopt::PeerCredentials).map_err(PeerError::PeerCred)?;
        let pid = (cred.pid() > 0).then_some(cred.pid());
        let pidfd = match getsockopt(socket, sockopt::PeerPidfd) {
            Ok(fd) => Some(fd),
            Err(_) => pid.and_then(|pid| {
                rustix::process::Pid::from_raw(pid).and_then(|pid| {
                    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
                })
            }),
        };
        Ok(Self {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
            pidfd: pidfd.map(Arc::new),
            exe_at_accept: None,
        })
    }

    /// Notes which program the caller runs right when its connection is
    /// accepted. Attestation is lazy (on the first call), so without this a
    /// process could connect, `exec` a registered binary, and hand the
    /// connection to its parent: attestation would then see the registered
    /// binary. With it, an executable that differs at attestation time makes
    /// the caller Unauthenticated. What remains is the window between
    /// `connect()` and `accept()`, which the kernel gives no way to close.
    pub fn record_exe(&mut self, proc_root: &crate::ProcRoot) {
        if let Some(pid) = self.pid.filter(|p| *p > 0) {
            self.exe_at_accept = crate::liveness::exe_inode(proc_root, pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_credentials_over_a_socketpair() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = PeerInfo::from_socket(&a).unwrap();
        assert_eq!(peer.pid, Some(std::process::id() as i32));
        assert_eq!(peer.uid, nix::unistd::geteuid().as_raw());
        assert!(
            peer.pidfd.is_some(),
            "kernel should give a pidfd for a live peer"
        );
    }
}
