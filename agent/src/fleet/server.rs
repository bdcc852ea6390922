//! `tessera authority run`: the signing service for a trust domain.
//!
//! Stateless: keys come from a directory (a mounted Secret), the cluster's
//! state from the Kubernetes API, join tokens from a directory where
//! redemption is an atomic rename. Any number of replicas can run behind one
//! Service; each answers every request on its own.
//!
//! Routes (HTTP/1.1 over TLS; the client certificate is a node SVID):
//! `POST /v1/attest` (no client certificate), `POST /v1/renew`,
//! `POST /v1/sign`, `POST /v1/access-token`, `GET /v1/bundle`, and with
//! `[server.store]` the fleet's revocations: `POST /v1/revocations` and
//! `GET /v1/stream` ([`super::feed`], [`super::store`]). Operators (an
//! X.509-SVID listed in `operators`) use `/v1/operator/...`
//! ([`super::operator`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rcgen::CertificateSigningRequestParams;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::kube::{KubeClient, KubeConfig, ReviewError};
use super::registration::{LiveEntries, RegistrationConfig};
use super::store::{FleetState, StoreConfig, StoreKind, StoreMetrics};
use super::wire::{self, BundleDoc};
use super::{Node, NodeKind, entitlement, feed, join, tls};
use crate::audit::AuditLog;
use crate::clock::Clock;
use crate::entries::EntrySet;
use crate::identity::pem::split_der_certs;
use crate::identity::{LocalAuthority, SignError, Signer};

/// The `[server]` table, validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub keys_dir: PathBuf,
    /// DNS name in the serving certificate (agents' `upstream.server_name`).
    pub server_name: String,
    pub node_svid_ttl: Duration,
    /// A key added to `keys_dir` signs only this long after it appears.
    pub ca_publish_lead: Duration,
    pub key_reload_interval: Duration,
    pub join_token_dir: Option<PathBuf>,
    pub audit_log: Option<PathBuf>,
    pub kubernetes: Option<KubeConfig>,
    /// Where the fleet's shared state (revocations) lives; `None`: each
    /// node's revocations hold on that node only.
    pub store: Option<StoreConfig>,
    /// Live registration entries from the Kubernetes API; `None`: only the
    /// config file's entries.
    pub registration: Option<RegistrationConfig>,
    /// Longest access token the authority signs.
    pub max_access_token_ttl: Duration,
    pub max_connections: usize,
    /// The `iss` of the JWT-SVIDs it signs: the issuer URL of the trust
    /// domain's HTTPS face, when the authority serves one (`[https]`).
    pub jwt_issuer: Option<String>,
    /// SPIFFE IDs whose X.509-SVIDs may decide approvals and revoke at the
    /// authority ([`super::operator`]).
    pub operators: Vec<spiffe::SpiffeId>,
}

/// Largest request body: a batch of a few hundred CSRs.
const MAX_BODY: usize = 1024 * 1024;
/// Node attestations per second per replica (a rolling restart of 1,000
/// nodes attests in well under a minute at this rate).
const ATTEST_PER_SECOND: f64 = 50.0;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    kind: &'static str,
    result: &'static str,
}

struct Shared {
    /// Node attestation is unauthenticated and may cost a TokenReview call:
    /// it gets a budget of its own, shared by all callers.
    attest_budget: crate::sync::Mutex<crate::rate_limit::TokenBucket>,
    td: spiffe::TrustDomain,
    config: ServerConfig,
    authority: Arc<LocalAuthority>,
    /// The config file's entries and the live ones.
    entries: Arc<LiveEntries>,
    kube: Option<Arc<KubeClient>>,
    fleet_state: Option<Arc<FleetState>>,
    /// Join tokens and denials in the Kubernetes API (with the store).
    nodes: Option<Arc<super::nodes::NodeControl>>,
    /// Nodes' pending approvals, decided in the Kubernetes API (with the store).
    approvals: Option<Arc<super::approvals::FleetApprovals>>,
    /// Cancelled when the authority stops (ends long-lived streams).
    shutdown: CancellationToken,
    audit: AuditLog,
    clock: Arc<dyn Clock>,
    requests: Family<Labels, Counter>,
    registry: Registry,
}

/// The caller's node, from its verified client certificate, when that
/// certificate expires, and its serial number (lowercase hex); and the
/// certificate's SPIFFE ID and expiry whatever it names (an operator's).
#[derive(Clone)]
struct PeerNode(
    Option<(Node, SystemTime, Option<String>)>,
    Option<(spiffe::SpiffeId, SystemTime)>,
);

