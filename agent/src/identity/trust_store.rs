//! What this trust domain publishes to relying parties, whoever holds the
//! keys: the SPIFFE bundle (CA certificates and JWT-SVID keys, pushed to
//! every open stream through a `watch` channel) and the access-token JWKS.
//! The local authority writes it on key rollover, the fleet client when the
//! fleet authority's bundle changes; everything else only reads it.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::jws::{self, JwtError, PublicJwk};
use super::svid::TrustBundle;
use crate::clock::{Clock, unix_seconds};

pub struct TrustStore {
    trust_domain: spiffe::TrustDomain,
    clock: Arc<dyn Clock>,
    bundle: watch::Sender<Arc<TrustBundle>>,
    /// Public access-token keys (the exchange's `/jwks`), swapped on rollover.
    access_keys: ArcSwap<Vec<PublicJwk>>,
}

impl std::fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustStore")
            .field("trust_domain", &self.trust_domain.as_str())
            .field("sequence", &self.bundle.borrow().sequence)
            .finish_non_exhaustive()
    }
}

impl TrustStore {
    pub fn new(
        trust_domain: spiffe::TrustDomain,
        clock: Arc<dyn Clock>,
        x509: Vec<u8>,
        jwt_keys: Vec<PublicJwk>,
        access_keys: Vec<PublicJwk>,
    ) -> Arc<Self> {
        Arc::new(Self {
            trust_domain,
            clock,
            bundle: watch::Sender::new(Arc::new(TrustBundle::new(x509, jwt_keys, 1))),
            access_keys: ArcSwap::from_pointee(access_keys),
        })
    }

    pub fn trust_domain(&self) -> &spiffe::TrustDomain {
        &self.trust_domain
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.bundle.subscribe()
    }

    pub fn current(&self) -> Arc<TrustBundle> {
        self.bundle.borrow().clone()
    }

    /// Installs a bundle of `x509` (concatenated DER CAs) and `jwt_keys`;
    /// open streams get it. Returns false (and sends nothing) when it is the
    /// bundle already published.
    pub fn publish(&self, x509: Vec<u8>, jwt_keys: Vec<PublicJwk>) -> bool {
        let current = self.current();
        if current.x509.as_ref() == x509.as_slice() && *current.jwt_keys == *jwt_keys {
            return false;
        }
        self.bundle.send_replace(Arc::new(TrustBundle::new(
            x509,
            jwt_keys,
            current.sequence + 1,
        )));
        true
    }

    /// Every published access-token key (current, next and retiring).
    pub fn access_keys(&self) -> Arc<Vec<PublicJwk>> {
        self.access_keys.load_full()
    }

    /// Replaces the access-token keys; false when unchanged.
    pub fn set_access_keys(&self, keys: Vec<PublicJwk>) -> bool {
        if **self.access_keys.load() == keys {
            return false;
        }
        self.access_keys.store(Arc::new(keys));
        true
    }

    /// Verifies a JWT-SVID per the spec: signature by a key in our bundle,
    /// `sub` a SPIFFE ID of our trust domain, `aud` containing `audience`, not
    /// expired. Returns the SPIFFE ID and all claims.
    pub fn validate_jwt(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(spiffe::SpiffeId, serde_json::Map<String, serde_json::Value>), JwtError> {
        let bundle = self.current();
        let verified = jws::verify(token, bundle.jwt_keys.iter())?;
        let claims = verified.claims;
        let sub = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .ok_or(JwtError::Claims("sub missing"))?;
        let id =
            spiffe::SpiffeId::new(sub).map_err(|_| JwtError::Claims("sub is not a SPIFFE ID"))?;
        if !id.is_member_of(&self.trust_domain) {
            return Err(JwtError::Claims("sub is not in this trust domain"));
        }
        let exp = claims
            .get("exp")
            .and_then(|v| v.as_f64())
            .ok_or(JwtError::Claims("exp missing"))?;
        if exp <= unix_seconds(self.clock.now()) as f64 {
            return Err(JwtError::Expired);
        }
        let aud_ok = match claims.get("aud") {
            Some(serde_json::Value::String(a)) => a == audience,
            Some(serde_json::Value::Array(list)) if !list.is_empty() => {
                list.iter().any(|a| a.as_str() == Some(audience))
            }
            _ => return Err(JwtError::Claims("aud missing or empty")),
        };
        if !aud_ok {
            return Err(JwtError::Audience(audience.to_string()));
        }
        Ok((id, claims))
    }
}
