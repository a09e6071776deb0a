//! What both limit stores ([`super::memory`] and [`super::redis`]) speak:
//! the three kinds of [`Limit`], a request's [`Charge`]s and
//! [`Settlement`]s, and the usage ledger.
//!
//! The decision arithmetic of the two newer kinds lives here too, as pure
//! functions: the memory store calls them, and the Redis script repeats them
//! step for step (as it repeats [`super::gcra`] for rates), so that both
//! stores decide identically.
//!
//! # Exactness
//!
//! Redis runs Lua, whose numbers are doubles, exact for integers below 2^53.
//! Every quantity here is therefore kept at or below [`MAX_UNITS`] (2^52):
//! window limits and costs above it are treated as 2^52 (and a cost above a
//! limit of 2^52 is still refused), window usage saturates there, and time
//! spans are clamped to ±2^52 ns (about 52 days), which covers a month-long
//! window with room to spare. Concurrency leases are counted in whole
//! microseconds, at most [`MAX_LEASE`], so that an absolute lease expiry
//! (about 1.8e15 µs since the Unix epoch) is exact too.

use std::time::Duration;

use super::gcra::{Outcome, Rate};

/// The largest window limit, cost and usage (2^52), so that every sum the
/// Redis script forms stays exact in a double. Larger values are clamped.
pub const MAX_UNITS: u64 = 1 << 52;

/// How long after its end a [`Limit::Window`]'s usage still counts. A
/// caller whose clock lags the store's (Redis's `TIME`) keeps charging a
/// window that has just ended; within the grace the charge still counts
/// against that window, so no budget leaks at the boundary. Past it the
/// window is over: its usage reads as zero and nothing is recorded.
pub const WINDOW_GRACE: Duration = Duration::from_secs(60);

/// The longest [`Limit::Concurrency`] lease (2^42 µs, about 51 days);
/// longer leases are clamped.
pub const MAX_LEASE: Duration = Duration::from_micros(1 << 42);

/// `retry_after` of a refused [`Limit::Concurrency`]: when a hold will be
/// released is unknowable (it depends on other requests finishing), so this
/// is a guess, short enough that a client retries while capacity is likely
/// back and long enough not to hammer the gateway.
pub const CONCURRENCY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long the Redis store keeps a day of the ledger: the day's hash
/// expires this many days after the day began.
pub const LEDGER_RETENTION_DAYS: u32 = 400;

/// What one rule limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// A GCRA rate with burst.
    Rate(Rate),
    /// A calendar budget: at most `limit` units charged in one window (an
    /// hour, day or month, computed by the caller, who puts the window's
    /// start into the key). `window_end_ns` is when the window ends (ns
    /// since the Unix epoch, or the memory store's epoch); the state may be
    /// dropped after it (see [`WINDOW_GRACE`]).
    Window {
        /// Units the window admits (at most [`MAX_UNITS`]).
        limit: u64,
        /// The end of the window, in ns.
        window_end_ns: u64,
    },
    /// At most `max` holds at once; `cost` is ignored (a request takes one
    /// hold per key, identified by its hold id). A hold is released by
    /// settlement. A hold not released within `lease` expires (in both
    /// stores), so a crashed instance cannot leak capacity forever; the
    /// lease must therefore outlast the longest request.
    Concurrency {
        /// Holds allowed at once (at most [`MAX_UNITS`]).
        max: u64,
        /// How long a hold lives unless released first (rounded up to whole
        /// microseconds, at least 1 µs, at most [`MAX_LEASE`]).
        lease: Duration,
    },
}

/// One rule of a request: the limit key the caller built, its limit, and
/// what this request charges against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge<'a> {
    /// The limit key. Each kind of limit has its own key space: the same
    /// key used by a rate and by a window names two separate states.
    pub key: &'a str,
    /// The limit.
    pub limit: Limit,
    /// Units charged (ignored by [`Limit::Concurrency`]).
    pub cost: u64,
}

