//! The kubelet `/pods` client and the shared, versioned pod-list fetcher.
//!
//! Secure port by default: HTTPS with the service account token as bearer
//! (re-read on every request, so token rotation just works) and the server
//! certificate verified against a CA file. The read-only port (plain HTTP, no
//! auth) must be chosen explicitly. At most one `/pods` request is in flight
//! per agent; every attestation waiting for a newer list shares its result.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::sync::watch;

use crate::pods::PodList;

/// Largest `/pods` response accepted (real ones are around 1 MiB).
const MAX_BODY: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// Host name or IP of the kubelet (normally the node's IP).
    pub host: String,
    /// Secure port (10250), or the read-only port when `read_only` is set.
    pub port: u16,
    /// Plain HTTP to the unauthenticated read-only port.
    pub read_only: bool,
    pub token_path: Option<PathBuf>,
    /// CA bundle to verify the kubelet's serving certificate.
    pub ca_path: Option<PathBuf>,
    /// Accept any kubelet certificate (self-signed serving certs). Off by default.
    pub skip_verification: bool,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("kubelet {url}: cannot connect: {source}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kubelet {url}: TLS: {message}")]
    Tls { url: String, message: String },
    #[error("kubelet {url}: {message}")]
    Http { url: String, message: String },
    #[error("kubelet {url} answered {status}{hint}")]
    Status {
        url: String,
        status: u16,
        hint: &'static str,
    },
    #[error("kubelet {url}: response is not a PodList: {message}")]
    Decode { url: String, message: String },
    #[error("kubelet {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("reading {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct KubeletClient {
    config: KubeletConfig,
    url: String,
}

impl KubeletClient {
    pub fn new(config: KubeletConfig) -> Self {
        let scheme = if config.read_only { "http" } else { "https" };
        let host = if config.host.contains(':') {
            format!("[{}]", config.host)
        } else {
            config.host.clone()
        };
        let url = format!("{scheme}://{host}:{}/pods", config.port);
        Self { config, url }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// One GET /pods.
    pub async fn fetch_pods(&self) -> Result<PodList, KubeletError> {
        let timeout = self.config.timeout;
        tokio::time::timeout(timeout, self.fetch_inner())
            .await
            .map_err(|_| KubeletError::Timeout {
                url: self.url.clone(),
                timeout,
            })?
    }

    async fn fetch_inner(&self) -> Result<PodList, KubeletError> {
        let url = &self.url;
        let tcp = tokio::net::TcpStream::connect((self.config.host.as_str(), self.config.port))
            .await
            .map_err(|source| KubeletError::Connect {
                url: url.clone(),
                source,
            })?;
        let mut request = hyper::Request::get("/pods")
            .header(hyper::header::HOST, &self.config.host)
            .header(hyper::header::ACCEPT, "application/json");
        if !self.config.read_only
            && let Some(path) = &self.config.token_path
        {
            // Re-read every time: projected tokens rotate.
            let token = std::fs::read_to_string(path).map_err(|source| KubeletError::File {
                path: path.clone(),
                source,
            })?;
            request = request.header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            );
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| self.http_err(e))?;
        let body = if self.config.read_only {
            self.exchange(hyper_util::rt::TokioIo::new(tcp), request)
                .await?
        } else {
            let tls = self.tls_connector()?;
            let name =
                ServerName::try_from(self.config.host.clone()).map_err(|e| KubeletError::Tls {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
            let stream = tls
                .connect(name, tcp)
                .await
                .map_err(|e| KubeletError::Tls {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
            self.exchange(hyper_util::rt::TokioIo::new(stream), request)
                .await?
        };
        serde_json::from_slice(&body).map_err(|e| KubeletError::Decode {
            url: url.clone(),
            message: e.to_string(),
        })
    }

    async fn exchange<IO>(
        &self,
        io: IO,
        request: hyper::Request<Empty<Bytes>>,
    ) -> Result<Bytes, KubeletError>
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| self.http_err(e))?;
        let conn = tokio::spawn(conn);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.http_err(e))?;
        let status = response.status().as_u16();
        if status != 200 {
            conn.abort();
            let hint = match status {
                401 => ": the service account token was not accepted",
                403 => {
                    ": forbidden; grant get on nodes/proxy (or nodes/pods) and enable kubelet webhook authentication"
                }
                _ => "",
            };
            return Err(KubeletError::Status {
                url: self.url.clone(),
                status,
                hint,
            });
        }
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| KubeletError::Http {
                url: self.url.clone(),
                message: e.to_string(),
            })?
            .to_bytes();
        conn.abort();
        Ok(body)
    }

