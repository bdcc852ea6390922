//! Single use of assertions over HTTPS (RFC 7523 §3 item 7, RFC 7519
//! `jti`): a JWT-SVID presented at the HTTPS token endpoint is the client's
//! only credential, so each is accepted once. Its `jti` is remembered until
//! the token expires; a second presentation is refused.
//!
//! The ledger lives in memory: after a restart an assertion seen before it
//! could be presented once more within its (minutes-long) lifetime. Only
//! assertions that passed full validation are recorded, so only workloads
//! with valid JWT-SVIDs can fill it, and it is bounded: when full of live
//! entries, new assertions are refused (never forgotten early, which would
//! let a replay through) until some expire.

use std::collections::{BTreeMap, HashMap};

use crate::sync::Mutex;

/// Most assertions remembered at once (about 150 bytes each).
pub const CAPACITY: usize = 262_144;

#[derive(Debug, PartialEq, Eq)]
pub enum Use {
    First,
    Replayed,
    /// The ledger is full of live assertions.
    Full,
}

#[derive(Default)]
struct Seen {
    /// `issuer-or-subject \n jti` -> exp.
    by_key: HashMap<String, u64>,
    /// exp -> keys expiring then, to drop expired entries in order.
    by_exp: BTreeMap<u64, Vec<String>>,
}

pub struct ReplayLedger {
    seen: Mutex<Seen>,
    capacity: usize,
}

impl Default for ReplayLedger {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl ReplayLedger {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            seen: Mutex::new(Seen::default()),
            capacity,
        }
    }

    /// Records the assertion `jti` of `subject`, valid until `exp`; says
    /// whether this is its first use.
    pub fn first_use(&self, subject: &str, jti: &str, exp: u64, now: u64) -> Use {
        let key = format!("{subject}\n{jti}");
        let mut seen = self.seen.lock();
        // Drop what has expired: an expired assertion is refused anyway.
        while let Some(entry) = seen.by_exp.first_entry() {
            if *entry.key() > now {
                break;
            }
            let keys = entry.remove();
            for k in keys {
                seen.by_key.remove(&k);
            }
        }
        if seen.by_key.contains_key(&key) {
            return Use::Replayed;
        }
        if seen.by_key.len() >= self.capacity {
            return Use::Full;
        }
        seen.by_key.insert(key.clone(), exp);
        seen.by_exp.entry(exp).or_default().push(key);
        Use::First
    }

    pub fn len(&self) -> usize {
        self.seen.lock().by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assertion_is_accepted_once_until_it_expires() {
        let l = ReplayLedger::default();
        assert_eq!(l.first_use("s", "j1", 100, 10), Use::First);
        assert_eq!(l.first_use("s", "j1", 100, 20), Use::Replayed);
        // Same jti from another subject is another assertion.
        assert_eq!(l.first_use("t", "j1", 100, 20), Use::First);
        // Once expired, the entry is dropped (the token is refused as
        // expired before it gets here).
        assert_eq!(l.first_use("u", "j2", 200, 150), Use::First);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn a_full_ledger_refuses_rather_than_forgets() {
        let l = ReplayLedger::with_capacity(2);
        assert_eq!(l.first_use("s", "a", 100, 0), Use::First);
        assert_eq!(l.first_use("s", "b", 100, 0), Use::First);
        assert_eq!(l.first_use("s", "c", 100, 0), Use::Full);
        assert_eq!(l.first_use("s", "a", 100, 0), Use::Replayed);
        assert_eq!(l.first_use("s", "c", 300, 100), Use::First);
    }
}
