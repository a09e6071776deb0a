//! A model's parameter policy: what a request to that model may ask for,
//! beyond what the API allows in general. Output limits, choices, tools and
//! conversation length are capped; some parameters can be forbidden (a
//! model whose log-probabilities must not leak forbids `logprobs`); the
//! response formats can be restricted.
//!
//! The check reads the body as it is; it is meant to run after
//! [`super::openai::validate`], but is safe on any JSON: a capped field it
//! cannot read as a count is a violation, never a pass.

use std::fmt;

use serde_json::{Map, Value};

use crate::route::Operation;
use crate::validate::hygiene::push_key;
use crate::validate::openai::{array_too_long_message, kind, out_of_range_message};

/// What one model accepts. The default allows everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamPolicy {
    /// The largest `max_tokens` and `max_completion_tokens` (chat and
    /// completions).
    pub max_tokens: Option<u64>,
    /// The largest `n`, and for completions `best_of` (each is a number of
    /// generations).
    pub max_n: Option<u64>,
    /// The most `tools` (chat; the deprecated `functions` count the same).
    pub max_tools: Option<usize>,
    /// The most `messages` (chat).
    pub max_messages: Option<usize>,
    /// Parameters the model refuses, by name: `logprobs`, `top_logprobs`, or
    /// a dotted path into objects such as `stream_options.include_usage`.
    ///
    /// The rule: a forbidden parameter is refused when present with any
    /// value but `null` or `false`. So `"logprobs": false` and
    /// `"logprobs": null` pass (they ask for nothing), while
    /// `"logprobs": true`, `"top_logprobs": 0` and `"logit_bias": {}` are
    /// refused: `0`, `""`, `{}` and `[]` are still values a client chose to
    /// send, and an upstream may act on their presence.
    pub forbidden: Vec<String>,
    /// The allowed `response_format.type` values (`text`, `json_object`,
    /// `json_schema`, …); `None` allows any. A request without a
    /// `response_format` (or with `null`) asks for the default and passes.
    pub response_formats: Option<Vec<String>>,
}

/// A request the model's policy does not allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyViolation {
    /// The JSON path of the parameter (`max_tokens`, `response_format`).
    pub param: String,
    /// What is not allowed, worded as OpenAI words it.
    pub message: String,
}

impl fmt::Display for PolicyViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PolicyViolation {}

fn violation(param: impl Into<String>, message: String) -> PolicyViolation {
    PolicyViolation {
        param: param.into(),
        message,
    }
}

/// `null` and absent are the same.
fn present<'v>(body: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
    body.get(key).filter(|v| !v.is_null())
}

/// A count field as `u64`; anything else present is a violation.
fn count(body: &Map<String, Value>, key: &str) -> Result<Option<u64>, PolicyViolation> {
    match present(body, key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            violation(
                key,
                format!(
                    "Invalid type for '{key}': expected a non-negative integer, but got {} instead.",
                    kind(v)
                ),
            )
        }),
    }
}

impl ParamPolicy {
    /// Whether the policy allows everything.
    pub fn is_empty(&self) -> bool {
        *self == ParamPolicy::default()
    }

    /// Checks a request to the model. The first violation is returned, in
    /// this order: forbidden parameters, `max_tokens`, `n`, `messages`,
    /// `tools`, `response_format`.
    pub fn check(&self, operation: Operation, body: &Value) -> Result<(), PolicyViolation> {
        let Some(body) = body.as_object() else {
            return if self.is_empty() {
                Ok(())
            } else {
                Err(violation("", "The request body must be a JSON object.".to_owned()))
            };
        };
        self.check_forbidden(body)?;
        let generates = matches!(operation, Operation::ChatCompletions | Operation::Completions);
        if let Some(max) = self.max_tokens
            && generates
        {
            for key in ["max_tokens", "max_completion_tokens"] {
                if let Some(asked) = count(body, key)?
                    && asked > max
                {
                    return Err(violation(
                        key,
                        format!(
                            "{key} is too large: {asked}. This model supports at most {max} completion tokens, \
                             whereas you provided {asked}."
                        ),
                    ));
                }
            }
        }
        if let Some(max) = self.max_n
            && generates
        {
            let keys: &[&str] = if operation == Operation::Completions {
                &["n", "best_of"]
            } else {
                &["n"]
            };
            for &key in keys {
                if let Some(asked) = count(body, key)?
                    && asked > max
                    && let Some(Value::Number(n)) = body.get(key)
                {
                    // Far above any real limit, so exact as a float.
                    let (message, _) = out_of_range_message(key, n, max as f64, true);
                    return Err(violation(key, message));
                }
            }
        }
        if operation == Operation::ChatCompletions {
            if let Some(max) = self.max_messages {
                check_length(body, "messages", max)?;
            }
            if let Some(max) = self.max_tools {
                check_length(body, "tools", max)?;
                check_length(body, "functions", max)?;
            }
        }
        if let Some(allowed) = &self.response_formats {
            check_response_format(body, allowed)?;
        }
        Ok(())
    }

