//! The guard's configuration and its builder.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::mcp::{McpRequest, McpScopeSource};
use crate::transport::Endpoint;

/// Required scopes for a request, from its method, URI and headers. `None` (or
/// an empty list) means any valid token will do; otherwise every listed scope
/// must be granted.
pub type ScopeRule = Arc<dyn Fn(&http::request::Parts) -> Option<Vec<String>> + Send + Sync>;

/// Required scopes for one MCP JSON-RPC request (`tools/call` of a given tool,
/// `tools/list`, ...), with the same meaning as [`ScopeRule`].
pub type McpScopeRule = Arc<dyn Fn(&McpRequest) -> Option<Vec<String>> + Send + Sync>;

/// Current time; replaceable in tests.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// `clock`'s time in Unix seconds (0 before 1970): what `exp`, `nbf` and
/// `iat` are compared with.
pub(crate) fn unix_now(clock: &Clock) -> i64 {
    match clock().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_secs().min(i64::MAX as u64) as i64,
        Err(_) => 0,
    }
}

/// The builder methods for time that every guard's builder has, over its
/// `clock_skew` and `clock` fields: `clock_skew` (documented by `$skew_doc`,
/// which names the builder's default) and `clock`.
macro_rules! clock_methods {
    ($skew_doc:literal) => {
        #[doc = $skew_doc]
        pub fn clock_skew(mut self, skew: std::time::Duration) -> Self {
            self.clock_skew = skew;
            self
        }

        /// Replaces the clock (tests).
        pub fn clock<F>(mut self, clock: F) -> Self
        where
            F: Fn() -> std::time::SystemTime + Send + Sync + 'static,
        {
            self.clock = std::sync::Arc::new(clock);
            self
        }
    };
}
pub(crate) use clock_methods;

/// Where the issuer's signing keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// `GET <path>` over HTTP/1.1 on a Unix socket (Tessera: the exchange socket, `/jwks`).
    Unix { socket: PathBuf, path: String },
    /// `GET` an `http://` URL.
    Url(String),
}

impl JwksSource {
    pub(crate) fn endpoint(&self) -> Result<Endpoint, String> {
        match self {
            JwksSource::Unix { socket, path } => Ok(Endpoint::unix(socket, path)),
            JwksSource::Url(url) => Endpoint::http(url),
        }
    }
}

/// How (and whether) the guard asks the issuer if a token was revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntrospectionSource {
    /// No introspection: a token is good until it expires. Revocation then
    /// takes effect only through short TTLs.
    Disabled,
    /// `POST <path>` (RFC 7662 form `token=`) over a Unix socket.
    Unix { socket: PathBuf, path: String },
    /// `POST` to an `http://` URL.
    Url(String),
}

/// Invalid builder settings.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("the expected issuer is not set")]
    MissingIssuer,
    #[error("the expected audience is not set")]
    MissingAudience,
    #[error("no JWKS source is set")]
    MissingJwks,
    #[error("invalid URL {0}")]
    Url(String),
    #[error("{0} must not contain a double quote, backslash or control character")]
    HeaderUnsafe(&'static str),
}

/// Validated configuration shared by every clone of the guard.
pub(crate) struct Settings {
    pub issuer: String,
    pub audience: String,
    pub clock_skew: Duration,
    pub scope_rule: Option<ScopeRule>,
    pub mcp_rule: Option<McpScopeRule>,
    pub mcp_source: McpScopeSource,
    pub max_body_bytes: usize,
    pub resource_metadata: Option<String>,
    pub challenge_scope: Option<String>,
    pub clock: Clock,
}

