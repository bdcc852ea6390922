//! X509-SVIDs and WIT-SVIDs cached per SPIFFE ID, rotated by one worker,
//! fanned out to every stream through `watch` channels; JWT-SVIDs cached per
//! (ID, audience set).
//!
//! Workloads that share a SPIFFE ID share one certificate and key (as in SPIRE
//! and ztunnel), and likewise one WIT-SVID and its key (WIT-SVID spec §4
//! allows it); streams hold `Arc`s, never copies. Every renewal comes with a
//! new key. An identity nobody subscribes to any more is dropped at its next
//! refresh time instead of being renewed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, OnceCell, watch};
use tokio_util::sync::CancellationToken;

use super::signer::{SignError, Signer};
use super::svid::{JwtSvid, WitSvid, X509Svid};
use super::trust_store::TrustStore;
use super::wit::WorkloadKey;
use crate::clock::{Clock, until};
use crate::metrics::Metrics;
use crate::sync::Mutex;
use crate::sync::wakers::WakerSet;

/// Retry delay when issuance fails (the still-valid SVID keeps being served).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// Upper bound on cached JWT-SVIDs; past it expired ones are purged, then all.
const JWT_CACHE_LIMIT: usize = 10_000;
/// While waiting, the worker looks at the wall clock this often: its timer
/// is monotonic, so a wall-clock step (NTP, VM resume) would otherwise go
/// unnoticed until the timer fires, with every SVID expired meanwhile.
const CLOCK_CHECK: Duration = Duration::from_secs(1);
/// The wall clock moved this much more (or less) than the monotonic clock:
/// a jump. It also marks SVIDs and JWTs issued "in the future" (the clock
/// went back) as due for renewal.
const CLOCK_JUMP: Duration = Duration::from_secs(2);

/// A credential the rotation worker renews at about half its life.
trait Lifetime {
    fn issued_at(&self) -> SystemTime;
    fn not_after(&self) -> SystemTime;
}

impl Lifetime for X509Svid {
    fn issued_at(&self) -> SystemTime {
        self.issued_at
    }
    fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

impl Lifetime for WitSvid {
    fn issued_at(&self) -> SystemTime {
        self.issued_at
    }
    fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// One SPIFFE ID's current credential of one kind, and its subscribers.
struct Slot<T> {
    id: spiffe::SpiffeId,
    ttl: Duration,
    tx: watch::Sender<Option<Arc<T>>>,
    /// Woken after every value `tx` sends, for subscribers that hold no
    /// future on their receiver ([`Subscription`]).
    changes: Arc<WakerSet>,
    first_issue: OnceCell<()>,
    refresh_at: Mutex<SystemTime>,
}

type Slots<T> = Mutex<HashMap<String, Arc<Slot<T>>>>;

/// The slot of `id` (created empty if nobody held it yet).
fn slot_for<T>(slots: &Slots<T>, id: &spiffe::SpiffeId, ttl: Duration) -> Arc<Slot<T>> {
    slots
        .lock()
        .entry(id.to_string())
        .or_insert_with(|| {
            Arc::new(Slot {
                id: id.clone(),
                ttl,
                tx: watch::Sender::new(None),
                changes: WakerSet::new(),
                first_issue: OnceCell::new(),
                refresh_at: Mutex::new(SystemTime::UNIX_EPOCH),
            })
        })
        .clone()
}

/// Puts `value` in `slot` for every subscriber and schedules its renewal.
fn install<T: Lifetime>(slot: &Slot<T>, value: T) {
    *slot.refresh_at.lock() = refresh_time(value.issued_at(), value.not_after());
    slot.tx.send_replace(Some(Arc::new(value)));
    slot.changes.wake_all();
}

/// One identity's credential of one kind, as a subscriber sees it: `rx`
/// always holds the current one, and `changes` wakes the tasks registered
/// in it after each replacement (for a task polled by hand, which keeps no
/// `rx.changed()` future while it waits).
pub struct Subscription<T> {
    pub rx: watch::Receiver<Option<Arc<T>>>,
    pub changes: Arc<WakerSet>,
}

impl<T> Slot<T> {
    fn subscription(&self) -> Subscription<T> {
        Subscription {
            rx: self.tx.subscribe(),
            changes: self.changes.clone(),
        }
    }
}

/// Forgets the slots of `slots` nobody subscribes to any more, and returns
/// those due for renewal at `now`; `next` is lowered to the earliest
/// renewal that is not due yet.
fn due_slots<T: Lifetime>(
    slots: &Slots<T>,
    now: SystemTime,
    next: &mut SystemTime,
) -> Vec<Arc<Slot<T>>> {
    let mut slots = slots.lock();
    // Unused identities are forgotten instead of renewed.
    slots.retain(|_, slot| {
        let due = *slot.refresh_at.lock() <= now;
        // Also drops a slot whose first issuance failed and that nobody
        // waits on any more.
        !(due && slot.tx.receiver_count() == 0)
    });
    slots
        .values()
        .filter(|s| s.first_issue.initialized())
        .filter_map(|s| {
            let at = *s.refresh_at.lock();
            // Issued after `now`: the clock went back, and the credential
            // may not be valid yet.
            let ahead =
                s.tx.borrow()
                    .as_ref()
                    .is_some_and(|v| v.issued_at() > now + CLOCK_JUMP);
            if at <= now || ahead {
                Some(s.clone())
            } else {
                *next = (*next).min(at);
                None
            }
        })
        .collect()
}

type JwtKey = (String, Vec<String>);

pub struct SvidCache {
    signer: Arc<dyn Signer>,
    trust: Arc<TrustStore>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    slots: Slots<X509Svid>,
    wits: Slots<WitSvid>,
    jwts: Mutex<HashMap<JwtKey, JwtSvid>>,
    wake: Notify,
}

impl SvidCache {
    pub fn new(
        signer: Arc<dyn Signer>,
        trust: Arc<TrustStore>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            signer,
            trust,
            clock,
            metrics,
            slots: Mutex::default(),
            wits: Mutex::default(),
            jwts: Mutex::default(),
            wake: Notify::new(),
        })
    }

