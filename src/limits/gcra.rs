//! The generic cell rate algorithm (GCRA), over controlled time.
//!
//! A limit is `amount` units per `period`, with up to `burst` units at once.
//! Each unit "costs" one emission interval `T = ceil(period / amount)`
//! nanoseconds; the state of a limit is one number, its theoretical arrival
//! time (TAT): the instant at which the limit would be full again. A charge
//! of `cost` units is admitted when, after moving the TAT forward by
//! `cost × T`, it lies no further than the tolerance `τ = burst × T` ahead of
//! now. A TAT in the past means a full limit, so a fresh limit is TAT 0.
//!
//! Everything is integer nanoseconds since an epoch the caller chooses, and
//! every function here is pure. The Redis store runs the same arithmetic in
//! Lua, whose numbers are doubles: integers are exact there only below 2^53.
//! [`Rate::new`] therefore keeps `τ` at or below [`MAX_TOLERANCE_NS`] (2^52 ns,
//! about 52 days), and the state never runs more than `2τ` ahead of now, so
//! every relative quantity fits; only absolute instants are larger, and the
//! script handles those as seconds and nanoseconds separately.

use std::time::Duration;

/// The largest tolerance (`burst × emission interval`) a [`Rate`] may have:
/// 2^52 ns, about 52 days, so that `2τ` is still exact in a Lua double.
pub const MAX_TOLERANCE_NS: u64 = 1 << 52;

/// Why a [`Rate`] cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// `amount`, `burst` or `period` is zero.
    #[error("a rate needs a non-zero amount, period and burst")]
    Zero,
    /// The period does not fit in 64-bit nanoseconds.
    #[error("the period is too long")]
    PeriodTooLong,
    /// `burst × emission interval` exceeds [`MAX_TOLERANCE_NS`].
    #[error("burst × (period / amount) exceeds about 52 days")]
    ToleranceTooLong,
}

/// A limit: `amount` units per `period`, at most `burst` units at once.
///
/// Units are whatever the caller counts: requests, tokens, micro-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    amount: u64,
    period_ns: u64,
    burst: u64,
    /// Nanoseconds per unit, rounded up: rounding up can only make the limit
    /// slightly stricter than configured, never looser.
    interval_ns: u64,
}

impl Rate {
    /// A rate of `amount` units per `period` with bursts of up to `burst`.
    pub fn new(amount: u64, period: Duration, burst: u64) -> Result<Rate, RateError> {
        let period_ns = u64::try_from(period.as_nanos()).map_err(|_| RateError::PeriodTooLong)?;
        if amount == 0 || burst == 0 || period_ns == 0 {
            return Err(RateError::Zero);
        }
        let interval_ns = period_ns.div_ceil(amount);
        match burst.checked_mul(interval_ns) {
            Some(tau) if tau <= MAX_TOLERANCE_NS => Ok(Rate {
                amount,
                period_ns,
                burst,
                interval_ns,
            }),
            _ => Err(RateError::ToleranceTooLong),
        }
    }

    /// Units per period.
    pub fn amount(&self) -> u64 {
        self.amount
    }

    /// The period, in nanoseconds.
    pub fn period_ns(&self) -> u64 {
        self.period_ns
    }

    /// The most units admitted at once.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Nanoseconds per unit (`ceil(period / amount)`).
    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    /// `burst × interval`: how far ahead of now the TAT may be after a charge.
    pub fn tolerance_ns(&self) -> u64 {
        // Cannot overflow: checked in `new`.
        self.burst * self.interval_ns
    }
}

/// The verdict of one limit on one charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the charge fits.
    pub allowed: bool,
    /// Units that could still be charged right now, after this decision.
    pub remaining: u64,
    /// Time until the limit is full again (the TAT minus now).
    pub reset_after: Duration,
    /// `Some(ZERO)` when allowed; `Some(d)` when the same charge would fit
    /// after `d`; `None` when it never can, because the cost exceeds the burst.
    pub retry_after: Option<Duration>,
}

/// An [`Outcome`] and the TAT to store: the new one when allowed, the old
/// one (unchanged) when refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The verdict.
    pub outcome: Outcome,
    /// The state after the decision.
    pub tat: u64,
}

