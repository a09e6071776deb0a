//! What a request is estimated to cost before it is forwarded, and what it
//! did cost once the upstream reports its usage.
//!
//! Money is kept in integer micro-dollars (1 USD = 1 000 000) so that sums
//! over millions of requests do not drift as floats would, and prices are
//! parsed from their decimal text exactly. Every division rounds up and
//! every operation saturates: a budget is never under-charged, and a hostile
//! `max_tokens` cannot wrap a cost around to zero.
//!
//! The estimate charges all input at the uncached price and the output at
//! its maximum (`max_tokens` times the number of choices); the actual cost,
//! settled later, is never more than that for the same prices.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::route::Operation;

/// Micro-dollars in one dollar.
pub const MICROS_PER_DOLLAR: u64 = 1_000_000;
/// Prices are per this many tokens.
const TOKENS_PER_PRICE_UNIT: u128 = 1_000_000;
const NANOS_PER_SECOND: u128 = 1_000_000_000;

/// Why a price could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    /// Nothing, or only `$`, was given.
    #[error("empty price")]
    Empty,
    /// A minus sign: prices cannot be negative.
    #[error("price {0:?} is negative")]
    Negative(String),
    /// Not of the form `[$]digits[.digits]`.
    #[error("price {0:?} is not a decimal number of dollars like \"2.50\" or \"$0.15\"")]
    Invalid(String),
    /// More than six decimals: finer than a micro-dollar.
    #[error("price {0:?} has more than 6 decimals (a micro-dollar is the smallest unit)")]
    TooPrecise(String),
    /// More micro-dollars than fit in 64 bits.
    #[error("price {0:?} is too large")]
    TooLarge(String),
}

/// Parses a decimal number of dollars, such as `"2.50"`, `"$2.5"` or
/// `"0.000001"`, into micro-dollars, exactly (no floating point).
pub fn parse_dollars(text: &str) -> Result<u64, PriceError> {
    let trimmed = text.trim();
    let number = trimmed.strip_prefix('$').unwrap_or(trimmed).trim_start();
    if number.is_empty() {
        return Err(PriceError::Empty);
    }
    if number.starts_with('-') {
        return Err(PriceError::Negative(text.to_owned()));
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    // Both sides must be plain digits, and at least one side non-empty: "."
    // alone, "1.", "+1", "1e3" and "1,000" are all refused rather than read
    // in some surprising way.
    if !digits(whole) || !digits(fraction) || whole.is_empty() || (number.contains('.') && fraction.is_empty()) {
        return Err(PriceError::Invalid(text.to_owned()));
    }
    if fraction.len() > 6 {
        return Err(PriceError::TooPrecise(text.to_owned()));
    }
    let too_large = || PriceError::TooLarge(text.to_owned());
    let whole: u64 = whole.parse().map_err(|_| too_large())?;
    // Pad the fraction to six digits: "5" is 500 000 micro-dollars.
    let fraction: u64 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<6}").parse().map_err(|_| too_large())?
    };
    whole
        .checked_mul(MICROS_PER_DOLLAR)
        .and_then(|w| w.checked_add(fraction))
        .ok_or_else(too_large)
}

/// A model's prices, in micro-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Prices {
    /// Per million uncached input tokens.
    pub input_per_mtok: u64,
    /// Per million input tokens served from the upstream's prompt cache.
    pub cached_input_per_mtok: u64,
    /// Per million output tokens.
    pub output_per_mtok: u64,
    /// Per second of compute (predictive models priced by time).
    pub per_compute_second: u64,
}

impl Prices {
    /// Prices from their dollar texts, each as [`parse_dollars`] reads it
    /// (per million tokens, or per second for compute).
    pub fn parse(input: &str, cached_input: &str, output: &str, per_compute_second: &str) -> Result<Self, PriceError> {
        Ok(Prices {
            input_per_mtok: parse_dollars(input)?,
            cached_input_per_mtok: parse_dollars(cached_input)?,
            output_per_mtok: parse_dollars(output)?,
            per_compute_second: parse_dollars(per_compute_second)?,
        })
    }
}

