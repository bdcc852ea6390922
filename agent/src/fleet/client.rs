//! The agent's side of upstream mode.
//!
//! The agent proves its node once ([`Upstream::connect`]), then talks to the
//! authority over mTLS with its node SVID. It generates every workload key
//! itself and sends only CSRs; X.509 renewals arrive as one batch per
//! rotation pass. Replicas are tried in order from the last one that
//! answered, so losing one costs one failed connection. While no replica
//! answers, the SVID cache keeps serving what it has (and retries); this
//! client only reports the outage in metrics and readiness.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use prost::bytes::Bytes;
use rcgen::{CertificateParams, KeyPair, SanType};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::tls;
use super::wire::{self, BundleDoc};
use crate::clock::Clock;
use crate::identity::jws::PublicJwk;
use crate::identity::{
    ForeignBundle, JwtSvid, SignError, SignFuture, SignedWit, Signer, TrustStore, X509Svid,
};
use crate::metrics::{Metrics, ResultLabels};
use crate::sync::Mutex;
use crate::transport::https_client as http;

/// How the node proves itself to the authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAttestation {
    /// A projected service account token (re-read at every attestation).
    K8sPsat,
    /// A single-use join token; the node SVID is then kept on disk so a
    /// restart does not need a new token.
    JoinToken,
}

/// The `[upstream]` table, validated.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `host:port` of each replica (or one Service address), in order.
    pub addresses: Vec<String>,
    /// DNS name in the authority's serving certificate.
    pub server_name: String,
    /// PEM CA certificates to trust before the first bundle arrives.
    pub bundle_file: PathBuf,
    pub attestation: NodeAttestation,
    pub token_file: PathBuf,
    pub bundle_refresh: Duration,
    pub request_timeout: Duration,
    /// Where a join-token node keeps its node SVID (`data_dir`).
    pub state_dir: PathBuf,
}

const NODE_STATE_FILE: &str = "node-svid.json";

const REACH_UNKNOWN: u8 = 0;
const REACH_UP: u8 = 1;
const REACH_DOWN: u8 = 2;

/// A change of reachability worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReachChange {
    /// A replica answers again after none did.
    Back,
    /// No replica answers, at start or after one did.
    Lost,
}

