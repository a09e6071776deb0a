//! Stage 4, validate: an external prompt-injection detector, asked after the
//! local checks ([`super::stage`]) have passed, for a model that configures
//! one (`models[].validation.injection.external`):
//!
//! ```yaml
//! injection:
//!   action: block              # or flag: applies to both detectors
//!   external:
//!     kind: lakera             # or llm_guard
//!     url: https://api.lakera.ai/v2/guard
//!     api_key: { env: LAKERA_GUARD_API_KEY }   # or { file: PATH }; never inline
//!     timeout: 500ms           # the default
//!     fail: closed             # the default; or open
//! ```
//!
//! - `lakera`: Lakera Guard v2. `url` is the full endpoint (the SaaS one is
//!   `https://api.lakera.ai/v2/guard`); every text the model would read is
//!   one message of `{"messages":[{"role","content"}],"breakdown":true}`,
//!   with its role (`system` and `developer` as `system`, `assistant` as
//!   `assistant`, everything else — user turns, tool results, completion
//!   prompts, OIP v2 `BYTES` — as `user`); the answer's `flagged` decides and
//!   the detected `breakdown[].detector_type`s are recorded. It needs
//!   `api_key`.
//! - `llm_guard`: the LLM Guard API (`llm_guard_api`). `url` is its base;
//!   `POST {url}/analyze/prompt` gets `{"prompt":"…"}`, the texts joined by
//!   blank lines (the protocol has no roles); the answer's `is_valid`
//!   decides, and the scanners with a positive risk score are recorded, the
//!   highest as the verdict's score (`PromptInjection`'s when it has one).
//!   `api_key` is optional (the API's own `AUTH_TOKEN`).
//!
//! The key goes as `Authorization: Bearer <key>`, marked sensitive, and is
//! never logged or audited; nothing of the caller's request but the texts
//! is sent, and never its credentials. The client is built once, when the
//! configuration is loaded; `timeout` bounds the whole exchange. When the
//! detector gives no usable answer (timeout, connection error, non-2xx,
//! unreadable body), `fail: closed` refuses the request with 503
//! `detector_unavailable`; `fail: open` lets it through. Either way the
//! verdict records `result: "error"` and why, and
//! `warden_injection_detector_failures_total` counts it.

use std::time::Duration;

use http::HeaderValue;
use serde_json::{Value, json};

use super::stage::{Action, InjectionSettings, Verdict};
use crate::config::Protocol;
use crate::reject::Reject;
use crate::route::Operation;

/// The name of the check in verdicts.
const CHECK: &str = "injection_external";

/// The largest answer read from a detector.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// The protocol an external detector speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectorKind {
    /// Lakera Guard v2 (`POST /v2/guard`).
    Lakera,
    /// The LLM Guard API (`POST /analyze/prompt`).
    LlmGuard,
}

impl DetectorKind {
    /// The name used in configuration, verdicts and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DetectorKind::Lakera => "lakera",
            DetectorKind::LlmGuard => "llm_guard",
        }
    }
}

/// What to do when the detector gives no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Let the request through; the verdict records the error.
    Open,
    /// Refuse it (503 `detector_unavailable`).
    Closed,
}

impl FailMode {
    /// The name used in configuration and verdicts.
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        }
    }
}

/// An external prompt-injection detector, reached over HTTP.
pub struct ExternalDetector {
    kind: DetectorKind,
    /// The URL POSTed to.
    endpoint: String,
    client: reqwest::Client,
    /// `Bearer <api_key>`, sensitive: never logged.
    authorization: Option<HeaderValue>,
    timeout: Duration,
    fail: FailMode,
}

impl std::fmt::Debug for ExternalDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalDetector")
            .field("kind", &self.kind)
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .field("fail", &self.fail)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ExternalDetector {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.endpoint == other.endpoint
            && self.authorization == other.authorization
            && self.timeout == other.timeout
            && self.fail == other.fail
    }
}

