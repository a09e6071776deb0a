//! OpenAI-compatible chat model simulator.
//!
//! Implements `POST /v1/chat/completions` (text, tool calls, SSE streaming), `POST
//! /v1/completions`, `POST /v1/embeddings` and `GET /v1/models` with OpenAI's exact response
//! shapes, but without any model: the reply quotes the last user message, tool calls fill the
//! required parameters with placeholder values and embeddings are pseudo-random unit vectors
//! seeded from SHA-256 of the input. Everything is deterministic except `created`.
//!
//! Token counts are *word* counts: whitespace-separated words of every message plus
//! [`TOKENS_PER_MESSAGE`] per chat message, which is close enough to exercise token accounting.

use std::borrow::Cow;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{DemoBody, json_response, read_body, response};

/// The one model the simulator lists; any requested model name is accepted and echoed back.
pub const MODEL_ID: &str = "demo-chat";
/// Per-message overhead added to `prompt_tokens`, mimicking OpenAI's chat formatting tokens.
pub const TOKENS_PER_MESSAGE: u64 = 3;
const DEFAULT_EMBEDDING_DIMENSIONS: usize = 8;
const MAX_EMBEDDING_DIMENSIONS: usize = 3072;
/// OpenAI's own upper bound for `n`.
const MAX_CHOICES: u32 = 128;

pub(crate) async fn handle(req: Request<Incoming>) -> Response<DemoBody> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let endpoint: fn(&[u8]) -> Result<Response<DemoBody>, ApiError> = match (&parts.method, path) {
        (&Method::POST, "/v1/chat/completions") => chat_completions,
        (&Method::POST, "/v1/completions") => completions,
        (&Method::POST, "/v1/embeddings") => embeddings,
        (&Method::GET, "/v1/models") => return json_response(StatusCode::OK, &ModelList::new()),
        (&Method::GET, _) if path.starts_with("/v1/models/") => {
            let model = path.trim_start_matches("/v1/models/");
            if model == MODEL_ID {
                return json_response(StatusCode::OK, &ModelCard::DEMO);
            }
            return ApiError::new(StatusCode::NOT_FOUND, format!("The model `{model}` does not exist"))
                .param("model")
                .code("model_not_found")
                .into_response();
        }
        (_, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" | "/v1/models") => {
            let message = format!("Method {} is not allowed for {path}", parts.method);
            return ApiError::new(StatusCode::METHOD_NOT_ALLOWED, message).into_response();
        }
        _ => {
            let message = format!("Invalid URL ({} {path})", parts.method);
            return ApiError::new(StatusCode::NOT_FOUND, message).into_response();
        }
    };
    let result = match read_body(body).await {
        Ok(bytes) => endpoint(&bytes),
        Err((status, message)) => Err(ApiError::new(status, message.to_owned())),
    };
    result.unwrap_or_else(ApiError::into_response)
}

// ---------------------------------------------------------------------------------------------
// Requests

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    /// Newer clients send this instead of the deprecated `max_tokens`.
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    tools: Option<Vec<Tool>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    n: Option<u32>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    /// Null for assistant messages that only carry tool calls.
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// Non-text parts (images, audio) are accepted and ignored.
#[derive(Deserialize)]
struct ContentPart {
    #[serde(default)]
    text: Option<String>,
}

impl ChatMessage {
    fn words(&self) -> u64 {
        match &self.content {
            None => 0,
            Some(Content::Text(text)) => words(text),
            Some(Content::Parts(parts)) => parts.iter().filter_map(|p| p.text.as_deref()).map(words).sum(),
        }
    }

    fn text(&self) -> Cow<'_, str> {
        match &self.content {
            None => Cow::Borrowed(""),
            Some(Content::Text(text)) => Cow::Borrowed(text),
            Some(Content::Parts(parts)) => Cow::Owned(
                parts
                    .iter()
                    .filter_map(|p| p.text.as_deref())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        }
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Tool {
    function: FunctionDef,
}

#[derive(Deserialize)]
struct FunctionDef {
    name: String,
    #[serde(default)]
    parameters: Option<Value>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Value,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: Value,
    #[serde(default)]
    dimensions: Option<u64>,
    #[serde(default)]
    encoding_format: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Responses

#[derive(Serialize, Clone, Copy)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl Usage {
    fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// A non-streamed `chat.completion` or `text_completion`.
#[derive(Serialize)]
struct Completion<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<C>,
    usage: Usage,
}

/// One streamed chunk; `choices` is empty in the trailing usage chunk.
#[derive(Serialize)]
struct Chunk<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [C],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize, Clone, Copy)]
struct ChatChoice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize, Clone, Copy)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCall<'a>; 1]>,
}

#[derive(Serialize, Clone, Copy)]
struct ToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionCall<'a>,
}

