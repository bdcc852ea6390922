//! Serving an axum router over TLS on TCP: the fleet authority's mTLS
//! endpoint and the trust domain's HTTPS face.
//!
//! The TLS configuration is swapped in place (serving certificates are
//! renewed, or reloaded from files) and applies to every new connection. At
//! most `max_connections` are held; a connection past it is closed at once.
//! The handshake must finish within 10 s, a request head arrive within 10 s
//! and a request complete within 30 s (else 408), so slow clients cannot
//! hold connections.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The handshake-signature methods of a custom rustls certificate verifier
/// (`ServerCertVerifier` or `ClientCertVerifier`), which are the same for
/// every verifier: TLS 1.2 and 1.3 signatures checked, and schemes offered,
/// with the algorithms of the `CryptoProvider` in the field named
/// `$provider`. Used inside the trait's `impl` block.
macro_rules! handshake_signatures_of_provider {
    ($provider:ident) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.$provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.$provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.$provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}
pub(crate) use handshake_signatures_of_provider;

/// The leaf certificate a client presented, if any, as a request
/// extension (DER; the server's verifier has checked it).
#[derive(Debug, Clone, Default)]
pub struct PeerCertificate(pub Option<Arc<Vec<u8>>>);

impl PeerCertificate {
    pub fn of(conn: &rustls::ServerConnection) -> Self {
        Self(
            conn.peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Arc::new(c.to_vec())),
        )
    }
}

/// What one connection is served with.
pub struct TlsServer<F> {
    pub listener: TcpListener,
    pub config: Arc<ArcSwap<rustls::ServerConfig>>,
    pub app: Router,
    pub max_connections: usize,
    /// Facts about the connection (such as the client certificate) put in
    /// every request's extensions.
    pub peer: F,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl<F, P> TlsServer<F>
where
    F: Fn(&rustls::ServerConnection) -> P + Send + Sync + 'static,
    P: Clone + Send + Sync + 'static,
{
    /// Serves until `shutdown`, then returns once its connections have closed.
    pub async fn serve(self, shutdown: CancellationToken) {
        let Self {
            listener,
            config,
            app,
            max_connections,
            peer,
        } = self;
        let peer = Arc::new(peer);
        let slots = Arc::new(Semaphore::new(max_connections));
        loop {
            let (tcp, remote) = tokio::select! {
                _ = shutdown.cancelled() => {
                    // Every connection ends on `shutdown`; wait until they
                    // have (bounded by the handshake timeout), so whatever
                    // they hold (an open file lock, say) is released when
                    // this returns.
                    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
                    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, slots.acquire_many(all)).await;
                    return;
                }
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed; pausing");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue; // dropping the stream closes it
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(config.load_full());
            let (app, peer, shutdown) = (app.clone(), peer.clone(), shutdown.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let Ok(Ok(stream)) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                else {
                    return;
                };
                let facts = peer(stream.get_ref().1);
                let service = hyper::service::service_fn(
                    move |mut req: http::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(facts.clone());
                        req.extensions_mut()
                            .insert(axum::extract::ConnectInfo(remote));
                        let app = app.clone();
                        async move {
                            let req = req.map(axum::body::Body::new);
                            match tokio::time::timeout(REQUEST_TIMEOUT, app.oneshot(req)).await {
                                Ok(r) => r,
                                Err(_) => Ok((
                                    StatusCode::REQUEST_TIMEOUT,
                                    "request not completed in time\n",
                                )
                                    .into_response()),
                            }
                        }
                    },
                );
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = shutdown.cancelled() => {}
                }
            });
        }
    }
}