/// One text the model would read.
#[derive(Debug)]
struct Text<'a> {
    /// Where it is in the request, e.g. `messages[1].content`.
    place: String,
    /// Its role, as Lakera knows roles.
    role: &'static str,
    text: &'a str,
}

/// A detector's answer.
#[derive(Debug, PartialEq)]
struct Finding {
    flagged: bool,
    score: Option<f64>,
    /// What it flagged (detector types, scanners).
    what: String,
}

/// Why there is no answer: a metric label and a few words for the verdict.
#[derive(Debug, PartialEq)]
struct Failure {
    label: &'static str,
    reason: String,
}

impl Failure {
    fn new(label: &'static str, reason: impl Into<String>) -> Failure {
        Failure {
            label,
            reason: reason.into(),
        }
    }
}

impl ExternalDetector {
    /// A detector of `kind` at `url` (Lakera: the endpoint; LLM Guard: the
    /// base URL). `authorization` is the whole `Authorization` value.
    pub fn new(
        kind: DetectorKind,
        url: &str,
        authorization: Option<HeaderValue>,
        timeout: Duration,
        fail: FailMode,
    ) -> ExternalDetector {
        let endpoint = match kind {
            DetectorKind::Lakera => url.to_owned(),
            DetectorKind::LlmGuard => format!("{}/analyze/prompt", url.trim_end_matches('/')),
        };
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect is not an answer, and must not carry the key elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        ExternalDetector {
            kind,
            endpoint,
            client,
            authorization,
            timeout,
            fail,
        }
    }

    /// The protocol it speaks.
    pub fn kind(&self) -> DetectorKind {
        self.kind
    }

    /// What happens when it gives no answer.
    pub fn fail_mode(&self) -> FailMode {
        self.fail
    }

