//! WIT-authenticated requests: a WIT-SVID (the WIMSE Workload Identity
//! Token) and the Workload Proof Token (WPT, draft-ietf-wimse-wpt) that
//! proves its sender holds the key the WIT-SVID's `cnf` names, for this one
//! request.
//!
//! The order of the checks: where the credentials are (exactly one WIT, in
//! `Workload-Identity-Token`; exactly one WPT, in `Authorization: WPT`, or
//! in the `Workload-Proof-Token` header of drafts -00/-01); the WIT-SVID
//! (header, `alg` the one its key verifies, signature by a WIT key of its
//! subject's trust domain, claims, `cnf.jwk`); the WPT (header, `alg` equal
//! to the `cnf` key's, signature by
//! that key, `aud`, `exp` short and not passed, `wth`, the hashes of the
//! other tokens the request carries); last, `jti` not seen before while the
//! WPT could be valid. Only then is the `jti` remembered, so a refused
//! request cannot burn another's.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Bytes;
use ring::digest;
use serde_json::{Map, Value};
use tower::{Layer, Service};

use crate::config::{Clock, JwksSource, clock_methods, unix_now};
use crate::jwks::{KeyCache, KeyError, KeyUse, PublicKey, VerifyingKey, parse_jwks_for};
use crate::token::MAX_TOKEN_LEN;

/// The header that carries the WIT (draft-ietf-wimse-workload-creds).
pub const WIT_HEADER: &str = "workload-identity-token";
/// The header that carried the WPT in drafts -00 and -01 of
/// draft-ietf-wimse-wpt (since -02: `Authorization: WPT`).
pub const LEGACY_WPT_HEADER: &str = "workload-proof-token";
/// The Txn-Token header, bound to the WPT by `tth`.
pub const TXN_TOKEN_HEADER: &str = "txn-token";
/// The JWS algorithms a WIT-SVID and its `cnf` key may use: those the
/// WIT-SVID spec allows and ring verifies (never `none` or an HMAC).
const ALGS: &[&str] = &["ES256", "ES384", "RS256", "PS256", "EdDSA"];
/// Longest `jti` kept for the replay check.
const MAX_JTI_LEN: usize = 256;

/// A request whose WIT-SVID and WPT were accepted, in its extensions.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedWorkload {
    /// The caller's SPIFFE ID (`sub` of the WIT-SVID).
    pub spiffe_id: String,
    /// Its trust domain (whose WIT key signed the WIT-SVID).
    pub trust_domain: String,
    /// The WIT-SVID's key id and expiry (seconds since the Unix epoch).
    pub wit_kid: String,
    pub wit_exp: i64,
    /// The WPT's `jti` and expiry.
    pub wpt_jti: String,
    pub wpt_exp: i64,
    /// Every claim of the WIT-SVID.
    pub wit_claims: Map<String, Value>,
}

