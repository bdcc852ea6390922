//! A `tower` layer for resource servers (MCP servers, HTTP APIs) that accepts
//! only Tessera per-task access tokens meant for them.
//!
//! For each request the guard checks, in order: one `Authorization: Bearer`
//! header; the JWS header (`alg` ES256, `typ` `at+jwt`, a `kid`); the ES256
//! signature against the issuer's JWKS (cached, refreshed periodically and on
//! an unknown `kid`); `iss`, `aud`, `exp`, `nbf`, `iat` (with clock skew); the
//! `cnf.x5t#S256` certificate binding when the request carries a
//! [`PeerCertificate`]; revocation through RFC 7662 introspection (briefly
//! cached); and finally the scopes the request needs, from a route rule and,
//! for MCP, from the JSON-RPC method and tool name. Accepted requests carry a
//! [`VerifiedToken`] in their extensions.
//!
//! Failures follow RFC 6750 and the MCP authorization spec: 401 with
//! `WWW-Authenticate: Bearer error="invalid_token"` for a bad token, 403 with
//! `error="insufficient_scope", scope="…"` for a missing scope. Tokens are
//! never logged.
//!
//! ```no_run
//! use tessera_token_guard::{McpRequest, TokenGuardLayer};
//!
//! let guard = TokenGuardLayer::builder()
//!     .issuer("spiffe://example.org/tessera")
//!     .audience("https://notes.example/mcp")
//!     .exchange_socket("/run/tessera/sockets/exchange.sock")
//!     .mcp_scope_rule(|r: &McpRequest| match (r.method.as_str(), r.name.as_deref()) {
//!         ("tools/call", Some("list_notes")) => Some(vec!["notes:read".into()]),
//!         ("tools/call", Some(_)) => Some(vec!["notes:write".into()]),
//!         _ => None,
//!     })
//!     .build()
//!     .expect("valid guard settings");
//! // axum: Router::new().route_service("/mcp", mcp_service).layer(guard)
//! # let _ = guard;
//! ```

mod config;
mod guard;
mod introspect;
mod jwks;
mod mcp;
mod token;
mod transport;
mod wit;

pub use config::{
    Clock, ConfigError, IntrospectionSource, JwksSource, McpScopeRule, ScopeRule, TokenGuardBuilder,
};
pub use guard::{GuardBody, PeerCertificate, TokenGuard, TokenGuardLayer, VerifyError, x5t_s256};
pub use mcp::{McpRequest, McpScopeSource};
pub use token::{Actor, TokenError, VerifiedToken};
pub use wit::{
    LEGACY_WPT_HEADER, TXN_TOKEN_HEADER, VerifiedWorkload, WIT_HEADER, WitConfigError, WitError,
    WitGuardBuilder, WitGuardLayer, WitGuardService,
};
