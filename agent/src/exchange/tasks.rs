//! Which tasks may still have live tokens, so that ending a task costs
//! durable state only when there is something to revoke.
//!
//! Ending a task must survive a restart when a token of the task may be
//! live: that end is one fsynced line in the revocation file. A task no
//! token was issued for has nothing to revoke; its end is kept in memory
//! only (so no token can be issued for it afterwards), a bounded number per
//! principal, oldest forgotten first. Before this distinction any workload
//! could fill the disk by ending random task ids (4 processes wrote 46,000
//! durable entries in 15 s).
//!
//! The ledger knows every task this process issued a token for, with the
//! latest expiry, in 16 bytes or so per task (a 64-bit digest of the task
//! key: a collision can only make an end durable that need not be). It
//! cannot know what an earlier process issued: until `max_ttl` after start,
//! a task it does not know *may* have live tokens. Those ends are durable up
//! to [`UNKNOWN_DURABLE_ENDS`] per principal; past that they are kept in
//! memory (effective at once, but not across another restart) and counted,
//! so a flood in that window cannot fill the disk either. If the table is
//! full ([`MAX_TRACKED`] tasks with live tokens, which only issuance can
//! make), every end is durable until the untracked tokens have expired.

use std::collections::{HashMap, VecDeque};

use crate::sync::Mutex;

/// Tasks with live tokens tracked at once (about 24 MiB when full); past
/// this (after dropping expired ones) new ones go untracked, and every end
/// is durable until they would have expired.
pub const MAX_TRACKED: usize = 1 << 20;
/// Ends kept in memory per principal.
pub const MEMORY_ENDS_PER_PRINCIPAL: usize = 1024;
/// Principals with ends in memory; past this, expired ones are dropped and
/// then the oldest principal's.
const MAX_PRINCIPALS: usize = 4096;
/// Durable ends per principal of tasks the ledger cannot vouch for.
pub const UNKNOWN_DURABLE_ENDS: u32 = 1024;

/// What ending a task needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndKind {
    /// A token of the task may be live: write the end durably.
    Durable,
    /// Nothing to revoke, or the principal used up its durable share of
    /// unknown tasks: keep the end in memory.
    Memory,
}

#[derive(Default)]
struct MemoryEnds {
    until: HashMap<String, u64>,
    order: VecDeque<String>,
}

#[derive(Default)]
struct State {
    /// Digest of a task key -> latest `exp` of a token issued for it by
    /// this process.
    issued: HashMap<u64, u64>,
    /// Before this (unix seconds), a task not in `issued` may have live
    /// tokens issued before this process started.
    blind_until: u64,
    /// Before this, a task not in `issued` may have live tokens that were
    /// not tracked because `issued` was full.
    overflow_until: u64,
    /// Principal -> ends kept in memory.
    memory_ends: HashMap<String, MemoryEnds>,
    /// Principal -> durable ends of unknown tasks in the blind window.
    unknown_durable: HashMap<String, u32>,
}

pub struct TaskLedger {
    state: Mutex<State>,
}

impl TaskLedger {
    /// A ledger for a process started at `now_s` whose earlier incarnations
    /// issued tokens that expire by `now_s + max_ttl_s`.
    pub fn new(now_s: u64, max_ttl_s: u64) -> Self {
        Self {
            state: Mutex::new(State {
                blind_until: now_s.saturating_add(max_ttl_s),
                ..State::default()
            }),
        }
    }

    /// A token of task `key` was issued, valid until `exp`.
    pub fn issued(&self, key: &str, exp: u64, now_s: u64) {
        let digest = digest(key);
        let mut s = self.state.lock();
        if let Some(e) = s.issued.get_mut(&digest) {
            *e = (*e).max(exp);
            return;
        }
        if s.issued.len() >= MAX_TRACKED {
            s.issued.retain(|_, e| *e > now_s);
        }
        if s.issued.len() >= MAX_TRACKED {
            s.overflow_until = s.overflow_until.max(exp);
            return;
        }
        s.issued.insert(digest, exp);
    }

