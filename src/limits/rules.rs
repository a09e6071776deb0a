//! The limit rules as the gateway runs them, checked from `limits:` in the
//! configuration (see `config::limits`): what each rule counts apart (its
//! key), in what unit, and how (a rate, a calendar budget or a concurrency
//! cap), with every variant it needs precomputed — scaled for high-value
//! models and for the per-instance share used when Redis is unreachable —
//! so that a request does no arithmetic on configuration.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use jiff::tz::TimeZone;

use super::gcra::Rate;

/// One dimension a rule counts apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyDim {
    /// The authenticated principal.
    Principal,
    /// The credential's id (an API key id, a token's `jti`-less subject…).
    ApiKey,
    /// The client address (after trusted proxies).
    ClientIp,
    /// The caller's tenant.
    Tenant,
    /// The model endpoint.
    Model,
    /// The caller's service tier.
    Tier,
}

impl KeyDim {
    /// The name used in configuration and in keys.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyDim::Principal => "principal",
            KeyDim::ApiKey => "api_key",
            KeyDim::ClientIp => "client_ip",
            KeyDim::Tenant => "tenant",
            KeyDim::Model => "model",
            KeyDim::Tier => "tier",
        }
    }
}

/// What a rule counts. Quantities are integers in the unit's base:
/// requests, tokens, milliseconds of compute, micro-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Requests.
    Requests,
    /// Input (prompt) tokens.
    InputTokens,
    /// Output (completion) tokens.
    OutputTokens,
    /// Input plus output tokens.
    TotalTokens,
    /// Upstream time, in milliseconds.
    ComputeSeconds,
    /// Cost, in micro-dollars.
    Dollars,
}

impl Unit {
    /// The name used in configuration, errors and the audit record.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::InputTokens => "input_tokens",
            Unit::OutputTokens => "output_tokens",
            Unit::TotalTokens => "total_tokens",
            Unit::ComputeSeconds => "compute_seconds",
            Unit::Dollars => "dollars",
        }
    }

    /// Whether OpenAI's `x-ratelimit-*-tokens` headers report this unit.
    pub fn is_tokens(self) -> bool {
        matches!(self, Unit::InputTokens | Unit::OutputTokens | Unit::TotalTokens)
    }

    /// The quantity of this unit in `demand`.
    pub fn of(self, demand: &Demand) -> u64 {
        match self {
            Unit::Requests => demand.requests,
            Unit::InputTokens => demand.input_tokens,
            Unit::OutputTokens => demand.output_tokens,
            Unit::TotalTokens => demand.input_tokens.saturating_add(demand.output_tokens),
            Unit::ComputeSeconds => demand.compute_ms,
            Unit::Dollars => demand.micro_dollars,
        }
    }
}

/// What one request asks for, or turned out to use, in every unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Demand {
    /// Requests: 1.
    pub requests: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Compute, in milliseconds.
    pub compute_ms: u64,
    /// Cost, in micro-dollars.
    pub micro_dollars: u64,
}

/// A calendar window of a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calendar {
    /// From one full hour to the next.
    Hour,
    /// From midnight to midnight.
    Day,
    /// From the first of the month to the first of the next.
    Month,
}

impl Calendar {
    /// The name used in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Calendar::Hour => "hour",
            Calendar::Day => "day",
            Calendar::Month => "month",
        }
    }

    /// The window holding `now` in `tz`: a label for the key (the window's
    /// start in local time) and its end in nanoseconds since the Unix epoch.
    pub fn window(self, now: jiff::Timestamp, tz: &TimeZone) -> Option<(String, u64)> {
        let local = now.to_zoned(tz.clone());
        let (start, label) = match self {
            Calendar::Hour => {
                let start = local.start_of_day().ok()?.with().hour(local.hour()).build().ok()?;
                let label = start.strftime("%Y-%m-%dT%H").to_string();
                (start, label)
            }
            Calendar::Day => {
                let start = local.start_of_day().ok()?;
                let label = start.strftime("%Y-%m-%d").to_string();
                (start, label)
            }
            Calendar::Month => {
                let start = local.first_of_month().ok()?.start_of_day().ok()?;
                let label = start.strftime("%Y-%m").to_string();
                (start, label)
            }
        };
        let span = match self {
            Calendar::Hour => jiff::Span::new().hours(1),
            Calendar::Day => jiff::Span::new().days(1),
            Calendar::Month => jiff::Span::new().months(1),
        };
        let end = start.checked_add(span).ok()?;
        let end_ns = u64::try_from(end.timestamp().as_nanosecond()).ok()?;
        Some((label, end_ns))
    }
}

