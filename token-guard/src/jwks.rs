//! The issuer's signing keys: a JWKS fetched from the issuer, cached, refreshed
//! periodically and (rate-limited) when a token names a key we have not seen.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::Method;
use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use serde::Deserialize;
use tokio::time::Instant;

use crate::transport::{self, Endpoint};

/// One ES256 verification key.
pub(crate) type VerifyingKey = Arc<UnparsedPublicKey<Vec<u8>>>;

#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    /// The JWKS was fetched (or recently tried) and has no such key.
    #[error("no signing key {0:?} at the issuer")]
    Unknown(String),
    /// No usable JWKS: the issuer could not be reached.
    #[error("issuer keys unavailable: {0}")]
    Unavailable(String),
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct EcJwk {
    kty: String,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, rename = "use")]
    key_use: Option<String>,
    #[serde(default)]
    alg: Option<String>,
}

/// Which keys of a JWKS a verifier takes, by their `use`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyUse {
    /// Signature keys (`use` `sig`, or none): an issuer's JWKS.
    Sig,
    /// WIT-SVID keys (`use` `wit-svid` only): a WIT bundle or a SPIFFE
    /// bundle, where JWT-SVID keys must not verify a WIT-SVID.
    WitSvid,
}

/// Parses a JWKS document into the ES256 keys of `key_use` it holds, by
/// `kid`. Keys of other types, keys for encryption and keys without a `kid`
/// are skipped, so an issuer can publish them without breaking us.
pub(crate) fn parse_jwks_for(
    body: &[u8],
    key_use: KeyUse,
) -> Result<HashMap<String, VerifyingKey>, String> {
    let set: JwkSet = serde_json::from_slice(body).map_err(|e| format!("JWKS: {e}"))?;
    let mut keys = HashMap::new();
    for value in set.keys {
        let Ok(jwk) = serde_json::from_value::<EcJwk>(value) else {
            continue;
        };
        if jwk.kty != "EC"
            || jwk.crv.as_deref() != Some("P-256")
            || match key_use {
                KeyUse::Sig => jwk.key_use.as_deref().is_some_and(|u| u != "sig"),
                KeyUse::WitSvid => jwk.key_use.as_deref() != Some("wit-svid"),
            }
            || jwk.alg.as_deref().is_some_and(|a| a != "ES256")
        {
            continue;
        }
        let (Some(kid), Some(x), Some(y)) = (jwk.kid, jwk.x, jwk.y) else {
            continue;
        };
        let (Ok(x), Ok(y)) = (B64.decode(x), B64.decode(y)) else {
            continue;
        };
        if x.len() != 32 || y.len() != 32 {
            continue;
        }
        let mut point = Vec::with_capacity(65);
        point.push(0x04);
        point.extend_from_slice(&x);
        point.extend_from_slice(&y);
        keys.insert(
            kid,
            Arc::new(UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)),
        );
    }
    Ok(keys)
}

struct Snapshot {
    keys: HashMap<String, VerifyingKey>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
}

/// The cached JWKS of one issuer (or one trust domain's WIT bundle).
pub(crate) struct KeyCache {
    endpoint: Endpoint,
    key_use: KeyUse,
    refresh_interval: Duration,
    min_refresh_interval: Duration,
    timeout: Duration,
    state: RwLock<Snapshot>,
    /// One fetch at a time; others wait and then use its result.
    fetching: tokio::sync::Mutex<()>,
}

