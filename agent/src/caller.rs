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

/// The gRPC status of a caller that could not be identified, on every gRPC
/// service of the socket (Workload API, SDS).
impl From<CallerError> for tonic::Status {
    fn from(e: CallerError) -> Self {
        match e {
            CallerError::NotReady => tonic::Status::unavailable(e.to_string()),
            CallerError::Gone => tonic::Status::unauthenticated(e.to_string()),
            CallerError::Failed(_) => tonic::Status::unavailable(e.to_string()),
        }
    }
}

impl Callers {
    /// The caller of a gRPC request on the Workload API socket: one request
    /// from its budget, then its attestation (cached per connection, with
    /// the liveness re-check).
    pub async fn grpc_caller<T>(
        &self,
        request: &tonic::Request<T>,
    ) -> Result<Arc<AttestedPeer>, tonic::Status> {
        let conn = request
            .extensions()
            .get::<PeerConnection>()
            .ok_or_else(|| tonic::Status::internal("missing peer information"))?;
        if !self.within_budget(conn) {
            return Err(tonic::Status::resource_exhausted(
                "too many requests from this process; slow down",
            ));
        }
        Ok(self.attest_connection(conn).await?)
    }

    /// Takes one request from the calling process's budget.
    pub fn within_budget(&self, conn: &PeerConnection) -> bool {
        // Callers in a PID namespace we cannot see share one bucket.
        let allowed = self.limiter.allow(conn.peer.pid.unwrap_or(-1));
        if !allowed {
            self.metrics.rate_limited.inc();
        }
        allowed
    }