/// A cost in micro-dollars, by component; each component is rounded up on
/// its own, so the total may exceed the exact cost by a few micro-dollars
/// but never falls short of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cost {
    /// Uncached input tokens.
    pub input: u64,
    /// Cached input tokens.
    pub cached_input: u64,
    /// Output tokens.
    pub output: u64,
    /// Compute time.
    pub compute: u64,
}

impl Cost {
    /// The whole cost, saturating.
    pub fn total(&self) -> u64 {
        self.input
            .saturating_add(self.cached_input)
            .saturating_add(self.output)
            .saturating_add(self.compute)
    }
}

/// Token usage as the upstream reports it (OpenAI's `usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// `prompt_tokens`: all input tokens, cached ones included.
    pub prompt: u64,
    /// `prompt_tokens_details.cached_tokens`: the part of `prompt` served
    /// from the prompt cache.
    pub cached_prompt: u64,
    /// `completion_tokens`.
    pub completion: u64,
}

/// `ceil(quantity * price / per)`, saturating at `u64::MAX`. The product of
/// two `u64` always fits in a `u128`, so only the final narrowing can
/// overflow.
fn charge(quantity: u64, price: u64, per: u128) -> u64 {
    let exact = u128::from(quantity) * u128::from(price);
    u64::try_from(exact.div_ceil(per)).unwrap_or(u64::MAX)
}

/// The cost to reserve before forwarding: every input token at the uncached
/// price (cache hits are not known yet) and `max_output_tokens` of output.
pub fn estimate(prices: &Prices, input_tokens: u64, max_output_tokens: u64) -> Cost {
    Cost {
        input: charge(input_tokens, prices.input_per_mtok, TOKENS_PER_PRICE_UNIT),
        cached_input: 0,
        output: charge(max_output_tokens, prices.output_per_mtok, TOKENS_PER_PRICE_UNIT),
        compute: 0,
    }
}

/// The cost of what the upstream reports it used. Cached tokens are part of
/// `prompt`; a report with more cached than prompt tokens is read as all
/// cached, never as negative uncached input.
pub fn actual(prices: &Prices, usage: Usage) -> Cost {
    let cached = usage.cached_prompt.min(usage.prompt);
    Cost {
        input: charge(usage.prompt - cached, prices.input_per_mtok, TOKENS_PER_PRICE_UNIT),
        cached_input: charge(cached, prices.cached_input_per_mtok, TOKENS_PER_PRICE_UNIT),
        output: charge(usage.completion, prices.output_per_mtok, TOKENS_PER_PRICE_UNIT),
        compute: 0,
    }
}

/// The cost of `elapsed` compute time, rounded up to the micro-dollar.
pub fn compute(prices: &Prices, elapsed: Duration) -> Cost {
    let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    Cost {
        compute: charge(nanos, prices.per_compute_second, NANOS_PER_SECOND),
        ..Cost::default()
    }
}

/// Why a request's output limit could not be read or set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaxTokensError {
    /// `max_tokens`, `max_completion_tokens`, `n` or `best_of` is not a
    /// non-negative integer.
    #[error("`{0}` is not a non-negative integer")]
    NotAnInteger(&'static str),
    /// The body is not a JSON object.
    #[error("the request body is not a JSON object")]
    NotAnObject,
}

/// Which field carries the output limit when Warden sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxTokensField {
    /// `max_tokens`: completions, and chat on vLLM, Ollama and older OpenAI
    /// models.
    MaxTokens,
    /// `max_completion_tokens`: chat on OpenAI, required by its reasoning
    /// models, which refuse `max_tokens`.
    MaxCompletionTokens,
}