impl KeyCache {
    pub(crate) fn new(
        endpoint: Endpoint,
        key_use: KeyUse,
        refresh_interval: Duration,
        min_refresh_interval: Duration,
        timeout: Duration,
    ) -> Self {
        KeyCache {
            endpoint,
            key_use,
            refresh_interval,
            min_refresh_interval,
            timeout,
            state: RwLock::new(Snapshot {
                keys: HashMap::new(),
                fetched_at: None,
                last_attempt: None,
                last_error: None,
            }),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// The key with this `kid`, fetching the JWKS when the cache is stale or the
    /// key is unknown (at most once per `min_refresh_interval`).
    pub(crate) async fn key(&self, kid: &str) -> Result<VerifyingKey, KeyError> {
        let (found, stale) = self.lookup(kid);
        if let Some(key) = found
            && !stale
        {
            return Ok(key);
        }
        // Stale cache: refresh; a failed refresh keeps the keys we have.
        // Unknown kid: refresh (rate-limited) in case the issuer rotated. A key
        // the issuer no longer publishes is no longer trusted.
        self.refresh().await;
        if let (Some(key), _) = self.lookup(kid) {
            return Ok(key);
        }
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        match (&state.fetched_at, &state.last_error) {
            (None, Some(err)) => Err(KeyError::Unavailable(err.clone())),
            (None, None) => Err(KeyError::Unavailable("no JWKS fetched yet".into())),
            _ => Err(KeyError::Unknown(kid.to_string())),
        }
    }

    /// The key with this `kid` if it is cached (fresh or not), without
    /// fetching.
    pub(crate) fn cached(&self, kid: &str) -> Option<VerifyingKey> {
        self.lookup(kid).0
    }

    fn lookup(&self, kid: &str) -> (Option<VerifyingKey>, bool) {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let stale = state
            .fetched_at
            .is_none_or(|t| t.elapsed() >= self.refresh_interval);
        (state.keys.get(kid).cloned(), stale)
    }

    async fn refresh(&self) {
        let started = Instant::now();
        let _guard = self.fetching.lock().await;
        {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            // Someone fetched while we waited, or we tried too recently.
            if let Some(t) = state.last_attempt
                && (t >= started || t.elapsed() < self.min_refresh_interval)
            {
                return;
            }
        }
        let result = transport::call(&self.endpoint, Method::GET, None, self.timeout)
            .await
            .map_err(|e| e.to_string())
            .and_then(|body| parse_jwks_for(&body, self.key_use));
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.last_attempt = Some(Instant::now());
        match result {
            Ok(keys) => {
                tracing::debug!(endpoint = %self.endpoint.describe(), keys = keys.len(), "fetched JWKS");
                state.keys = keys;
                state.fetched_at = Some(Instant::now());
                state.last_error = None;
            }
            Err(err) => {
                tracing::warn!(endpoint = %self.endpoint.describe(), error = %err, "JWKS fetch failed; keeping cached keys");
                state.last_error = Some(err);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_keys_it_cannot_use() {
        let x = B64.encode([1u8; 32]);
        let y = B64.encode([2u8; 32]);
        let doc = serde_json::json!({"keys": [
            {"kty":"EC","crv":"P-256","x":x,"y":y,"kid":"good","use":"sig","alg":"ES256"},
            {"kty":"EC","crv":"P-256","x":x,"y":y,"kid":"noalg"},
            {"kty":"EC","crv":"P-384","x":x,"y":y,"kid":"p384"},
            {"kty":"RSA","n":"AQAB","e":"AQAB","kid":"rsa"},
            {"kty":"EC","crv":"P-256","x":x,"y":y,"kid":"enc","use":"enc"},
            {"kty":"EC","crv":"P-256","x":x,"y":y,"kid":"hs","alg":"HS256"},
            {"kty":"EC","crv":"P-256","x":"AAAA","y":y,"kid":"short"},
            {"kty":"EC","crv":"P-256","x":x,"y":y},
            "garbage"
        ]});
        let parse_jwks = |body: &[u8]| parse_jwks_for(body, KeyUse::Sig);
        let keys = parse_jwks(doc.to_string().as_bytes()).unwrap();
        let mut kids: Vec<_> = keys.keys().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["good", "noalg"]);
        assert!(parse_jwks(b"{").is_err());
        assert!(parse_jwks(b"{}").is_err());
    }
}
