//! The tower layer and service, and the order of the checks.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::{Body, Bytes};
use ring::digest;
use tower::{Layer, Service};

use crate::config::{ConfigError, Settings, TokenGuardBuilder, header_safe, unix_now};
use crate::introspect::Introspector;
use crate::jwks::{KeyCache, KeyError};
use crate::mcp::{self, McpScopeSource};
use crate::token::{self, ClaimRules, TokenError, VerifiedToken};

/// Body of requests passed on and responses returned by the guard: `Left` is
/// a body the guard produced (a buffered request body, an error response),
/// `Right` the original.
pub type GuardBody<B> = Either<Full<Bytes>, B>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The DER client certificate of the connection a request came in on. A TLS
/// acceptor that terminates mTLS inserts it into the request's extensions;
/// the guard then checks certificate-bound tokens (`cnf.x5t#S256`) against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate(pub Vec<u8>);

impl PeerCertificate {
    /// `base64url(SHA-256(DER))`, the RFC 8705 `x5t#S256` thumbprint.
    pub fn x5t_s256(&self) -> String {
        x5t_s256(&self.0)
    }
}

/// `base64url(SHA-256(der))`, the RFC 8705 `x5t#S256` thumbprint of a certificate.
pub fn x5t_s256(der: &[u8]) -> String {
    B64.encode(digest::digest(&digest::SHA256, der))
}

/// Why a token could not be accepted, from [`TokenGuardLayer::verify`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The token is bad: answer 401 `invalid_token`.
    #[error(transparent)]
    Invalid(#[from] TokenError),
    /// The issuer's keys or introspection could not be reached: answer 503.
    #[error("{0}")]
    Unavailable(String),
}

/// What the guard answers instead of passing a request on.
#[derive(Debug)]
enum Rejection {
    /// No bearer token at all (RFC 6750 §3.1: challenge without an error code).
    Missing,
    Invalid(TokenError),
    InsufficientScope(Vec<String>),
    BadRequest(&'static str),
    TooLarge,
    Unavailable,
}

pub(crate) struct Guard {
    settings: Settings,
    keys: KeyCache,
    introspector: Option<Introspector>,
}

/// A `tower::Layer` that lets through only requests bearing a valid Tessera
/// access token with the scopes the request needs. Build with
/// [`TokenGuardLayer::builder`]; cheap to clone (clones share caches).
#[derive(Clone)]
pub struct TokenGuardLayer {
    guard: Arc<Guard>,
}

impl TokenGuardLayer {
    pub fn builder() -> TokenGuardBuilder {
        TokenGuardBuilder::default()
    }

    /// Verifies a bearer token outside of HTTP (signature, claims, binding to
    /// `peer` when given, revocation). Scopes are not checked.
    pub async fn verify(
        &self,
        token: &str,
        peer: Option<&PeerCertificate>,
    ) -> Result<VerifiedToken, VerifyError> {
        self.guard.verify(token, peer).await
    }
}

impl TokenGuardBuilder {
    /// Checks the settings and builds the layer. Keys are fetched on first use.
    pub fn build(self) -> Result<TokenGuardLayer, ConfigError> {
        let settings = self.settings()?;
        let keys = KeyCache::new(
            self.jwks_endpoint()?,
            crate::jwks::KeyUse::Sig,
            self.jwks_refresh_interval,
            self.jwks_min_refresh_interval,
            self.http_timeout,
        );
        let introspector = self.introspection_endpoint()?.map(|endpoint| {
            Introspector::new(endpoint, self.introspection_cache_ttl, self.http_timeout)
        });
        Ok(TokenGuardLayer {
            guard: Arc::new(Guard {
                settings,
                keys,
                introspector,
            }),
        })
    }
}

impl<S> Layer<S> for TokenGuardLayer {
    type Service = TokenGuard<S>;

    fn layer(&self, inner: S) -> TokenGuard<S> {
        TokenGuard {
            inner,
            guard: self.guard.clone(),
        }
    }
}

/// The service [`TokenGuardLayer`] wraps around an inner service. Passes on
/// accepted requests with a [`VerifiedToken`] in their extensions.
#[derive(Clone)]
pub struct TokenGuard<S> {
    inner: S,
    guard: Arc<Guard>,
}

impl<S, B, ResBody> Service<Request<B>> for TokenGuard<S>
where
    S: Service<Request<GuardBody<B>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<GuardBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // The clone that was polled ready serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let guard = self.guard.clone();
        Box::pin(async move {
            match guard.check(request).await {
                Ok(request) => inner.call(request).await.map(|r| r.map(Either::Right)),
                Err(rejection) => Ok(guard.respond(rejection).map(Either::Left)),
            }
        })
    }
}