/// Why a WIT-authenticated request was refused. The `Display` text goes into
/// the response's `error_description`; it never holds a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WitError {
    #[error("no Workload-Identity-Token or no Workload Proof Token")]
    Missing,
    #[error("more than one {0}")]
    Repeated(&'static str),
    #[error("{0} is malformed")]
    Malformed(&'static str),
    #[error("{0} is too long")]
    TooLong(&'static str),
    #[error("{0}: unsupported type; expected {1}")]
    Type(&'static str, &'static str),
    #[error("{0}: unsupported signing algorithm")]
    Algorithm(&'static str),
    #[error("{0}: unsupported critical header parameters")]
    Critical(&'static str),
    #[error("WIT: no key id")]
    MissingKid,
    #[error("WIT: its trust domain is not trusted here")]
    UntrustedDomain,
    #[error("WIT: signed by an unknown key")]
    UnknownKey,
    #[error("{0}: signature is invalid")]
    Signature(&'static str),
    #[error("{0}: claim {1} is missing or invalid")]
    Claim(&'static str, &'static str),
    #[error("WIT: a WIT must not have an aud claim")]
    WitAudience,
    #[error("{0}: has expired")]
    Expired(&'static str),
    #[error("{0}: is not yet valid")]
    NotYetValid(&'static str),
    #[error("WPT: alg differs from the WIT's cnf key alg")]
    AlgMismatch,
    #[error("WPT: aud is not this request's target URI")]
    Audience,
    #[error("WPT: expires too far in the future")]
    ExpiresTooLate,
    #[error("WPT: wth does not match the Workload-Identity-Token")]
    WitHash,
    #[error("WPT: {0} does not match the token the request carries")]
    TokenHash(&'static str),
    #[error("WPT: oth names {0:?}, which the request does not carry once")]
    OtherToken(String),
    #[error("WPT: an Authorization header with a WPT cannot also carry a bearer token")]
    Ambiguous,
    #[error("WPT: replayed (jti already used)")]
    Replayed,
    /// The replay check is full of unexpired proofs: answered 503, not 401.
    #[error("too many proofs to check for replay; retry")]
    Busy,
    /// The WIT's trust domain's keys could not be fetched (none cached):
    /// answered 503, not 401.
    #[error("the WIT keys of its trust domain are unavailable; retry")]
    KeysUnavailable,
}

/// Where a request's WPT came from.
enum WptPlace<'a> {
    /// `Authorization: WPT <jwt>` (draft -02 and later).
    Authorization(&'a str),
    /// `Workload-Proof-Token: <jwt>` (drafts -00/-01), with the bearer
    /// access token of `Authorization`, if any, which `ath` must bind.
    Legacy {
        wpt: &'a str,
        bearer: Option<&'a str>,
    },
}

struct Settings {
    target_base: String,
    audiences: Vec<String>,
    max_wpt_lifetime: Duration,
    clock_skew: Duration,
    replay_capacity: usize,
    clock: Clock,
}

/// The WIT-SVID keys of each trusted trust domain, by `kid`.
type Bundles = HashMap<String, HashMap<String, VerifyingKey>>;

/// `jti`s seen, each until its WPT's `exp` (plus skew) has passed.
#[derive(Default)]
struct ReplayCache {
    seen: HashMap<(String, String), i64>,
    order: VecDeque<(i64, (String, String))>,
}

struct WitGuard {
    settings: Settings,
    bundles: RwLock<Bundles>,
    /// Trust domains whose WIT keys the guard fetches itself.
    fetched: HashMap<String, KeyCache>,
    replay: Mutex<ReplayCache>,
}

/// Builder for [`WitGuardLayer`].
#[derive(Clone)]
pub struct WitGuardBuilder {
    target_base: Option<String>,
    audiences: Vec<String>,
    bundles: Vec<(String, Vec<u8>)>,
    sources: Vec<(String, JwksSource)>,
    refresh_interval: Duration,
    min_refresh_interval: Duration,
    http_timeout: Duration,
    max_wpt_lifetime: Duration,
    clock_skew: Duration,
    replay_capacity: usize,
    clock: Clock,
}

/// Invalid [`WitGuardBuilder`] settings or WIT bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WitConfigError {
    #[error(
        "the target URI base (scheme and authority this server is reached at, e.g. https://api.example) is not set"
    )]
    MissingTarget,
    #[error("target URI base {0:?}: must be scheme://authority with no path, query or fragment")]
    Target(String),
    #[error("no WIT bundle: give at least one trust domain's WIT-SVID keys")]
    MissingBundle,
    #[error("trust domain {0:?} is not a valid trust domain name")]
    TrustDomain(String),
    #[error("WIT bundle of {0}: {1}")]
    Bundle(String, String),
    #[error("WIT bundle source of {0}: {1}")]
    Source(String, String),
    #[error("trust domain {0} has both a WIT bundle and a WIT bundle source")]
    BothBundleAndSource(String),
}

impl Default for WitGuardBuilder {
    fn default() -> Self {
        Self {
            target_base: None,
            audiences: Vec::new(),
            bundles: Vec::new(),
            sources: Vec::new(),
            refresh_interval: Duration::from_secs(300),
            min_refresh_interval: Duration::from_secs(5),
            http_timeout: Duration::from_secs(5),
            max_wpt_lifetime: Duration::from_secs(300),
            clock_skew: Duration::from_secs(10),
            replay_capacity: 1_000_000,
            clock: Arc::new(SystemTime::now),
        }
    }
}

impl WitGuardBuilder {
    /// The scheme and authority clients reach this server at, e.g.
    /// `https://api.example` or `http://127.0.0.1:8080`: a WPT's `aud` must
    /// be this followed by the request's path, without query or fragment.
    /// Configured, never taken from the request's `Host`. Required.
    pub fn target_uri_base(mut self, base: impl Into<String>) -> Self {
        self.target_base = Some(base.into());
        self
    }

    /// Another `aud` value accepted as-is for every request (a deployment
    /// alias of the target URI, as the draft allows).
    pub fn accept_audience(mut self, audience: impl Into<String>) -> Self {
        self.audiences.push(audience.into());
        self
    }

    /// Trusts WIT-SVIDs of `trust_domain` signed by the keys of `jwks` (a
    /// JWKS document or SPIFFE bundle; only EC P-256 keys with a `kid` and
    /// `use` `wit-svid` are taken), e.g. a document `FetchWITBundles`
    /// answered. Replace it at run time with
    /// [`WitGuardLayer::set_wit_bundle`].
    pub fn wit_bundle(mut self, trust_domain: impl Into<String>, jwks: impl Into<Vec<u8>>) -> Self {
        self.bundles.push((trust_domain.into(), jwks.into()));
        self
    }

    /// Fetches the WIT-SVID keys of `trust_domain` from `source` (a JWKS
    /// or SPIFFE bundle document; only keys with `use` `wit-svid` are
    /// taken), e.g. a trust domain's bundle as its agent or HTTPS face
    /// serves it on loopback or a Unix socket. Fetched at the first WIT of
    /// the domain, cached, fetched again every
    /// [`wit_bundle_refresh_interval`](Self::wit_bundle_refresh_interval)
    /// and when a WIT names a key the cache lacks (at most once per
    /// [`wit_bundle_min_refresh_interval`](Self::wit_bundle_min_refresh_interval)),
    /// so a new key works from its first WIT. A failed fetch keeps the
    /// cached keys.
    pub fn wit_bundle_source(
        mut self,
        trust_domain: impl Into<String>,
        source: JwksSource,
    ) -> Self {
        self.sources.push((trust_domain.into(), source));
        self
    }

    /// How often fetched WIT keys are fetched again (default 5 minutes).
    pub fn wit_bundle_refresh_interval(mut self, interval: Duration) -> Self {
        self.refresh_interval = interval;
        self
    }

    /// The least time between two fetches of one trust domain's WIT keys,
    /// also for unknown `kid`s (default 5 s).
    pub fn wit_bundle_min_refresh_interval(mut self, interval: Duration) -> Self {
        self.min_refresh_interval = interval;
        self
    }

    /// Timeout of one fetch of WIT keys (default 5 s).
    pub fn http_timeout(mut self, timeout: Duration) -> Self {
        self.http_timeout = timeout;
        self
    }

    /// The longest a WPT may be valid from now (default 5 minutes): one
    /// expiring later is refused, and `jti`s are remembered this long.
    pub fn max_wpt_lifetime(mut self, lifetime: Duration) -> Self {
        self.max_wpt_lifetime = lifetime;
        self
    }

    clock_methods!("Tolerance for clock differences on `exp` and `nbf` (default 10 s).");

    /// How many `jti`s the replay check holds (default 1,000,000). When it
    /// is full of unexpired ones, new requests get 503 rather than a
    /// weaker check.
    pub fn replay_capacity(mut self, capacity: usize) -> Self {
        self.replay_capacity = capacity.max(1);
        self
    }

    pub fn build(self) -> Result<WitGuardLayer, WitConfigError> {
        let base = self.target_base.ok_or(WitConfigError::MissingTarget)?;
        let uri: http::Uri = base
            .parse()
            .map_err(|_| WitConfigError::Target(base.clone()))?;
        let plain = uri.scheme().is_some()
            && uri.authority().is_some()
            && uri.query().is_none()
            && matches!(uri.path(), "" | "/")
            && !base.contains('#');
        if !plain {
            return Err(WitConfigError::Target(base));
        }
        if self.bundles.is_empty() && self.sources.is_empty() {
            return Err(WitConfigError::MissingBundle);
        }
        let mut bundles = Bundles::new();
        for (td, jwks) in &self.bundles {
            let (td, keys) = bundle(td, jwks)?;
            bundles.insert(td, keys);
        }
        let mut fetched = HashMap::new();
        for (td, source) in &self.sources {
            let name = trust_domain_name(td)?;
            if bundles.contains_key(&name) || fetched.contains_key(&name) {
                return Err(WitConfigError::BothBundleAndSource(name));
            }
            let endpoint = source
                .endpoint()
                .map_err(|e| WitConfigError::Source(name.clone(), e))?;
            let cache = KeyCache::new(
                endpoint,
                KeyUse::WitSvid,
                self.refresh_interval,
                self.min_refresh_interval,
                self.http_timeout,
            );
            fetched.insert(name, cache);
        }
        Ok(WitGuardLayer {
            guard: Arc::new(WitGuard {
                settings: Settings {
                    target_base: base.trim_end_matches('/').to_string(),
                    audiences: self.audiences,
                    max_wpt_lifetime: self.max_wpt_lifetime,
                    clock_skew: self.clock_skew,
                    replay_capacity: self.replay_capacity,
                    clock: self.clock,
                },
                bundles: RwLock::new(bundles),
                fetched,
                replay: Mutex::new(ReplayCache::default()),
            }),
        })
    }
}

/// A trust domain name, or its `spiffe://` ID, as its name.
fn trust_domain_name(td: &str) -> Result<String, WitConfigError> {
    let name = td.strip_prefix("spiffe://").unwrap_or(td);
    if !valid_trust_domain(name) {
        return Err(WitConfigError::TrustDomain(td.to_string()));
    }
    Ok(name.to_string())
}

/// A trust domain name (or its `spiffe://` ID) and its WIT keys.
fn bundle(
    td: &str,
    jwks: &[u8],
) -> Result<(String, HashMap<String, VerifyingKey>), WitConfigError> {
    let name = trust_domain_name(td)?;
    let keys = parse_jwks_for(jwks, KeyUse::WitSvid)
        .map_err(|e| WitConfigError::Bundle(name.clone(), e))?;
    Ok((name, keys))
}

fn valid_trust_domain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

/// A `tower::Layer` that lets through only requests carrying a valid
/// WIT-SVID and a Workload Proof Token for this request signed with the
/// WIT-SVID's key. Cheap to clone (clones share keys and the replay check).
#[derive(Clone)]
pub struct WitGuardLayer {
    guard: Arc<WitGuard>,
}

impl WitGuardLayer {
    pub fn builder() -> WitGuardBuilder {
        WitGuardBuilder::default()
    }

    /// Replaces the WIT-SVID keys trusted for `trust_domain` (e.g. on each
    /// `FetchWITBundles` update: a new key is published before it signs).
    pub fn set_wit_bundle(&self, trust_domain: &str, jwks: &[u8]) -> Result<(), WitConfigError> {
        let (td, keys) = bundle(trust_domain, jwks)?;
        self.guard
            .bundles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(td, keys);
        Ok(())
    }

    /// Checks a request's credentials outside of a tower stack: `headers`
    /// and the request's `path` (without query).
    /// A trust domain whose keys are fetched ([`WitGuardBuilder::wit_bundle_source`])
    /// is checked with the keys cached so far: the service fetches, this
    /// does not.
    pub fn verify(&self, headers: &HeaderMap, path: &str) -> Result<VerifiedWorkload, WitError> {
        self.guard.check(headers, path, None)
    }
}

impl<S> Layer<S> for WitGuardLayer {
    type Service = WitGuardService<S>;

    fn layer(&self, inner: S) -> WitGuardService<S> {
        WitGuardService {
            inner,
            guard: self.guard.clone(),
        }
    }
}

/// The service [`WitGuardLayer`] wraps around an inner service. Passes on
/// accepted requests with a [`VerifiedWorkload`] in their extensions.
#[derive(Clone)]
pub struct WitGuardService<S> {
    inner: S,
    guard: Arc<WitGuard>,
}

impl<S, B, ResBody> Service<Request<B>> for WitGuardService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Either<Full<Bytes>, ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let guard = self.guard.clone();
        Box::pin(async move {
            let fetched = guard.fetch_wit_key(request.headers()).await;
            let checked = guard.check(request.headers(), request.uri().path(), fetched);
            match checked {
                Ok(verified) => {
                    tracing::trace!(spiffe_id = %verified.spiffe_id, jti = %verified.wpt_jti, "WIT-authenticated request accepted");
                    request.extensions_mut().insert(verified);
                    inner.call(request).await.map(|r| r.map(Either::Right))
                }
                Err(rejection) => Ok(respond(rejection).map(Either::Left)),
            }
        })
    }
}

/// 401 with a `WPT` challenge for anything about the credentials (the
/// draft's advice), 503 when the replay check is full.
fn respond(rejection: WitError) -> Response<Full<Bytes>> {
    let (status, code, description) = match &rejection {
        WitError::Missing => (StatusCode::UNAUTHORIZED, None, String::new()),
        WitError::Busy | WitError::KeysUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("temporarily_unavailable"),
            rejection.to_string(),
        ),
        e => (
            StatusCode::UNAUTHORIZED,
            Some("invalid_token"),
            e.to_string(),
        ),
    };
    let mut builder = Response::builder().status(status);
    if status == StatusCode::UNAUTHORIZED {
        builder = builder.header(header::WWW_AUTHENTICATE, HeaderValue::from_static("WPT"));
    } else {
        builder = builder.header(header::RETRY_AFTER, "1");
    }
    let body = match code {
        Some(code) => {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
            Bytes::from(
                serde_json::json!({"error": code, "error_description": description}).to_string(),
            )
        }
        None => Bytes::new(),
    };
    builder
        .body(Full::new(body))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// The one value of header `name`, if any.
fn single<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, WitError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(WitError::Repeated(name));
    }
    value
        .to_str()
        .map(|v| Some(v.trim_matches(|c| c == ' ' || c == '\t')))
        .map_err(|_| WitError::Malformed(name))
}

/// Where the WPT is: `Authorization: WPT`, or the legacy header.
fn wpt_place(headers: &HeaderMap) -> Result<WptPlace<'_>, WitError> {
    let authorization = single(headers, "authorization")?;
    let legacy = single(headers, LEGACY_WPT_HEADER)?;
    let scheme = authorization.map(|v| v.split_once(' ').map_or((v, ""), |(s, r)| (s, r.trim())));
    match (scheme, legacy) {
        (Some((s, token)), None) if s.eq_ignore_ascii_case("wpt") && !token.is_empty() => {
            Ok(WptPlace::Authorization(token))
        }
        (Some((s, _)), Some(_)) if s.eq_ignore_ascii_case("wpt") => Err(WitError::Ambiguous),
        (Some((s, token)), Some(wpt)) if s.eq_ignore_ascii_case("bearer") && !token.is_empty() => {
            Ok(WptPlace::Legacy {
                wpt,
                bearer: Some(token),
            })
        }
        (None, Some(wpt)) => Ok(WptPlace::Legacy { wpt, bearer: None }),
        _ => Err(WitError::Missing),
    }
}