/// What to log when the reachability state goes from `was` to `now`: the
/// first answer after start and a repeated state say nothing (before, a node
/// logged "reachable again" at start and before each failed attestation).
fn reach_change(was: u8, now: u8) -> Option<ReachChange> {
    match (was, now) {
        (REACH_DOWN, REACH_UP) => Some(ReachChange::Back),
        (REACH_UNKNOWN | REACH_UP, REACH_DOWN) => Some(ReachChange::Lost),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No replica answered.
    #[error("no authority replica answered ({0})")]
    Unreachable(String),
    /// A replica answered with an error.
    #[error("the authority refused: {status} {message}")]
    Refused { status: u16, message: String },
    #[error("the authority's answer is malformed: {0}")]
    Malformed(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

impl From<UpstreamError> for SignError {
    fn from(e: UpstreamError) -> Self {
        match e {
            // The authority decided: this node may not have it.
            UpstreamError::Refused {
                status: 403,
                message,
            } => SignError::Refused(message),
            e => SignError::Remote(Box::new(e)),
        }
    }
}

/// Why the agent could not join the fleet at start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("upstream.bundle_file {}: {source}", path.display())]
    BundleFile {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("trust domain: {0}")]
    TrustDomain(#[from] spiffe::SpiffeIdError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("stopped before the node was attested")]
    Stopped,
    #[error("node attestation failed: {0}")]
    Attestation(#[source] UpstreamError),
    #[error("the fleet authority's bundle: {0}")]
    Bundle(#[source] UpstreamError),
}

/// The node's identity towards the authority.
struct NodeCreds {
    node_id: spiffe::SpiffeId,
    cert: Vec<u8>,
    key: Vec<u8>,
    issued_at: SystemTime,
    not_after: SystemTime,
    tls: Arc<rustls::ClientConfig>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PersistedNode {
    cert: String,
    key: String,
}

pub struct Upstream {
    config: UpstreamConfig,
    trust_domain: spiffe::TrustDomain,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    roots: ArcSwap<rustls::RootCertStore>,
    node: ArcSwap<NodeCreds>,
    /// Index of the replica that answered last.
    preferred: AtomicUsize,
    /// [`REACH_UNKNOWN`], [`REACH_UP`] or [`REACH_DOWN`]: whether the last
    /// request reached a replica (unknown before the first).
    reachable: AtomicU8,
    /// The trust domain's bundle as the fleet authority publishes it.
    store: Arc<TrustStore>,
    /// The latest expiry among the published CAs.
    ca_expiry: Mutex<Option<SystemTime>>,
    /// [`REVOCATIONS_OFF`], [`REVOCATIONS_LOADING`] or
    /// [`REVOCATIONS_SYNCED`]: whether this node follows the fleet's
    /// revocations and has them all ([`super::follow`]).
    revocations: AtomicU8,
}

const REVOCATIONS_OFF: u8 = 0;
const REVOCATIONS_LOADING: u8 = 1;
const REVOCATIONS_SYNCED: u8 = 2;

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("addresses", &self.config.addresses)
            .finish_non_exhaustive()
    }
}

fn csr_for(id: Option<&spiffe::SpiffeId>) -> Result<(KeyPair, String), SignError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    if let Some(id) = id {
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    }
    let csr = params.serialize_request(&key)?;
    Ok((key, B64.encode(csr.der())))
}

fn cert_window(der: &[u8]) -> Result<(SystemTime, SystemTime), UpstreamError> {
    let (_, c) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| UpstreamError::Malformed(format!("certificate: {e}")))?;
    let t = |ts: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64);
    Ok((
        t(c.validity().not_before.timestamp()),
        t(c.validity().not_after.timestamp()),
    ))
}

/// CA certificates (DER), JWT-SVID keys, access-token keys.
type DecodedBundle = (Vec<Vec<u8>>, Vec<PublicJwk>, Vec<PublicJwk>);

fn decode_bundle(doc: &BundleDoc) -> Result<DecodedBundle, UpstreamError> {
    let cas = doc
        .x509_authorities
        .iter()
        .map(|c| B64.decode(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| UpstreamError::Malformed(format!("bundle CA: {e}")))?;
    let jwks = |keys: &[serde_json::Value]| {
        keys.iter()
            .map(|k| {
                PublicJwk::from_json(k).ok_or_else(|| UpstreamError::Malformed("bundle JWK".into()))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok((cas, jwks(&doc.jwt_keys)?, jwks(&doc.access_keys)?))
}

impl Upstream {
    /// Loads the bootstrap bundle and proves the node to the authority (or
    /// reuses a still-valid saved node SVID). Retries until a replica answers
    /// or `shutdown` is cancelled; an explicit refusal is returned at once.
    /// The trust store then holds the fleet's first bundle.
    pub async fn connect(
        config: UpstreamConfig,
        trust_domain: spiffe::TrustDomain,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        shutdown: &CancellationToken,
    ) -> Result<Arc<Self>, ConnectError> {
        let (up, doc) = Self::attested(config, trust_domain, clock, metrics, shutdown).await?;
        up.apply_bundle(&doc).map_err(ConnectError::Bundle)?;
        Ok(up)
    }

    async fn attested(
        config: UpstreamConfig,
        trust_domain: spiffe::TrustDomain,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        shutdown: &CancellationToken,
    ) -> Result<(Arc<Self>, BundleDoc), ConnectError> {
        let bundle_err = |e: Box<dyn std::error::Error + Send + Sync>| ConnectError::BundleFile {
            path: config.bundle_file.clone(),
            source: e,
        };
        let pem = std::fs::read(&config.bundle_file).map_err(|e| bundle_err(e.into()))?;
        let cas = crate::identity::pem::decode_certs(&pem).map_err(|e| bundle_err(e.into()))?;
        let roots = tls::roots(cas.iter().map(Vec::as_slice)).map_err(|e| bundle_err(e.into()))?;
        let placeholder = NodeCreds {
            node_id: spiffe::SpiffeId::new(format!(
                "{}/tessera/unattested",
                trust_domain.id_string()
            ))?,
            cert: Vec::new(),
            key: Vec::new(),
            issued_at: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::UNIX_EPOCH,
            tls: tls::client_config(roots.clone(), None)?,
        };
        let store = TrustStore::new(
            trust_domain.clone(),
            clock.clone(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let up = Arc::new(Self {
            config,
            trust_domain,
            clock,
            metrics,
            roots: ArcSwap::new(roots),
            node: ArcSwap::from_pointee(placeholder),
            preferred: AtomicUsize::new(0),
            reachable: AtomicU8::new(REACH_UNKNOWN),
            store,
            ca_expiry: Mutex::new(None),
            revocations: AtomicU8::new(REVOCATIONS_OFF),
        });
        let mut backoff = Duration::from_millis(500);
        if up.config.attestation == NodeAttestation::JoinToken && up.load_saved_node() {
            // The join token was spent when this SVID was issued: renew with
            // it for as long as it is valid, however long the authority is away.
            tracing::info!(node = %up.node_id(), "using the saved node SVID");
            while up.node_svid_expiry() > up.clock.now() {
                match up.renew().await {
                    Ok(doc) => return Ok((up, doc)),
                    Err(UpstreamError::Unreachable(why)) => {
                        tracing::warn!(reason = %why, retry_in = ?backoff, "no authority replica answered; retrying the node SVID renewal");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the saved node SVID was refused; attesting with the join token");
                        break;
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(ConnectError::Stopped),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
        loop {
            match up.attest().await {
                Ok(doc) => return Ok((up, doc)),
                Err(UpstreamError::Unreachable(why)) => {
                    tracing::warn!(reason = %why, retry_in = ?backoff, "no authority replica answered node attestation; retrying");
                }
                Err(e) => return Err(ConnectError::Attestation(e)),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Err(ConnectError::Stopped),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    pub fn node_id(&self) -> spiffe::SpiffeId {
        self.node.load().node_id.clone()
    }

    /// The node's name (the last segment of its node ID).
    pub fn node_name(&self) -> String {
        self.node
            .load()
            .node_id
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string()
    }

    /// The trust domain's bundle as the fleet authority publishes it.
    pub fn trust_store(&self) -> &Arc<TrustStore> {
        &self.store
    }

    pub fn node_svid_expiry(&self) -> SystemTime {
        self.node.load().not_after
    }

    fn load_saved_node(&self) -> bool {
        let path = self.config.state_dir.join(NODE_STATE_FILE);
        let Ok(bytes) = std::fs::read(&path) else {
            return false;
        };
        let Ok(saved) = serde_json::from_slice::<PersistedNode>(&bytes) else {
            tracing::warn!(file = %path.display(), "ignoring a corrupt saved node SVID");
            return false;
        };
        let (Ok(cert), Ok(key)) = (B64.decode(saved.cert), B64.decode(saved.key)) else {
            return false;
        };
        self.install_node(cert, key, false).is_ok() && self.node.load().not_after > self.clock.now()
    }

    fn install_node(&self, cert: Vec<u8>, key: Vec<u8>, save: bool) -> Result<(), UpstreamError> {
        let node_id = tls::spiffe_id_of(&cert)
            .filter(|id| super::Node::from_spiffe_id(id, &self.trust_domain).is_some())
            .ok_or_else(|| {
                UpstreamError::Malformed("the node SVID does not carry a node ID".into())
            })?;
        let (issued_at, not_after) = cert_window(&cert)?;
        let tls = tls::client_config(self.roots.load_full(), Some((&cert, &key)))?;
        if save && self.config.attestation == NodeAttestation::JoinToken {
            let saved = PersistedNode {
                cert: B64.encode(&cert),
                key: B64.encode(&key),
            };
            let path = self.config.state_dir.join(NODE_STATE_FILE);
            let body = serde_json::to_vec(&saved).unwrap_or_default();
            if let Err(e) = crate::fsutil::write_private_atomic(&path, &body) {
                tracing::error!(file = %path.display(), error = %e, "could not save the node SVID; a restart will need a new join token");
            }
        }
        self.node.store(Arc::new(NodeCreds {
            node_id,
            cert,
            key,
            issued_at,
            not_after,
            tls,
        }));
        Ok(())
    }

    /// Proves the node with its token and installs the new node SVID.
    async fn attest(&self) -> Result<BundleDoc, UpstreamError> {
        let token = tokio::fs::read_to_string(&self.config.token_file)
            .await
            .map_err(|e| {
                UpstreamError::Malformed(format!(
                    "upstream.token_file {}: {e}",
                    self.config.token_file.display()
                ))
            })?;
        let (key, csr) = csr_for(None).map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        let method = match self.config.attestation {
            NodeAttestation::K8sPsat => "k8s_psat",
            NodeAttestation::JoinToken => "join_token",
        };
        let req = wire::AttestRequest {
            method: method.into(),
            token: token.trim().to_string(),
            csr,
        };
        let resp: wire::NodeSvidResponse = self.call("/v1/attest", Some(&req), false).await?;
        self.accept_node_svid(resp, key).await
    }

    /// A fresh node SVID: join-token nodes renew with their current one;
    /// Kubernetes nodes attest again with their (rotated) token, so a node
    /// whose agent pod is gone cannot keep renewing.
    async fn renew(&self) -> Result<BundleDoc, UpstreamError> {
        if self.config.attestation == NodeAttestation::K8sPsat {
            return self.attest().await;
        }
        let (key, csr) = csr_for(None).map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        let resp: wire::NodeSvidResponse = self
            .call("/v1/renew", Some(&wire::RenewRequest { csr }), true)
            .await?;
        self.accept_node_svid(resp, key).await
    }

    async fn accept_node_svid(
        &self,
        resp: wire::NodeSvidResponse,
        key: KeyPair,
    ) -> Result<BundleDoc, UpstreamError> {
        let cert = B64
            .decode(&resp.svid)
            .map_err(|e| UpstreamError::Malformed(format!("node SVID: {e}")))?;
        self.set_roots(&resp.bundle)?;
        self.install_node(cert, key.serialize_der(), true)?;
        tracing::info!(node = %self.node_id(), "node attested; node SVID installed");
        Ok(resp.bundle)
    }

    fn set_roots(&self, doc: &BundleDoc) -> Result<(), UpstreamError> {
        let (cas, _, _) = decode_bundle(doc)?;
        let roots = tls::roots(cas.iter().map(Vec::as_slice))?;
        if *roots.roots != *self.roots.load().roots {
            self.roots.store(roots.clone());
            let node = self.node.load();
            let identity =
                (!node.cert.is_empty()).then_some((node.cert.as_slice(), node.key.as_slice()));
            if let Ok(tls) = tls::client_config(roots, identity) {
                self.node.store(Arc::new(NodeCreds {
                    node_id: node.node_id.clone(),
                    cert: node.cert.clone(),
                    key: node.key.clone(),
                    issued_at: node.issued_at,
                    not_after: node.not_after,
                    tls,
                }));
            }
        }
        Ok(())
    }

    /// The node's clock (the one its certificates are checked with).
    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Records whether the fleet's revocations are all here: until they are,
    /// the node is not ready (a token revoked elsewhere could pass here).
    pub(crate) fn set_revocations_synced(&self, synced: bool) {
        self.revocations.store(
            if synced {
                REVOCATIONS_SYNCED
            } else {
                REVOCATIONS_LOADING
            },
            Ordering::Release,
        );
    }

    /// Opens a long-lived `GET path` (node SVID as client certificate) on
    /// the first replica that answers 200, starting with the preferred one.
    pub async fn open_stream(&self, path: &str) -> Result<http::JsonStream, UpstreamError> {
        let n = self.config.addresses.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let addr = &self.config.addresses[idx];
            let opened = http::open(http::Request {
                addr,
                server_name: &self.config.server_name,
                tls: self.node.load().tls.clone(),
                method: hyper::Method::GET,
                path,
                bearer: None,
                content_type: "application/json",
                body: None,
                timeout: self.config.request_timeout,
            })
            .await;
            match opened {
                Err(e) => last = e.to_string(),
                Ok(s) if s.status == 200 => return Ok(http::JsonStream::new(s)),
                Ok(s) if matches!(s.status, 429 | 503) => {
                    let status = s.status;
                    last = format!(
                        "{addr}: {status} {}",
                        String::from_utf8_lossy(&s.rest().await)
                    );
                }
                Ok(s) => {
                    let status = s.status;
                    let b = s.rest().await;
                    let message = serde_json::from_slice::<wire::ErrorBody>(&b)
                        .map(|e| e.error)
                        .unwrap_or_else(|_| String::from_utf8_lossy(&b).into_owned());
                    return Err(UpstreamError::Refused { status, message });
                }
            }
        }
        Err(UpstreamError::Unreachable(last))
    }

    /// One request, failing over across replicas on transport errors, 429
    /// and 503.
    pub(crate) async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
        with_identity: bool,
    ) -> Result<R, UpstreamError> {
        let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        let n = self.config.addresses.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let addr = &self.config.addresses[idx];
            let tls = if with_identity {
                self.node.load().tls.clone()
            } else {
                tls::client_config(self.roots.load_full(), None)?
            };
            let result = http::send(http::Request {
                addr,
                server_name: &self.config.server_name,
                tls,
                method: if body.is_some() {
                    hyper::Method::POST
                } else {
                    hyper::Method::GET
                },
                path,
                bearer: None,
                content_type: "application/json",
                body: body.clone(),
                timeout: self.config.request_timeout,
            })
            .await;
            match result {
                Err(e) => {
                    tracing::debug!(replica = %addr, error = %e, "authority replica unreachable");
                    last = e.to_string();
                }
                // Busy (429: attestation budget) or cannot decide now (503):
                // another replica may, and otherwise the caller retries.
                Ok((status @ (429 | 503), b)) => {
                    last = format!("{addr}: {status} {}", String::from_utf8_lossy(&b));
                }
                Ok((status, b)) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    self.set_reachable(true);
                    if status == 200 {
                        self.metrics
                            .upstream_requests
                            .get_or_create(&ResultLabels { result: "ok" })
                            .inc();
                        return serde_json::from_slice(&b)
                            .map_err(|e| UpstreamError::Malformed(format!("{path}: {e}")));
                    }
                    self.metrics
                        .upstream_requests
                        .get_or_create(&ResultLabels { result: "refused" })
                        .inc();
                    let message = serde_json::from_slice::<wire::ErrorBody>(&b)
                        .map(|e| e.error)
                        .unwrap_or_else(|_| String::from_utf8_lossy(&b).into_owned());
                    return Err(UpstreamError::Refused { status, message });
                }
            }
        }
        self.set_reachable(false);
        self.metrics
            .upstream_requests
            .get_or_create(&ResultLabels {
                result: "unreachable",
            })
            .inc();
        Err(UpstreamError::Unreachable(last))
    }

    /// Records whether the last request reached a replica; logs only real
    /// changes (not the first answer after start).
    fn set_reachable(&self, up: bool) {
        let now = if up { REACH_UP } else { REACH_DOWN };
        let was = self.reachable.swap(now, Ordering::AcqRel);
        self.metrics.upstream_reachable.set(i64::from(up));
        match reach_change(was, now) {
            Some(ReachChange::Back) => tracing::info!("the fleet authority is reachable again"),
            Some(ReachChange::Lost) => tracing::warn!(
                "no fleet authority replica answers; serving cached SVIDs until they expire"
            ),
            None => {}
        }
    }

    /// Signs a batch of X509-SVIDs in one request; keys are generated here.
    async fn sign_x509(
        &self,
        batch: &[(spiffe::SpiffeId, Duration)],
    ) -> Vec<Result<X509Svid, SignError>> {
        let mut out = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(wire::MAX_BATCH) {
            out.extend(self.sign_x509_chunk(chunk).await);
        }
        out
    }

    async fn sign_x509_chunk(
        &self,
        batch: &[(spiffe::SpiffeId, Duration)],
    ) -> Vec<Result<X509Svid, SignError>> {
        let mut keys = Vec::with_capacity(batch.len());
        let mut req = wire::SignRequest::default();
        for (id, ttl) in batch {
            match csr_for(Some(id)) {
                Ok((key, csr)) => {
                    keys.push(Ok(key));
                    req.x509.push(wire::X509Request {
                        csr,
                        ttl_seconds: ttl.as_secs(),
                    });
                }
                Err(e) => keys.push(Err(e)),
            }
        }
        let answer: Result<wire::SignResponse, _> = if req.x509.is_empty() {
            Ok(wire::SignResponse::default())
        } else {
            self.call("/v1/sign", Some(&req), true).await
        };
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                let msg = e.to_string();
                return batch
                    .iter()
                    .map(|_| Err(SignError::Remote(msg.clone().into())))
                    .collect();
            }
        };
        let mut signed = answer.x509.into_iter();
        batch
            .iter()
            .zip(keys)
            .map(|((id, _), key)| {
                let key = key?;
                let item = signed.next().ok_or_else(|| {
                    SignError::from(UpstreamError::Malformed(
                        "fewer answers than requests".into(),
                    ))
                })?;
                let der = match (item.svid, item.error) {
                    (Some(s), _) => B64.decode(s).map_err(|e| {
                        UpstreamError::Malformed(format!("signed certificate: {e}"))
                    })?,
                    (None, e) => {
                        return Err(SignError::Refused(e.unwrap_or_else(|| "refused".into())));
                    }
                };
                if tls::spiffe_id_of(&der).as_ref() != Some(id) {
                    return Err(UpstreamError::Malformed(format!(
                        "the signed certificate is not for {id}"
                    ))
                    .into());
                }
                let (_, not_after) = cert_window(&der)?;
                Ok(X509Svid {
                    spiffe_id: id.clone(),
                    chain_der: Bytes::from(der),
                    key_pkcs8: Bytes::from(key.serialize_der()),
                    issued_at: self.clock.now(),
                    not_after,
                })
            })
            .collect()
    }

    /// A JWT-SVID signed by the authority.
    async fn mint_jwt(
        &self,
        id: &spiffe::SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<JwtSvid, SignError> {
        let req = wire::SignRequest {
            x509: Vec::new(),
            jwt: vec![wire::JwtRequest {
                spiffe_id: id.to_string(),
                audience: audience.to_vec(),
                ttl_seconds: ttl.as_secs(),
            }],
            wit: Vec::new(),
        };
        let answer: wire::SignResponse = self.call("/v1/sign", Some(&req), true).await?;
        let item = answer
            .jwt
            .into_iter()
            .next()
            .ok_or_else(|| UpstreamError::Malformed("no JWT in the answer".into()))?;
        let token = match (item.svid, item.error) {
            (Some(t), _) => t,
            (None, e) => {
                return Err(SignError::Refused(e.unwrap_or_else(|| "refused".into())));
            }
        };
        let claims = token
            .split('.')
            .nth(1)
            .and_then(|p| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(p)
                    .ok()
            })
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .ok_or_else(|| UpstreamError::Malformed("malformed JWT-SVID".into()))?;
        let secs = |k: &str| claims.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        Ok(JwtSvid {
            token,
            issued_at: SystemTime::UNIX_EPOCH + Duration::from_secs(secs("iat")),
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(secs("exp")),
            single_use: crate::identity::svid::for_token_service(&claims),
        })
    }

    /// A task access token signed by the authority.
    async fn sign_access(&self, claims: &str) -> Result<String, SignError> {
        let req = wire::AccessTokenRequest {
            claims: serde_json::from_str(claims).map_err(|e| SignError::Remote(Box::new(e)))?,
        };
        let answer: wire::AccessTokenResponse =
            self.call("/v1/access-token", Some(&req), true).await?;
        Ok(answer.token)
    }

    /// A WIT-SVID signed by the authority over `cnf_jwk`, the public half of
    /// a key this node generated (the authority never sees the private one).
    async fn mint_wit(
        &self,
        id: &spiffe::SpiffeId,
        cnf_jwk: &serde_json::Value,
        ttl: Duration,
    ) -> Result<SignedWit, SignError> {
        let req = wire::SignRequest {
            wit: vec![wire::WitRequest {
                spiffe_id: id.to_string(),
                jwk: cnf_jwk.clone(),
                ttl_seconds: ttl.as_secs(),
            }],
            ..Default::default()
        };
        let answer: wire::SignResponse = self.call("/v1/sign", Some(&req), true).await?;
        let item = answer
            .wit
            .into_iter()
            .next()
            .ok_or_else(|| UpstreamError::Malformed("no WIT-SVID in the answer".into()))?;
        let token = match (item.svid, item.error) {
            (Some(t), _) => t,
            (None, e) => {
                return Err(SignError::Refused(e.unwrap_or_else(|| "refused".into())));
            }
        };
        let claims = crate::identity::jws::unverified_claims(&token)
            .map_err(|e| UpstreamError::Malformed(format!("malformed WIT-SVID: {e}")))?;
        let secs = |k: &str| claims.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        Ok(SignedWit {
            token,
            issued_at: SystemTime::UNIX_EPOCH + Duration::from_secs(secs("iat")),
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(secs("exp")),
        })
    }

    /// Installs a bundle document into the trust store (open streams get it
    /// if it changed) and our TLS roots; returns whether the bundle changed.
    pub fn apply_bundle(&self, doc: &BundleDoc) -> Result<bool, UpstreamError> {
        let (cas, jwt, access) = decode_bundle(doc)?;
        self.set_roots(doc)?;
        self.store.set_access_keys(access);
        let x509 = cas.concat();
        if self.store.current().x509.as_ref() != x509.as_slice() {
            // Polled every few seconds: parse only when something changed.
            *self.ca_expiry.lock() = cas
                .iter()
                .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
                .map(|(_, c)| c.validity().not_after.timestamp().max(0) as u64)
                .max()
                .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        }
        let wit = doc
            .wit_keys
            .iter()
            .map(|k| {
                PublicJwk::from_json(k)
                    .ok_or_else(|| UpstreamError::Malformed("bundle WIT-SVID JWK".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let own = self.store.publish(x509, jwt, wit);
        let foreign = self.apply_federated(&doc.federated_bundles);
        Ok(own || foreign)
    }

    /// Installs the foreign bundles the authority relays (a workload sees
    /// those its entries federate with) and forgets those it no longer
    /// does; returns whether any changed. A document that does not parse
    /// is logged and the bundle held for that domain kept.
    fn apply_federated(&self, docs: &std::collections::BTreeMap<String, String>) -> bool {
        let mut changed = false;
        for (name, doc) in docs {
            let td = match spiffe::TrustDomain::new(name) {
                Ok(td) if td != *self.store.trust_domain() => td,
                _ => {
                    tracing::warn!(trust_domain = %name, "the fleet authority relayed a bundle for an invalid or our own trust domain; ignored");
                    continue;
                }
            };
            match ForeignBundle::parse(td, doc.as_bytes()) {
                Ok(bundle) => changed |= self.store.set_federated(Arc::new(bundle)),
                Err(e) => {
                    tracing::warn!(trust_domain = %name, error = %e, "the fleet authority relayed a foreign bundle that does not parse; keeping the one held");
                }
            }
        }
        let gone: Vec<String> = self
            .store
            .current()
            .federated
            .keys()
            .filter(|name| !docs.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            tracing::info!(trust_domain = %name, "the fleet no longer federates with this trust domain; its bundle is no longer trusted");
            changed |= self.store.remove_federated(&name);
        }
        changed
    }

    /// Background work: poll the bundle (streams get changes), and renew the
    /// node SVID at half its life. Runs until cancelled.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.bundle_refresh) => {}
            }
            let node = self.node.load_full();
            let half = node.issued_at + crate::clock::until(node.issued_at, node.not_after) / 2;
            if self.clock.now() >= half {
                match self.renew().await {
                    Ok(doc) => {
                        let _ = self.apply_bundle(&doc);
                    }
                    Err(e)
                        if node.not_after <= self.clock.now()
                            && self.config.attestation == NodeAttestation::JoinToken =>
                    {
                        // A join token works once: nothing can prove this node again.
                        tracing::error!(error = %e, "the node SVID has expired: this node needs a new join token (`tessera authority join-token`) and a restart");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, expires = %humantime::format_rfc3339_seconds(node.not_after), "node SVID renewal failed; retrying")
                    }
                }
            }
            match self.call::<(), BundleDoc>("/v1/bundle", None, true).await {
                Ok(doc) => match self.apply_bundle(&doc) {
                    Ok(true) => {
                        tracing::info!("the trust domain's bundle changed; pushed to open streams")
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed bundle"),
                },
                Err(e) => tracing::debug!(error = %e, "bundle refresh failed"),
            }
        }
    }
}

impl Signer for Upstream {
    fn issue_x509_batch<'a>(
        &'a self,
        batch: &'a [(spiffe::SpiffeId, Duration)],
    ) -> SignFuture<'a, Vec<Result<X509Svid, SignError>>> {
        Box::pin(self.sign_x509(batch))
    }

    fn jwt_svid<'a>(
        &'a self,
        id: &'a spiffe::SpiffeId,
        audience: &'a [String],
        ttl: Duration,
    ) -> SignFuture<'a, Result<JwtSvid, SignError>> {
        Box::pin(self.mint_jwt(id, audience, ttl))
    }

    fn sign_access_token<'a>(
        &'a self,
        claims: &'a str,
    ) -> SignFuture<'a, Result<String, SignError>> {
        Box::pin(self.sign_access(claims))
    }

    fn sign_wit<'a>(
        &'a self,
        id: &'a spiffe::SpiffeId,
        cnf_jwk: &'a serde_json::Value,
        ttl: Duration,
    ) -> SignFuture<'a, Result<SignedWit, SignError>> {
        Box::pin(self.mint_wit(id, cnf_jwk, ttl))
    }

    /// The authority publishes WIT-SVID keys (its key directory has
    /// `wit.key`): only then is the profile served.
    fn serves_wit(&self) -> bool {
        !self.store.current().wit_keys.is_empty()
    }

    fn access_token_not_after(&self) -> Result<SystemTime, SignError> {
        // The fleet's keys come from files with no end of their own.
        Ok(self.clock.now() + Duration::from_secs(365 * 24 * 3600))
    }

    fn active_ca_expiry(&self) -> Option<SystemTime> {
        *self.ca_expiry.lock()
    }

    /// Whether the last request reached a replica.
    fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Acquire) != REACH_DOWN
    }

    /// A node whose node SVID expired while every renewal failed can get
    /// nothing signed any more: probes must take it out of rotation.
    fn not_ready(&self) -> Option<String> {
        let node = self.node.load();
        if node.not_after <= self.clock.now() {
            return Some(format!(
                "the node SVID expired at {} and could not be renewed",
                humantime::format_rfc3339_seconds(node.not_after)
            ));
        }
        (self.revocations.load(Ordering::Acquire) == REVOCATIONS_LOADING).then(|| {
            "the fleet's revocations are not loaded yet (a token revoked on another node could pass here)".to_string()
        })
    }
}

#[cfg(test)]
mod reachability_tests {
    use super::*;

    #[test]
    fn only_real_changes_of_reachability_are_logged() {
        // The first answer after start is not "again".
        assert_eq!(reach_change(REACH_UNKNOWN, REACH_UP), None);
        assert_eq!(reach_change(REACH_UP, REACH_UP), None);
        // Every failed request while down is one outage, logged once.
        assert_eq!(reach_change(REACH_DOWN, REACH_DOWN), None);
        assert_eq!(
            reach_change(REACH_UNKNOWN, REACH_DOWN),
            Some(ReachChange::Lost)
        );
        assert_eq!(reach_change(REACH_UP, REACH_DOWN), Some(ReachChange::Lost));
        assert_eq!(reach_change(REACH_DOWN, REACH_UP), Some(ReachChange::Back));
    }
}
