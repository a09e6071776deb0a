//! Checks `limits:` and `models[].limits` into [`crate::limits::rules`]
//! types. Amounts are written in the rule's unit as a person would: `60`,
//! `100k` or `2M` requests or tokens, `1.5` compute seconds, `$5` dollars.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use jiff::tz::TimeZone;

use super::Errors;
use super::raw::{RawLimits, RawModelLimits, RawRule, RawTokenizer};
use crate::limits::cost::{MaxTokensField, Prices, parse_dollars};
use crate::limits::gcra::Rate;
use crate::limits::rules::{
    Calendar, Capacity, FailMode, KeyDim, Kind, LimitsConfig, ModelLimits, RedisSettings, Rule, Unit,
};
use crate::limits::tokens::Tokenizer;

/// `limits.high_value_factor` when not given.
const DEFAULT_HIGH_VALUE_FACTOR: f64 = 0.25;
/// The factor is kept as a fraction over this denominator.
const FACTOR_DENOMINATOR: u64 = 1_000_000;

/// Checks the `limits:` section; `models` are the declared model names.
pub(super) fn check_limits(raw: &RawLimits, models: &HashSet<&str>, errs: &mut Errors) -> LimitsConfig {
    let redis = match (raw.store.as_deref(), &raw.redis) {
        (None | Some("memory"), None) => None,
        (None | Some("memory"), Some(_)) => {
            errs.push("limits.redis", "is only read with `store: redis`");
            None
        }
        (Some("redis"), Some(r)) => {
            if !r.url.starts_with("redis://") && !r.url.starts_with("rediss://") {
                errs.push("limits.redis.url", "must be a redis:// or rediss:// URL");
            }
            let prefix = r.prefix.clone().unwrap_or_else(|| "warden".to_owned());
            if prefix.is_empty() || prefix.contains(['{', '}']) {
                errs.push("limits.redis.prefix", "must be non-empty, without `{` or `}`");
            }
            let instances = match r.instances {
                Some(0) => {
                    errs.push("limits.redis.instances", "must be at least 1");
                    1
                }
                Some(n) => n,
                None => 1,
            };
            Some(RedisSettings {
                url: r.url.clone(),
                prefix,
                instances,
                timeout: errs.duration("limits.redis.timeout", r.timeout.as_deref(), Duration::from_millis(50)),
            })
        }
        (Some("redis"), None) => {
            errs.push("limits.redis", "`store: redis` needs `redis: {url: …}`");
            None
        }
        (Some(other), _) => {
            errs.push(
                "limits.store",
                format!("unknown store `{other}`; expected `memory` or `redis`"),
            );
            None
        }
    };
    let tz = match raw.time_zone.as_deref() {
        None => TimeZone::UTC,
        Some(name) => time_zone(name, "limits.time_zone", errs),
    };
    let factor = raw.high_value_factor.unwrap_or(DEFAULT_HIGH_VALUE_FACTOR);
    if !(factor > 0.0 && factor <= 1.0) {
        errs.push("limits.high_value_factor", "must be greater than 0 and at most 1");
    }
    // A fraction, so that scaling stays integer arithmetic.
    let factor_num = (factor.clamp(0.0, 1.0) * FACTOR_DENOMINATOR as f64).round() as u64;
    let ctx = RuleContext {
        models,
        tz: &tz,
        factor_num,
    };
    let mut rules = Vec::new();
    let mut tier_weights = HashMap::new();
    for (i, r) in raw.rules.iter().enumerate() {
        if let Some(rule) = check_rule(r, &format!("limits.rules[{i}]"), None, &ctx, errs) {
            rules.push(rule);
        }
    }
    for (tier, t) in &raw.tiers {
        match t.weight {
            Some(0) => errs.push(&format!("limits.tiers.{tier}.weight"), "must be at least 1"),
            Some(w) => {
                tier_weights.insert(tier.clone(), w);
            }
            None => {}
        }
        for (i, r) in t.rules.iter().enumerate() {
            let path = format!("limits.tiers.{tier}.rules[{i}]");
            if r.tiers.is_some() {
                errs.push(&format!("{path}.tiers"), "a tier's rules apply to that tier only");
            }
            if let Some(rule) = check_rule(r, &path, Some(tier), &ctx, errs) {
                rules.push(rule);
            }
        }
    }
    let mut names = HashSet::new();
    for rule in &rules {
        if !names.insert(rule.name.as_str()) {
            errs.push("limits", format!("two rules are named `{}`", rule.name));
        }
    }
    LimitsConfig {
        redis,
        rules,
        tier_weights,
        ietf_headers: raw.ietf_headers,
    }
}