#[derive(Serialize, Clone, Copy)]
struct FunctionCall<'a> {
    name: &'a str,
    arguments: &'a str,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallDelta<'a>; 1]>,
}

#[derive(Serialize)]
struct ToolCallDelta<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDelta<'a>,
}

#[derive(Serialize)]
struct FunctionDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    text: &'a str,
    index: u32,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<Embedding>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: [ModelCard; 1],
}

impl ModelList {
    fn new() -> Self {
        Self {
            object: "list",
            data: [ModelCard::DEMO],
        }
    }
}

#[derive(Serialize)]
struct ModelCard {
    id: &'static str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

impl ModelCard {
    const DEMO: Self = Self {
        id: MODEL_ID,
        object: "model",
        created: 0,
        owned_by: "warden-demo",
    };
}

/// An OpenAI-style error: `{"error":{"message","type","param","code"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: String) -> Self {
        Self {
            status,
            message,
            param: None,
            code: None,
        }
    }

    fn bad(message: impl Into<String>, param: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message.into()).param(param)
    }

    fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn into_response(self) -> Response<DemoBody> {
        #[derive(Serialize)]
        struct Envelope<'a> {
            error: Detail<'a>,
        }
        #[derive(Serialize)]
        struct Detail<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'static str,
            param: Option<&'static str>,
            code: Option<&'static str>,
        }
        let detail = Detail {
            message: &self.message,
            kind: "invalid_request_error",
            param: self.param,
            code: self.code,
        };
        json_response(self.status, &Envelope { error: detail })
    }
}

// ---------------------------------------------------------------------------------------------
// Endpoints

/// What the simulated assistant answers with.
enum Output {
    Text {
        content: String,
        finish_reason: &'static str,
    },
    ToolCall {
        id: String,
        name: String,
        arguments: String,
    },
}

fn chat_completions(body: &[u8]) -> Result<Response<DemoBody>, ApiError> {
    let req: ChatRequest = parse(body)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad(
            "`messages` must contain at least one message",
            "messages",
        ));
    }
    let n = match req.n.unwrap_or(1) {
        n @ 1..=MAX_CHOICES => n,
        _ => {
            return Err(ApiError::bad(format!("`n` must be between 1 and {MAX_CHOICES}"), "n"));
        }
    };
    let max_tokens = token_limit(req.max_completion_tokens.or(req.max_tokens))?;
    let prompt_tokens = req.messages.iter().map(|m| m.words() + TOKENS_PER_MESSAGE).sum();
    let user_text = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(ChatMessage::text);
    let user_text = user_text.as_deref().unwrap_or_default();

    let digest = Sha256::digest(body);
    let id = format!("chatcmpl-{}", hex::encode(&digest[..12]));
    let created = unix_now();
    let output = match select_tool(&req)? {
        Some(tool) => Output::ToolCall {
            id: format!("call_{}", hex::encode(&digest[12..24])),
            name: tool.name.clone(),
            arguments: tool_arguments(tool, user_text),
        },
        None => {
            let (content, finish_reason) = reply(user_text, max_tokens);
            Output::Text { content, finish_reason }
        }
    };
    let completion_tokens = match &output {
        Output::Text { content, .. } => words(content),
        Output::ToolCall { name, arguments, .. } => words(name) + words(arguments),
    };
    let usage = Usage::new(prompt_tokens, completion_tokens * u64::from(n));

    if req.stream != Some(true) {
        let (message, finish_reason) = match &output {
            Output::Text { content, finish_reason } => {
                let message = AssistantMessage {
                    role: "assistant",
                    content: Some(content),
                    tool_calls: None,
                };
                (message, *finish_reason)
            }
            Output::ToolCall { id, name, arguments } => {
                let call = ToolCall {
                    id,
                    kind: "function",
                    function: FunctionCall { name, arguments },
                };
                (
                    AssistantMessage {
                        role: "assistant",
                        content: None,
                        tool_calls: Some([call]),
                    },
                    "tool_calls",
                )
            }
        };
        let choices = (0..n)
            .map(|index| ChatChoice {
                index,
                message,
                logprobs: None,
                finish_reason,
            })
            .collect();
        let completion = Completion {
            id: &id,
            object: "chat.completion",
            created,
            model: &req.model,
            choices,
            usage,
        };
        return Ok(json_response(StatusCode::OK, &completion));
    }

    let mut sse = Sse::new(&id, "chat.completion.chunk", created, &req.model);
    let choice = |index, delta, finish_reason| ChunkChoice {
        index,
        delta,
        logprobs: None,
        finish_reason,
    };
    for index in 0..n {
        match &output {
            Output::Text { content, finish_reason } => {
                sse.choice(choice(
                    index,
                    Delta {
                        role: Some("assistant"),
                        content: Some(""),
                        tool_calls: None,
                    },
                    None,
                ));
                for word in content.split_inclusive(' ') {
                    sse.choice(choice(
                        index,
                        Delta {
                            content: Some(word),
                            ..Delta::default()
                        },
                        None,
                    ));
                }
                sse.choice(choice(index, Delta::default(), Some(*finish_reason)));
            }
            Output::ToolCall { id, name, arguments } => {
                let call = |id, kind, name, arguments| {
                    let tool_calls = [ToolCallDelta {
                        index: 0,
                        id,
                        kind,
                        function: FunctionDelta { name, arguments },
                    }];
                    Delta {
                        tool_calls: Some(tool_calls),
                        ..Delta::default()
                    }
                };
                let first = Delta {
                    role: Some("assistant"),
                    ..call(Some(id.as_str()), Some("function"), Some(name.as_str()), "")
                };
                sse.choice(choice(index, first, None));
                for fragment in fragments(arguments) {
                    sse.choice(choice(index, call(None, None, None, fragment), None));
                }
                sse.choice(choice(index, Delta::default(), Some("tool_calls")));
            }
        }
    }
    if include_usage(req.stream_options.as_ref()) {
        sse.usage::<ChunkChoice>(usage);
    }
    Ok(sse.finish())
}

