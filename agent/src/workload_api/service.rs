//! The SPIFFE Workload API service: header check → caller attestation (once
//! per connection, liveness re-checked per call) → entries → SVID cache →
//! response. Status codes follow the spec and are chosen here only:
//!
//! | condition | code |
//! |---|---|
//! | missing/incorrect `workload.spiffe.io` header, empty mandatory field, bad token | InvalidArgument |
//! | no entry matches the caller (also mid-stream after an entry change) | PermissionDenied |
//! | the fleet authority refuses every identity the caller matches | PermissionDenied |
//! | agent starting/stopping, attestation could not run | Unavailable |
//! | the caller process exited or changed since it connected | Unauthenticated |
//! | WIT-SVID profile asked of an agent whose signer has no WIT-SVID keys (a fleet authority without `wit.key`) | Unimplemented |
//! | FetchWITSVID for a `spiffe_id` the caller has no entry for | PermissionDenied |

use std::collections::HashMap;
use std::sync::Arc;
use tokio::time::Instant;

use tessera_attestor::AttestedPeer;
use tessera_workload_api as pb;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::caller::Callers;
use crate::entries::{EntrySet, Identity, federated_domains};
use crate::identity::{ForeignBundle, SignError, SvidCache, TrustBundle, WitSvid, X509Svid};
use crate::metrics::OpenStream;
use crate::transport::grpc_stream::{self as stream, BoxStream, Outcome, StreamSender};

/// What the Workload API serves from.
pub struct ApiState {
    pub callers: Arc<Callers>,
    pub cache: Arc<SvidCache>,
}

impl ApiState {
    /// Attests the caller of `request` (cached per connection) and re-checks
    /// that the process is still the one that connected.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Arc<AttestedPeer>, Status> {
        self.callers.grpc_caller(request).await
    }
}

fn no_identity() -> Status {
    Status::permission_denied("no identity issued")
}

/// Every identity the caller matches was refused by the fleet authority: a
/// decision, not an outage, so the client is not told to retry.
fn refused_all(reasons: &[String]) -> Status {
    Status::permission_denied(format!(
        "no identity issued: the fleet authority refused {}",
        reasons.join("; ")
    ))
}

pub struct WorkloadApi {
    state: Arc<ApiState>,
}

impl WorkloadApi {
    pub fn new(state: Arc<ApiState>) -> Self {
        Self { state }
    }

    fn record<T>(&self, method: &'static str, started: Instant, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.state.callers.metrics.record_rpc(method, code, started);
    }

    /// The common start of every streaming RPC: header, caller, entitlement
    /// (a caller with no identity gets neither SVIDs nor bundles), then the
    /// stream `body`.
    async fn open_stream<T, M, F, Fut>(
        &self,
        method: &'static str,
        request: &Request<T>,
        body: F,
    ) -> Result<Response<BoxStream<M>>, Status>
    where
        M: Send + 'static,
        F: FnOnce(Arc<ApiState>, Arc<AttestedPeer>, Opened, StreamSender<M>, Instant) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let started = Instant::now();
        let result = async {
            pb::check_security_header(request.metadata())?;
            let peer = self.state.caller(request).await?;
            // The entries are matched once here; the stream starts from this
            // match and re-matches only when they change.
            let mut entries = self.state.callers.entries.clone();
            let identities = entries.borrow_and_update().identities_for(&peer.selectors);
            if identities.is_empty() {
                return Err(no_identity());
            }
            let state = self.state.clone();
            let opened = Opened {
                entries,
                identities,
            };
            let metrics = &self.state.callers.metrics;
            Ok(stream::generated(
                move |out| body(state, peer, opened, out, started),
                self.state.callers.shutdown.clone(),
                OpenStream::new(metrics, method),
                Outcome {
                    metrics: metrics.clone(),
                    method,
                    started,
                },
            ))
        }
        .await;
        // A stream's outcome is recorded when its first message is known.
        if result.is_err() {
            self.record(method, started, &result);
        }
        result.map(|s| Response::new(Box::pin(s) as BoxStream<M>))
    }
}

/// What a stream starts from: the entries as they were matched when it
/// opened (its receiver has seen that version), and the identities they gave.
struct Opened {
    entries: watch::Receiver<EntrySet>,
    identities: Vec<Identity>,
}

/// What woke a stream task.
enum Wake {
    Ended,
    Entries,
    /// The trust bundle (own or federated) changed.
    Bundle,
    /// An SVID changed.
    Update,
}