    fn http_err(&self, e: impl std::fmt::Display) -> KubeletError {
        KubeletError::Http {
            url: self.url.clone(),
            message: e.to_string(),
        }
    }

    fn tls_connector(&self) -> Result<tokio_rustls::TlsConnector, KubeletError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| KubeletError::Tls {
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        let config = if self.config.skip_verification {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider)))
                .with_no_client_auth()
        } else {
            let mut roots = rustls::RootCertStore::empty();
            let path = self.config.ca_path.as_ref().ok_or_else(|| KubeletError::Tls {
                url: self.url.clone(),
                message: "no kubelet CA configured (set kubelet_ca_path, or skip_kubelet_verification explicitly)".into(),
            })?;
            let pem = std::fs::read(path).map_err(|source| KubeletError::File {
                path: path.clone(),
                source,
            })?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| KubeletError::Tls {
                    url: self.url.clone(),
                    message: format!("{}: {e}", path.display()),
                })?;
                roots.add(cert).map_err(|e| KubeletError::Tls {
                    url: self.url.clone(),
                    message: e.to_string(),
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }
}

/// For kubelets with self-signed serving certificates, when the operator
/// explicitly opts out of verification. Signatures are still checked so the
/// handshake itself is sound.
#[derive(Debug)]
struct AcceptAnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One fetched pod list (or the error of that fetch), numbered so waiters can
/// ask for "something newer than what I saw".
#[derive(Clone)]
pub struct Snapshot {
    pub version: u64,
    pub fetched_at: Instant,
    pub result: Result<Arc<PodList>, Arc<KubeletError>>,
}

/// Shares one in-flight `/pods` request among all attestations.
pub struct PodListFetcher {
    client: KubeletClient,
    latest: watch::Sender<Option<Snapshot>>,
    in_flight: AtomicBool,
    requests: std::sync::atomic::AtomicU64,
}

impl PodListFetcher {
    pub fn new(client: KubeletClient) -> Arc<Self> {
        Arc::new(Self {
            client,
            latest: watch::Sender::new(None),
            in_flight: AtomicBool::new(false),
            requests: Default::default(),
        })
    }

    /// How many `/pods` requests were made (for metrics and tests).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A pod list fetched after the one numbered `seen` (0 = none seen yet).
    /// On a first look (`seen == 0`) a successful cached list younger than
    /// `max_age` is returned at once. The result may be a fetch error; callers
    /// decide whether to retry.
    pub async fn newer_than(self: &Arc<Self>, seen: u64, max_age: Duration) -> Snapshot {
        let mut rx = self.latest.subscribe();
        let floor = match rx.borrow_and_update().as_ref() {
            Some(s) if seen == 0 && s.result.is_ok() && s.fetched_at.elapsed() < max_age => {
                return s.clone();
            }
            Some(s) => s.version.max(seen),
            None => seen,
        };
        loop {
            self.start_fetch();
            // The sender lives as long as `self`; changed() cannot fail here.
            let _ = rx.changed().await;
            if let Some(s) = rx
                .borrow_and_update()
                .as_ref()
                .filter(|s| s.version > floor)
            {
                return s.clone();
            }
        }
    }

    fn start_fetch(self: &Arc<Self>) {
        if self.in_flight.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.requests.fetch_add(1, Ordering::Relaxed);
            let result = this
                .client
                .fetch_pods()
                .await
                .map(Arc::new)
                .map_err(Arc::new);
            if let Err(e) = &result {
                tracing::warn!(error = %e, "kubelet pod list fetch failed");
            }
            let version = this.latest.borrow().as_ref().map_or(0, |s| s.version) + 1;
            this.in_flight.store(false, Ordering::Release);
            this.latest.send_replace(Some(Snapshot {
                version,
                fetched_at: Instant::now(),
                result,
            }));
        });
    }
}