impl Guard {
    async fn check<B>(&self, request: Request<B>) -> Result<Request<GuardBody<B>>, Rejection>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = request.into_parts();
        let token = bearer_token(&parts.headers)?;
        let peer = parts.extensions.get::<PeerCertificate>();
        let verified = match self.verify(token, peer).await {
            Ok(v) => v,
            Err(VerifyError::Invalid(e)) => {
                tracing::debug!(reason = %e, "bearer token rejected");
                return Err(Rejection::Invalid(e));
            }
            Err(VerifyError::Unavailable(e)) => {
                tracing::warn!(error = %e, "cannot check bearer token");
                return Err(Rejection::Unavailable);
            }
        };

        let mut required: Vec<String> = Vec::new();
        if let Some(rule) = &self.settings.scope_rule {
            required.extend(rule(&parts).unwrap_or_default());
        }
        let body = match &self.settings.mcp_rule {
            Some(rule) if parts.method == Method::POST => {
                let headers = mcp::from_headers(&parts.headers).map_err(|e| {
                    tracing::debug!(reason = %e, "MCP request rejected");
                    Rejection::BadRequest("malformed Mcp-Method or Mcp-Name header")
                })?;
                let (requests, body) = match self.settings.mcp_source {
                    McpScopeSource::HeadersOnly => match headers {
                        Some(h) => (vec![h], Either::Right(body)),
                        None => return Err(Rejection::BadRequest("Mcp-Method header is required")),
                    },
                    McpScopeSource::Body => {
                        let bytes = self.read_body(&parts, body).await?;
                        let requests = mcp::from_body(&bytes).map_err(|_| {
                            Rejection::BadRequest("request body is not a JSON-RPC message")
                        })?;
                        mcp::check_headers(headers.as_ref(), &requests).map_err(|_| {
                            Rejection::BadRequest(
                                "Mcp-Method or Mcp-Name header does not match the request body",
                            )
                        })?;
                        (requests, Either::Left(Full::new(bytes)))
                    }
                };
                for r in &requests {
                    required.extend(rule(r).unwrap_or_default());
                }
                body
            }
            _ => Either::Right(body),
        };
        required.sort();
        required.dedup();
        if required.iter().any(|s| !verified.has_scope(s)) {
            tracing::debug!(
                sub = %verified.sub,
                jti = %verified.jti,
                required = %required.join(" "),
                "insufficient scope"
            );
            return Err(Rejection::InsufficientScope(required));
        }
        tracing::trace!(sub = %verified.sub, jti = %verified.jti, "bearer token accepted");
        parts.extensions.insert(verified);
        Ok(Request::from_parts(parts, body))
    }

    async fn read_body<B>(&self, parts: &http::request::Parts, body: B) -> Result<Bytes, Rejection>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let limit = self.settings.max_body_bytes;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(Rejection::TooLarge);
        }
        match Limited::new(body, limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<LengthLimitError>() => Err(Rejection::TooLarge),
            Err(_) => Err(Rejection::BadRequest("could not read the request body")),
        }
    }

    async fn verify(
        &self,
        token: &str,
        peer: Option<&PeerCertificate>,
    ) -> Result<VerifiedToken, VerifyError> {
        let s = &self.settings;
        let unverified = token::parse(token)?;
        let key = match self.keys.key(&unverified.kid).await {
            Ok(k) => k,
            Err(KeyError::Unknown(_)) => return Err(TokenError::UnknownKey.into()),
            Err(e @ KeyError::Unavailable(_)) => {
                return Err(VerifyError::Unavailable(e.to_string()));
            }
        };
        key.verify(unverified.signing_input, &unverified.signature)
            .map_err(|_| TokenError::Signature)?;
        let now = unix_now(&s.clock);
        let skew = s.clock_skew.as_secs().min(i64::MAX as u64) as i64;
        let verified = token::check_claims(
            &unverified,
            &ClaimRules {
                issuer: &s.issuer,
                audience: &s.audience,
                now,
                skew,
            },
        )?;
        // A token that names a certificate (RFC 8705 §3) is accepted only
        // over a connection that presented that certificate: whether tokens
        // are bound is decided at issuance (policy `@bearer`) and visible in
        // the token, never a resource-server default. Both thumbprints are
        // public (the token carries one): a plain compare is fine.
        match (&verified.cnf_x5t_s256, peer) {
            (Some(bound), Some(cert)) if *bound != cert.x5t_s256() => {
                return Err(TokenError::CnfMismatch.into());
            }
            (Some(_), None) => return Err(TokenError::CnfRequired.into()),
            _ => {}
        }
        if let Some(introspector) = &self.introspector {
            let remaining = verified.exp.saturating_add(skew).saturating_sub(now).max(0) as u64;
            let active = introspector
                .is_active(token, &verified.jti, Duration::from_secs(remaining))
                .await
                .map_err(|e| VerifyError::Unavailable(e.to_string()))?;
            if !active {
                return Err(TokenError::Inactive.into());
            }
        }
        Ok(verified)
    }

    fn respond(&self, rejection: Rejection) -> Response<Full<Bytes>> {
        let (status, code, description): (StatusCode, Option<&str>, String) = match &rejection {
            Rejection::Missing => (StatusCode::UNAUTHORIZED, None, String::new()),
            Rejection::Invalid(e) => (
                StatusCode::UNAUTHORIZED,
                Some("invalid_token"),
                e.to_string(),
            ),
            Rejection::InsufficientScope(_) => (
                StatusCode::FORBIDDEN,
                Some("insufficient_scope"),
                "the token does not grant the scope this request needs".into(),
            ),
            Rejection::BadRequest(d) => (
                StatusCode::BAD_REQUEST,
                Some("invalid_request"),
                (*d).into(),
            ),
            Rejection::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                Some("invalid_request"),
                "request body too large".into(),
            ),
            Rejection::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                Some("temporarily_unavailable"),
                "the token issuer cannot be reached".into(),
            ),
        };
        let mut builder = Response::builder().status(status);
        if matches!(
            status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::BAD_REQUEST
        ) {
            let mut params: Vec<String> = Vec::new();
            if let Some(code) = code {
                params.push(format!("error=\"{code}\""));
                params.push(format!("error_description=\"{}\"", sanitize(&description)));
            }
            match (&rejection, &self.settings.challenge_scope) {
                (Rejection::InsufficientScope(scopes), _) => {
                    params.push(format!("scope=\"{}\"", sanitize(&scopes.join(" "))));
                }
                (Rejection::Missing | Rejection::Invalid(_), Some(scope)) => {
                    params.push(format!("scope=\"{scope}\""));
                }
                _ => {}
            }
            if let Some(url) = &self.settings.resource_metadata {
                params.push(format!("resource_metadata=\"{url}\""));
            }
            let value = if params.is_empty() {
                "Bearer".to_string()
            } else {
                format!("Bearer {}", params.join(", "))
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                builder = builder.header(header::WWW_AUTHENTICATE, v);
            }
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            builder = builder.header(header::RETRY_AFTER, "1");
        }
        let body = match code {
            Some(code) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(
                    serde_json::json!({"error": code, "error_description": description})
                        .to_string(),
                )
            }
            None => Bytes::new(),
        };
        builder
            .body(Full::new(body))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    }
}

/// The token of the one `Authorization: Bearer` header (RFC 6750 §2.1).
fn bearer_token(headers: &http::HeaderMap) -> Result<&str, Rejection> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(Rejection::Missing);
    };
    if values.next().is_some() {
        return Err(Rejection::BadRequest("more than one Authorization header"));
    }
    let value = value
        .to_str()
        .map_err(|_| Rejection::BadRequest("malformed Authorization header"))?;
    let Some((scheme, rest)) = value.split_once(' ') else {
        return Err(Rejection::Missing);
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Rejection::Missing);
    }
    let token = rest.trim_matches(' ');
    if token.is_empty() {
        return Err(Rejection::Invalid(TokenError::Malformed));
    }
    Ok(token)
}

/// Keeps a value inside a quoted-string (RFC 6750 limits error_description and
/// scope to printable ASCII without `"` and `\`).
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if header_safe(c.encode_utf8(&mut [0; 4])) {
                c
            } else {
                '?'
            }
        })
        .collect()
}