struct RuleContext<'a> {
    models: &'a HashSet<&'a str>,
    tz: &'a TimeZone,
    factor_num: u64,
}

fn check_rule(raw: &RawRule, path: &str, tier: Option<&str>, ctx: &RuleContext<'_>, errs: &mut Errors) -> Option<Rule> {
    let before = errs.0.len();
    if raw.name.is_empty()
        || !raw
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        errs.push(
            &format!("{path}.name"),
            "must be non-empty and use only letters, digits and `-_.`",
        );
    }
    let mut key = Vec::new();
    let mut global = false;
    for dim in &raw.key {
        let dim = match dim.as_str() {
            "principal" => KeyDim::Principal,
            "api_key" => KeyDim::ApiKey,
            "client_ip" => KeyDim::ClientIp,
            "tenant" => KeyDim::Tenant,
            "model" => KeyDim::Model,
            "tier" => KeyDim::Tier,
            "global" => {
                global = true;
                continue;
            }
            other => {
                errs.push(
                    &format!("{path}.key"),
                    format!(
                        "unknown key `{other}`; expected any of `principal`, `api_key`, `client_ip`, `tenant`, `model`, `tier`, or `global`"
                    ),
                );
                continue;
            }
        };
        if key.contains(&dim) {
            errs.push(&format!("{path}.key"), format!("`{}` is named twice", dim.as_str()));
        }
        key.push(dim);
    }
    if global && !key.is_empty() {
        errs.push(&format!("{path}.key"), "`global` stands alone");
    }
    if raw.key.is_empty() {
        errs.push(&format!("{path}.key"), "name what is counted apart, or `[global]`");
    }
    let unit = match raw.unit.as_deref() {
        None | Some("requests") => Unit::Requests,
        Some("input_tokens") => Unit::InputTokens,
        Some("output_tokens") => Unit::OutputTokens,
        Some("total_tokens") => Unit::TotalTokens,
        Some("compute_seconds") => Unit::ComputeSeconds,
        Some("dollars") => Unit::Dollars,
        Some(other) => {
            errs.push(
                &format!("{path}.unit"),
                format!(
                    "unknown unit `{other}`; expected `requests`, `input_tokens`, `output_tokens`, `total_tokens`, `compute_seconds` or `dollars`"
                ),
            );
            Unit::Requests
        }
    };
    let kind = match (&raw.rate, &raw.budget, raw.concurrency) {
        (Some(rate), None, None) => {
            if raw.per.is_some() || raw.time_zone.is_some() {
                errs.push(&format!("{path}.per"), "`per` and `time_zone` are for budgets");
            }
            check_rate(rate, raw.burst.as_deref(), unit, path, errs).map(Kind::Rate)
        }
        (None, Some(budget), None) => {
            if raw.burst.is_some() {
                errs.push(&format!("{path}.burst"), "`burst` is for rates");
            }
            let per = match raw.per.as_deref() {
                Some("hour") => Some(Calendar::Hour),
                Some("day") => Some(Calendar::Day),
                Some("month") => Some(Calendar::Month),
                Some(other) => {
                    errs.push(
                        &format!("{path}.per"),
                        format!("unknown window `{other}`; expected `hour`, `day` or `month`"),
                    );
                    None
                }
                None => {
                    errs.push(&format!("{path}.per"), "a budget needs `per: hour | day | month`");
                    None
                }
            };
            let tz = match raw.time_zone.as_deref() {
                Some(name) => time_zone(name, &format!("{path}.time_zone"), errs),
                None => ctx.tz.clone(),
            };
            let amount = amount(budget, unit, &format!("{path}.budget"), errs);
            match (amount, per) {
                (Some(amount), Some(per)) => Some(Kind::Budget { amount, per, tz }),
                _ => None,
            }
        }
        (None, None, Some(max)) => {
            if unit != Unit::Requests {
                errs.push(&format!("{path}.unit"), "a concurrency cap counts requests");
            }
            if max == 0 {
                errs.push(&format!("{path}.concurrency"), "must be at least 1");
            }
            Some(Kind::Concurrency(max.max(1)))
        }
        _ => {
            errs.push(path, "give exactly one of `rate`, `budget` or `concurrency`");
            None
        }
    };
    let fail = match raw.fail.as_deref() {
        None if unit == Unit::Dollars => FailMode::Deny,
        None | Some("local") => FailMode::Local,
        Some("deny") => FailMode::Deny,
        Some(other) => {
            errs.push(
                &format!("{path}.fail"),
                format!("unknown fail mode `{other}`; expected `deny` or `local`"),
            );
            FailMode::Deny
        }
    };
    let scale_high_value = match raw.high_value.as_deref() {
        None | Some("scaled") => true,
        Some("unscaled") => false,
        Some(other) => {
            errs.push(
                &format!("{path}.high_value"),
                format!("unknown `{other}`; expected `scaled` or `unscaled`"),
            );
            true
        }
    };
    let models = raw.models.as_ref().map(|names| {
        for name in names {
            if !ctx.models.contains(name.as_str()) {
                errs.push(&format!("{path}.models"), format!("no model named `{name}`"));
            }
        }
        names.iter().cloned().collect::<HashSet<_>>()
    });
    let tiers = match (tier, &raw.tiers) {
        (Some(tier), _) => Some(HashSet::from([tier.to_owned()])),
        (None, Some(tiers)) => Some(tiers.iter().cloned().collect()),
        (None, None) => None,
    };
    if errs.0.len() != before {
        return None;
    }
    let kind = kind?;
    Some(Rule {
        name: raw.name.clone(),
        key,
        unit,
        kind_high_value: if scale_high_value {
            kind.scaled(ctx.factor_num, FACTOR_DENOMINATOR)
        } else {
            kind.clone()
        },
        kind,
        models,
        tiers,
        fail,
        scale_high_value,
    })
}