impl PeerNode {
    /// When the node's SVID expires, which ends its streams. Streams are
    /// served only after [`Shared::node`] accepted the peer as a node; the
    /// epoch, for any other peer, would end a stream at once.
    fn node_not_after(&self) -> SystemTime {
        self.0
            .as_ref()
            .map_or(SystemTime::UNIX_EPOCH, |(_, not_after, _)| *not_after)
    }
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(wire::ErrorBody { error: self.1 })).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// A running authority.
pub struct RunningAuthority {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    /// The entries in force (SIGHUP replaces the config file's).
    pub entries: Arc<LiveEntries>,
    /// The trust domain's keys this replica signs with (the HTTPS face
    /// publishes them and takes its serving certificate from them).
    pub authority: Arc<LocalAuthority>,
    /// Registered in this replica's `/metrics` for the federation
    /// relationships the wiring starts on its trust store.
    pub federation_metrics: crate::metrics::FederationMetrics,
    /// The Kubernetes API client (`[server.kubernetes]`), for what the
    /// wiring starts beside the server (federation relationships and kept
    /// bundles).
    pub kube: Option<Arc<KubeClient>>,
    /// The PostgreSQL fleet store (`kind = "postgres"`), for the same.
    pub database: Option<Arc<super::store::postgres::Database>>,
    shutdown: CancellationToken,
    /// The server and its background tasks (admin listener, key reload).
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningAuthority {
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Cancelled when the replica stops: what the wiring starts beside the
    /// server (federation) stops with it.
    pub fn stopping(&self) -> CancellationToken {
        self.shutdown.clone()
    }
    /// Returns once every task of this authority has ended, so what they
    /// share (the audit log and its file lock, the listeners) is released: a
    /// replica restarted in the same process can reopen them.
    pub async fn wait(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Why the authority could not start; each names the config key at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("server.keys_dir: {0}")]
    Keys(#[source] SignError),
    #[error("server.kubernetes: {0}")]
    Kubernetes(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("server.store: {0}")]
    Store(String),
    #[error("server.registration: {0}")]
    Registration(String),
    #[error("server.audit_log {}: {source}", path.display())]
    AuditLog {
        path: std::path::PathBuf,
        #[source]
        source: crate::audit::AuditError,
    },
    #[error("{key} {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the serving certificate: {0}")]
    ServingCert(#[source] ServingCertError),
}

/// Why the authority's own serving certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ServingCertError {
    #[error(transparent)]
    Id(#[from] spiffe::SpiffeIdError),
    #[error(transparent)]
    Key(#[from] rcgen::Error),
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error(transparent)]
    Bundle(#[from] crate::identity::pem::PemError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Starts the service: loads keys, binds, serves until shut down.
pub async fn start(
    td: spiffe::TrustDomain,
    entries: EntrySet,
    config: ServerConfig,
    admin_listen: Option<SocketAddr>,
    clock: Arc<dyn Clock>,
) -> Result<RunningAuthority, StartError> {
    let authority = LocalAuthority::from_key_dir(
        td.clone(),
        &config.keys_dir,
        config.ca_publish_lead,
        clock.clone(),
    )
    .map_err(StartError::Keys)?;
    if let Some(issuer) = &config.jwt_issuer {
        authority.set_jwt_issuer(issuer.clone());
    }
    let kube = match &config.kubernetes {
        Some(k) => Some(Arc::new(
            KubeClient::new(k.clone()).map_err(|e| StartError::Kubernetes(e.into()))?,
        )),
        None => None,
    };
    let shutdown = CancellationToken::new();
    // Whatever was started stops if start-up fails further on.
    let stop_on_error = shutdown.clone().drop_guard();
    let audit = match &config.audit_log {
        Some(path) => {
            let (log, report) =
                AuditLog::open(path, clock.clone()).map_err(|source| StartError::AuditLog {
                    path: path.clone(),
                    source,
                })?;
            if let Some(torn) = report.torn_tail {
                tracing::warn!(
                    lines = torn.lines.len(),
                    "the authority audit log ended in a torn record; recorded and continuing"
                );
            }
            log
        }
        None => AuditLog::disabled(),
    };
    let mut registry = Registry::with_prefix("tessera_authority");
    let federation_metrics = crate::metrics::FederationMetrics::default();
    federation_metrics.register(&mut registry);
    let requests = Family::<Labels, Counter>::default();
    registry.register(
        "requests",
        "Authority decisions by kind (attest, renew, x509, jwt, wit, access_token) and result (signed, refused, error)",
        requests.clone(),
    );
    let mut nodes = None;
    let mut approvals = None;
    let mut database = None;
    let fleet_state = match &config.store {
        None => None,
        Some(store) => {
            let metrics = StoreMetrics::default();
            registry.register(
                "store_requests",
                "Requests to the fleet store by operation (write, collect, list, watch) and result",
                metrics.requests.clone(),
            );
            registry.register(
                "store_revocations_written",
                "Revocations this replica wrote to the fleet store",
                metrics.revocations_written.clone(),
            );
            let (backend, node_store): (
                Arc<dyn super::store::Backend>,
                Arc<dyn super::nodes::NodeStore>,
            ) = match store.kind {
                StoreKind::Kubernetes => {
                    let Some(kube) = kube.clone() else {
                        return Err(StartError::Store(
                            "kind = \"kubernetes\" needs [server.kubernetes] (the API server and the authority's credentials)".into(),
                        ));
                    };
                    for verb in ["create", "list", "watch", "deletecollection"] {
                        kube.also_need(
                            verb,
                            super::store::crd::GROUP,
                            "revocationbatches",
                            &store.namespace,
                        );
                    }
                    tracing::info!(backend = "kubernetes", namespace = %store.namespace, "fleet state: revocations are shared through RevocationBatch objects; join tokens and node denials are JoinToken and NodeDenial objects");
                    if store.approvals {
                        approvals = Some(super::approvals::FleetApprovals::start(
                            Arc::new(super::approvals::KubeApprovals::new(
                                kube.clone(),
                                store.namespace.clone(),
                                !config.operators.is_empty(),
                            )),
                            clock.clone(),
                            shutdown.clone(),
                        ));
                    }
                    (
                        Arc::new(super::store::crd::CrdBackend::new(
                            kube.clone(),
                            store.namespace.clone(),
                            metrics.clone(),
                        )),
                        Arc::new(super::nodes::KubeNodes::new(
                            kube.clone(),
                            store.namespace.clone(),
                        )),
                    )
                }
                StoreKind::Postgres => {
                    let Some(db_config) = store.database.clone() else {
                        return Err(StartError::Store("kind = \"postgres\" needs url".into()));
                    };
                    let db = super::store::postgres::Database::open(db_config)
                        .await
                        .map_err(|e| StartError::Store(format!("url: {e}")))?;
                    tracing::info!(
                        backend = "postgres",
                        schema_version = super::store::postgres::SCHEMA_VERSION,
                        "fleet state: revocations, join tokens and node denials are rows of tessera_* tables, followed through LISTEN/NOTIFY"
                    );
                    database = Some(db.clone());
                    if store.approvals {
                        approvals = Some(super::approvals::FleetApprovals::start(
                            Arc::new(super::store::postgres::approvals::PgApprovals::new(
                                db.clone(),
                            )),
                            clock.clone(),
                            shutdown.clone(),
                        ));
                    }
                    (
                        Arc::new(super::store::postgres::PgBackend::new(
                            db.clone(),
                            metrics.clone(),
                        )),
                        Arc::new(super::store::postgres::PgNodes::new(db)),
                    )
                }
            };
            nodes = Some(super::nodes::NodeControl::start_with(
                node_store,
                clock.clone(),
                shutdown.clone(),
            ));
            Some(FleetState::start(
                backend,
                clock.clone(),
                store.batch_window,
                metrics,
                shutdown.clone(),
            ))
        }
    };
    let entries = LiveEntries::new(&entries);
    match &config.registration {
        None => {}
        Some(registration) if registration.source == super::registration::Source::Postgres => {
            let Some(db) = database.clone() else {
                return Err(StartError::Registration(
                    "kind = \"postgres\" needs [server.store] kind = \"postgres\"".into(),
                ));
            };
            tracing::info!(
                namespaced = registration.namespaced,
                "live registration: rows of tessera_entries are followed"
            );
            super::store::postgres::entries::start(
                db,
                entries.clone(),
                td.clone(),
                registration.clone(),
                shutdown.clone(),
            );
        }
        Some(registration) => {
            let Some(kube) = kube.clone() else {
                return Err(StartError::Registration(
                    "kind = \"kubernetes\" needs [server.kubernetes] (the API server and the authority's credentials)".into(),
                ));
            };
            tracing::info!(
                namespaced = registration.namespaced,
                "live registration: ClusterWorkloadEntry{} objects are watched",
                if registration.namespaced {
                    " and WorkloadEntry"
                } else {
                    ""
                }
            );
            super::registration::start(
                kube,
                entries.clone(),
                td.clone(),
                registration.clone(),
                clock.clone(),
                shutdown.clone(),
            );
        }
    }
    let shared = Arc::new(Shared {
        attest_budget: crate::sync::Mutex::new(crate::rate_limit::TokenBucket::new(
            crate::rate_limit::Budget {
                rate: ATTEST_PER_SECOND,
                burst: ATTEST_PER_SECOND * 4.0,
            },
            tokio::time::Instant::now(),
        )),
        td,
        config: config.clone(),
        authority,
        entries: entries.clone(),
        kube,
        fleet_state,
        nodes,
        approvals,
        shutdown: shutdown.clone(),
        audit,
        clock,
        requests,
        registry,
    });
    let tls_config = Arc::new(ArcSwap::from(
        serving_tls(&shared).map_err(StartError::ServingCert)?,
    ));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            key: "server.listen",
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        key: "server.listen",
        addr: config.listen,
        source,
    })?;

    let mut tasks = Vec::new();
    let admin_addr = match admin_listen {
        None => None,
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .map_err(|source| StartError::Bind {
                    key: "admin.listen",
                    addr: a,
                    source,
                })?;
            let local = l.local_addr().map_err(|source| StartError::Bind {
                key: "admin.listen",
                addr: a,
                source,
            })?;
            let app = Router::new()
                .route("/healthz", get(|| async { "ok\n" }))
                .route("/readyz", get(readyz))
                .route("/metrics", get(metrics))
                .with_state(shared.clone());
            let sd = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(l, app)
                    .with_graceful_shutdown(async move { sd.cancelled().await })
                    .await;
            }));
            Some(local)
        }
    };

    // Key reload (Secret updates) and serving-certificate refresh.
    {
        let (shared, tls_config, sd) = (shared.clone(), tls_config.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            let mut issued = shared.clock.now();
            loop {
                tokio::select! {
                    _ = sd.cancelled() => return,
                    _ = tokio::time::sleep(shared.config.key_reload_interval) => {}
                }
                // File reads and key parsing: on the blocking pool.
                let reload = {
                    let shared = shared.clone();
                    tokio::task::spawn_blocking(move || {
                        shared
                            .authority
                            .reload_key_dir(&shared.config.keys_dir, shared.config.ca_publish_lead)
                            .map_err(|e| e.to_string())
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
                };
                let changed = match reload {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "could not reload server.keys_dir; keeping the keys in use");
                        false
                    }
                };
                if changed {
                    tracing::info!("the key directory changed; publishing the new bundle");
                }
                // Re-issue the serving certificate when keys changed or it is half-way through.
                if changed || shared.clock.now() > issued + SERVING_CERT_TTL / 2 {
                    match serving_tls(&shared) {
                        Ok(c) => {
                            tls_config.store(c);
                            issued = shared.clock.now();
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "could not renew the serving certificate")
                        }
                    }
                }
            }
        }));
    }

    let app = Router::new()
        .route("/v1/attest", post(attest))
        .route("/v1/renew", post(renew))
        .route("/v1/sign", post(sign))
        .route("/v1/access-token", post(access_token))
        .route("/v1/bundle", get(bundle))
        .route("/v1/revocations", post(revocations))
        .route("/v1/stream", get(stream))
        .route("/v1/entries", get(entries_stream))
        .route("/v1/approvals", post(approvals_publish))
        .route("/v1/approvals/decisions", get(approvals_stream))
        .route("/v1/operator/approvals", get(operator_approvals))
        .route(
            "/v1/operator/approvals/{id}/{action}",
            post(operator_decide),
        )
        .route("/v1/operator/revocations", post(operator_revoke))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared.clone());
    tracing::info!(address = %addr, trust_domain = shared.td.as_str(), "tessera authority listening (mTLS)");
    let td = shared.td.clone();
    let server = crate::transport::tls::TlsServer {
        listener,
        config: tls_config,
        app,
        max_connections: config.max_connections,
        // The node a connection's client certificate names, and until when.
        peer: move |conn: &rustls::ServerConnection| {
            let leaf = conn.peer_certificates().and_then(|c| c.first());
            let id = leaf.and_then(|c| Some((tls::spiffe_id_of(c)?, tls::not_after(c)?)));
            PeerNode(
                leaf.and_then(|c| {
                    let node = Node::from_spiffe_id(&tls::spiffe_id_of(c)?, &td)?;
                    Some((
                        node,
                        tls::not_after(c)?,
                        crate::identity::certs::serial_hex(c),
                    ))
                }),
                id,
            )
        },
    };
    tasks.push(tokio::spawn(server.serve(shutdown.clone())));
    stop_on_error.disarm();
    Ok(RunningAuthority {
        addr,
        admin_addr,
        entries,
        authority: shared.authority.clone(),
        federation_metrics,
        kube: shared.kube.clone(),
        database,
        shutdown,
        tasks,
    })
}