impl MaxTokensField {
    /// The JSON field name.
    pub fn name(self) -> &'static str {
        match self {
            MaxTokensField::MaxTokens => "max_tokens",
            MaxTokensField::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

/// An optional non-negative integer field; `null` is absent.
fn int_field(body: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, MaxTokensError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(MaxTokensError::NotAnInteger(name)),
    }
}

/// The output limit the request sets for one choice: the larger of
/// `max_tokens` and `max_completion_tokens` when both are given, since the
/// upstream may honour either.
pub fn requested_max_tokens(body: &Value) -> Result<Option<u64>, MaxTokensError> {
    let body = body.as_object().ok_or(MaxTokensError::NotAnObject)?;
    let a = int_field(body, "max_tokens")?;
    let b = int_field(body, "max_completion_tokens")?;
    Ok(a.max(b))
}

/// The output tokens to reserve for a request: its own limit, or
/// `default_max_tokens` (the model's, from configuration) when it sets none,
/// times the completions it asks for (`n`, or `best_of`, which completions
/// generate and bill even though only the best is returned). Embeddings
/// produce no output tokens.
pub fn output_estimate(operation: Operation, body: &Value, default_max_tokens: u64) -> Result<u64, MaxTokensError> {
    if !matches!(operation, Operation::ChatCompletions | Operation::Completions) {
        return Ok(0);
    }
    let per_choice = requested_max_tokens(body)?.unwrap_or(default_max_tokens);
    let object = body.as_object().ok_or(MaxTokensError::NotAnObject)?;
    let n = int_field(object, "n")?.unwrap_or(1);
    let best_of = int_field(object, "best_of")?.unwrap_or(1);
    Ok(per_choice.saturating_mul(n.max(best_of).max(1)))
}

/// Writes `default_max_tokens` into `field` of a chat or completions
/// request that sets no output limit, so that the upstream stops where the
/// estimate assumed it would. Returns whether the body was changed; a body
/// with either field already set (even to something larger) is left alone,
/// since capping is the caller's decision.
pub fn apply_default_max_tokens(
    operation: Operation,
    body: &mut Value,
    field: MaxTokensField,
    default_max_tokens: u64,
) -> Result<bool, MaxTokensError> {
    if !matches!(operation, Operation::ChatCompletions | Operation::Completions) {
        return Ok(false);
    }
    if requested_max_tokens(body)?.is_some() {
        return Ok(false);
    }
    let object = body.as_object_mut().ok_or(MaxTokensError::NotAnObject)?;
    // Completions know only `max_tokens`, whatever the caller asked for.
    let name = match operation {
        Operation::Completions => MaxTokensField::MaxTokens.name(),
        _ => field.name(),
    };
    object.insert(name.to_owned(), Value::from(default_max_tokens));
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn prices_parse_exactly() {
        assert_eq!(parse_dollars("$2.50").unwrap(), 2_500_000);
        assert_eq!(parse_dollars("2.5").unwrap(), 2_500_000);
        assert_eq!(parse_dollars(" $ 10 ").unwrap(), 10_000_000);
        assert_eq!(parse_dollars("0").unwrap(), 0);
        assert_eq!(parse_dollars("0.000001").unwrap(), 1);
        assert_eq!(parse_dollars("0.15").unwrap(), 150_000);
        // 0.1 + 0.2 is not 0.3 in floats; here it is.
        assert_eq!(
            parse_dollars("0.1").unwrap() + parse_dollars("0.2").unwrap(),
            parse_dollars("0.3").unwrap()
        );
        assert_eq!(parse_dollars("18446744073709.551615").unwrap(), u64::MAX);
        let p = Prices::parse("$2.50", "$1.25", "$10", "0.0001").unwrap();
        assert_eq!(
            p,
            Prices {
                input_per_mtok: 2_500_000,
                cached_input_per_mtok: 1_250_000,
                output_per_mtok: 10_000_000,
                per_compute_second: 100
            }
        );
    }

    #[test]
    fn bad_prices_say_why() {
        assert_eq!(parse_dollars(""), Err(PriceError::Empty));
        assert_eq!(parse_dollars(" $ "), Err(PriceError::Empty));
        assert_eq!(parse_dollars("-1"), Err(PriceError::Negative("-1".into())));
        assert_eq!(parse_dollars("$-0.5"), Err(PriceError::Negative("$-0.5".into())));
        for bad in [
            "abc", "1.", ".5", ".", "1,000", "1e3", "+1", "1.2.3", "1 000", "$$1", "1$",
        ] {
            assert_eq!(parse_dollars(bad), Err(PriceError::Invalid(bad.into())), "{bad}");
        }
        assert_eq!(
            parse_dollars("0.0000001"),
            Err(PriceError::TooPrecise("0.0000001".into()))
        );
        assert_eq!(
            parse_dollars("18446744073709.551616"),
            Err(PriceError::TooLarge("18446744073709.551616".into()))
        );
        assert_eq!(
            parse_dollars("99999999999999999999"),
            Err(PriceError::TooLarge("99999999999999999999".into()))
        );
        assert!(Prices::parse("1", "1", "x", "1").is_err());
        assert!(
            PriceError::TooPrecise("0.0000001".into())
                .to_string()
                .contains("6 decimals")
        );
    }

    fn gpt4o() -> Prices {
        // $2.50 in, $1.25 cached in, $10 out, per million tokens.
        Prices::parse("2.50", "1.25", "10", "0").unwrap()
    }

    #[test]
    fn estimate_charges_full_input_and_maximum_output() {
        let c = estimate(&gpt4o(), 1_000, 500);
        // 1000 × 2.5 µ$ = 2500 µ$; 500 × 10 µ$ = 5000 µ$.
        assert_eq!(
            c,
            Cost {
                input: 2_500,
                cached_input: 0,
                output: 5_000,
                compute: 0
            }
        );
        assert_eq!(c.total(), 7_500);
        assert_eq!(estimate(&gpt4o(), 0, 0).total(), 0);
    }

    #[test]
    fn costs_round_up() {
        // One token at $2.50 / M is 2.5 µ$, charged as 3.
        assert_eq!(estimate(&gpt4o(), 1, 0).input, 3);
        // One token at $0.000001 / M is a millionth of a µ$, still charged.
        let tiny = Prices {
            input_per_mtok: 1,
            ..Prices::default()
        };
        assert_eq!(estimate(&tiny, 1, 0).input, 1);
        assert_eq!(estimate(&tiny, 1_000_000, 0).input, 1);
        assert_eq!(estimate(&tiny, 1_000_001, 0).input, 2);
        // A free model costs nothing however much it is used.
        assert_eq!(estimate(&Prices::default(), u64::MAX, u64::MAX).total(), 0);
    }

    #[test]
    fn actual_prices_cached_input_separately() {
        let usage = Usage {
            prompt: 1_000,
            cached_prompt: 400,
            completion: 100,
        };
        let c = actual(&gpt4o(), usage);
        // 600 × 2.5 = 1500; 400 × 1.25 = 500; 100 × 10 = 1000.
        assert_eq!(
            c,
            Cost {
                input: 1_500,
                cached_input: 500,
                output: 1_000,
                compute: 0
            }
        );
        assert!(c.total() <= estimate(&gpt4o(), 1_000, 100).total());
        // More cached than prompt (a confused upstream): all of it cached.
        let c = actual(
            &gpt4o(),
            Usage {
                prompt: 10,
                cached_prompt: 50,
                completion: 0,
            },
        );
        assert_eq!((c.input, c.cached_input), (0, 13));
    }

    #[test]
    fn overflow_saturates() {
        let dear = Prices {
            input_per_mtok: u64::MAX,
            cached_input_per_mtok: u64::MAX,
            output_per_mtok: u64::MAX,
            per_compute_second: u64::MAX,
        };
        let c = estimate(&dear, u64::MAX, u64::MAX);
        assert_eq!(c.input, u64::MAX);
        assert_eq!(c.total(), u64::MAX);
        let c = actual(
            &dear,
            Usage {
                prompt: u64::MAX,
                cached_prompt: 1,
                completion: u64::MAX,
            },
        );
        assert_eq!(c.total(), u64::MAX);
        assert_eq!(compute(&dear, Duration::MAX).total(), u64::MAX);
        let body = json!({"max_tokens": u64::MAX, "n": 128});
        assert_eq!(output_estimate(Operation::ChatCompletions, &body, 0).unwrap(), u64::MAX);
    }

    #[test]
    fn compute_time_rounds_up() {
        let p = Prices {
            per_compute_second: 100,
            ..Prices::default()
        };
        assert_eq!(compute(&p, Duration::from_secs(2)).compute, 200);
        assert_eq!(compute(&p, Duration::from_millis(1)).compute, 1);
        assert_eq!(compute(&p, Duration::from_nanos(1)).compute, 1);
        assert_eq!(compute(&p, Duration::ZERO).compute, 0);
    }

    #[test]
    fn output_estimate_uses_the_request_or_the_default() {
        let chat = Operation::ChatCompletions;
        assert_eq!(output_estimate(chat, &json!({}), 256).unwrap(), 256);
        assert_eq!(output_estimate(chat, &json!({"max_tokens": null}), 256).unwrap(), 256);
        assert_eq!(output_estimate(chat, &json!({"max_tokens": 10}), 256).unwrap(), 10);
        assert_eq!(
            output_estimate(chat, &json!({"max_completion_tokens": 20}), 256).unwrap(),
            20
        );
        assert_eq!(
            output_estimate(chat, &json!({"max_tokens": 30, "max_completion_tokens": 20}), 256).unwrap(),
            30
        );
        assert_eq!(
            output_estimate(chat, &json!({"max_tokens": 10, "n": 3}), 256).unwrap(),
            30
        );
        assert_eq!(
            output_estimate(
                Operation::Completions,
                &json!({"max_tokens": 10, "n": 2, "best_of": 5}),
                0
            )
            .unwrap(),
            50
        );
        assert_eq!(
            output_estimate(Operation::Embeddings, &json!({"input": "x"}), 256).unwrap(),
            0
        );
        for bad in [
            json!({"max_tokens": -1}),
            json!({"max_tokens": 1.5}),
            json!({"max_completion_tokens": "9"}),
            json!({"n": -2}),
        ] {
            assert!(
                matches!(output_estimate(chat, &bad, 1), Err(MaxTokensError::NotAnInteger(_))),
                "{bad}"
            );
        }
        assert_eq!(output_estimate(chat, &json!([]), 1), Err(MaxTokensError::NotAnObject));
    }

    #[test]
    fn default_max_tokens_is_written_only_when_missing() {
        let mut body = json!({"messages": []});
        assert!(
            apply_default_max_tokens(Operation::ChatCompletions, &mut body, MaxTokensField::MaxTokens, 512).unwrap()
        );
        assert_eq!(body["max_tokens"], 512);
        assert_eq!(requested_max_tokens(&body).unwrap(), Some(512));

        let mut body = json!({"messages": []});
        assert!(
            apply_default_max_tokens(
                Operation::ChatCompletions,
                &mut body,
                MaxTokensField::MaxCompletionTokens,
                512
            )
            .unwrap()
        );
        assert_eq!(body, json!({"messages": [], "max_completion_tokens": 512}));

        // Completions have no `max_completion_tokens`.
        let mut body = json!({"prompt": "x"});
        assert!(
            apply_default_max_tokens(
                Operation::Completions,
                &mut body,
                MaxTokensField::MaxCompletionTokens,
                8
            )
            .unwrap()
        );
        assert_eq!(body, json!({"prompt": "x", "max_tokens": 8}));

        // Already set, even larger: left alone.
        let mut body = json!({"max_completion_tokens": 4096});
        assert!(
            !apply_default_max_tokens(Operation::ChatCompletions, &mut body, MaxTokensField::MaxTokens, 512).unwrap()
        );
        assert_eq!(body, json!({"max_completion_tokens": 4096}));

        // Embeddings have no output to limit.
        let mut body = json!({"input": "x"});
        assert!(!apply_default_max_tokens(Operation::Embeddings, &mut body, MaxTokensField::MaxTokens, 512).unwrap());
        assert_eq!(body, json!({"input": "x"}));

        let mut body = json!({"max_tokens": "lots"});
        assert_eq!(
            apply_default_max_tokens(Operation::ChatCompletions, &mut body, MaxTokensField::MaxTokens, 1),
            Err(MaxTokensError::NotAnInteger("max_tokens"))
        );
    }
}
