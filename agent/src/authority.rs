//! The local signing authority: an ECDSA P-256 CA for X509-SVIDs and separate
//! ES256 keys for JWT-SVIDs, each kept in a [`KeyRing`] that rolls keys over
//! safely:
//!
//! * at half a key's lifetime a successor is created and **published** in the
//!   bundle (streams get the new bundle) but does not sign yet;
//! * at two thirds of the predecessor's lifetime the successor starts signing;
//! * a key leaves the bundle only when it expires, and everything it signed is
//!   clamped to expire no later than the key, so nothing valid is ever left
//!   without its key in the bundle.
//!
//! A third ring holds the ES256 keys that sign task access tokens (token
//! exchange). They are kept apart from JWT-SVID keys, so an access token can
//! never pass as a JWT-SVID or the other way round, and are published only in
//! the exchange's `/jwks`, never in the SPIFFE bundle.
//!
//! Generated keys are persisted under `data_dir/authority.json` (0600, atomic
//! write + fsync) unless persistence is turned off; an operator CA is loaded
//! from PEM files instead and never rotated by Tessera.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use prost::bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::clock::{Clock, unix_seconds};
use crate::jws::{self, Es256Signer, PublicJwk};

/// How far certificates are backdated, to tolerate small clock skew.
const BACKDATE: Duration = Duration::from_secs(30);
const STATE_FILE: &str = "authority.json";

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("key generation failed")]
    Crypto,
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("no signing key is available")]
    NoKey,
    #[error("the fleet authority: {0}")]
    Upstream(String),
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> AuthorityError {
    AuthorityError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Lifetime bookkeeping shared by CA and JWT keys.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyTimes {
    /// When the key was created (unix seconds).
    pub created: u64,
    /// When it may start signing.
    pub activate_at: u64,
    /// When it expires; nothing it signs outlives this.
    pub not_after: u64,
}

impl KeyTimes {
    fn lifetime(&self) -> u64 {
        self.not_after.saturating_sub(self.created)
    }
    fn prepare_successor_at(&self) -> u64 {
        self.created + self.lifetime() / 2
    }
    fn successor_activates_at(&self) -> u64 {
        self.created + self.lifetime() * 2 / 3
    }
}

/// Keys ordered oldest to newest, with the rollover rules described above.
#[derive(Debug)]
pub struct KeyRing<K> {
    keys: Vec<(KeyTimes, Arc<K>)>,
    rotates: bool,
}

/// What a [`KeyRing::tick`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
struct RingChange {
    published: bool,
    pruned: bool,
}

impl<K> KeyRing<K> {
    fn active(&self, now: u64) -> Option<&(KeyTimes, Arc<K>)> {
        self.keys
            .iter()
            .rev()
            .find(|(t, _)| t.activate_at <= now && now < t.not_after)
            .or_else(|| self.keys.iter().find(|(t, _)| now < t.not_after))
    }

    /// Prunes expired keys and, if the newest key is half-way through its
    /// life, creates its successor with `make(times)`.
    fn tick(
        &mut self,
        now: u64,
        ttl: Duration,
        mut make: impl FnMut(KeyTimes) -> Result<K, AuthorityError>,
    ) -> Result<RingChange, AuthorityError> {
        let mut change = RingChange::default();
        let before = self.keys.len();
        self.keys.retain(|(t, _)| t.not_after > now);
        change.pruned = self.keys.len() != before;
        // The wall clock went back before every key's (backdated) start: a
        // key that is not valid yet must not sign, so a new one starts now.
        let clock_went_back = self.rotates
            && !self.keys.is_empty()
            && self
                .keys
                .iter()
                .all(|(t, _)| t.created > now + BACKDATE.as_secs());
        let needs_key = match self.keys.last() {
            None => true,
            Some(_) if clock_went_back => true,
            Some((t, _)) => self.rotates && now >= t.prepare_successor_at(),
        };
        if needs_key && (self.rotates || self.keys.is_empty()) {
            let activate_at = match self.keys.last() {
                Some(_) if clock_went_back => now,
                Some((t, _)) => t.successor_activates_at().max(now),
                None => now,
            };
            let times = KeyTimes {
                created: now,
                activate_at,
                not_after: now + ttl.as_secs(),
            };
            self.keys.push((times, Arc::new(make(times)?)));
            change.published = true;
        }
        Ok(change)
    }

    /// The next time `tick` has something to do.
    fn next_event(&self) -> Option<u64> {
        let mut next = self.keys.iter().map(|(t, _)| t.not_after).min();
        if self.rotates
            && let Some((t, _)) = self.keys.last()
        {
            next = Some(next.map_or(t.prepare_successor_at(), |n| {
                n.min(t.prepare_successor_at())
            }));
        }
        next
    }
}

/// One CA certificate and its signing key.
pub struct CaKey {
    pub cert_der: Bytes,
    /// The certificate's notBefore; no SVID it signs starts earlier.
    not_before: SystemTime,
    issuer: Issuer<'static, KeyPair>,
    key_pkcs8: Vec<u8>,
}

impl std::fmt::Debug for CaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaKey").finish_non_exhaustive()
    }
}