const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// The authority's own certificate: SPIFFE ID `/tessera/authority` plus the
/// DNS name agents verify, over a fresh key, trusting the bundle's CAs for
/// client certificates.
fn serving_tls(s: &Shared) -> Result<Arc<rustls::ServerConfig>, ServingCertError> {
    let id = spiffe::SpiffeId::new(format!(
        "{}{}authority",
        s.td.id_string(),
        super::RESERVED_PATH
    ))?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let signed = s.authority.sign_svid(
        &id,
        &key,
        SERVING_CERT_TTL,
        std::slice::from_ref(&s.config.server_name),
    )?;
    let bundle = s.authority.trust_store().current();
    let cas = split_der_certs(&bundle.x509)?;
    let roots = tls::roots(cas.iter().copied())?;
    Ok(tls::server_config(
        roots,
        &signed.cert_der,
        &key.serialize_der(),
    )?)
}

fn bundle_doc(s: &Shared) -> BundleDoc {
    let bundle = s.authority.trust_store().current();
    BundleDoc {
        // The bundle is ours, built from parsed certificates: it splits.
        x509_authorities: split_der_certs(&bundle.x509)
            .unwrap_or_default()
            .iter()
            .map(|c| B64.encode(c))
            .collect(),
        jwt_keys: bundle
            .jwt_keys
            .iter()
            .map(|k| k.to_json("jwt-svid"))
            .collect(),
        access_keys: s
            .authority
            .trust_store()
            .access_keys()
            .iter()
            .map(|k| k.to_json("sig"))
            .collect(),
        wit_keys: bundle
            .wit_keys
            .iter()
            .map(|k| k.to_json("wit-svid"))
            .collect(),
        // What this replica's federation relationships fetched (see
        // `app::authority`), relayed as received.
        federated_bundles: bundle
            .federated
            .iter()
            .map(|(name, b)| {
                (
                    name.clone(),
                    String::from_utf8_lossy(&b.document).into_owned(),
                )
            })
            .collect(),
    }
}