/// `base64url(SHA-256(value))`, the draft's token hash.
fn token_hash(value: &str) -> String {
    B64.encode(digest::digest(&digest::SHA256, value.as_bytes()))
}

/// A compact JWS split, its header and claims decoded; nothing verified.
struct Jws<'a> {
    header: Map<String, Value>,
    claims: Map<String, Value>,
    signing_input: &'a [u8],
    signature: Vec<u8>,
}

fn split<'a>(token: &'a str, what: &'static str) -> Result<Jws<'a>, WitError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(WitError::TooLong(what));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(WitError::Malformed(what));
    };
    let object = |part: &str| -> Result<Map<String, Value>, WitError> {
        let bytes = B64.decode(part).map_err(|_| WitError::Malformed(what))?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(WitError::Malformed(what)),
        }
    };
    let header = object(h)?;
    let claims = object(p)?;
    let signature = B64.decode(s).map_err(|_| WitError::Malformed(what))?;
    if header.contains_key("crit") {
        return Err(WitError::Critical(what));
    }
    Ok(Jws {
        header,
        claims,
        signing_input: &token.as_bytes()[..h.len() + 1 + p.len()],
        signature,
    })
}

/// Whether the JOSE `typ` conveys the media type `want` (`x+jwt` or
/// `application/x+jwt`, case-insensitive).
fn typ_is(header: &Map<String, Value>, want: &str) -> bool {
    header.get("typ").and_then(Value::as_str).is_some_and(|t| {
        let t = t.to_ascii_lowercase();
        t == want || t.strip_prefix("application/") == Some(want)
    })
}

