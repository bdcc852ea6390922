//! The authority that holds its keys in this process: a single-node agent's
//! own CA and JWT keys (generated and rolled over here, or an operator CA
//! from files), or the fleet authority's keys from its key directory.
//!
//! Four [`KeyRing`]s: the CA for X509-SVIDs, ES256 (or, with `jwt_key_type`,
//! RS256) keys for JWT-SVIDs, ES256
//! keys for WIT-SVIDs (published with `use` `wit-svid`, so neither SVID
//! passes as the other), and ES256 keys for task access tokens. Access-token keys are kept apart from
//! JWT-SVID keys, so an access token can never pass as a JWT-SVID or the
//! other way round, and are published only in the exchange's `/jwks`, never
//! in the SPIFFE bundle.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::bytes::Bytes;
use rcgen::KeyPair;

use super::jws::{JwtKeyType, PublicJwk};
use super::key_files::{self, Rings};
use super::keyring::{KeyRing, KeyTimes};
use super::keys::{CaKey, JwtKey};
use super::signer::{SignError, SignFuture, Signer};
use super::state_file;
use super::svid::{JwtSvid, SignedCert, SignedWit, X509Svid};
use super::trust_store::TrustStore;
use super::wit;
use crate::clock::{Clock, unix_seconds};
use crate::sync::Mutex;

#[derive(Debug, Clone)]
pub struct AuthoritySettings {
    pub trust_domain: spiffe::TrustDomain,
    pub ca_ttl: Duration,
    pub jwt_key_ttl: Duration,
    /// What JWT-SVID keys are made of (WIT-SVID and access-token keys are
    /// always P-256).
    pub jwt_key_type: JwtKeyType,
    /// Where to persist generated keys (`None` = memory only).
    pub state_dir: Option<PathBuf>,
    pub ca_files: Option<(PathBuf, PathBuf)>,
}

/// The key currently signing access tokens, and when it expires (nothing it
/// signs may outlive it).
#[derive(Clone)]
pub struct AccessSigningKey {
    key: Arc<JwtKey>,
    pub not_after: SystemTime,
}

impl AccessSigningKey {
    /// Signs `claims` as an RFC 9068 JWT access token (`typ: at+jwt`).
    pub fn sign<C: serde::Serialize + ?Sized>(&self, claims: &C) -> Result<String, SignError> {
        self.key.sign("at+jwt", claims)
    }

    /// [`sign`](Self::sign) for claims already serialised as a JSON object.
    pub fn sign_json(&self, claims: &str) -> Result<String, SignError> {
        self.key.sign_json("at+jwt", claims.as_bytes())
    }
}

pub struct LocalAuthority {
    settings: AuthoritySettings,
    clock: Arc<dyn Clock>,
    rings: Mutex<Rings>,
    store: Arc<TrustStore>,
    /// `iss` of JWT-SVIDs (the HTTPS face's URL), set once at start.
    jwt_issuer: std::sync::OnceLock<String>,
}

impl std::fmt::Debug for LocalAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalAuthority")
            .field("trust_domain", &self.settings.trust_domain.as_str())
            .finish_non_exhaustive()
    }
}

fn ca_bundle(cas: &KeyRing<CaKey>) -> Vec<u8> {
    cas.keys()
        .flat_map(|(_, ca)| ca.cert_der.to_vec())
        .collect()
}

fn public_keys(ring: &KeyRing<JwtKey>) -> Vec<PublicJwk> {
    ring.keys().map(|(_, k)| k.public_jwk()).collect()
}

/// When the persisted JWT-SVID keys are not of the configured type (the
/// operator changed `jwt_key_type`), a key of that type signs from now on;
/// the old ones stay published until they expire, so tokens they signed
/// still verify. Waiting for the next rollover instead could leave the old
/// type signing for most of `jwt_key_ttl`.
fn switch_jwt_key_type(
    ring: &mut KeyRing<JwtKey>,
    now: u64,
    settings: &AuthoritySettings,
) -> Result<(), SignError> {
    let Some((_, newest)) = ring.keys.last() else {
        return Ok(());
    };
    if newest.key_type() == Some(settings.jwt_key_type) {
        return Ok(());
    }
    tracing::info!(
        jwt_key_type = settings.jwt_key_type.name(),
        "the persisted JWT-SVID keys are of another type; a new key signs from now on and the old ones stay published until they expire"
    );
    let times = KeyTimes {
        created: now,
        activate_at: now,
        not_after: now + settings.jwt_key_ttl.as_secs(),
    };
    let key = JwtKey::generate_of(settings.jwt_key_type)?;
    ring.keys.push((times, Arc::new(key)));
    Ok(())
}