/// `AMOUNT/PERIOD` with an optional burst, e.g. `60/min`, `$1/hour`,
/// `10/30s`.
fn check_rate(text: &str, burst: Option<&str>, unit: Unit, path: &str, errs: &mut Errors) -> Option<Rate> {
    let rpath = format!("{path}.rate");
    let Some((amount_text, period_text)) = text.rsplit_once('/') else {
        errs.push(
            &rpath,
            format!("`{text}` is not `AMOUNT/PERIOD`, such as `60/min` or `$1/hour`"),
        );
        return None;
    };
    let amount = amount(amount_text, unit, &rpath, errs)?;
    let period_text = period_text.trim();
    // `min` alone is one minute; `30s` is thirty seconds.
    let spelled = if period_text.starts_with(|c: char| c.is_ascii_digit()) {
        period_text.to_owned()
    } else {
        format!("1{period_text}")
    };
    let period = match humantime::parse_duration(&spelled) {
        Ok(p) if !p.is_zero() => p,
        _ => {
            errs.push(
                &rpath,
                format!("`{period_text}` is not a period such as `s`, `min`, `hour`, `day` or `30s`"),
            );
            return None;
        }
    };
    let burst = match burst {
        Some(b) => amount_of(b, unit, &format!("{path}.burst"), errs)?,
        None => amount,
    };
    match Rate::new(amount, period, burst) {
        Ok(rate) => Some(rate),
        Err(e) => {
            errs.push(&rpath, e.to_string());
            None
        }
    }
}

