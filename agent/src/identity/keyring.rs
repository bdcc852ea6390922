//! Keys ordered oldest to newest, and the schedule that rolls them over
//! safely:
//!
//! * at half a key's lifetime a successor is created and **published** (in
//!   the bundle, so streams get it) but does not sign yet;
//! * at two thirds of the predecessor's lifetime the successor starts signing;
//! * a key leaves only when it expires, and everything it signs is clamped to
//!   expire no later than the key, so nothing valid is ever left without its
//!   key in the bundle.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::signer::SignError;

/// How far certificates are backdated, to tolerate small clock skew.
pub const BACKDATE: Duration = Duration::from_secs(30);

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

#[derive(Debug)]
pub struct KeyRing<K> {
    pub(super) keys: Vec<(KeyTimes, Arc<K>)>,
    /// False for keys that come from files (operator CA, fleet key
    /// directory): they are never replaced here.
    pub(super) rotates: bool,
}

/// What a [`KeyRing::tick`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RingChange {
    pub published: bool,
    pub pruned: bool,
}

impl RingChange {
    pub fn any(&self) -> bool {
        self.published || self.pruned
    }
}

impl<K> KeyRing<K> {
    pub fn new(rotates: bool) -> Self {
        Self {
            keys: Vec::new(),
            rotates,
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &(KeyTimes, Arc<K>)> {
        self.keys.iter()
    }

    /// The key that signs at `now`: the newest active one, else (before any
    /// is active) the oldest unexpired one.
    pub fn active(&self, now: u64) -> Option<&(KeyTimes, Arc<K>)> {
        self.keys
            .iter()
            .rev()
            .find(|(t, _)| t.activate_at <= now && now < t.not_after)
            .or_else(|| self.keys.iter().find(|(t, _)| now < t.not_after))
    }

    /// Prunes expired keys and, if the newest key is half-way through its
    /// life, creates its successor with `make(times)`.
    pub fn tick(
        &mut self,
        now: u64,
        ttl: Duration,
        mut make: impl FnMut(KeyTimes) -> Result<K, SignError>,
    ) -> Result<RingChange, SignError> {
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
    pub fn next_event(&self) -> Option<u64> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successor_is_published_at_half_life_and_signs_at_two_thirds() {
        let mut ring = KeyRing::new(true);
        let ttl = Duration::from_secs(600);
        let mut n = 0;
        let mut make = |_| {
            n += 1;
            Ok(n)
        };
        assert!(ring.tick(1000, ttl, &mut make).unwrap().published);
        assert_eq!(ring.next_event(), Some(1300));
        assert!(!ring.tick(1299, ttl, &mut make).unwrap().any());
        assert!(ring.tick(1300, ttl, &mut make).unwrap().published);
        assert_eq!(*ring.active(1300).unwrap().1, 1, "published, not signing");
        assert_eq!(*ring.active(1400).unwrap().1, 2, "signs at two thirds");
        let change = ring.tick(1600, ttl, &mut make).unwrap();
        assert!(change.pruned, "the first key leaves when it expires");
        assert_eq!(ring.keys().count(), 2);
    }

    #[test]
    fn file_keys_never_rotate() {
        let mut ring = KeyRing::new(false);
        let ttl = Duration::from_secs(600);
        assert!(ring.tick(1000, ttl, |_| Ok(())).unwrap().published);
        assert!(!ring.tick(1400, ttl, |_| Ok(())).unwrap().published);
        assert_eq!(ring.next_event(), Some(1600));
    }
}
