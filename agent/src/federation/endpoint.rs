//! The bundle endpoint: `GET /` answers this trust domain's SPIFFE bundle
//! (every published CA, JWT-SVID and WIT-SVID key, `spiffe_sequence`,
//! `spiffe_refresh_hint`) as `application/json`, over TLS in one of the two
//! profiles of the Federation spec §5:
//!
//! * `https_spiffe` (default): the server presents an X509-SVID for
//!   `spiffe://<trust domain>/tessera/bundle-endpoint`, issued by this
//!   trust domain's CA and renewed at half its life. Peers configure that
//!   ID and a bootstrap bundle, then authenticate each fetch with the
//!   bundle they fetched last.
//! * `https_web`: the server presents the operator's Web PKI certificate
//!   (`cert_file`, `key_file`, re-read when they change), for peers that
//!   trust the public CAs.
//!
//! No client certificate is asked for (§5.2: the server MUST NOT require
//! client authentication); anyone may read a bundle, it holds public keys.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::identity::serving_cert::{self, CertFiles, CertSource, IssuedSvid};
use crate::identity::{LocalAuthority, TrustStore, spiffe_bundle};

/// Lifetime of the `https_spiffe` serving certificate.
const SERVING_TTL: Duration = Duration::from_secs(24 * 3600);

/// How the endpoint authenticates itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointProfile {
    HttpsSpiffe,
    HttpsWeb {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
}

/// The `[bundle_endpoint]` table, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    pub listen: SocketAddr,
    pub profile: EndpointProfile,
    /// `spiffe_refresh_hint` of the served bundle.
    pub refresh_hint: Duration,
    /// How often certificate files are checked (and an issued certificate
    /// for renewal).
    pub reload_interval: Duration,
    pub max_connections: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("bundle_endpoint.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the bundle endpoint's serving certificate: {0}")]
    Certificate(#[source] serving_cert::SourceError),
}

/// A serving bundle endpoint.
#[derive(Debug)]
pub struct BundleEndpoint {
    pub addr: SocketAddr,
    /// The SPIFFE ID it presents (`https_spiffe`), for peers' config.
    pub spiffe_id: Option<spiffe::SpiffeId>,
}

#[derive(Clone)]
struct Served {
    trust: Arc<TrustStore>,
    refresh_hint: Duration,
}

/// Binds and serves until `shutdown`. `authority` signs the `https_spiffe`
/// certificate (this trust domain's CA: a single-node agent's own, or the
/// fleet authority's).
pub async fn serve(
    config: &EndpointConfig,
    trust: Arc<TrustStore>,
    authority: Arc<LocalAuthority>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> Result<BundleEndpoint, EndpointError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| EndpointError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| EndpointError::Bind {
            addr: config.listen,
            source,
        })?;
    let (source, spiffe_id): (Arc<dyn CertSource>, _) = match &config.profile {
        EndpointProfile::HttpsSpiffe => {
            let id = super::endpoint_spiffe_id(trust.trust_domain());
            let source = IssuedSvid {
                authority,
                id: id.clone(),
                dns_names: Vec::new(),
                ttl: SERVING_TTL,
            };
            (Arc::new(source), Some(id))
        }
        EndpointProfile::HttpsWeb {
            cert_file,
            key_file,
        } => {
            let files = CertFiles {
                cert: cert_file.clone(),
                key: key_file.clone(),
            };
            (Arc::new(files), None)
        }
    };
    let tls = serving_cert::keep_current(
        source,
        config.reload_interval,
        clock,
        shutdown.clone(),
        "bundle endpoint",
    )
    .map_err(EndpointError::Certificate)?;
    let app = Router::new().route("/", get(bundle)).with_state(Served {
        trust,
        refresh_hint: config.refresh_hint,
    });
    tracing::info!(
        address = %addr,
        profile = match config.profile { EndpointProfile::HttpsSpiffe => "https_spiffe", EndpointProfile::HttpsWeb { .. } => "https_web" },
        endpoint_spiffe_id = spiffe_id.as_ref().map(|i| i.to_string()),
        "bundle endpoint serving this trust domain's SPIFFE bundle at /"
    );
    let server = crate::transport::tls::TlsServer {
        listener,
        config: tls,
        app,
        max_connections: config.max_connections,
        peer: |_: &rustls::ServerConnection| (),
    };
    tokio::spawn(server.serve(shutdown));
    Ok(BundleEndpoint { addr, spiffe_id })
}

async fn bundle(State(s): State<Served>) -> Response {
    match spiffe_bundle::document(&s.trust.current(), s.refresh_hint) {
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
                StatusCode::INTERNAL_SERVER_ERROR,
                "the bundle could not be served\n",
            )
                .into_response()
        }
    }
}
