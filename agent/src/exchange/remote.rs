//! The exchange on the HTTPS face: what OAuth clients that cannot reach the
//! node's sockets (an MCP SDK, a workload on another host) speak, under the
//! issuer URL. The wiring mounts [`router`] beside the face's discovery
//! routes.
//!
//! | route | what |
//! |---|---|
//! | `GET /.well-known/oauth-authorization-server` | RFC 8414 metadata, with every field the MCP SDKs require |
//! | `POST /token` | every grant of the socket: `client_credentials` with a JWT-SVID client assertion, RFC 7523 `jwt-bearer`, RFC 8693 token exchange |
//! | `POST /introspect` | RFC 7662, for resource servers authenticated by their X509-SVID (TLS client certificate) or a JWT-SVID (`Authorization: Bearer`, audience = the issuer) |
//! | `POST /revoke` | RFC 7009 (`token=`) or the end of a task (`task_id=`), authenticated the same way |
//! | `GET /authorize` | answers that there is no interactive authorization (the metadata must name one) |
//!
//! A caller here is [`Caller::Remote`]. At the token endpoint its JWT-SVID
//! is its only credential, checked in full and accepted once; at
//! introspection and revocation it proves an identity first
//! ([`Exchange::authenticate_resource_server`]), and the same rules as on
//! the socket follow (only a token's parties see its claims or revoke it).
//! Requests are budgeted per client IP address, like processes on the
//! socket.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::oauth::{ErrorCode, OAuthError};
use super::request::TokenRequest;
use super::server::{MAX_BODY_BYTES, form, introspect_form, json_no_store, revoke_form};
use super::{Caller, ClientCertificate, Exchange, RemoteCaller};
use crate::rate_limit::{Budget, RateLimiter};
use crate::transport::tls::PeerCertificate;

#[derive(Clone)]
struct RemoteState {
    exchange: Arc<Exchange>,
    budget: Arc<RateLimiter<IpAddr>>,
}

/// The exchange's routes for the HTTPS face; `budget` is per client IP.
pub fn router(exchange: Arc<Exchange>, budget: Budget) -> Router {
    Router::new()
        .route("/token", post(token))
        .route("/introspect", post(introspect))
        .route("/revoke", post(revoke))
        .route("/authorize", get(authorize))
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(RemoteState {
            exchange,
            budget: Arc::new(RateLimiter::new(budget)),
        })
}

/// The connection's facts as the TLS layer put them in the request.
fn remote_caller(request: &axum::extract::Request) -> RemoteCaller {
    let addr = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| *a);
    let certificate = request
        .extensions()
        .get::<PeerCertificate>()
        .and_then(|p| p.0.as_ref())
        .and_then(|der| client_certificate(der))
        .map(Arc::new);
    RemoteCaller {
        addr,
        proven: certificate.iter().map(|c| c.spiffe_id.clone()).collect(),
        certificate,
    }
}

/// The SPIFFE ID and expiry of a client certificate the TLS layer verified
/// against the trust domain's bundle.
fn client_certificate(der: &[u8]) -> Option<ClientCertificate> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let spiffe_id = san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
            Some(u.to_string())
        }
        _ => None,
    })?;
    let not_after = std::time::SystemTime::UNIX_EPOCH
        + std::time::Duration::from_secs(
            u64::try_from(cert.validity().not_after.timestamp()).ok()?,
        );
    Some(ClientCertificate {
        spiffe_id,
        leaf_der: der.to_vec(),
        not_after,
    })
}

/// A form request from a remote client within its budget.
struct RemoteForm {
    form: super::request::Form,
    caller: Caller,
    /// The `Authorization: Bearer` credential, if any.
    bearer: Option<Result<String, OAuthError>>,
}

/// The credential of an `Authorization` header: `Bearer <token>` (RFC
/// 6750 §2.1; the scheme is case-insensitive), or an error for any other.
fn bearer(headers: &axum::http::HeaderMap) -> Option<Result<String, OAuthError>> {
    let value = headers.get(header::AUTHORIZATION)?;
    let text = value.to_str().unwrap_or("");
    Some(match text.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim().to_string())
        }
        _ => Err(OAuthError::new(
            ErrorCode::InvalidClient,
            "the Authorization header must be `Bearer <JWT-SVID>`",
        )),
    })
}

impl axum::extract::FromRequest<RemoteState> for RemoteForm {
    type Rejection = Response;

    async fn from_request(
        request: axum::extract::Request,
        s: &RemoteState,
    ) -> Result<Self, Response> {
        let caller = remote_caller(&request);
        if let Some(addr) = caller.addr
            && !s.budget.allow(addr.ip())
        {
            return Err(OAuthError::new(
                ErrorCode::SlowDown,
                "too many requests from this address; slow down",
            )
            .into_response());
        }
        let content_type = request.headers().get(header::CONTENT_TYPE).cloned();
        let bearer = bearer(request.headers());
        let body = Bytes::from_request(request, s)
            .await
            .map_err(IntoResponse::into_response)?;
        let form = form(content_type.as_ref(), &body).map_err(IntoResponse::into_response)?;
        Ok(Self {
            form,
            caller: Caller::Remote(caller),
            bearer,
        })
    }
}

async fn token(
    State(s): State<RemoteState>,
    RemoteForm { form, caller, .. }: RemoteForm,
) -> Result<Response, OAuthError> {
    let request = TokenRequest::from_form(&form)?;
    let response = s.exchange.exchange(&caller, request).await?;
    Ok(json_no_store(response))
}

/// The resource server behind a request to introspection or revocation.
fn resource_server(
    s: &RemoteState,
    caller: Caller,
    bearer: Option<Result<String, OAuthError>>,
) -> Result<Caller, OAuthError> {
    let Caller::Remote(mut remote) = caller else {
        return Ok(caller);
    };
    let bearer = bearer.transpose()?;
    s.exchange
        .authenticate_resource_server(&mut remote, bearer.as_deref())?;
    Ok(Caller::Remote(remote))
}

async fn introspect(
    State(s): State<RemoteState>,
    RemoteForm {
        form,
        caller,
        bearer,
    }: RemoteForm,
) -> Result<Response, OAuthError> {
    let caller = resource_server(&s, caller, bearer)?;
    introspect_form(&s.exchange, &caller, &form)
}

async fn revoke(
    State(s): State<RemoteState>,
    RemoteForm {
        form,
        caller,
        bearer,
    }: RemoteForm,
) -> Result<Response, OAuthError> {
    let caller = resource_server(&s, caller, bearer)?;
    revoke_form(&s.exchange, &caller, &form).await
}

async fn metadata(State(s): State<RemoteState>) -> Response {
    (
        [(header::CACHE_CONTROL, "max-age=60")],
        axum::Json(s.exchange.metadata(true)),
    )
        .into_response()
}

/// RFC 8414 and the MCP SDKs require an authorization endpoint; there is no
/// person to ask here. RFC 6749 §4.1.2.1: with no client whose redirect URI
/// could be trusted, say so and do not redirect.
async fn authorize() -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CACHE_CONTROL, "no-store")],
        "Tessera issues tokens to workloads only (client_credentials with a JWT-SVID client assertion, the jwt-bearer grant, token exchange); there is no interactive authorization.\n",
    )
        .into_response()
}
