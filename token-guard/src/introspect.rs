//! Revocation checks through RFC 7662 introspection at the issuer, with a
//! short cache: "active" answers for a few seconds (so revocation takes effect
//! within that time), "inactive" answers until the token expires (a revoked
//! token never comes back).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use http::Method;
use ring::digest;
use serde::Deserialize;
use tokio::time::Instant;

use crate::transport::{self, Endpoint, form_encode};

/// Entries kept before expired ones are swept out; if they are all still live
/// the cache is emptied rather than allowed to grow (answers are re-fetched).
const CACHE_SWEEP_AT: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[error("introspection failed: {0}")]
pub(crate) struct IntrospectionError(String);

#[derive(Deserialize)]
struct Response {
    active: bool,
    #[serde(default)]
    jti: Option<String>,
}

struct Entry {
    active: bool,
    until: Instant,
}

pub(crate) struct Introspector {
    endpoint: Endpoint,
    positive_ttl: Duration,
    timeout: Duration,
    cache: Mutex<HashMap<[u8; 32], Entry>>,
}

impl Introspector {
    pub(crate) fn new(endpoint: Endpoint, positive_ttl: Duration, timeout: Duration) -> Self {
        Introspector {
            endpoint,
            positive_ttl,
            timeout,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the issuer still considers the token active. `remaining` is the
    /// time until the token expires (how long a negative answer is kept).
    pub(crate) async fn is_active(
        &self,
        token: &str,
        jti: &str,
        remaining: Duration,
    ) -> Result<bool, IntrospectionError> {
        // Keyed by a hash so the cache never holds a usable token.
        let key: [u8; 32] = digest::digest(&digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .unwrap_or([0; 32]);
        let now = Instant::now();
        if let Some(e) = self.lock().get(&key)
            && e.until > now
        {
            return Ok(e.active);
        }
        let body = transport::call(
            &self.endpoint,
            Method::POST,
            Some(format!(
                "token={}&token_type_hint=access_token",
                form_encode(token)
            )),
            self.timeout,
        )
        .await
        .map_err(|e| IntrospectionError(e.to_string()))?;
        let response: Response = serde_json::from_slice(&body)
            .map_err(|e| IntrospectionError(format!("bad response: {e}")))?;
        // An issuer answering for some other token is as good as no answer.
        let active = response.active && response.jti.as_deref().is_none_or(|j| j == jti);
        let ttl = if active {
            self.positive_ttl.min(remaining)
        } else {
            remaining
        };
        let mut cache = self.lock();
        if cache.len() >= CACHE_SWEEP_AT {
            cache.retain(|_, e| e.until > now);
            if cache.len() >= CACHE_SWEEP_AT {
                cache.clear();
            }
        }
        // A day at most: `exp` is the issuer's to choose, and must not overflow the clock.
        let until = Instant::now().checked_add(ttl.min(Duration::from_secs(86_400)));
        if let Some(until) = until
            && !ttl.is_zero()
        {
            cache.insert(key, Entry { active, until });
        }
        Ok(active)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}
