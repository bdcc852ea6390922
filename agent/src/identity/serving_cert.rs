//! A TLS server's certificate, kept current: read from operator files
//! (re-read when either changes: a Secret update swaps a symlink, an editor
//! rewrites in place) or issued by whoever holds a CA (renewed when the
//! source says). A file that fails to load (half written) keeps the current
//! certificate; the failure is logged once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_util::sync::CancellationToken;

use super::local::LocalAuthority;
use crate::clock::Clock;

/// A certificate chain (leaf first, DER), its PKCS#8 key, and when it must
/// be replaced (None: only when the source's files change).
pub struct ServingCert {
    pub chain: Vec<Vec<u8>>,
    pub key_pkcs8: Vec<u8>,
    pub renew_at: Option<SystemTime>,
}

pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// Device, inode, size, mtime seconds and nanoseconds of a file.
pub type FileStamp = (u64, u64, u64, i64, i64);

/// Where a serving certificate comes from.
pub trait CertSource: Send + Sync + 'static {
    fn load(&self, now: SystemTime) -> Result<ServingCert, SourceError>;

    /// What identifies the files' current contents (None: not file-based).
    fn fingerprint(&self) -> Option<Vec<FileStamp>> {
        None
    }
}

/// An operator's PEM certificate chain and PKCS#8 key.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertSource for CertFiles {
    fn load(&self, _: SystemTime) -> Result<ServingCert, SourceError> {
        let read = |p: &PathBuf| -> Result<Vec<u8>, SourceError> {
            std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()).into())
        };
        let chain = super::pem::decode_certs(&read(&self.cert)?)
            .map_err(|e| format!("{}: {e}", self.cert.display()))?;
        let key_pkcs8 = super::pem::decode_pkcs8_key(&read(&self.key)?)
            .map_err(|e| format!("{}: {e}", self.key.display()))?;
        Ok(ServingCert {
            chain,
            key_pkcs8,
            renew_at: None,
        })
    }

    fn fingerprint(&self) -> Option<Vec<FileStamp>> {
        use std::os::unix::fs::MetadataExt;
        Some(
            [&self.cert, &self.key]
                .iter()
                .map(|p| {
                    std::fs::metadata(p).map_or((0, 0, 0, 0, 0), |m| {
                        (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec())
                    })
                })
                .collect(),
        )
    }
}

/// An X509-SVID for `id` (plus `dns_names`) over a fresh key, signed by
/// this process's CA, renewed at half its life.
pub struct IssuedSvid {
    pub authority: Arc<LocalAuthority>,
    pub id: spiffe::SpiffeId,
    pub dns_names: Vec<String>,
    pub ttl: Duration,
}

impl CertSource for IssuedSvid {
    fn load(&self, now: SystemTime) -> Result<ServingCert, SourceError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let signed = self
            .authority
            .sign_svid(&self.id, &key, self.ttl, &self.dns_names)?;
        let life = signed
            .not_after
            .duration_since(now)
            .unwrap_or(Duration::ZERO);
        Ok(ServingCert {
            chain: vec![signed.cert_der.to_vec()],
            key_pkcs8: key.serialize_der(),
            renew_at: Some(now + life / 2),
        })
    }
}

fn server_config(cert: ServingCert) -> Result<rustls::ServerConfig, SourceError> {
    Ok(rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(
        cert.chain.into_iter().map(CertificateDer::from).collect(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pkcs8)),
    )?)
}

/// Loads the first certificate from `source` (an error stops start-up),
/// then checks every `interval` for changed files or a due renewal until
/// `shutdown`. `what` names the server in logs.
pub fn keep_current(
    source: Arc<dyn CertSource>,
    interval: Duration,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
    what: &'static str,
) -> Result<Arc<ArcSwap<rustls::ServerConfig>>, SourceError> {
    let mut loaded = source.fingerprint();
    let first = source.load(clock.now())?;
    let mut renew_at = first.renew_at;
    let tls = Arc::new(ArcSwap::from_pointee(server_config(first)?));
    let current = tls.clone();
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
                let source = source.clone();
                tokio::task::spawn_blocking(move || {
                    source.load(now).and_then(|c| {
                        let renew = c.renew_at;
                        server_config(c).map(|config| (config, renew))
                    })
                })
                .await
            };
            let Ok(result) = loading else { continue };
            match result {
                Ok((config, next)) => {
                    current.store(Arc::new(config));
                    renew_at = next;
                    loaded = seen;
                    failed = None;
                    tracing::info!(server = what, "serving certificate renewed");
                }
                Err(e) if failed != Some(seen.clone()) => {
                    tracing::error!(server = what, error = %e, "could not load the serving certificate; keeping the current one");
                    failed = Some(seen);
                }
                Err(_) => {}
            }
        }
    });
    Ok(tls)
}