/// One rule of an admitted request, settled: it was charged `reserved`
/// units and the request actually cost `actual`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement<'a> {
    /// The limit key, as charged.
    pub key: &'a str,
    /// The limit, as charged.
    pub limit: Limit,
    /// Units charged at admission.
    pub reserved: u64,
    /// Units the request really cost (ignored by [`Limit::Concurrency`],
    /// whose settlement releases the hold).
    pub actual: u64,
}

/// A [`Settlement`] that owns its key: for a caller that settles later (from
/// a `Drop`, say), and for the Redis store's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedSettlement {
    /// The limit key, as charged.
    pub key: String,
    /// The limit, as charged.
    pub limit: Limit,
    /// Units charged at admission.
    pub reserved: u64,
    /// Units the request really cost.
    pub actual: u64,
}

impl OwnedSettlement {
    /// The borrowed form.
    pub fn as_settlement(&self) -> Settlement<'_> {
        Settlement {
            key: &self.key,
            limit: self.limit,
            reserved: self.reserved,
            actual: self.actual,
        }
    }
}

impl From<&Settlement<'_>> for OwnedSettlement {
    fn from(s: &Settlement<'_>) -> OwnedSettlement {
        OwnedSettlement {
            key: s.key.to_owned(),
            limit: s.limit,
            reserved: s.reserved,
            actual: s.actual,
        }
    }
}

/// One request's usage, added to the ledger at settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerEntry<'a> {
    /// The day the usage is booked on, `YYYY-MM-DD` (the caller's choice of
    /// time zone, UTC by convention). An entry with any other form of day is
    /// dropped (with a warning) by both stores.
    pub day: &'a str,
    /// Who made the request.
    pub principal: &'a str,
    /// The principal's tenant (empty when none).
    pub tenant: &'a str,
    /// The model served.
    pub model: &'a str,
    /// What the request used.
    pub usage: LedgerUsage,
}

/// A [`LedgerEntry`] that owns its strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedLedgerEntry {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Who made the request.
    pub principal: String,
    /// The principal's tenant.
    pub tenant: String,
    /// The model served.
    pub model: String,
    /// What the request used.
    pub usage: LedgerUsage,
}

impl OwnedLedgerEntry {
    /// The borrowed form.
    pub fn as_entry(&self) -> LedgerEntry<'_> {
        LedgerEntry {
            day: &self.day,
            principal: &self.principal,
            tenant: &self.tenant,
            model: &self.model,
            usage: self.usage,
        }
    }
}

impl From<&LedgerEntry<'_>> for OwnedLedgerEntry {
    fn from(e: &LedgerEntry<'_>) -> OwnedLedgerEntry {
        OwnedLedgerEntry {
            day: e.day.to_owned(),
            principal: e.principal.to_owned(),
            tenant: e.tenant.to_owned(),
            model: e.model.to_owned(),
            usage: e.usage,
        }
    }
}

/// Usage totals: of one request, or summed in the ledger. Each figure is
/// capped at `i64::MAX` (Redis's integer range), per entry and in total.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerUsage {
    /// Requests.
    pub requests: u64,
    /// Input (prompt) tokens.
    pub input_tokens: u64,
    /// Output (completion) tokens.
    pub output_tokens: u64,
    /// Upstream compute time, in nanoseconds.
    pub compute_ns: u64,
    /// Cost, in millionths of a dollar.
    pub micro_dollars: u64,
}

/// The largest ledger figure: Redis's `HINCRBY` works in signed 64 bits.
const LEDGER_MAX: u64 = i64::MAX as u64;

impl LedgerUsage {
    /// Adds `other`, each figure saturating at `i64::MAX`.
    pub fn add(&mut self, other: &LedgerUsage) {
        let add = |a: u64, b: u64| a.saturating_add(b.min(LEDGER_MAX)).min(LEDGER_MAX);
        self.requests = add(self.requests, other.requests);
        self.input_tokens = add(self.input_tokens, other.input_tokens);
        self.output_tokens = add(self.output_tokens, other.output_tokens);
        self.compute_ns = add(self.compute_ns, other.compute_ns);
        self.micro_dollars = add(self.micro_dollars, other.micro_dollars);
    }

