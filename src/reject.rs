//! Every reason Warden refuses or fails a request, and the one place where a
//! reason becomes an HTTP response. OpenAI routes get the OpenAI error object
//! (`{"error":{"message","type","param","code"}}`), which the official SDKs map
//! to their exception types; OIP v2 routes get `{"error":"…"}`.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::config::Protocol;
use crate::limits::admit::RuleOutcome;

/// Why a request did not get a model's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// No credential was presented.
    #[error("missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`")]
    MissingCredential,
    /// The credential matches no key.
    #[error("invalid API key")]
    InvalidCredential,
    /// A bearer JWT failed a check; the reason is audited, not returned.
    #[error("invalid bearer token")]
    InvalidToken(crate::authn::jwt::TokenError),
    /// The service that must vouch for the credential did not answer.
    #[error("authentication is temporarily unavailable")]
    AuthenticationUnavailable,
    /// Too many failed authentications from this address or for this key.
    #[error("too many failed authentications: try again later")]
    TooManyAuthFailures(std::time::Duration),
    /// The model does not accept the way the caller authenticated.
    #[error("the model `{0}` does not accept this kind of credential")]
    AuthMethodNotAccepted(String),
    /// The model needs a verified certificate of a known client.
    #[error("the model `{0}` requires a client certificate")]
    ClientCertificateRequired(String),
    /// `Authorization` and `x-api-key` carry different keys.
    #[error("conflicting credentials: `Authorization` and `x-api-key` differ")]
    ConflictingCredentials,
    /// The path is not a route Warden serves.
    #[error("unknown route `{0}`")]
    UnknownRoute(String),
    /// The route exists but not for this method.
    #[error("method `{0}` is not allowed on this route")]
    MethodNotAllowed(String),
    /// The body is not declared as JSON.
    #[error("unsupported content type: send `Content-Type: application/json`")]
    UnsupportedMediaType,
    /// The body is larger than the route allows.
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge {
        /// The limit that applied.
        limit: usize,
    },
    /// The client did not send its body in time.
    #[error("request body not received in time")]
    BodyTimeout,
    /// The body could not be read off the connection.
    #[error("request body could not be read")]
    BodyRead,
    /// The body is not JSON.
    #[error("invalid JSON body: {0}")]
    InvalidJson(String),
    /// The JSON nests deeper than allowed.
    #[error("JSON nesting exceeds the limit of {0} levels")]
    JsonTooDeep(usize),
    /// A required or malformed field.
    #[error("{message}")]
    InvalidField {
        /// JSON path of the field, e.g. `model`.
        param: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No model of that name is configured.
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// The caller may not call this model.
    #[error("you are not allowed to call the model `{0}`")]
    ModelNotAllowed(String),
    /// The model is partitioned by tenant and the request names none.
    #[error("the request must name its tenant ({0})")]
    TenantMissing(String),
    /// The tenant is named in the wrong shape.
    #[error("invalid tenant: {0}")]
    TenantInvalid(String),
    /// Only an mTLS service may name a tenant in a header.
    #[error("the tenant header `{0}` is accepted only from mTLS-authenticated services")]
    TenantHeaderNotAllowed(String),
    /// The caller may not touch this tenant's data.
    #[error("you are not allowed to access tenant `{0}`")]
    TenantNotAllowed(String),
    /// The policy engine did not permit the operation or its parameters.
    #[error("the policy does not allow this `{0}` request on this model")]
    ActionDenied(String),
    /// The policy engine did not permit the call.
    #[error("the policy does not allow you to call the model `{0}`")]
    PolicyDenied(String),
    /// The upstream could not be reached.
    #[error("the model server could not be reached")]
    UpstreamUnreachable,
    /// The upstream did not answer in time.
    #[error("the model server did not answer in time")]
    UpstreamTimeout,
    /// The upstream answered with something Warden cannot pass on.
    #[error("the model server sent an invalid response")]
    UpstreamInvalid,
    /// The model's answer matched a `block` detector of its output content
    /// policy; nothing of it is sent.
    #[error("the response was blocked by the output content policy")]
    OutputBlocked,
    /// The model's answer could not be inspected (not text), so it is not
    /// sent: an output policy never lets through what it cannot read.
    #[error("the model's response could not be inspected by the output content policy")]
    OutputNotInspectable,
    /// A streamed answer was asked of a model whose output policy inspects
    /// whole answers only.
    #[error(
        "streaming is not available for the model `{0}`: its output content policy inspects whole responses; send the request without `stream`"
    )]
    StreamNotInspected(String),
    /// The upstream refused Warden's own credential: a gateway misconfiguration,
    /// not the caller's fault, so it must not look like a client auth error.
    #[error("the model server rejected the gateway's credentials")]
    UpstreamAuth,
    /// The gateway is shutting down.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// A rate limit refused the request.
    #[error("{}", limit_message(.0, false))]
    RateLimited(Box<RuleOutcome>),
    /// A budget is used up for its window.
    #[error("{}", limit_message(.0, true))]
    QuotaExceeded(Box<RuleOutcome>),
    /// The model's capacity and its wait queue are full, or the wait for a
    /// slot timed out.
    #[error("the model `{model}` is at capacity: try again shortly")]
    AtCapacity {
        /// The model.
        model: String,
        /// 429 or 503, as configured.
        status: u16,
    },
    /// The shared limit store cannot be reached and a rule fails closed.
    #[error("limits cannot be checked right now: try again shortly")]
    LimitsUnavailable(String),
    /// The request does not have the shape the model accepts, or breaks its
    /// parameter policy.
    #[error("{message}")]
    InvalidRequest {
        /// The JSON path of the field at fault.
        param: Option<String>,
        /// What is wrong.
        message: String,
        /// OpenAI's `code` for it.
        code: &'static str,
    },
    /// Prompt and output would not fit the model's context window.
    #[error(
        "This model's maximum context length is {window} tokens. However, you requested {total} tokens ({prompt} in the messages, {output} in the completion). Please reduce the length of the messages or completion.",
        total = prompt.saturating_add(*output)
    )]
    ContextLengthExceeded {
        /// The window.
        window: u64,
        /// Prompt tokens counted.
        prompt: u64,
        /// Output tokens asked for.
        output: u64,
    },
    /// A text the model would read looks like a prompt injection.
    #[error("the request was refused: the text at `{0}` looks like a prompt injection")]
    PromptInjection(String),
    /// The model's external prompt-injection detector gave no usable answer
    /// and fails closed; why (detector kind and failure, never its key) is
    /// audited, not returned.
    #[error("the request could not be checked for prompt injection: the detector is unavailable, try again shortly")]
    DetectorUnavailable(String),
    /// Rows of a tabular request lie outside the model's input profile.
    #[error("{0}")]
    OutOfDistribution(String),
    /// The OIP v2 inputs do not match what the model takes.
    #[error("invalid inputs: {0}")]
    InvalidOipInput(String),
    /// A streamed response outgrew the output tokens reserved for it.
    #[error("the response exceeded the {0} output tokens reserved for it and was cut off")]
    OutputLimitExceeded(u64),
}