    /// Who signs (this node's keys, or the fleet authority).
    pub fn signer(&self) -> &Arc<dyn Signer> {
        &self.signer
    }

    /// The trust domain's published bundle and keys.
    pub fn trust_store(&self) -> &Arc<TrustStore> {
        &self.trust
    }

    /// A subscription that always holds the current SVID for `id`, issuing it
    /// first if nobody held it yet.
    pub async fn subscribe(
        &self,
        id: &spiffe::SpiffeId,
        ttl: Duration,
    ) -> Result<Subscription<X509Svid>, SignError> {
        let slot = slot_for(&self.slots, id, ttl);
        let subscription = slot.subscription();
        // Boxed: issuance may go through the fleet client, whose future is
        // kilobytes; inline, it would size every caller's future (each idle
        // Workload API stream task) for a step that runs once per identity.
        slot.first_issue
            .get_or_try_init(|| {
                Box::pin(async {
                    let svid = self
                        .signer
                        .issue_x509_batch(std::slice::from_ref(&(slot.id.clone(), slot.ttl)))
                        .await
                        .pop()
                        .unwrap_or(Err(SignError::NoKey))?;
                    install(&slot, svid);
                    self.metrics.svids_issued_x509.inc();
                    self.wake.notify_one();
                    Ok::<(), SignError>(())
                })
            })
            .await?;
        Ok(subscription)
    }

    /// A subscription that always holds the current WIT-SVID for `id`, issuing
    /// it first if nobody held it yet. Fails with
    /// [`SignError::Unsupported`] when the signer has no WIT-SVID keys.
    pub async fn subscribe_wit(
        &self,
        id: &spiffe::SpiffeId,
        ttl: Duration,
    ) -> Result<Subscription<WitSvid>, SignError> {
        let slot = slot_for(&self.wits, id, ttl);
        let subscription = slot.subscription();
        slot.first_issue
            .get_or_try_init(|| {
                Box::pin(async {
                    let wit = self.issue_wit(&slot.id, slot.ttl).await?;
                    install(&slot, wit);
                    self.wake.notify_one();
                    Ok::<(), SignError>(())
                })
            })
            .await?;
        Ok(subscription)
    }

