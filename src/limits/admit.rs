//! The admit stage: every rule that applies to a request decided at once,
//! the estimate reserved, and the reservation settled with what the request
//! really used when its response ends.
//!
//! A [`Limiter`] lives as long as the process (it survives reloads, or the
//! in-memory counts would reset on every SIGHUP); the rules it applies come
//! from the configuration snapshot each request holds. An [`Admission`] is
//! the receipt of one request's reservation: settled exactly once, by
//! [`Admission::settle`] when the response ends or by its `Drop` when the
//! request is abandoned, so no path leaves a reservation behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::cost::{self, Prices};
use super::gcra::Outcome;
use super::memory::MemoryStore;
use super::redis::RedisStore;
use super::rules::{Demand, FailMode, Kind, LimitsConfig, RedisSettings, Rule, Subject, Unit};
use super::store::{Charge, LedgerEntry, LedgerRow, LedgerUsage, Limit, Settlement};

/// How long a concurrency hold lives in Redis without being released: far
/// longer than any request, short enough that a crashed instance's holds
/// come back within minutes.
const CONCURRENCY_LEASE: Duration = Duration::from_secs(15 * 60);

/// Where limit state lives, for the life of the process.
pub struct Limiter {
    /// In-process state: the store when there is no Redis, and the
    /// per-instance fallback when Redis cannot be reached.
    local: MemoryStore,
    /// The shared store, when configured.
    shared: Option<(RedisSettings, RedisStore)>,
    /// Decisions taken on the local store because Redis failed.
    fallbacks: AtomicU64,
    /// Requests refused because Redis failed and a rule's mode is `deny`.
    fail_denials: AtomicU64,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            // Not the URL: it may carry a password.
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

/// One rule's verdict on one request, kept for the audit record and the
/// response headers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RuleOutcome {
    /// The rule's name.
    pub rule: String,
    /// Its unit.
    pub unit: &'static str,
    /// `rate`, `budget` or `concurrency`.
    pub kind: &'static str,
    /// Whether it allowed the request.
    pub allowed: bool,
    /// What the request was charged (reserved), in the unit's base quantity.
    pub cost: u64,
    /// The limit the client is told of.
    pub limit: u64,
    /// What is left now.
    pub remaining: u64,
    /// Milliseconds until the limit is full again.
    pub reset_ms: u64,
    /// Milliseconds after which the same request could pass; absent when
    /// it never can (it costs more than the limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// `local` when decided on this instance because Redis failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<&'static str>,
    /// The rule's window in seconds (a rate's period, a budget's calendar
    /// unit), for the IETF `RateLimit-Policy` field.
    #[serde(skip)]
    pub window_s: u64,
}

/// Why a request was not admitted, with every rule's verdict for the audit
/// record (nothing was charged: decisions are all or nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Every rule's verdict.
    pub outcomes: Vec<RuleOutcome>,
    /// The reason.
    pub reason: RefusalReason,
}

/// What refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusalReason {
    /// The rule at this index of `outcomes` refused.
    Limited {
        /// Index into the outcomes.
        index: usize,
        /// Whether it is a budget (OpenAI's `insufficient_quota`).
        quota: bool,
    },
    /// Redis could not be reached and this rule's fail mode is `deny`.
    StoreUnavailable {
        /// The rule.
        rule: String,
    },
}

impl Refusal {
    /// The refusing rule's verdict, when a rule refused.
    pub fn refused(&self) -> Option<&RuleOutcome> {
        match self.reason {
            RefusalReason::Limited { index, .. } => self.outcomes.get(index),
            RefusalReason::StoreUnavailable { .. } => None,
        }
    }
}