impl Shared {
    fn count(&self, kind: &'static str, result: &'static str) {
        self.requests.get_or_create(&Labels { kind, result }).inc();
    }

    /// Writes an audit record; a write failure is logged, never hidden.
    async fn audit(&self, record: serde_json::Value) {
        if let Err(e) = self.audit.append_value(record).await {
            tracing::error!(error = %e, "could not write the authority audit log");
        }
    }

    async fn refuse(&self, kind: &'static str, node: Option<&Node>, subject: &str, reason: &str) {
        self.count(kind, "refused");
        tracing::warn!(kind, node = ?node.map(|n| &n.name), subject, reason, "refused");
        self.audit(json!({
            "event": "refused",
            "kind": kind,
            "node": node.map(|n| n.name.clone()),
            "subject": subject,
            "reason": reason,
        }))
        .await;
    }

    /// What the authority knows about `node`'s workloads, from the API
    /// (`fresh` bypasses the short pod cache).
    async fn facts(
        &self,
        node: &Node,
        fresh: bool,
    ) -> Result<Vec<tessera_attestor::SelectorSet>, ApiError> {
        let pods = match (node.kind, &self.kube) {
            (NodeKind::Kubernetes, Some(k)) => Some(
                k.pods_on_node(&node.name, fresh)
                    .await
                    .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?,
            ),
            (NodeKind::Kubernetes, None) => {
                return Err(ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Kubernetes is not configured on this authority".into(),
                ));
            }
            _ => None,
        };
        Ok(entitlement::facts(node, pods.as_deref()))
    }

    /// Whether `node` may have `id`; on a miss with cached pods, looks again
    /// with a fresh pod list (a pod scheduled a moment ago).
    async fn entitled(
        &self,
        node: &Node,
        id: &spiffe::SpiffeId,
    ) -> Result<Option<crate::entries::Entry>, ApiError> {
        let facts = self.facts(node, false).await?;
        if let Some(e) = entitlement::entitling_entry(&self.entries.current().all, &facts, id) {
            return Ok(Some(e.clone()));
        }
        if node.kind == NodeKind::Kubernetes {
            let facts = self.facts(node, true).await?;
            return Ok(
                entitlement::entitling_entry(&self.entries.current().all, &facts, id).cloned(),
            );
        }
        Ok(None)
    }

    fn parse_csr(&self, b64: &str) -> Result<CertificateSigningRequestParams, String> {
        let der = B64
            .decode(b64)
            .map_err(|e| format!("csr is not base64: {e}"))?;
        let csr = CertificateSigningRequestParams::from_der(&der.into())
            .map_err(|e| format!("csr is not a valid, self-signed PKCS#10 request: {e}"))?;
        if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err("csr key must be ECDSA P-256".into());
        }
        Ok(csr)
    }

    fn node_svid(
        &self,
        node: &Node,
        csr: &CertificateSigningRequestParams,
    ) -> Result<wire::NodeSvidResponse, ApiError> {
        let id = node.spiffe_id(&self.td).map_err(bad)?;
        let signed = self
            .authority
            .sign_svid(&id, &csr.public_key, self.config.node_svid_ttl, &[])
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Ok(wire::NodeSvidResponse {
            node_id: id.to_string(),
            svid: B64.encode(&signed.cert_der),
            bundle: bundle_doc(self),
        })
    }
}

