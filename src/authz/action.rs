//! The action level: what the request asks the model to do — the operation
//! and the parameters a policy may constrain — read from the parsed body.

use serde::Serialize;
use serde_json::Value;

use crate::route::Operation;

/// The operation and its constrainable parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ActionParams {
    /// `chat`, `completion`, `embedding` or `predict`.
    pub operation: String,
    /// Whether a streamed answer is asked for.
    pub stream: bool,
    /// `max_tokens` (or `max_completion_tokens`); 0 when not given.
    pub max_tokens: i64,
    /// `n`; 1 when not given.
    pub n: i64,
    /// Whether token log-probabilities are asked for (`logprobs`,
    /// `top_logprobs`), which make model extraction cheaper.
    pub logprobs: bool,
    /// Names of the tools (functions) offered.
    pub tools: Vec<String>,
    /// `tool_choice`: `auto`, `none`, `required`, a function name, or `""`.
    pub tool_choice: String,
    /// `response_format.type`, or `""`.
    pub response_format: String,
    /// OIP v2: the outputs asked for by name.
    pub outputs: Vec<String>,
}

/// Reads the action parameters of a request body.
pub fn params(operation: Operation, stream: bool, body: &Value) -> ActionParams {
    let int = |name: &str| body.get(name).and_then(Value::as_i64);
    let logprobs = match body.get("logprobs") {
        Some(Value::Bool(b)) => *b,
        // Legacy completions: an integer number of log-probabilities.
        Some(Value::Number(n)) => n.as_i64().is_some_and(|n| n > 0),
        _ => false,
    } || body.get("top_logprobs").is_some_and(|v| !v.is_null());
    let tools = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let tool_choice = match body.get("tool_choice") {
        Some(Value::String(s)) => s.clone(),
        Some(choice) => choice
            .pointer("/function/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        None => String::new(),
    };
    let outputs = body
        .get("outputs")
        .and_then(Value::as_array)
        .map(|outs| {
            outs.iter()
                .filter_map(|o| o.get("name").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    ActionParams {
        operation: match operation {
            Operation::ChatCompletions => "chat",
            Operation::Completions => "completion",
            Operation::Embeddings => "embedding",
            _ => "predict",
        }
        .to_owned(),
        stream,
        max_tokens: int("max_completion_tokens").or_else(|| int("max_tokens")).unwrap_or(0),
        n: int("n").unwrap_or(1),
        logprobs,
        tools,
        tool_choice,
        response_format: body
            .pointer("/response_format/type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        outputs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_read_from_the_body() {
        let body = serde_json::json!({
            "model": "m", "max_tokens": 50, "n": 2, "top_logprobs": 3,
            "tools": [{"type": "function", "function": {"name": "refund"}}, {"type": "function", "function": {"name": "lookup"}}],
            "tool_choice": {"type": "function", "function": {"name": "refund"}},
            "response_format": {"type": "json_schema"},
        });
        let p = params(Operation::ChatCompletions, true, &body);
        assert_eq!(p.operation, "chat");
        assert!(p.stream && p.logprobs);
        assert_eq!((p.max_tokens, p.n), (50, 2));
        assert_eq!(p.tools, ["refund", "lookup"]);
        assert_eq!(p.tool_choice, "refund");
        assert_eq!(p.response_format, "json_schema");
        let p = params(
            Operation::Infer,
            false,
            &serde_json::json!({"inputs": [], "outputs": [{"name": "risk_score"}]}),
        );
        assert_eq!(
            (p.operation.as_str(), p.n, p.outputs.as_slice()),
            ("predict", 1, &["risk_score".to_owned()][..])
        );
        assert!(!params(Operation::Completions, false, &serde_json::json!({"logprobs": 0})).logprobs);
    }
}
