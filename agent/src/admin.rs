//! Admin HTTP: `/healthz` (the process answers), `/readyz` (the Workload API
//! is serving and a CA can sign) and `/metrics` (Prometheus text).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::caller::Callers;
use crate::clock::Clock;
use crate::identity::SvidCache;

#[derive(Clone)]
struct AdminState {
    callers: Arc<Callers>,
    cache: Arc<SvidCache>,
    clock: Arc<dyn Clock>,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    callers: Arc<Callers>,
    cache: Arc<SvidCache>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState {
            callers,
            cache,
            clock,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let signer = s.cache.signer();
    let now = s.clock.now();
    let ca_ok = signer.active_ca_expiry().is_some_and(|t| t > now);
    if !(s.callers.ready.load(Ordering::Acquire) && ca_ok && !s.callers.shutdown.is_cancelled()) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string());
    }
    if let Some(why) = signer.not_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        );
    }
    match signer.reachable() {
        false => {
            // Outage: still ready while cached SVIDs are valid, and says so.
            match s.cache.soonest_expiry() {
                Some(t) if t <= now => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: the fleet authority is unreachable and cached SVIDs have expired\n"
                        .to_string(),
                ),
                Some(t) => (
                    StatusCode::OK,
                    format!(
                        "ready (degraded): the fleet authority is unreachable; serving cached SVIDs, the first expires in {}s\n",
                        t.duration_since(now).map(|d| d.as_secs()).unwrap_or(0)
                    ),
                ),
                None => (
                    StatusCode::OK,
                    "ready (degraded): the fleet authority is unreachable; no SVID cached yet\n"
                        .to_string(),
                ),
            }
        }
        true => (StatusCode::OK, "ready\n".to_string()),
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let m = &s.callers.metrics;
    let now = s.clock.now();
    let secs_until = |t: std::time::SystemTime| {
        t.duration_since(now)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    };
    m.ca_expiry_seconds.set(
        s.cache
            .signer()
            .active_ca_expiry()
            .map(secs_until)
            .unwrap_or(0),
    );
    m.svid_expiry_seconds
        .set(s.cache.soonest_expiry().map(secs_until).unwrap_or(0));
    m.cached_identities.set(s.cache.cached_identities() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}