    /// The figures with their names, in a fixed order (the Redis store's
    /// field suffixes).
    pub(crate) fn metrics(&self) -> [(&'static str, u64); 5] {
        [
            ("requests", self.requests.min(LEDGER_MAX)),
            ("input_tokens", self.input_tokens.min(LEDGER_MAX)),
            ("output_tokens", self.output_tokens.min(LEDGER_MAX)),
            ("compute_ns", self.compute_ns.min(LEDGER_MAX)),
            ("micro_dollars", self.micro_dollars.min(LEDGER_MAX)),
        ]
    }

    /// Sets the figure called `name` (see [`LedgerUsage::metrics`]); false
    /// for an unknown name.
    pub(crate) fn set(&mut self, name: &str, value: u64) -> bool {
        let slot = match name {
            "requests" => &mut self.requests,
            "input_tokens" => &mut self.input_tokens,
            "output_tokens" => &mut self.output_tokens,
            "compute_ns" => &mut self.compute_ns,
            "micro_dollars" => &mut self.micro_dollars,
            _ => return false,
        };
        *slot = value;
        true
    }
}

/// The ledger's totals for one day, principal, tenant and model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Who made the requests.
    pub principal: String,
    /// The principal's tenant.
    pub tenant: String,
    /// The model served.
    pub model: String,
    /// Their total usage.
    pub usage: LedgerUsage,
}

/// Whether `day` is a real date written `YYYY-MM-DD`: the only form the
/// ledger books, so that day ranges compare as strings and as dates alike.
pub(crate) fn valid_day(day: &str) -> bool {
    parse_day(day).is_some()
}

/// `day` as a date, when it is one written `YYYY-MM-DD`.
pub(crate) fn parse_day(day: &str) -> Option<jiff::civil::Date> {
    if day.len() != 10 {
        return None;
    }
    let date: jiff::civil::Date = day.parse().ok()?;
    // Only the canonical form: no other spelling of the same date.
    (date.to_string() == day).then_some(date)
}

/// Who a ledger total belongs to, as one string: each of principal, tenant
/// and model as its length in bytes, a colon and itself (`5:alice4:acme6:gpt-4o`).
/// Length prefixes make the encoding unambiguous whatever the names contain.
/// The Redis store appends the figure's name to make a hash field.
pub(crate) fn ledger_field(principal: &str, tenant: &str, model: &str) -> String {
    let mut field = String::with_capacity(principal.len() + tenant.len() + model.len() + 12);
    for part in [principal, tenant, model] {
        field.push_str(&part.len().to_string());
        field.push(':');
        field.push_str(part);
    }
    field
}

/// Splits a [`ledger_field`] (plus whatever follows it) into principal,
/// tenant, model and the rest; `None` when it is not one.
pub(crate) fn parse_ledger_field(field: &str) -> Option<(&str, &str, &str, &str)> {
    fn part(s: &str) -> Option<(&str, &str)> {
        let (len, rest) = s.split_once(':')?;
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) || (len.len() > 1 && len.starts_with('0')) {
            return None;
        }
        let len: usize = len.parse().ok()?;
        // `get` is None past the end or inside a character.
        Some((rest.get(..len)?, rest.get(len..)?))
    }
    let (principal, rest) = part(field)?;
    let (tenant, rest) = part(rest)?;
    let (model, rest) = part(rest)?;
    Some((principal, tenant, model, rest))
}

const SPAN_MAX: i64 = 1 << 52;

/// `window_end_ns − now` as a signed span, clamped to ±2^52 ns. The Redis
/// script computes the same from seconds and nanoseconds apart.
pub(crate) fn until_ns(window_end_ns: u64, now: u64) -> i64 {
    let d = i128::from(window_end_ns) - i128::from(now);
    // In range after the clamp.
    i64::try_from(d.clamp(-i128::from(SPAN_MAX), i128::from(SPAN_MAX))).unwrap_or(0)
}

