//! TLS to the database, on rustls (the stack the fleet's own connections
//! use, so no second TLS library comes in).
//!
//! The server is always verified the way libpq's `sslmode=verify-full`
//! does: its chain must lead to a CA in `tls_ca_file` and its certificate
//! must name the host the URL connects to. There is no "encrypt but trust
//! anyone" mode: a store that any machine in the path could impersonate
//! would hand it the fleet's revocations and join tokens.
//!
//! The files are read at every connection, like `password_file`, so a
//! renewed client certificate or a rotated CA is picked up when a
//! connection is next opened, without a restart.
//!
//! The stream offers SCRAM channel binding (`tls-server-end-point`, RFC
//! 5929): the password exchange is then tied to this TLS session, so a
//! proxy holding another certificate cannot relay it.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::Socket;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// `[server.store]`'s TLS files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the CA certificates the database server's chain must lead to.
    pub ca_file: PathBuf,
    /// PEM certificate chain and key for certificate authentication
    /// (PostgreSQL's `cert` method or `clientcert=verify-full`).
    pub client: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    /// The rustls configuration from the files as they are now. The error
    /// names the key and the file.
    pub(super) fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let read = |key: &str, path: &Path| {
            std::fs::read(path).map_err(|e| format!("server.store.{key} {}: {e}", path.display()))
        };
        let ca_error = |e: &dyn std::fmt::Display| {
            format!("server.store.tls_ca_file {}: {e}", self.ca_file.display())
        };
        let certs = crate::identity::pem::decode_certs(&read("tls_ca_file", &self.ca_file)?)
            .map_err(|e| ca_error(&e))?;
        let roots =
            crate::fleet::tls::roots(certs.iter().map(Vec::as_slice)).map_err(|e| ca_error(&e))?;
        let builder = rustls::ClientConfig::builder_with_provider(crate::fleet::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_root_certificates(roots);
        let config = match &self.client {
            None => builder.with_no_client_auth(),
            Some((cert_path, key_path)) => {
                let chain = crate::identity::pem::decode_certs(&read("tls_cert_file", cert_path)?)
                    .map_err(|e| {
                        format!("server.store.tls_cert_file {}: {e}", cert_path.display())
                    })?;
                if chain.is_empty() {
                    return Err(format!(
                        "server.store.tls_cert_file {}: no `BEGIN CERTIFICATE` block",
                        cert_path.display()
                    ));
                }
                let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&read(
                    "tls_key_file",
                    key_path,
                )?)
                .map_err(|e| {
                    format!(
                        "server.store.tls_key_file {}: no usable private key: {e}",
                        key_path.display()
                    )
                })?;
                builder
                    .with_client_auth_cert(chain.into_iter().map(Into::into).collect(), key)
                    .map_err(|e| {
                        format!(
                            "server.store.tls_cert_file and tls_key_file do not make a client identity: {e}"
                        )
                    })?
            }
        };
        Ok(Arc::new(config))
    }
}

/// Makes one TLS connector per host of the URL (tokio-postgres asks with
/// each host name in turn).
#[derive(Clone)]
pub(super) struct MakeRustls(pub(super) Arc<rustls::ClientConfig>);

impl MakeTlsConnect<Socket> for MakeRustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<RustlsConnect> {
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{host:?} is not a DNS name or IP address to verify the database's certificate against"),
            )
        })?;
        Ok(RustlsConnect {
            config: self.0.clone(),
            name,
        })
    }
}

pub(super) struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        Box::pin(async move {
            tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, socket)
                .await
                .map(|s| RustlsStream(Box::new(s)))
        })
    }
}

/// A TLS connection to the database.
pub(super) struct RustlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        match session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| tls_server_end_point(leaf))
        {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

/// RFC 5929's `tls-server-end-point`: the server certificate's hash, with
/// the hash of its signature algorithm (SHA-256 in place of MD5 and SHA-1).
/// `None` where that is not one hash ring offers (Ed25519, RSASSA-PSS,
/// SHA-224): the client then does not offer channel binding, and
/// PostgreSQL's SCRAM without it still works.
fn tls_server_end_point(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::oid_registry as oid;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let alg = &cert.signature_algorithm.algorithm;
    let digest = if [
        oid::OID_PKCS1_SHA1WITHRSA,
        oid::OID_PKCS1_SHA256WITHRSA,
        oid::OID_SIG_ECDSA_WITH_SHA256,
        oid::OID_PKCS1_MD5WITHRSAENC,
    ]
    .contains(alg)
    {
        &ring::digest::SHA256
    } else if [oid::OID_PKCS1_SHA384WITHRSA, oid::OID_SIG_ECDSA_WITH_SHA384].contains(alg) {
        &ring::digest::SHA384
    } else if [oid::OID_PKCS1_SHA512WITHRSA, oid::OID_SIG_ECDSA_WITH_SHA512].contains(alg) {
        &ring::digest::SHA512
    } else {
        return None;
    };
    Some(ring::digest::digest(digest, der).as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        rcgen::CertificateParams::new(vec!["db.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn the_end_point_hash_follows_the_signature_algorithm() {
        let p256 = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            tls_server_end_point(&p256).unwrap(),
            ring::digest::digest(&ring::digest::SHA256, &p256).as_ref()
        );
        let p384 = cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(tls_server_end_point(&p384).unwrap().len(), 48);
        assert_eq!(tls_server_end_point(&cert(&rcgen::PKCS_ED25519)), None);
        assert_eq!(tls_server_end_point(b"not a certificate"), None);
    }

    #[test]
    fn unreadable_files_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TlsFiles {
            ca_file: dir.path().join("ca.pem"),
            client: None,
        };
        let e = missing.client_config().unwrap_err();
        assert!(e.starts_with("server.store.tls_ca_file"), "{e}");
        std::fs::write(dir.path().join("ca.pem"), "not pem").unwrap();
        let e = missing.client_config().unwrap_err();
        assert!(e.contains("no CA certificate"), "{e}");
        let ca = cert_and_key();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        assert!(missing.client_config().is_ok());
        let with_client = TlsFiles {
            client: Some((dir.path().join("ca.pem"), dir.path().join("no.key"))),
            ..missing
        };
        let e = with_client.client_config().unwrap_err();
        assert!(e.starts_with("server.store.tls_key_file"), "{e}");
    }

    fn cert_and_key() -> rcgen::CertifiedKey<rcgen::KeyPair> {
        rcgen::generate_simple_self_signed(vec!["db.example".into()]).unwrap()
    }
}