fn int(
    claims: &Map<String, Value>,
    name: &'static str,
    what: &'static str,
) -> Result<Option<i64>, WitError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or(WitError::Claim(what, name)),
    }
}

fn string<'a>(
    claims: &'a Map<String, Value>,
    name: &'static str,
    what: &'static str,
) -> Result<&'a str, WitError> {
    claims
        .get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(WitError::Claim(what, name))
}

/// The P-256 point of a `cnf.jwk`: EC P-256, `alg` ES256, public only.
fn cnf_key(claims: &Map<String, Value>) -> Result<PublicKey, WitError> {
    let jwk = claims
        .get("cnf")
        .and_then(|c| c.get("jwk"))
        .and_then(Value::as_object)
        .ok_or(WitError::Claim("WIT", "cnf.jwk"))?;
    match jwk.get("alg").and_then(Value::as_str) {
        Some(alg) if ALGS.contains(&alg) => {}
        Some(_) => return Err(WitError::Algorithm("WIT cnf.jwk")),
        None => return Err(WitError::Claim("WIT", "cnf.jwk.alg")),
    }
    // A private key (`d`), a key of another type than its `alg`, a short
    // RSA key: refused.
    PublicKey::from_jwk(jwk).ok_or(WitError::Claim("WIT", "cnf.jwk"))
}

