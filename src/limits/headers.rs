//! What clients are told of their limits, on every response: OpenAI's
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (read by the
//! official SDKs and most client libraries), and, when enabled, the IETF
//! `RateLimit-Policy` and `RateLimit` fields
//! (draft-ietf-httpapi-ratelimit-headers).
//!
//! Each header reports the most constrained rule of its unit: the one with
//! the least left, which is the one the client will hit first.

use http::{HeaderMap, HeaderName, HeaderValue};

use super::admit::RuleOutcome;

/// Adds the limit headers for `outcomes` to `headers`.
pub fn add(outcomes: &[RuleOutcome], ietf: bool, headers: &mut HeaderMap) {
    let tightest = |tokens: bool| {
        outcomes
            .iter()
            .filter(|o| o.kind != "concurrency")
            .filter(|o| {
                if tokens {
                    o.unit.ends_with("_tokens")
                } else {
                    o.unit == "requests"
                }
            })
            .min_by_key(|o| (o.remaining, o.limit))
    };
    for (suffix, outcome) in [("requests", tightest(false)), ("tokens", tightest(true))] {
        let Some(o) = outcome else { continue };
        put(headers, &format!("x-ratelimit-limit-{suffix}"), &o.limit.to_string());
        put(
            headers,
            &format!("x-ratelimit-remaining-{suffix}"),
            &o.remaining.to_string(),
        );
        put(
            headers,
            &format!("x-ratelimit-reset-{suffix}"),
            &openai_duration(o.reset_ms),
        );
    }
    if !ietf || outcomes.is_empty() {
        return;
    }
    // Every policy, and the state of the one closest to its limit
    // (relative to its size, so different units compare).
    let policies: Vec<String> = outcomes
        .iter()
        .map(|o| format!("\"{}\";q={};w={}", o.rule, o.limit, o.window_s.max(1)))
        .collect();
    put(headers, "ratelimit-policy", &policies.join(", "));
    if let Some(o) = outcomes.iter().min_by(|a, b| {
        (u128::from(a.remaining) * u128::from(b.limit)).cmp(&(u128::from(b.remaining) * u128::from(a.limit)))
    }) {
        put(
            headers,
            "ratelimit",
            &format!("\"{}\";r={};t={}", o.rule, o.remaining, o.reset_ms.div_ceil(1000)),
        );
    }
}

fn put(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
        headers.insert(name, value);
    }
}

/// A duration as OpenAI writes its reset headers: `20ms`, `1s`, `6m0s`,
/// `1h2m3s` (Go's notation, whole seconds rounded up from one second on).
pub fn openai_duration(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms.div_ceil(1000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, m) => format!("{m}m{s}s"),
        (h, m) => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(rule: &str, unit: &'static str, limit: u64, remaining: u64, reset_ms: u64) -> RuleOutcome {
        RuleOutcome {
            rule: rule.into(),
            unit,
            kind: "rate",
            allowed: true,
            cost: 1,
            limit,
            remaining,
            reset_ms,
            retry_after_ms: Some(0),
            fallback: None,
            window_s: 60,
        }
    }

    #[test]
    fn durations_read_as_openai_writes_them() {
        assert_eq!(openai_duration(17), "17ms");
        assert_eq!(openai_duration(1000), "1s");
        assert_eq!(openai_duration(1001), "2s");
        assert_eq!(openai_duration(360_000), "6m0s");
        assert_eq!(openai_duration(3_723_000), "1h2m3s");
    }

    #[test]
    fn the_tightest_rule_of_each_unit_is_reported() {
        let outcomes = [
            outcome("key-rate", "requests", 60, 59, 1000),
            outcome("global", "requests", 1000, 5, 100),
            outcome("tpm", "input_tokens", 10_000, 9_000, 6_000),
            outcome("spend", "dollars", 5_000_000, 1, 1),
        ];
        let mut h = HeaderMap::new();
        add(&outcomes, true, &mut h);
        assert_eq!(h["x-ratelimit-limit-requests"], "1000");
        assert_eq!(h["x-ratelimit-remaining-requests"], "5");
        assert_eq!(h["x-ratelimit-reset-requests"], "100ms");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "9000");
        assert_eq!(h["x-ratelimit-reset-tokens"], "6s");
        assert_eq!(
            h["ratelimit-policy"],
            "\"key-rate\";q=60;w=60, \"global\";q=1000;w=60, \"tpm\";q=10000;w=60, \"spend\";q=5000000;w=60"
        );
        // The dollar budget is the closest to its limit, relative to its size.
        assert_eq!(h["ratelimit"], "\"spend\";r=1;t=1");
        let mut plain = HeaderMap::new();
        add(&outcomes, false, &mut plain);
        assert!(plain.get("ratelimit").is_none());
    }
}