/// The node that makes this request. Its certificate was verified at the
/// handshake; it must also still be valid now, since a connection (kept
/// alive by the client) can outlive it.
fn require_node(peer: &PeerNode, now: SystemTime) -> Result<Node, ApiError> {
    match &peer.0 {
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "a node SVID is required as the TLS client certificate".into(),
        )),
        Some((_, not_after, _)) if *not_after <= now => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "the node SVID presented on this connection has expired; reconnect with a valid one"
                .into(),
        )),
        Some((node, _, _)) => Ok(node.clone()),
    }
}

impl Shared {
    /// What a long-lived stream for `peer` runs under: a token of its own,
    /// cancelled at the authority's shutdown, at the node's denial, and by
    /// the stream itself when it ends.
    fn stream_token(&self, node: &Node, peer: &PeerNode) -> CancellationToken {
        match &self.nodes {
            Some(n) => n.guard(
                node,
                peer.0.as_ref().and_then(|(_, _, s)| s.clone()),
                &self.shutdown,
            ),
            None => self.shutdown.child_token(),
        }
    }

    /// The node that makes this request ([`require_node`]), unless a
    /// `NodeDenial` names it or the node SVID it presents (403, audited).
    async fn node(&self, peer: &PeerNode) -> Result<Node, ApiError> {
        let node = require_node(peer, self.clock.now())?;
        let serial = peer.0.as_ref().and_then(|(_, _, s)| s.as_deref());
        self.not_denied(&node, serial).await?;
        Ok(node)
    }

    async fn not_denied(&self, node: &Node, serial: Option<&str>) -> Result<(), ApiError> {
        if let Some(why) = self.nodes.as_ref().and_then(|n| n.denied(node, serial)) {
            self.refuse("node", Some(node), &node.name, &format!("denied by {why}"))
                .await;
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("this node is denied ({why}); an operator must delete the NodeDenial"),
            ));
        }
        Ok(())
    }
}

async fn attest(
    State(s): State<Arc<Shared>>,
    Json(req): Json<wire::AttestRequest>,
) -> Result<Json<wire::NodeSvidResponse>, ApiError> {
    let allowed = s.attest_budget.lock().try_take(tokio::time::Instant::now());
    if !allowed {
        s.count("attest", "rate_limited");
        return Err(ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            "too many node attestations; retry shortly".into(),
        ));
    }
    let csr = s.parse_csr(&req.csr).map_err(bad)?;
    let now = s.clock.now();
    let (node, detail) = match req.method.as_str() {
        "join_token" => {
            if s.config.join_token_dir.is_none() && s.nodes.is_none() {
                s.refuse("attest", None, "join_token", "join tokens are not enabled")
                    .await;
                return Err(ApiError(
                    StatusCode::UNAUTHORIZED,
                    "join tokens are not enabled on this authority".into(),
                ));
            }
            let mut redeemed = Err(join::JoinError::Unknown.to_string());
            if let Some(dir) = &s.config.join_token_dir {
                // A rename and a small read in a directory shared by
                // replicas (possibly a network volume): off the runtime.
                let (dir, token) = (dir.clone(), req.token.clone());
                redeemed = tokio::task::spawn_blocking(move || join::redeem(&dir, &token, now))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
            }
            // Not in the directory: the Kubernetes API (JoinToken objects).
            if let (Err(_), Some(nodes)) = (&redeemed, &s.nodes)
                && redeemed.as_ref().err() == Some(&join::JoinError::Unknown.to_string())
            {
                redeemed = nodes
                    .redeem(&req.token, now)
                    .await
                    .map_err(|e| e.to_string());
            }
            match redeemed {
                Ok(name) => (
                    Node {
                        kind: NodeKind::Joined,
                        name,
                    },
                    json!(null),
                ),
                Err(e) => {
                    s.refuse("attest", None, "join_token", &e).await;
                    return Err(ApiError(StatusCode::UNAUTHORIZED, e));
                }
            }
        }
        "k8s_psat" => {
            let Some(kube) = &s.kube else {
                s.refuse("attest", None, "k8s_psat", "Kubernetes is not configured")
                    .await;
                return Err(ApiError(
                    StatusCode::UNAUTHORIZED,
                    "k8s_psat is not enabled on this authority".into(),
                ));
            };
            match kube.review_token(&req.token).await {
                Ok(r) => (
                    Node {
                        kind: NodeKind::Kubernetes,
                        name: r.node_name,
                    },
                    json!(r.agent_pod),
                ),
                Err(ReviewError::Unavailable(e)) => {
                    // Nothing is known about the token: the agent retries
                    // (or another replica answers).
                    s.count("attest", "error");
                    tracing::warn!(error = %e, "cannot review a node's token");
                    return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e));
                }
                Err(ReviewError::Rejected(e)) => {
                    // The detail (the API server's own error text, which
                    // service accounts are allowed) is for the operator: it
                    // goes to the log and the audit record, not to an
                    // unauthenticated caller.
                    s.refuse("attest", None, "k8s_psat", &e).await;
                    return Err(ApiError(
                        StatusCode::UNAUTHORIZED,
                        "the token does not attest a node; the authority's log says why".into(),
                    ));
                }
            }
        }
        other => {
            return Err(bad(format!(
                "unknown attestation method {other:?} (k8s_psat, join_token)"
            )));
        }
    };
    s.not_denied(&node, None).await?;
    let resp = s.node_svid(&node, &csr)?;
    s.count("attest", "signed");
    tracing::info!(node = %resp.node_id, method = %req.method, "node attested");
    s.audit(json!({"event": "node_attested", "method": req.method, "node": resp.node_id, "agent_pod": detail}))
        .await;
    Ok(Json(resp))
}