/// The own trust domain's bundle (keyed by its SPIFFE ID) and those of the
/// foreign domains `identities` federate with, by `pick`.
fn bundle_map<V>(
    td: &str,
    identities: &[Identity],
    bundle: &TrustBundle,
    own: impl FnOnce(&TrustBundle) -> V,
    foreign: impl Fn(&ForeignBundle) -> V,
) -> HashMap<String, V> {
    let mut map = federated_map(identities, bundle, foreign);
    map.insert(td.to_string(), own(bundle));
    map
}

/// The bundles of the foreign domains `identities` federate with, keyed by
/// their trust domain's SPIFFE ID (`spiffe://<name>`, as SPIRE keys them).
fn federated_map<V>(
    identities: &[Identity],
    bundle: &TrustBundle,
    pick: impl Fn(&ForeignBundle) -> V,
) -> HashMap<String, V> {
    bundle
        .federated_for(federated_domains(identities))
        .into_iter()
        .map(|b| (b.trust_domain.id_string(), pick(b)))
        .collect()
}

/// Whether a workload holding `identities` sees the same in `old` and
/// `new`: its own trust domain's bundle and the foreign bundles it
/// federates with (compared by identity: a foreign bundle is replaced whole
/// when its keys change).
fn same_view(identities: &[Identity], old: &TrustBundle, new: &TrustBundle) -> bool {
    old.sequence == new.sequence
        && federated_domains(identities).all(|d| {
            match (old.federated.get(d), new.federated.get(d)) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
        })
}

fn x509_response(
    identities: &[Identity],
    svids: &[Arc<X509Svid>],
    bundle: &TrustBundle,
) -> pb::X509svidResponse {
    pb::X509svidResponse {
        svids: identities
            .iter()
            .zip(svids)
            .map(|(ident, svid)| pb::X509svid {
                spiffe_id: ident.spiffe_id.to_string(),
                x509_svid: svid.chain_der.clone(),
                x509_svid_key: svid.key_pkcs8.clone(),
                bundle: bundle.x509.clone(),
                hint: ident.hint.clone().unwrap_or_default(),
            })
            .collect(),
        crl: Vec::new(),
        federated_bundles: federated_map(identities, bundle, |b| b.x509.clone()),
    }
}

