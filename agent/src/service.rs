//! The SPIFFE Workload API service: header check → caller attestation (once
//! per connection, liveness re-checked per call) → entries → SVID cache →
//! response. Status codes follow the spec and are chosen here only:
//!
//! | condition | code |
//! |---|---|
//! | missing/incorrect `workload.spiffe.io` header, empty mandatory field, bad token | InvalidArgument |
//! | no entry matches the caller (also mid-stream after an entry change) | PermissionDenied |
//! | agent starting/stopping, attestation could not run | Unavailable |
//! | the caller process exited or changed since it connected | Unauthenticated |
//! | WIT-SVID profile | Unimplemented |

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use futures_util::Stream;
use tessera_attestor::{AttestError, AttestedPeer, WorkloadAttestor};
use tessera_workload_api as pb;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::authority::{TrustBundle, X509Svid};
use crate::entries::{EntrySet, Identity};
use crate::metrics::{Metrics, OpenStream};
use crate::peer_conn::PeerConnection;
use crate::svid_cache::SvidCache;

/// Shared state of a running agent that the API needs.
pub struct AgentState {
    pub attestor: WorkloadAttestor,
    pub entries: watch::Receiver<EntrySet>,
    pub cache: Arc<SvidCache>,
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
    pub shutdown: CancellationToken,
    /// Per-caller request budget (Workload API calls and exchange requests).
    pub limiter: crate::rate_limit::RateLimiter,
}

/// Why a caller could not be identified, independent of the transport.
#[derive(Debug)]
pub enum CallerError {
    /// The agent is starting or stopping.
    NotReady,
    /// The process that connected exited, or its PID now names another process.
    Gone,
    /// Attestation could not run (e.g. /proc unreadable, kubelet down).
    Failed(String),
}

impl From<CallerError> for Status {
    fn from(e: CallerError) -> Self {
        match e {
            CallerError::NotReady => Status::unavailable("agent is not ready"),
            CallerError::Gone => {
                Status::unauthenticated("could not verify existence of the original caller")
            }
            CallerError::Failed(m) => {
                Status::unavailable(format!("workload attestation failed: {m}"))
            }
        }
    }
}

impl AgentState {
    /// Attests the caller of `request` (cached per connection) and re-checks
    /// that the process is still the one that connected.
    pub async fn caller<T>(&self, request: &Request<T>) -> Result<Arc<AttestedPeer>, Status> {
        let conn = request
            .extensions()
            .get::<PeerConnection>()
            .ok_or_else(|| Status::internal("missing peer information"))?;
        if !self.within_budget(conn) {
            return Err(Status::resource_exhausted(
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

    /// The transport-independent part of [`Self::caller`], also used by the
    /// token exchange socket.
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
                self.metrics.attestations.get_or_create(&crate::metrics::ResultLabels { result: label }).inc();
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
                    CallerError::Failed(e.to_string())
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

fn no_identity() -> Status {
    Status::permission_denied("no identity issued")
}

pub struct WorkloadApi {
    state: Arc<AgentState>,
}

impl WorkloadApi {
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }

    fn record<T>(&self, method: &'static str, started: Instant, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.state.metrics.record_rpc(method, code, started);
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
        F: FnOnce(Arc<AgentState>, Arc<AttestedPeer>, StreamSender<M>, Instant) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let started = Instant::now();
        let result = async {
            pb::check_security_header(request.metadata())?;
            let peer = self.state.caller(request).await?;
            if self.state.identities(&peer).is_empty() {
                return Err(no_identity());
            }
            let state = self.state.clone();
            Ok(self.stream_of(method, move |out| body(state, peer, out, started)))
        }
        .await;
        self.record(method, started, &result);
        result.map(|s| Response::new(Box::pin(s) as BoxStream<M>))
    }

    /// Runs `body` as the stream: it gets a sender and must send the first
    /// message as soon as it can. The stream ends only with an error status
    /// (client gone aside): PermissionDenied when identities vanish,
    /// Unavailable on shutdown.
    ///
    /// `body` runs inside the stream itself (see [`Generated`]), polled by
    /// the HTTP/2 stream that carries it, not as a task of its own feeding a
    /// channel: an idle stream is then one boxed future, which is most of
    /// what a Workload API stream costs in memory. When the client resets
    /// the stream, the transport drops it, and `body` with it.
    fn stream_of<M, F, Fut>(
        &self,
        method: &'static str,
        body: F,
    ) -> impl Stream<Item = Result<M, Status>> + Send + 'static
    where
        M: Send + 'static,
        F: FnOnce(StreamSender<M>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let slot = Arc::new(std::sync::Mutex::new(None));
        let body = body(StreamSender {
            slot: slot.clone(),
            shutdown: self.state.shutdown.clone(),
        });
        Generated {
            slot,
            body: Some(Box::pin(body)),
            _open: OpenStream::new(&self.state.metrics, method),
        }
    }
}

/// The hand-over between a stream body and its consumer: one message at a
/// time, boxed so the slot stays pointer-sized while the stream idles.
type Slot<M> = Arc<std::sync::Mutex<Option<Box<Result<M, Status>>>>>;

fn take<M>(slot: &Slot<M>) -> Option<Result<M, Status>> {
    slot.lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .map(|b| *b)
}

/// A stream produced by an async body that hands each message over through
/// a one-message [`Slot`]: `poll_next` polls the body until it has put a
/// message there (then returns it) or is waiting for something else (then
/// the body's wakers are the transport's). Backpressure is the transport's:
/// the body's `send` completes only once the message has been taken, which
/// is when the transport asks for the next one.
struct Generated<M, Fut> {
    slot: Slot<M>,
    /// None once the body has returned.
    body: Option<Pin<Box<Fut>>>,
    _open: OpenStream,
}

impl<M, Fut: std::future::Future<Output = ()>> Stream for Generated<M, Fut> {
    type Item = Result<M, Status>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        // Every field is Unpin (the body is boxed), so the pin can be dropped.
        let this = self.get_mut();
        if let Some(item) = take(&this.slot) {
            return Poll::Ready(Some(item));
        }
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        if body.as_mut().poll(cx).is_ready() {
            this.body = None;
            return Poll::Ready(take(&this.slot));
        }
        match take(&this.slot) {
            Some(item) => Poll::Ready(Some(item)),
            None => Poll::Pending,
        }
    }
}

/// Sends stream messages, giving up when the agent stops. (A client that
/// leaves drops the stream, and the sender's body with it.)
pub struct StreamSender<M> {
    slot: Slot<M>,
    shutdown: CancellationToken,
}

impl<M> StreamSender<M> {
    fn put(&self, item: Result<M, Status>) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(item));
    }

    /// Hands `item` to the stream and waits until it is taken; false when
    /// the agent is stopping instead. Not an `async fn`: the item goes into
    /// the slot at once, so it is not also carried in the future (whose
    /// size every idle stream would pay).
    fn send(&self, item: Result<M, Status>) -> impl std::future::Future<Output = bool> + '_ {
        self.put(item);
        self.taken()
    }