/// One JWT signing key.
#[derive(Debug)]
pub struct JwtKey {
    signer: Es256Signer,
    key_pkcs8: Vec<u8>,
}

/// What relying parties need: CA certificates and the JWKS. Shared by every
/// stream via `Arc`, rebuilt only when a key is added or removed.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustBundle {
    /// Concatenated DER CA certificates.
    pub x509: Bytes,
    /// JWKS document with `use: jwt-svid` keys, each with a `kid`.
    pub jwks: Bytes,
    pub jwt_keys: Arc<[PublicJwk]>,
    pub sequence: u64,
}

impl PartialEq for PublicJwk {
    fn eq(&self, other: &Self) -> bool {
        self.kid == other.kid && self.point == other.point
    }
}

/// An issued X509-SVID. The private key lives only in memory.
#[derive(Clone)]
pub struct X509Svid {
    pub spiffe_id: spiffe::SpiffeId,
    /// DER leaf (no intermediates: the local CA signs directly).
    pub chain_der: Bytes,
    /// PKCS#8 DER private key.
    pub key_pkcs8: Bytes,
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A certificate signed over a public key the authority never saw the
/// private half of.
#[derive(Debug, Clone)]
pub struct SignedCert {
    pub cert_der: Bytes,
    pub issued_at: SystemTime,
    pub not_after: SystemTime,
}

/// A signed JWT-SVID.
#[derive(Clone)]
pub struct JwtSvid {
    pub token: String,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
}

#[derive(Debug, Clone)]
pub struct AuthoritySettings {
    pub trust_domain: spiffe::TrustDomain,
    pub ca_ttl: Duration,
    pub jwt_key_ttl: Duration,
    /// Where to persist generated keys (`None` = memory only).
    pub state_dir: Option<PathBuf>,
    pub ca_files: Option<(PathBuf, PathBuf)>,
}

struct State {
    cas: KeyRing<CaKey>,
    jwt: KeyRing<JwtKey>,
    access: KeyRing<JwtKey>,
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
    pub fn sign(&self, claims: &serde_json::Value) -> Result<String, AuthorityError> {
        self.key
            .signer
            .sign("at+jwt", claims)
            .map_err(|_| AuthorityError::Crypto)
    }
}

pub struct Authority {
    settings: AuthoritySettings,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    bundle: watch::Sender<Arc<TrustBundle>>,
    /// Public access-token keys (the exchange's `/jwks`), swapped on rollover.
    access_keys: arc_swap::ArcSwap<Vec<PublicJwk>>,
    /// Upstream mode: the fleet authority signs; this node holds no CA or
    /// JWT key, only the bundle it publishes.
    upstream: Option<Arc<crate::fleet::client::Upstream>>,
    /// Upstream mode: the latest expiry among the published CAs.
    remote_ca_expiry: Mutex<Option<SystemTime>>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.settings.trust_domain.as_str())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct PersistedState {
    version: u32,
    cas: Vec<PersistedKey>,
    jwt_keys: Vec<PersistedKey>,
    /// Access-token keys (absent in state written before token exchange existed).
    #[serde(default)]
    access_keys: Vec<PersistedKey>,
}

#[derive(Serialize, Deserialize)]
struct PersistedKey {
    times: KeyTimes,
    /// CA certificate DER (base64); empty for JWT keys.
    #[serde(default)]
    cert: String,
    /// JWT key id; empty for CA keys.
    #[serde(default)]
    kid: String,
    /// PKCS#8 DER private key (base64).
    key: String,
}

impl Authority {
    /// Loads persisted or operator keys, or creates new ones.
    pub fn load(
        settings: AuthoritySettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, AuthorityError> {
        let now = unix_seconds(clock.now());
        let mut cas = KeyRing {
            keys: Vec::new(),
            rotates: settings.ca_files.is_none(),
        };
        let mut jwt = KeyRing {
            keys: Vec::new(),
            rotates: true,
        };
        let mut access = KeyRing {
            keys: Vec::new(),
            rotates: true,
        };

        if let Some((cert_path, key_path)) = &settings.ca_files {
            let ca = load_operator_ca(cert_path, key_path, &settings.trust_domain)?;
            tracing::info!(trust_domain = settings.trust_domain.as_str(), cert = %cert_path.display(), "using operator-provided CA");
            cas.keys.push((ca.0, Arc::new(ca.1)));
        }
        if let Some(dir) = &settings.state_dir {
            let path = dir.join(STATE_FILE);
            match std::fs::read(&path) {
                Ok(bytes) => {
                    let persisted: PersistedState = serde_json::from_slice(&bytes)
                        .map_err(|e| file_err(&path, format!("corrupt authority state: {e}")))?;
                    if settings.ca_files.is_none() {
                        for k in persisted.cas {
                            let cert = B64.decode(&k.cert).map_err(|e| file_err(&path, e))?;
                            let key = B64.decode(&k.key).map_err(|e| file_err(&path, e))?;
                            cas.keys.push((
                                k.times,
                                Arc::new(ca_from_parts(cert, key).map_err(|e| file_err(&path, e))?),
                            ));
                        }
                    }
                    for (ring, keys) in [
                        (&mut jwt, persisted.jwt_keys),
                        (&mut access, persisted.access_keys),
                    ] {
                        for k in keys {
                            let key = B64.decode(&k.key).map_err(|e| file_err(&path, e))?;
                            let signer = Es256Signer::from_pkcs8(k.kid, &key)
                                .map_err(|e| file_err(&path, e))?;
                            ring.keys.push((
                                k.times,
                                Arc::new(JwtKey {
                                    signer,
                                    key_pkcs8: key,
                                }),
                            ));
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(file_err(&path, e)),
            }
        }
        let td = settings.trust_domain.clone();
        cas.tick(now, settings.ca_ttl, |t| new_ca(&td, t))?;
        jwt.tick(now, settings.jwt_key_ttl, new_jwt_key)?;
        access.tick(now, settings.jwt_key_ttl, new_jwt_key)?;
        let bundle = build_bundle(&cas, &jwt, 1);
        let access_keys = arc_swap::ArcSwap::from_pointee(public_keys(&access));
        let authority = Arc::new(Self {
            settings,
            clock,
            state: Mutex::new(State { cas, jwt, access }),
            bundle: watch::Sender::new(Arc::new(bundle)),
            access_keys,
            upstream: None,
            remote_ca_expiry: Mutex::new(None),
        });
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
    ) -> Result<Arc<Self>, AuthorityError> {
        let state = load_key_dir(&trust_domain, dir, publish_lead)?;
        Ok(Self::without_rollover(trust_domain, clock, state, None))
    }

    /// An authority whose keys never roll over here (the fleet authority's
    /// files, or none at all in upstream mode).
    fn without_rollover(
        trust_domain: spiffe::TrustDomain,
        clock: Arc<dyn Clock>,
        state: State,
        upstream: Option<Arc<crate::fleet::client::Upstream>>,
    ) -> Arc<Self> {
        let bundle = build_bundle(&state.cas, &state.jwt, 1);
        let access_keys = arc_swap::ArcSwap::from_pointee(public_keys(&state.access));
        Arc::new(Self {
            settings: AuthoritySettings {
                trust_domain,
                ca_ttl: Duration::ZERO,
                jwt_key_ttl: Duration::ZERO,
                state_dir: None,
                ca_files: None,
            },
            clock,
            state: Mutex::new(state),
            bundle: watch::Sender::new(Arc::new(bundle)),
            access_keys,
            upstream,
            remote_ca_expiry: Mutex::new(None),
        })
    }

    /// Re-reads the key directory (a Secret update adds or removes keys);
    /// returns whether the published keys changed.
    pub fn reload_key_dir(
        &self,
        dir: &Path,
        publish_lead: Duration,
    ) -> Result<bool, AuthorityError> {
        let fresh = load_key_dir(&self.settings.trust_domain, dir, publish_lead)?;
        let mut state = self.lock();
        let same = |a: &[(KeyTimes, Vec<u8>)], b: &[(KeyTimes, Vec<u8>)]| a == b;
        let ca_ids = |r: &KeyRing<CaKey>| -> Vec<(KeyTimes, Vec<u8>)> {
            r.keys
                .iter()
                .map(|(t, k)| (*t, k.cert_der.to_vec()))
                .collect()
        };
        let jwt_ids = |r: &KeyRing<JwtKey>| -> Vec<(KeyTimes, Vec<u8>)> {
            r.keys
                .iter()
                .map(|(t, k)| (*t, k.signer.kid().as_bytes().to_vec()))
                .collect()
        };
        let bundle_same = same(&ca_ids(&state.cas), &ca_ids(&fresh.cas))
            && same(&jwt_ids(&state.jwt), &jwt_ids(&fresh.jwt));
        let access_same = same(&jwt_ids(&state.access), &jwt_ids(&fresh.access));
        if bundle_same && access_same {
            return Ok(false);
        }
        *state = fresh;
        if !access_same {
            self.access_keys.store(Arc::new(public_keys(&state.access)));
        }
        if !bundle_same {
            let seq = self.bundle.borrow().sequence + 1;
            self.bundle
                .send_replace(Arc::new(build_bundle(&state.cas, &state.jwt, seq)));
        }
        Ok(true)
    }

    /// An agent in upstream mode: no keys of its own; the bundle and access
    /// keys come from the fleet authority through [`Self::set_remote_bundle`].
    pub fn for_upstream(
        trust_domain: spiffe::TrustDomain,
        clock: Arc<dyn Clock>,
        upstream: Arc<crate::fleet::client::Upstream>,
    ) -> Arc<Self> {
        let state = State {
            cas: KeyRing {
                keys: Vec::new(),
                rotates: false,
            },
            jwt: KeyRing {
                keys: Vec::new(),
                rotates: false,
            },
            access: KeyRing {
                keys: Vec::new(),
                rotates: false,
            },
        };
        Self::without_rollover(trust_domain, clock, state, Some(upstream))
    }

    /// Upstream mode: installs the trust domain's bundle as published by the
    /// fleet authority; open streams get it if it changed.
    pub fn set_remote_bundle(
        &self,
        cas: Vec<Vec<u8>>,
        jwt_keys: Vec<PublicJwk>,
        access_keys: Vec<PublicJwk>,
    ) -> bool {
        if **self.access_keys.load() != access_keys {
            self.access_keys.store(Arc::new(access_keys));
        }
        let current = self.bundle();
        let x509: Vec<u8> = cas.concat();
        let same = current.x509.as_ref() == x509.as_slice() && *current.jwt_keys == *jwt_keys;
        if same {
            // Polled every few seconds: nothing to parse when nothing changed.
            return false;
        }
        let expiry = cas
            .iter()
            .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
            .map(|(_, c)| c.validity().not_after.timestamp().max(0) as u64)
            .max()
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        *self
            .remote_ca_expiry
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = expiry;
        let jwks = serde_json::json!({
            "keys": jwt_keys.iter().map(|k| k.to_json("jwt-svid")).collect::<Vec<_>>(),
        });
        self.bundle.send_replace(Arc::new(TrustBundle {
            x509: Bytes::from(x509),
            jwks: Bytes::from(jwks.to_string()),
            jwt_keys: jwt_keys.into(),
            sequence: current.sequence + 1,
        }));
        true
    }

    /// The fleet authority this agent defers to, in upstream mode.
    pub fn upstream(&self) -> Option<&Arc<crate::fleet::client::Upstream>> {
        self.upstream.as_ref()
    }

    /// Issues X509-SVIDs for a batch of identities: here, or in one request
    /// to the fleet authority (the keys are generated here either way).
    pub async fn issue_x509_batch(
        &self,
        batch: &[(spiffe::SpiffeId, Duration)],
    ) -> Vec<Result<X509Svid, AuthorityError>> {
        match &self.upstream {
            Some(up) => up.sign_x509(batch).await,
            None => batch
                .iter()
                .map(|(id, ttl)| self.issue_x509(id, *ttl))
                .collect(),
        }
    }

    /// A JWT-SVID, signed here or by the fleet authority.
    pub async fn jwt_svid(
        &self,
        id: &spiffe::SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<JwtSvid, AuthorityError> {
        match &self.upstream {
            Some(up) => up.mint_jwt(id, audience, ttl).await,
            None => self.mint_jwt(id, audience, ttl),
        }
    }

    /// Signs task access-token claims (`typ: at+jwt`), here or by the fleet
    /// authority; `exp` must already respect [`Self::access_token_not_after`].
    pub async fn sign_access_token(
        &self,
        claims: &serde_json::Value,
    ) -> Result<String, AuthorityError> {
        match &self.upstream {
            Some(up) => up.sign_access(claims).await,
            None => self.access_signing_key()?.sign(claims),
        }
    }

    /// No access token may expire after this (the signing key's end).
    pub fn access_token_not_after(&self) -> Result<SystemTime, AuthorityError> {
        match &self.upstream {
            // The fleet's keys come from files with no end of their own.
            Some(_) => Ok(self.clock.now() + Duration::from_secs(365 * 24 * 3600)),
            None => Ok(self.access_signing_key()?.not_after),
        }
    }

    pub fn trust_domain(&self) -> &spiffe::TrustDomain {
        &self.settings.trust_domain
    }

    pub fn subscribe_bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.bundle.subscribe()
    }

    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.borrow().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the key rings half
        // updated (every mutation is a single push/retain), so recover.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs key rollover; returns when it next needs to run.
    pub fn rotate(&self) -> Result<Option<SystemTime>, AuthorityError> {
        if self.upstream.is_some() || self.settings.ca_ttl.is_zero() {
            // Upstream mode, or the fleet authority's file keys: nothing
            // rolls over here.
            return Ok(None);
        }
        let now = unix_seconds(self.clock.now());
        let td = self.settings.trust_domain.clone();
        let mut state = self.lock();
        let a = state
            .cas
            .tick(now, self.settings.ca_ttl, |t| new_ca(&td, t))?;
        let b = state
            .jwt
            .tick(now, self.settings.jwt_key_ttl, new_jwt_key)?;
        let c = state
            .access
            .tick(now, self.settings.jwt_key_ttl, new_jwt_key)?;
        if c != RingChange::default() {
            self.access_keys.store(Arc::new(public_keys(&state.access)));
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
        let bundle_changed = a != RingChange::default() || b != RingChange::default();
        if bundle_changed {
            let seq = self.bundle.borrow().sequence + 1;
            let bundle = build_bundle(&state.cas, &state.jwt, seq);
            // Publish before releasing the lock: a key that may sign at once
            // (e.g. after the clock went back) must be in the bundle before
            // any SVID it signs can be served with a bundle.
            self.bundle.send_replace(Arc::new(bundle));
            drop(state);
            if let Err(e) = self.persist() {
                tracing::error!(error = %e, "could not persist authority state; keys stay in memory");
            }
            return self.next_event();
        }
        drop(state);
        if c != RingChange::default()
            && let Err(e) = self.persist()
        {
            tracing::error!(error = %e, "could not persist authority state; keys stay in memory");
        }
        self.next_event()
    }

    fn next_event(&self) -> Result<Option<SystemTime>, AuthorityError> {
        let state = self.lock();
        let next = [
            state.cas.next_event(),
            state.jwt.next_event(),
            state.access.next_event(),
        ]
        .into_iter()
        .flatten()
        .min();
        Ok(next.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)))
    }

    /// Expiry of the CA currently signing.
    pub fn active_ca_expiry(&self) -> Option<SystemTime> {
        if self.upstream.is_some() {
            return *self
                .remote_ca_expiry
                .lock()
                .unwrap_or_else(|e| e.into_inner());
        }
        let now = unix_seconds(self.clock.now());
        self.lock()
            .cas
            .active(now)
            .map(|(t, _)| SystemTime::UNIX_EPOCH + Duration::from_secs(t.not_after))
    }

    /// Issues an X509-SVID with a fresh P-256 key.
    pub fn issue_x509(
        &self,
        id: &spiffe::SpiffeId,
        ttl: Duration,
    ) -> Result<X509Svid, AuthorityError> {
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
    ) -> Result<SignedCert, AuthorityError> {
        let now = self.clock.now();
        let (times, ca) = {
            let state = self.lock();
            let (t, ca) = state
                .cas
                .active(unix_seconds(now))
                .ok_or(AuthorityError::NoKey)?;
            (*t, ca.clone())
        };
        let ca_end = SystemTime::UNIX_EPOCH + Duration::from_secs(times.not_after);
        let not_after = (now + ttl).min(ca_end);
        let mut params = CertificateParams::default();
        // Never before the CA's own notBefore (the clock may have gone back).
        params.not_before = (now - BACKDATE).max(ca.not_before).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.clone().try_into()?));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tessera");
        dn.push(DnType::OrganizationalUnitName, id.trust_domain_name());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &ca.issuer)?;
        Ok(SignedCert {
            cert_der: Bytes::copy_from_slice(cert.der()),
            issued_at: now,
            not_after,
        })
    }

