//! One fetch of a foreign bundle endpoint: GET over TLS, the server
//! authenticated per the relationship's profile, temporary and permanent
//! redirects followed (a few, each treated as temporary, spec §5.2), the
//! answer read up to a size limit.
//!
//! * `https_web`: the server's certificate must chain to the Web PKI roots
//!   (`ca_file`, else the system's CA certificates) and name the URL's host.
//! * `https_spiffe`: it must be an X509-SVID with the configured endpoint
//!   SPIFFE ID, chaining to the latest bundle of that ID's trust domain
//!   (spec §5.3.2); no host name is checked. A redirect target must present
//!   the same SPIFFE ID.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prost::bytes::Bytes;
use rustls::RootCertStore;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use super::Profile;
use super::url::EndpointUrl;
use crate::identity::pem;
use crate::transport::https_client as http;

/// Largest bundle accepted (a bundle of a few hundred keys is tens of KiB).
pub const MAX_BUNDLE: usize = 1024 * 1024;
/// Redirects followed per fetch.
const MAX_REDIRECTS: usize = 3;
/// A whole fetch (connect, TLS, answer) must finish within this.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the system's CA certificates usually are (Debian/Ubuntu/Alpine,
/// Fedora/RHEL, openSUSE, macOS-style); `SSL_CERT_FILE` comes first.
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{path}: {message}")]
    Roots { path: PathBuf, message: String },
    #[error(
        "no system CA certificates found (set SSL_CERT_FILE, or ca_file for this https_web relationship)"
    )]
    NoSystemRoots,
    #[error("no bundle of trust domain {0:?} to authenticate the https_spiffe endpoint with")]
    NoEndpointBundle(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: {message}")]
    Redirect { url: String, message: String },
}

/// The roots an `https_web` endpoint is checked against.
pub fn web_roots(ca_file: Option<&Path>) -> Result<RootCertStore, FetchError> {
    let path = match ca_file {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .or_else(|| {
                SYSTEM_CA_FILES
                    .iter()
                    .map(PathBuf::from)
                    .find(|p| p.is_file())
            })
            .ok_or(FetchError::NoSystemRoots)?,
    };
    let roots_err = |message: String| FetchError::Roots {
        path: path.clone(),
        message,
    };
    let text = std::fs::read(&path).map_err(|e| roots_err(e.to_string()))?;
    let certs = pem::decode_certs(&text).map_err(|e| roots_err(e.to_string()))?;
    let mut store = RootCertStore::empty();
    // A system bundle may hold a certificate webpki cannot use as an
    // anchor; skip it rather than lose every other root.
    let (added, _ignored) =
        store.add_parsable_certificates(certs.into_iter().map(CertificateDer::from));
    if added == 0 {
        return Err(roots_err("no usable CA certificate".into()));
    }
    Ok(store)
}

/// A root store of concatenated DER CA certificates.
pub fn spiffe_roots(td: &str, x509: &[u8]) -> Result<RootCertStore, FetchError> {
    let mut store = RootCertStore::empty();
    let certs = pem::split_der_certs(x509).map_err(|_| FetchError::NoEndpointBundle(td.into()))?;
    store.add_parsable_certificates(certs.into_iter().map(|c| CertificateDer::from(c.to_vec())));
    if store.is_empty() {
        return Err(FetchError::NoEndpointBundle(td.into()));
    }
    Ok(store)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS client configuration for a relationship's profile; `roots` are
/// the Web PKI roots (`https_web`) or the endpoint trust domain's CAs
/// (`https_spiffe`).
pub fn client_config(
    profile: &Profile,
    roots: RootCertStore,
) -> Result<Arc<rustls::ClientConfig>, FetchError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let config = match profile {
        Profile::HttpsWeb { .. } => builder.with_root_certificates(roots).with_no_client_auth(),
        Profile::HttpsSpiffe { endpoint_id, .. } => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: Arc::new(roots),
                endpoint_id: endpoint_id.clone(),
                provider: provider(),
            }))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// GETs `url`, following redirects; the body of a 200 answer.
pub async fn fetch(url: &EndpointUrl, tls: Arc<rustls::ClientConfig>) -> Result<Bytes, FetchError> {
    let mut url = url.clone();
    for _ in 0..=MAX_REDIRECTS {
        let addr = url.address();
        let answer = http::fetch(
            http::Request {
                addr: &addr,
                server_name: &url.host,
                tls: tls.clone(),
                method: hyper::Method::GET,
                path: &url.path,
                bearer: None,
                content_type: "application/json",
                body: None,
                timeout: FETCH_TIMEOUT,
            },
            MAX_BUNDLE,
        )
        .await?;
        match answer.status {
            200 => return Ok(answer.body),
            301 | 302 | 303 | 307 | 308 => {
                let location = answer.location.ok_or_else(|| FetchError::Redirect {
                    url: url.to_string(),
                    message: format!("HTTP {} without a Location", answer.status),
                })?;
                url = url.join(&location).map_err(|e| FetchError::Redirect {
                    url: url.to_string(),
                    message: e.to_string(),
                })?;
            }
            status => {
                let body = String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)])
                    .trim()
                    .to_string();
                return Err(FetchError::Status {
                    url: url.to_string(),
                    status,
                    body,
                });
            }
        }
    }
    Err(FetchError::Redirect {
        url: url.to_string(),
        message: format!("more than {MAX_REDIRECTS} redirects"),
    })
}

/// `https_spiffe` server authentication: the chain must verify against the
/// endpoint trust domain's CAs, and the leaf's one URI SAN must be the
/// configured SPIFFE ID. The host name plays no part (an X509-SVID need not
/// carry one).
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    endpoint_id: spiffe::SpiffeId,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match crate::identity::certs::spiffe_id_of(end_entity) {
            Some(id) if id == self.endpoint_id => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!(
                "the bundle endpoint presented {id}, not the configured {}",
                self.endpoint_id
            ))),
            None => Err(rustls::Error::General(
                "the bundle endpoint's certificate is not an X509-SVID (one spiffe:// URI SAN)"
                    .into(),
            )),
        }
    }

    crate::transport::tls::handshake_signatures_of_provider!(provider);
}
