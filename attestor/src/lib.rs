//! Who is calling: the facts Tessera learns about a local process that
//! connects to one of its Unix sockets, without the process presenting any
//! secret.
//!
//! The flow for one connection:
//! 1. [`PeerInfo::from_socket`] captures the kernel's `SO_PEERCRED` and pins the
//!    process with a pidfd (`SO_PEERPIDFD`, or `pidfd_open` on older kernels).
//! 2. [`WorkloadAttestor::attest`] records the process start time, runs every
//!    configured [`Attestor`] (the Unix one reads `/proc`), then re-checks that
//!    the pinned process is still the same one. A process that exited, or a PID
//!    now owned by another process, gets no selectors.
//! 3. The selectors are cached per connection by the caller, and
//!    [`AttestedPeer::check_alive`] is repeated on every RPC.

// Unsafe code only in `pidfd` (one ioctl the kernel offers no safe call
// for; see the module).
#![deny(unsafe_code)]

pub mod cgroup;
mod k8s;
pub mod kubelet;
mod liveness;
mod peer;
#[allow(unsafe_code)]
mod pidfd;
pub mod pods;
mod procfs;
mod selector;
mod unix;

pub use k8s::{K8sAttestor, K8sAttestorConfig};
pub use liveness::{LivenessError, ProcessPin};
pub use peer::{PeerError, PeerInfo};
pub use procfs::{ProcError, ProcRoot};
pub use selector::{Selector, SelectorError, SelectorSet};
pub use unix::{UnixAttestor, UnixAttestorConfig};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a caller could not be attested.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("caller has no visible PID (is the agent in the host PID namespace?)")]
    NoPid,
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Liveness(#[from] LivenessError),
    #[error("attestor {attestor}: {message}")]
    Attestor {
        attestor: &'static str,
        message: String,
    },
}

/// A boxed future, so attestors can be stored as trait objects.
pub type AttestFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Selector>, AttestError>> + Send + 'a>>;

/// The process an attestor looks at.
#[derive(Debug, Clone)]
pub struct ProcessRef {
    pub pid: i32,
    /// Kernel-reported credentials at `connect()` time.
    pub uid: u32,
    pub gid: u32,
}

/// One source of selectors (Unix facts, Kubernetes pod facts, ...).
///
/// Attestors only read; they must not trust anything the workload can forge
/// when a kernel-controlled source exists.
pub trait Attestor: Send + Sync {
    /// The selector prefix this attestor produces, e.g. `unix`.
    fn name(&self) -> &'static str;
    /// Produce selectors for the process. Slow work (hashing, network) should
    /// not block the async runtime.
    fn attest<'a>(&'a self, process: &'a ProcessRef, proc_root: &'a ProcRoot) -> AttestFuture<'a>;
}

/// Runs the attestors for a connected peer with PID-reuse protection.
#[derive(Clone)]
pub struct WorkloadAttestor {
    proc_root: ProcRoot,
    attestors: Vec<Arc<dyn Attestor>>,
}

/// A caller whose selectors are known, with the pin used to re-check that it is
/// still the same process.
#[derive(Debug)]
pub struct AttestedPeer {
    pub process: ProcessRef,
    pub selectors: SelectorSet,
    pin: ProcessPin,
    /// The last release (see [`Self::check_alive_to_release`]) the re-check
    /// passed for; 0 for none.
    released: AtomicU64,
    /// The selectors as `type:value` strings, made at the first request
    /// that needs them (the exchange's policy and audit record), once per
    /// connection rather than per request.
    rendered: std::sync::OnceLock<Vec<String>>,
}

impl AttestedPeer {
    /// The selectors as `type:value` strings, sorted.
    pub fn selector_strings(&self) -> &[String] {
        self.rendered
            .get_or_init(|| self.selectors.iter().map(|s| s.to_string()).collect())
    }

    /// Fails if the attested process exited or its PID now names another process.
    pub fn check_alive(&self) -> Result<(), LivenessError> {
        self.pin.check_alive()
    }

    /// [`Self::check_alive`] before this connection is sent `release`, a
    /// non-zero key naming the content (e.g. a digest of a renewed SVID's
    /// private key): checked once per release, not once per stream. A
    /// connection holding many streams gets the same renewal on each of
    /// them; once the check has passed for one, the content is in that
    /// connection already, so whoever holds the connection learns nothing
    /// new from the others, and checking again could only refuse what it
    /// already has. Content not yet released is always checked.
    pub fn check_alive_to_release(&self, release: u64) -> Result<(), LivenessError> {
        if release != 0 && self.released.load(Ordering::Acquire) == release {
            return Ok(());
        }
        self.pin.check_alive()?;
        self.released.store(release, Ordering::Release);
        Ok(())
    }
}

impl WorkloadAttestor {
    pub fn new(proc_root: ProcRoot, attestors: Vec<Arc<dyn Attestor>>) -> Self {
        Self {
            proc_root,
            attestors,
        }
    }

    pub fn proc_root(&self) -> &ProcRoot {
        &self.proc_root
    }

    /// Attest a peer: pin it, collect selectors from every attestor, re-check.
    ///
    /// If any attestor fails the whole attestation fails: a partial selector set
    /// could match a broader entry than the caller deserves.
    pub async fn attest(&self, peer: &PeerInfo) -> Result<AttestedPeer, AttestError> {
        let pid = peer.pid.filter(|p| *p > 0).ok_or(AttestError::NoPid)?;
        let process = ProcessRef {
            pid,
            uid: peer.uid,
            gid: peer.gid,
        };
        let pidfd = peer.pidfd.clone();
        let pin = match peer.exe_at_accept {
            // An `exec` since accept fails the re-check below.
            Some(exe) => ProcessPin::since_accept(&self.proc_root, pid, peer.uid, pidfd, exe)?,
            None => ProcessPin::new(&self.proc_root, pid, peer.uid, pidfd)?,
        };
        let mut selectors = Vec::new();
        for attestor in &self.attestors {
            match attestor.attest(&process, &self.proc_root).await {
                Ok(found) => selectors.extend(found),
                Err(e) => {
                    // A caller that exited makes /proc reads fail: that is
                    // a liveness failure (Unauthenticated), not an attestor
                    // fault (Unavailable).
                    pin.check_alive()?;
                    return Err(e);
                }
            }
        }
        // The facts above were read from /proc/<pid>; they only describe the
        // caller if <pid> still names the process that connected.
        pin.check_alive()?;
        Ok(AttestedPeer {
            process,
            selectors: SelectorSet::new(selectors),
            pin,
            released: AtomicU64::new(0),
            rendered: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_release_is_checked_once_and_new_content_always() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep(1) is available");
        let pid = child.id() as i32;
        let pidfd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(pid).unwrap(),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap();
        let peer = PeerInfo {
            pid: Some(pid),
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            pidfd: Some(Arc::new(pidfd)),
            exe_at_accept: None,
        };
        let attested = WorkloadAttestor::new(ProcRoot::default(), Vec::new())
            .attest(&peer)
            .await
            .unwrap();
        attested.check_alive_to_release(7).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        // What passed the check once is not checked again on this connection…
        attested.check_alive_to_release(7).unwrap();
        // …but anything else is, and the caller is gone.
        assert!(matches!(
            attested.check_alive_to_release(8),
            Err(LivenessError::Exited { .. })
        ));
        assert!(attested.check_alive_to_release(0).is_err());
        assert!(attested.check_alive().is_err());
    }
}
