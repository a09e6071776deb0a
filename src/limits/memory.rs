//! The in-process store: the state of every limit key, in memory, with
//! every rule of one request decided together, all or nothing, and the
//! usage ledger.
//!
//! Three kinds of limit ([`Limit`]): GCRA rates ([`super::gcra`]), calendar
//! windows (units used so far) and concurrency (live holds, by hold id,
//! each with a lease). The decisions are those of [`super::store`], the
//! same the Redis store's script makes.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::gcra::{self, Outcome};
use super::store::{
    Charge, LedgerEntry, LedgerRow, LedgerUsage, Limit, Settlement, concurrency_decide, concurrency_state, lease_us,
    ledger_field, parse_ledger_field, until_ns, valid_day, window_decide, window_live, window_settle,
};

/// Shards of the key space. One global lock would serialize every request
/// of every caller; 64 shards make two requests on unrelated keys contend
/// only by chance (1 in 64), for the few nanoseconds of a decision.
const SHARDS: usize = 64;

/// Every this many writes to a shard, its expired entries are swept.
const SWEEP_EVERY: u32 = 1024;

/// A calendar window's state.
#[derive(Debug, Clone, Copy)]
struct Window {
    used: u64,
    end: u64,
}

#[derive(Default)]
struct Shard {
    /// Rate key → TAT (nanoseconds since the caller's epoch).
    tats: HashMap<String, u64>,
    /// Window key → usage. Absent is unused.
    windows: HashMap<String, Window>,
    /// Concurrency key → hold id → lease expiry (µs since the caller's
    /// epoch). Absent is no hold.
    holds: HashMap<String, HashMap<String, u64>>,
    /// Day → [`ledger_field`] → totals.
    ledger: HashMap<String, HashMap<String, LedgerUsage>>,
    writes: u32,
}

impl Shard {
    fn tat(&self, key: &str) -> u64 {
        // Absent is the same as a TAT in the past: a full limit.
        self.tats.get(key).copied().unwrap_or(0)
    }

    fn store_tat(&mut self, key: &str, tat: u64, now: u64) {
        // A TAT at or before now is a full limit, the same as no entry:
        // storing it would only cost memory.
        if tat <= now {
            self.tats.remove(key);
        } else if let Some(slot) = self.tats.get_mut(key) {
            *slot = tat;
        } else {
            self.tats.insert(key.to_owned(), tat);
        }
        self.wrote(now);
    }

    /// A window's usage, `until` ns before its end: zero once it is over.
    fn used(&self, key: &str, until: i64) -> u64 {
        if !window_live(until) {
            return 0;
        }
        self.windows.get(key).map_or(0, |w| w.used)
    }

    fn store_window(&mut self, key: &str, used: u64, end: u64, until: i64, now: u64) {
        // Nothing used, or a window already over: no entry needed.
        if used == 0 || !window_live(until) {
            self.windows.remove(key);
        } else if let Some(slot) = self.windows.get_mut(key) {
            *slot = Window { used, end };
        } else {
            self.windows.insert(key.to_owned(), Window { used, end });
        }
        self.wrote(now);
    }

    /// The live holds on `key` at `now_us` (expired ones are dropped first)
    /// and whether `hold_id` is one of them.
    fn holds(&mut self, key: &str, hold_id: &str, now_us: u64) -> (u64, bool) {
        let Some(holds) = self.holds.get_mut(key) else {
            return (0, false);
        };
        holds.retain(|_, expiry| *expiry > now_us);
        let state = (holds.len() as u64, holds.contains_key(hold_id));
        if holds.is_empty() {
            self.holds.remove(key);
        }
        state
    }

    /// The live holds on `key`, as [`Shard::holds`] left them.
    fn hold_count(&self, key: &str) -> u64 {
        self.holds.get(key).map_or(0, |h| h.len() as u64)
    }

    fn take_hold(&mut self, key: &str, hold_id: &str, expiry_us: u64, now: u64) {
        let holds = match self.holds.get_mut(key) {
            Some(holds) => holds,
            None => self.holds.entry(key.to_owned()).or_default(),
        };
        match holds.get_mut(hold_id) {
            Some(slot) => *slot = expiry_us,
            None => {
                holds.insert(hold_id.to_owned(), expiry_us);
            }
        }
        self.wrote(now);
    }