    fn check_forbidden(&self, body: &Map<String, Value>) -> Result<(), PolicyViolation> {
        for name in &self.forbidden {
            let mut at = body;
            let mut segments = name.split('.').peekable();
            while let Some(segment) = segments.next() {
                let Some(value) = present(at, segment) else {
                    break;
                };
                if segments.peek().is_none() {
                    if *value != Value::Bool(false) {
                        return Err(violation(
                            name.as_str(),
                            format!("Unsupported parameter: '{name}' is not supported with this model."),
                        ));
                    }
                    break;
                }
                match value {
                    Value::Object(inner) => at = inner,
                    _ => break,
                }
            }
        }
        Ok(())
    }
}

/// `key`, when an array, is at most `max` long. Not an array is for the
/// schema check to refuse, but is refused here too rather than passed.
fn check_length(body: &Map<String, Value>, key: &str, max: usize) -> Result<(), PolicyViolation> {
    match present(body, key) {
        None => Ok(()),
        Some(Value::Array(items)) if items.len() <= max => Ok(()),
        Some(Value::Array(items)) => Err(violation(key, array_too_long_message(key, max, items.len()))),
        Some(other) => Err(violation(
            key,
            format!(
                "Invalid type for '{key}': expected an array, but got {} instead.",
                kind(other)
            ),
        )),
    }
}