    /// Signs a JWT-SVID for `id` and `audience` (must be non-empty).
    pub fn mint_jwt(
        &self,
        id: &spiffe::SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<JwtSvid, AuthorityError> {
        let now = self.clock.now();
        let (times, key) = {
            let state = self.lock();
            let (t, k) = state
                .jwt
                .active(unix_seconds(now))
                .ok_or(AuthorityError::NoKey)?;
            (*t, k.clone())
        };
        let iat = unix_seconds(now);
        let exp = (iat + ttl.as_secs().max(1)).min(times.not_after);
        let claims = serde_json::json!({
            "sub": id.to_string(),
            "aud": audience,
            "exp": exp,
            "iat": iat,
        });
        let token = key
            .signer
            .sign("JWT", &claims)
            .map_err(|_| AuthorityError::Crypto)?;
        Ok(JwtSvid {
            token,
            issued_at: SystemTime::UNIX_EPOCH + Duration::from_secs(iat),
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(exp),
        })
    }

    /// The key that signs access tokens now.
    pub fn access_signing_key(&self) -> Result<AccessSigningKey, AuthorityError> {
        let now = unix_seconds(self.clock.now());
        let state = self.lock();
        let (t, k) = state.access.active(now).ok_or(AuthorityError::NoKey)?;
        Ok(AccessSigningKey {
            key: k.clone(),
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(t.not_after),
        })
    }

    /// Every published access-token key (current, next and retiring).
    pub fn access_keys(&self) -> Arc<Vec<PublicJwk>> {
        self.access_keys.load_full()
    }

    /// Verifies a JWT-SVID per the spec: signature by a key in our bundle,
    /// `sub` a SPIFFE ID of our trust domain, `aud` containing `audience`, not
    /// expired. Returns the SPIFFE ID and all claims.
    pub fn validate_jwt(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(spiffe::SpiffeId, serde_json::Map<String, serde_json::Value>), jws::JwtError> {
        use jws::JwtError;
        let bundle = self.bundle();
        let verified = jws::verify(token, bundle.jwt_keys.iter())?;
        let claims = verified.claims;
        let sub = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .ok_or(JwtError::Claims("sub missing"))?;
        let id =
            spiffe::SpiffeId::new(sub).map_err(|_| JwtError::Claims("sub is not a SPIFFE ID"))?;
        if !id.is_member_of(&self.settings.trust_domain) {
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

    fn persist(&self) -> Result<(), AuthorityError> {
        let Some(dir) = &self.settings.state_dir else {
            return Ok(());
        };
        let state = self.lock();
        let persisted = PersistedState {
            version: 1,
            cas: if self.settings.ca_files.is_some() {
                Vec::new() // operator keys stay where the operator put them
            } else {
                state
                    .cas
                    .keys
                    .iter()
                    .map(|(t, k)| PersistedKey {
                        times: *t,
                        cert: B64.encode(&k.cert_der),
                        kid: String::new(),
                        key: B64.encode(&k.key_pkcs8),
                    })
                    .collect()
            },
            jwt_keys: persisted_jwt_keys(&state.jwt),
            access_keys: persisted_jwt_keys(&state.access),
        };
        drop(state);
        let json = serde_json::to_vec_pretty(&persisted).map_err(|e| file_err(dir, e))?;
        crate::fsutil::write_private_atomic(&dir.join(STATE_FILE), &json)
            .map_err(|e| file_err(&dir.join(STATE_FILE), e))
    }
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("system RNG");
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and 16 bytes long
    SerialNumber::from_slice(&b)
}

fn new_ca(td: &spiffe::TrustDomain, times: KeyTimes) -> Result<CaKey, AuthorityError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.not_before =
        (SystemTime::UNIX_EPOCH + Duration::from_secs(times.created) - BACKDATE).into();
    params.not_after = (SystemTime::UNIX_EPOCH + Duration::from_secs(times.not_after)).into();
    params.serial_number = Some(random_serial());
    params.subject_alt_names = vec![SanType::URI(td.id_string().try_into()?)];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tessera");
    dn.push(DnType::CommonName, format!("Tessera CA {}", td.as_str()));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = false;
    let cert = params.self_signed(&key)?;
    ca_from_parts(cert.der().to_vec(), key.serialize_der()).map_err(|_| AuthorityError::Crypto)
}

fn ca_from_parts(cert_der: Vec<u8>, key_pkcs8: Vec<u8>) -> Result<CaKey, String> {
    let not_before = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|e| format!("CA certificate: {e}"))?
        .1
        .validity()
        .not_before
        .timestamp();
    let not_before = SystemTime::UNIX_EPOCH + Duration::from_secs(not_before.max(0) as u64);
    let key = KeyPair::try_from(key_pkcs8.as_slice()).map_err(|e| format!("CA key: {e}"))?;
    let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key)
        .map_err(|e| format!("CA certificate: {e}"))?;
    Ok(CaKey {
        cert_der: Bytes::from(cert_der),
        not_before,
        issuer,
        key_pkcs8,
    })
}

fn new_jwt_key(_: KeyTimes) -> Result<JwtKey, AuthorityError> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &rng,
    )
    .map_err(|_| AuthorityError::Crypto)?;
    let signer = Es256Signer::from_pkcs8(jws::random_kid(), pkcs8.as_ref())
        .map_err(|_| AuthorityError::Crypto)?;
    Ok(JwtKey {
        signer,
        key_pkcs8: pkcs8.as_ref().to_vec(),
    })
}