    /// A WIT-SVID for `id` over a key generated here, now: the signer sees
    /// only its public half.
    async fn issue_wit(&self, id: &spiffe::SpiffeId, ttl: Duration) -> Result<WitSvid, SignError> {
        let key = WorkloadKey::generate()?;
        let signed = self.signer.sign_wit(id, &key.public_jwk(), ttl).await?;
        self.metrics.svids_issued_wit.inc();
        Ok(WitSvid {
            spiffe_id: id.clone(),
            token: signed.token,
            key_jwk: key.private_jwk(),
            issued_at: signed.issued_at,
            not_after: signed.not_after,
        })
    }

    /// Whether `svid` has expired by the agent's clock. An expired SVID is
    /// never sent: after a wall-clock jump its CA may already have left the
    /// bundle, and a client would get a certificate nothing verifies.
    pub fn is_expired(&self, svid: &X509Svid) -> bool {
        self.has_passed(svid.not_after)
    }

    /// Whether `not_after` has passed by the agent's clock.
    pub fn has_passed(&self, not_after: SystemTime) -> bool {
        not_after <= self.clock.now()
    }

    /// Wakes the rotation worker to renew whatever is due now.
    pub fn renew_due_now(&self) {
        self.wake.notify_one();
    }

    /// Number of SPIFFE IDs with a cached X509-SVID.
    pub fn cached_identities(&self) -> usize {
        self.slots.lock().len()
    }

    /// Earliest expiry among cached X509-SVIDs.
    pub fn soonest_expiry(&self) -> Option<SystemTime> {
        let slots = self.slots.lock();
        slots
            .values()
            .filter_map(|s| s.tx.borrow().as_ref().map(|svid| svid.not_after))
            .min()
    }

    /// Re-issues every cached X509-SVID and WIT-SVID now (used after a
    /// forced CA change and by benchmarks of fan-out).
    pub fn rotate_all_now(&self) {
        for slot in self.slots.lock().values() {
            *slot.refresh_at.lock() = SystemTime::UNIX_EPOCH;
        }
        for slot in self.wits.lock().values() {
            *slot.refresh_at.lock() = SystemTime::UNIX_EPOCH;
        }
        self.wake.notify_one();
    }

    /// A JWT-SVID for (id, audience), reused while more than half its life
    /// is left, unless it is a single-use credential for the token service.
    pub async fn jwt(
        &self,
        id: &spiffe::SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<JwtSvid, SignError> {
        let mut aud = audience.to_vec();
        aud.sort();
        aud.dedup();
        let key = (id.to_string(), aud);
        let now = self.clock.now();
        {
            let cache = self.jwts.lock();
            if let Some(hit) = cache.get(&key)
                && now < refresh_time(hit.issued_at, hit.expires_at)
                && hit.issued_at <= now + CLOCK_JUMP
            {
                return Ok(hit.clone());
            }
        }
        // Keep the caller's audience order in the token (first = primary).
        let svid = match self.signer.jwt_svid(id, audience, ttl).await {
            Ok(svid) => svid,
            Err(e) => {
                // The signer is away (upstream outage): a cached token that
                // is still valid beats no token.
                let cache = self.jwts.lock();
                if let Some(hit) = cache.get(&key)
                    && now + CLOCK_JUMP < hit.expires_at
                {
                    tracing::debug!(error = %e, "serving a cached JWT-SVID past its refresh time");
                    return Ok(hit.clone());
                }
                return Err(e);
            }
        };
        self.metrics.svids_issued_jwt.inc();
        if svid.single_use {
            // A credential for the token service is accepted once: a
            // second fetch must get a new one.
            return Ok(svid);
        }
        let mut cache = self.jwts.lock();
        if cache.len() >= JWT_CACHE_LIMIT {
            cache.retain(|_, v| v.expires_at > now);
            if cache.len() >= JWT_CACHE_LIMIT {
                cache.clear();
            }
        }
        cache.insert(key, svid.clone());
        Ok(svid)
    }

    /// The rotation worker: renews SVIDs at about half their life, drops
    /// unused identities, and drives CA/JWT key rollover. Runs until cancelled.
    pub async fn run_rotation(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let now = self.clock.now();
            let mut next = now + Duration::from_secs(3600);
            match self.signer.rotate() {
                Ok(Some(t)) => next = next.min(t),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "authority key rollover failed; retrying");
                    next = next.min(now + RETRY_AFTER_FAILURE);
                }
            }
            let due = due_slots(&self.slots, now, &mut next);
            // One batch: in upstream mode, one request for every renewal due.
            let batch: Vec<(spiffe::SpiffeId, Duration)> =
                due.iter().map(|s| (s.id.clone(), s.ttl)).collect();
            let issued = if batch.is_empty() {
                Vec::new()
            } else {
                self.signer.issue_x509_batch(&batch).await
            };
            for (slot, result) in due.into_iter().zip(issued) {
                match result.map(|svid| install(&slot, svid)) {
                    Ok(()) => {
                        self.metrics.svids_issued_x509.inc();
                        self.metrics.rotations.inc();
                        let at = *slot.refresh_at.lock();
                        next = next.min(at);
                    }
                    Err(e) => {
                        tracing::error!(spiffe_id = %slot.id, error = %e, "SVID renewal failed; serving the current one");
                        *slot.refresh_at.lock() = now + RETRY_AFTER_FAILURE;
                        next = next.min(now + RETRY_AFTER_FAILURE);
                    }
                }
            }
            // WIT-SVIDs are signed one by one (each over its own new key).
            for slot in due_slots(&self.wits, now, &mut next) {
                match self.issue_wit(&slot.id, slot.ttl).await {
                    Ok(wit) => {
                        install(&slot, wit);
                        self.metrics.rotations.inc();
                        next = next.min(*slot.refresh_at.lock());
                    }
                    Err(e) => {
                        tracing::error!(spiffe_id = %slot.id, error = %e, "WIT-SVID renewal failed; serving the current one");
                        *slot.refresh_at.lock() = now + RETRY_AFTER_FAILURE;
                        next = next.min(now + RETRY_AFTER_FAILURE);
                    }
                }
            }
            let (wall0, mono0) = (self.clock.now(), tokio::time::Instant::now());
            loop {
                let now = self.clock.now();
                if now >= next {
                    break;
                }
                let expected = wall0 + mono0.elapsed();
                if now > expected + CLOCK_JUMP || now + CLOCK_JUMP < expected {
                    tracing::warn!("the wall clock jumped; re-checking signing keys and SVIDs now");
                    break;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(until(now, next).min(CLOCK_CHECK)) => {}
                    _ = self.wake.notified() => break,
                }
            }
        }
    }
}