/// How a rule limits.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// A GCRA rate with burst.
    Rate(Rate),
    /// At most `amount` per calendar window in `tz`.
    Budget {
        /// Units per window.
        amount: u64,
        /// The window.
        per: Calendar,
        /// Where the window's boundaries are.
        tz: TimeZone,
    },
    /// At most this many requests in flight.
    Concurrency(u64),
}

impl Kind {
    /// The amount a client is told is its limit: a rate's burst (what it may
    /// use at once), a budget's amount, a cap.
    pub fn limit(&self) -> u64 {
        match self {
            Kind::Rate(rate) => rate.burst(),
            Kind::Budget { amount, .. } => *amount,
            Kind::Concurrency(max) => *max,
        }
    }

    /// The same kind with every amount multiplied by `num / den`, never
    /// below 1 (a limit scaled to nothing would refuse everything).
    pub fn scaled(&self, num: u64, den: u64) -> Kind {
        let scale = |v: u64| (u128::from(v) * u128::from(num) / u128::from(den.max(1))).max(1);
        let scale = |v: u64| u64::try_from(scale(v)).unwrap_or(u64::MAX);
        match self {
            Kind::Rate(rate) => {
                let amount = scale(rate.amount());
                let burst = scale(rate.burst());
                // Scaling down keeps the tolerance at most what it was, so
                // this cannot fail; if it somehow did, keep the original.
                Rate::new(amount, Duration::from_nanos(rate.period_ns()), burst)
                    .map_or_else(|_| self.clone(), Kind::Rate)
            }
            Kind::Budget { amount, per, tz } => Kind::Budget {
                amount: scale(*amount),
                per: *per,
                tz: tz.clone(),
            },
            Kind::Concurrency(max) => Kind::Concurrency(scale(*max)),
        }
    }
}

/// What a rule does when the shared store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Refuse the request (503).
    Deny,
    /// Enforce this instance's share of the limit in memory.
    Local,
}

impl FailMode {
    /// The name used in configuration and the audit record.
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Deny => "deny",
            FailMode::Local => "local",
        }
    }
}

/// One checked rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Unique name.
    pub name: String,
    /// What is counted apart; empty for one global count.
    pub key: Vec<KeyDim>,
    /// What is counted.
    pub unit: Unit,
    /// The limit as configured, for standard models.
    pub kind: Kind,
    /// The limit for high-value models (`limits.high_value_factor`), or the
    /// same as `kind` when the rule is `high_value: unscaled`.
    pub kind_high_value: Kind,
    /// Only these models, when set.
    pub models: Option<HashSet<String>>,
    /// Only callers of these tiers, when set.
    pub tiers: Option<HashSet<String>>,
    /// When Redis cannot be reached.
    pub fail: FailMode,
    /// Whether high-value models are counted apart at a scaled limit.
    pub scale_high_value: bool,
}

/// Who is asking, for building rule keys and choosing rules.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The principal.
    pub principal: &'a str,
    /// The credential id, when the credential has one.
    pub api_key: Option<&'a str>,
    /// The client address.
    pub client_ip: std::net::IpAddr,
    /// The caller's tenant.
    pub tenant: Option<&'a str>,
    /// The model endpoint.
    pub model: &'a str,
    /// The caller's tier.
    pub tier: Option<&'a str>,
    /// Whether the model is `value_tier: high`.
    pub high_value: bool,
}

impl Rule {
    /// Whether the rule applies to this subject.
    pub fn applies(&self, subject: &Subject<'_>) -> bool {
        self.models.as_ref().is_none_or(|m| m.contains(subject.model))
            && self
                .tiers
                .as_ref()
                .is_none_or(|t| subject.tier.is_some_and(|tier| t.contains(tier)))
    }