fn persisted_jwt_keys(ring: &KeyRing<JwtKey>) -> Vec<PersistedKey> {
    ring.keys
        .iter()
        .map(|(t, k)| PersistedKey {
            times: *t,
            cert: String::new(),
            kid: k.signer.kid().to_string(),
            key: B64.encode(&k.key_pkcs8),
        })
        .collect()
}

fn public_keys(ring: &KeyRing<JwtKey>) -> Vec<PublicJwk> {
    ring.keys
        .iter()
        .map(|(_, k)| k.signer.public_jwk())
        .collect()
}

fn build_bundle(cas: &KeyRing<CaKey>, jwt: &KeyRing<JwtKey>, sequence: u64) -> TrustBundle {
    let mut x509 = Vec::new();
    for (_, ca) in &cas.keys {
        x509.extend_from_slice(&ca.cert_der);
    }
    let jwt_keys: Vec<PublicJwk> = jwt
        .keys
        .iter()
        .map(|(_, k)| k.signer.public_jwk())
        .collect();
    let jwks = serde_json::json!({
        "keys": jwt_keys.iter().map(|k| k.to_json("jwt-svid")).collect::<Vec<_>>(),
    });
    TrustBundle {
        x509: Bytes::from(x509),
        jwks: Bytes::from(jwks.to_string()),
        jwt_keys: jwt_keys.into(),
        sequence,
    }
}