    fn release_hold(&mut self, key: &str, hold_id: &str, now: u64) {
        if let Some(holds) = self.holds.get_mut(key) {
            holds.remove(hold_id);
            if holds.is_empty() {
                self.holds.remove(key);
            }
        }
        self.wrote(now);
    }

    fn book(&mut self, day: &str, field: &str, usage: &LedgerUsage) {
        let day = match self.ledger.get_mut(day) {
            Some(day) => day,
            None => self.ledger.entry(day.to_owned()).or_default(),
        };
        match day.get_mut(field) {
            Some(total) => total.add(usage),
            None => {
                let mut total = LedgerUsage::default();
                total.add(usage);
                day.insert(field.to_owned(), total);
            }
        }
    }

    fn wrote(&mut self, now: u64) {
        self.writes += 1;
        if self.writes >= SWEEP_EVERY {
            self.writes = 0;
            self.sweep(now);
        }
    }

    /// Drops every entry that reads the same as no entry at `now`.
    fn sweep(&mut self, now: u64) {
        let now_us = now / 1000;
        self.tats.retain(|_, tat| *tat > now);
        self.windows.retain(|_, w| window_live(until_ns(w.end, now)));
        self.holds.retain(|_, holds| {
            holds.retain(|_, expiry| *expiry > now_us);
            !holds.is_empty()
        });
    }

    fn len(&self) -> usize {
        self.tats.len() + self.windows.len() + self.holds.len()
    }
}

/// The state of any number of limit keys, and the usage ledger, in this
/// process.
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

/// What one request has charged so far, by key, seen by its later rules on
/// the same key and written back only if every rule allows.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Tat(u64),
    Used { used: u64, end: u64, until: i64 },
    Hold { count: u64, expiry_us: u64 },
}

/// Each kind of limit has its own key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Rate,
    Window,
    Concurrency,
}

