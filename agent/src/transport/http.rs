//! Serving an axum router over a Unix socket to callers we do not trust.
//!
//! Workloads are untrusted input: a caller may open thousands of
//! connections, send headers a byte a minute, or never finish a body. On top
//! of the [`Acceptor`]'s connection cap, this bounds all of that before the
//! router sees a request:
//!
//! * the request head must arrive within `header_read_timeout`;
//! * a whole request (body and handler) must finish within `request_timeout`,
//!   else 408;
//! * the caller's kernel credentials, read at accept time, reach handlers as
//!   [`ConnectInfo<Option<PeerConnection>>`](PeerConnection) (None when the
//!   kernel would not give them).

use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::accept::{Accepted, Acceptor};
use super::peer::PeerConnection;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    /// How long open connections may finish after shutdown begins.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Serves `app` until `shutdown`, then lets open connections finish their
/// current request within the grace period.
pub async fn serve(
    acceptor: Acceptor,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    loop {
        let Accepted { stream, peer, slot } = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = acceptor.accept() => accepted,
        };
        let info: Option<PeerConnection> = peer;
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(info.clone()));
                let app = app.clone();
                async move {
                    let req = req.map(axum::body::Body::new);
                    match tokio::time::timeout(limits.request_timeout, app.oneshot(req)).await {
                        Ok(response) => response,
                        Err(_) => Ok((
                            StatusCode::REQUEST_TIMEOUT,
                            "request not completed in time\n",
                        )
                            .into_response()),
                    }
                }
            });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(limits.shutdown_grace, conn).await;
                }
            }
            drop(slot);
        });
    }
}