/// Loads an operator CA: a PEM certificate and a PEM P-256 key in PKCS#8
/// (`BEGIN PRIVATE KEY`) or SEC1 (`BEGIN EC PRIVATE KEY`) form.
fn load_operator_ca(
    cert_path: &Path,
    key_path: &Path,
    td: &spiffe::TrustDomain,
) -> Result<(KeyTimes, CaKey), AuthorityError> {
    let cert_pem = std::fs::read_to_string(cert_path).map_err(|e| file_err(cert_path, e))?;
    let key_pem = std::fs::read_to_string(key_path).map_err(|e| file_err(key_path, e))?;
    let cert_der = pem_block(&cert_pem, "CERTIFICATE")
        .ok_or_else(|| file_err(cert_path, "no `BEGIN CERTIFICATE` block"))?;
    let key_pkcs8 = if let Some(der) = pem_block(&key_pem, "PRIVATE KEY") {
        der
    } else if let Some(sec1) = pem_block(&key_pem, "EC PRIVATE KEY") {
        sec1_to_pkcs8(&sec1)
    } else {
        return Err(file_err(
            key_path,
            "expected a `BEGIN PRIVATE KEY` (PKCS#8) or `BEGIN EC PRIVATE KEY` (SEC1) P-256 key",
        ));
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|e| file_err(cert_path, format!("not an X.509 certificate: {e}")))?;
    match parsed.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => {
            return Err(file_err(
                cert_path,
                "certificate is not a CA (basicConstraints cA=true required)",
            ));
        }
    }
    let times = KeyTimes {
        created: parsed.validity().not_before.timestamp().max(0) as u64,
        activate_at: 0,
        not_after: parsed.validity().not_after.timestamp().max(0) as u64,
    };
    let key = KeyPair::try_from(key_pkcs8.as_slice()).map_err(|e| {
        file_err(
            key_path,
            format!("unsupported key (Tessera signs with ECDSA P-256): {e}"),
        )
    })?;
    if key.public_key_raw() != parsed.public_key().subject_public_key.data.as_ref() {
        return Err(file_err(
            key_path,
            "the key does not match the CA certificate",
        ));
    }
    tracing::debug!(trust_domain = td.as_str(), cert = %cert_path.display(), "loaded a CA from files");
    let ca = ca_from_parts(cert_der, key_pkcs8).map_err(|e| file_err(cert_path, e))?;
    Ok((times, ca))
}

