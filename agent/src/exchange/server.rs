//! The exchange endpoint: HTTP/1.1 on a Unix socket beside the Workload API
//! socket, so the same hostPath/CSI mount serves both. Callers are attested
//! from their socket credentials exactly like Workload API callers.
//!
//! | route | what |
//! |---|---|
//! | `POST /token` | RFC 8693 exchange |
//! | `POST /revoke` | RFC 7009 (`token=`), or end a task (`task_id=`) |
//! | `POST /introspect` | RFC 7662 |
//! | `GET /.well-known/oauth-authorization-server` | RFC 8414 metadata |
//! | `GET /jwks`, `GET /.well-known/jwks.json` | access-token verification keys |

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tessera_attestor::PeerInfo;
use tokio::net::UnixListener;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use super::oauth::{ErrorCode, OAuthError, no_store};
use super::request::{Form, TokenRequest};
use super::{Caller, Exchange};
use crate::peer_conn::PeerConnection;
use crate::service::{AgentState, CallerError};

/// Form bodies carry at most two tokens and a few short parameters.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Per-connection peer facts for axum (credentials are read at accept time).
#[derive(Clone)]
pub struct ExchangeConn(Option<PeerConnection>);

impl ExchangeConn {
    /// Kernel credentials of the connecting process, if they could be read.
    pub fn peer(&self) -> Option<&PeerInfo> {
        self.0.as_ref().map(|c| &c.peer)
    }
}

impl ExchangeConn {
    /// Reads the peer's kernel credentials at accept time.
    pub fn from_stream(
        stream: &tokio::net::UnixStream,
        proc_root: &tessera_attestor::ProcRoot,
    ) -> Self {
        match PeerInfo::from_socket(stream) {
            Ok(mut peer) => Self(Some(PeerConnection {
                peer: {
                    peer.record_exe(proc_root);
                    peer
                },
                attested: Arc::new(OnceCell::new()),
            })),
            Err(e) => {
                tracing::warn!(error = %e, "exchange connection without peer credentials");
                Self(None)
            }
        }
    }
}

#[derive(Clone)]
struct ServerState {
    exchange: Arc<Exchange>,
    agent: Arc<AgentState>,
}

pub fn router(exchange: Arc<Exchange>, agent: Arc<AgentState>) -> Router {
    Router::new()
        .route("/token", post(token))
        .route("/revoke", post(revoke))
        .route("/introspect", post(introspect))
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/jwks", get(jwks))
        .route("/.well-known/jwks.json", get(jwks))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(ServerState { exchange, agent })
}

pub async fn serve(
    listener: UnixListener,
    exchange: Arc<Exchange>,
    agent: Arc<AgentState>,
    limits: crate::unix_http::Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let metrics = agent.metrics.clone();
    let proc_root = agent.attestor.proc_root().clone();
    let app = router(exchange, agent);
    crate::unix_http::serve(listener, app, limits, proc_root, shutdown, move || {
        metrics
            .connections_refused
            .get_or_create(&crate::metrics::MethodLabels { method: "exchange" })
            .inc();
    })
    .await
}

/// Attests the connection's process and looks up its identities.
async fn caller(s: &ServerState, conn: &ExchangeConn) -> Result<Caller, OAuthError> {
    let conn = conn.0.as_ref().ok_or_else(|| {
        OAuthError::new(ErrorCode::InvalidClient, "caller credentials unavailable")
    })?;
    if !s.agent.within_budget(conn) {
        return Err(OAuthError::new(
            ErrorCode::SlowDown,
            "too many requests from this process; slow down",
        ));
    }
    let peer = s.agent.attest_connection(conn).await.map_err(|e| match e {
        CallerError::NotReady => {
            OAuthError::new(ErrorCode::TemporarilyUnavailable, "agent is not ready")
        }
        CallerError::Gone => OAuthError::new(
            ErrorCode::InvalidClient,
            "could not verify existence of the original caller",
        ),
        CallerError::Failed(m) => OAuthError::new(
            ErrorCode::TemporarilyUnavailable,
            format!("workload attestation failed: {m}"),
        ),
    })?;
    let identities = s.agent.identities(&peer);
    if identities.is_empty() {
        return Err(OAuthError::new(
            ErrorCode::InvalidClient,
            "no identity is registered for the calling process",
        ));
    }
    Ok(Caller { peer, identities })
}

fn form(headers: &HeaderMap, body: &Bytes) -> Result<Form, OAuthError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(OAuthError::invalid_request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    Ok(Form::parse(body))
}

fn json_no_store(value: impl serde::Serialize) -> Response {
    let mut response = axum::Json(value).into_response();
    no_store(&mut response);
    response
}

async fn token(
    State(s): State<ServerState>,
    ConnectInfo(conn): ConnectInfo<ExchangeConn>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let form = form(&headers, &body)?;
    let caller = caller(&s, &conn).await?;
    let request = TokenRequest::from_form(&form)?;
    let response = s.exchange.exchange(&caller, request).await?;
    Ok(json_no_store(response))
}

async fn revoke(
    State(s): State<ServerState>,
    ConnectInfo(conn): ConnectInfo<ExchangeConn>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let form = form(&headers, &body)?;
    let caller = caller(&s, &conn).await?;
    match (form.single("token")?, form.single("task_id")?) {
        (Some(token), None) => {
            if let Some(hint) = form.single("token_type_hint")?
                && hint != "access_token"
            {
                return Err(OAuthError::new(
                    ErrorCode::UnsupportedTokenType,
                    "only access tokens can be revoked",
                ));
            }
            s.exchange.revoke_token(&caller, token).await?;
        }
        (None, Some(task)) => s.exchange.end_task(&caller, task).await?,
        _ => {
            return Err(OAuthError::invalid_request(
                "send either `token` (revoke one token) or `task_id` (end a task)",
            ));
        }
    }
    Ok(json_no_store(serde_json::json!({})))
}

async fn introspect(
    State(s): State<ServerState>,
    ConnectInfo(conn): ConnectInfo<ExchangeConn>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let form = form(&headers, &body)?;
    caller(&s, &conn).await?;
    let token = form.required("token")?;
    Ok(json_no_store(s.exchange.introspect(token)))
}

async fn metadata(State(s): State<ServerState>) -> Response {
    axum::Json(s.exchange.metadata()).into_response()
}

async fn jwks(State(s): State<ServerState>) -> Response {
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "max-age=60")],
        axum::Json(s.exchange.jwks()),
    )
        .into_response()
}
