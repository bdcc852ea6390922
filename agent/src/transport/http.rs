//! Serving an axum router over a Unix socket to callers we do not trust.
//!
//! Workloads are untrusted input: a caller may open thousands of
//! connections, send headers a byte a minute, or never finish a body. On top
//! of the [`Acceptor`]'s connection cap, this bounds all of that before the
//! router sees a request:
//!
//! * the request head must arrive within `header_read_timeout`;
//! * a connection with no request in progress for `idle_timeout` is closed
//!   ([`idle`](super::idle));
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
use super::idle::{Activity, IdleStream};
use super::peer::PeerConnection;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub request_timeout: Duration,
    /// How long open connections may finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// A connection with no request in progress for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
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
        let activity = info
            .as_ref()
            .map_or_else(Activity::new, |p| p.activity.clone());
        let stream = IdleStream::new(stream, activity.clone(), limits.idle_timeout);
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(info.clone()));
                let app = app.clone();
                let active = activity.begin();
                async move {
                    let _active = active;
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use axum::routing::{get, post};
    use tessera_attestor::ProcRoot;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{UnixListener, UnixStream};
    use tokio::time::Instant;

    use super::*;
    use crate::cli::client::http_unix;

    struct TestServer {
        _dir: tempfile::TempDir,
        path: PathBuf,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    async fn peer_pid(ConnectInfo(peer): ConnectInfo<Option<PeerConnection>>) -> String {
        match peer.and_then(|p| p.peer.pid) {
            Some(pid) => pid.to_string(),
            None => "none".into(),
        }
    }

    fn limits(header_read_timeout_ms: u64, request_timeout_ms: u64) -> Limits {
        Limits {
            header_read_timeout: Duration::from_millis(header_read_timeout_ms),
            request_timeout: Duration::from_millis(request_timeout_ms),
            shutdown_grace: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
        }
    }

    fn start(limits: Limits) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("http.sock");
        let acceptor = Acceptor::new(
            UnixListener::bind(&path).unwrap(),
            ProcRoot::new("/proc"),
            crate::transport::ConnectionCaps::new(8, Some(8), Some(8)),
            || {},
        )
        .unwrap();
        let app = Router::new()
            .route("/pid", get(peer_pid))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late\n"
                }),
            )
            .route(
                "/brief",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "done\n"
                }),
            )
            .route("/echo", post(|body: String| async move { body }));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(acceptor, app, limits, shutdown.clone()));
        TestServer {
            _dir: dir,
            path,
            shutdown,
            task,
        }
    }

    /// Everything the server sends until it closes the connection (a reset
    /// counts as closing).
    async fn until_closed(stream: &mut UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "the server did not close the connection");
        out
    }

    async fn get_pid(server: &TestServer) -> (StatusCode, Vec<u8>) {
        http_unix(&server.path, http::Method::GET, "/pid", None)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn handlers_see_the_callers_pid() {
        let server = start(Limits::default());
        let (status, body) = get_pid(&server).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            std::process::id().to_string()
        );
    }

    #[tokio::test]
    async fn an_incomplete_request_head_is_dropped_after_header_read_timeout() {
        let server = start(limits(150, 5_000));
        let mut stream = UnixStream::connect(&server.path).await.unwrap();
        let started = Instant::now();
        stream
            .write_all(b"GET /pid HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .unwrap();
        let answer = until_closed(&mut stream).await;
        assert!(answer.is_empty(), "closed without an answer: {answer:?}");
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn a_request_head_completed_in_time_is_served() {
        let server = start(limits(400, 5_000));
        let mut stream = UnixStream::connect(&server.path).await.unwrap();
        stream.write_all(b"GET /pid HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream
            .write_all(b"Host: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = String::from_utf8(until_closed(&mut stream).await).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(
            answer.ends_with(&std::process::id().to_string()),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_after_header_read_timeout() {
        let server = start(limits(150, 5_000));
        let mut stream = UnixStream::connect(&server.path).await.unwrap();
        let started = Instant::now();
        assert!(until_closed(&mut stream).await.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn a_handler_slower_than_request_timeout_gets_408() {
        let server = start(limits(5_000, 150));
        let started = Instant::now();
        let (status, body) = http_unix(&server.path, http::Method::GET, "/slow", None)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(body, b"request not completed in time\n");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(150) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_body_that_never_finishes_gets_408() {
        let server = start(limits(5_000, 150));
        let mut stream = UnixStream::connect(&server.path).await.unwrap();
        stream
            .write_all(
                b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nonly ten b",
            )
            .await
            .unwrap();
        let answer = String::from_utf8(until_closed(&mut stream).await).unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }

    #[tokio::test]
    async fn serve_returns_on_shutdown_and_stops_accepting() {
        let server = start(Limits::default());
        let (status, _) = get_pid(&server).await;
        assert_eq!(status, StatusCode::OK);
        server.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(2), server.task)
            .await
            .expect("serve returns once shut down");
        result.unwrap().unwrap();
        assert!(UnixStream::connect(&server.path).await.is_err());
    }

    #[tokio::test]
    async fn a_request_in_flight_at_shutdown_still_completes() {
        let server = start(Limits::default());
        let mut stream = UnixStream::connect(&server.path).await.unwrap();
        stream
            .write_all(b"GET /brief HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        server.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), server.task)
            .await
            .expect("serve returns once shut down")
            .unwrap()
            .unwrap();
        let answer = String::from_utf8(until_closed(&mut stream).await).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("done\n"), "{answer}");
    }
}