/// Reads a fleet key directory (see [`Authority::from_key_dir`]).
///
/// Keys are ordered by when they appeared: the later of a CA's notBefore and
/// its file's modification time (which a Secret update sets). The first key
/// of each kind signs at once; every later one is published at once but
/// signs only `publish_lead` after it appeared, so applying a Secret long
/// after `rotate-ca` does not shorten the lead. Ties (files written in the
/// same second) put the base file (`ca.crt`, `jwt.key`, `access.key`) first.
fn load_key_dir(
    td: &spiffe::TrustDomain,
    dir: &Path,
    publish_lead: Duration,
) -> Result<State, AuthorityError> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| file_err(dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        // Kubernetes Secret mounts hold `..data` symlinks; only plain names count.
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    let lead = publish_lead.as_secs();
    let appeared = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .map(unix_seconds)
            .unwrap_or(0)
    };
    let order = |created: u64, name: &str, base: &str| (created, name != base, name.to_string());

    let mut cas = Vec::new();
    for name in names
        .iter()
        .filter(|n| n.starts_with("ca") && n.ends_with(".crt"))
    {
        let path = dir.join(name);
        let key = dir.join(format!("{}.key", name.trim_end_matches(".crt")));
        let (mut times, ca) = load_operator_ca(&path, &key, td)?;
        times.created = times.created.max(appeared(&path));
        cas.push((order(times.created, name, "ca.crt"), times, ca));
    }
    if cas.is_empty() {
        return Err(file_err(
            dir,
            "no CA: expected ca.crt and ca.key (see `tessera authority init`)",
        ));
    }
    cas.sort_by(|a, b| a.0.cmp(&b.0));
    let cas = KeyRing {
        keys: cas
            .into_iter()
            .enumerate()
            .map(|(i, (_, mut t, ca))| {
                t.activate_at = if i == 0 { 0 } else { t.created + lead };
                (t, Arc::new(ca))
            })
            .collect(),
        rotates: false,
    };
    let end = cas.keys.iter().map(|(t, _)| t.not_after).max().unwrap_or(0);
    let ring = |prefix: &str| -> Result<KeyRing<JwtKey>, AuthorityError> {
        let base = format!("{prefix}.key");
        let mut keys = Vec::new();
        for name in names
            .iter()
            .filter(|n| n.starts_with(prefix) && n.ends_with(".key"))
        {
            let path = dir.join(name);
            let pem = std::fs::read_to_string(&path).map_err(|e| file_err(&path, e))?;
            let der = pem_block(&pem, "PRIVATE KEY").ok_or_else(|| {
                file_err(&path, "expected a `BEGIN PRIVATE KEY` (PKCS#8) P-256 key")
            })?;
            let probe = Es256Signer::from_pkcs8(String::new(), &der)
                .map_err(|e| file_err(&path, format!("not an ES256 key: {e}")))?;
            let kid = jws::thumbprint(&probe.public_jwk().point);
            let signer = Es256Signer::from_pkcs8(kid, &der).map_err(|e| file_err(&path, e))?;
            let at = appeared(&path);
            keys.push((
                order(at, name, &base),
                JwtKey {
                    signer,
                    key_pkcs8: der,
                },
            ));
        }
        if keys.is_empty() {
            return Err(file_err(
                dir,
                format!("no {base} (see `tessera authority init`)"),
            ));
        }
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(KeyRing {
            keys: keys
                .into_iter()
                .enumerate()
                .map(|(i, ((at, _, _), k))| {
                    let times = KeyTimes {
                        created: at,
                        activate_at: if i == 0 { 0 } else { at + lead },
                        not_after: end,
                    };
                    (times, Arc::new(k))
                })
                .collect(),
            rotates: false,
        })
    };
    Ok(State {
        jwt: ring("jwt")?,
        access: ring("access")?,
        cas,
    })
}