    /// The limit for this subject's model.
    pub fn kind_for(&self, subject: &Subject<'_>) -> &Kind {
        if subject.high_value && self.scale_high_value {
            &self.kind_high_value
        } else {
            &self.kind
        }
    }

    /// The store key of this rule for `subject`: the rule's name, then each
    /// dimension's value, then (for a budget) the window's label. Values are
    /// escaped so that no value can forge another key's separators. A
    /// high-value model scaled by this rule always counts apart per model:
    /// its tighter limit must not share a count with other models.
    pub fn key_for(&self, subject: &Subject<'_>, window: Option<&str>) -> String {
        let mut key = String::with_capacity(64);
        push_escaped(&mut key, &self.name);
        let mut dims = self.key.clone();
        if subject.high_value && self.scale_high_value && !dims.contains(&KeyDim::Model) {
            dims.push(KeyDim::Model);
        }
        for dim in dims {
            key.push('|');
            key.push_str(dim.as_str());
            key.push('=');
            match dim {
                KeyDim::Principal => push_escaped(&mut key, subject.principal),
                KeyDim::ApiKey => push_optional(&mut key, subject.api_key),
                KeyDim::ClientIp => {
                    let _ = write!(key, "{}", subject.client_ip);
                }
                KeyDim::Tenant => push_optional(&mut key, subject.tenant),
                KeyDim::Model => push_escaped(&mut key, subject.model),
                KeyDim::Tier => push_optional(&mut key, subject.tier),
            }
        }
        if let Some(window) = window {
            key.push_str("|w=");
            key.push_str(window);
        }
        key
    }
}

/// Appends a value, or `-` for none (a value of `-` itself is escaped).
fn push_optional(out: &mut String, value: Option<&str>) {
    match value {
        Some(value) => push_escaped(out, value),
        None => out.push('-'),
    }
}

/// Appends `value` with `%`, `|` and `=` percent-encoded, and a lone `-`
/// (the placeholder for "none") encoded too, so every key is unambiguous.
fn push_escaped(out: &mut String, value: &str) {
    if value == "-" {
        out.push_str("%2D");
        return;
    }
    for c in value.chars() {
        match c {
            '%' => out.push_str("%25"),
            '|' => out.push_str("%7C"),
            '=' => out.push_str("%3D"),
            c => out.push(c),
        }
    }
}

/// A model endpoint's concurrency capacity and wait queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    /// Requests in flight to the upstream at once.
    pub concurrency: usize,
    /// Requests that may wait.
    pub queue: usize,
    /// Longest wait.
    pub queue_timeout: Duration,
    /// 429 or 503 for a full queue or a timed-out wait.
    pub status: http::StatusCode,
}

/// A model's settings for limits: how its requests are counted and priced.
#[derive(Debug, Clone)]
pub struct ModelLimits {
    /// Counts its input tokens.
    pub tokenizer: super::tokens::Tokenizer,
    /// Its prices; `None` costs nothing.
    pub prices: Option<super::cost::Prices>,
    /// Output tokens reserved (and set as the request's limit) when the
    /// request sets none.
    pub default_max_tokens: u64,
    /// Which field Warden writes the default into.
    pub max_tokens_field: super::cost::MaxTokensField,
    /// Compute reserved before the real duration is known.
    pub compute_estimate: Duration,
    /// Concurrency capacity with a fair queue, if any.
    pub capacity: Option<Capacity>,
}

impl Default for ModelLimits {
    fn default() -> Self {
        ModelLimits {
            tokenizer: super::tokens::Tokenizer::O200kBase,
            prices: None,
            default_max_tokens: DEFAULT_MAX_TOKENS,
            max_tokens_field: super::cost::MaxTokensField::MaxTokens,
            compute_estimate: Duration::from_secs(1),
            capacity: None,
        }
    }
}

/// Output tokens reserved for a request that sets no limit of its own.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The Redis store's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://…`.
    pub url: String,
    /// Key prefix (hash tag).
    pub prefix: String,
    /// Instances sharing it: the divisor of `local` fallback limits.
    pub instances: u32,
    /// Time allowed for one decision.
    pub timeout: Duration,
}