    /// Asks the detector about `texts`, within the timeout.
    async fn inspect(&self, texts: &[Text<'_>]) -> Result<Finding, Failure> {
        let body = match self.kind {
            DetectorKind::Lakera => json!({
                "messages": texts
                    .iter()
                    .map(|t| json!({"role": t.role, "content": t.text}))
                    .collect::<Vec<_>>(),
                "breakdown": true,
            }),
            DetectorKind::LlmGuard => json!({
                "prompt": texts.iter().map(|t| t.text).collect::<Vec<_>>().join("\n\n"),
            }),
        };
        let answer = match tokio::time::timeout(self.timeout, self.post(&body)).await {
            Ok(answer) => answer?,
            Err(_) => return Err(self.timed_out()),
        };
        match self.kind {
            DetectorKind::Lakera => read_lakera(&answer),
            DetectorKind::LlmGuard => read_llm_guard(&answer),
        }
        .ok_or_else(|| Failure::new("malformed", "malformed answer"))
    }

    fn timed_out(&self) -> Failure {
        Failure::new(
            "timeout",
            format!("no answer within {}", humantime::format_duration(self.timeout)),
        )
    }

    /// POSTs `body`: the JSON answer of a 2xx, or why there is none.
    async fn post(&self, body: &Value) -> Result<Value, Failure> {
        let mut request = self.client.post(&self.endpoint).json(body);
        if let Some(authorization) = &self.authorization {
            request = request.header(http::header::AUTHORIZATION, authorization.clone());
        }
        let mut response = request.send().await.map_err(|e| self.failure(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(Failure::new("status", format!("status {}", status.as_u16())));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.failure(&e))? {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(Failure::new("malformed", "answer too large"));
            }
            bytes.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&bytes).map_err(|_| Failure::new("malformed", "malformed answer"))
    }

    /// Why a request failed, in a few words (never the request itself).
    fn failure(&self, e: &reqwest::Error) -> Failure {
        if e.is_timeout() {
            self.timed_out()
        } else if e.is_connect() {
            Failure::new("unreachable", "connection failed")
        } else {
            Failure::new("unreachable", "request failed")
        }
    }
}

/// Lakera Guard's answer: `flagged`, and the detector types detected.
fn read_lakera(answer: &Value) -> Option<Finding> {
    let flagged = answer.get("flagged")?.as_bool()?;
    let mut detected: Vec<&str> = Vec::new();
    for item in answer.get("breakdown").and_then(Value::as_array).into_iter().flatten() {
        if item.get("detected").and_then(Value::as_bool) == Some(true)
            && let Some(kind) = item.get("detector_type").and_then(Value::as_str)
            && !detected.contains(&kind)
        {
            detected.push(kind);
        }
    }
    Some(Finding {
        flagged,
        score: None,
        what: detected.join(", "),
    })
}

/// The LLM Guard API's answer: `is_valid`, and the scanners' risk scores.
fn read_llm_guard(answer: &Value) -> Option<Finding> {
    let valid = answer.get("is_valid")?.as_bool()?;
    let scanners = answer.get("scanners")?.as_object()?;
    let mut scores: Vec<(&str, f64)> = Vec::new();
    for (name, score) in scanners {
        scores.push((name, score.as_f64()?));
    }
    let score = scanners
        .get("PromptInjection")
        .and_then(Value::as_f64)
        .or_else(|| scores.iter().map(|(_, s)| *s).reduce(f64::max));
    scores.retain(|(_, s)| *s > 0.0);
    scores.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    let what = scores
        .iter()
        .map(|(name, s)| format!("{name} {s:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    Some(Finding {
        flagged: !valid,
        score,
        what,
    })
}

/// Runs the external detector of `settings` over the texts the model would
/// read, leaving an `injection_external` verdict; refuses the request when
/// it is flagged and the action is `block` (400, as the local detector), or
/// when the detector fails closed (503). A request with no text is not sent.
pub async fn check(
    settings: &InjectionSettings,
    model: &str,
    protocol: Protocol,
    operation: Operation,
    body: &Value,
    verdicts: &mut Vec<Verdict>,
) -> Result<(), Reject> {
    let Some(detector) = &settings.external else {
        return Ok(());
    };
    let texts: Vec<Text<'_>> = match protocol {
        Protocol::Openai => super::stage::texts_of(operation, body)
            .map(|(place, text)| Text {
                role: role_of(body, &place),
                place,
                text,
            })
            .collect(),
        Protocol::OipV2 => super::stage::oip_texts(body)
            .map(|(place, text)| Text {
                place,
                role: "user",
                text,
            })
            .collect(),
    };
    if texts.is_empty() {
        return Ok(());
    }
    let kind = detector.kind.as_str();
    match detector.inspect(&texts).await {
        Ok(finding) => {
            let result = match (finding.flagged, settings.action) {
                (false, _) => "pass",
                (true, Action::Flag) => "flag",
                (true, _) => "block",
            };
            let count = match texts.len() {
                1 => "1 text".to_owned(),
                n => format!("{n} texts"),
            };
            let reason = match (finding.flagged, finding.what.is_empty()) {
                (false, _) => format!("{kind}: not flagged ({count})"),
                (true, true) => format!("{kind} flagged ({count})"),
                (true, false) => format!("{kind} flagged {} ({count})", finding.what),
            };
            verdicts.push(Verdict {
                check: CHECK,
                result,
                score: finding.score,
                reason: Some(reason),
            });
            if result == "block" {
                return Err(Reject::PromptInjection(place_of(&texts)));
            }
            Ok(())
        }
        Err(failure) => {
            let fail = detector.fail.as_str();
            crate::admin::metrics::injection_detector_failure(model, kind, failure.label);
            tracing::warn!(model, detector = kind, reason = %failure.reason, fail, "the external injection detector gave no answer");
            let reason = format!("{kind}: {}; failed {fail}", failure.reason);
            verdicts.push(Verdict {
                check: CHECK,
                result: "error",
                score: None,
                reason: Some(reason.clone()),
            });
            match detector.fail {
                FailMode::Open => Ok(()),
                FailMode::Closed => Err(Reject::DetectorUnavailable(reason)),
            }
        }
    }
}