    /// How the end of task `key` of `principal` is to be kept.
    pub fn end_kind(&self, principal: &str, key: &str, now_s: u64) -> EndKind {
        let mut s = self.state.lock();
        if s.issued.get(&digest(key)).is_some_and(|&exp| exp > now_s) || now_s < s.overflow_until {
            return EndKind::Durable;
        }
        if now_s >= s.blind_until {
            s.unknown_durable.clear();
            return EndKind::Memory;
        }
        let used = s.unknown_durable.entry(principal.to_owned()).or_default();
        if *used < UNKNOWN_DURABLE_ENDS {
            *used += 1;
            EndKind::Durable
        } else {
            EndKind::Memory
        }
    }

    /// Remembers in memory that `principal` ended task `key` until `until`.
    pub fn end_in_memory(&self, principal: &str, key: &str, until: u64, now_s: u64) {
        let mut s = self.state.lock();
        if s.memory_ends.len() >= MAX_PRINCIPALS && !s.memory_ends.contains_key(principal) {
            s.memory_ends
                .retain(|_, ends| ends.until.values().any(|&u| u > now_s));
            if s.memory_ends.len() >= MAX_PRINCIPALS {
                // Forget one principal's ends rather than refuse the end:
                // its tasks had no token (or, past the durable share, the
                // end is effective only until the next restart anyway).
                if let Some(victim) = s.memory_ends.keys().next().cloned() {
                    s.memory_ends.remove(&victim);
                }
            }
        }
        let ends = s.memory_ends.entry(principal.to_owned()).or_default();
        if ends.until.insert(key.to_owned(), until).is_none() {
            ends.order.push_back(key.to_owned());
        }
        while ends.order.len() > MEMORY_ENDS_PER_PRINCIPAL {
            if let Some(old) = ends.order.pop_front() {
                ends.until.remove(&old);
            }
        }
    }

    /// Whether `principal` ended task `key` and the end is kept in memory.
    pub fn ended_in_memory(&self, principal: &str, key: &str, now_s: u64) -> bool {
        self.state
            .lock()
            .memory_ends
            .get(principal)
            .and_then(|ends| ends.until.get(key))
            .is_some_and(|&u| now_s < u)
    }

    /// Tasks tracked with live tokens, and principals with ends in memory.
    pub fn sizes(&self) -> (usize, usize) {
        let s = self.state.lock();
        (s.issued.len(), s.memory_ends.len())
    }
}

/// 64 bits of a task key (itself a SHA-256 in hex, so any 16 digits are
/// as good as a hash); another string is hashed.
fn digest(key: &str) -> u64 {
    key.get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| {
            use std::hash::{BuildHasher, BuildHasherDefault};
            BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(key)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_000_000;

    #[test]
    fn only_tasks_that_may_have_live_tokens_are_ended_durably() {
        let ledger = TaskLedger::new(T0, 600);
        // In the blind window after start, an unknown task may have tokens
        // from before the restart.
        assert_eq!(ledger.end_kind("p", "old", T0 + 1), EndKind::Durable);
        // After it, an unknown task had none.
        let later = T0 + 601;
        assert_eq!(ledger.end_kind("p", "never", later), EndKind::Memory);
        ledger.issued("live", later + 60, later);
        assert_eq!(ledger.end_kind("p", "live", later + 1), EndKind::Durable);
        assert_eq!(
            ledger.end_kind("p", "live", later + 61),
            EndKind::Memory,
            "its tokens have expired"
        );
    }

    #[test]
    fn unknown_durable_ends_are_bounded_per_principal() {
        let ledger = TaskLedger::new(T0, 600);
        for i in 0..UNKNOWN_DURABLE_ENDS {
            assert_eq!(
                ledger.end_kind("flood", &i.to_string(), T0),
                EndKind::Durable
            );
        }
        assert_eq!(ledger.end_kind("flood", "one-more", T0), EndKind::Memory);
        assert_eq!(
            ledger.end_kind("honest", "t", T0),
            EndKind::Durable,
            "another principal keeps its share"
        );
    }

    #[test]
    fn memory_ends_are_bounded_per_principal_oldest_first() {
        let ledger = TaskLedger::new(T0, 0);
        for i in 0..MEMORY_ENDS_PER_PRINCIPAL + 1 {
            ledger.end_in_memory("p", &i.to_string(), T0 + 100, T0);
        }
        assert!(!ledger.ended_in_memory("p", "0", T0), "oldest forgotten");
        assert!(ledger.ended_in_memory("p", "1", T0));
        assert!(!ledger.ended_in_memory("q", "1", T0), "keyed by principal");
        assert!(!ledger.ended_in_memory("p", "1", T0 + 100), "expired");
    }
}