/// The trust domain of a SPIFFE ID (`spiffe://<td>/<path>`).
fn trust_domain_of(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("spiffe://")?;
    let (td, path) = rest.split_once('/')?;
    (valid_trust_domain(td) && !path.is_empty() && !id.contains(['?', '#'])).then_some(td)
}

impl WitGuard {
    fn now(&self) -> i64 {
        unix_now(&self.settings.clock)
    }

    /// The key a request's WIT names, when its trust domain's keys are
    /// fetched: from the cache, fetched when stale or when the `kid` is
    /// unknown. `None` when the WIT cannot be read this far (the checks
    /// then say why) or its domain's keys are not fetched.
    async fn fetch_wit_key(&self, headers: &HeaderMap) -> Option<Result<VerifyingKey, KeyError>> {
        if self.fetched.is_empty() {
            return None;
        }
        let wit = single(headers, WIT_HEADER).ok()??;
        let w = split(wit, "WIT").ok()?;
        let kid = w.header.get("kid")?.as_str()?;
        let td = trust_domain_of(w.claims.get("sub")?.as_str()?)?;
        Some(self.fetched.get(td)?.key(kid).await)
    }

    fn check(
        &self,
        headers: &HeaderMap,
        path: &str,
        fetched: Option<Result<VerifyingKey, KeyError>>,
    ) -> Result<VerifiedWorkload, WitError> {
        let result = self.verify(headers, path, fetched);
        if let Err(e) = &result {
            tracing::debug!(reason = %e, "WIT-authenticated request refused");
        }
        result
    }