async fn renew(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<PeerNode>,
    Json(req): Json<wire::RenewRequest>,
) -> Result<Json<wire::NodeSvidResponse>, ApiError> {
    let node = s.node(&peer).await?;
    if node.kind == NodeKind::Kubernetes {
        // A Kubernetes node proves itself afresh with its (rotating,
        // pod-bound) token, so a node SVID stolen from it dies with its TTL.
        s.refuse(
            "renew",
            Some(&node),
            &node.name,
            "Kubernetes nodes attest again instead of renewing",
        )
        .await;
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "Kubernetes nodes attest again with their projected token instead of renewing".into(),
        ));
    }
    let csr = s.parse_csr(&req.csr).map_err(bad)?;
    let resp = s.node_svid(&node, &csr)?;
    s.count("renew", "signed");
    Ok(Json(resp))
}

async fn sign(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<PeerNode>,
    Json(req): Json<wire::SignRequest>,
) -> Result<Json<wire::SignResponse>, ApiError> {
    let node = s.node(&peer).await?;
    if req.x509.len() + req.jwt.len() + req.wit.len() > wire::MAX_BATCH {
        return Err(bad(format!(
            "at most {} items per request",
            wire::MAX_BATCH
        )));
    }
    let mut out = wire::SignResponse::default();
    let refused = |e: String| wire::Signed {
        svid: None,
        error: Some(e),
    };
    for item in &req.x509 {
        let csr = match s.parse_csr(&item.csr) {
            Ok(c) => c,
            Err(e) => {
                out.x509.push(refused(e));
                continue;
            }
        };
        let uris: Vec<&str> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|n| match n {
                rcgen::SanType::URI(u) => Some(u.as_str()),
                _ => None,
            })
            .collect();
        let id = match uris.as_slice() {
            [one] => spiffe::SpiffeId::new(one)
                .ok()
                .filter(|id| id.is_member_of(&s.td)),
            _ => None,
        };
        let Some(id) = id else {
            out.x509.push(refused(
                "the csr must carry exactly one URI SAN, a SPIFFE ID of this trust domain".into(),
            ));
            continue;
        };
        let Some(entry) = s.entitled(&node, &id).await? else {
            s.refuse(
                "x509",
                Some(&node),
                &id.to_string(),
                "no entry entitles this node to the ID",
            )
            .await;
            out.x509.push(refused(format!(
                "node {} is not entitled to {id}",
                node.name
            )));
            continue;
        };
        let ttl = Duration::from_secs(item.ttl_seconds.max(1)).min(entry.x509_ttl);
        match s.authority.sign_svid(&id, &csr.public_key, ttl, &[]) {
            Ok(signed) => {
                s.count("x509", "signed");
                out.x509.push(wire::Signed {
                    svid: Some(B64.encode(&signed.cert_der)),
                    error: None,
                });
            }
            Err(e) => {
                s.count("x509", "error");
                out.x509.push(refused(e.to_string()));
            }
        }
    }
    for item in &req.jwt {
        let id = match spiffe::SpiffeId::new(&item.spiffe_id) {
            Ok(id) if id.is_member_of(&s.td) => id,
            _ => {
                out.jwt.push(refused(
                    "spiffe_id is not a SPIFFE ID of this trust domain".into(),
                ));
                continue;
            }
        };
        if item.audience.is_empty() || item.audience.iter().any(|a| a.is_empty() || a.len() > 1024)
        {
            out.jwt.push(refused(
                "audience must be 1 or more non-empty values".into(),
            ));
            continue;
        }
        let Some(entry) = s.entitled(&node, &id).await? else {
            s.refuse(
                "jwt",
                Some(&node),
                &id.to_string(),
                "no entry entitles this node to the ID",
            )
            .await;
            out.jwt.push(refused(format!(
                "node {} is not entitled to {id}",
                node.name
            )));
            continue;
        };
        let ttl = Duration::from_secs(item.ttl_seconds.max(1)).min(entry.jwt_ttl);
        match s.authority.mint_jwt(&id, &item.audience, ttl) {
            Ok(j) => {
                s.count("jwt", "signed");
                out.jwt.push(wire::Signed {
                    svid: Some(j.token),
                    error: None,
                });
            }
            Err(e) => {
                s.count("jwt", "error");
                out.jwt.push(refused(e.to_string()));
            }
        }
    }
    for item in &req.wit {
        let id = match spiffe::SpiffeId::new(&item.spiffe_id) {
            Ok(id) if id.is_member_of(&s.td) => id,
            _ => {
                out.wit.push(refused(
                    "spiffe_id is not a SPIFFE ID of this trust domain".into(),
                ));
                continue;
            }
        };
        let Some(entry) = s.entitled(&node, &id).await? else {
            s.refuse(
                "wit",
                Some(&node),
                &id.to_string(),
                "no entry entitles this node to the ID",
            )
            .await;
            out.wit.push(refused(format!(
                "node {} is not entitled to {id}",
                node.name
            )));
            continue;
        };
        let ttl = Duration::from_secs(item.ttl_seconds.max(1)).min(entry.wit_ttl);
        // mint_wit accepts only a public P-256 ES256 key as cnf.
        match s.authority.mint_wit(&id, &item.jwk, ttl) {
            Ok(w) => {
                s.count("wit", "signed");
                out.wit.push(wire::Signed {
                    svid: Some(w.token),
                    error: None,
                });
            }
            Err(e) => {
                s.count("wit", "error");
                out.wit.push(refused(e.to_string()));
            }
        }
    }
    Ok(Json(out))
}