/// Charges `cost` units at `now` against a limit whose state is `tat`: all
/// or nothing. A cost of 0 reports the state without changing it.
pub fn check(rate: &Rate, tat: u64, now: u64, cost: u64) -> Decision {
    let t = rate.interval_ns;
    let tau = rate.tolerance_ns();
    // How far ahead of now the limit is committed; a TAT in the past is a
    // full limit, so it never counts below now (no credit for idle time
    // beyond one burst).
    let ahead = tat.saturating_sub(now);
    let refused = |retry_after: Option<Duration>| Decision {
        outcome: Outcome {
            allowed: false,
            remaining: tau.saturating_sub(ahead) / t,
            reset_after: Duration::from_nanos(ahead),
            retry_after,
        },
        tat,
    };
    if cost > rate.burst {
        return refused(None);
    }
    // `cost × t ≤ τ`, so no overflow; comparing against `τ − inc` rather
    // than summing keeps the Lua side within exact doubles.
    let inc = cost * t;
    if ahead > tau - inc {
        return refused(Some(Duration::from_nanos(ahead - (tau - inc))));
    }
    let ahead = ahead + inc;
    Decision {
        outcome: Outcome {
            allowed: true,
            remaining: (tau - ahead) / t,
            reset_after: Duration::from_nanos(ahead),
            retry_after: Some(Duration::ZERO),
        },
        tat: now.saturating_add(ahead),
    }
}