    fn verify(
        &self,
        headers: &HeaderMap,
        path: &str,
        fetched: Option<Result<VerifyingKey, KeyError>>,
    ) -> Result<VerifiedWorkload, WitError> {
        let wit = single(headers, WIT_HEADER)?;
        let place = wpt_place(headers)?;
        let wit = wit.filter(|w| !w.is_empty()).ok_or(WitError::Missing)?;
        let now = self.now();
        let skew = self.settings.clock_skew.as_secs() as i64;

        // The WIT-SVID.
        let w = split(wit, "WIT")?;
        if !typ_is(&w.header, "wit+jwt") {
            return Err(WitError::Type("WIT", "wit+jwt"));
        }
        let wit_alg = w
            .header
            .get("alg")
            .and_then(Value::as_str)
            .filter(|a| ALGS.contains(a))
            .ok_or(WitError::Algorithm("WIT"))?;
        let kid = w
            .header
            .get("kid")
            .and_then(Value::as_str)
            .filter(|k| !k.is_empty())
            .ok_or(WitError::MissingKid)?;
        let sub = string(&w.claims, "sub", "WIT")?;
        let td = trust_domain_of(sub).ok_or(WitError::Claim("WIT", "sub"))?;
        let key = match (self.fetched.get(td), fetched) {
            (Some(_), Some(Ok(key))) => key,
            (Some(_), Some(Err(KeyError::Unknown(_)))) => return Err(WitError::UnknownKey),
            (Some(_), Some(Err(KeyError::Unavailable(_)))) => {
                return Err(WitError::KeysUnavailable);
            }
            (Some(cache), None) => cache.cached(kid).ok_or(WitError::UnknownKey)?,
            (None, _) => {
                let bundles = self.bundles.read().unwrap_or_else(|e| e.into_inner());
                let keys = bundles.get(td).ok_or(WitError::UntrustedDomain)?;
                keys.get(kid).ok_or(WitError::UnknownKey)?.clone()
            }
        };
        // The key verifies one algorithm: the header cannot pick another.
        if key.alg() != wit_alg {
            return Err(WitError::Algorithm("WIT"));
        }
        key.verify(w.signing_input, &w.signature)
            .map_err(|_| WitError::Signature("WIT"))?;
        let wit_exp = int(&w.claims, "exp", "WIT")?.ok_or(WitError::Claim("WIT", "exp"))?;
        if wit_exp.saturating_add(skew) <= now {
            return Err(WitError::Expired("WIT"));
        }
        if int(&w.claims, "nbf", "WIT")?.is_some_and(|nbf| nbf > now + skew) {
            return Err(WitError::NotYetValid("WIT"));
        }
        if w.claims.contains_key("aud") {
            return Err(WitError::WitAudience);
        }
        let cnf = cnf_key(&w.claims)?;

        // The WPT.
        let (wpt, bearer) = match place {
            WptPlace::Authorization(t) => (t, None),
            WptPlace::Legacy { wpt, bearer } => (wpt, bearer),
        };
        let p = split(wpt, "WPT")?;
        if !typ_is(&p.header, "wpt+jwt") {
            return Err(WitError::Type("WPT", "wpt+jwt"));
        }
        // String-equal to the cnf key's alg.
        if p.header.get("alg").and_then(Value::as_str) != Some(cnf.alg()) {
            return Err(WitError::AlgMismatch);
        }
        cnf.verify(p.signing_input, &p.signature)
            .map_err(|_| WitError::Signature("WPT"))?;
        let target = format!("{}{}", self.settings.target_base, path);
        let aud_ok = |a: &Value| {
            a.as_str()
                .is_some_and(|a| a == target || self.settings.audiences.iter().any(|x| x == a))
        };
        let aud_matches = match p.claims.get("aud") {
            Some(Value::Array(list)) => list.iter().any(aud_ok),
            Some(a) => aud_ok(a),
            None => false,
        };
        if !aud_matches {
            return Err(WitError::Audience);
        }
        let exp = int(&p.claims, "exp", "WPT")?.ok_or(WitError::Claim("WPT", "exp"))?;
        if exp.saturating_add(skew) <= now {
            return Err(WitError::Expired("WPT"));
        }
        let max = self.settings.max_wpt_lifetime.as_secs() as i64;
        if exp > now.saturating_add(max).saturating_add(skew) {
            return Err(WitError::ExpiresTooLate);
        }
        if int(&p.claims, "nbf", "WPT")?.is_some_and(|nbf| nbf > now + skew) {
            return Err(WitError::NotYetValid("WPT"));
        }
        if string(&p.claims, "wth", "WPT")? != token_hash(wit) {
            return Err(WitError::WitHash);
        }
        let jti = string(&p.claims, "jti", "WPT")?;
        if jti.len() > MAX_JTI_LEN {
            return Err(WitError::Claim("WPT", "jti"));
        }
        // Tokens carried beside: each bound by its hash, and no hash without
        // its token.
        let bound = |claim: &'static str, carried: Option<&str>| -> Result<(), WitError> {
            match (p.claims.get(claim), carried) {
                (None, None) => Ok(()),
                (Some(Value::String(h)), Some(t)) if *h == token_hash(t) => Ok(()),
                _ => Err(WitError::TokenHash(claim)),
            }
        };
        bound("ath", bearer)?;
        let txn = single(headers, TXN_TOKEN_HEADER)?;
        bound("tth", txn)?;
        match p.claims.get("oth") {
            None => {}
            Some(Value::Object(others)) => {
                for (name, hash) in others {
                    let carried = (name.to_ascii_lowercase() == *name)
                        .then(|| http::HeaderName::from_bytes(name.as_bytes()).ok())
                        .flatten()
                        .and_then(|h| {
                            let mut all = headers.get_all(&h).iter();
                            let first = all.next()?;
                            all.next().is_none().then_some(first)?.to_str().ok()
                        })
                        .map(|v| v.trim_matches(|c| c == ' ' || c == '\t'));
                    match (hash, carried) {
                        (Value::String(h), Some(v)) if *h == token_hash(v) => {}
                        _ => return Err(WitError::OtherToken(name.clone())),
                    }
                }
            }
            Some(_) => return Err(WitError::Claim("WPT", "oth")),
        }