/// The message of a limit refusal, in the manner of OpenAI's.
fn limit_message(o: &RuleOutcome, quota: bool) -> String {
    let what = if quota {
        "Budget exhausted"
    } else {
        "Rate limit reached"
    };
    let wait = match o.retry_after_ms {
        Some(ms) => format!("Please try again in {}.", crate::limits::headers::openai_duration(ms)),
        None => "This request is larger than the limit and can never pass.".to_owned(),
    };
    // Dollars are kept in micro-dollars and compute in milliseconds; the
    // message speaks in dollars and seconds.
    let amount = |v: u64| match o.unit {
        "dollars" => format!("${}.{:06}", v / 1_000_000, v % 1_000_000),
        "compute_seconds" => format!("{}.{:03}s", v / 1000, v % 1000),
        _ => v.to_string(),
    };
    format!(
        "{what} for {unit} (rule `{rule}`): limit {limit}, remaining {remaining}, requested {cost}. {wait}",
        unit = o.unit,
        rule = o.rule,
        limit = amount(o.limit),
        remaining = amount(o.remaining),
        cost = amount(o.cost),
    )
}

/// Who caused a failure, recorded in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// The caller sent something wrong or is not allowed.
    Client,
    /// The model server failed.
    Upstream,
    /// Warden itself.
    Gateway,
}