    /// Takes one request from the budget of an already attested caller (a
    /// message on a stream it opened).
    pub fn within_budget_of(&self, peer: &AttestedPeer) -> bool {
        let allowed = self.limiter.allow(peer.process.pid);
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

/// The status for a caller no entry matches (also mid-stream, after an
/// entry change), on the Workload API and SDS alike.
pub fn no_identity() -> tonic::Status {
    tonic::Status::permission_denied("no identity issued")
}

/// Before a stream sends an update (a renewed SVID, a new bundle), the
/// process that opened it must still be the one that connected: otherwise a
/// connection inherited by another program would keep receiving fresh keys.
/// The status that ends the stream if not. `release` names the update's
/// content (0: always check; see [`AttestedPeer::check_alive_to_release`]).
pub fn stream_caller_gone(peer: &AttestedPeer, release: u64) -> Option<tonic::Status> {
    let e = peer.check_alive_to_release(release).err()?;
    tracing::info!(pid = peer.process.pid, error = %e, "stream caller failed liveness check; ending the stream");
    Some(tonic::Status::unauthenticated(
        "could not verify existence of the original caller",
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tessera_attestor::{PeerInfo, ProcRoot, Selector, UnixAttestor, UnixAttestorConfig};

    use super::*;
    use crate::entries::{Entry, IdTemplate};
    use crate::rate_limit::Budget;

    const ROOMY: Budget = Budget {
        rate: 1000.0,
        burst: 1000.0,
    };

    fn uid() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    fn entry(id: &str, selectors: &[&str], hint: Option<&str>) -> Entry {
        Entry {
            template: IdTemplate::parse(id).unwrap(),
            selectors: selectors
                .iter()
                .map(|s| Selector::parse(s).unwrap())
                .collect(),
            hint: hint.map(str::to_string),
            x509_ttl: Duration::from_secs(3600),
            jwt_ttl: Duration::from_secs(300),
            wit_ttl: Duration::from_secs(3600),
            federates_with: Default::default(),
        }
    }

    fn callers(entries: Vec<Entry>, budget: Budget) -> Callers {
        // No path discovery: hashing the test binary is slow and beside the point.
        let unix = UnixAttestor::new(UnixAttestorConfig {
            discover_workload_path: false,
            workload_size_limit: 0,
        });
        let (_, entries) = watch::channel(EntrySet::new(entries));
        Callers {
            attestor: WorkloadAttestor::new(ProcRoot::new("/proc"), vec![Arc::new(unix)]),
            entries,
            metrics: Arc::new(Metrics::new()),
            ready: AtomicBool::new(true),
            shutdown: CancellationToken::new(),
            limiter: RateLimiter::new(budget),
        }
    }

    /// This process, as the other end of a real Unix socket sees it.
    fn own_connection() -> (PeerConnection, tokio::net::UnixStream) {
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let conn = PeerConnection::from_stream(&ours, &ProcRoot::new("/proc")).unwrap();
        (conn, theirs)
    }

    fn connection_of(pid: Option<i32>) -> PeerConnection {
        PeerConnection {
            peer: PeerInfo {
                pid,
                uid: uid(),
                gid: nix::unistd::getegid().as_raw(),
                pidfd: None,
                exe_at_accept: None,
            },
            attested: Arc::default(),
            activity: crate::transport::idle::Activity::new(),
        }
    }

    fn attestations(c: &Callers, result: &'static str) -> u64 {
        c.metrics
            .attestations
            .get_or_create(&ResultLabels { result })
            .get()
    }

    #[tokio::test]
    async fn callers_are_not_ready_before_ready_is_set() {
        let c = callers(Vec::new(), ROOMY);
        c.ready.store(false, Ordering::Release);
        let (conn, _other_end) = own_connection();
        assert!(matches!(
            c.attest_connection(&conn).await,
            Err(CallerError::NotReady)
        ));
        assert!(conn.attested.get().is_none(), "nothing was attested");
        assert_eq!(attestations(&c, "ok") + attestations(&c, "error"), 0);
    }

    #[tokio::test]
    async fn callers_are_not_ready_once_shutdown_begins() {
        let c = callers(Vec::new(), ROOMY);
        let (conn, _other_end) = own_connection();
        c.attest_connection(&conn).await.unwrap();
        c.shutdown.cancel();
        // Even an already attested connection is refused.
        assert!(matches!(
            c.attest_connection(&conn).await,
            Err(CallerError::NotReady)
        ));
    }

    #[tokio::test]
    async fn attesting_this_process_yields_its_uid_and_gid() {
        let c = callers(Vec::new(), ROOMY);
        let (conn, _other_end) = own_connection();
        let peer = c.attest_connection(&conn).await.unwrap();
        assert_eq!(peer.process.pid, std::process::id() as i32);
        assert!(
            peer.selectors
                .contains(&Selector::new("unix:uid", uid().to_string())),
            "{:?}",
            peer.selectors
        );
        let gid = nix::unistd::getegid().as_raw().to_string();
        assert!(peer.selectors.contains(&Selector::new("unix:gid", gid)));
        assert_eq!(attestations(&c, "ok"), 1);
    }

    #[tokio::test]
    async fn later_calls_on_a_connection_reuse_its_attestation() {
        let c = callers(Vec::new(), ROOMY);
        let (conn, _other_end) = own_connection();
        let first = c.attest_connection(&conn).await.unwrap();
        assert!(Arc::ptr_eq(conn.attested.get().unwrap(), &first));
        // Each request sees a clone of the connection's facts: it shares the cache.
        let second = c.attest_connection(&conn.clone()).await.unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(attestations(&c, "ok"), 1, "attested once");
    }

    #[tokio::test]
    async fn a_caller_without_a_visible_pid_fails_and_is_not_cached() {
        let c = callers(Vec::new(), ROOMY);
        let conn = connection_of(None);
        assert!(matches!(
            c.attest_connection(&conn).await,
            Err(CallerError::Failed(AttestError::NoPid))
        ));
        assert!(conn.attested.get().is_none());
        assert_eq!(attestations(&c, "error"), 1);
    }

    #[tokio::test]
    async fn a_caller_that_exited_since_attestation_is_gone() {
        let c = callers(Vec::new(), ROOMY);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep(1)");
        let conn = connection_of(Some(child.id() as i32));
        let attested = c.attest_connection(&conn).await;
        child.kill().unwrap();
        child.wait().unwrap();
        attested.unwrap();
        assert!(matches!(
            c.attest_connection(&conn).await,
            Err(CallerError::Gone)
        ));
    }

    #[tokio::test]
    async fn within_budget_refuses_once_the_budget_is_spent() {
        let c = callers(
            Vec::new(),
            Budget {
                rate: 0.001,
                burst: 2.0,
            },
        );
        let (conn, _other_end) = own_connection();
        assert!(c.within_budget(&conn));
        assert!(c.within_budget(&conn));
        assert_eq!(c.metrics.rate_limited.get(), 0);
        assert!(!c.within_budget(&conn));
        assert!(!c.within_budget(&conn));
        assert_eq!(c.metrics.rate_limited.get(), 2);
        // Another process has a budget of its own.
        assert!(c.within_budget(&connection_of(Some(1))));
    }

    #[tokio::test]
    async fn callers_without_a_visible_pid_share_one_budget() {
        let c = callers(
            Vec::new(),
            Budget {
                rate: 0.001,
                burst: 1.0,
            },
        );
        assert!(c.within_budget(&connection_of(None)));
        assert!(!c.within_budget(&connection_of(None)));
        assert_eq!(c.metrics.rate_limited.get(), 1);
    }

    #[tokio::test]
    async fn identities_are_the_entries_matching_the_caller() {
        let me = uid();
        let c = callers(
            vec![
                entry(
                    "spiffe://example.org/me",
                    &[&format!("unix:uid:{me}")],
                    Some("me"),
                ),
                entry(
                    "spiffe://example.org/someone-else",
                    &[&format!("unix:uid:{}", me.wrapping_add(1))],
                    None,
                ),
                entry("spiffe://example.org/uid/{unix:uid}", &["unix:uid"], None),
                entry(
                    "spiffe://example.org/needs-k8s",
                    &[&format!("unix:uid:{me}"), "k8s:ns:prod"],
                    None,
                ),
            ],
            ROOMY,
        );
        let (conn, _other_end) = own_connection();
        let peer = c.attest_connection(&conn).await.unwrap();
        let ids: Vec<String> = c
            .identities(&peer)
            .iter()
            .map(|i| i.spiffe_id.to_string())
            .collect();
        assert_eq!(
            ids,
            [
                "spiffe://example.org/me".to_string(),
                format!("spiffe://example.org/uid/{me}"),
            ]
        );
        assert_eq!(c.identities(&peer)[0].hint.as_deref(), Some("me"));
    }
}