fn check_response_format(body: &Map<String, Value>, allowed: &[String]) -> Result<(), PolicyViolation> {
    let Some(format) = present(body, "response_format") else {
        return Ok(());
    };
    let kind = format.get("type").and_then(Value::as_str);
    match kind {
        Some(t) if allowed.iter().any(|a| a == t) => Ok(()),
        Some(t) => {
            let mut shown = String::new();
            push_key(&mut shown, t);
            Err(violation(
                "response_format",
                format!("Invalid parameter: 'response_format' of type '{shown}' is not supported with this model."),
            ))
        }
        None => Err(violation(
            "response_format.type",
            "Missing required parameter: 'response_format.type'.".to_owned(),
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    const CHAT: Operation = Operation::ChatCompletions;

    fn body(extra: Value) -> Value {
        let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    }

    fn refused(policy: &ParamPolicy, operation: Operation, extra: Value) -> PolicyViolation {
        policy.check(operation, &body(extra)).unwrap_err()
    }

    #[test]
    fn the_default_allows_everything() {
        let policy = ParamPolicy::default();
        assert!(policy.is_empty());
        policy
            .check(
                CHAT,
                &body(json!({"logprobs": true, "max_tokens": 1_000_000, "n": 128})),
            )
            .unwrap();
        policy.check(CHAT, &json!([])).unwrap();
    }

    #[test]
    fn forbidden_parameters() {
        let policy = ParamPolicy {
            forbidden: vec![
                "logprobs".into(),
                "top_logprobs".into(),
                "stream_options.include_usage".into(),
            ],
            ..ParamPolicy::default()
        };
        let v = refused(&policy, CHAT, json!({"logprobs": true}));
        assert_eq!(
            v,
            PolicyViolation {
                param: "logprobs".into(),
                message: "Unsupported parameter: 'logprobs' is not supported with this model.".into()
            }
        );
        assert_eq!(v.to_string(), v.message);
        // `false` and `null` ask for nothing.
        policy.check(CHAT, &body(json!({"logprobs": false}))).unwrap();
        policy.check(CHAT, &body(json!({"logprobs": null}))).unwrap();
        // Any other value is a request, even a zero.
        assert_eq!(refused(&policy, CHAT, json!({"top_logprobs": 0})).param, "top_logprobs");
        assert_eq!(refused(&policy, CHAT, json!({"logprobs": "no"})).param, "logprobs");
        // Dotted paths reach into objects.
        let v = refused(
            &policy,
            CHAT,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        );
        assert_eq!(v.param, "stream_options.include_usage");
        policy
            .check(
                CHAT,
                &body(json!({"stream": true, "stream_options": {"include_usage": false}})),
            )
            .unwrap();
        policy
            .check(CHAT, &body(json!({"stream": true, "stream_options": null})))
            .unwrap();
        // Completions' integer `logprobs` is refused the same way.
        let prompt = json!({"model": "m", "prompt": "x", "logprobs": 2});
        assert_eq!(
            policy.check(Operation::Completions, &prompt).unwrap_err().param,
            "logprobs"
        );
    }

    #[test]
    fn output_and_choice_caps() {
        let policy = ParamPolicy {
            max_tokens: Some(4096),
            max_n: Some(2),
            ..ParamPolicy::default()
        };
        policy
            .check(
                CHAT,
                &body(json!({"max_tokens": 4096, "max_completion_tokens": 10, "n": 2})),
            )
            .unwrap();
        assert_eq!(
            refused(&policy, CHAT, json!({"max_tokens": 8000})),
            PolicyViolation {
                param: "max_tokens".into(),
                message: "max_tokens is too large: 8000. This model supports at most 4096 completion tokens, \
                          whereas you provided 8000."
                    .into()
            }
        );
        assert_eq!(
            refused(&policy, CHAT, json!({"max_completion_tokens": 4097})).param,
            "max_completion_tokens"
        );
        assert_eq!(
            refused(&policy, CHAT, json!({"n": 3})),
            PolicyViolation {
                param: "n".into(),
                message: "Invalid 'n': integer above maximum value. Expected a value <= 2, but got 3 instead.".into()
            }
        );
        let completions = json!({"model": "m", "prompt": "x", "n": 1, "best_of": 5});
        assert_eq!(
            policy.check(Operation::Completions, &completions).unwrap_err().param,
            "best_of"
        );
        // An unreadable count is not a pass.
        assert_eq!(
            refused(&policy, CHAT, json!({"max_tokens": 1e9})),
            PolicyViolation {
                param: "max_tokens".into(),
                message: "Invalid type for 'max_tokens': expected a non-negative integer, but got a decimal instead."
                    .into()
            }
        );
        assert_eq!(refused(&policy, CHAT, json!({"n": "2"})).param, "n");
        // Embeddings generate nothing.
        policy
            .check(
                Operation::Embeddings,
                &json!({"model": "m", "input": "x", "max_tokens": 1e9}),
            )
            .unwrap();
    }

    #[test]
    fn message_and_tool_caps() {
        let policy = ParamPolicy {
            max_messages: Some(2),
            max_tools: Some(1),
            ..ParamPolicy::default()
        };
        let tool = json!({"type": "function", "function": {"name": "f"}});
        policy.check(CHAT, &body(json!({"tools": [tool]}))).unwrap();
        assert_eq!(
            refused(&policy, CHAT, json!({"tools": [tool, tool]})),
            PolicyViolation {
                param: "tools".into(),
                message: "Invalid 'tools': array too long. Expected an array with maximum length 1, but got an array \
                          with length 2 instead."
                    .into()
            }
        );
        assert_eq!(
            refused(&policy, CHAT, json!({"functions": [{"name": "a"}, {"name": "b"}]})).param,
            "functions"
        );
        let three = json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]);
        assert_eq!(refused(&policy, CHAT, json!({"messages": three})).param, "messages");
    }

    #[test]
    fn response_format_allow_list() {
        let policy = ParamPolicy {
            response_formats: Some(vec!["text".into(), "json_object".into()]),
            ..ParamPolicy::default()
        };
        policy.check(CHAT, &body(json!({}))).unwrap();
        policy
            .check(CHAT, &body(json!({"response_format": {"type": "json_object"}})))
            .unwrap();
        let v = refused(
            &policy,
            CHAT,
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {}}}}),
        );
        assert_eq!(
            v,
            PolicyViolation {
                param: "response_format".into(),
                message: "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model."
                    .into()
            }
        );
        assert_eq!(
            refused(&policy, CHAT, json!({"response_format": {}})).param,
            "response_format.type"
        );
    }
}