fn completions(body: &[u8]) -> Result<Response<DemoBody>, ApiError> {
    let req: CompletionRequest = parse(body)?;
    let prompts = strings(&req.prompt, "prompt")?;
    let max_tokens = token_limit(req.max_tokens)?;
    let replies: Vec<(String, &'static str)> = prompts.iter().map(|p| reply(p, max_tokens)).collect();
    let prompt_tokens = prompts.iter().map(|p| words(p)).sum();
    let usage = Usage::new(prompt_tokens, replies.iter().map(|(text, _)| words(text)).sum());
    let id = format!("cmpl-{}", hex::encode(&Sha256::digest(body)[..12]));
    let created = unix_now();

    if req.stream != Some(true) {
        let choices = (0..)
            .zip(&replies)
            .map(|(index, (text, finish))| TextChoice {
                text,
                index,
                logprobs: None,
                finish_reason: Some(*finish),
            })
            .collect();
        let completion = Completion {
            id: &id,
            object: "text_completion",
            created,
            model: &req.model,
            choices,
            usage,
        };
        return Ok(json_response(StatusCode::OK, &completion));
    }

    let mut sse = Sse::new(&id, "text_completion", created, &req.model);
    for (index, (text, finish)) in (0..).zip(&replies) {
        for word in text.split_inclusive(' ') {
            sse.choice(TextChoice {
                text: word,
                index,
                logprobs: None,
                finish_reason: None,
            });
        }
        sse.choice(TextChoice {
            text: "",
            index,
            logprobs: None,
            finish_reason: Some(*finish),
        });
    }
    if include_usage(req.stream_options.as_ref()) {
        sse.usage::<TextChoice>(usage);
    }
    Ok(sse.finish())
}

fn embeddings(body: &[u8]) -> Result<Response<DemoBody>, ApiError> {
    let req: EmbeddingRequest = parse(body)?;
    let inputs = strings(&req.input, "input")?;
    let dimensions = match req.dimensions {
        None => DEFAULT_EMBEDDING_DIMENSIONS,
        Some(d @ 1..) if d <= MAX_EMBEDDING_DIMENSIONS as u64 => d as usize,
        Some(_) => {
            let message = format!("`dimensions` must be between 1 and {MAX_EMBEDDING_DIMENSIONS}");
            return Err(ApiError::bad(message, "dimensions"));
        }
    };
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => {
            return Err(ApiError::bad(
                "`encoding_format` must be `float` or `base64`",
                "encoding_format",
            ));
        }
    };
    let data = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let vector = embed(text, dimensions);
            let embedding = if base64 {
                Vector::Base64(base64_f32(&vector))
            } else {
                Vector::Float(vector)
            };
            Embedding {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    let tokens = inputs.iter().map(|t| words(t)).sum();
    let usage = EmbeddingUsage {
        prompt_tokens: tokens,
        total_tokens: tokens,
    };
    Ok(json_response(
        StatusCode::OK,
        &EmbeddingList {
            object: "list",
            data,
            model: &req.model,
            usage,
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("We could not parse the JSON body of your request: {e}"),
        )
    })
}

fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn token_limit(limit: Option<u64>) -> Result<Option<u64>, ApiError> {
    match limit {
        Some(0) => Err(ApiError::bad("`max_tokens` must be at least 1", "max_tokens")),
        other => Ok(other),
    }
}

fn include_usage(options: Option<&StreamOptions>) -> bool {
    options.and_then(|o| o.include_usage).unwrap_or(false)
}

/// `prompt` and `input` are a string or an array of strings (token arrays are not simulated).
fn strings<'a>(value: &'a Value, param: &'static str) -> Result<Vec<&'a str>, ApiError> {
    let invalid = || {
        ApiError::bad(
            format!("`{param}` must be a string or a non-empty array of strings"),
            param,
        )
    };
    match value {
        Value::String(text) => Ok(vec![text]),
        Value::Array(items) if !items.is_empty() => items.iter().map(|i| i.as_str().ok_or_else(invalid)).collect(),
        _ => Err(invalid()),
    }
}

/// The simulated answer, whitespace-normalised and cut to `max_tokens` words.
fn reply(user_text: &str, max_tokens: Option<u64>) -> (String, &'static str) {
    let user_text = user_text.trim();
    let full = if user_text.is_empty() {
        Cow::Borrowed("Hello! This is Warden's demo model.")
    } else {
        Cow::Owned(format!("You said: \"{user_text}\". This is Warden's demo model."))
    };
    let limit = max_tokens.map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
    let mut content = String::with_capacity(full.len());
    let mut finish_reason = "stop";
    for (i, word) in full.split_whitespace().enumerate() {
        if i == limit {
            finish_reason = "length";
            break;
        }
        if i > 0 {
            content.push(' ');
        }
        content.push_str(word);
    }
    (content, finish_reason)
}

/// Tool to call, if any: `tool_choice` `"none"` disables tools, a named function selects it,
/// anything else (`"auto"`, `"required"`, absent) picks the first tool.
fn select_tool(req: &ChatRequest) -> Result<Option<&FunctionDef>, ApiError> {
    let tools = req.tools.as_deref().unwrap_or_default();
    let Some(first) = tools.first() else {
        return Ok(None);
    };
    match &req.tool_choice {
        None => Ok(Some(&first.function)),
        Some(Value::String(choice)) => match choice.as_str() {
            "none" => Ok(None),
            "auto" | "required" => Ok(Some(&first.function)),
            _ => Err(ApiError::bad(
                "`tool_choice` must be none, auto, required or a function",
                "tool_choice",
            )),
        },
        Some(choice) => {
            let name = choice
                .pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad("`tool_choice` object must name a function", "tool_choice"))?;
            let tool = tools.iter().find(|t| t.function.name == name);
            let tool = tool.ok_or_else(|| {
                ApiError::bad(format!("`tool_choice` names unknown function `{name}`"), "tool_choice")
            })?;
            Ok(Some(&tool.function))
        }
    }
}