#[tonic::async_trait]
impl pb::server::SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<pb::JwtBundlesResponse>;
    type FetchWITSVIDStream = BoxStream<pb::WitsvidResponse>;
    type FetchWITBundlesStream = BoxStream<pb::WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.open_stream("FetchX509SVID", &request, x509_svid_stream)
            .await
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.open_stream(
            "FetchX509Bundles",
            &request,
            |state, peer, opened, out, _| {
                bundle_stream(state, peer, opened, out, |td, ids, b| {
                    pb::X509BundlesResponse {
                        crl: Vec::new(),
                        bundles: bundle_map(td, ids, b, |b| b.x509.clone(), |f| f.x509.clone()),
                    }
                })
            },
        )
        .await
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.open_stream(
            "FetchJWTBundles",
            &request,
            |state, peer, opened, out, _| {
                bundle_stream(state, peer, opened, out, |td, ids, b| {
                    pb::JwtBundlesResponse {
                        bundles: bundle_map(td, ids, b, |b| b.jwks.clone(), |f| f.jwt_jwks.clone()),
                    }
                })
            },
        )
        .await
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let started = Instant::now();
        let result = async {
            pb::check_security_header(request.metadata())?;
            let peer = self.state.caller(&request).await?;
            let req = request.get_ref();
            if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            let wanted = match req.spiffe_id.as_str() {
                "" => None,
                id => Some(
                    spiffe::SpiffeId::new(id)
                        .map_err(|e| Status::invalid_argument(format!("invalid spiffe_id: {e}")))?,
                ),
            };
            let mut identities = self.state.callers.identities(&peer);
            if let Some(wanted) = &wanted {
                identities.retain(|i| &i.spiffe_id == wanted);
            }
            if identities.is_empty() {
                return Err(no_identity());
            }
            let mut svids = Vec::with_capacity(identities.len());
            let mut refused = Vec::new();
            for ident in identities {
                let jwt = match self
                    .state
                    .cache
                    .jwt(&ident.spiffe_id, &req.audience, ident.jwt_ttl)
                    .await
                {
                    Ok(jwt) => jwt,
                    Err(SignError::Refused(why)) => {
                        tracing::warn!(spiffe_id = %ident.spiffe_id, reason = %why, "the fleet authority refuses an identity the caller matches");
                        refused.push(why);
                        continue;
                    }
                    Err(e) => {
                        return Err(Status::unavailable(format!("could not sign JWT-SVID: {e}")));
                    }
                };
                svids.push(pb::Jwtsvid {
                    spiffe_id: ident.spiffe_id.to_string(),
                    svid: jwt.token,
                    hint: ident.hint.unwrap_or_default(),
                });
            }
            if svids.is_empty() {
                return Err(refused_all(&refused));
            }
            Ok(Response::new(pb::JwtsvidResponse { svids }))
        }
        .await;
        self.record("FetchJWTSVID", started, &result);
        result
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let started = Instant::now();
        let result = async {
            pb::check_security_header(request.metadata())?;
            let peer = self.state.caller(&request).await?;
            let req = request.get_ref();
            if req.audience.is_empty() {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            if req.svid.is_empty() {
                return Err(Status::invalid_argument("svid must be specified"));
            }
            // Tokens of foreign trust domains validate for callers whose
            // entries federate with them, as their bundles reach only them.
            let identities = self.state.callers.identities(&peer);
            let (id, claims) = self
                .state
                .cache
                .trust_store()
                .validate_jwt_trusting(&req.svid, &[&req.audience], federated_domains(&identities))
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Ok(Response::new(pb::ValidateJwtsvidResponse {
                spiffe_id: id.to_string(),
                claims: Some(pb::json_object_to_struct(&claims)),
            }))
        }
        .await;
        self.record("ValidateJWTSVID", started, &result);
        result
    }

    async fn fetch_witsvid(
        &self,
        request: Request<pb::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        const METHOD: &str = "FetchWITSVID";
        let started = Instant::now();
        if let Err(status) = self.wit_profile_served(&request) {
            let result = Err(status);
            self.record(METHOD, started, &result);
            return result;
        }
        let wanted = request.get_ref().spiffe_id.clone();
        self.open_stream(
            METHOD,
            &request,
            move |state, peer, opened, out, started| {
                wit_svid_stream(state, peer, opened, out, started, wanted)
            },
        )
        .await
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        const METHOD: &str = "FetchWITBundles";
        let started = Instant::now();
        if let Err(status) = self.wit_profile_served(&request) {
            let result = Err(status);
            self.record(METHOD, started, &result);
            return result;
        }
        self.open_stream(METHOD, &request, |state, peer, opened, out, _| {
            bundle_stream(state, peer, opened, out, wit_bundles_response)
        })
        .await
    }
}

impl WorkloadApi {
    /// The WIT-SVID profile's gate (Workload API spec §7): after the
    /// security header, a signer without WIT-SVID keys answers
    /// Unimplemented, which clients take as "not supported" and stop.
    fn wit_profile_served<T>(&self, request: &Request<T>) -> Result<(), Status> {
        pb::check_security_header(request.metadata())?;
        if self.state.cache.signer().serves_wit() {
            Ok(())
        } else {
            Err(Status::unimplemented(
                crate::identity::signer::WIT_UNSUPPORTED,
            ))
        }
    }
}

/// The WIT-SVID signing keys (`use` `wit-svid`) by trust domain SPIFFE ID:
/// this trust domain's, and those of the foreign domains `identities`
/// federate with that publish any.
fn wit_bundles_response(
    td: &str,
    identities: &[Identity],
    bundle: &TrustBundle,
) -> pb::WitBundlesResponse {
    let text = |jwks: &prost::bytes::Bytes| String::from_utf8_lossy(jwks).into_owned();
    let mut bundles: HashMap<String, String> = bundle
        .federated_for(federated_domains(identities))
        .into_iter()
        .filter(|b| !b.wit_keys.is_empty())
        .map(|b| (b.trust_domain.id_string(), text(&b.wit_jwks)))
        .collect();
    bundles.insert(td.to_string(), text(&bundle.wit_jwks));
    pb::WitBundlesResponse { bundles }
}

