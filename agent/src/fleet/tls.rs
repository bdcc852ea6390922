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

/// The one crypto provider of the fleet's TLS (ring).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
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
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(cert.to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
            )
            .map_err(TlsError::ClientCert)?,
    };
    // Every connection proves the node SVID afresh (see `server_config`).
    config.resumption = rustls::client::Resumption::disabled();
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
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(cert.to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
        )?;
    // No session resumption: a resumed session skips the client
    // certificate check, so a node whose SVID expired (or was never renewed
    // because its pod is gone) would keep being served. Handlers also check
    // the certificate's validity on every request (`fleet/server.rs`).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

pub use crate::identity::certs::{not_after, spiffe_id_of};

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::clock::{Clock, SystemClock};

    struct Pki {
        ca_der: Vec<u8>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn pki() -> Pki {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let ca_der = cert.der().to_vec();
        let issuer = Issuer::from_ca_cert_der(&ca_der.clone().into(), key).unwrap();
        Pki { ca_der, issuer }
    }

    /// A leaf signed by the CA: (DER, PKCS#8 key), valid until `not_after`.
    fn leaf(pki: &Pki, san: SanType, not_after: std::time::SystemTime) -> (Vec<u8>, Vec<u8>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![san];
        params.not_before = (SystemClock.now() - Duration::from_secs(60)).into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &pki.issuer).unwrap();
        (cert.der().to_vec(), key.serialize_der())
    }

    /// Serves TLS on loopback; each accepted connection answers whether the
    /// client presented a certificate, then closes.
    async fn server(config: Arc<rustls::ServerConfig>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let has_cert = tls.get_ref().1.peer_certificates().is_some();
                        let _ = tls.write_all(&[u8::from(has_cert)]).await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    /// Connects with `config`: whether the server saw a client certificate,
    /// or None if the handshake failed.
    async fn connect(
        config: Arc<rustls::ClientConfig>,
        addr: std::net::SocketAddr,
    ) -> Option<bool> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("authority.test").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .ok()?;
        let mut answer = [0u8; 1];
        tls.read_exact(&mut answer).await.ok()?;
        Some(answer[0] == 1)
    }

    /// A node SVID that expires must stop working on the next connection,
    /// even for a client that connected with it before: a resumed TLS
    /// session would skip the certificate check.
    #[tokio::test]
    async fn an_expired_client_certificate_is_refused_on_the_next_connection() {
        let pki = pki();
        let roots = roots([pki.ca_der.as_slice()]).unwrap();
        let far = SystemClock.now() + Duration::from_secs(3600);
        let (server_cert, server_key) = leaf(
            &pki,
            SanType::DnsName("authority.test".try_into().unwrap()),
            far,
        );
        let addr = server(server_config(roots.clone(), &server_cert, &server_key).unwrap()).await;
        let soon = SystemClock.now() + Duration::from_secs(2);
        let node_id = SanType::URI(
            "spiffe://example.org/tessera/node/join/n1"
                .try_into()
                .unwrap(),
        );
        let (node_cert, node_key) = leaf(&pki, node_id, soon);
        assert_eq!(not_after(&node_cert).map(|t| t <= soon), Some(true));
        let client = client_config(roots, Some((&node_cert, &node_key))).unwrap();

        assert_eq!(connect(client.clone(), addr).await, Some(true));
        tokio::time::sleep(Duration::from_millis(3100)).await;
        assert_eq!(
            connect(client, addr).await,
            None,
            "the expired node SVID was accepted (session resumption?)"
        );
    }
}