/// Placeholder arguments for every required parameter, typed from its JSON schema.
fn tool_arguments(function: &FunctionDef, user_text: &str) -> String {
    let parameters = function.parameters.as_ref();
    let required = parameters.and_then(|p| p.get("required")).and_then(Value::as_array);
    let mut arguments = Map::new();
    for name in required.into_iter().flatten().filter_map(Value::as_str) {
        let schema_type = parameters
            .and_then(|p| p.get("properties"))
            .and_then(|p| p.get(name))
            .and_then(|p| p.get("type"));
        // A nullable parameter is declared as `["string", "null"]`: fill in the non-null type.
        let schema_type = match schema_type {
            Some(Value::Array(types)) => types.iter().filter_map(Value::as_str).find(|t| *t != "null"),
            other => other.and_then(Value::as_str),
        };
        let value = match schema_type {
            Some("string") => Value::from(user_text),
            Some("integer" | "number") => Value::from(1),
            Some("boolean") => Value::Bool(true),
            _ => Value::Null,
        };
        arguments.insert(name.to_owned(), value);
    }
    Value::Object(arguments).to_string()
}

/// Splits `text` into up to three pieces on char boundaries, like a model streaming arguments.
fn fragments(text: &str) -> Vec<&str> {
    let chars = text.chars().count();
    let pieces = chars.clamp(1, 3);
    let mut boundaries: Vec<usize> = (1..pieces)
        .filter_map(|k| text.char_indices().nth(k * chars / pieces).map(|(at, _)| at))
        .collect();
    boundaries.push(text.len());
    let mut start = 0;
    boundaries
        .into_iter()
        .map(|end| {
            let piece = &text[start..end];
            start = end;
            piece
        })
        .collect()
}

/// A deterministic unit vector: a SplitMix64 stream seeded from SHA-256 of the text.
fn embed(text: &str, dimensions: usize) -> Vec<f32> {
    let digest = Sha256::digest(text.as_bytes());
    let mut state = digest.iter().take(8).fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    let raw: Vec<f64> = (0..dimensions)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    let norm = raw.iter().map(|v| v * v).sum::<f64>().sqrt();
    let norm = if norm > 0.0 { norm } else { 1.0 };
    raw.into_iter().map(|v| (v / norm) as f32).collect()
}