/// [`WINDOW_GRACE`] in ns.
pub(crate) const WINDOW_GRACE_NS: i64 = 60_000_000_000;

/// Whether a window `until` ns from its end still counts its usage.
pub(crate) fn window_live(until: i64) -> bool {
    until > -WINDOW_GRACE_NS
}

/// The verdict of a window with `used` units on a charge of `cost`, `until`
/// ns before its end; when allowed, the usage after the charge.
pub(crate) fn window_decide(limit: u64, used: u64, until: i64, cost: u64) -> (Outcome, Option<u64>) {
    let limit = limit.min(MAX_UNITS);
    let cost = cost.min(MAX_UNITS + 1);
    let reset = Duration::from_nanos(u64::try_from(until.max(0)).unwrap_or(0));
    let remaining = limit.saturating_sub(used);
    let refused = |retry_after| {
        (
            Outcome {
                allowed: false,
                remaining,
                reset_after: reset,
                retry_after,
            },
            None,
        )
    };
    if cost > limit {
        return refused(None);
    }
    // Never sums past 2^53: compare against what is left instead.
    if used > limit || cost > limit - used {
        return refused(Some(reset));
    }
    let used = used + cost;
    (
        Outcome {
            allowed: true,
            remaining: limit - used,
            reset_after: reset,
            retry_after: Some(Duration::ZERO),
        },
        Some(used),
    )
}

/// A window's usage after a settlement: refunds stop at zero, overcharges
/// are kept (the window may go into debt), up to [`MAX_UNITS`].
pub(crate) fn window_settle(used: u64, reserved: u64, actual: u64) -> u64 {
    let used = i128::from(used.min(MAX_UNITS));
    let delta = i128::from(actual.min(MAX_UNITS)) - i128::from(reserved.min(MAX_UNITS));
    u64::try_from((used + delta).clamp(0, i128::from(MAX_UNITS))).unwrap_or(0)
}

/// A lease in whole microseconds: rounded up, at least 1, at most
/// [`MAX_LEASE`].
pub(crate) fn lease_us(lease: Duration) -> u64 {
    let us = lease.as_nanos().div_ceil(1000);
    u64::try_from(us).unwrap_or(u64::MAX).clamp(1, 1 << 42)
}

/// The verdict of a concurrency limit with `count` live holds, `held`
/// telling whether this request's hold id already has one (a second charge
/// on the same key by the same request takes no second hold, and is
/// allowed); when allowed, the count after.
pub(crate) fn concurrency_decide(max: u64, count: u64, held: bool) -> (Outcome, Option<u64>) {
    let max = max.min(MAX_UNITS);
    if held || count < max {
        let after = if held { count } else { count + 1 };
        return (
            Outcome {
                allowed: true,
                remaining: max.saturating_sub(after),
                reset_after: Duration::ZERO,
                retry_after: Some(Duration::ZERO),
            },
            Some(after),
        );
    }
    (
        Outcome {
            allowed: false,
            remaining: max.saturating_sub(count),
            reset_after: Duration::ZERO,
            // A limit of zero never admits anyone: waiting cannot help.
            retry_after: (max > 0).then_some(CONCURRENCY_RETRY_AFTER),
        },
        None,
    )
}