    async fn taken(&self) -> bool {
        let taken = std::future::poll_fn(|_| {
            // No waker needed: only the consumer empties the slot, and it
            // polls the body again right after.
            if self
                .slot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
            {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        });
        tokio::select! {
            biased;
            _ = taken => true,
            _ = self.shutdown.cancelled() => {
                self.put(Err(Status::unavailable("agent is shutting down")));
                false
            }
        }
    }

    /// Waits until the agent stops, then queues the final shutdown status.
    async fn ended(&self) {
        self.shutdown.cancelled().await;
        self.put(Err(Status::unavailable("agent is shutting down")));
    }
}

type BoxStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

/// What woke a stream task.
enum Wake {
    Ended,
    Entries,
    Update,
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
        federated_bundles: HashMap::new(),
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
        self.open_stream("FetchX509Bundles", &request, |state, peer, out, _| {
            bundle_stream(state, peer, out, |td, b| pb::X509BundlesResponse {
                crl: Vec::new(),
                bundles: HashMap::from([(td, b.x509.clone())]),
            })
        })
        .await
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.open_stream("FetchJWTBundles", &request, |state, peer, out, _| {
            bundle_stream(state, peer, out, |td, b| pb::JwtBundlesResponse {
                bundles: HashMap::from([(td, b.jwks.clone())]),
            })
        })
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
            let mut identities = self.state.identities(&peer);
            if let Some(wanted) = &wanted {
                identities.retain(|i| &i.spiffe_id == wanted);
            }
            if identities.is_empty() {
                return Err(no_identity());
            }
            let mut svids = Vec::with_capacity(identities.len());
            for ident in identities {
                let jwt = self
                    .state
                    .cache
                    .jwt(&ident.spiffe_id, &req.audience, ident.jwt_ttl)
                    .await
                    .map_err(|e| Status::unavailable(format!("could not sign JWT-SVID: {e}")))?;
                svids.push(pb::Jwtsvid {
                    spiffe_id: ident.spiffe_id.to_string(),
                    svid: jwt.token,
                    hint: ident.hint.unwrap_or_default(),
                });
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
            self.state.caller(&request).await?;
            let req = request.get_ref();
            if req.audience.is_empty() {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            if req.svid.is_empty() {
                return Err(Status::invalid_argument("svid must be specified"));
            }
            let (id, claims) = self
                .state
                .cache
                .authority()
                .validate_jwt(&req.svid, &req.audience)
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
        pb::check_security_header(request.metadata())?;
        Err(Status::unimplemented(
            "the WIT-SVID profile is not supported",
        ))
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        pb::check_security_header(request.metadata())?;
        Err(Status::unimplemented(
            "the WIT-SVID profile is not supported",
        ))
    }
}

/// Waits for whichever comes first: stream end, an entry change, or a change
/// of any SVID or the bundle.
async fn next_wake<M>(
    out: &StreamSender<M>,
    entries: &mut watch::Receiver<EntrySet>,
    bundle: &mut watch::Receiver<Arc<TrustBundle>>,
    svids: &mut [watch::Receiver<Option<Arc<X509Svid>>>],
) -> Wake {
    let any_svid = async {
        if svids.is_empty() {
            std::future::pending::<()>().await;
        }
        let changes = svids.iter_mut().map(|rx| Box::pin(rx.changed()));
        let _ = futures_util::future::select_all(changes).await;
    };
    tokio::select! {
        _ = out.ended() => Wake::Ended,
        r = entries.changed() => if r.is_ok() { Wake::Entries } else { Wake::Ended },
        r = bundle.changed() => if r.is_ok() { Wake::Update } else { Wake::Ended },
        _ = any_svid => Wake::Update,
    }
}

async fn x509_svid_stream(
    state: Arc<AgentState>,
    peer: Arc<AttestedPeer>,
    out: StreamSender<pb::X509svidResponse>,
    started: Instant,
) {
    let mut entries = state.entries.clone();
    let mut bundle_rx = state.cache.authority().subscribe_bundle();
    let mut first = true;
    'identities: loop {
        let identities = entries.borrow_and_update().identities_for(&peer.selectors);
        if identities.is_empty() {
            out.send(Err(no_identity())).await;
            return;
        }
        let mut rxs = Vec::with_capacity(identities.len());
        for ident in &identities {
            match state
                .cache
                .subscribe(&ident.spiffe_id, ident.x509_ttl)
                .await
            {
                Ok(rx) => rxs.push(rx),
                Err(e) => {
                    out.send(Err(Status::unavailable(format!(
                        "could not issue X509-SVID: {e}"
                    ))))
                    .await;
                    return;
                }
            }
        }
        loop {
            let svids: Vec<Arc<X509Svid>> = rxs
                .iter_mut()
                .filter_map(|rx| rx.borrow_and_update().clone())
                .collect();
            if svids.len() != identities.len() {
                out.send(Err(Status::unavailable("SVID not yet available")))
                    .await;
                return;
            }
            if svids.iter().any(|s| state.cache.is_expired(s)) {
                // Wait for the renewal instead of sending an expired SVID
                // (the wall clock jumped, or the signer was away).
                state.cache.renew_due_now();
                match next_wake(&out, &mut entries, &mut bundle_rx, &mut rxs).await {
                    Wake::Ended => return,
                    Wake::Entries => continue 'identities,
                    Wake::Update => continue,
                }
            }
            let bundle = bundle_rx.borrow_and_update().clone();
            if !first && !still_the_caller(&peer, &out).await {
                return;
            }
            if !out
                .send(Ok(x509_response(&identities, &svids, &bundle)))
                .await
            {
                return;
            }
            if first {
                first = false;
                state
                    .metrics
                    .rpc_seconds
                    .get_or_create(&crate::metrics::MethodLabels {
                        method: "FetchX509SVID.first",
                    })
                    .observe(started.elapsed().as_secs_f64());
            }
            match next_wake(&out, &mut entries, &mut bundle_rx, &mut rxs).await {
                Wake::Ended => return,
                Wake::Entries => continue 'identities,
                Wake::Update => {}
            }
        }
    }
}

/// Before a stream sends an update (a renewed SVID, a new bundle), the
/// process that opened it must still be the one that connected: otherwise a
/// connection inherited by another program would keep receiving fresh keys.
/// Ends the stream with Unauthenticated if not.
async fn still_the_caller<M>(peer: &AttestedPeer, out: &StreamSender<M>) -> bool {
    match peer.check_alive() {
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

async fn bundle_stream<M: Send + PartialEq + 'static>(
    state: Arc<AgentState>,
    peer: Arc<AttestedPeer>,
    out: StreamSender<M>,
    build: impl Fn(String, &TrustBundle) -> M,
) {
    let mut entries = state.entries.clone();
    let mut bundle_rx = state.cache.authority().subscribe_bundle();
    let td = state.cache.authority().trust_domain().id_string();
    let mut last: Option<M> = None;
    loop {
        if last.is_some() && !still_the_caller(&peer, &out).await {
            return;
        }
        if entries
            .borrow_and_update()
            .identities_for(&peer.selectors)
            .is_empty()
        {
            out.send(Err(no_identity())).await;
            return;
        }
        let message = build(td.clone(), &bundle_rx.borrow_and_update());
        // Identical consecutive bundles are not re-sent.
        if last.as_ref() != Some(&message) {
            let copy = build(td.clone(), &bundle_rx.borrow());
            if !out.send(Ok(message)).await {
                return;
            }
            last = Some(copy);
        }
        if let Wake::Ended = next_wake(&out, &mut entries, &mut bundle_rx, &mut []).await {
            return;
        }
    }
}