/// An amount in `unit`'s base quantity, greater than zero.
fn amount(text: &str, unit: Unit, path: &str, errs: &mut Errors) -> Option<u64> {
    amount_of(text, unit, path, errs)
}

fn amount_of(text: &str, unit: Unit, path: &str, errs: &mut Errors) -> Option<u64> {
    let text = text.trim();
    let parsed = match unit {
        Unit::Dollars => parse_dollars(text).map_err(|e| e.to_string()),
        // Compute seconds, kept in milliseconds.
        Unit::ComputeSeconds => decimal(text, 3),
        _ => count(text),
    };
    match parsed {
        Ok(0) => {
            errs.push(path, "must be greater than zero");
            None
        }
        Ok(n) => Some(n),
        Err(e) => {
            errs.push(path, e);
            None
        }
    }
}

/// A whole number, optionally with `k` (thousand) or `M` (million).
fn count(text: &str) -> Result<u64, String> {
    let (digits, multiplier) = match text.strip_suffix('k') {
        Some(d) => (d, 1_000),
        None => match text.strip_suffix('M') {
            Some(d) => (d, 1_000_000),
            None => (text, 1),
        },
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| format!("`{text}` is not a whole number such as `60`, `100k` or `2M`"))
}

/// A non-negative decimal with at most `places` decimals, scaled by
/// `10^places` (seconds to milliseconds for 3).
fn decimal(text: &str, places: u32) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a number of seconds with at most {places} decimals, such as `1.5`");
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
        || fraction.len() > places as usize
        || (text.contains('.') && fraction.is_empty())
    {
        return Err(bad());
    }
    let scale = 10u64.pow(places);
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let fraction: u64 = if fraction.is_empty() {
        0
    } else {
        fraction.parse::<u64>().map_err(|_| bad())? * 10u64.pow(places - fraction.len() as u32)
    };
    whole
        .checked_mul(scale)
        .and_then(|w| w.checked_add(fraction))
        .ok_or_else(bad)
}

fn time_zone(name: &str, path: &str, errs: &mut Errors) -> TimeZone {
    match TimeZone::get(name) {
        Ok(tz) => tz,
        Err(e) => {
            errs.push(path, format!("unknown time zone `{name}`: {e}"));
            TimeZone::UTC
        }
    }
}

