//! rustls configurations for the authority (server) and agents (clients).
//!
//! Both sides trust only the trust domain's CA certificates. The authority's
//! serving certificate carries a DNS name (`server_name`) next to its SPIFFE
//! ID, so agents verify it with the standard WebPKI name check; a node's
//! client certificate is its node SVID, verified against the same CAs and then
//! read for its SPIFFE ID.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("CA certificate not usable as a trust anchor: {0}")]
    Anchor(#[source] rustls::Error),
    #[error("no CA certificate to trust")]
    NoRoots,
    #[error("node SVID not usable as a client certificate: {0}")]
    ClientCert(#[source] rustls::Error),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A root store of the given CA certificates (DER).
pub fn roots<'a>(cas: impl IntoIterator<Item = &'a [u8]>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for der in cas {
        store
            .add(CertificateDer::from(der.to_vec()))
            .map_err(TlsError::Anchor)?;
    }
    if store.is_empty() {
        return Err(TlsError::NoRoots);
    }
    Ok(Arc::new(store))
}

/// Client config: verify the authority against `roots`, optionally present a
/// node SVID (leaf DER + PKCS#8 key).
pub fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<(&[u8], &[u8])>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(cert.to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
            )
            .map_err(TlsError::ClientCert)?,
    };
    Ok(Arc::new(config))
}

/// Server config: present `cert`/`key`; ask for a client certificate, verify
/// it against `roots` when given, and let handlers decide whether a route
/// needs one (attestation does not).
pub fn server_config(
    roots: Arc<RootCertStore>,
    cert: &[u8],
    key: &[u8],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
        .allow_unauthenticated()
        .build()?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(cert.to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
        )?;
    Ok(Arc::new(config))
}

/// The one `spiffe://` URI SAN of a certificate.
pub fn spiffe_id_of(cert_der: &[u8]) -> Option<spiffe::SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    spiffe::SpiffeId::new(first).ok()
}
