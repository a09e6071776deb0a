//! Stage 4, validate: what a model is built to handle, decided before it
//! sees anything. The body has already passed hygiene ([`super::hygiene`],
//! the one parse of the request); here the parsed request is held to the
//! OpenAI request shapes ([`super::openai`]) or the model's own JSON
//! Schema, the model's parameter policy ([`super::params`]), its context
//! window, prompt-injection detection ([`super::injection`]) on every text
//! the model would read, and — for tabular models — its feature profile
//! ([`super::ood`]).
//!
//! Every check that ran leaves a [`Verdict`] for the audit record, whether
//! it passed, flagged or blocked.

use std::sync::Arc;

use serde_json::Value;

use super::oip::Signature;
use super::ood::Profile;
use super::openai::CustomSchema;
use super::params::ParamPolicy;
use crate::reject::Reject;
use crate::route::Operation;

/// What to do with a request a detector finds suspicious.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Refuse it (400).
    Block,
    /// Let it through; the verdict is recorded.
    Flag,
    /// Send it to the review upstream instead (tabular models).
    Route,
}

impl Action {
    /// The name used in configuration and the audit record.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Flag => "flag",
            Action::Route => "route",
        }
    }
}

/// Prompt-injection settings of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectionSettings {
    /// Block or flag.
    pub action: Action,
    /// Score threshold; `None` is the shipped model's own.
    pub threshold: Option<f32>,
    /// An external detector asked after the local checks pass
    /// ([`super::external`]); `action` applies to its verdict too.
    pub external: Option<Arc<super::external::ExternalDetector>>,
}

/// A tabular model's profile settings.
#[derive(Debug, Clone)]
pub struct ProfileSettings {
    /// The feature profile.
    pub profile: Arc<Profile>,
    /// Block, flag or route.
    pub action: Action,
    /// With `Route`: the review upstream's name.
    pub route_to: Option<Arc<crate::config::Upstream>>,
}

/// A model's validation settings (`models[].validation`).
#[derive(Debug, Clone, Default)]
pub struct ModelValidation {
    /// The most tokens prompt plus output may take.
    pub context_window: Option<u64>,
    /// Caps and forbidden parameters.
    pub params: Option<ParamPolicy>,
    /// The model's own request schema, instead of OpenAI's.
    pub schema: Option<Arc<CustomSchema>>,
    /// Prompt-injection detection.
    pub injection: Option<InjectionSettings>,
    /// Out-of-distribution detection (OIP v2 tabular models).
    pub profile: Option<ProfileSettings>,
    /// The model's OIP v2 metadata, which inference requests must match.
    pub metadata: Option<Arc<super::oip::MetadataSettings>>,
}

/// One check's outcome, for the audit record.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Verdict {
    /// `schema`, `params`, `context_window`, `injection`, `metadata` or
    /// `profile`.
    pub check: &'static str,
    /// `pass`, `flag`, `block` or `route`.
    pub result: &'static str,
    /// A score, where the check has one (classifier probability, OOD score).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// Why: the failing field, the matched rules, the features out of range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Verdict {
    fn pass(check: &'static str) -> Verdict {
        Verdict {
            check,
            result: "pass",
            score: None,
            reason: None,
        }
    }
}

/// Where a validated request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The model's own upstream.
    Model,
    /// The review upstream of its profile (`action: route`).
    Review,
}

/// Validates an OpenAI request to `model` as the pipeline does: its output
/// estimate read from `max_tokens` (or the model's default), then
/// [`check_openai`], with the prompt's tokens counted by the model's
/// tokenizer only when the context window needs them. Returns that count,
/// for the limits stage to reuse.
pub fn check_openai_request(
    model: &crate::config::ModelEndpoint,
    operation: Operation,
    body: &Value,
    verdicts: &mut Vec<Verdict>,
) -> Result<Option<u64>, Reject> {
    let output =
        crate::limits::cost::output_estimate(operation, body, model.limits.default_max_tokens).map_err(|e| {
            Reject::InvalidRequest {
                param: Some("max_tokens".to_owned()),
                message: e.to_string(),
                code: "invalid_value",
            }
        })?;
    let mut counted = None;
    let prompt_tokens = || {
        let n = crate::limits::tokens::count_request(&model.limits.tokenizer, operation, body)
            .map(|c| c.tokens)
            .map_err(|e| Reject::InvalidRequest {
                param: None,
                message: e.to_string(),
                code: "invalid_value",
            })?;
        counted = Some(n);
        Ok(n)
    };
    check_openai(&model.validation, operation, body, prompt_tokens, output, verdicts)?;
    Ok(counted)
}

