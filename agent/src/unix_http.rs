//! Serving an axum router over a Unix socket to callers we do not trust.
//!
//! Workloads are untrusted input: a caller may open thousands of
//! connections, send headers a byte a minute, or never finish a body. This
//! accept loop bounds all of that before the router sees a request:
//!
//! * at most `max_connections` connections at once; more are closed at once
//!   (and counted), so honest callers keep being served;
//! * the request head must arrive within `header_read_timeout`;
//! * a whole request (body and handler) must finish within `request_timeout`,
//!   else 408;
//! * the caller's kernel credentials are read at accept time and handed to
//!   handlers as [`ConnectInfo<ExchangeConn>`](crate::exchange::server::ExchangeConn).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::exchange::server::ExchangeConn;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    /// How long open connections may finish after shutdown begins.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Serves `app` until `shutdown`, then lets open connections finish their
/// current request within the grace period.
pub async fn serve(
    listener: UnixListener,
    app: Router,
    limits: Limits,
    proc_root: tessera_attestor::ProcRoot,
    shutdown: CancellationToken,
    on_refused: impl Fn() + Send + Sync + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause, don't spin or die.
                    tracing::warn!(error = %e, "accept failed; pausing");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            on_refused();
            continue; // dropping the stream closes it
        };
        let info = ExchangeConn::from_stream(&stream, &proc_root);
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