        // Last: the replay check, which remembers the jti.
        self.remember(sub, jti, exp.saturating_add(skew), now)?;
        Ok(VerifiedWorkload {
            spiffe_id: sub.to_string(),
            trust_domain: td.to_string(),
            wit_kid: kid.to_string(),
            wit_exp,
            wpt_jti: jti.to_string(),
            wpt_exp: exp,
            wit_claims: w.claims.clone(),
        })
    }

    /// Records (`sub`, `jti`) until `until`; refuses one already recorded.
    fn remember(&self, sub: &str, jti: &str, until: i64, now: i64) -> Result<(), WitError> {
        let mut cache = self.replay.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((at, _)) = cache.order.front()
            && *at <= now
        {
            if let Some((_, key)) = cache.order.pop_front()
                && cache.seen.get(&key).is_some_and(|u| *u <= now)
            {
                cache.seen.remove(&key);
            }
        }
        let key = (sub.to_string(), jti.to_string());
        if cache.seen.get(&key).is_some_and(|u| *u > now) {
            return Err(WitError::Replayed);
        }
        if cache.seen.len() >= self.settings.replay_capacity {
            // The queue is in arrival order: sweep every expired entry.
            cache.seen.retain(|_, u| *u > now);
            let ReplayCache { seen, order } = &mut *cache;
            order.retain(|(_, key)| seen.contains_key(key));
        }
        if cache.seen.len() >= self.settings.replay_capacity {
            tracing::warn!(
                capacity = self.settings.replay_capacity,
                "WPT replay check full; refusing new proofs until some expire"
            );
            return Err(WitError::Busy);
        }
        cache.seen.insert(key.clone(), until);
        // Entries are queued in arrival order, not expiry order; the sweep
        // above stops at the first unexpired one, so one long-lived entry
        // can delay the purge of shorter ones by at most the longest WPT
        // lifetime. The capacity bounds the memory either way.
        cache.order.push_back((until, key));
        Ok(())
    }
}
