//! Brute-force protection: failed authentications are counted per client
//! address and per key id (for keys whose id is readable from their text),
//! in fixed windows. A source with `max_failures` failures in the current
//! window is refused with 429 until the window ends, valid credential or
//! not, so that guessing costs the guesser time.
//!
//! The common case — nobody failing — costs one atomic load per request:
//! the maps are only locked while some source has failures on record.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Largest number of sources a shard remembers before expired ones are swept.
const SWEEP_AT: usize = 4096;
const SHARDS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Source {
    Address(IpAddr),
    KeyId(String),
}

#[derive(Debug)]
struct Window {
    started: Instant,
    failures: u32,
}

/// Counts authentication failures.
#[derive(Debug)]
pub struct FailureLimiter {
    max_failures: u32,
    window: Duration,
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<Source, Window>>>,
    tracked: AtomicUsize,
}

impl FailureLimiter {
    /// Refuse a source after `max_failures` failures within `window`.
    pub fn new(max_failures: u32, window: Duration) -> FailureLimiter {
        FailureLimiter {
            max_failures,
            window,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            tracked: AtomicUsize::new(0),
        }
    }

    /// The settings, to tell whether a reload changed them.
    pub fn settings(&self) -> (u32, Duration) {
        (self.max_failures, self.window)
    }

    /// How long the address or key id is still refused, if it is.
    pub fn blocked(&self, address: IpAddr, key_id: Option<&str>) -> Option<Duration> {
        if self.tracked.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let by_address = self.remaining(&Source::Address(address));
        let by_key = key_id.and_then(|k| self.remaining(&Source::KeyId(k.to_owned())));
        by_address.max(by_key)
    }

    /// Records a failed authentication from `address` (with `key_id`, when
    /// the presented key named one).
    pub fn record_failure(&self, address: IpAddr, key_id: Option<&str>) {
        self.count(Source::Address(address));
        if let Some(k) = key_id {
            self.count(Source::KeyId(k.to_owned()));
        }
    }

    fn shard(&self, source: &Source) -> &Mutex<HashMap<Source, Window>> {
        &self.shards[(self.hasher.hash_one(source) as usize) % SHARDS]
    }

    fn remaining(&self, source: &Source) -> Option<Duration> {
        let shard = self.shard(source).lock().ok()?;
        let window = shard.get(source)?;
        let left = self.window.checked_sub(window.started.elapsed())?;
        (window.failures >= self.max_failures && !left.is_zero()).then_some(left)
    }

    fn count(&self, source: Source) {
        let Ok(mut shard) = self.shard(&source).lock() else {
            return;
        };
        let now = Instant::now();
        if shard.len() >= SWEEP_AT {
            let before = shard.len();
            shard.retain(|_, w| now.duration_since(w.started) < self.window);
            self.tracked.fetch_sub(before - shard.len(), Ordering::Relaxed);
        }
        let window = shard.entry(source).or_insert_with(|| {
            self.tracked.fetch_add(1, Ordering::Relaxed);
            Window {
                started: now,
                failures: 0,
            }
        });
        if now.duration_since(window.started) >= self.window {
            *window = Window {
                started: now,
                failures: 0,
            };
        }
        window.failures = window.failures.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_refused_after_max_failures_until_the_window_ends() {
        let limiter = FailureLimiter::new(3, Duration::from_millis(200));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(limiter.blocked(a, None), None);
        for _ in 0..2 {
            limiter.record_failure(a, Some("kid1"));
        }
        assert_eq!(limiter.blocked(a, None), None);
        limiter.record_failure(a, Some("kid1"));
        assert!(limiter.blocked(a, None).is_some());
        // The key id is refused from any address; other addresses are not.
        assert!(limiter.blocked(b, Some("kid1")).is_some());
        assert_eq!(limiter.blocked(b, Some("kid2")), None);
        std::thread::sleep(Duration::from_millis(210));
        assert_eq!(limiter.blocked(a, Some("kid1")), None);
    }
}