/// OpenAI's `encoding_format: "base64"`: standard base64 of the little-endian f32 array. The
/// official Python client asks for this by default.
fn base64_f32(vector: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Accumulates pre-rendered `data: <json>\n\n` events; each becomes its own body frame.
struct Sse<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    events: Vec<Bytes>,
}

impl<'a> Sse<'a> {
    fn new(id: &'a str, object: &'static str, created: u64, model: &'a str) -> Self {
        Self {
            id,
            object,
            created,
            model,
            events: Vec::new(),
        }
    }

    fn choice<C: Serialize>(&mut self, choice: C) {
        self.push(std::slice::from_ref(&choice), None);
    }

    fn usage<C: Serialize>(&mut self, usage: Usage) {
        self.push::<C>(&[], Some(usage));
    }

    fn push<C: Serialize>(&mut self, choices: &[C], usage: Option<Usage>) {
        let chunk = Chunk {
            id: self.id,
            object: self.object,
            created: self.created,
            model: self.model,
            choices,
            usage,
        };
        let mut event = Vec::with_capacity(256);
        event.extend_from_slice(b"data: ");
        match serde_json::to_writer(&mut event, &chunk) {
            Ok(()) => {
                event.extend_from_slice(b"\n\n");
                self.events.push(event.into());
            }
            Err(error) => tracing::error!(%error, "chat simulator failed to serialise a chunk"),
        }
    }

    fn finish(mut self) -> Response<DemoBody> {
        self.events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        let mut response = response(StatusCode::OK, "text/event-stream", DemoBody::stream(self.events));
        response
            .headers_mut()
            .insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
        response
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::demo::serve_chat_simulator;
    use crate::demo::test_support::{Reply, send, send_with, start};

    async fn post(addr: std::net::SocketAddr, path: &str, body: &Value) -> Reply {
        send(addr, "POST", path, Some(&body.to_string())).await
    }

    /// Splits an SSE body into its `data:` payloads, checking the framing on the way.
    fn events(reply: &Reply) -> Vec<String> {
        assert_eq!(reply.headers["content-type"], "text/event-stream");
        assert_eq!(reply.headers["cache-control"], "no-cache");
        let text = reply.text();
        assert!(text.ends_with("\n\n"));
        text.trim_end()
            .split("\n\n")
            .map(|e| e.strip_prefix("data: ").unwrap().to_owned())
            .collect()
    }

    fn parse_chunks(events: &[String]) -> Vec<Value> {
        assert_eq!(events.last().unwrap(), "[DONE]");
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect()
    }

    fn conversation() -> Value {
        json!({
            "model": "my-model",
            "messages": [
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "Hello there demo"}
            ]
        })
    }

    const EXPECTED: &str = "You said: \"Hello there demo\". This is Warden's demo model.";