/// Validates an OpenAI request for `operation`. `input_tokens` is the
/// prompt's token count when the caller has it (the context window needs
/// it); `output_tokens` what it may generate.
pub fn check_openai(
    settings: &ModelValidation,
    operation: Operation,
    body: &Value,
    prompt_tokens: impl FnOnce() -> Result<u64, Reject>,
    output_tokens: u64,
    verdicts: &mut Vec<Verdict>,
) -> Result<(), Reject> {
    // The shape first: every later check reads fields it can then trust.
    let shape = match &settings.schema {
        Some(schema) => schema.validate(body),
        None if operation.has_body() => super::openai::validate(operation, body),
        None => Ok(()),
    };
    if let Err(e) = shape {
        verdicts.push(Verdict {
            check: "schema",
            result: "block",
            score: None,
            reason: Some(schema_reason(&e)),
        });
        return Err(Reject::InvalidRequest {
            param: (!e.param.is_empty()).then_some(e.param),
            message: e.message,
            code: e.code,
        });
    }
    verdicts.push(Verdict::pass("schema"));
    if let Some(policy) = &settings.params {
        if let Err(v) = policy.check(operation, body) {
            verdicts.push(Verdict {
                check: "params",
                result: "block",
                score: None,
                reason: Some(format!("{}: {}", v.param, v.message)),
            });
            return Err(Reject::InvalidRequest {
                param: Some(v.param),
                message: v.message,
                code: "parameter_not_allowed",
            });
        }
        verdicts.push(Verdict::pass("params"));
    }
    if let Some(window) = settings.context_window {
        let prompt = prompt_tokens()?;
        let total = prompt.saturating_add(output_tokens);
        if total > window {
            verdicts.push(Verdict {
                check: "context_window",
                result: "block",
                score: Some(total as f64),
                reason: Some(format!("{prompt} prompt + {output_tokens} output tokens > {window}")),
            });
            return Err(Reject::ContextLengthExceeded {
                window,
                prompt,
                output: output_tokens,
            });
        }
        verdicts.push(Verdict {
            score: Some(total as f64),
            ..Verdict::pass("context_window")
        });
    }
    if let Some(injection) = &settings.injection {
        inspect_texts(injection, texts_of(operation, body), verdicts)?;
    }
    Ok(())
}

