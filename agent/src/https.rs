//! The trust domain's HTTPS face: what relying parties that cannot reach
//! the node's Unix sockets fetch to trust Tessera identities, under one
//! `https://` issuer URL (`https.issuer`), which JWT-SVIDs then carry as
//! `iss`.
//!
//! | route | what |
//! |---|---|
//! | `GET /.well-known/openid-configuration` | OpenID Provider metadata (issuer, `jwks_uri`), as cloud workload identity federation and OAuth servers doing RFC 7523 expect |
//! | `GET /keys` | the JWT-SVID verification keys (JWKS) |
//! | `GET /token-keys` | the task-token (access-token) verification keys, when the exchange is on |
//! | `GET /bundle` | the SPIFFE bundle (an `https_web` bundle endpoint) |
//!
//! With the exchange on, its routes are mounted here too (token endpoint,
//! RFC 8414 metadata, introspection and revocation: `exchange::remote`).
//!
//! Served over TLS on `https.listen`. The certificate is the operator's
//! (`https.cert_file` and `key_file`, for a public CA; re-read when either
//! file changes) or issued by the trust domain's CA for `https.server_name`
//! and renewed at half its life; clients then trust the trust domain's
//! bundle (`tessera api fetch x509 --write` writes it).
//!
//! The face asks every client for a certificate but requires none: an
//! X509-SVID of this trust domain (verified against the bundle current at
//! the handshake, so a CA rollover applies at once) authenticates resource
//! servers at introspection and revocation, and binds tokens to it. There is
//! no session resumption, so every connection proves its certificate afresh.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rustls::DistinguishedName;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::identity::{LocalAuthority, SignError, TrustStore};
use crate::sync::Mutex;

/// The `[https]` table, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsConfig {
    pub listen: SocketAddr,
    /// `None`: `https://<server_name>:<bound port>`.
    pub issuer: Option<String>,
    /// DNS name in an issued serving certificate; defaults to the issuer's
    /// host, or `localhost`.
    pub server_name: Option<String>,
    /// Operator-provided certificate chain and PKCS#8 key (PEM).
    pub files: Option<(PathBuf, PathBuf)>,
    /// How often the files are checked for a change (and an issued
    /// certificate for renewal).
    pub reload_interval: Duration,
    pub max_connections: usize,
}

impl HttpsConfig {
    /// The DNS name an issued certificate carries.
    fn server_name(&self) -> String {
        self.server_name
            .clone()
            .or_else(|| self.issuer.as_deref().and_then(issuer_host))
            .unwrap_or_else(|| "localhost".into())
    }
}

/// The host of an `https://host[:port][/path]` URL.
pub fn issuer_host(issuer: &str) -> Option<String> {
    let rest = issuer.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    (!host.is_empty()).then(|| host.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    #[error("https.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTPS serving certificate: {0}")]
    Sign(#[from] SignError),
    #[error("the HTTPS serving certificate: {0}")]
    Key(#[from] rcgen::Error),
    #[error("the HTTPS serving certificate: {0}")]
    Tls(#[from] rustls::Error),
    #[error("reading {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error(
        "https without cert_file and key_file needs this agent's own CA; in upstream mode give the certificate files"
    )]
    NoLocalCa,
}

/// A bound listener and the issuer URL it serves.
pub struct Bound {
    listener: tokio::net::TcpListener,
    pub issuer: String,
    pub addr: SocketAddr,
}

/// Binds `https.listen` (so that port 0 can name the issuer).
pub async fn bind(config: &HttpsConfig) -> Result<Bound, HttpsError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| HttpsError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| HttpsError::Bind {
        addr: config.listen,
        source,
    })?;
    let issuer = config
        .issuer
        .clone()
        .unwrap_or_else(|| format!("https://{}:{}", config.server_name(), addr.port()));
    Ok(Bound {
        listener,
        issuer,
        addr,
    })
}

/// Device, inode, size, mtime seconds and nanoseconds of a file.
type FileStamp = (u64, u64, u64, i64, i64);