fn kind(limit: &Limit) -> Kind {
    match limit {
        Limit::Rate(_) => Kind::Rate,
        Limit::Window { .. } => Kind::Window,
        Limit::Concurrency { .. } => Kind::Concurrency,
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

    fn ledger_shard(&self, day: &str, field: &str) -> usize {
        (self.hasher.hash_one((day, field)) as usize) % SHARDS
    }

    /// Locks every shard in `indices`, each once, in ascending order.
    /// Holding them all makes the request's decision atomic; taking them in
    /// one global order means two requests can never each hold a shard the
    /// other waits for, so there is no deadlock.
    fn lock(&self, mut indices: Vec<usize>) -> Locked<'_> {
        indices.sort_unstable();
        indices.dedup();
        let guards = indices
            .into_iter()
            // A panic while a shard was held cannot leave it half-updated
            // in a way that breaks a limit (every update is a single store
            // into a map), so a poisoned lock is still consistent.
            .map(|i| (i, self.shards[i].lock().unwrap_or_else(PoisonError::into_inner)))
            .collect();
        Locked { guards }
    }

    /// Decides every rule of one request at `now` (nanoseconds since the
    /// caller's epoch, the same epoch for every call and for every window
    /// end). If every rule allows its charge, all are charged; if any
    /// refuses, none is, and the rules that would have allowed report their
    /// state uncharged (as a charge of 0; a concurrency rule reports its
    /// holds without this request's). Outcomes are in the order of
    /// `charges`. `hold_id` names this request's concurrency holds (unique
    /// per request); settle with the same id to release them.
    ///
    /// Two rules on the same key (and kind) are charged one after the
    /// other; for concurrency the second takes no second hold.
    pub fn check_all(&self, now: u64, hold_id: &str, charges: &[Charge<'_>]) -> Vec<Outcome> {
        let shards: Vec<usize> = charges.iter().map(|c| self.shard_of(c.key)).collect();
        let mut locked = self.lock(shards.clone());
        let now_us = now / 1000;
        let mut pending: HashMap<(Kind, &str), Pending> = HashMap::new();
        let mut outcomes = Vec::with_capacity(charges.len());
        for (charge, &index) in charges.iter().zip(&shards) {
            let shard = locked.shard(index);
            let key = charge.key;
            let slot = (kind(&charge.limit), key);
            let before = pending.get(&slot).copied();
            let (outcome, next) = match charge.limit {
                Limit::Rate(rate) => {
                    let tat = match before {
                        Some(Pending::Tat(tat)) => tat,
                        _ => shard.tat(key),
                    };
                    let d = gcra::check(&rate, tat, now, charge.cost);
                    (d.outcome, d.outcome.allowed.then_some(Pending::Tat(d.tat)))
                }
                Limit::Window { limit, window_end_ns } => {
                    let until = until_ns(window_end_ns, now);
                    let used = match before {
                        Some(Pending::Used { used, .. }) => used,
                        _ => shard.used(key, until),
                    };
                    let (outcome, used) = window_decide(limit, used, until, charge.cost);
                    let next = used.map(|used| Pending::Used {
                        used,
                        end: window_end_ns,
                        until,
                    });
                    (outcome, next)
                }
                Limit::Concurrency { max, lease } => {
                    let (count, held) = match before {
                        // This request took its hold on the key already.
                        Some(Pending::Hold { count, .. }) => (count, true),
                        _ => shard.holds(key, hold_id, now_us),
                    };
                    let (outcome, after) = concurrency_decide(max, count, held);
                    let next = after.map(|count| Pending::Hold {
                        count,
                        expiry_us: now_us + lease_us(lease),
                    });
                    (outcome, next)
                }
            };
            if let Some(next) = next {
                pending.insert(slot, next);
            }
            outcomes.push(outcome);
        }
        if outcomes.iter().all(|o| o.allowed) {
            for (&(_, key), &p) in &pending {
                let shard = locked.shard(self.shard_of(key));
                match p {
                    Pending::Tat(tat) => shard.store_tat(key, tat, now),
                    Pending::Used { used, end, until } => shard.store_window(key, used, end, until, now),
                    Pending::Hold { expiry_us, .. } => shard.take_hold(key, hold_id, expiry_us, now),
                }
            }
        } else {
            for ((outcome, charge), &index) in outcomes.iter_mut().zip(charges).zip(&shards) {
                if !outcome.allowed {
                    continue;
                }
                let shard = locked.shard(index);
                *outcome = match charge.limit {
                    Limit::Rate(rate) => gcra::check(&rate, shard.tat(charge.key), now, 0).outcome,
                    Limit::Window { limit, window_end_ns } => {
                        let until = until_ns(window_end_ns, now);
                        window_decide(limit, shard.used(charge.key, until), until, 0).0
                    }
                    Limit::Concurrency { max, .. } => concurrency_state(max, shard.hold_count(charge.key)),
                };
            }
        }
        outcomes
    }

    /// Settles every rule of one admitted request at `now`, and books its
    /// usage in the ledger: a rate's TAT moves by `(actual − reserved) ×
    /// interval` (see [`gcra::settle`]); a window's usage moves by `actual −
    /// reserved`, never below zero, overcharges kept as debt; a concurrency
    /// hold of `hold_id` is released. Settling a window that is over (past
    /// its end and [`super::store::WINDOW_GRACE`]) changes nothing.
    pub fn settle(&self, now: u64, hold_id: &str, settlements: &[Settlement<'_>], ledger: Option<LedgerEntry<'_>>) {
        let ledger = ledger.and_then(|entry| {
            if valid_day(entry.day) {
                let field = ledger_field(entry.principal, entry.tenant, entry.model);
                Some((entry, field))
            } else {
                tracing::warn!(day = entry.day, "ledger entry dropped: the day is not YYYY-MM-DD");
                None
            }
        });
        let mut indices: Vec<usize> = settlements.iter().map(|s| self.shard_of(s.key)).collect();
        if let Some((entry, field)) = &ledger {
            indices.push(self.ledger_shard(entry.day, field));
        }
        let mut locked = self.lock(indices);
        for s in settlements {
            let shard = locked.shard(self.shard_of(s.key));
            match s.limit {
                Limit::Rate(rate) => {
                    let tat = gcra::settle(&rate, shard.tat(s.key), now, s.reserved, s.actual);
                    shard.store_tat(s.key, tat, now);
                }
                Limit::Window { window_end_ns, .. } => {
                    let until = until_ns(window_end_ns, now);
                    if window_live(until) {
                        let used = window_settle(shard.used(s.key, until), s.reserved, s.actual);
                        shard.store_window(s.key, used, window_end_ns, until, now);
                    }
                }
                Limit::Concurrency { .. } => shard.release_hold(s.key, hold_id, now),
            }
        }
        if let Some((entry, field)) = &ledger {
            locked
                .shard(self.ledger_shard(entry.day, field))
                .book(entry.day, field, &entry.usage);
        }
    }

    /// The ledger's totals for every day from `from_day` to `to_day`
    /// inclusive (`YYYY-MM-DD`), sorted by day, principal, tenant and model.
    /// Empty when either day is malformed or `from_day` is after `to_day`.
    pub fn ledger(&self, from_day: &str, to_day: &str) -> Vec<LedgerRow> {
        if !valid_day(from_day) || !valid_day(to_day) {
            return Vec::new();
        }
        let mut rows = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            // Days are canonical YYYY-MM-DD: string order is date order.
            for (day, totals) in shard
                .ledger
                .iter()
                .filter(|(d, _)| (from_day..=to_day).contains(&d.as_str()))
            {
                for (field, usage) in totals {
                    if let Some((principal, tenant, model, _)) = parse_ledger_field(field) {
                        rows.push(LedgerRow {
                            day: day.clone(),
                            principal: principal.to_owned(),
                            tenant: tenant.to_owned(),
                            model: model.to_owned(),
                            usage: *usage,
                        });
                    }
                }
            }
        }
        sort_rows(&mut rows);
        rows
    }

    /// Forgets the ledger's days before `day` (`YYYY-MM-DD`). The memory
    /// store keeps every day otherwise (the Redis store expires them after
    /// [`super::store::LEDGER_RETENTION_DAYS`]).
    pub fn drop_ledger_before(&self, day: &str) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.ledger.retain(|d, _| d.as_str() >= day);
        }
    }

    /// Removes every entry that reads the same as no entry at `now`: rates
    /// full again, windows over, holds past their lease. Writes already
    /// sweep their shard now and then; this sweeps all of them.
    pub fn evict_expired(&self, now: u64) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(PoisonError::into_inner).sweep(now);
        }
    }

    /// The number of limit keys held (of every kind; the ledger apart).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Whether no limit key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sorts ledger rows by day, principal, tenant and model.