/// Builder for [`TokenGuardLayer`](crate::TokenGuardLayer).
#[derive(Clone)]
pub struct TokenGuardBuilder {
    pub(crate) issuer: Option<String>,
    pub(crate) audience: Option<String>,
    pub(crate) jwks: Option<JwksSource>,
    pub(crate) introspection: Option<IntrospectionSource>,
    pub(crate) clock_skew: Duration,
    pub(crate) jwks_refresh_interval: Duration,
    pub(crate) jwks_min_refresh_interval: Duration,
    pub(crate) introspection_cache_ttl: Duration,
    pub(crate) http_timeout: Duration,
    pub(crate) scope_rule: Option<ScopeRule>,
    pub(crate) mcp_rule: Option<McpScopeRule>,
    pub(crate) mcp_source: McpScopeSource,
    pub(crate) max_body_bytes: usize,
    pub(crate) resource_metadata: Option<String>,
    pub(crate) challenge_scope: Option<String>,
    pub(crate) clock: Clock,
}

impl Default for TokenGuardBuilder {
    fn default() -> Self {
        TokenGuardBuilder {
            issuer: None,
            audience: None,
            jwks: None,
            introspection: None,
            clock_skew: Duration::from_secs(30),
            jwks_refresh_interval: Duration::from_secs(300),
            jwks_min_refresh_interval: Duration::from_secs(5),
            introspection_cache_ttl: Duration::from_secs(2),
            http_timeout: Duration::from_secs(5),
            scope_rule: None,
            mcp_rule: None,
            mcp_source: McpScopeSource::Body,
            max_body_bytes: 1024 * 1024,
            resource_metadata: None,
            challenge_scope: None,
            clock: Arc::new(SystemTime::now),
        }
    }
}

impl TokenGuardBuilder {
    /// The issuer every token must name in `iss` (exact match), e.g.
    /// `spiffe://example.org/tessera`. Required.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }

