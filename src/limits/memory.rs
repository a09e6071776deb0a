//! The in-process store: the GCRA state of every limit key, in memory, with
//! every rule of one request decided together, all or nothing.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::gcra::{self, Outcome, Rate};

/// Shards of the key space. One global lock would serialize every request
/// of every caller; 64 shards make two requests on unrelated keys contend
/// only by chance (1 in 64), for the few nanoseconds of a GCRA step.
const SHARDS: usize = 64;

/// Every this many writes to a shard, its expired entries are swept.
const SWEEP_EVERY: u32 = 1024;

/// One rule of a request: the limit key the caller built, its rate and what
/// this request charges against it.
pub type Rule<'a> = (&'a str, Rate, u64);

/// One settlement: the key and rate of a rule that was charged `reserved`
/// units, and what the request actually cost.
pub type Settlement<'a> = (&'a str, Rate, u64, u64);

#[derive(Default)]
struct Shard {
    /// Key → TAT (nanoseconds since the caller's epoch).
    tats: HashMap<String, u64>,
    writes: u32,
}

impl Shard {
    fn tat(&self, key: &str) -> u64 {
        // Absent is the same as a TAT in the past: a full limit.
        self.tats.get(key).copied().unwrap_or(0)
    }

    fn store(&mut self, key: &str, tat: u64, now: u64) {
        // A TAT at or before now is a full limit, the same as no entry:
        // storing it would only cost memory.
        if tat <= now {
            self.tats.remove(key);
        } else if let Some(slot) = self.tats.get_mut(key) {
            *slot = tat;
        } else {
            self.tats.insert(key.to_owned(), tat);
        }
        self.writes += 1;
        if self.writes >= SWEEP_EVERY {
            self.writes = 0;
            self.tats.retain(|_, tat| *tat > now);
        }
    }
}

/// GCRA state for any number of limit keys, in this process.
pub struct MemoryStore {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

/// The locked shards of one request, by shard index.
struct Locked<'a> {
    guards: Vec<(usize, MutexGuard<'a, Shard>)>,
}

impl Locked<'_> {
    fn shard(&mut self, index: usize) -> &mut Shard {
        // Every index was locked in `lock`; the search is over a handful.
        let pos = self.guards.partition_point(|(i, _)| *i < index);
        &mut self.guards[pos].1
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard_of(&self, key: &str) -> usize {
        // Truncating the hash is fine: only its low bits pick a shard.
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    /// Locks every shard the keys live in, each once, in ascending index
    /// order. Holding them all makes the request's decision atomic; taking
    /// them in one global order means two requests can never each hold a
    /// shard the other waits for, so there is no deadlock.
    fn lock<'k>(&self, keys: impl Iterator<Item = &'k str>) -> Locked<'_> {
        let mut indices: Vec<usize> = keys.map(|k| self.shard_of(k)).collect();
        indices.sort_unstable();
        indices.dedup();
        let guards = indices
            .into_iter()
            // A panic while a shard was held cannot leave it half-updated
            // (every update is one integer store), so a poisoned lock is
            // still consistent and the limits keep working.
            .map(|i| (i, self.shards[i].lock().unwrap_or_else(PoisonError::into_inner)))
            .collect();
        Locked { guards }
    }

    /// Decides every rule of one request at `now` (nanoseconds since the
    /// caller's epoch, the same epoch for every call). If every rule allows
    /// its charge, all are charged; if any refuses, none is, and the rules
    /// that would have allowed report their state uncharged (as a charge of
    /// 0). Outcomes are in the order of `rules`.
    ///
    /// Two rules on the same key are charged one after the other.
    pub fn check_all(&self, now: u64, rules: &[Rule<'_>]) -> Vec<Outcome> {
        let mut locked = self.lock(rules.iter().map(|r| r.0));
        let shards: Vec<usize> = rules.iter().map(|r| self.shard_of(r.0)).collect();
        // Charges so far in this request, by key, seen by later rules on the
        // same key; written back only if every rule allows.
        let mut pending: HashMap<&str, u64> = HashMap::new();
        let mut outcomes = Vec::with_capacity(rules.len());
        for (&(key, rate, cost), &shard) in rules.iter().zip(&shards) {
            let tat = match pending.get(key) {
                Some(&tat) => tat,
                None => locked.shard(shard).tat(key),
            };
            let decision = gcra::check(&rate, tat, now, cost);
            if decision.outcome.allowed {
                pending.insert(key, decision.tat);
            }
            outcomes.push(decision.outcome);
        }
        if outcomes.iter().all(|o| o.allowed) {
            for (&key, &tat) in &pending {
                locked.shard(self.shard_of(key)).store(key, tat, now);
            }
        } else {
            for ((outcome, &(key, rate, _)), &shard) in outcomes.iter_mut().zip(rules).zip(&shards) {
                if outcome.allowed {
                    *outcome = gcra::check(&rate, locked.shard(shard).tat(key), now, 0).outcome;
                }
            }
        }
        outcomes
    }

    /// Settles every rule of one admitted request at `now`: each key's TAT
    /// moves by `(actual − reserved) × interval` (see [`gcra::settle`]).
    pub fn settle_all(&self, now: u64, settlements: &[Settlement<'_>]) {
        let mut locked = self.lock(settlements.iter().map(|s| s.0));
        for &(key, rate, reserved, actual) in settlements {
            let shard = locked.shard(self.shard_of(key));
            let tat = gcra::settle(&rate, shard.tat(key), now, reserved, actual);
            shard.store(key, tat, now);
        }
    }

    /// Removes every entry whose TAT is at or before `now` (a full limit,
    /// the same as no entry). Writes already sweep their shard now and then;
    /// this sweeps all of them.
    pub fn evict_expired(&self, now: u64) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.tats.retain(|_, tat| *tat > now);
        }
    }