/// Where the serving certificate comes from.
enum Source {
    Files(PathBuf, PathBuf),
    Issued {
        authority: Arc<LocalAuthority>,
        server_name: String,
    },
}

/// Lifetime of an issued serving certificate (renewed at half of it).
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);

impl Source {
    /// A TLS configuration, and when it must be renewed (files: never, the
    /// files are watched instead).
    fn load(
        &self,
        now: SystemTime,
        clients: &Arc<BundleClientVerifier>,
    ) -> Result<(rustls::ServerConfig, Option<SystemTime>), HttpsError> {
        let (chain, key, renew_at) = match self {
            Source::Files(cert, key) => {
                let read = |p: &PathBuf| {
                    std::fs::read(p).map_err(|source| HttpsError::File {
                        path: p.clone(),
                        source,
                    })
                };
                let pem_err = |p: &PathBuf, e: crate::identity::pem::PemError| HttpsError::Pem {
                    path: p.clone(),
                    message: e.to_string(),
                };
                let chain = crate::identity::pem::decode_certs(&read(cert)?)
                    .map_err(|e| pem_err(cert, e))?;
                let pkcs8 = crate::identity::pem::decode_pkcs8_key(&read(key)?)
                    .map_err(|e| pem_err(key, e))?;
                (chain, pkcs8, None)
            }
            Source::Issued {
                authority,
                server_name,
            } => {
                let id = spiffe::SpiffeId::new(format!(
                    "{}/tessera/https",
                    authority.trust_domain().id_string()
                ))
                .map_err(|e| HttpsError::Pem {
                    path: PathBuf::new(),
                    message: e.to_string(),
                })?;
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                let signed = authority.sign_svid(
                    &id,
                    &key,
                    SERVING_TTL,
                    std::slice::from_ref(server_name),
                )?;
                let life = signed
                    .not_after
                    .duration_since(now)
                    .unwrap_or(Duration::ZERO);
                (
                    vec![signed.cert_der.to_vec()],
                    key.serialize_der(),
                    Some(now + life / 2),
                )
            }
        };
        let mut config = rustls::ServerConfig::builder_with_provider(clients.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(clients.clone())
            .with_single_cert(
                chain.into_iter().map(CertificateDer::from).collect(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )?;
        // A resumed session skips the client certificate check: a client
        // whose X509-SVID expired would keep its identity.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok((config, renew_at))
    }

    /// What identifies the files' current contents: device, inode, size
    /// and mtime of each (a Secret update swaps a symlink to new files; an
    /// editor rewrites in place), `None` for issued certificates.
    fn fingerprint(&self) -> Option<Vec<FileStamp>> {
        use std::os::unix::fs::MetadataExt;
        match self {
            Source::Files(cert, key) => Some(
                [cert, key]
                    .iter()
                    .map(|p| {
                        std::fs::metadata(p).map_or((0, 0, 0, 0, 0), |m| {
                            (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec())
                        })
                    })
                    .collect(),
            ),
            Source::Issued { .. } => None,
        }
    }
}

/// Verifies TLS client certificates against the trust domain's X.509
/// bundle as it is at each handshake; a client without one is let in (the
/// routes decide what they need).
pub struct BundleClientVerifier {
    trust: Arc<TrustStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The verifier for the bundle of this sequence number.
    built: Mutex<Option<(u64, Arc<dyn ClientCertVerifier>)>>,
}

impl std::fmt::Debug for BundleClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleClientVerifier")
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

impl BundleClientVerifier {
    pub fn new(trust: Arc<TrustStore>) -> Arc<Self> {
        Arc::new(Self {
            trust,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            built: Mutex::new(None),
        })
    }

    fn current(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let bundle = self.trust.current();
        if let Some((sequence, verifier)) = &*self.built.lock()
            && *sequence == bundle.sequence
        {
            return Ok(verifier.clone());
        }
        let mut roots = rustls::RootCertStore::empty();
        let cas = crate::identity::pem::split_der_certs(&bundle.x509)
            .map_err(|e| rustls::Error::General(format!("the trust bundle: {e}")))?;
        for der in cas {
            roots.add(CertificateDer::from(der.to_vec()))?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
        *self.built.lock() = Some((bundle.sequence, verifier.clone()));
        Ok(verifier)
    }
}

impl ClientCertVerifier for BundleClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    /// No hints: the CAs change with the bundle, and clients of the face
    /// hold one SVID at most.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    crate::transport::tls::handshake_signatures_of_provider!(provider);
}

/// The task-token JWKS, when the exchange is on (services do not import
/// each other: the wiring passes it in).
pub type TokenKeys = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// The task tokens under the issuer URL: their keys, and on an agent with
/// the exchange on, the token service's routes (token endpoint, RFC 8414
/// metadata, introspection, revocation). The fleet authority signs task
/// tokens for every node but runs no token service (policy, approvals and
/// revocation stay on the nodes): it publishes the keys only.
pub struct TokenService {
    pub routes: Option<Router>,
    pub keys: TokenKeys,
}

/// The access-token keys a trust store publishes, as a JWKS (the fleet
/// authority's `/token-keys`).
pub fn published_token_keys(trust: Arc<TrustStore>) -> TokenKeys {
    Arc::new(move || jwks(trust.access_keys().iter()))
}

/// Everything the routes read.
#[derive(Clone)]
struct Face {
    issuer: String,
    trust: Arc<TrustStore>,
    token_keys: Option<TokenKeys>,
    /// The token service's routes are mounted.
    token_endpoint: bool,
}

/// Starts serving on `bound`; returns once the first certificate is in place.
pub fn serve(
    config: &HttpsConfig,
    bound: Bound,
    authority: Option<Arc<LocalAuthority>>,
    trust: Arc<TrustStore>,
    token_service: Option<TokenService>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, HttpsError> {
    let source = match (&config.files, authority) {
        (Some((cert, key)), _) => Source::Files(cert.clone(), key.clone()),
        (None, Some(authority)) => Source::Issued {
            authority,
            server_name: config.server_name(),
        },
        (None, None) => return Err(HttpsError::NoLocalCa),
    };
    let source = Arc::new(source);
    let clients = BundleClientVerifier::new(trust.clone());
    let mut loaded = source.fingerprint();
    let (tls, mut renew_at) = source.load(clock.now(), &clients)?;
    let tls = Arc::new(ArcSwap::from_pointee(tls));
    {
        let (tls, shutdown, clock) = (tls.clone(), shutdown.clone(), clock.clone());
        let interval = config.reload_interval;
        tokio::spawn(async move {
            let mut failed = None;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                let now = clock.now();
                // File reads, key generation and signing: off the runtime.
                let check = {
                    let source = source.clone();
                    tokio::task::spawn_blocking(move || source.fingerprint()).await
                };
                let Ok(seen) = check else { continue };
                if renew_at.is_none_or(|t| now < t) && seen == loaded {
                    continue;
                }
                let loading = {
                    let (source, clients) = (source.clone(), clients.clone());
                    tokio::task::spawn_blocking(move || source.load(now, &clients)).await
                };
                let Ok(result) = loading else { continue };
                match result {
                    Ok((config, next)) => {
                        tls.store(Arc::new(config));
                        renew_at = next;
                        loaded = seen;
                        failed = None;
                        tracing::info!("HTTPS serving certificate renewed");
                    }
                    // A half-written file: tried again next round, said once.
                    Err(e) if failed != Some(seen.clone()) => {
                        tracing::error!(error = %e, "could not load the HTTPS serving certificate; keeping the current one");
                        failed = Some(seen);
                    }
                    Err(_) => {}
                }
            }
        });
    }
    let (token_keys, token_routes) = match token_service {
        Some(t) => (Some(t.keys), t.routes),
        None => (None, None),
    };
    let face = Face {
        issuer: bound.issuer.clone(),
        trust,
        token_keys,
        token_endpoint: token_routes.is_some(),
    };
    let mut app = Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/keys", get(keys))
        .route("/token-keys", get(token_jwks))
        .route("/bundle", get(spiffe_bundle))
        .with_state(face);
    if let Some(routes) = token_routes {
        app = app.merge(routes);
    }
    tracing::info!(address = %bound.addr, issuer = %bound.issuer, "HTTPS face listening");
    let server = crate::transport::tls::TlsServer {
        listener: bound.listener,
        config: tls,
        app,
        max_connections: config.max_connections,
        peer: crate::transport::tls::PeerCertificate::of,
    };
    Ok(tokio::spawn(server.serve(shutdown)))
}

fn cacheable(body: serde_json::Value) -> Response {
    ([(header::CACHE_CONTROL, "max-age=60")], axum::Json(body)).into_response()
}

/// OpenID Provider metadata (OpenID Connect Discovery 1.0 §3), the fields
/// SPIRE's discovery provider serves and that relying parties require.
/// With the token service on, it also names the token endpoint and the
/// (non-interactive) authorization endpoint, so OAuth clients that discover
/// by OpenID find it too.
async fn discovery(State(f): State<Face>) -> Response {
    // The algorithms of the keys published now: ES256, RS256 with
    // `jwt_key_type = "rsa-*"`, both while one type replaces the other.
    let mut algs: Vec<&str> = f.trust.current().jwt_keys.iter().map(|k| k.alg()).collect();
    algs.sort_unstable();
    algs.dedup();
    if algs.is_empty() {
        algs.push("ES256");
    }
    let mut doc = json!({
        "issuer": f.issuer,
        "jwks_uri": format!("{}/keys", f.issuer),
        "authorization_endpoint": "",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algs,
    });
    if f.token_endpoint {
        doc["authorization_endpoint"] = format!("{}/authorize", f.issuer).into();
        doc["token_endpoint"] = format!("{}/token", f.issuer).into();
    }
    cacheable(doc)
}

async fn keys(State(f): State<Face>) -> Response {
    let bundle = f.trust.current();
    cacheable(jwks(bundle.jwt_keys.iter()))
}

/// The `spiffe_refresh_hint` of the bundle served at `/bundle`.
const BUNDLE_REFRESH_HINT: Duration = Duration::from_secs(300);

/// The trust domain's SPIFFE bundle (SPIFFE Trust Domain and Bundle §4):
/// with a Web PKI certificate the face is also an `https_web` bundle
/// endpoint for trust domains that federate with this one.
async fn spiffe_bundle(State(f): State<Face>) -> Response {
    match crate::identity::spiffe_bundle::document(&f.trust.current(), BUNDLE_REFRESH_HINT) {
        Ok(doc) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            doc,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot write this trust domain's bundle document");
            (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "the bundle could not be served\n",
            )
                .into_response()
        }
    }
}

async fn token_jwks(State(f): State<Face>) -> Response {
    match &f.token_keys {
        Some(keys) => cacheable(keys()),
        None => (
            axum::http::StatusCode::NOT_FOUND,
            "no task tokens are signed here: the token exchange is not enabled\n",
        )
            .into_response(),
    }
}

fn jwks<'a>(keys: impl Iterator<Item = &'a crate::identity::jws::PublicJwk>) -> serde_json::Value {
    json!({
        "keys": keys.map(|k| {
            let mut j = k.to_json("sig");
            j["alg"] = k.alg().into();
            j
        }).collect::<Vec<_>>()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issuer_host_names_the_certificate() {
        assert_eq!(
            issuer_host("https://tessera.example.com").as_deref(),
            Some("tessera.example.com")
        );
        assert_eq!(
            issuer_host("https://localhost:8443/td").as_deref(),
            Some("localhost")
        );
        assert_eq!(issuer_host("http://x"), None);
    }
}