/// Checks `models[i].limits`.
pub(super) fn check_model_limits(
    raw: Option<&RawModelLimits>,
    path: &str,
    base: &Path,
    errs: &mut Errors,
) -> ModelLimits {
    let defaults = ModelLimits::default();
    let Some(raw) = raw else { return defaults };
    let path = format!("{path}.limits");
    let tokenizer = match &raw.tokenizer {
        None => defaults.tokenizer.clone(),
        Some(RawTokenizer::Name(name)) => Tokenizer::from_name(name).unwrap_or_else(|e| {
            errs.push(&format!("{path}.tokenizer"), e.to_string());
            defaults.tokenizer.clone()
        }),
        Some(RawTokenizer::File { file }) => Tokenizer::from_file(super::resolve(base, file)).unwrap_or_else(|e| {
            errs.push(&format!("{path}.tokenizer"), e.to_string());
            defaults.tokenizer.clone()
        }),
    };
    let prices = raw.prices.as_ref().and_then(|p| {
        let price = |field: &str, value: Option<&String>, errs: &mut Errors| -> Option<u64> {
            match value.map(|v| parse_dollars(v)) {
                None => Some(0),
                Some(Ok(micros)) => Some(micros),
                Some(Err(e)) => {
                    errs.push(&format!("{path}.prices.{field}"), e.to_string());
                    None
                }
            }
        };
        let input = price("input", p.input.as_ref(), errs)?;
        let cached = match &p.cached_input {
            Some(_) => price("cached_input", p.cached_input.as_ref(), errs)?,
            None => input,
        };
        Some(Prices {
            input_per_mtok: input,
            cached_input_per_mtok: cached,
            output_per_mtok: price("output", p.output.as_ref(), errs)?,
            per_compute_second: price("compute_second", p.compute_second.as_ref(), errs)?,
        })
    });
    let default_max_tokens = match raw.default_max_tokens {
        Some(0) => {
            errs.push(&format!("{path}.default_max_tokens"), "must be at least 1");
            defaults.default_max_tokens
        }
        Some(n) => n,
        None => defaults.default_max_tokens,
    };
    let max_tokens_field = match raw.max_tokens_field.as_deref() {
        None | Some("max_tokens") => MaxTokensField::MaxTokens,
        Some("max_completion_tokens") => MaxTokensField::MaxCompletionTokens,
        Some(other) => {
            errs.push(
                &format!("{path}.max_tokens_field"),
                format!("unknown field `{other}`; expected `max_tokens` or `max_completion_tokens`"),
            );
            MaxTokensField::MaxTokens
        }
    };
    let compute_estimate = errs.duration(
        &format!("{path}.compute_estimate"),
        raw.compute_estimate.as_deref(),
        defaults.compute_estimate,
    );
    let capacity = raw.capacity.as_ref().map(|c| {
        let cpath = format!("{path}.capacity");
        let concurrency = errs.count(&format!("{cpath}.concurrency"), Some(c.concurrency), 1);
        let status = match c.status {
            None | Some(429) => http::StatusCode::TOO_MANY_REQUESTS,
            Some(503) => http::StatusCode::SERVICE_UNAVAILABLE,
            Some(other) => {
                errs.push(&format!("{cpath}.status"), format!("{other}: expected 429 or 503"));
                http::StatusCode::TOO_MANY_REQUESTS
            }
        };
        Capacity {
            concurrency,
            queue: c.queue.unwrap_or(concurrency.saturating_mul(4)),
            queue_timeout: errs.duration(
                &format!("{cpath}.queue_timeout"),
                c.queue_timeout.as_deref(),
                Duration::from_secs(5),
            ),
            status,
        }
    });
    ModelLimits {
        tokenizer,
        prices,
        default_max_tokens,
        max_tokens_field,
        compute_estimate,
        capacity,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn amounts_read_in_their_unit() {
        assert_eq!(count("60").unwrap(), 60);
        assert_eq!(count("100k").unwrap(), 100_000);
        assert_eq!(count("2M").unwrap(), 2_000_000);
        assert!(count("1.5").is_err());
        assert!(count("-1").is_err());
        assert_eq!(decimal("1.5", 3).unwrap(), 1_500);
        assert_eq!(decimal("2", 3).unwrap(), 2_000);
        assert_eq!(decimal("0.001", 3).unwrap(), 1);
        assert!(decimal("0.0001", 3).is_err());
        assert!(decimal("1.", 3).is_err());
    }

    #[test]
    fn rates_read_amount_and_period() {
        let mut errs = Errors::default();
        let r = check_rate("60/min", None, Unit::Requests, "r", &mut errs).unwrap();
        assert_eq!((r.amount(), r.period_ns(), r.burst()), (60, 60_000_000_000, 60));
        let r = check_rate("$1/hour", Some("$0.25"), Unit::Dollars, "r", &mut errs).unwrap();
        assert_eq!((r.amount(), r.burst()), (1_000_000, 250_000));
        let r = check_rate("10/30s", None, Unit::Requests, "r", &mut errs).unwrap();
        assert_eq!(r.period_ns(), 30_000_000_000);
        assert!(errs.0.is_empty(), "{:?}", errs.0);
        assert!(check_rate("60", None, Unit::Requests, "r", &mut errs).is_none());
        assert!(check_rate("60/fortnightly", None, Unit::Requests, "r", &mut errs).is_none());
        assert!(check_rate("0/min", None, Unit::Requests, "r", &mut errs).is_none());
        assert_eq!(errs.0.len(), 3, "{:?}", errs.0);
    }
}