/// Settles a reservation: a request was admitted with `reserved` units and
/// turned out to cost `actual`. Moves the TAT by `(actual − reserved) × T`
/// and returns the new TAT.
///
/// A refund never takes the TAT below `now`: a TAT in the past already means
/// a full limit, and going further would mint burst beyond `burst`. An
/// overcharge is kept as debt, but at most `2τ` ahead of now, so one
/// mis-estimated request can lock a limit for at most two bursts' worth of
/// time. `reserved` and `actual` are capped at `2 × burst` for the same
/// reason (and to keep the Lua arithmetic exact).
pub fn settle(rate: &Rate, tat: u64, now: u64, reserved: u64, actual: u64) -> u64 {
    let t = i128::from(rate.interval_ns);
    let cap = rate.burst.saturating_mul(2);
    let delta = i128::from(actual.min(cap)) - i128::from(reserved.min(cap));
    let ahead = i128::from(tat.saturating_sub(now)) + delta * t;
    let ahead = ahead.clamp(0, 2 * i128::from(rate.tolerance_ns()));
    // In range: 0 ≤ ahead ≤ 2^53.
    now.saturating_add(u64::try_from(ahead).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;
    /// A realistic epoch offset (2027 in Unix nanoseconds), so the tests
    /// exercise the same magnitudes as production.
    const T0: u64 = 1_800_000_000 * SEC;

    fn rate(amount: u64, period: Duration, burst: u64) -> Rate {
        Rate::new(amount, period, burst).unwrap()
    }

    #[test]
    fn invalid_rates_are_refused() {
        assert_eq!(Rate::new(0, Duration::from_secs(1), 1), Err(RateError::Zero));
        assert_eq!(Rate::new(1, Duration::ZERO, 1), Err(RateError::Zero));
        assert_eq!(Rate::new(1, Duration::from_secs(1), 0), Err(RateError::Zero));
        // One unit a day with a burst of a year's worth: τ too long.
        assert_eq!(
            Rate::new(1, Duration::from_secs(86_400), 365),
            Err(RateError::ToleranceTooLong)
        );
        // A month-long dollar budget fits.
        assert!(Rate::new(100_000_000, Duration::from_secs(31 * 86_400), 100_000_000).is_ok());
    }

    #[test]
    fn burst_admitted_then_refused() {
        let r = rate(10, Duration::from_secs(1), 5);
        let mut tat = 0;
        for i in 0..5 {
            let d = check(&r, tat, T0, 1);
            assert!(d.outcome.allowed, "request {i}");
            assert_eq!(d.outcome.remaining, 4 - i);
            tat = d.tat;
        }
        let d = check(&r, tat, T0, 1);
        assert!(!d.outcome.allowed);
        assert_eq!(d.tat, tat, "a refusal changes nothing");
        assert_eq!(d.outcome.remaining, 0);
        // One unit every 100 ms: the next fits in 100 ms.
        assert_eq!(d.outcome.retry_after, Some(Duration::from_millis(100)));
        assert_eq!(d.outcome.reset_after, Duration::from_millis(500));
    }

    #[test]
    fn sustained_rate_is_the_configured_rate() {
        let r = rate(10, Duration::from_secs(1), 1);
        let mut tat = 0;
        let mut admitted = 0;
        // A request every 10 ms for 10 s: 1000 tries, 10 per second admitted.
        for i in 0..1000 {
            let d = check(&r, tat, T0 + i * SEC / 100, 1);
            tat = d.tat;
            admitted += u64::from(d.outcome.allowed);
        }
        assert_eq!(admitted, 100);
    }

    #[test]
    fn recovers_after_waiting() {
        let r = rate(10, Duration::from_secs(1), 5);
        let mut tat = 0;
        for _ in 0..5 {
            tat = check(&r, tat, T0, 1).tat;
        }
        assert!(!check(&r, tat, T0, 1).outcome.allowed);
        // 300 ms later, three units have been emitted.
        let later = T0 + 300_000_000;
        let d = check(&r, tat, later, 3);
        assert!(d.outcome.allowed);
        assert!(!check(&r, d.tat, later, 1).outcome.allowed);
        // After a long idle time the limit is full, and no fuller.
        let d = check(&r, tat, T0 + 3600 * SEC, 0);
        assert_eq!(d.outcome.remaining, 5);
        assert!(!check(&r, tat, T0 + 3600 * SEC, 6).outcome.allowed);
    }

    #[test]
    fn cost_above_burst_is_never_allowed() {
        let r = rate(1000, Duration::from_secs(1), 100);
        let d = check(&r, 0, T0, 101);
        assert!(!d.outcome.allowed);
        assert_eq!(d.outcome.retry_after, None, "waiting cannot help");
        assert_eq!(d.outcome.remaining, 100);
        assert_eq!(d.tat, 0);
        // Huge costs do not overflow.
        assert_eq!(check(&r, 0, T0, u64::MAX).outcome.retry_after, None);
    }

    #[test]
    fn settle_refunds_down_to_now_at_most() {
        // Tokens: 1000 per second, burst 1000.
        let r = rate(1000, Duration::from_secs(1), 1000);
        let d = check(&r, 0, T0, 800);
        assert_eq!(d.outcome.remaining, 200);
        // Used only 300 of the 800 reserved: 500 come back.
        let tat = settle(&r, d.tat, T0, 800, 300);
        assert_eq!(check(&r, tat, T0, 0).outcome.remaining, 700);
        // A refund larger than what is committed stops at a full limit.
        let tat = settle(&r, tat, T0, 1000, 0);
        assert_eq!(tat, T0);
        assert_eq!(check(&r, tat, T0, 0).outcome.remaining, 1000);
        // Refunds after the limit recovered mint nothing.
        let d = check(&r, 0, T0, 1000);
        let tat = settle(&r, d.tat, T0 + 10 * SEC, 1000, 0);
        assert!(!check(&r, tat, T0 + 10 * SEC, 1001).outcome.allowed);
    }

    #[test]
    fn settle_overcharge_is_debt() {
        let r = rate(1000, Duration::from_secs(1), 1000);
        let d = check(&r, 0, T0, 100);
        // Used 1500 instead of 100: the limit is 600 units in debt.
        let tat = settle(&r, d.tat, T0, 100, 1500);
        assert_eq!(tat, T0 + 1_500_000_000);
        let d = check(&r, tat, T0, 1);
        assert!(!d.outcome.allowed);
        assert_eq!(d.outcome.remaining, 0);
        assert_eq!(d.outcome.retry_after, Some(Duration::from_millis(501)));
        // Debt is capped at two bursts ahead of now.
        let tat = settle(&r, tat, T0, 0, u64::MAX);
        assert_eq!(tat, T0 + 2 * SEC);
    }

    /// Amount, period (ns) and burst of a rate, then requests: time step,
    /// cost, and the actual cost it is settled to right away, if any.
    type Schedule = (u64, u64, u64, Vec<(u64, u64, Option<u64>)>);

    fn schedule() -> impl Strategy<Value = Schedule> {
        (
            1u64..50,
            1u64..5_000_000_000,
            1u64..20,
            prop::collection::vec((0u64..200_000_000, 0u64..25, prop::option::of(0u64..25)), 1..150),
        )
    }

    proptest! {
        /// In any window of length W, admitted units ≤ rate·W + burst.
        #[test]
        fn never_more_than_rate_times_window_plus_burst(
            (amount, period_ns, burst, reqs) in schedule()
        ) {
            let r = rate(amount, Duration::from_nanos(period_ns), burst);
            let mut tat = 0;
            let mut now = T0;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (step, cost, actual) in reqs {
                now += step;
                let d = check(&r, tat, now, cost);
                tat = d.tat;
                if d.outcome.allowed {
                    // A refund counts at the actual cost; an overcharge is
                    // debt paid by later requests, so it counts as reserved.
                    let mut charged = cost;
                    if let Some(actual) = actual {
                        tat = settle(&r, tat, now, cost, actual);
                        charged = cost.min(actual);
                    }
                    admitted.push((now, charged));
                }
            }
            for i in 0..admitted.len() {
                let mut units: u128 = 0;
                for j in i..admitted.len() {
                    units += u128::from(admitted[j].1);
                    let w = u128::from(admitted[j].0 - admitted[i].0);
                    // units ≤ amount·W/period + burst, in integers.
                    prop_assert!(
                        units * u128::from(period_ns)
                            <= u128::from(amount) * w + u128::from(burst) * u128::from(period_ns),
                        "{units} units in {w} ns"
                    );
                }
            }
        }
    }
}