/// The role of the message a chat text belongs to, as Lakera knows roles.
fn role_of(body: &Value, place: &str) -> &'static str {
    let index = place
        .strip_prefix("messages[")
        .and_then(|rest| rest.split(']').next())
        .and_then(|i| i.parse::<usize>().ok());
    let role = index.and_then(|i| body.get("messages")?.get(i)?.get("role")?.as_str());
    match role {
        Some("system" | "developer") => "system",
        Some("assistant") => "assistant",
        _ => "user",
    }
}

/// Where a flagged request is at fault: the one text sent, or the field
/// holding them (the detectors judge the request as a whole).
fn place_of(texts: &[Text<'_>]) -> String {
    match texts {
        [one] => one.place.clone(),
        [first, ..] => first.place.split(['[', '.']).next().unwrap_or(&first.place).to_owned(),
        [] => String::new(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lakera_answers_are_read_with_their_detectors() {
        let answer = json!({"flagged": true, "breakdown": [
            {"project_id": "p", "policy_id": "q", "detector_id": "d1", "detector_type": "prompt_attack", "detected": true},
            {"project_id": "p", "policy_id": "q", "detector_id": "d2", "detector_type": "pii/email", "detected": false},
        ]});
        assert_eq!(
            read_lakera(&answer),
            Some(Finding {
                flagged: true,
                score: None,
                what: "prompt_attack".into()
            })
        );
        assert_eq!(read_lakera(&json!({"flagged": "yes"})), None);
        assert_eq!(read_lakera(&json!({})), None);
    }

    #[test]
    fn llm_guard_answers_are_read_with_their_scores() {
        let answer = json!({"is_valid": false, "sanitized_prompt": "x", "scanners": {"Toxicity": 0.4, "PromptInjection": 0.97, "Secrets": -1.0}});
        assert_eq!(
            read_llm_guard(&answer),
            Some(Finding {
                flagged: true,
                score: Some(0.97),
                what: "PromptInjection 0.97, Toxicity 0.40".into()
            })
        );
        assert_eq!(read_llm_guard(&json!({"is_valid": true})), None);
        assert_eq!(
            read_llm_guard(&json!({"is_valid": true, "scanners": {"A": "high"}})),
            None
        );
    }

    #[test]
    fn roles_and_places() {
        let body = json!({"messages": [
            {"role": "developer", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "tool", "content": "c"},
        ]});
        assert_eq!(role_of(&body, "messages[0].content"), "system");
        assert_eq!(
            role_of(&body, "messages[1].tool_calls[0].function.arguments"),
            "assistant"
        );
        assert_eq!(role_of(&body, "messages[2].content"), "user");
        assert_eq!(role_of(&body, "prompt"), "user");
        let text = |place: &str| Text {
            place: place.into(),
            role: "user",
            text: "",
        };
        assert_eq!(place_of(&[text("messages[1].content")]), "messages[1].content");
        assert_eq!(
            place_of(&[text("messages[0].content"), text("messages[1].content")]),
            "messages"
        );
        assert_eq!(place_of(&[text("inputs.text[0]"), text("inputs.text[1]")]), "inputs");
    }

    #[test]
    fn the_key_is_never_in_debug_output() {
        let mut key = HeaderValue::from_static("Bearer sekr1t");
        key.set_sensitive(true);
        let d = ExternalDetector::new(
            DetectorKind::LlmGuard,
            "http://127.0.0.1:1/",
            Some(key),
            Duration::from_millis(500),
            FailMode::Closed,
        );
        assert_eq!(d.endpoint, "http://127.0.0.1:1/analyze/prompt");
        assert!(!format!("{d:?}").contains("sekr1t"));
    }
}
