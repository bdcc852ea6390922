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
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

use super::oauth::{ErrorCode, OAuthError, no_store};
use super::request::{Form, TokenRequest};
use super::{Caller, Exchange};
use crate::caller::{CallerError, Callers};
use crate::transport::http::Limits;
use crate::transport::{Acceptor, PeerConnection};

/// Form bodies carry at most two tokens and a few short parameters.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Clone)]
struct ServerState {
    exchange: Arc<Exchange>,
    callers: Arc<Callers>,
}

pub fn router(exchange: Arc<Exchange>, callers: Arc<Callers>) -> Router {
    Router::new()
        .route("/token", post(token))
        .route("/revoke", post(revoke))
        .route("/introspect", post(introspect))
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/jwks", get(jwks))
        .route("/.well-known/jwks.json", get(jwks))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(ServerState { exchange, callers })
}

pub async fn serve(
    acceptor: Acceptor,
    exchange: Arc<Exchange>,
    callers: Arc<Callers>,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    crate::transport::http::serve(acceptor, router(exchange, callers), limits, shutdown).await
}

/// Attests the connection's process and looks up its identities.
async fn caller(s: &ServerState, conn: &Option<PeerConnection>) -> Result<Caller, OAuthError> {
    let conn = conn.as_ref().ok_or_else(|| {
        OAuthError::new(ErrorCode::InvalidClient, "caller credentials unavailable")
    })?;
    if !s.callers.within_budget(conn) {
        return Err(OAuthError::new(
            ErrorCode::SlowDown,
            "too many requests from this process; slow down",
        ));
    }
    let peer = s
        .callers
        .attest_connection(conn)
        .await
        .map_err(|e| match e {
            CallerError::NotReady | CallerError::Failed(_) => {
                OAuthError::new(ErrorCode::TemporarilyUnavailable, e.to_string())
            }
            CallerError::Gone => OAuthError::new(ErrorCode::InvalidClient, e.to_string()),
        })?;
    let identities = s.callers.identities(&peer);
    if identities.is_empty() {
        return Err(OAuthError::new(
            ErrorCode::InvalidClient,
            "no identity is registered for the calling process",
        ));
    }
    Ok(Caller::Local { peer, identities })
}

pub(super) fn form(content_type: Option<&HeaderValue>, body: &Bytes) -> Result<Form, OAuthError> {
    let content_type = content_type.and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(OAuthError::invalid_request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    Ok(Form::parse(body))
}

pub(super) fn json_no_store(value: impl serde::Serialize) -> Response {
    let mut response = axum::Json(value).into_response();
    no_store(&mut response);
    response
}

/// A form request from an attested caller: the body parsed (it must be
/// `application/x-www-form-urlencoded`), then the caller attested, in that
/// order, for every route that takes one.
struct AttestedForm {
    form: Form,
    caller: Caller,
}

impl axum::extract::FromRequest<ServerState> for AttestedForm {
    type Rejection = Response;

    async fn from_request(
        mut request: axum::extract::Request,
        s: &ServerState,
    ) -> Result<Self, Response> {
        let conn = request
            .extensions_mut()
            .remove::<ConnectInfo<Option<PeerConnection>>>()
            .and_then(|ConnectInfo(c)| c);
        let content_type = request.headers().get(header::CONTENT_TYPE).cloned();
        let body = Bytes::from_request(request, s)
            .await
            .map_err(IntoResponse::into_response)?;
        let form = form(content_type.as_ref(), &body).map_err(IntoResponse::into_response)?;
        let caller = caller(s, &conn)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Self { form, caller })
    }
}

async fn token(
    State(s): State<ServerState>,
    AttestedForm { form, caller }: AttestedForm,
) -> Result<Response, OAuthError> {
    let request = TokenRequest::from_form(&form)?;
    let response = s.exchange.exchange(&caller, request).await?;
    Ok(json_no_store(response))
}

async fn revoke(
    State(s): State<ServerState>,
    AttestedForm { form, caller }: AttestedForm,
) -> Result<Response, OAuthError> {
    revoke_form(&s.exchange, &caller, &form).await
}

/// `POST /revoke` on either transport: `token=` (RFC 7009) or `task_id=`.
pub(super) async fn revoke_form(
    exchange: &Exchange,
    caller: &Caller,
    form: &Form,
) -> Result<Response, OAuthError> {
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
            exchange.revoke_token(caller, token).await?;
        }
        (None, Some(task)) => exchange.end_task(caller, task).await?,
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
    AttestedForm { form, caller }: AttestedForm,
) -> Result<Response, OAuthError> {
    introspect_form(&s.exchange, &caller, &form)
}

/// `POST /introspect` on either transport (RFC 7662).
pub(super) fn introspect_form(
    exchange: &Exchange,
    caller: &Caller,
    form: &Form,
) -> Result<Response, OAuthError> {
    let token = form.required("token")?;
    Ok(json_no_store(exchange.introspect(caller, token)))
}

async fn metadata(State(s): State<ServerState>) -> Response {
    axum::Json(s.exchange.metadata(false)).into_response()
}

async fn jwks(State(s): State<ServerState>) -> Response {
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "max-age=60")],
        axum::Json(s.exchange.jwks()),
    )
        .into_response()
}
