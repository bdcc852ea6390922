//! SDS's two methods: who is asking (attestation, budget, entries, exactly
//! as on the Workload API), and the StreamSecrets body that keeps one Envoy
//! supplied. Status codes are chosen here and in [`super::resources`]:
//!
//! | condition | code |
//! |---|---|
//! | a name the caller may not have; a request for another resource type | InvalidArgument |
//! | `ALL` asked by an Envoy without the SPIFFE validator | FailedPrecondition |
//! | no entry matches the caller (also mid-stream after an entry change) | PermissionDenied |
//! | the fleet authority refuses an X509-SVID a name needs | PermissionDenied |
//! | agent starting/stopping, attestation could not run, SVID not issued | Unavailable |
//! | the caller process exited or changed since it connected | Unauthenticated |
//! | the caller's request budget is spent | ResourceExhausted |
//! | DeltaSecrets (as SPIRE) | Unimplemented |

use std::sync::Arc;

use tessera_attestor::AttestedPeer;
use tessera_workload_api::sds::{self, discovery};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::{Request, Status};

use super::bundles::BundleWatch;
use super::config::SdsConfig;
use super::resources;
use super::xds::Xds;
use crate::caller::{Callers, no_identity, stream_caller_gone};
use crate::entries::{EntrySet, Identity};
use crate::identity::{SignError, SvidCache, X509Svid};
use crate::metrics::{MethodLabels, OpenStream};
use crate::transport::grpc_frames::RequestMessages;
use crate::transport::grpc_stream::{self, BoxStream, Outcome, StreamSender};

/// What SDS serves from.
pub struct SdsState {
    pub callers: Arc<Callers>,
    pub cache: Arc<SvidCache>,
    pub config: SdsConfig,
}

pub struct Sds {
    state: Arc<SdsState>,
}

impl Sds {
    pub fn new(state: Arc<SdsState>) -> Self {
        Self { state }
    }

    /// FetchSecrets: one answer, no version or nonce (as SPIRE).
    pub async fn fetch_secrets(
        &self,
        request: Request<discovery::DiscoveryRequest>,
    ) -> Result<discovery::DiscoveryResponse, Status> {
        let started = Instant::now();
        let result = self.fetch(request).await;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.state
            .callers
            .metrics
            .record_rpc("FetchSecrets", code, started);
        result
    }

    async fn fetch(
        &self,
        request: Request<discovery::DiscoveryRequest>,
    ) -> Result<discovery::DiscoveryResponse, Status> {
        let state = &self.state;
        let peer = state.callers.grpc_caller(&request).await?;
        let identities = state.callers.identities(&peer);
        if identities.is_empty() {
            return Err(no_identity());
        }
        // The stream's rules for one request: type, node, names.
        let mut xds = Xds::new(&state.config);
        xds.receive(request.into_inner(), &state.config)?;
        let mut bundles = BundleWatch::new(state.cache.trust_store());
        let mut svids = Svids::default();
        loop {
            match Box::pin(prepare(state, &identities, &mut bundles, &mut svids, &xds)).await {
                Prepared::Resources(resources) => {
                    return Ok(discovery::DiscoveryResponse {
                        version_info: String::new(),
                        resources,
                        canary: false,
                        type_url: sds::SECRET_TYPE_URL.into(),
                        nonce: String::new(),
                    });
                }
                Prepared::Failed(status) => return Err(status),
                // Renewal was asked for; the caller's deadline bounds this.
                Prepared::Renewing => svids.changed().await,
            }
        }
    }

    /// Opens a StreamSecrets stream: the caller must be attested and hold
    /// an identity before anything is read from it; `requests` are its
    /// DiscoveryRequests.
    pub async fn stream_secrets(
        &self,
        request: Request<()>,
        requests: RequestMessages<discovery::DiscoveryRequest>,
    ) -> Result<BoxStream<discovery::DiscoveryResponse>, Status> {
        const METHOD: &str = "StreamSecrets";
        let started = Instant::now();
        let metrics = &self.state.callers.metrics;
        let opened = async {
            let peer = self.state.callers.grpc_caller(&request).await?;
            // Matched once here; re-matched only when the entries change.
            let mut entries = self.state.callers.entries.clone();
            let identities = entries.borrow_and_update().identities_for(&peer.selectors);
            if identities.is_empty() {
                return Err(no_identity());
            }
            Ok((peer, entries, identities))
        }
        .await;
        let (peer, entries, identities) = match opened {
            Ok(opened) => opened,
            Err(status) => {
                metrics.record_rpc(METHOD, status.code(), started);
                return Err(status);
            }
        };
        let state = self.state.clone();
        let stream = grpc_stream::generated(
            move |out| {
                secrets_stream(
                    state,
                    peer,
                    Opened {
                        entries,
                        identities,
                        requests,
                    },
                    out,
                    started,
                )
            },
            self.state.callers.shutdown.clone(),
            OpenStream::new(metrics, METHOD),
            Outcome {
                metrics: metrics.clone(),
                method: METHOD,
                started,
            },
        );
        Ok(Box::pin(stream))
    }
}

