//! Time is injected so rotation and expiry can be tested with paused tokio time.

use std::time::{Duration, SystemTime};

/// Wall-clock source for certificate validity and token claims.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The real wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    // The one place the agent reads the real wall clock.
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A wall clock that advances with tokio's clock, so `tokio::time::pause` and
/// `advance` move certificate time and timer deadlines together.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base_wall: SystemTime,
    base_instant: tokio::time::Instant,
}

impl TokioClock {
    // Anchored once to the real wall clock; tokio's clock moves it after.
    #[allow(clippy::disallowed_methods)]
    pub fn new() -> Self {
        Self {
            base_wall: SystemTime::now(),
            base_instant: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.base_wall + self.base_instant.elapsed()
    }
}

/// Seconds since the Unix epoch (saturating at 0 for pre-epoch times).
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How far `later` is after `earlier`, or zero.
pub fn until(earlier: SystemTime, later: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or(Duration::ZERO)
}
