//! What every Workload API call serves from, and what a stream starts from.

use std::sync::Arc;

use tessera_attestor::AttestedPeer;
use tokio::sync::watch;
use tonic::Status;

use crate::caller::Callers;
use crate::entries::{EntrySet, Identity};
use crate::identity::{SvidCache, TrustBundle};
use crate::sync::wakers::WakerSet;

/// What the Workload API serves from.
pub struct ApiState {
    pub callers: Arc<Callers>,
    pub cache: Arc<SvidCache>,
    /// Woken when the entries or the trust bundle change, or the agent
    /// begins to stop: the node-wide changes every stream looks at.
    pub(super) changes: Arc<WakerSet>,
}

impl ApiState {
    /// Must be called within the runtime: it starts the task that turns the
    /// node-wide changes into wake-ups of [`ApiState::changes`]. The task
    /// ends when the agent stops.
    pub fn new(callers: Arc<Callers>, cache: Arc<SvidCache>) -> Arc<Self> {
        let changes = WakerSet::new();
        tokio::spawn(forward_changes(
            callers.entries.clone(),
            cache.trust_store().subscribe(),
            callers.shutdown.clone(),
            changes.clone(),
        ));
        Arc::new(Self {
            callers,
            cache,
            changes,
        })
    }

    /// Attests the caller of `request` (cached per connection) and re-checks
    /// that the process is still the one that connected.
    pub(super) async fn caller<T>(
        &self,
        request: &tonic::Request<T>,
    ) -> Result<Arc<AttestedPeer>, Status> {
        self.callers.grpc_caller(request).await
    }
}

/// One task for all streams, instead of one future per stream on each of
/// these receivers: an idle stream then waits with a waker only.
async fn forward_changes(
    mut entries: watch::Receiver<EntrySet>,
    mut bundle: watch::Receiver<Arc<TrustBundle>>,
    shutdown: tokio_util::sync::CancellationToken,
    changes: Arc<WakerSet>,
) {
    loop {
        let more = tokio::select! {
            r = entries.changed() => r.is_ok(),
            r = bundle.changed() => r.is_ok(),
            () = shutdown.cancelled() => false,
        };
        // After the change: a stream woken now sees it.
        changes.wake_all();
        if !more {
            return;
        }
    }
}

/// A streaming call's caller, entitled: the entries as they were matched
/// when it opened (its receiver has seen that version), and the identities
/// they gave.
pub(super) struct Opened {
    pub peer: Arc<AttestedPeer>,
    pub entries: watch::Receiver<EntrySet>,
    pub identities: Vec<Identity>,
}

/// Every identity the caller matches was refused by the fleet authority: a
/// decision, not an outage, so the client is not told to retry.
pub(super) fn refused_all(reasons: &[String]) -> Status {
    Status::permission_denied(format!(
        "no identity issued: the fleet authority refused {}",
        reasons.join("; ")
    ))
}