impl LocalAuthority {
    /// Loads persisted or operator keys, or creates new ones.
    pub fn load(
        settings: AuthoritySettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, SignError> {
        let now = unix_seconds(clock.now());
        let mut rings = Rings {
            cas: KeyRing::new(settings.ca_files.is_none()),
            jwt: KeyRing::new(true),
            access: KeyRing::new(true),
            wit: KeyRing::new(true),
        };
        if let Some((cert_path, key_path)) = &settings.ca_files {
            let ca = key_files::load_operator_ca(cert_path, key_path, &settings.trust_domain)?;
            tracing::info!(trust_domain = settings.trust_domain.as_str(), cert = %cert_path.display(), "using operator-provided CA");
            rings.cas.keys.push((ca.0, Arc::new(ca.1)));
        }
        if let Some(dir) = &settings.state_dir {
            state_file::load_into(dir, &mut rings, settings.ca_files.is_none())?;
        }
        let td = settings.trust_domain.clone();
        rings
            .cas
            .tick(now, settings.ca_ttl, |t| CaKey::generate(&td, t))?;
        switch_jwt_key_type(&mut rings.jwt, now, &settings)?;
        let kind = settings.jwt_key_type;
        rings
            .jwt
            .tick(now, settings.jwt_key_ttl, |_| JwtKey::generate_of(kind))?;
        rings
            .access
            .tick(now, settings.jwt_key_ttl, JwtKey::generate)?;
        rings
            .wit
            .tick(now, settings.jwt_key_ttl, JwtKey::generate)?;
        let authority = Self::with_rings(settings, clock, rings);
        authority.persist()?;
        Ok(authority)
    }

    /// The fleet authority's keys: every `ca*.crt` with its `ca*.key`, and the
    /// `jwt*.key` and `access*.key` ES256 keys, from `dir` (a mounted Secret
    /// shared by every replica). Nothing is generated or persisted, so
    /// replicas always agree: key ids are RFC 7638 thumbprints, and a key
    /// added later starts signing only `publish_lead` after it appeared (CAs:
    /// after their notBefore), once agents have had time to fetch it.
    pub fn from_key_dir(
        trust_domain: spiffe::TrustDomain,
        dir: &Path,
        publish_lead: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, SignError> {
        let rings = key_files::load_key_dir(&trust_domain, dir, publish_lead)?;
        let settings = AuthoritySettings {
            trust_domain,
            // Zero TTLs: nothing rolls over here (see `rotate`).
            ca_ttl: Duration::ZERO,
            jwt_key_ttl: Duration::ZERO,
            // The key directory's files decide (`tessera authority init
            // --jwt-key-type`).
            jwt_key_type: JwtKeyType::default(),
            state_dir: None,
            ca_files: None,
        };
        Ok(Self::with_rings(settings, clock, rings))
    }

    fn with_rings(settings: AuthoritySettings, clock: Arc<dyn Clock>, rings: Rings) -> Arc<Self> {
        let store = TrustStore::new(
            settings.trust_domain.clone(),
            clock.clone(),
            ca_bundle(&rings.cas),
            public_keys(&rings.jwt),
            public_keys(&rings.wit),
            public_keys(&rings.access),
        );
        Arc::new(Self {
            settings,
            clock,
            rings: Mutex::new(rings),
            store,
            jwt_issuer: std::sync::OnceLock::new(),
        })
    }

    /// JWT-SVIDs minted from now on carry `iss` = `issuer` (SPIRE's
    /// `jwt_issuer`), so relying parties can find their keys by OpenID
    /// discovery. Set once, before serving; later calls are ignored.
    pub fn set_jwt_issuer(&self, issuer: String) {
        let _ = self.jwt_issuer.set(issuer);
    }

    /// What this authority publishes (bundle and access-token keys).
    pub fn trust_store(&self) -> &Arc<TrustStore> {
        &self.store
    }

    pub fn trust_domain(&self) -> &spiffe::TrustDomain {
        &self.settings.trust_domain
    }

    /// Re-reads the key directory (a Secret update adds or removes keys);
    /// returns whether the published keys changed.
    pub fn reload_key_dir(&self, dir: &Path, publish_lead: Duration) -> Result<bool, SignError> {
        let fresh = key_files::load_key_dir(&self.settings.trust_domain, dir, publish_lead)?;
        let mut rings = self.rings.lock();
        let ca_ids = |r: &KeyRing<CaKey>| -> Vec<(KeyTimes, Vec<u8>)> {
            r.keys().map(|(t, k)| (*t, k.cert_der.to_vec())).collect()
        };
        let jwt_ids = |r: &KeyRing<JwtKey>| -> Vec<(KeyTimes, Vec<u8>)> {
            r.keys()
                .map(|(t, k)| (*t, k.kid().as_bytes().to_vec()))
                .collect()
        };
        let unchanged = ca_ids(&rings.cas) == ca_ids(&fresh.cas)
            && jwt_ids(&rings.jwt) == jwt_ids(&fresh.jwt)
            && jwt_ids(&rings.access) == jwt_ids(&fresh.access)
            && jwt_ids(&rings.wit) == jwt_ids(&fresh.wit);
        if unchanged {
            return Ok(false);
        }
        *rings = fresh;
        self.store.set_access_keys(public_keys(&rings.access));
        self.store.publish(
            ca_bundle(&rings.cas),
            public_keys(&rings.jwt),
            public_keys(&rings.wit),
        );
        Ok(true)
    }

    /// Issues an X509-SVID with a fresh P-256 key.
    pub fn issue_x509(&self, id: &spiffe::SpiffeId, ttl: Duration) -> Result<X509Svid, SignError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let signed = self.sign_svid(id, &key, ttl, &[])?;
        Ok(X509Svid {
            spiffe_id: id.clone(),
            chain_der: signed.cert_der,
            key_pkcs8: Bytes::from(key.serialize_der()),
            issued_at: signed.issued_at,
            not_after: signed.not_after,
        })
    }

    /// Signs an X509-SVID for `id` over `public_key` (a key generated
    /// elsewhere, e.g. from a node's CSR), valid for `ttl` but never past the
    /// signing CA. `dns_names` adds DNS SANs (only the authority's own
    /// serving certificate uses them).
    pub fn sign_svid(
        &self,
        id: &spiffe::SpiffeId,
        public_key: &impl rcgen::PublicKeyData,
        ttl: Duration,
        dns_names: &[String],
    ) -> Result<SignedCert, SignError> {
        let now = self.clock.now();
        let (times, ca) = self.active(now, |r| &r.cas)?;
        let ca_end = SystemTime::UNIX_EPOCH + Duration::from_secs(times.not_after);
        ca.sign_leaf(id, public_key, now, (now + ttl).min(ca_end), dns_names)
    }

    /// Signs a JWT-SVID for `id` and `audience` (must be non-empty).
    pub fn mint_jwt(
        &self,
        id: &spiffe::SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<JwtSvid, SignError> {
        let now = self.clock.now();
        let (times, key) = self.active(now, |r| &r.jwt)?;
        let iat = unix_seconds(now);
        let exp = (iat + ttl.as_secs().max(1)).min(times.not_after);
        // `jti` lets a relying party accept the token once (RFC 7523 §3);
        // the token service over HTTPS does.
        let mut claims = serde_json::json!({
            "sub": id.to_string(),
            "aud": audience,
            "exp": exp,
            "iat": iat,
            "jti": super::jws::random_kid(),
        });
        if let Some(iss) = self.jwt_issuer.get() {
            claims["iss"] = iss.as_str().into();
        }
        let token = key.sign("JWT", &claims)?;
        Ok(JwtSvid {
            token,
            issued_at: SystemTime::UNIX_EPOCH + Duration::from_secs(iat),
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(exp),
            single_use: super::svid::for_token_service(&claims),
        })
    }

    /// Signs a WIT-SVID for `id` binding `cnf_jwk` (a public ES256 JWK, as
    /// [`wit::cnf_point`] accepts), with this trust domain's WIT-SVID key;
    /// never past that key's end.
    pub fn mint_wit(
        &self,
        id: &spiffe::SpiffeId,
        cnf_jwk: &serde_json::Value,
        ttl: Duration,
    ) -> Result<SignedWit, SignError> {
        if wit::cnf_point(cnf_jwk).is_none() {
            return Err(SignError::Crypto);
        }
        let now = self.clock.now();
        let (times, key) = match self.active(now, |r| &r.wit) {
            Err(SignError::NoKey) if !self.serves_wit() => {
                return Err(SignError::Unsupported(super::signer::WIT_UNSUPPORTED));
            }
            other => other?,
        };
        let iat = unix_seconds(now);
        let exp = (iat + ttl.as_secs().max(1)).min(times.not_after);
        let token = key.sign(wit::TYP, &wit::claims(id, cnf_jwk, iat, exp))?;
        Ok(SignedWit {
            token,
            issued_at: SystemTime::UNIX_EPOCH + Duration::from_secs(iat),
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(exp),
        })
    }

    /// The key that signs access tokens now.
    pub fn access_signing_key(&self) -> Result<AccessSigningKey, SignError> {
        let (t, key) = self.active(self.clock.now(), |r| &r.access)?;
        Ok(AccessSigningKey {
            key,
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(t.not_after),
        })
    }

    /// The key of `ring` that signs at `now`, and its times.
    fn active<K>(
        &self,
        now: SystemTime,
        ring: impl FnOnce(&Rings) -> &KeyRing<K>,
    ) -> Result<(KeyTimes, Arc<K>), SignError> {
        let rings = self.rings.lock();
        let (t, k) = ring(&rings)
            .active(unix_seconds(now))
            .ok_or(SignError::NoKey)?;
        Ok((*t, k.clone()))
    }

    /// Runs key rollover; returns when it next needs to run.
    fn rotate_keys(&self) -> Result<Option<SystemTime>, SignError> {
        if self.settings.ca_ttl.is_zero() {
            // The fleet authority's file keys: nothing rolls over here.
            return Ok(None);
        }
        let now = unix_seconds(self.clock.now());
        let td = self.settings.trust_domain.clone();
        let mut rings = self.rings.lock();
        let a = rings
            .cas
            .tick(now, self.settings.ca_ttl, |t| CaKey::generate(&td, t))?;
        let kind = self.settings.jwt_key_type;
        let b = rings.jwt.tick(now, self.settings.jwt_key_ttl, |_| {
            JwtKey::generate_of(kind)
        })?;
        let c = rings
            .access
            .tick(now, self.settings.jwt_key_ttl, JwtKey::generate)?;
        let w = rings
            .wit
            .tick(now, self.settings.jwt_key_ttl, JwtKey::generate)?;
        if c.any() {
            self.store.set_access_keys(public_keys(&rings.access));
            if c.published {
                tracing::info!("prepared a new access-token key; published before it signs");
            }
        }
        if a.published {
            tracing::info!("prepared a new CA; published in the bundle before it signs");
        }
        if b.published {
            tracing::info!("prepared a new JWT signing key; published before it signs");
        }
        if w.published {
            tracing::info!("prepared a new WIT-SVID signing key; published before it signs");
        }
        if a.any() || b.any() || w.any() {
            // Publish before releasing the lock: a key that may sign at once
            // (e.g. after the clock went back) must be in the bundle before
            // any SVID it signs can be served with a bundle.
            self.store.publish(
                ca_bundle(&rings.cas),
                public_keys(&rings.jwt),
                public_keys(&rings.wit),
            );
        }
        let next = [
            rings.cas.next_event(),
            rings.jwt.next_event(),
            rings.access.next_event(),
            rings.wit.next_event(),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        drop(rings);
        if (a.any() || b.any() || c.any() || w.any())
            && let Err(e) = self.persist()
        {
            tracing::error!(error = %e, "could not persist authority state; keys stay in memory");
        }
        Ok(next)
    }

    fn persist(&self) -> Result<(), SignError> {
        let Some(dir) = &self.settings.state_dir else {
            return Ok(());
        };
        state_file::save(dir, &self.rings.lock(), self.settings.ca_files.is_none())
    }
}

impl Signer for LocalAuthority {
    fn issue_x509_batch<'a>(
        &'a self,
        batch: &'a [(spiffe::SpiffeId, Duration)],
    ) -> SignFuture<'a, Vec<Result<X509Svid, SignError>>> {
        Box::pin(std::future::ready(
            batch
                .iter()
                .map(|(id, ttl)| self.issue_x509(id, *ttl))
                .collect(),
        ))
    }

    fn jwt_svid<'a>(
        &'a self,
        id: &'a spiffe::SpiffeId,
        audience: &'a [String],
        ttl: Duration,
    ) -> SignFuture<'a, Result<JwtSvid, SignError>> {
        Box::pin(std::future::ready(self.mint_jwt(id, audience, ttl)))
    }

    fn sign_access_token<'a>(
        &'a self,
        claims: &'a str,
    ) -> SignFuture<'a, Result<String, SignError>> {
        Box::pin(std::future::ready(
            self.access_signing_key().and_then(|k| k.sign_json(claims)),
        ))
    }

    fn sign_wit<'a>(
        &'a self,
        id: &'a spiffe::SpiffeId,
        cnf_jwk: &'a serde_json::Value,
        ttl: Duration,
    ) -> SignFuture<'a, Result<SignedWit, SignError>> {
        Box::pin(std::future::ready(self.mint_wit(id, cnf_jwk, ttl)))
    }

    fn serves_wit(&self) -> bool {
        self.rings.lock().wit.keys().next().is_some()
    }

    fn access_token_not_after(&self) -> Result<SystemTime, SignError> {
        Ok(self.access_signing_key()?.not_after)
    }

    fn active_ca_expiry(&self) -> Option<SystemTime> {
        let now = unix_seconds(self.clock.now());
        self.rings
            .lock()
            .cas
            .active(now)
            .map(|(t, _)| SystemTime::UNIX_EPOCH + Duration::from_secs(t.not_after))
    }

    fn rotate(&self) -> Result<Option<SystemTime>, SignError> {
        self.rotate_keys()
    }
}

#[cfg(test)]
mod tests;