pub(crate) fn sort_rows(rows: &mut [LedgerRow]) {
    rows.sort_by(|a, b| (&a.day, &a.principal, &a.tenant, &a.model).cmp(&(&b.day, &b.principal, &b.tenant, &b.model)));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::limits::gcra::Rate;
    use crate::limits::store::{CONCURRENCY_RETRY_AFTER, WINDOW_GRACE_NS};

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_800_000_000_000_000_000;

    fn rate(amount: u64, period_secs: u64, burst: u64) -> Limit {
        Limit::Rate(Rate::new(amount, Duration::from_secs(period_secs), burst).unwrap())
    }

    fn charge(key: &str, limit: Limit, cost: u64) -> Charge<'_> {
        Charge { key, limit, cost }
    }

    fn settlement(key: &str, limit: Limit, reserved: u64, actual: u64) -> Settlement<'_> {
        Settlement {
            key,
            limit,
            reserved,
            actual,
        }
    }

    fn window(limit: u64, end: u64) -> Limit {
        Limit::Window {
            limit,
            window_end_ns: end,
        }
    }

    fn concurrency(max: u64, lease: Duration) -> Limit {
        Limit::Concurrency { max, lease }
    }

    #[test]
    fn all_or_nothing() {
        let store = MemoryStore::new();
        let per_key = rate(10, 1, 10);
        let per_tenant = rate(10, 1, 3);
        let rules = [charge("key:a", per_key, 1), charge("tenant:acme", per_tenant, 1)];
        for _ in 0..3 {
            assert!(store.check_all(T0, "h", &rules).iter().all(|o| o.allowed));
        }
        // The tenant refuses: the key is not charged either.
        let out = store.check_all(T0, "h", &rules);
        assert!(out[0].allowed && !out[1].allowed);
        assert_eq!(out[0].remaining, 7, "the key's state, uncharged");
        let out = store.check_all(T0, "h", &[charge("key:a", per_key, 0)]);
        assert_eq!(out[0].remaining, 7);
    }

    #[test]
    fn same_key_twice_is_charged_twice() {
        let store = MemoryStore::new();
        let r = rate(10, 1, 3);
        let out = store.check_all(T0, "h", &[charge("k", r, 2), charge("k", r, 2)]);
        assert!(out[0].allowed && !out[1].allowed);
        assert_eq!(
            store.check_all(T0, "h", &[charge("k", r, 0)])[0].remaining,
            3,
            "nothing charged"
        );
        let out = store.check_all(T0, "h", &[charge("k", r, 1), charge("k", r, 2)]);
        assert!(out.iter().all(|o| o.allowed));
        assert_eq!(out[1].remaining, 0);
        // A window too.
        let w = window(5, T0 + SEC);
        let out = store.check_all(T0, "h", &[charge("k", w, 3), charge("k", w, 3)]);
        assert!(out[0].allowed && !out[1].allowed);
        assert_eq!(out[0].remaining, 5, "uncharged");
        let out = store.check_all(T0, "h", &[charge("k", w, 3), charge("k", w, 2)]);
        assert!(out.iter().all(|o| o.allowed));
        assert_eq!(out[1].remaining, 0);
    }

    #[test]
    fn settle_refunds_rates() {
        let store = MemoryStore::new();
        let r = rate(1000, 1, 1000);
        assert!(store.check_all(T0, "h", &[charge("tokens", r, 900)])[0].allowed);
        assert!(!store.check_all(T0, "h", &[charge("tokens", r, 200)])[0].allowed);
        store.settle(T0, "h", &[settlement("tokens", r, 900, 100)], None);
        assert_eq!(store.check_all(T0, "h", &[charge("tokens", r, 0)])[0].remaining, 900);
    }

    #[test]
    fn window_refuses_at_the_limit() {
        let store = MemoryStore::new();
        let end = T0 + 3600 * SEC;
        let w = window(10, end);
        let out = store.check_all(T0, "a", &[charge("day", w, 4)]);
        assert!(out[0].allowed);
        assert_eq!(out[0].remaining, 6);
        assert_eq!(out[0].reset_after, Duration::from_secs(3600));
        assert!(store.check_all(T0, "b", &[charge("day", w, 6)])[0].allowed);
        let out = store.check_all(T0 + SEC, "c", &[charge("day", w, 1)]);
        assert!(!out[0].allowed);
        assert_eq!(out[0].remaining, 0);
        assert_eq!(out[0].retry_after, Some(Duration::from_secs(3599)));
        // More than the whole window: never.
        let out = store.check_all(T0, "d", &[charge("other", w, 11)]);
        assert_eq!(out[0].retry_after, None);
        assert_eq!(out[0].remaining, 10);
    }

    #[test]
    fn window_refunds_and_debt() {
        let store = MemoryStore::new();
        let w = window(100, T0 + 60 * SEC);
        assert!(store.check_all(T0, "a", &[charge("w", w, 80)])[0].allowed);
        // Used 30 of 80: 50 come back.
        store.settle(T0, "a", &[settlement("w", w, 80, 30)], None);
        assert_eq!(store.check_all(T0, "x", &[charge("w", w, 0)])[0].remaining, 70);
        // A refund beyond what was used stops at zero.
        store.settle(T0, "a", &[settlement("w", w, 500, 0)], None);
        assert_eq!(store.check_all(T0, "x", &[charge("w", w, 0)])[0].remaining, 100);
        assert!(store.is_empty(), "an unused window needs no entry");
        // An overcharge is debt: the window is over its limit.
        assert!(store.check_all(T0, "b", &[charge("w", w, 10)])[0].allowed);
        store.settle(T0, "b", &[settlement("w", w, 10, 130)], None);
        let out = store.check_all(T0, "c", &[charge("w", w, 0)]);
        assert!(!out[0].allowed, "in debt, even nothing is refused");
        assert_eq!(out[0].remaining, 0);
        // Settling 30 back leaves exactly the limit used.
        store.settle(T0, "b", &[settlement("w", w, 30, 0)], None);
        assert!(store.check_all(T0, "c", &[charge("w", w, 0)])[0].allowed);
        assert!(!store.check_all(T0, "c", &[charge("w", w, 1)])[0].allowed);
    }

    #[test]
    fn window_end_resets() {
        let store = MemoryStore::new();
        let hour = 3600 * SEC;
        let w1 = window(5, T0 + hour);
        assert!(store.check_all(T0, "a", &[charge("h:0", w1, 5)])[0].allowed);
        assert!(!store.check_all(T0, "b", &[charge("h:0", w1, 1)])[0].allowed);
        // Just after the end, within the grace, the old window still counts.
        let late = T0 + hour + SEC;
        let out = store.check_all(late, "c", &[charge("h:0", w1, 1)]);
        assert!(!out[0].allowed);
        assert_eq!(out[0].reset_after, Duration::ZERO);
        assert_eq!(out[0].retry_after, Some(Duration::ZERO));
        // The next window is a new key, and empty.
        let w2 = window(5, T0 + 2 * hour);
        let out = store.check_all(late, "c", &[charge("h:1", w2, 1)]);
        assert!(out[0].allowed);
        assert_eq!(out[0].remaining, 4);
        // Past the grace, the old window is over: nothing counts or stays.
        let over = T0 + hour + WINDOW_GRACE_NS as u64;
        assert!(store.check_all(over, "d", &[charge("h:0", w1, 5)])[0].allowed);
        store.evict_expired(over);
        assert_eq!(store.len(), 1, "only the new window is left");
    }

    #[test]
    fn concurrency_holds_and_releases() {
        let store = MemoryStore::new();
        let c = concurrency(2, Duration::from_secs(60));
        let out = store.check_all(T0, "r1", &[charge("conc", c, 99)]);
        assert!(out[0].allowed);
        assert_eq!(out[0].remaining, 1);
        assert_eq!(out[0].reset_after, Duration::ZERO);
        assert!(store.check_all(T0, "r2", &[charge("conc", c, 1)])[0].allowed);
        let out = store.check_all(T0, "r3", &[charge("conc", c, 1)]);
        assert!(!out[0].allowed);
        assert_eq!(out[0].remaining, 0);
        assert_eq!(out[0].retry_after, Some(CONCURRENCY_RETRY_AFTER));
        // The same request again takes no second hold.
        let out = store.check_all(T0, "r2", &[charge("conc", c, 1)]);
        assert!(out[0].allowed);
        assert_eq!(out[0].remaining, 0);
        store.settle(T0, "r1", &[settlement("conc", c, 1, 0)], None);
        let out = store.check_all(T0, "r3", &[charge("conc", c, 1)]);
        assert!(out[0].allowed, "r1's hold was released");
        store.settle(T0, "r2", &[settlement("conc", c, 1, 0)], None);
        store.settle(T0, "r3", &[settlement("conc", c, 1, 0)], None);
        assert!(store.is_empty());
        // A limit of zero never admits.
        let out = store.check_all(T0, "r4", &[charge("none", concurrency(0, Duration::from_secs(1)), 1)]);
        assert_eq!(out[0].retry_after, None);
    }

    #[test]
    fn concurrency_leases_expire() {
        let store = MemoryStore::new();
        let c = concurrency(1, Duration::from_millis(200));
        assert!(store.check_all(T0, "r1", &[charge("c", c, 1)])[0].allowed);
        assert!(!store.check_all(T0 + 199_999_000, "r2", &[charge("c", c, 1)])[0].allowed);
        // r1 never settled (crashed, say): its lease ends and frees the slot.
        assert!(store.check_all(T0 + 200_000_000, "r2", &[charge("c", c, 1)])[0].allowed);
    }

    #[test]
    fn all_or_nothing_across_kinds() {
        let store = MemoryStore::new();
        let r = rate(10, 1, 10);
        let w = window(100, T0 + 60 * SEC);
        let c = concurrency(1, Duration::from_secs(60));
        let rules = |cost| [charge("k", r, 1), charge("k", w, cost), charge("k", c, 1)];
        assert!(store.check_all(T0, "r1", &rules(10)).iter().all(|o| o.allowed));
        // The concurrency rule refuses: neither rate nor window is charged.
        let out = store.check_all(T0, "r2", &rules(10));
        assert_eq!(out.iter().map(|o| o.allowed).collect::<Vec<_>>(), [true, true, false]);
        assert_eq!((out[0].remaining, out[1].remaining), (9, 90), "uncharged");
        // The window refuses: r3 takes no hold and no rate.
        store.settle(T0, "r1", &[settlement("k", c, 1, 0)], None);
        let out = store.check_all(T0, "r3", &rules(91));
        assert_eq!(out.iter().map(|o| o.allowed).collect::<Vec<_>>(), [true, false, true]);
        assert_eq!(out[2].remaining, 1, "no hold taken");
        let out = store.check_all(T0, "r4", &rules(90));
        assert!(out.iter().all(|o| o.allowed));
        assert_eq!(out.iter().map(|o| o.remaining).collect::<Vec<_>>(), [8, 0, 0]);
    }

    #[test]
    fn ledger_totals() {
        let store = MemoryStore::new();
        let usage = |requests, dollars| LedgerUsage {
            requests,
            input_tokens: 10 * requests,
            output_tokens: 5,
            compute_ns: 1_000,
            micro_dollars: dollars,
        };
        let entry = |day, principal, usage| LedgerEntry {
            day,
            principal,
            tenant: "acme",
            model: "gpt",
            usage,
        };
        store.settle(T0, "a", &[], Some(entry("2026-03-01", "alice", usage(1, 100))));
        store.settle(T0, "b", &[], Some(entry("2026-03-01", "alice", usage(2, 250))));
        store.settle(T0, "c", &[], Some(entry("2026-03-01", "bob", usage(1, 7))));
        store.settle(T0, "d", &[], Some(entry("2026-03-02", "alice", usage(1, 1))));
        store.settle(T0, "e", &[], Some(entry("2026-3-3", "alice", usage(1, 1))));
        let rows = store.ledger("2026-03-01", "2026-03-01");
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].principal.as_str(), rows[1].principal.as_str()),
            ("alice", "bob")
        );
        assert_eq!(
            rows[0].usage,
            LedgerUsage {
                requests: 3,
                input_tokens: 30,
                output_tokens: 10,
                compute_ns: 2_000,
                micro_dollars: 350
            }
        );
        assert_eq!(
            store.ledger("2026-02-01", "2026-12-31").len(),
            3,
            "the malformed day is dropped"
        );
        assert_eq!(store.ledger("2026-03-02", "2026-03-01").len(), 0);
        store.drop_ledger_before("2026-03-02");
        assert_eq!(store.ledger("2026-01-01", "2026-12-31").len(), 1);
    }

    #[test]
    fn expired_entries_are_evicted() {
        let store = MemoryStore::new();
        let r = rate(1, 1, 1);
        for i in 0..5000 {
            store.check_all(T0, "h", &[charge(&format!("k{i}"), r, 1)]);
        }
        assert_eq!(store.len(), 5000);
        // One second later every entry is full again; writes sweep shards
        // as they go, and a full sweep empties the store.
        let later = T0 + SEC;
        for i in 0..(SHARDS as u32 * SWEEP_EVERY) {
            store.check_all(later, "h", &[charge(&format!("j{i}"), r, 0)]);
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
                        let rules = [charge(&own, rate(1, 3600, 1000), 1), charge("global", global, 1)];
                        admitted += u64::from(store.check_all(T0, "h", &rules).iter().all(|o| o.allowed));
                    }
                    admitted
                })
            })
            .collect();
        let admitted: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(admitted, 500);
    }
}