fn wit_response(identities: &[Identity], wits: &[Arc<WitSvid>]) -> pb::WitsvidResponse {
    pb::WitsvidResponse {
        svids: identities
            .iter()
            .zip(wits)
            .map(|(ident, wit)| pb::Witsvid {
                spiffe_id: ident.spiffe_id.to_string(),
                wit_svid: wit.token.clone(),
                wit_svid_key: wit.key_jwk.clone(),
                hint: ident.hint.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

/// The WIT-SVIDs of the caller's identities (or of the one it asked for),
/// default first, sent again whenever one is renewed (with a new key) or the
/// entries change.
async fn wit_svid_stream(
    state: Arc<ApiState>,
    peer: Arc<AttestedPeer>,
    opened: Opened,
    out: StreamSender<pb::WitsvidResponse>,
    started: Instant,
    wanted: String,
) {
    let wanted = match wanted.as_str() {
        "" => None,
        id => match spiffe::SpiffeId::new(id) {
            Ok(id) => Some(id),
            Err(e) => {
                out.send(Err(Status::invalid_argument(format!(
                    "invalid spiffe_id: {e}"
                ))))
                .await;
                return;
            }
        },
    };
    svid_stream::<WitKind>(state, peer, opened, out, started, wanted).await
}

/// What a WIT-SVID update releases (see [`release_key`]): a digest of the
/// private keys.
fn wit_release_key(wits: &[Arc<WitSvid>]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for wit in wits {
        wit.key_jwk.hash(&mut h);
    }
    h.finish().max(1)
}

/// Waits for whichever comes first: stream end, an entry change, or a change
/// of any SVID or of the bundle (when the stream watches it).
async fn next_wake<M, T>(
    out: &StreamSender<M>,
    entries: &mut watch::Receiver<EntrySet>,
    bundle: Option<&mut watch::Receiver<Arc<TrustBundle>>>,
    svids: &mut [watch::Receiver<Option<Arc<T>>>],
) -> Wake {
    let any_svid = async {
        if svids.is_empty() {
            std::future::pending::<()>().await;
        }
        let changes = svids.iter_mut().map(|rx| Box::pin(rx.changed()));
        let _ = futures_util::future::select_all(changes).await;
    };
    let bundle_changed = async {
        match bundle {
            Some(rx) => rx.changed().await.is_ok(),
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = out.ended() => Wake::Ended,
        r = entries.changed() => if r.is_ok() { Wake::Entries } else { Wake::Ended },
        r = bundle_changed => if r { Wake::Bundle } else { Wake::Ended },
        _ = any_svid => Wake::Update,
    }
}

async fn x509_svid_stream(
    state: Arc<ApiState>,
    peer: Arc<AttestedPeer>,
    opened: Opened,
    out: StreamSender<pb::X509svidResponse>,
    started: Instant,
) {
    svid_stream::<X509Kind>(state, peer, opened, out, started, None).await
}

/// One kind of SVID a stream serves ([`svid_stream`]): how an identity is
/// subscribed to it, when one has expired, and the message that carries
/// them.
trait SvidKind {
    type Svid: Send + Sync + 'static;
    type Message: Send + 'static;
    /// Names the kind in errors (`could not issue X509-SVID: ...`).
    const NAME: &'static str;
    /// The message when an identity has none yet.
    const NOT_READY: &'static str;
    /// The metric label of the first response's latency.
    const FIRST: &'static str;
    /// The message carries the trust bundle: a bundle change wakes the
    /// stream.
    const WITH_BUNDLE: bool;

    fn subscribe(
        state: &ApiState,
        ident: &Identity,
    ) -> impl std::future::Future<
        Output = Result<watch::Receiver<Option<Arc<Self::Svid>>>, SignError>,
    > + Send;
    fn expired(state: &ApiState, svid: &Self::Svid) -> bool;
    /// See [`release_key`].
    fn release_key(svids: &[Arc<Self::Svid>], bundle: &TrustBundle) -> u64;
    fn message(
        identities: &[Identity],
        svids: &[Arc<Self::Svid>],
        bundle: &TrustBundle,
    ) -> Self::Message;
}

struct X509Kind;

impl SvidKind for X509Kind {
    type Svid = X509Svid;
    type Message = pb::X509svidResponse;
    const NAME: &'static str = "X509-SVID";
    const NOT_READY: &'static str = "SVID not yet available";
    const FIRST: &'static str = "FetchX509SVID.first";
    const WITH_BUNDLE: bool = true;

    async fn subscribe(
        state: &ApiState,
        ident: &Identity,
    ) -> Result<watch::Receiver<Option<Arc<X509Svid>>>, SignError> {
        state
            .cache
            .subscribe(&ident.spiffe_id, ident.x509_ttl)
            .await
    }

    fn expired(state: &ApiState, svid: &X509Svid) -> bool {
        state.cache.is_expired(svid)
    }

    fn release_key(svids: &[Arc<X509Svid>], bundle: &TrustBundle) -> u64 {
        release_key(svids, bundle)
    }

    fn message(
        identities: &[Identity],
        svids: &[Arc<X509Svid>],
        bundle: &TrustBundle,
    ) -> pb::X509svidResponse {
        x509_response(identities, svids, bundle)
    }
}

struct WitKind;

impl SvidKind for WitKind {
    type Svid = WitSvid;
    type Message = pb::WitsvidResponse;
    const NAME: &'static str = "WIT-SVID";
    const NOT_READY: &'static str = "WIT-SVID not yet available";
    const FIRST: &'static str = "FetchWITSVID.first";
    const WITH_BUNDLE: bool = false;

    async fn subscribe(
        state: &ApiState,
        ident: &Identity,
    ) -> Result<watch::Receiver<Option<Arc<WitSvid>>>, SignError> {
        state
            .cache
            .subscribe_wit(&ident.spiffe_id, ident.wit_ttl)
            .await
    }

    fn expired(state: &ApiState, wit: &WitSvid) -> bool {
        state.cache.has_passed(wit.not_after)
    }

    fn release_key(wits: &[Arc<WitSvid>], _: &TrustBundle) -> u64 {
        wit_release_key(wits)
    }

    fn message(
        identities: &[Identity],
        wits: &[Arc<WitSvid>],
        _: &TrustBundle,
    ) -> pb::WitsvidResponse {
        wit_response(identities, wits)
    }
}

/// Streams the caller's SVIDs of kind `K` (of `wanted` only, when given),
/// default first: sent at once, again whenever one is renewed, the entries
/// change, or (for a kind that carries it) the bundle the workload sees
/// changes. An identity the fleet authority refuses is left out while
/// others remain.
async fn svid_stream<K: SvidKind>(
    state: Arc<ApiState>,
    peer: Arc<AttestedPeer>,
    opened: Opened,
    out: StreamSender<K::Message>,
    started: Instant,
    wanted: Option<spiffe::SpiffeId>,
) {
    let Opened {
        mut entries,
        mut identities,
    } = opened;
    let mut bundle_rx = state.cache.trust_store().subscribe();
    let mut first = true;
    'identities: loop {
        if let Some(wanted) = &wanted {
            identities.retain(|i| &i.spiffe_id == wanted);
        }
        if identities.is_empty() {
            out.send(Err(no_identity())).await;
            return;
        }
        let mut rxs = Vec::with_capacity(identities.len());
        let mut refused = Vec::new();
        let mut entitled = Vec::with_capacity(identities.len());
        for ident in identities {
            match K::subscribe(&state, &ident).await {
                Ok(rx) => {
                    rxs.push(rx);
                    entitled.push(ident);
                }
                // The fleet authority will not sign this one for this node:
                // serve the others rather than fail them all.
                Err(SignError::Refused(why)) => {
                    tracing::warn!(spiffe_id = %ident.spiffe_id, reason = %why, "the fleet authority refuses an identity the caller matches; serving its others");
                    refused.push(why);
                }
                Err(SignError::Unsupported(why)) => {
                    out.send(Err(Status::unimplemented(why))).await;
                    return;
                }
                Err(e) => {
                    out.send(Err(Status::unavailable(format!(
                        "could not issue {}: {e}",
                        K::NAME
                    ))))
                    .await;
                    return;
                }
            }
        }
        identities = entitled;
        if identities.is_empty() {
            out.send(Err(refused_all(&refused))).await;
            return;
        }
        loop {
            let svids: Vec<Arc<K::Svid>> = rxs
                .iter_mut()
                .filter_map(|rx| rx.borrow_and_update().clone())
                .collect();
            if svids.len() != identities.len() {
                out.send(Err(Status::unavailable(K::NOT_READY))).await;
                return;
            }
            if svids.iter().any(|s| K::expired(&state, s)) {
                // Wait for the renewal instead of sending an expired SVID
                // (the wall clock jumped, or the signer was away).
                state.cache.renew_due_now();
                let bundle_watch = K::WITH_BUNDLE.then_some(&mut bundle_rx);
                match next_wake(&out, &mut entries, bundle_watch, &mut rxs).await {
                    Wake::Ended => return,
                    Wake::Entries => {
                        identities = entries.borrow_and_update().identities_for(&peer.selectors);
                        continue 'identities;
                    }
                    Wake::Bundle | Wake::Update => continue,
                }
            }
            let bundle = bundle_rx.borrow_and_update().clone();
            if !first && !still_the_caller(&peer, &out, K::release_key(&svids, &bundle)).await {
                return;
            }
            if !out.send(Ok(K::message(&identities, &svids, &bundle))).await {
                return;
            }
            // The bundle this message carried: a change of a foreign bundle
            // the workload does not federate with wakes the stream but
            // sends nothing.
            let mut shown = bundle;
            if first {
                first = false;
                state
                    .callers
                    .metrics
                    .rpc_seconds
                    .get_or_create(&crate::metrics::MethodLabels { method: K::FIRST })
                    .observe(started.elapsed().as_secs_f64());
            }
            loop {
                let bundle_watch = K::WITH_BUNDLE.then_some(&mut bundle_rx);
                match next_wake(&out, &mut entries, bundle_watch, &mut rxs).await {
                    Wake::Ended => return,
                    Wake::Entries => {
                        identities = entries.borrow_and_update().identities_for(&peer.selectors);
                        continue 'identities;
                    }
                    Wake::Bundle
                        if !rxs.iter().any(|rx| rx.has_changed().unwrap_or(false))
                            && same_view(&identities, &shown, &bundle_rx.borrow()) =>
                    {
                        // Nothing this workload sees changed; the newer
                        // bundle is taken as the one shown.
                        shown = bundle_rx.borrow_and_update().clone();
                    }
                    Wake::Bundle | Wake::Update => break,
                }
            }
        }
    }
}

/// What an X509-SVID update releases, as a key for
/// [`AttestedPeer::check_alive_to_release`]: a digest of the private keys and
/// the bundle's sequence. A rotation pushed to many streams of one connection
/// is then checked once on that connection, not once per stream.
fn release_key(svids: &[Arc<X509Svid>], bundle: &TrustBundle) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bundle.sequence.hash(&mut h);
    for svid in svids {
        svid.key_pkcs8.hash(&mut h);
    }
    h.finish().max(1)
}

/// Before a stream sends an update (a renewed SVID, a new bundle), the
/// process that opened it must still be the one that connected: otherwise a
/// connection inherited by another program would keep receiving fresh keys.
/// Ends the stream with Unauthenticated if not. `release` names the update's
/// content (0: always check).
async fn still_the_caller<M>(peer: &AttestedPeer, out: &StreamSender<M>, release: u64) -> bool {
    match peer.check_alive_to_release(release) {
        Ok(()) => true,
        Err(e) => {
            tracing::info!(pid = peer.process.pid, error = %e, "stream caller failed liveness check; ending the stream");
            out.send(Err(Status::unauthenticated(
                "could not verify existence of the original caller",
            )))
            .await;
            false
        }
    }
}

/// A bundle stream: the own trust domain's bundle and those of the foreign
/// domains the caller's entries federate with, built by `build` from the
/// own trust domain's SPIFFE ID, the caller's identities and the bundle.
async fn bundle_stream<M: Send + PartialEq + 'static>(
    state: Arc<ApiState>,
    peer: Arc<AttestedPeer>,
    opened: Opened,
    out: StreamSender<M>,
    build: impl Fn(&str, &[Identity], &TrustBundle) -> M,
) {
    // Entitled at open (a caller with no identity gets no bundle either);
    // re-matched only when the entries change.
    let mut entries = opened.entries;
    let mut identities = opened.identities;
    let mut bundle_rx = state.cache.trust_store().subscribe();
    let td = state.cache.trust_store().trust_domain().id_string();
    let mut last: Option<M> = None;
    let mut entries_changed = false;
    loop {
        if last.is_some() && !still_the_caller(&peer, &out, 0).await {
            return;
        }
        if entries_changed {
            identities = entries.borrow_and_update().identities_for(&peer.selectors);
            if identities.is_empty() {
                out.send(Err(no_identity())).await;
                return;
            }
        }
        let message = build(&td, &identities, &bundle_rx.borrow_and_update());
        // Identical consecutive bundles are not re-sent.
        if last.as_ref() != Some(&message) {
            let copy = build(&td, &identities, &bundle_rx.borrow());
            if !out.send(Ok(message)).await {
                return;
            }
            last = Some(copy);
        }
        match next_wake::<_, X509Svid>(&out, &mut entries, Some(&mut bundle_rx), &mut []).await {
            Wake::Ended => return,
            Wake::Entries => entries_changed = true,
            Wake::Bundle | Wake::Update => entries_changed = false,
        }
    }
}