async fn access_token(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<PeerNode>,
    Json(req): Json<wire::AccessTokenRequest>,
) -> Result<Json<wire::AccessTokenResponse>, ApiError> {
    let node = s.node(&peer).await?;
    let claims = &req.claims;
    let sub = claims
        .get("sub")
        .and_then(|v| v.as_str())
        .and_then(|s| spiffe::SpiffeId::new(s).ok())
        .filter(|id| id.is_member_of(&s.td))
        .ok_or_else(|| bad("claims.sub must be a SPIFFE ID of this trust domain"))?;
    let now = crate::clock::unix_seconds(s.clock.now());
    let exp = claims
        .get("exp")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| bad("claims.exp is required"))?;
    if exp <= now || exp - now > s.config.max_access_token_ttl.as_secs() {
        return Err(bad(format!(
            "claims.exp must be in the future and at most {} away",
            humantime::format_duration(s.config.max_access_token_ttl)
        )));
    }
    if s.entitled(&node, &sub).await?.is_none() {
        s.refuse(
            "access_token",
            Some(&node),
            &sub.to_string(),
            "the token's subject does not run on this node",
        )
        .await;
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("node {} is not entitled to {sub}", node.name),
        ));
    }
    let token = s
        .authority
        .sign_access_token(&claims.to_string())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    s.count("access_token", "signed");
    Ok(Json(wire::AccessTokenResponse { token }))
}

/// The fleet's state, or why this replica has none.
fn fleet_state(s: &Shared) -> Result<&Arc<FleetState>, ApiError> {
    s.fleet_state.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "this authority keeps no fleet state ([server.store] is not set)".into(),
        )
    })
}

/// A node hands over what it revoked; answered once the store holds it.
async fn revocations(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<PeerNode>,
    Json(req): Json<wire::RevocationsRequest>,
) -> Result<Json<wire::RevocationsAccepted>, ApiError> {
    let now = s.clock.now();
    let node = s.node(&peer).await?;
    let state = fleet_state(&s)?;
    let records = feed::admit(req.revocations, now, s.config.max_access_token_ttl).map_err(bad)?;
    let stored = records.len();
    if stored > 0 {
        if let Err(e) = state.writer.revoke(records).await {
            s.count("revocations", "error");
            return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()));
        }
        s.count("revocations", "stored");
        s.audit(json!({"event": "fleet.revocations", "node": node.name, "count": stored}))
            .await;
    }
    Ok(Json(wire::RevocationsAccepted { stored }))
}

/// The `cursor` of `?cursor=N` (0 when absent).
fn stream_cursor(uri: &axum::http::Uri) -> Result<u64, ApiError> {
    let Some(value) = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("cursor="))
    else {
        return Ok(0);
    };
    value
        .parse()
        .map_err(|_| bad("cursor must be the number the stream last sent"))
}

/// A node follows the fleet's revocations from its cursor on.
async fn stream(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<PeerNode>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let node = s.node(&peer).await?;
    let cursor = stream_cursor(&uri)?;
    let not_after = peer.node_not_after();
    let state = fleet_state(&s)?;
    Ok(feed::stream(
        state.view.clone(),
        cursor,
        not_after,
        s.clock.clone(),
        s.stream_token(&node, &peer),
    ))
}

async fn bundle(State(s): State<Arc<Shared>>) -> Json<BundleDoc> {
    Json(bundle_doc(&s))
}

/// Ready while a CA can sign now and, with `[server.kubernetes]`, the
/// Kubernetes API accepts the authority's token and RBAC lets it review
/// tokens and list pods (without them every attestation would fail), and
/// with `[server.store]` once the fleet's revocations are loaded.
async fn readyz(State(s): State<Arc<Shared>>) -> (StatusCode, String) {
    if s.authority
        .active_ca_expiry()
        .is_none_or(|t| t <= s.clock.now())
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no valid CA in server.keys_dir\n".into(),
        );
    }
    if let Some(kube) = &s.kube
        && let Err(why) = kube.access().await
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: server.kubernetes: {why}\n"),
        );
    }
    if s.config.registration.is_some() && !s.entries.is_synced() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: server.registration: the live registration entries are not listed yet\n"
                .into(),
        );
    }
    if let Some(nodes) = &s.nodes
        && !nodes.is_synced()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: server.store: the node denials are not listed yet\n".into(),
        );
    }
    if let Some(state) = &s.fleet_state
        && !state.view.is_synced()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: server.store: the fleet's revocations are not loaded from {} yet\n",
                state.backend
            ),
        );
    }
    (StatusCode::OK, "ready\n".into())
}

fn fleet_approvals(s: &Shared) -> Result<&Arc<super::approvals::FleetApprovals>, ApiError> {
    s.approvals.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "fleet-wide approvals are not enabled on this authority ([server.store] approvals = true)".into(),
        )
    })
}

/// `POST /v1/approvals` ([`super::approvals`]): a node's pending approvals.
async fn approvals_publish(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<PeerNode>,
    Json(req): Json<wire::ApprovalsRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let node = s.node(&peer).await?;
    let approvals = fleet_approvals(&s)?;
    if req.pending.len() > super::approvals::MAX_PENDING {
        return Err(bad(format!(
            "at most {} pending approvals per request",
            super::approvals::MAX_PENDING
        )));
    }
    let created = approvals
        .publish(&node.name, req.pending)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e))?;
    if created > 0 {
        s.audit(json!({"event": "fleet.approvals", "node": node.name, "count": created}))
            .await;
    }
    Ok(Json(json!({"created": created})))
}

/// `GET /v1/approvals/decisions`: decisions for the calling node.
async fn approvals_stream(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<PeerNode>,
) -> Result<Response, ApiError> {
    let node = s.node(&peer).await?;
    let approvals = fleet_approvals(&s)?;
    let not_after = peer.node_not_after();
    let until = s.stream_token(&node, &peer);
    Ok(approvals.stream(node.name, not_after, s.clock.clone(), until))
}

impl Shared {
    /// The operator making this request ([`super::operator::authorize`]);
    /// a refusal is audited.
    async fn operator(
        &self,
        peer: &PeerNode,
        kind: &'static str,
    ) -> Result<spiffe::SpiffeId, ApiError> {
        match super::operator::authorize(&self.config.operators, peer.1.as_ref(), self.clock.now())
        {
            Ok(id) => Ok(id),
            Err((status, why)) => {
                let subject = peer
                    .1
                    .as_ref()
                    .map(|(id, _)| id.to_string())
                    .unwrap_or_default();
                self.refuse(kind, None, &subject, &why).await;
                Err(ApiError(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN),
                    why,
                ))
            }
        }
    }
}

