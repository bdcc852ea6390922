//! Who is calling, whatever the socket: a connection's process attested
//! once (and re-checked for liveness on every later request), its request
//! budget, and the identities the registration entries give it. The
//! Workload API and the token exchange both ask here, so a rule added here
//! holds on every socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tessera_attestor::{AttestError, AttestedPeer, WorkloadAttestor};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::entries::{EntrySet, Identity};
use crate::metrics::{Metrics, ResultLabels};
use crate::rate_limit::RateLimiter;
use crate::transport::PeerConnection;

pub struct Callers {
    pub attestor: WorkloadAttestor,
    pub entries: watch::Receiver<EntrySet>,
    pub metrics: Arc<Metrics>,
    /// Set once every socket is serving; cleared never (shutdown is below).
    pub ready: AtomicBool,
    pub shutdown: CancellationToken,
    /// Per-caller request budget (Workload API calls and exchange requests).
    pub limiter: RateLimiter,
}

/// Why a caller could not be identified, independent of the transport.
#[derive(Debug, thiserror::Error)]
pub enum CallerError {
    /// The agent is starting or stopping.
    #[error("agent is not ready")]
    NotReady,
    /// The process that connected exited, or its PID now names another process.
    #[error("could not verify existence of the original caller")]
    Gone,
    /// Attestation could not run (e.g. /proc unreadable, kubelet down).
    #[error("workload attestation failed: {0}")]
    Failed(#[source] AttestError),
}

impl Callers {
    /// Takes one request from the calling process's budget.
    pub fn within_budget(&self, conn: &PeerConnection) -> bool {
        // Callers in a PID namespace we cannot see share one bucket.
        let allowed = self.limiter.allow(conn.peer.pid.unwrap_or(-1));
        if !allowed {
            self.metrics.rate_limited.inc();
        }
        allowed
    }

    /// Attests the connection's process (once per connection) and re-checks
    /// that it is still the process that connected.
    pub async fn attest_connection(
        &self,
        conn: &PeerConnection,
    ) -> Result<Arc<AttestedPeer>, CallerError> {
        if !self.ready.load(Ordering::Acquire) || self.shutdown.is_cancelled() {
            return Err(CallerError::NotReady);
        }
        let mut fresh = false;
        let attested = conn
            .attested
            .get_or_try_init(|| async {
                fresh = true;
                let result = self.attestor.attest(&conn.peer).await;
                let label = if result.is_ok() { "ok" } else { "error" };
                self.metrics
                    .attestations
                    .get_or_create(&ResultLabels { result: label })
                    .inc();
                result.map(Arc::new)
            })
            .await
            .map_err(|e| match e {
                AttestError::Liveness(e) => {
                    tracing::info!(pid = ?conn.peer.pid, error = %e, "caller failed liveness check");
                    CallerError::Gone
                }
                e => {
                    tracing::warn!(pid = ?conn.peer.pid, error = %e, "workload attestation failed");
                    CallerError::Failed(e)
                }
            })?
            .clone();
        if fresh {
            // `attest` has just re-checked the process after reading /proc.
            return Ok(attested);
        }
        attested.check_alive().map_err(|e| {
            tracing::info!(pid = attested.process.pid, error = %e, "caller failed liveness check");
            CallerError::Gone
        })?;
        Ok(attested)
    }

    pub fn identities(&self, peer: &AttestedPeer) -> Vec<Identity> {
        self.entries.borrow().identities_for(&peer.selectors)
    }
}