    #[tokio::test]
    async fn chat_completion_round_trip() {
        let addr = start(serve_chat_simulator).await;
        let reply = post(addr, "/v1/chat/completions", &conversation()).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.headers["content-type"], "application/json");
        let body = reply.json();
        let id = body["id"].as_str().unwrap();
        let hex = id.strip_prefix("chatcmpl-").unwrap();
        assert_eq!(hex.len(), 24);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], "my-model");
        assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
        let choices = body["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 1);
        assert_eq!(choices[0]["index"], 0);
        assert_eq!(choices[0]["message"], json!({"role": "assistant", "content": EXPECTED}));
        assert_eq!(choices[0]["finish_reason"], "stop");
        // 3 + 3 words, plus 3 per message; the reply has 10 words.
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22})
        );

        let again = post(addr, "/v1/chat/completions", &conversation()).await.json();
        assert_eq!(again["id"], body["id"], "ids are derived from the body");
    }

    #[tokio::test]
    async fn chat_respects_max_tokens_parts_and_n() {
        let addr = start(serve_chat_simulator).await;
        let mut req = conversation();
        req["max_tokens"] = json!(3);
        let body = post(addr, "/v1/chat/completions", &req).await.json();
        assert_eq!(body["choices"][0]["message"]["content"], "You said: \"Hello");
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(body["usage"]["completion_tokens"], 3);

        let req = json!({
            "model": "m",
            "n": 2,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "part one"},
                {"type": "image_url", "image_url": {"url": "http://x"}},
                {"type": "text", "text": "part two"}
            ]}]
        });
        let body = post(addr, "/v1/chat/completions", &req).await.json();
        let choices = body["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 2);
        assert_eq!(choices[1]["index"], 1);
        assert_eq!(
            choices[1]["message"]["content"],
            "You said: \"part one part two\". This is Warden's demo model."
        );
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 22, "total_tokens": 29})
        );
    }

    #[tokio::test]
    async fn chat_streaming_events() {
        let addr = start(serve_chat_simulator).await;
        let mut req = conversation();
        req["stream"] = json!(true);
        req["stream_options"] = json!({"include_usage": true});
        let reply = post(addr, "/v1/chat/completions", &req).await;
        assert_eq!(reply.status, 200);
        let chunks = parse_chunks(&events(&reply));
        assert_eq!(chunks.len(), 1 + 10 + 1 + 1, "role, one per word, finish, usage");
        let id = chunks[0]["id"].as_str().unwrap();
        assert!(id.starts_with("chatcmpl-"));
        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["id"], id);
            assert_eq!(chunk["model"], "my-model");
        }
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert!(chunks[0]["choices"][0]["finish_reason"].is_null());
        let words: Vec<&str> = chunks[1..11]
            .iter()
            .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
            .collect();
        assert_eq!(words[0], "You ");
        assert_eq!(words[9], "model.");
        assert_eq!(words.concat(), EXPECTED);
        assert_eq!(chunks[11]["choices"][0]["delta"], json!({}));
        assert_eq!(chunks[11]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[12]["choices"], json!([]));
        assert_eq!(
            chunks[12]["usage"],
            json!({"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22})
        );
        assert!(chunks[..12].iter().all(|c| c.get("usage").is_none()));

        // Without include_usage there is no usage chunk.
        req["stream_options"] = json!(null);
        let chunks = parse_chunks(&events(&post(addr, "/v1/chat/completions", &req).await));
        assert_eq!(chunks.len(), 12);
        assert_eq!(chunks[11]["choices"][0]["finish_reason"], "stop");
    }

    fn tool_request() -> Value {
        json!({
            "model": "m",
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [
                {"type": "function", "function": {
                    "name": "get_weather",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string"},
                            "days": {"type": "integer"},
                            "metric": {"type": "boolean"},
                            "note": {"type": ["string", "null"]},
                            "extra": {"type": "object"},
                            "optional": {"type": "string"}
                        },
                        "required": ["city", "days", "metric", "note", "extra"]
                    }
                }},
                {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
            ]
        })
    }

    #[tokio::test]
    async fn chat_tool_calls() {
        let addr = start(serve_chat_simulator).await;
        let body = post(addr, "/v1/chat/completions", &tool_request()).await.json();
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        let message = &choice["message"];
        assert_eq!(message["role"], "assistant");
        assert!(message["content"].is_null());
        let call = &message["tool_calls"][0];
        assert!(call["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "get_weather");
        let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(
            arguments,
            json!({"city": "Weather in Paris?", "days": 1, "metric": true, "note": "Weather in Paris?", "extra": null})
        );

        let mut req = tool_request();
        req["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
        let body = post(addr, "/v1/chat/completions", &req).await.json();
        let function = &body["choices"][0]["message"]["tool_calls"][0]["function"];
        assert_eq!(function["name"], "get_time");
        assert_eq!(function["arguments"], "{}");

        req["tool_choice"] = json!("none");
        let body = post(addr, "/v1/chat/completions", &req).await.json();
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert!(
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .contains("Weather in Paris?")
        );

        req["tool_choice"] = json!({"type": "function", "function": {"name": "nope"}});
        let reply = post(addr, "/v1/chat/completions", &req).await;
        assert_eq!(reply.status, 400);
        assert_eq!(reply.json()["error"]["param"], "tool_choice");
    }

    #[tokio::test]
    async fn chat_streamed_tool_call() {
        let addr = start(serve_chat_simulator).await;
        let mut req = tool_request();
        req["stream"] = json!(true);
        let whole = post(addr, "/v1/chat/completions", &tool_request()).await.json();
        let whole = whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap()
            .to_owned();

        let chunks = parse_chunks(&events(&post(addr, "/v1/chat/completions", &req).await));
        assert_eq!(chunks.len(), 1 + 3 + 1);
        let first = &chunks[0]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(first["index"], 0);
        assert!(first["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(first["type"], "function");
        assert_eq!(first["function"], json!({"name": "get_weather", "arguments": ""}));
        let fragments: Vec<&str> = chunks[1..4]
            .iter()
            .map(|c| {
                let call = &c["choices"][0]["delta"]["tool_calls"][0];
                assert_eq!(call["index"], 0);
                assert!(call.get("id").is_none());
                call["function"]["arguments"].as_str().unwrap()
            })
            .collect();
        assert!(fragments.iter().all(|f| !f.is_empty()));
        assert_eq!(fragments.concat(), whole);
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "tool_calls");
    }

    #[tokio::test]
    async fn text_completions() {
        let addr = start(serve_chat_simulator).await;
        let body = post(
            addr,
            "/v1/completions",
            &json!({"model": "m", "prompt": ["one two", "three"]}),
        )
        .await
        .json();
        assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
        assert_eq!(body["object"], "text_completion");
        assert_eq!(
            body["choices"][0]["text"],
            "You said: \"one two\". This is Warden's demo model."
        );
        assert_eq!(body["choices"][1]["index"], 1);
        assert_eq!(
            body["choices"][1]["text"],
            "You said: \"three\". This is Warden's demo model."
        );
        assert!(body["choices"][1]["logprobs"].is_null());
        assert_eq!(body["choices"][1]["finish_reason"], "stop");
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 17, "total_tokens": 20})
        );

        let req = json!({"model": "m", "prompt": "Hi", "max_tokens": 2, "stream": true, "stream_options": {"include_usage": true}});
        let chunks = parse_chunks(&events(&post(addr, "/v1/completions", &req).await));
        assert_eq!(chunks.len(), 4);
        assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
        assert_eq!(chunks[0]["choices"][0]["text"], "You ");
        assert_eq!(chunks[1]["choices"][0]["text"], "said:");
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], "length");
        assert_eq!(
            chunks[3]["usage"],
            json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
        );
    }

    #[tokio::test]
    async fn embeddings_are_deterministic_unit_vectors() {
        let addr = start(serve_chat_simulator).await;
        let body = post(
            addr,
            "/v1/embeddings",
            &json!({"model": "e", "input": ["hello world", "bye", "hello world"]}),
        )
        .await
        .json();
        assert_eq!(body["object"], "list");
        assert_eq!(body["model"], "e");
        assert_eq!(body["usage"], json!({"prompt_tokens": 5, "total_tokens": 5}));
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        let vectors: Vec<Vec<f64>> = data
            .iter()
            .enumerate()
            .map(|(i, d)| {
                assert_eq!(d["object"], "embedding");
                assert_eq!(d["index"], i);
                d["embedding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect()
            })
            .collect();
        for v in &vectors {
            assert_eq!(v.len(), 8);
            assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
            let norm: f64 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        }
        assert_eq!(vectors[0], vectors[2]);
        assert_ne!(vectors[0], vectors[1]);

        let body = post(
            addr,
            "/v1/embeddings",
            &json!({"model": "e", "input": "x", "dimensions": 3072}),
        )
        .await
        .json();
        assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 3072);
        for dimensions in [0, 3073] {
            let reply = post(
                addr,
                "/v1/embeddings",
                &json!({"model": "e", "input": "x", "dimensions": dimensions}),
            )
            .await;
            assert_eq!(reply.status, 400);
            assert_eq!(reply.json()["error"]["param"], "dimensions");
        }

        let body = post(
            addr,
            "/v1/embeddings",
            &json!({"model": "e", "input": "x", "encoding_format": "base64"}),
        )
        .await
        .json();
        let encoded = body["data"][0]["embedding"].as_str().unwrap();
        let expected = embed("x", 8);
        assert_eq!(encoded, base64_f32(&expected));
        assert_eq!(encoded.len(), 44); // 32 bytes
    }

    #[test]
    fn base64_matches_rfc4648() {
        let encode = |bytes: &[u8]| {
            let floats: Vec<f32> = bytes
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            base64_f32(&floats)
        };
        assert_eq!(encode(b"abcd"), "YWJjZA==");
        assert_eq!(encode(b"abcdefgh"), "YWJjZGVmZ2g=");
        assert_eq!(encode(b"abcdefghijkl"), "YWJjZGVmZ2hpamts");
    }

    #[test]
    fn fragments_cover_the_text() {
        assert_eq!(fragments("{}"), ["{", "}"]);
        assert_eq!(fragments("abcdef"), ["ab", "cd", "ef"]);
        assert_eq!(fragments("é€😀x").concat(), "é€😀x");
        assert_eq!(fragments(""), [""]);
    }

    #[tokio::test]
    async fn models_and_errors() {
        let addr = start(serve_chat_simulator).await;
        let reply = send(addr, "GET", "/v1/models", None).await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.json(),
            json!({"object": "list", "data": [{"id": "demo-chat", "object": "model", "created": 0, "owned_by": "warden-demo"}]})
        );
        assert_eq!(
            send(addr, "GET", "/v1/models/demo-chat", None).await.json()["id"],
            "demo-chat"
        );
        assert_eq!(send(addr, "GET", "/v1/models/other", None).await.status, 404);

        let reply = send(addr, "POST", "/v1/chat/completions", Some("{not json")).await;
        assert_eq!(reply.status, 400);
        let error = &reply.json()["error"];
        assert_eq!(error["type"], "invalid_request_error");
        assert!(error["message"].as_str().unwrap().contains("JSON"));
        assert!(error["param"].is_null() && error["code"].is_null());

        for body in [
            json!({"model": "m"}),
            json!({"model": "m", "messages": []}),
            json!({"model": "m", "messages": [{"role": "user", "content": 5}]}),
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}),
        ] {
            let reply = post(addr, "/v1/chat/completions", &body).await;
            assert_eq!(reply.status, 400, "{body}");
            assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
        }
        assert_eq!(
            post(addr, "/v1/completions", &json!({"model": "m", "prompt": [1, 2]}))
                .await
                .status,
            400
        );
        assert_eq!(
            post(addr, "/v1/embeddings", &json!({"model": "m", "input": []}))
                .await
                .status,
            400
        );
        assert_eq!(send(addr, "POST", "/v1/embeddings", None).await.status, 400);

        let reply = send(addr, "POST", "/v1/nope", Some("{}")).await;
        assert_eq!(reply.status, 404);
        assert_eq!(reply.json()["error"]["message"], "Invalid URL (POST /v1/nope)");
        assert_eq!(send(addr, "GET", "/v1/chat/completions", None).await.status, 405);
    }

    /// The official OpenAI Rust client must accept every response shape the simulator emits.
    #[tokio::test]
    async fn official_client_understands_the_simulator() {
        use async_openai::Client;
        use async_openai::config::OpenAIConfig;
        use async_openai::types::chat::{ChatCompletionMessageToolCalls, CreateChatCompletionRequest, FinishReason};
        use async_openai::types::completions::CreateCompletionRequest;
        use async_openai::types::embeddings::CreateEmbeddingRequest;
        use futures_util::StreamExt;

        let addr = start(serve_chat_simulator).await;
        let config = OpenAIConfig::new()
            .with_api_base(format!("http://{addr}/v1"))
            .with_api_key("demo");
        let client = Client::with_config(config);

        let request: CreateChatCompletionRequest = serde_json::from_value(conversation()).unwrap();
        let response = client.chat().create(request).await.unwrap();
        assert_eq!(response.choices[0].message.content.as_deref(), Some(EXPECTED));
        assert_eq!(response.choices[0].finish_reason, Some(FinishReason::Stop));
        assert_eq!(response.usage.unwrap().total_tokens, 22);

        let request: CreateChatCompletionRequest = serde_json::from_value(tool_request()).unwrap();
        let response = client.chat().create(request).await.unwrap();
        assert_eq!(response.choices[0].finish_reason, Some(FinishReason::ToolCalls));
        let Some([ChatCompletionMessageToolCalls::Function(call)]) = response.choices[0].message.tool_calls.as_deref()
        else {
            panic!("expected one function call");
        };
        assert_eq!(call.function.name, "get_weather");

        for (request, expected) in [(conversation(), EXPECTED), (tool_request(), "get_weather")] {
            let mut request: CreateChatCompletionRequest = serde_json::from_value(request).unwrap();
            request.stream_options = serde_json::from_value(json!({"include_usage": true})).unwrap();
            let mut stream = client.chat().create_stream(request).await.unwrap();
            let (mut text, mut usage) = (String::new(), None);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.unwrap();
                for choice in chunk.choices {
                    text.push_str(choice.delta.content.as_deref().unwrap_or_default());
                    for call in choice.delta.tool_calls.unwrap_or_default() {
                        let function = call.function.unwrap();
                        text.push_str(function.name.as_deref().unwrap_or_default());
                    }
                }
                usage = usage.or(chunk.usage);
            }
            assert_eq!(text, expected);
            assert!(usage.unwrap().completion_tokens > 0);
        }

        let request: CreateCompletionRequest = serde_json::from_value(json!({"model": "m", "prompt": "Hi"})).unwrap();
        let response = client.completions().create(request).await.unwrap();
        assert_eq!(
            response.choices[0].text,
            "You said: \"Hi\". This is Warden's demo model."
        );

        let request = json!({"model": "e", "input": ["a", "b"], "dimensions": 4});
        let response = client
            .embeddings()
            .create(serde_json::from_value(request.clone()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.data[1].embedding, embed("b", 4));
        let mut request: CreateEmbeddingRequest = serde_json::from_value(request).unwrap();
        request.encoding_format = serde_json::from_value(json!("base64")).unwrap();
        let response = client.embeddings().create_base64(request).await.unwrap();
        assert_eq!(Vec::<f32>::from(response.data[1].embedding.clone()), embed("b", 4));

        let models = client.models().list().await.unwrap();
        assert_eq!(models.data[0].id, MODEL_ID);
    }

    #[tokio::test]
    async fn serves_h2c() {
        let addr = start(serve_chat_simulator).await;
        let reply = send_with(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(&conversation().to_string()),
            true,
        )
        .await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["choices"][0]["message"]["content"], EXPECTED);
    }
}