impl Reject {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Reject::MissingCredential
            | Reject::InvalidCredential
            | Reject::InvalidToken(_)
            | Reject::ClientCertificateRequired(_)
            | Reject::AuthMethodNotAccepted(_)
            | Reject::ConflictingCredentials => StatusCode::UNAUTHORIZED,
            Reject::ModelNotAllowed(_)
            | Reject::PolicyDenied(_)
            | Reject::TenantHeaderNotAllowed(_)
            | Reject::TenantNotAllowed(_)
            | Reject::ActionDenied(_)
            | Reject::OutputBlocked => StatusCode::FORBIDDEN,
            Reject::TenantMissing(_)
            | Reject::TenantInvalid(_)
            | Reject::InvalidRequest { .. }
            | Reject::ContextLengthExceeded { .. }
            | Reject::PromptInjection(_)
            | Reject::OutOfDistribution(_)
            | Reject::InvalidOipInput(_)
            | Reject::StreamNotInspected(_) => StatusCode::BAD_REQUEST,
            Reject::TooManyAuthFailures(_) | Reject::RateLimited(_) | Reject::QuotaExceeded(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Reject::AtCapacity { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
            Reject::LimitsUnavailable(_) | Reject::DetectorUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Reject::OutputLimitExceeded(_) => StatusCode::TOO_MANY_REQUESTS,
            Reject::UnknownRoute(_) | Reject::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Reject::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Reject::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Reject::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Reject::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Reject::BodyRead | Reject::InvalidJson(_) | Reject::JsonTooDeep(_) | Reject::InvalidField { .. } => {
                StatusCode::BAD_REQUEST
            }
            Reject::UpstreamUnreachable
            | Reject::UpstreamInvalid
            | Reject::UpstreamAuth
            | Reject::OutputNotInspectable => StatusCode::BAD_GATEWAY,
            Reject::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reject::ShuttingDown | Reject::AuthenticationUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable machine-readable reason: the OpenAI `code`, the audit
    /// record's `reject_reason` and the metrics label.
    pub fn code(&self) -> &'static str {
        match self {
            Reject::MissingCredential => "missing_api_key",
            Reject::InvalidCredential => "invalid_api_key",
            Reject::InvalidToken(_) => "invalid_token",
            Reject::TooManyAuthFailures(_) => "too_many_authentication_failures",
            Reject::ClientCertificateRequired(_) => "client_certificate_required",
            Reject::AuthMethodNotAccepted(_) => "authentication_method_not_accepted",
            Reject::ConflictingCredentials => "conflicting_credentials",
            Reject::UnknownRoute(_) => "unknown_route",
            Reject::MethodNotAllowed(_) => "method_not_allowed",
            Reject::UnsupportedMediaType => "unsupported_media_type",
            Reject::BodyTooLarge { .. } => "request_too_large",
            Reject::BodyTimeout => "request_timeout",
            Reject::BodyRead => "body_read_error",
            Reject::InvalidJson(_) => "invalid_json",
            Reject::JsonTooDeep(_) => "json_too_deep",
            Reject::InvalidField { .. } => "invalid_field",
            Reject::ModelNotFound(_) => "model_not_found",
            Reject::ModelNotAllowed(_) => "model_not_allowed",
            Reject::PolicyDenied(_) => "policy_denied",
            Reject::ActionDenied(_) => "action_denied",
            Reject::TenantMissing(_) => "tenant_missing",
            Reject::TenantInvalid(_) => "tenant_invalid",
            Reject::TenantHeaderNotAllowed(_) => "tenant_header_not_allowed",
            Reject::TenantNotAllowed(_) => "tenant_not_allowed",
            Reject::UpstreamUnreachable => "upstream_unreachable",
            Reject::UpstreamTimeout => "upstream_timeout",
            Reject::UpstreamInvalid => "invalid_upstream_response",
            Reject::UpstreamAuth => "upstream_auth_failed",
            Reject::OutputBlocked => "output_blocked",
            Reject::OutputNotInspectable => "output_not_inspectable",
            Reject::StreamNotInspected(_) => "stream_not_supported",
            Reject::ShuttingDown => "shutting_down",
            Reject::AuthenticationUnavailable => "authentication_unavailable",
            Reject::RateLimited(_) => "rate_limit_exceeded",
            Reject::QuotaExceeded(_) => "insufficient_quota",
            Reject::AtCapacity { .. } => "model_at_capacity",
            Reject::LimitsUnavailable(_) => "limits_unavailable",
            Reject::OutputLimitExceeded(_) => "output_limit_exceeded",
            Reject::InvalidRequest { code, .. } => code,
            Reject::ContextLengthExceeded { .. } => "context_length_exceeded",
            Reject::PromptInjection(_) => "prompt_injection_detected",
            Reject::DetectorUnavailable(_) => "detector_unavailable",
            Reject::OutOfDistribution(_) => "input_out_of_distribution",
            Reject::InvalidOipInput(_) => "invalid_inputs",
        }
    }

    /// The OpenAI error `type`.
    fn openai_type(&self) -> &'static str {
        match self {
            // OpenAI names the limited unit as the type of a 429.
            Reject::RateLimited(o) if o.unit.ends_with("_tokens") => return "tokens",
            Reject::RateLimited(_) => return "requests",
            Reject::QuotaExceeded(_) => return "insufficient_quota",
            // As the stream's halt event types it (`output::halt_event`).
            Reject::OutputBlocked => return "content_policy_violation",
            _ => {}
        }
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            s if s.is_server_error() => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// The request field at fault, when there is one.
    fn param(&self) -> Option<&str> {
        match self {
            Reject::InvalidField { param, .. } => Some(param),
            Reject::InvalidRequest { param, .. } => param.as_deref(),
            Reject::PromptInjection(place) => Some(place),
            Reject::ContextLengthExceeded { .. } => Some("messages"),
            Reject::StreamNotInspected(_) => Some("stream"),
            Reject::ModelNotFound(_) | Reject::ModelNotAllowed(_) | Reject::PolicyDenied(_) => Some("model"),
            _ => None,
        }
    }

    /// The finer reason recorded in the audit log, never sent to the client.
    pub fn detail(&self) -> Option<String> {
        match self {
            Reject::InvalidToken(e) => Some(e.to_string()),
            Reject::LimitsUnavailable(rule) => Some(format!("store unreachable; rule `{rule}` fails closed")),
            Reject::DetectorUnavailable(reason) => Some(reason.clone()),
            _ => None,
        }
    }

    /// Who is at fault.
    pub fn fault(&self) -> Fault {
        match self {
            Reject::UpstreamUnreachable
            | Reject::UpstreamTimeout
            | Reject::UpstreamInvalid
            | Reject::OutputBlocked
            | Reject::OutputNotInspectable => Fault::Upstream,
            Reject::UpstreamAuth
            | Reject::ShuttingDown
            | Reject::AuthenticationUnavailable
            | Reject::LimitsUnavailable(_)
            | Reject::DetectorUnavailable(_)
            | Reject::AtCapacity { .. } => Fault::Gateway,
            _ => Fault::Client,
        }
    }

    /// Whether a retry could succeed. The OpenAI SDKs retry 408/409/429/5xx
    /// unless told not to, and a retry cannot fix a denial.
    fn retryable(&self) -> bool {
        if let Reject::RateLimited(o) = self {
            return o.retry_after_ms.is_some();
        }
        matches!(
            self,
            Reject::AtCapacity { .. }
                | Reject::LimitsUnavailable(_)
                | Reject::DetectorUnavailable(_)
                | Reject::BodyTimeout
                | Reject::UpstreamUnreachable
                | Reject::UpstreamTimeout
                | Reject::ShuttingDown
                | Reject::AuthenticationUnavailable
        )
    }

    /// The response body in the protocol's error format.
    pub fn body(&self, protocol: Protocol) -> Bytes {
        let message = self.to_string();
        let value = match protocol {
            Protocol::Openai => serde_json::json!({
                "error": {
                    "message": message,
                    "type": self.openai_type(),
                    "param": self.param(),
                    "code": self.code(),
                }
            }),
            Protocol::OipV2 => serde_json::json!({ "error": message }),
        };
        Bytes::from(value.to_string())
    }

    /// Status, headers and body of the response for this rejection.
    pub fn into_parts(&self, protocol: Protocol) -> (http::response::Parts, Bytes) {
        let mut response = http::Response::new(());
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            "x-should-retry",
            HeaderValue::from_static(if self.retryable() { "true" } else { "false" }),
        );
        let wait_ms = match self {
            Reject::TooManyAuthFailures(wait) => Some(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
            Reject::RateLimited(o) | Reject::QuotaExceeded(o) => o.retry_after_ms,
            _ => None,
        };
        if let Some(ms) = wait_ms {
            // Retry-After is whole seconds, rounded up; the OpenAI SDKs
            // prefer the finer retry-after-ms.
            if let Ok(value) = HeaderValue::from_str(&ms.div_ceil(1000).to_string()) {
                headers.insert(http::header::RETRY_AFTER, value);
            }
            if let Ok(value) = HeaderValue::from_str(&ms.to_string()) {
                headers.insert("retry-after-ms", value);
            }
        }
        if self.status() == StatusCode::UNAUTHORIZED {
            headers.insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        let (parts, ()) = response.into_parts();
        (parts, self.body(protocol))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn openai_body_has_the_four_fields() {
        let body = Reject::ModelNotAllowed("fraud".into()).body(Protocol::Openai);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {
                "message": "you are not allowed to call the model `fraud`",
                "type": "permission_error",
                "param": "model",
                "code": "model_not_allowed"
            }})
        );
    }