/// Writes a new fleet key directory: `ca.crt`/`ca.key` (a self-signed CA for
/// `td`, valid for `ca_ttl`), `jwt.key` and `access.key`, all 0600, refusing
/// to overwrite anything.
pub fn init_key_dir(
    td: &spiffe::TrustDomain,
    dir: &Path,
    ca_ttl: Duration,
    now: SystemTime,
) -> Result<(), AuthorityError> {
    let files = ["ca.crt", "ca.key", "jwt.key", "access.key"];
    for f in files {
        if dir.join(f).exists() {
            return Err(file_err(
                &dir.join(f),
                "already exists; refusing to overwrite keys",
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    let now = unix_seconds(now);
    let ca = new_ca(
        td,
        KeyTimes {
            created: now,
            activate_at: now,
            not_after: now + ca_ttl.as_secs(),
        },
    )?;
    let jwt = new_jwt_key(KeyTimes {
        created: now,
        activate_at: now,
        not_after: now,
    })?;
    let access = new_jwt_key(KeyTimes {
        created: now,
        activate_at: now,
        not_after: now,
    })?;
    let write = |name: &str, label: &str, der: &[u8]| {
        let path = dir.join(name);
        crate::fsutil::write_private_atomic(&path, crate::certs::pem_encode(label, der).as_bytes())
            .map_err(|e| file_err(&path, e))
    };
    write("ca.crt", "CERTIFICATE", &ca.cert_der)?;
    write("ca.key", "PRIVATE KEY", &ca.key_pkcs8)?;
    write("jwt.key", "PRIVATE KEY", &jwt.key_pkcs8)?;
    write("access.key", "PRIVATE KEY", &access.key_pkcs8)?;
    Ok(())
}

/// Adds a successor CA `ca-<unix time>.crt/.key` to a fleet key directory;
/// returns the certificate's file name.
pub fn add_ca(
    td: &spiffe::TrustDomain,
    dir: &Path,
    ca_ttl: Duration,
    now: SystemTime,
) -> Result<String, AuthorityError> {
    let secs = unix_seconds(now);
    let name = format!("ca-{secs}");
    for ext in ["crt", "key"] {
        let path = dir.join(format!("{name}.{ext}"));
        if path.exists() {
            return Err(file_err(&path, "already exists"));
        }
    }
    let ca = new_ca(
        td,
        KeyTimes {
            created: secs,
            activate_at: secs,
            not_after: secs + ca_ttl.as_secs(),
        },
    )?;
    for (ext, label, der) in [
        ("crt", "CERTIFICATE", &ca.cert_der[..]),
        ("key", "PRIVATE KEY", &ca.key_pkcs8[..]),
    ] {
        let path = dir.join(format!("{name}.{ext}"));
        crate::fsutil::write_private_atomic(&path, crate::certs::pem_encode(label, der).as_bytes())
            .map_err(|e| file_err(&path, e))?;
    }
    Ok(format!("{name}.crt"))
}

fn pem_block(text: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let body: String = text[start..stop].split_whitespace().collect();
    B64.decode(body).ok()
}

/// Wraps a SEC1 `ECPrivateKey` for P-256 in a PKCS#8 `PrivateKeyInfo`.
fn sec1_to_pkcs8(sec1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { id-ecPublicKey, prime256v1 }
    const ALG: &[u8] = &[
        0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let mut body = vec![0x02, 0x01, 0x00]; // version 0
    body.extend_from_slice(ALG);
    body.extend(der_tlv(0x04, sec1));
    der_tlv(0x30, &body)
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests;