/// What a concurrency rule that would have allowed reports when another
/// rule refused the request: its state, without this request's hold.
pub(crate) fn concurrency_state(max: u64, count: u64) -> Outcome {
    let max = max.min(MAX_UNITS);
    Outcome {
        allowed: true,
        remaining: max.saturating_sub(count),
        reset_after: Duration::ZERO,
        retry_after: Some(Duration::ZERO),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn spans_are_clamped() {
        assert_eq!(until_ns(10, 3), 7);
        assert_eq!(until_ns(3, 10), -7);
        assert_eq!(until_ns(u64::MAX, 0), 1 << 52);
        assert_eq!(until_ns(0, u64::MAX), -(1 << 52));
        assert!(window_live(0) && window_live(-WINDOW_GRACE_NS + 1));
        assert!(!window_live(-WINDOW_GRACE_NS));
        assert_eq!(WINDOW_GRACE_NS as u128, WINDOW_GRACE.as_nanos());
    }

    #[test]
    fn windows_refuse_at_the_limit() {
        let (o, used) = window_decide(10, 7, 5_000, 3);
        assert!(o.allowed);
        assert_eq!((o.remaining, used), (0, Some(10)));
        assert_eq!(o.reset_after, Duration::from_nanos(5_000));
        let (o, used) = window_decide(10, 10, 5_000, 1);
        assert!(!o.allowed && used.is_none());
        assert_eq!(o.retry_after, Some(Duration::from_nanos(5_000)));
        // Never: more than the whole window.
        assert_eq!(window_decide(10, 0, 5_000, 11).0.retry_after, None);
        assert_eq!(window_decide(u64::MAX, 0, 1, u64::MAX).0.retry_after, None);
        // In debt: even a charge of nothing is refused.
        assert!(!window_decide(10, 12, 1, 0).0.allowed);
    }

    #[test]
    fn window_settlement_refunds_and_keeps_debt() {
        assert_eq!(window_settle(10, 8, 3), 5);
        assert_eq!(window_settle(2, 8, 0), 0, "never below zero");
        assert_eq!(window_settle(10, 1, 9), 18, "debt");
        assert_eq!(window_settle(MAX_UNITS, 0, u64::MAX), MAX_UNITS);
    }

    #[test]
    fn concurrency_counts_holds() {
        assert!(concurrency_decide(2, 1, false).0.allowed);
        let (o, after) = concurrency_decide(2, 2, false);
        assert!(!o.allowed && after.is_none());
        assert_eq!(o.retry_after, Some(CONCURRENCY_RETRY_AFTER));
        let (o, after) = concurrency_decide(2, 2, true);
        assert!(o.allowed);
        assert_eq!((o.remaining, after), (0, Some(2)));
        assert_eq!(concurrency_decide(0, 0, false).0.retry_after, None);
        assert_eq!(lease_us(Duration::from_nanos(1)), 1);
        assert_eq!(lease_us(Duration::from_nanos(1001)), 2);
        assert_eq!(lease_us(Duration::ZERO), 1);
        assert_eq!(lease_us(Duration::MAX), 1 << 42);
    }

    #[test]
    fn days_are_canonical() {
        assert!(valid_day("2026-03-01"));
        for bad in [
            "2026-3-01",
            "20260301",
            "2026-02-30",
            "2026-03-01T00",
            "",
            "+02026-03-01",
        ] {
            assert!(!valid_day(bad), "{bad}");
        }
    }

    #[test]
    fn ledger_fields_are_unambiguous() {
        for (p, t, m) in [
            ("alice", "acme", "gpt-4o"),
            ("", "", ""),
            ("a:1:b", "3:x", "\u{1f}é"),
            ("12:", "0:", ":"),
        ] {
            let field = format!("{}requests", ledger_field(p, t, m));
            assert_eq!(parse_ledger_field(&field), Some((p, t, m, "requests")), "{field}");
        }
        assert_eq!(ledger_field("alice", "acme", "m"), "5:alice4:acme1:m");
        for bad in ["", "5:abc", "x:a1:b1:c", "01:a1:b1:c", "1:a1:b", "1:\u{e9}1:b1:c"] {
            assert_eq!(parse_ledger_field(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ledger_figures_saturate() {
        let mut u = LedgerUsage {
            requests: 1,
            ..LedgerUsage::default()
        };
        u.add(&LedgerUsage {
            requests: u64::MAX,
            micro_dollars: 5,
            ..LedgerUsage::default()
        });
        assert_eq!(u.requests, i64::MAX as u64);
        assert_eq!(u.micro_dollars, 5);
        let mut v = LedgerUsage::default();
        for (name, value) in u.metrics() {
            assert!(v.set(name, value));
        }
        assert_eq!(u, v);
        assert!(!v.set("bogus", 1));
    }
}
