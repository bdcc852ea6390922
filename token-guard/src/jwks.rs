//! The issuer's signing keys: a JWKS fetched from the issuer, cached, refreshed
//! periodically and (rate-limited) when a token names a key we have not seen.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::Method;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED, ED25519, RSA_PKCS1_2048_8192_SHA256,
    RSA_PSS_2048_8192_SHA256, RsaPublicKeyComponents, UnparsedPublicKey,
};
use serde::Deserialize;
use tokio::time::Instant;

use crate::transport::{self, Endpoint};

/// One verification key and the one JWS algorithm it verifies.
pub(crate) type VerifyingKey = Arc<PublicKey>;

/// A public key from a JWK, bound to one algorithm: ES256 (EC P-256),
/// ES384 (EC P-384), EdDSA (OKP Ed25519), or RS256 / PS256 (RSA, at least
/// 2048 bits, named by the JWK's `alg`).
pub(crate) struct PublicKey {
    alg: &'static str,
    key: KeyData,
}

enum KeyData {
    Unparsed(UnparsedPublicKey<Vec<u8>>),
    Rsa(
        RsaPublicKeyComponents<Vec<u8>>,
        &'static ring::signature::RsaParameters,
    ),
}

impl PublicKey {
    /// The key a JWK describes, if it is a public key of a supported type
    /// whose `alg` (when given; required for RSA) fits it.
    pub(crate) fn from_jwk(jwk: &serde_json::Map<String, serde_json::Value>) -> Option<Self> {
        let s = |k: &str| jwk.get(k).and_then(serde_json::Value::as_str);
        let b = |k: &str| s(k).and_then(|v| B64.decode(v).ok());
        if jwk.contains_key("d") {
            return None;
        }
        let given = s("alg");
        let fits = |alg: &'static str| given.is_none_or(|g| g == alg).then_some(alg);
        let (alg, key) = match (s("kty")?, s("crv")) {
            ("EC", Some(crv)) => {
                let (alg, len, verifier): (
                    _,
                    _,
                    &'static dyn ring::signature::VerificationAlgorithm,
                ) = match crv {
                    "P-256" => ("ES256", 32, &ECDSA_P256_SHA256_FIXED),
                    "P-384" => ("ES384", 48, &ECDSA_P384_SHA384_FIXED),
                    _ => return None,
                };
                let (x, y) = (b("x")?, b("y")?);
                if x.len() != len || y.len() != len {
                    return None;
                }
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                (
                    fits(alg)?,
                    KeyData::Unparsed(UnparsedPublicKey::new(verifier, point)),
                )
            }
            ("OKP", Some("Ed25519")) => {
                let x = b("x")?;
                if x.len() != 32 {
                    return None;
                }
                (
                    fits("EdDSA")?,
                    KeyData::Unparsed(UnparsedPublicKey::new(&ED25519, x)),
                )
            }
            ("RSA", _) => {
                let (alg, params): (_, &'static ring::signature::RsaParameters) = match given? {
                    "RS256" => ("RS256", &RSA_PKCS1_2048_8192_SHA256),
                    "PS256" => ("PS256", &RSA_PSS_2048_8192_SHA256),
                    _ => return None,
                };
                let (n, e) = (b("n")?, b("e")?);
                if n.len() < 256 || e.is_empty() {
                    return None;
                }
                (alg, KeyData::Rsa(RsaPublicKeyComponents { n, e }, params))
            }
            _ => return None,
        };
        Some(Self { alg, key })
    }

    /// The one JWS `alg` this key verifies.
    pub(crate) fn alg(&self) -> &'static str {
        self.alg
    }

    pub(crate) fn verify(
        &self,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), ring::error::Unspecified> {
        match &self.key {
            KeyData::Unparsed(k) => k.verify(message, signature),
            KeyData::Rsa(k, params) => k.verify(params, message, signature),
        }
    }
}

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

/// Which keys of a JWKS a verifier takes, by their `use`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyUse {
    /// Signature keys (`use` `sig`, or none): an issuer's JWKS.
    Sig,
    /// WIT-SVID keys (`use` `wit-svid` only): a WIT bundle or a SPIFFE
    /// bundle, where JWT-SVID keys must not verify a WIT-SVID.
    WitSvid,
}

/// Parses a JWKS document into the keys of `key_use` it holds, by `kid`
/// ([`PublicKey`]; for [`KeyUse::Sig`] ES256 only). Keys of other types,
/// keys for encryption and keys without a `kid` are skipped, so an issuer
/// can publish them without breaking us.
pub(crate) fn parse_jwks_for(
    body: &[u8],
    key_use: KeyUse,
) -> Result<HashMap<String, VerifyingKey>, String> {
    let set: JwkSet = serde_json::from_slice(body).map_err(|e| format!("JWKS: {e}"))?;
    let mut keys = HashMap::new();
    for value in set.keys {
        let Some(jwk) = value.as_object() else {
            continue;
        };
        let key_use_of = jwk.get("use").and_then(serde_json::Value::as_str);
        let wanted = match key_use {
            KeyUse::Sig => key_use_of.is_none_or(|u| u == "sig"),
            KeyUse::WitSvid => key_use_of == Some("wit-svid"),
        };
        let Some(kid) = jwk.get("kid").and_then(serde_json::Value::as_str) else {
            continue;
        };
        let Some(key) = wanted.then(|| PublicKey::from_jwk(jwk)).flatten() else {
            continue;
        };
        // An issuer's tokens (Tessera's access tokens) are ES256 only; WIT
        // bundles may carry any algorithm the WIT-SVID spec allows.
        if key_use == KeyUse::Sig && key.alg() != "ES256" {
            continue;
        }
        keys.insert(kid.to_string(), Arc::new(key));
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