/// Half-way through the validity, with up to ±10 % jitter of the lifetime so a
/// mass deployment does not renew in lock-step.
fn refresh_time(issued_at: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = until(issued_at, not_after);
    let mut b = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let r = u16::from_le_bytes(b) as f64 / u16::MAX as f64; // 0..=1
    let fraction = 0.4 + 0.2 * r;
    issued_at + life.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TokioClock;
    use crate::identity::{AuthoritySettings, LocalAuthority};
    use crate::sync::wakers::{Registration, WakeCount};

    fn cache(clock: Arc<dyn Clock>) -> Arc<SvidCache> {
        let authority = LocalAuthority::load(
            AuthoritySettings {
                trust_domain: spiffe::TrustDomain::new("example.org").unwrap(),
                ca_ttl: Duration::from_secs(24 * 3600),
                jwt_key_ttl: Duration::from_secs(24 * 3600),
                jwt_key_type: Default::default(),
                state_dir: None,
                ca_files: None,
            },
            clock.clone(),
        )
        .unwrap();
        let trust = authority.trust_store().clone();
        SvidCache::new(authority, trust, clock, Arc::new(Metrics::new()))
    }

    #[test]
    fn refresh_is_half_life_with_jitter() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        for _ in 0..100 {
            let r = until(t0, refresh_time(t0, t0 + Duration::from_secs(100)));
            assert!((40..=60).contains(&r.as_secs()), "{r:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rotates_at_half_life_and_pushes_to_subscribers() {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new());
        let cache = cache(clock.clone());
        let shutdown = CancellationToken::new();
        tokio::spawn(cache.clone().run_rotation(shutdown.clone()));
        let id = spiffe::SpiffeId::new("spiffe://example.org/w").unwrap();
        let subscription = cache
            .subscribe(&id, Duration::from_secs(100))
            .await
            .unwrap();
        let mut rx = subscription.rx;
        // A task waiting without a future is woken by the renewal.
        let woken = Arc::new(WakeCount::default());
        let mut registration = Registration::new(subscription.changes);
        registration.register(&std::task::Waker::from(woken.clone()));
        let first = rx.borrow_and_update().clone().unwrap();
        // Shared: a second subscriber gets the very same certificate.
        let rx2 = cache
            .subscribe(&id, Duration::from_secs(100))
            .await
            .unwrap()
            .rx;
        assert!(Arc::ptr_eq(&first, rx2.borrow().as_ref().unwrap()));
        tokio::time::advance(Duration::from_secs(39)).await;
        tokio::task::yield_now().await;
        assert!(!rx.has_changed().unwrap(), "no renewal before 40% of life");
        tokio::time::timeout(Duration::from_secs(22), rx.changed())
            .await
            .expect("renewed by 60% of life")
            .unwrap();
        let second = rx.borrow_and_update().clone().unwrap();
        assert_eq!(woken.count(), 1, "one renewal, one wake-up");
        assert_ne!(first.chain_der, second.chain_der);
        assert!(second.not_after > first.not_after);
        // Each SVID verifies with the spiffe crate.
        spiffe::X509Svid::parse_from_der(&second.chain_der, &second.key_pkcs8).unwrap();
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn wit_svids_rotate_with_a_new_key_and_are_shared() {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new());
        let cache = cache(clock.clone());
        let shutdown = CancellationToken::new();
        tokio::spawn(cache.clone().run_rotation(shutdown.clone()));
        let id = spiffe::SpiffeId::new("spiffe://example.org/w").unwrap();
        let ttl = Duration::from_secs(100);
        let mut rx = cache.subscribe_wit(&id, ttl).await.unwrap().rx;
        let first = rx.borrow_and_update().clone().unwrap();
        let rx2 = cache.subscribe_wit(&id, ttl).await.unwrap().rx;
        assert!(Arc::ptr_eq(&first, rx2.borrow().as_ref().unwrap()));
        assert_eq!(until(first.issued_at, first.not_after), ttl);
        tokio::time::advance(Duration::from_secs(39)).await;
        tokio::task::yield_now().await;
        assert!(!rx.has_changed().unwrap(), "no renewal before 40% of life");
        tokio::time::timeout(Duration::from_secs(22), rx.changed())
            .await
            .expect("renewed by 60% of life")
            .unwrap();
        let second = rx.borrow_and_update().clone().unwrap();
        assert!(second.not_after > first.not_after);
        assert_ne!(first.key_jwk, second.key_jwk, "a renewal brings a new key");
        let cnf = |token: &str| {
            let claims = crate::identity::jws::unverified_claims(token).unwrap();
            claims["cnf"]["jwk"].clone()
        };
        let public = |jwk: &str| {
            let mut jwk: serde_json::Value = serde_json::from_str(jwk).unwrap();
            jwk.as_object_mut().unwrap().remove("d");
            jwk
        };
        assert_eq!(cnf(&second.token), public(&second.key_jwk));
        assert_ne!(cnf(&second.token), cnf(&first.token));
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn unused_identities_are_dropped_not_renewed() {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new());
        let cache = cache(clock.clone());
        let shutdown = CancellationToken::new();
        tokio::spawn(cache.clone().run_rotation(shutdown.clone()));
        let id = spiffe::SpiffeId::new("spiffe://example.org/w").unwrap();
        drop(
            cache
                .subscribe(&id, Duration::from_secs(100))
                .await
                .unwrap(),
        );
        assert_eq!(cache.cached_identities(), 1);
        tokio::time::sleep(Duration::from_secs(70)).await;
        assert_eq!(cache.cached_identities(), 0);
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn jwt_cache_reuses_until_half_life() {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new());
        let cache = cache(clock);
        let id = spiffe::SpiffeId::new("spiffe://example.org/w").unwrap();
        let a = cache
            .jwt(&id, &["x".into(), "y".into()], Duration::from_secs(300))
            .await
            .unwrap();
        let b = cache
            .jwt(&id, &["y".into(), "x".into()], Duration::from_secs(300))
            .await
            .unwrap();
        assert_eq!(a.token, b.token, "same audience set, same token");
        tokio::time::advance(Duration::from_secs(200)).await;
        let c = cache
            .jwt(&id, &["x".into(), "y".into()], Duration::from_secs(300))
            .await
            .unwrap();
        assert_ne!(a.token, c.token);
    }
}