/// What a stream starts from.
struct Opened {
    entries: watch::Receiver<EntrySet>,
    identities: Vec<Identity>,
    requests: RequestMessages<discovery::DiscoveryRequest>,
}

/// The X509-SVIDs a stream's resources need, held as cache subscriptions.
#[derive(Default)]
struct Svids {
    held: Vec<(spiffe::SpiffeId, watch::Receiver<Option<Arc<X509Svid>>>)>,
}

impl Svids {
    /// Holds exactly the SVIDs of `needed`, issuing those nobody held yet.
    async fn hold(
        &mut self,
        cache: &SvidCache,
        needed: &[&Identity],
    ) -> Result<(), crate::identity::SignError> {
        self.held
            .retain(|(id, _)| needed.iter().any(|i| &i.spiffe_id == id));
        for ident in needed {
            if !self.held.iter().any(|(id, _)| *id == ident.spiffe_id) {
                let rx = cache.subscribe(&ident.spiffe_id, ident.x509_ttl).await?.rx;
                self.held.push((ident.spiffe_id.clone(), rx));
            }
        }
        Ok(())
    }

    fn current(&mut self, id: &spiffe::SpiffeId) -> Option<Arc<X509Svid>> {
        self.held
            .iter_mut()
            .find(|(held, _)| held == id)
            .and_then(|(_, rx)| rx.borrow_and_update().clone())
    }

    /// Resolves when any held SVID is replaced (never, when none is held).
    async fn changed(&mut self) {
        if self.held.is_empty() {
            return std::future::pending().await;
        }
        let changes = self.held.iter_mut().map(|(_, rx)| Box::pin(rx.changed()));
        let _ = futures_util::future::select_all(changes).await;
    }
}

/// The status for an X509-SVID that could not be issued. The fleet
/// authority's refusal is a decision, not an outage (as on the Workload
/// API): PermissionDenied, so Envoy backs off instead of hammering; any
/// other failure is Unavailable, which Envoy retries.
fn issue_failure(e: SignError) -> Status {
    match e {
        SignError::Refused(why) => Status::permission_denied(format!(
            "no identity issued: the fleet authority refused {why}"
        )),
        e => Status::unavailable(format!("could not issue X509-SVID: {e}")),
    }
}

enum Prepared {
    Resources(Vec<prost_types::Any>),
    /// An SVID had expired (a wall-clock jump, or the signer was away):
    /// renewal was asked for; nothing expired is ever sent.
    Renewing,
    Failed(Status),
}

/// The resources the current request names, from the current SVIDs and
/// bundles. Boxed by its callers: it runs at changes only, and an idle
/// stream should not be sized for it.
async fn prepare(
    state: &SdsState,
    identities: &[Identity],
    bundles: &mut BundleWatch,
    svids: &mut Svids,
    xds: &Xds,
) -> Prepared {
    let names = xds.names().unwrap_or_default();
    let visible = bundles.visible(identities);
    let wanted = match resources::resolve(names, identities, &visible, &state.config) {
        Ok(w) => w,
        Err(status) => return Prepared::Failed(status),
    };
    let needed: Vec<&Identity> = resources::needed_identities(&wanted)
        .into_iter()
        .map(|i| &identities[i])
        .collect();
    if let Err(e) = svids.hold(&state.cache, &needed).await {
        return Prepared::Failed(issue_failure(e));
    }
    let mut current = Vec::with_capacity(needed.len());
    for ident in &needed {
        match svids.current(&ident.spiffe_id) {
            None => return Prepared::Failed(Status::unavailable("SVID not yet available")),
            Some(svid) if state.cache.is_expired(&svid) => {
                state.cache.renew_due_now();
                return Prepared::Renewing;
            }
            Some(svid) => current.push(svid),
        }
    }
    let svid_of = |i: usize| {
        let id = &identities[i].spiffe_id;
        current.iter().find(|s| &s.spiffe_id == id).cloned()
    };
    match resources::build(&wanted, svid_of, &visible, xds.validation()) {
        Ok(resources) => Prepared::Resources(resources),
        Err(status) => Prepared::Failed(status),
    }
}