    /// This resource server's canonical URI, which must be in every token's
    /// `aud` (exact match, RFC 8707), e.g. `https://notes.example/mcp`. Required.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = Some(audience.into());
        self
    }

    /// Tessera's exchange socket: keys from `GET /jwks` and, unless
    /// [`introspection`](Self::introspection) says otherwise, revocation checks
    /// through `POST /introspect`, both on this socket.
    pub fn exchange_socket(mut self, socket: impl Into<PathBuf>) -> Self {
        let socket = socket.into();
        self.jwks = Some(JwksSource::Unix {
            socket: socket.clone(),
            path: "/jwks".into(),
        });
        if self.introspection.is_none() {
            self.introspection = Some(IntrospectionSource::Unix {
                socket,
                path: "/introspect".into(),
            });
        }
        self
    }

    /// Where the signing keys come from (overrides [`exchange_socket`](Self::exchange_socket)).
    pub fn jwks(mut self, source: JwksSource) -> Self {
        self.jwks = Some(source);
        self
    }

    /// Revocation checks. Default: on, through the exchange socket, when
    /// [`exchange_socket`](Self::exchange_socket) is used; otherwise off.
    pub fn introspection(mut self, source: IntrospectionSource) -> Self {
        self.introspection = Some(source);
        self
    }

    /// How long an "active" introspection answer is reused (default 2 s): the
    /// longest a revoked token can still get through. "Inactive" answers are
    /// kept until the token expires.
    pub fn introspection_cache_ttl(mut self, ttl: Duration) -> Self {
        self.introspection_cache_ttl = ttl;
        self
    }

    clock_methods!("Tolerance for `exp`, `nbf` and `iat` (default 30 s).");

    /// How often the JWKS is re-fetched when in use (default 5 min).
    pub fn jwks_refresh_interval(mut self, interval: Duration) -> Self {
        self.jwks_refresh_interval = interval;
        self
    }

    /// Least time between two JWKS fetches caused by unknown `kid`s (default
    /// 5 s), so a flood of forged key ids cannot turn into a flood of fetches.
    pub fn jwks_min_refresh_interval(mut self, interval: Duration) -> Self {
        self.jwks_min_refresh_interval = interval;
        self
    }

    /// Timeout for one JWKS or introspection call (default 5 s).
    pub fn http_timeout(mut self, timeout: Duration) -> Self {
        self.http_timeout = timeout;
        self
    }

    /// Scopes required by route (method, path, headers).
    pub fn scope_rule<F>(mut self, rule: F) -> Self
    where
        F: Fn(&http::request::Parts) -> Option<Vec<String>> + Send + Sync + 'static,
    {
        self.scope_rule = Some(Arc::new(rule));
        self
    }

    /// Scopes required per MCP request (e.g. per tool for `tools/call`).
    /// Applies to POST requests; see [`McpScopeSource`] for how the method is
    /// learned. Combined with [`scope_rule`](Self::scope_rule) when both are set.
    pub fn mcp_scope_rule<F>(mut self, rule: F) -> Self
    where
        F: Fn(&McpRequest) -> Option<Vec<String>> + Send + Sync + 'static,
    {
        self.mcp_rule = Some(Arc::new(rule));
        self
    }

    /// Body or headers (default: body, cross-checked with headers).
    pub fn mcp_scope_source(mut self, source: McpScopeSource) -> Self {
        self.mcp_source = source;
        self
    }

    /// Largest body the MCP rule buffers (default 1 MiB); larger requests get 413.
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.max_body_bytes = limit;
        self
    }

    /// RFC 9728 metadata URL announced in `WWW-Authenticate` (`resource_metadata="…"`).
    pub fn resource_metadata(mut self, url: impl Into<String>) -> Self {
        self.resource_metadata = Some(url.into());
        self
    }

    /// The scopes a client with no valid token is told to ask for, as
    /// `scope="…"` in the 401 challenge (space-separated). MCP clients
    /// request these first (the MCP authorization spec's scope selection;
    /// without it they ask for everything the resource metadata lists) and
    /// step up on a 403 `insufficient_scope`.
    pub fn challenge_scope(mut self, scope: impl Into<String>) -> Self {
        self.challenge_scope = Some(scope.into());
        self
    }

    pub(crate) fn jwks_endpoint(&self) -> Result<Endpoint, ConfigError> {
        match &self.jwks {
            None => Err(ConfigError::MissingJwks),
            Some(source) => source.endpoint().map_err(ConfigError::Url),
        }
    }

    pub(crate) fn introspection_endpoint(&self) -> Result<Option<Endpoint>, ConfigError> {
        match &self.introspection {
            None | Some(IntrospectionSource::Disabled) => Ok(None),
            Some(IntrospectionSource::Unix { socket, path }) => {
                Ok(Some(Endpoint::unix(socket, path)))
            }
            Some(IntrospectionSource::Url(url)) => {
                Endpoint::http(url).map(Some).map_err(ConfigError::Url)
            }
        }
    }

    pub(crate) fn settings(&self) -> Result<Settings, ConfigError> {
        let issuer = self.issuer.clone().ok_or(ConfigError::MissingIssuer)?;
        let audience = self.audience.clone().ok_or(ConfigError::MissingAudience)?;
        if let Some(url) = &self.resource_metadata
            && !header_safe(url)
        {
            return Err(ConfigError::HeaderUnsafe("resource_metadata"));
        }
        if let Some(scope) = &self.challenge_scope
            && !header_safe(scope)
        {
            return Err(ConfigError::HeaderUnsafe("challenge_scope"));
        }
        Ok(Settings {
            issuer,
            audience,
            clock_skew: self.clock_skew,
            scope_rule: self.scope_rule.clone(),
            mcp_rule: self.mcp_rule.clone(),
            mcp_source: self.mcp_source,
            max_body_bytes: self.max_body_bytes,
            resource_metadata: self.resource_metadata.clone(),
            challenge_scope: self.challenge_scope.clone(),
            clock: self.clock.clone(),
        })
    }
}

/// Safe inside a quoted-string of a `WWW-Authenticate` parameter.
pub(crate) fn header_safe(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}