    #[test]
    fn oip_body_is_a_string() {
        let body = Reject::InvalidCredential.body(Protocol::OipV2);
        assert_eq!(&body[..], br#"{"error":"invalid API key"}"#);
    }

    #[test]
    fn an_unavailable_detector_is_a_503_that_keeps_its_reason_for_the_audit() {
        let reject = Reject::DetectorUnavailable("lakera: no answer within 500ms; failed closed".into());
        let (parts, body) = reject.into_parts(Protocol::Openai);
        assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(parts.headers["x-should-retry"], "true");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {
                "message": "the request could not be checked for prompt injection: the detector is unavailable, try again shortly",
                "type": "api_error",
                "param": null,
                "code": "detector_unavailable"
            }})
        );
        assert_eq!(
            &reject.body(Protocol::OipV2)[..],
            br#"{"error":"the request could not be checked for prompt injection: the detector is unavailable, try again shortly"}"#
        );
        assert_eq!(
            reject.detail().as_deref(),
            Some("lakera: no answer within 500ms; failed closed")
        );
        assert_eq!(reject.fault(), Fault::Gateway);
    }

    #[test]
    fn denials_are_not_retried_but_outages_are() {
        let (parts, _) = Reject::ModelNotAllowed("m".into()).into_parts(Protocol::Openai);
        assert_eq!(parts.headers["x-should-retry"], "false");
        let (parts, _) = Reject::UpstreamTimeout.into_parts(Protocol::Openai);
        assert_eq!(parts.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(parts.headers["x-should-retry"], "true");
    }
}