/// What the response showed of the usage, for settlement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observed {
    /// Whether the upstream answered at all.
    pub upstream_answered: bool,
    /// `usage.prompt_tokens`, when reported.
    pub prompt_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens`, when reported.
    pub cached_tokens: Option<u64>,
    /// `usage.completion_tokens`, when reported.
    pub completion_tokens: Option<u64>,
    /// Output tokens Warden counted in a stream itself.
    pub counted_output_tokens: Option<u64>,
    /// Time from forwarding to the end of the response.
    pub compute: Option<Duration>,
}

/// One charge as reserved, to settle later.
#[derive(Debug)]
struct Held {
    key: String,
    limit: Limit,
    unit: Unit,
    reserved: u64,
}

/// A request's reservation.
pub struct Admission {
    limiter: Arc<Limiter>,
    hold_id: String,
    held: Vec<Held>,
    /// Whether the held charges are on the local store (Redis failed).
    local: bool,
    /// Every rule's verdict.
    pub outcomes: Vec<RuleOutcome>,
    /// What was reserved.
    pub reserved: Demand,
    prices: Option<Prices>,
    /// Whether the request reached the upstream: an abandoned request is
    /// refunded only if it did not.
    forwarded: bool,
    ledger: Option<LedgerKey>,
    settled: bool,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("outcomes", &self.outcomes)
            .field("reserved", &self.reserved)
            .finish_non_exhaustive()
    }
}

/// Who the ledger credits a request's usage to.
#[derive(Debug, Clone)]
struct LedgerKey {
    principal: String,
    tenant: String,
    model: String,
}

/// Nanoseconds since the Unix epoch.
fn now_ns() -> u64 {
    u64::try_from(jiff::Timestamp::now().as_nanosecond()).unwrap_or(0)
}

/// Today in UTC, as the ledger's day.
fn ledger_day(now: jiff::Timestamp) -> String {
    now.strftime("%Y-%m-%d").to_string()
}

impl Limiter {
    /// A limiter on `settings`' Redis, or in memory only. A Redis that
    /// cannot be reached now does not stop the gateway: it is connected to
    /// when it comes up, and until then each rule follows its fail mode
    /// (logged here, counted per request).
    pub async fn new(settings: Option<&RedisSettings>) -> Result<Limiter, super::redis::RedisStoreError> {
        let shared = match settings {
            Some(s) => {
                let store = match tokio::time::timeout(
                    s.timeout.max(Duration::from_secs(1)),
                    RedisStore::connect(&s.url, &s.prefix),
                )
                .await
                {
                    Ok(Ok(store)) => store,
                    failed => {
                        let reason = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".to_owned(),
                        };
                        tracing::warn!(error = %reason, "the limit store cannot be reached: starting anyway; rules follow their fail modes until it can");
                        RedisStore::connect_lazy(&s.url, &s.prefix)?
                    }
                };
                Some((s.clone(), store))
            }
            None => None,
        };
        Ok(Limiter {
            local: MemoryStore::new(),
            shared,
            fallbacks: AtomicU64::new(0),
            fail_denials: AtomicU64::new(0),
        })
    }

    /// Whether this limiter serves `settings` (so a reload can keep it).
    pub fn serves(&self, settings: Option<&RedisSettings>) -> bool {
        self.shared.as_ref().map(|(s, _)| s) == settings
    }

    /// Round trips made to Redis, when the store is Redis.
    pub fn redis_round_trips(&self) -> Option<u64> {
        self.shared.as_ref().map(|(_, redis)| redis.round_trips())
    }

    /// Decisions taken locally because Redis failed, and requests denied
    /// for the same reason.
    pub fn fallback_counts(&self) -> (u64, u64) {
        (
            self.fallbacks.load(Ordering::Relaxed),
            self.fail_denials.load(Ordering::Relaxed),
        )
    }

    /// Reserves `demand` for `subject` against every rule of `config` that
    /// applies, all or nothing. `hold_id` is unique to the request.
    pub async fn admit(
        self: &Arc<Self>,
        config: &LimitsConfig,
        subject: &Subject<'_>,
        demand: Demand,
        prices: Option<Prices>,
        hold_id: &str,
    ) -> Result<Admission, Refusal> {
        let now = jiff::Timestamp::now();
        let rules: Vec<&Rule> = config.rules.iter().filter(|r| r.applies(subject)).collect();
        let mut held = Vec::with_capacity(rules.len());
        for rule in &rules {
            let kind = rule.kind_for(subject);
            let (limit, window) = match kind {
                Kind::Rate(rate) => (Limit::Rate(*rate), None),
                Kind::Budget { amount, per, tz } => {
                    let Some((label, end)) = per.window(now, tz) else {
                        // Only a date beyond the year 9999 gets here.
                        return Err(Refusal {
                            outcomes: Vec::new(),
                            reason: RefusalReason::StoreUnavailable {
                                rule: rule.name.clone(),
                            },
                        });
                    };
                    (
                        Limit::Window {
                            limit: *amount,
                            window_end_ns: end,
                        },
                        Some(label),
                    )
                }
                Kind::Concurrency(max) => (
                    Limit::Concurrency {
                        max: *max,
                        lease: CONCURRENCY_LEASE,
                    },
                    None,
                ),
            };
            let reserved = match kind {
                Kind::Concurrency(_) => 1,
                _ => rule.unit.of(&demand),
            };
            held.push(Held {
                key: rule.key_for(subject, window.as_deref()),
                limit,
                unit: rule.unit,
                reserved,
            });
        }
        let ledger = Some(LedgerKey {
            principal: subject.principal.to_owned(),
            tenant: subject.tenant.unwrap_or("").to_owned(),
            model: subject.model.to_owned(),
        });
        let mut admission = Admission {
            limiter: Arc::clone(self),
            hold_id: hold_id.to_owned(),
            held,
            local: false,
            outcomes: Vec::new(),
            reserved: demand,
            prices,
            forwarded: false,
            ledger,
            // Nothing is reserved until a store has admitted it.
            settled: true,
        };
        if admission.held.is_empty() {
            admission.settled = false;
            return Ok(admission);
        }
        let now_ns = u64::try_from(now.as_nanosecond()).unwrap_or(0);
        let (outcomes, local) = match &self.shared {
            None => (self.local.check_all(now_ns, hold_id, &charges(&admission.held)), false),
            Some((settings, redis)) => {
                let decided =
                    tokio::time::timeout(settings.timeout, redis.check_all(hold_id, &charges(&admission.held))).await;
                match decided {
                    Ok(Ok(outcomes)) => (outcomes, false),
                    failed => {
                        let reason = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".to_owned(),
                        };
                        if let Some(rule) = rules.iter().find(|r| r.fail == FailMode::Deny) {
                            tracing::warn!(error = %reason, rule = %rule.name, "limit store unreachable: refused by a fail-closed rule");
                            self.fail_denials.fetch_add(1, Ordering::Relaxed);
                            return Err(Refusal {
                                outcomes: Vec::new(),
                                reason: RefusalReason::StoreUnavailable {
                                    rule: rule.name.clone(),
                                },
                            });
                        }
                        tracing::warn!(error = %reason, "limit store unreachable: this instance's share of each limit applies");
                        self.fallbacks.fetch_add(1, Ordering::Relaxed);
                        // Every rule here is `local`: this instance's share.
                        let instances = u64::from(settings.instances.max(1));
                        let scaled: Vec<Held> = rules
                            .iter()
                            .zip(&admission.held)
                            .map(|(rule, h)| Held {
                                key: h.key.clone(),
                                limit: scale_limit(rule.kind_for(subject), h.limit, instances),
                                unit: h.unit,
                                reserved: h.reserved,
                            })
                            .collect();
                        let outcomes = self.local.check_all(now_ns, hold_id, &charges(&scaled));
                        admission.held = scaled;
                        (outcomes, true)
                    }
                }
            }
        };
        admission.local = local;
        admission.outcomes = rules
            .iter()
            .zip(&admission.held)
            .zip(&outcomes)
            .map(|((rule, h), o)| rule_outcome(rule, h, o, local))
            .collect();
        if let Some(index) = outcomes.iter().position(|o| !o.allowed) {
            let quota = matches!(admission.held[index].limit, Limit::Window { .. });
            // Nothing was charged (all or nothing): nothing to settle.
            return Err(Refusal {
                outcomes: std::mem::take(&mut admission.outcomes),
                reason: RefusalReason::Limited { index, quota },
            });
        }
        admission.settled = false;
        Ok(admission)
    }

    /// The usage ledger, days `from` to `to` inclusive (`YYYY-MM-DD`).
    pub async fn ledger(&self, from: &str, to: &str) -> Result<Vec<LedgerRow>, super::redis::RedisStoreError> {
        match &self.shared {
            Some((_, redis)) => redis.ledger(from, to).await,
            None => Ok(self.local.ledger(from, to)),
        }
    }

    /// Sends every queued settlement to Redis (at shutdown).
    pub async fn flush(&self) {
        if let Some((_, redis)) = &self.shared
            && let Err(e) = redis.flush().await
        {
            tracing::warn!(error = %e, "queued limit settlements could not be sent");
        }
    }
}

/// The store's view of the held charges.
fn charges(held: &[Held]) -> Vec<Charge<'_>> {
    held.iter()
        .map(|h| Charge {
            key: &h.key,
            limit: h.limit,
            cost: h.reserved,
        })
        .collect()
}

/// A rule's limit at `1 / instances` of its size, for the local fallback.
fn scale_limit(kind: &Kind, limit: Limit, instances: u64) -> Limit {
    if instances <= 1 {
        return limit;
    }
    match (kind.scaled(1, instances), limit) {
        (Kind::Rate(rate), _) => Limit::Rate(rate),
        (Kind::Budget { amount, .. }, Limit::Window { window_end_ns, .. }) => Limit::Window {
            limit: amount,
            window_end_ns,
        },
        (Kind::Concurrency(max), Limit::Concurrency { lease, .. }) => Limit::Concurrency { max, lease },
        (_, limit) => limit,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn rule_outcome(rule: &Rule, held: &Held, outcome: &Outcome, local: bool) -> RuleOutcome {
    let (kind, limit) = match held.limit {
        Limit::Rate(rate) => ("rate", rate.burst()),
        Limit::Window { limit, .. } => ("budget", limit),
        Limit::Concurrency { max, .. } => ("concurrency", max),
    };
    RuleOutcome {
        rule: rule.name.clone(),
        unit: rule.unit.as_str(),
        kind,
        allowed: outcome.allowed,
        cost: held.reserved,
        limit,
        remaining: outcome.remaining,
        reset_ms: millis(outcome.reset_after),
        retry_after_ms: outcome.retry_after.map(millis),
        fallback: local.then_some("local"),
        window_s: match &rule.kind {
            Kind::Rate(rate) => rate.period_ns().div_ceil(1_000_000_000),
            Kind::Budget { per, .. } => match per {
                super::rules::Calendar::Hour => 3_600,
                super::rules::Calendar::Day => 86_400,
                super::rules::Calendar::Month => 30 * 86_400,
            },
            Kind::Concurrency(_) => 0,
        },
    }
}

impl Admission {
    /// Marks the request as sent upstream: from here an abandoned request
    /// keeps its reservation, since the upstream may have done the work.
    pub fn forwarded(&mut self) {
        self.forwarded = true;
    }

    /// Whether the reservation was decided on this instance alone because
    /// the shared store could not be reached.
    pub fn decided_locally(&self) -> bool {
        self.local
    }

    /// Whether any rule counts this unit, so the caller knows whether a
    /// stream must be metered against the reservation.
    pub fn counts(&self, units: &[Unit]) -> bool {
        self.held.iter().any(|h| units.contains(&h.unit))
    }

    /// Settles the reservation with what the request really used, and adds
    /// it to the usage ledger.
    pub fn settle(mut self, observed: &Observed) {
        let actual = self.actual(observed);
        self.settle_with(actual);
    }

    /// What the request used: reported usage first, then Warden's own
    /// count, then the estimate (never less than what can be shown). A
    /// request the upstream never answered costs nothing but itself.
    pub fn actual(&self, observed: &Observed) -> Demand {
        let requests = self.reserved.requests;
        if !observed.upstream_answered {
            return Demand {
                requests,
                ..Demand::default()
            };
        }
        let input_tokens = observed.prompt_tokens.unwrap_or(self.reserved.input_tokens);
        let output_tokens = observed
            .completion_tokens
            .or(observed.counted_output_tokens)
            .unwrap_or(self.reserved.output_tokens);
        let compute = observed
            .compute
            .unwrap_or(Duration::from_millis(self.reserved.compute_ms));
        let micro_dollars = self.prices.map_or(0, |prices| {
            let usage = cost::Usage {
                prompt: input_tokens,
                cached_prompt: observed.cached_tokens.unwrap_or(0),
                completion: output_tokens,
            };
            cost::actual(&prices, usage)
                .total()
                .saturating_add(cost::compute(&prices, compute).total())
        });
        Demand {
            requests,
            input_tokens,
            output_tokens,
            compute_ms: millis(compute),
            micro_dollars,
        }
    }

    fn settle_with(&mut self, actual: Demand) {
        if self.settled {
            return;
        }
        self.settled = true;
        let settlements: Vec<Settlement<'_>> = self
            .held
            .iter()
            .map(|h| Settlement {
                key: &h.key,
                limit: h.limit,
                reserved: h.reserved,
                actual: match h.limit {
                    Limit::Concurrency { .. } => 0,
                    _ => h.unit.of(&actual),
                },
            })
            .collect();
        let now = jiff::Timestamp::now();
        let day = ledger_day(now);
        let ledger = self.ledger.as_ref().map(|k| LedgerEntry {
            day: &day,
            principal: &k.principal,
            tenant: &k.tenant,
            model: &k.model,
            usage: LedgerUsage {
                requests: actual.requests,
                input_tokens: actual.input_tokens,
                output_tokens: actual.output_tokens,
                compute_ns: actual.compute_ms.saturating_mul(1_000_000),
                micro_dollars: actual.micro_dollars,
            },
        });
        match (&self.limiter.shared, self.local) {
            (Some((_, redis)), false) => redis.settle(&self.hold_id, &settlements, ledger),
            _ => self.limiter.local.settle(now_ns(), &self.hold_id, &settlements, ledger),
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        // Abandoned before the upstream saw it: refund all but the request
        // itself. After: the upstream may have done the work, so the
        // estimate stands (and concurrency holds are released either way).
        let actual = if self.forwarded {
            self.reserved
        } else {
            Demand {
                requests: self.reserved.requests,
                ..Demand::default()
            }
        };
        self.settle_with(actual);
    }
}

/// A request's estimated demand, and whether its body was changed to make
/// the estimate hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// What to reserve.
    pub demand: Demand,
    /// Whether `max_tokens` or `stream_options.include_usage` was set, so
    /// the body must be serialized again before forwarding.
    pub rewritten: bool,
}

/// Estimates what `body` (an OpenAI request for `operation`, or `None` for
/// a request counted only as a request) will cost on `model`;
/// `prompt_tokens` is the prompt's count when already known. Tokens are
/// counted only when some rule counts tokens or dollars; then a request
/// that sets no output limit gets the model's default written into it, so
/// that the upstream stops where the reservation assumed, and a stream is
/// asked to report its usage.
pub fn estimate(
    config: &LimitsConfig,
    model: &super::rules::ModelLimits,
    operation: crate::route::Operation,
    stream: bool,
    prompt_tokens: Option<u64>,
    body: Option<&mut serde_json::Value>,
) -> Result<Estimate, crate::reject::Reject> {
    use crate::reject::Reject;
    use crate::route::Operation;
    let mut demand = Demand {
        requests: 1,
        compute_ms: millis(model.compute_estimate),
        ..Demand::default()
    };
    let mut rewritten = false;
    let counts = config.counts_tokens();
    if let Some(body) = body.filter(|_| counts) {
        let text_op = matches!(
            operation,
            Operation::ChatCompletions | Operation::Completions | Operation::Embeddings
        );
        if text_op {
            let param = match operation {
                Operation::ChatCompletions => "messages",
                Operation::Completions => "prompt",
                _ => "input",
            };
            // Counted once: validation may have done it already.
            demand.input_tokens = match prompt_tokens {
                Some(n) => n,
                None => {
                    super::tokens::count_request(&model.tokenizer, operation, body)
                        .map_err(|e| Reject::InvalidField {
                            param,
                            message: e.to_string(),
                        })?
                        .tokens
                }
            };
            let bad_limit = |e: super::cost::MaxTokensError| Reject::InvalidField {
                param: "max_tokens",
                message: e.to_string(),
            };
            demand.output_tokens =
                super::cost::output_estimate(operation, body, model.default_max_tokens).map_err(bad_limit)?;
            rewritten |= super::cost::apply_default_max_tokens(
                operation,
                body,
                model.max_tokens_field,
                model.default_max_tokens,
            )
            .map_err(bad_limit)?;
            if stream && operation != Operation::Embeddings {
                rewritten |= ask_for_stream_usage(body);
            }
        }
    }
    if let Some(prices) = &model.prices {
        demand.micro_dollars = cost::estimate(prices, demand.input_tokens, demand.output_tokens)
            .total()
            .saturating_add(cost::compute(prices, model.compute_estimate).total());
    }
    Ok(Estimate { demand, rewritten })
}

/// Sets `stream_options.include_usage: true`; returns whether it changed
/// anything.
fn ask_for_stream_usage(body: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    let Some(object) = body.as_object_mut() else {
        return false;
    };
    let options = object
        .entry("stream_options")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    if !options.is_object() {
        // Not an object: the upstream will refuse it as it is; leave it.
        return false;
    }
    match options.get("include_usage") {
        Some(Value::Bool(true)) => false,
        _ => {
            if let Some(o) = options.as_object_mut() {
                o.insert("include_usage".to_owned(), Value::Bool(true));
            }
            true
        }
    }
}