/// Validates an OIP v2 inference request: the model's own JSON Schema and
/// its metadata (when it has them; `signature` is the metadata), injection detection on its `BYTES` inputs
/// and the feature profile on its rows.
pub fn check_oip(
    settings: &ModelValidation,
    signature: Option<&Signature>,
    body: &Value,
    verdicts: &mut Vec<Verdict>,
) -> Result<Destination, Reject> {
    if let Some(schema) = &settings.schema {
        if let Err(e) = schema.validate(body) {
            verdicts.push(Verdict {
                check: "schema",
                result: "block",
                score: None,
                reason: Some(schema_reason(&e)),
            });
            return Err(Reject::InvalidOipInput(e.message));
        }
        verdicts.push(Verdict::pass("schema"));
    }
    if let Some(signature) = signature {
        let max_rows = settings.metadata.as_ref().and_then(|m| m.max_rows);
        match signature.check(body, max_rows) {
            Ok(rows) => verdicts.push(Verdict {
                reason: Some(format!("{rows} rows")),
                ..Verdict::pass("metadata")
            }),
            Err(message) => {
                verdicts.push(Verdict {
                    check: "metadata",
                    result: "block",
                    score: None,
                    reason: Some(message.clone()),
                });
                return Err(Reject::InvalidOipInput(message));
            }
        }
    }
    if let Some(injection) = &settings.injection {
        inspect_texts(injection, oip_texts(body), verdicts)?;
    }
    let Some(profile) = &settings.profile else {
        return Ok(Destination::Model);
    };
    let inputs = body.get("inputs").unwrap_or(&Value::Null);
    let rows = profile.profile.score_oip(inputs).map_err(|e| {
        verdicts.push(Verdict {
            check: "profile",
            result: "block",
            score: None,
            reason: Some(e.to_string()),
        });
        Reject::InvalidOipInput(e.to_string())
    })?;
    let outliers: Vec<(usize, &super::ood::RowScore)> =
        rows.iter().enumerate().filter(|(_, r)| r.out_of_distribution).collect();
    let worst = rows.iter().map(|r| r.score).fold(0.0_f64, f64::max);
    if outliers.is_empty() {
        verdicts.push(Verdict {
            score: Some(worst),
            ..Verdict::pass("profile")
        });
        return Ok(Destination::Model);
    }
    let reason = outliers
        .iter()
        .take(8)
        .map(|(i, r)| {
            let mut why: Vec<String> = Vec::new();
            why.extend(r.out_of_range.iter().map(|f| format!("{f} out of range")));
            why.extend(r.unknown_categories.iter().map(|f| format!("{f} unknown")));
            why.extend(r.missing.iter().map(|f| format!("{f} missing")));
            if why.is_empty() {
                why.push(format!("distance {:.1}", r.mahalanobis));
            }
            format!("row {i}: {}", why.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ");
    verdicts.push(Verdict {
        check: "profile",
        result: profile.action.as_str(),
        score: Some(worst),
        reason: Some(reason.clone()),
    });
    match profile.action {
        Action::Block => Err(Reject::OutOfDistribution(format!(
            "{} of {} rows are outside the model's input profile: {reason}",
            outliers.len(),
            rows.len()
        ))),
        Action::Flag => Ok(Destination::Model),
        Action::Route => Ok(Destination::Review),
    }
}

/// The audit reason of a schema failure: the field at fault, then what is
/// wrong with it.
fn schema_reason(e: &super::openai::SchemaError) -> String {
    if e.param.is_empty() {
        e.message.clone()
    } else {
        format!("{}: {}", e.param, e.message)
    }
}

/// Runs the injection detector over `texts`; the worst one decides.
fn inspect_texts<'a>(
    settings: &InjectionSettings,
    texts: impl Iterator<Item = (String, &'a str)>,
    verdicts: &mut Vec<Verdict>,
) -> Result<(), Reject> {
    let detector = super::injection::detector();
    let mut worst: Option<(String, super::injection::Verdict)> = None;
    let mut inspected = 0usize;
    for (place, text) in texts {
        inspected += 1;
        let verdict = match settings.threshold {
            Some(t) => detector.inspect_with(text, t),
            None => detector.inspect(text),
        };
        let replace = worst
            .as_ref()
            .is_none_or(|(_, w)| (verdict.injection, verdict.score) > (w.injection, w.score));
        if replace {
            worst = Some((place, verdict));
        }
    }
    let Some((place, verdict)) = worst else {
        return Ok(());
    };
    let mut reason = format!("{inspected} texts; worst at {place}");
    if !verdict.rules.is_empty() {
        reason.push_str(&format!("; rules {}", verdict.rules.join(", ")));
    }
    let result = match (verdict.injection, settings.action) {
        (false, _) => "pass",
        (true, Action::Flag) => "flag",
        (true, _) => "block",
    };
    verdicts.push(Verdict {
        check: "injection",
        result,
        score: Some(f64::from(verdict.score)),
        reason: Some(reason),
    });
    if result == "block" {
        return Err(Reject::PromptInjection(place));
    }
    Ok(())
}

/// Every text of an OpenAI request the model reads, with where it is:
/// every message's content (all roles, tool results included), tool-call
/// arguments, the completion prompt and suffix.
pub(crate) fn texts_of(operation: Operation, body: &Value) -> impl Iterator<Item = (String, &str)> {
    let mut out: Vec<(String, &str)> = Vec::new();
    match operation {
        Operation::ChatCompletions => {
            for (i, m) in body
                .get("messages")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                match m.get("content") {
                    Some(Value::String(s)) => out.push((format!("messages[{i}].content"), s)),
                    Some(Value::Array(parts)) => {
                        for (j, p) in parts.iter().enumerate() {
                            if let Some(t) = p.get("text").and_then(Value::as_str) {
                                out.push((format!("messages[{i}].content[{j}].text"), t));
                            }
                        }
                    }
                    _ => {}
                }
                for (j, call) in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    if let Some(args) = call.pointer("/function/arguments").and_then(Value::as_str) {
                        out.push((format!("messages[{i}].tool_calls[{j}].function.arguments"), args));
                    }
                }
            }
        }
        Operation::Completions => {
            match body.get("prompt") {
                Some(Value::String(s)) => out.push(("prompt".to_owned(), s)),
                Some(Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        if let Some(s) = item.as_str() {
                            out.push((format!("prompt[{i}]"), s));
                        }
                    }
                }
                _ => {}
            }
            if let Some(s) = body.get("suffix").and_then(Value::as_str) {
                out.push(("suffix".to_owned(), s));
            }
        }
        _ => {}
    }
    out.into_iter()
}

/// The strings of an OIP v2 request's `BYTES` inputs.
pub(crate) fn oip_texts(body: &Value) -> impl Iterator<Item = (String, &str)> {
    let mut out: Vec<(String, &str)> = Vec::new();
    for input in body.get("inputs").and_then(Value::as_array).into_iter().flatten() {
        if input.get("datatype").and_then(Value::as_str) != Some("BYTES") {
            continue;
        }
        let name = input.get("name").and_then(Value::as_str).unwrap_or("?");
        for (i, v) in input
            .get("data")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            if let Some(s) = v.as_str() {
                out.push((format!("inputs.{name}[{i}]"), s));
            }
        }
    }
    out.into_iter()
}