/// The checked `limits:` section.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// The shared store, or `None` for memory.
    pub redis: Option<RedisSettings>,
    /// Every rule, tier rules included (with their tier filter).
    pub rules: Vec<Rule>,
    /// Fair-queuing weight by tier name.
    pub tier_weights: HashMap<String, u32>,
    /// Whether the IETF `RateLimit-Policy`/`RateLimit` fields are sent.
    pub ietf_headers: bool,
}

impl LimitsConfig {
    /// The fair-queuing weight of a tier: its configured weight, else 1.
    pub fn weight(&self, tier: Option<&str>) -> u32 {
        tier.and_then(|t| self.tier_weights.get(t)).copied().unwrap_or(1)
    }

    /// Whether any rule counts tokens or dollars, which needs the request's
    /// tokens counted.
    pub fn counts_tokens(&self) -> bool {
        self.rules.iter().any(|r| r.unit.is_tokens() || r.unit == Unit::Dollars)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn subject<'a>(principal: &'a str, tenant: Option<&'a str>) -> Subject<'a> {
        Subject {
            principal,
            api_key: Some("k1"),
            client_ip: "10.0.0.1".parse().unwrap(),
            tenant,
            model: "m",
            tier: Some("free"),
            high_value: false,
        }
    }

    fn rule(key: Vec<KeyDim>) -> Rule {
        let kind = Kind::Rate(Rate::new(10, Duration::from_secs(60), 10).unwrap());
        Rule {
            name: "r".into(),
            key,
            unit: Unit::Requests,
            kind_high_value: kind.scaled(1, 4),
            kind,
            models: None,
            tiers: None,
            fail: FailMode::Local,
            scale_high_value: true,
        }
    }

    #[test]
    fn keys_cannot_be_forged_by_values() {
        let r = rule(vec![KeyDim::Principal, KeyDim::Tenant]);
        let a = r.key_for(&subject("a|tenant=b", Some("c")), None);
        let b = r.key_for(&subject("a", Some("b|tenant=c")), None);
        assert_ne!(a, b);
        assert_eq!(a, "r|principal=a%7Ctenant%3Db|tenant=c");
        // "none" and a tenant literally named "-" are different keys.
        assert_ne!(
            r.key_for(&subject("a", None), None),
            r.key_for(&subject("a", Some("-")), None)
        );
    }

    #[test]
    fn high_value_models_count_apart_at_the_scaled_limit() {
        let r = rule(vec![KeyDim::ApiKey]);
        let mut s = subject("a", None);
        let standard = r.key_for(&s, None);
        s.high_value = true;
        assert_eq!(r.key_for(&s, None), format!("{standard}|model=m"));
        assert_eq!(r.kind_for(&s).limit(), 2, "10 scaled by 1/4, rounded down");
        assert_eq!(
            Kind::Concurrency(3).scaled(1, 10),
            Kind::Concurrency(1),
            "never below 1"
        );
    }

    #[test]
    fn calendar_windows_follow_the_time_zone() {
        let paris = TimeZone::get("Europe/Paris").unwrap();
        // 23:30 UTC on 31 Dec is already 1 Jan in Paris.
        let now: jiff::Timestamp = "2026-12-31T23:30:00Z".parse().unwrap();
        let (label, end) = Calendar::Day.window(now, &paris).unwrap();
        assert_eq!(label, "2027-01-01");
        let end_ts = jiff::Timestamp::from_nanosecond(i128::from(end)).unwrap();
        assert_eq!(end_ts.to_string(), "2027-01-01T23:00:00Z");
        let (label, _) = Calendar::Month.window(now, &TimeZone::UTC).unwrap();
        assert_eq!(label, "2026-12");
        let (label, end) = Calendar::Hour.window(now, &TimeZone::UTC).unwrap();
        assert_eq!(label, "2026-12-31T23");
        assert_eq!(
            jiff::Timestamp::from_nanosecond(i128::from(end)).unwrap().to_string(),
            "2027-01-01T00:00:00Z"
        );
    }
}