    /// The number of keys held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).tats.len())
            .sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    const T0: u64 = 1_800_000_000_000_000_000;

    fn rate(amount: u64, period_secs: u64, burst: u64) -> Rate {
        Rate::new(amount, Duration::from_secs(period_secs), burst).unwrap()
    }

    #[test]
    fn all_or_nothing() {
        let store = MemoryStore::new();
        let per_key = rate(10, 1, 10);
        let per_tenant = rate(10, 1, 3);
        let rules = [("key:a", per_key, 1), ("tenant:acme", per_tenant, 1)];
        for _ in 0..3 {
            assert!(store.check_all(T0, &rules).iter().all(|o| o.allowed));
        }
        // The tenant refuses: the key is not charged either.
        let out = store.check_all(T0, &rules);
        assert!(out[0].allowed && !out[1].allowed);
        assert_eq!(out[0].remaining, 7, "the key's state, uncharged");
        let out = store.check_all(T0, &[("key:a", per_key, 0)]);
        assert_eq!(out[0].remaining, 7);
    }

    #[test]
    fn same_key_twice_is_charged_twice() {
        let store = MemoryStore::new();
        let r = rate(10, 1, 3);
        let out = store.check_all(T0, &[("k", r, 2), ("k", r, 2)]);
        assert!(out[0].allowed && !out[1].allowed);
        assert_eq!(store.check_all(T0, &[("k", r, 0)])[0].remaining, 3, "nothing charged");
        let out = store.check_all(T0, &[("k", r, 1), ("k", r, 2)]);
        assert!(out.iter().all(|o| o.allowed));
        assert_eq!(out[1].remaining, 0);
    }

    #[test]
    fn settle_all_refunds() {
        let store = MemoryStore::new();
        let r = rate(1000, 1, 1000);
        assert!(store.check_all(T0, &[("tokens", r, 900)])[0].allowed);
        assert!(!store.check_all(T0, &[("tokens", r, 200)])[0].allowed);
        store.settle_all(T0, &[("tokens", r, 900, 100)]);
        assert_eq!(store.check_all(T0, &[("tokens", r, 0)])[0].remaining, 900);
    }

    #[test]
    fn expired_entries_are_evicted() {
        let store = MemoryStore::new();
        let r = rate(1, 1, 1);
        for i in 0..5000 {
            store.check_all(T0, &[(&format!("k{i}"), r, 1)]);
        }
        assert_eq!(store.len(), 5000);
        // One second later every entry is full again; writes sweep shards
        // as they go, and a full sweep empties the store.
        let later = T0 + 1_000_000_000;
        for i in 0..(SHARDS as u32 * SWEEP_EVERY) {
            store.check_all(later, &[(&format!("j{i}"), r, 0)]);
        }
        assert!(store.len() < 5000, "sweeps ran: {}", store.len());
        store.evict_expired(later);
        assert!(store.is_empty());
    }

    #[test]
    fn concurrent_requests_never_exceed_the_limit() {
        let store = Arc::new(MemoryStore::new());
        let global = rate(1, 3600, 500);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut admitted = 0;
                    for i in 0..200 {
                        let own = format!("caller:{t}:{}", i % 7);
                        let rules = [(own.as_str(), rate(1, 3600, 1000), 1), ("global", global, 1)];
                        admitted += u64::from(store.check_all(T0, &rules).iter().all(|o| o.allowed));
                    }
                    admitted
                })
            })
            .collect();
        let admitted: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(admitted, 500);
    }
}
