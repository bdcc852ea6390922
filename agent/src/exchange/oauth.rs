//! OAuth error responses (RFC 6749 §5.2, RFC 8693 §2.2.2, RFC 7009, RFC 8628
//! vocabulary for pending approvals). Every exchange failure becomes one of
//! these here, and only here, so the mapping from cause to code is in one place.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

/// The OAuth `error` codes the exchange uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Malformed request, or an unacceptable subject/actor token (RFC 8693 §2.2.2).
    InvalidRequest,
    /// No such audience/resource, or more than one (RFC 8707).
    InvalidTarget,
    /// A requested scope is malformed, refused by policy, or wider than the parent token's.
    InvalidScope,
    /// Policy refused every requested scope, or an operator denied the approval.
    AccessDenied,
    /// An operator must approve first; poll again with the `approval_id`.
    AuthorizationPending,
    /// The approval was not decided in time.
    ExpiredToken,
    /// The authorization grant (an RFC 7523 `assertion`) is invalid,
    /// expired, replayed, or not ours (RFC 6749 §5.2, RFC 7523 §3.1).
    InvalidGrant,
    UnsupportedGrantType,
    UnsupportedTokenType,
    /// The caller may not revoke this token or task.
    UnauthorizedClient,
    /// The caller could not be attested or holds no identity, or its client
    /// assertion failed (RFC 6749 §5.2: 401).
    InvalidClient,
    /// The bearer credential of a resource server calling introspection or
    /// revocation is not a valid JWT-SVID for the issuer (RFC 6750 §3.1:
    /// 401 with `WWW-Authenticate`).
    InvalidToken,
    /// The agent cannot serve the request now (e.g. the audit log cannot be written).
    TemporarilyUnavailable,
    /// The caller exceeded its request budget (429; RFC 8628 vocabulary).
    SlowDown,
    ServerError,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidTarget => "invalid_target",
            Self::InvalidScope => "invalid_scope",
            Self::AccessDenied => "access_denied",
            Self::AuthorizationPending => "authorization_pending",
            Self::ExpiredToken => "expired_token",
            Self::InvalidGrant => "invalid_grant",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::UnsupportedTokenType => "unsupported_token_type",
            Self::UnauthorizedClient => "unauthorized_client",
            Self::InvalidClient => "invalid_client",
            Self::InvalidToken => "invalid_token",
            Self::TemporarilyUnavailable => "temporarily_unavailable",
            Self::SlowDown => "slow_down",
            Self::ServerError => "server_error",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::InvalidClient | Self::InvalidToken => StatusCode::UNAUTHORIZED,
            Self::UnauthorizedClient => StatusCode::FORBIDDEN,
            Self::TemporarilyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            Self::SlowDown => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// An OAuth error response: code, human description, and extra members
/// (`approval_id` and `interval` for a pending approval).
#[derive(Debug, Clone)]
pub struct OAuthError {
    pub code: ErrorCode,
    pub description: String,
    pub extra: Map<String, Value>,
}

impl OAuthError {
    pub fn new(code: ErrorCode, description: impl Into<String>) -> Self {
        Self {
            code,
            description: description.into(),
            extra: Map::new(),
        }
    }

    pub fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, description)
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }
}

impl std::fmt::Display for OAuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.description)
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let challenge = (self.code == ErrorCode::InvalidToken).then(|| {
            // RFC 6750 §3: the description is quoted; keep it to the
            // characters a quoted-string allows.
            let description: String = self
                .description
                .chars()
                .map(|c| {
                    if c == '"' || c == '\\' || !(' '..='~').contains(&c) {
                        '\''
                    } else {
                        c
                    }
                })
                .collect();
            format!("Bearer error=\"invalid_token\", error_description=\"{description}\"")
        });
        let mut body = Map::new();
        body.insert("error".into(), self.code.as_str().into());
        body.insert("error_description".into(), self.description.into());
        body.extend(self.extra);
        let mut response = (self.code.status(), axum::Json(Value::Object(body))).into_response();
        if let Some(value) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        no_store(&mut response);
        response
    }
}

/// Token responses and errors must not be cached (RFC 6749 §5.1).
pub fn no_store(response: &mut Response) {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
        .headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}