/// The value of `name` in the request's query, decoded.
fn query_param(uri: &axum::http::Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `GET /v1/operator/approvals`: every approval the fleet holds.
async fn operator_approvals(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<PeerNode>,
) -> Result<Json<serde_json::Value>, ApiError> {
    s.operator(&peer, "operator_approvals").await?;
    let approvals = fleet_approvals(&s)?;
    Ok(Json(json!(
        approvals.list(crate::clock::unix_seconds(s.clock.now()))
    )))
}

/// `POST /v1/operator/approvals/{id}/{approve|deny}`: an operator's
/// decision, written to the Kubernetes API; the waiting node applies and
/// audits it.
async fn operator_decide(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<PeerNode>,
    axum::extract::Path((id, action)): axum::extract::Path<(String, String)>,
    uri: axum::http::Uri,
) -> Result<Json<serde_json::Value>, ApiError> {
    let operator = s.operator(&peer, "operator_decision").await?;
    let approve = match action.as_str() {
        "approve" => true,
        "deny" => false,
        _ => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                "use approve or deny".into(),
            ));
        }
    };
    let approvals = fleet_approvals(&s)?;
    let node = query_param(&uri, "node");
    let now = crate::clock::unix_seconds(s.clock.now());
    use super::approvals::DecideError;
    match approvals
        .decide(&id, node.as_deref(), approve, &operator, now)
        .await
    {
        Ok(decided) => {
            s.count("operator_decision", "decided");
            s.audit(json!({
                "event": "operator.approval.decision",
                "operator": operator.to_string(),
                "node": decided["node"],
                "approval_id": decided["id"],
                "decision": if approve { "approved" } else { "denied" },
            }))
            .await;
            Ok(Json(decided))
        }
        Err(e) => {
            let status = match e {
                DecideError::NotFound(_) => StatusCode::NOT_FOUND,
                DecideError::Ambiguous(_) => StatusCode::BAD_REQUEST,
                DecideError::AlreadyDecided { .. } | DecideError::Expired(_) => {
                    StatusCode::CONFLICT
                }
                DecideError::Kube(_) | DecideError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            s.count("operator_decision", "refused");
            Err(ApiError(status, e.to_string()))
        }
    }
}

/// `POST /v1/operator/revocations`: a token or a task revoked at the
/// authority, stored for every node as a node's revocations are.
async fn operator_revoke(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<PeerNode>,
    Json(req): Json<super::operator::RevokeRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    use crate::revocation::{Kind, Record};
    let operator = s.operator(&peer, "operator_revocation").await?;
    let state = fleet_state(&s)?;
    let now = s.clock.now();
    let max_ttl = s.config.max_access_token_ttl;
    let (record, what) = match (&req.token, &req.task_id, &req.principal) {
        (Some(token), None, None) => {
            let keys = s.authority.trust_store().access_keys();
            let verified =
                crate::identity::jws::verify_access_token(token, keys.iter()).map_err(|e| {
                    bad(format!(
                        "token: not an access token this trust domain signed: {e}"
                    ))
                })?;
            let c = &verified.claims;
            let jti = c.get("jti").and_then(|v| v.as_str()).unwrap_or_default();
            let exp = c.get("exp").and_then(|v| v.as_u64()).unwrap_or(0);
            (
                Record {
                    k: Kind::Jti,
                    id: jti.to_string(),
                    until: exp,
                },
                json!({"jti": jti, "task_id": c.get("txn"), "token_sha256": crate::audit::sha256_hex(token.as_bytes())}),
            )
        }
        (None, Some(task), Some(principal)) => {
            let principal_id = spiffe::SpiffeId::new(principal)
                .ok()
                .filter(|id| id.is_member_of(&s.td))
                .ok_or_else(|| bad("principal must be a SPIFFE ID of this trust domain"))?;
            (
                Record {
                    k: Kind::Task,
                    id: crate::revocation::task_key(&principal_id.to_string(), task),
                    // Any token of the task expires within the longest TTL.
                    until: crate::clock::unix_seconds(now) + max_ttl.as_secs() + 60,
                },
                json!({"principal": principal_id.to_string(), "task_id": task}),
            )
        }
        _ => {
            return Err(bad(
                "give token, or task_id together with principal (the SPIFFE ID whose task it is)",
            ));
        }
    };
    if req
        .task_id
        .as_deref()
        .is_some_and(|t| t.is_empty() || t.len() > crate::revocation::MAX_ID_BYTES)
    {
        return Err(bad("task_id must be 1 to 256 bytes"));
    }
    let records = feed::admit(vec![record], now, max_ttl).map_err(bad)?;
    let stored = records.len();
    if stored > 0
        && let Err(e) = state.writer.revoke(records).await
    {
        s.count("operator_revocation", "error");
        return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()));
    }
    s.count("operator_revocation", "stored");
    let mut record =
        json!({"event": "operator.revoke", "operator": operator.to_string(), "stored": stored});
    if let (Some(r), Some(w)) = (record.as_object_mut(), what.as_object()) {
        r.extend(w.clone());
    }
    s.audit(record).await;
    Ok(Json(json!({"revoked": stored})))
}

/// `GET /v1/entries` ([`super::registration::stream`]).
async fn entries_stream(
    State(s): State<Arc<Shared>>,
    Extension(peer): Extension<PeerNode>,
) -> Result<Response, ApiError> {
    let node = s.node(&peer).await?;
    if s.config.registration.is_none() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "live registration is not enabled on this authority ([server.registration])".into(),
        ));
    }
    let not_after = peer.node_not_after();
    Ok(super::registration::stream(
        &s.entries,
        node.name.clone(),
        not_after,
        s.clock.clone(),
        s.stream_token(&node, &peer),
    ))
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &s.registry);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
}
