//! What the external policy engines share: a bounded decision cache with a
//! TTL, keyed by the SHA-256 of the request sent, and the shape of a
//! decision they return (a deny with the reason when they could not answer).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::Decision;

/// Most cached decisions; beyond it the cache starts over.
const MAX_CACHED: usize = 10_000;

/// Recent decisions of an external engine.
#[derive(Debug)]
pub struct DecisionCache {
    ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], (Instant, bool)>>,
}

impl DecisionCache {
    /// Decisions are reused for `ttl` (zero: never).
    pub fn new(ttl: Duration) -> DecisionCache {
        DecisionCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The cache key of a request body.
    pub fn key(body: &serde_json::Value) -> [u8; 32] {
        Sha256::digest(body.to_string().as_bytes()).into()
    }

    /// A still-fresh decision for `key`.
    pub fn get(&self, key: &[u8; 32]) -> Option<bool> {
        let entries = self.entries.lock().ok()?;
        let (until, allowed) = entries.get(key)?;
        (*until > Instant::now()).then_some(*allowed)
    }

    /// Keeps a decision for the TTL.
    pub fn put(&self, key: [u8; 32], allowed: bool) {
        if self.ttl.is_zero() {
            return;
        }
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= MAX_CACHED {
                entries.clear();
            }
            entries.insert(key, (Instant::now() + self.ttl, allowed));
        }
    }
}

/// An external engine's decision; `error` says why it could not decide.
pub fn verdict(engine: &'static str, allowed: bool, error: Option<String>) -> Decision {
    let mut decision = if allowed {
        Decision::allow(engine, "", Vec::new())
    } else {
        Decision::deny(engine, "", Vec::new())
    };
    decision.error = error;
    decision
}

/// Why a request to an external engine failed, in a few words.
pub fn failure(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".to_owned()
    } else {
        format!("unreachable: {e}")
    }
}
