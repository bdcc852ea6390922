//! Per-caller request budgets, so one workload flooding the agent cannot
//! starve the others.
//!
//! A token bucket per calling process (keyed by PID, which the kernel reports
//! for every connection): `rate` requests per second on average, bursts of up
//! to `burst`. Forked copies of an attacker each get their own bucket, but each
//! costs the attacker a process; a per-uid budget would instead let one
//! workload starve every other workload running as the same uid (all pods run
//! as root on many clusters).
//!
//! Checking is one mutex-protected hash lookup; the table is pruned of idle
//! callers when it grows.

use crate::sync::Mutex;
use std::collections::HashMap;
use tokio::time::Instant;

/// Idle buckets are dropped once the table holds this many callers.
const PRUNE_AT: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Sustained requests per second per caller.
    pub rate: f64,
    /// Requests a caller may make at once after being idle.
    pub burst: f64,
}

/// One token bucket; alone, it is a budget shared by every caller.
#[derive(Debug)]
pub struct TokenBucket {
    budget: Budget,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(budget: Budget, now: Instant) -> Self {
        Self {
            budget,
            tokens: budget.burst,
            last: now,
        }
    }

    /// Takes one token; false when none is left.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.budget.rate).min(self.budget.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A token bucket per caller, keyed by PID (requests) or by another name of
/// the caller (a SPIFFE ID, for durable writes).
#[derive(Debug)]
pub struct RateLimiter<K = i32> {
    budget: Budget,
    buckets: Mutex<HashMap<K, TokenBucket>>,
}

impl<K: std::hash::Hash + Eq> RateLimiter<K> {
    pub fn new(budget: Budget) -> Self {
        Self {
            budget,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `caller`'s budget; false when it is exhausted.
    pub fn allow(&self, caller: K) -> bool {
        self.allow_at(caller, Instant::now())
    }

    fn allow_at(&self, caller: K, now: Instant) -> bool {
        let Budget { rate, burst } = self.budget;
        let mut buckets = self.buckets.lock();
        if buckets.len() >= PRUNE_AT && !buckets.contains_key(&caller) {
            // A bucket that has refilled completely carries no information.
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
            });
        }
        buckets
            .entry(caller)
            .or_insert_with(|| TokenBucket::new(self.budget, now))
            .try_take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_then_refills_per_caller() {
        let limiter = RateLimiter::new(Budget {
            rate: 10.0,
            burst: 5.0,
        });
        let t0 = Instant::now();
        assert!((0..5).all(|_| limiter.allow_at(1, t0)));
        assert!(!limiter.allow_at(1, t0), "burst exhausted");
        assert!(limiter.allow_at(2, t0), "another caller is unaffected");
        assert!(!limiter.allow_at(1, t0 + Duration::from_millis(50)));
        assert!(
            limiter.allow_at(1, t0 + Duration::from_millis(110)),
            "refilled one token"
        );
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| limiter.allow_at(1, later)).count(), 5);
    }

    #[test]
    fn the_table_is_pruned_of_idle_callers() {
        let limiter = RateLimiter::new(Budget {
            rate: 1000.0,
            burst: 2.0,
        });
        let t0 = Instant::now();
        for pid in 0..PRUNE_AT as i32 {
            limiter.allow_at(pid, t0);
        }
        limiter.allow_at(-1, t0 + Duration::from_secs(1));
        assert!(limiter.buckets.lock().len() < 10);
    }
}