/// One Envoy's stream: answer its requests, push what changes.
async fn secrets_stream(
    state: Arc<SdsState>,
    peer: Arc<AttestedPeer>,
    opened: Opened,
    out: StreamSender<discovery::DiscoveryResponse>,
    started: Instant,
) {
    let Opened {
        mut entries,
        mut identities,
        mut requests,
    } = opened;
    let mut bundles = BundleWatch::new(state.cache.trust_store());
    let mut svids = Svids::default();
    let mut xds = Xds::new(&state.config);
    // The client asked (answer even if nothing changed) / something changed.
    let (mut asked, mut changed) = (false, false);
    loop {
        if xds.names().is_some() && (asked || changed) {
            match Box::pin(prepare(&state, &identities, &mut bundles, &mut svids, &xds)).await {
                Prepared::Resources(resources) => {
                    let first = !xds.has_responded();
                    if let Some(response) = xds.respond(resources, asked) {
                        if !first && !still_the_caller(&peer, &out).await {
                            return;
                        }
                        if !out.send(Ok(response)).await {
                            return;
                        }
                        if first {
                            state
                                .callers
                                .metrics
                                .rpc_seconds
                                .get_or_create(&MethodLabels {
                                    method: "StreamSecrets.first",
                                })
                                .observe(started.elapsed().as_secs_f64());
                        }
                    }
                    (asked, changed) = (false, false);
                }
                Prepared::Renewing => {}
                Prepared::Failed(status) => {
                    out.send(Err(status)).await;
                    return;
                }
            }
        }
        tokio::select! {
            request = requests.next() => match request {
                // The client closed its side: the stream ends (as SPIRE).
                None => return,
                Some(Err(status)) => {
                    out.send(Err(status)).await;
                    return;
                }
                Some(Ok(request)) => {
                    if !state.callers.within_budget_of(&peer) {
                        out.send(Err(Status::resource_exhausted(
                            "too many requests from this process; slow down",
                        )))
                        .await;
                        return;
                    }
                    match xds.receive(request, &state.config) {
                        Err(status) => {
                            out.send(Err(status)).await;
                            return;
                        }
                        Ok(None) => tracing::debug!(pid = peer.process.pid, "SDS request with a stale nonce ignored"),
                        Ok(Some(received)) => {
                            if let Some(reason) = received.rejected {
                                state.callers.metrics.sds_rejections.inc();
                                tracing::warn!(
                                    pid = peer.process.pid,
                                    names = ?xds.names().unwrap_or_default(),
                                    reason = %reason,
                                    "the SDS client rejected the secrets it was sent"
                                );
                            }
                            asked |= received.answer;
                        }
                    }
                }
            },
            alive = entries.changed() => {
                if alive.is_err() {
                    return;
                }
                identities = entries.borrow_and_update().identities_for(&peer.selectors);
                if identities.is_empty() {
                    out.send(Err(no_identity())).await;
                    return;
                }
                changed = true;
            }
            alive = bundles.changed() => {
                if !alive {
                    return;
                }
                changed = true;
            }
            () = svids.changed() => changed = true,
            () = out.ended() => return,
        }
    }
}

/// Before a stream pushes an update, the process that opened it must still
/// be the one that connected: otherwise a connection inherited by another
/// program would keep receiving fresh keys. Ends the stream with
/// Unauthenticated if not.
async fn still_the_caller<M>(peer: &AttestedPeer, out: &StreamSender<M>) -> bool {
    match stream_caller_gone(peer, 0) {
        None => true,
        Some(status) => {
            out.send(Err(status)).await;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_by_the_fleet_authority_is_permission_denied_an_outage_unavailable() {
        let refused = issue_failure(SignError::Refused("node not entitled".into()));
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.message().contains("node not entitled"));
        let outage = issue_failure(SignError::Remote("connection refused".into()));
        assert_eq!(outage.code(), tonic::Code::Unavailable);
        assert!(outage.message().contains("connection refused"));
        assert_eq!(
            issue_failure(SignError::NoKey).code(),
            tonic::Code::Unavailable
        );
    }
}
