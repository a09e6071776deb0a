//! The shapes of OpenAI requests, checked before anything is forwarded:
//! chat completions, completions and embeddings. A malformed request is
//! refused here with OpenAI's own wording and the exact `param` path
//! (`messages[2].content[0].image_url.url`), instead of reaching an upstream
//! that may read it in its own way, or crash on it.
//!
//! [`validate`] reports the first problem found, in the order OpenAI's
//! documentation lists the fields. Fields it does not know are allowed:
//! upstreams such as vLLM accept extensions (`top_k`, `min_p`,
//! `chat_template_kwargs`, …); [`extra_fields`] lists them for the audit
//! record. `null` is read as absent for every optional field, as OpenAI
//! reads it.
//!
//! Choices where OpenAI's API and its common upstreams differ:
//! - content parts `video_url` and `audio_url` (vLLM) are accepted for
//!   `user`, with the same URL rule as `image_url`;
//! - a media URL must be `https://`, `http://` or a base64 `data:` URL of
//!   the right media type: `file://` and other schemes, which some
//!   upstreams read from their own disk, are refused;
//! - `response_format.type` may also be `structural_tag` (vLLM);
//! - `input_audio.format` must be a non-empty string, not only OpenAI's
//!   `wav`/`mp3`;
//! - completions' `max_tokens` may be 0 (OpenAI's minimum there, used with
//!   `echo` to score a prompt) and its `logprobs` is a count ≥ 0, not a
//!   boolean.
//!
//! [`CustomSchema`] adds a per-model JSON Schema on top.

use std::fmt;

use serde_json::{Map, Number, Value};

use crate::route::Operation;
use crate::validate::hygiene::{push_index, push_key};

/// The first thing wrong with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    /// The JSON path of the field at fault, in OpenAI's style
    /// (`messages[2].role`); empty for the body as a whole.
    pub param: String,
    /// What is wrong, worded as OpenAI words it.
    pub message: String,
    /// OpenAI's machine-readable `code` for it: `missing_required_parameter`,
    /// `invalid_type`, `invalid_value`, `integer_above_max_value`, …
    pub code: &'static str,
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SchemaError {}

/// Where a value is, as a chain of borrowed segments on the stack: nothing
/// is allocated unless an error is reported.
#[derive(Clone, Copy)]
struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    segment: Segment<'a>,
}

#[derive(Clone, Copy)]
enum Segment<'a> {
    Root,
    Key(&'a str),
    Index(usize),
}

const ROOT: Path<'static> = Path {
    parent: None,
    segment: Segment::Root,
};

impl<'a> Path<'a> {
    fn key(&'a self, key: &'a str) -> Path<'a> {
        Path {
            parent: Some(self),
            segment: Segment::Key(key),
        }
    }

    fn index(&'a self, index: usize) -> Path<'a> {
        Path {
            parent: Some(self),
            segment: Segment::Index(index),
        }
    }

    fn render(&self) -> String {
        let mut segments = Vec::new();
        let mut at = Some(self);
        while let Some(p) = at {
            segments.push(p.segment);
            at = p.parent;
        }
        let mut out = String::new();
        for segment in segments.iter().rev() {
            match *segment {
                Segment::Root => {}
                Segment::Key(k) => push_key(&mut out, k),
                Segment::Index(i) => push_index(&mut out, i),
            }
        }
        out
    }
}

type Check = Result<(), SchemaError>;

/// How OpenAI names the type of a value in its messages.
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn error(path: Path<'_>, code: &'static str, message: String) -> SchemaError {
    SchemaError {
        param: path.render(),
        message,
        code,
    }
}

fn missing(path: Path<'_>) -> SchemaError {
    let param = path.render();
    SchemaError {
        message: format!("Missing required parameter: '{param}'."),
        param,
        code: "missing_required_parameter",
    }
}

fn invalid_type(path: Path<'_>, expected: &str, got: &Value) -> SchemaError {
    let param = path.render();
    SchemaError {
        message: format!(
            "Invalid type for '{param}': expected {expected}, but got {} instead.",
            kind(got)
        ),
        param,
        code: "invalid_type",
    }
}

/// `'a', 'b', and 'c'`, as OpenAI lists supported values.
fn quoted_list(values: &[&str]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| format!("'{v}'")).collect();
    match quoted.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [a, b] => format!("{a} and {b}"),
        [init @ .., last] => format!("{}, and {last}", init.join(", ")),
    }
}

/// A client's string, cut short for an error message.
fn shown(text: &str) -> &str {
    const MAX: usize = 64;
    if text.len() <= MAX {
        return text;
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn invalid_value(path: Path<'_>, got: &str, supported: &[&str]) -> SchemaError {
    error(
        path,
        "invalid_value",
        format!(
            "Invalid value: '{}'. Supported values are: {}.",
            shown(got),
            quoted_list(supported)
        ),
    )
}

fn empty_array(path: Path<'_>) -> SchemaError {
    let param = path.render();
    SchemaError {
        message: format!(
            "Invalid '{param}': empty array. Expected an array with minimum length 1, but got an empty array instead."
        ),
        param,
        code: "empty_array",
    }
}

pub(crate) fn array_too_long_message(param: &str, max: usize, len: usize) -> String {
    format!(
        "Invalid '{param}': array too long. Expected an array with maximum length {max}, but got an array with \
         length {len} instead."
    )
}

/// `above` / `below` limit messages for a number.
pub(crate) fn out_of_range_message(param: &str, got: &Number, limit: f64, above: bool) -> (String, &'static str) {
    let integer = !got.is_f64();
    let what = if integer { "integer" } else { "decimal" };
    let (side, op) = if above {
        ("above maximum", "<=")
    } else {
        ("below minimum", ">=")
    };
    let code = match (integer, above) {
        (true, true) => "integer_above_max_value",
        (true, false) => "integer_below_min_value",
        (false, true) => "decimal_above_max_value",
        (false, false) => "decimal_below_min_value",
    };
    (
        format!("Invalid '{param}': {what} {side} value. Expected a value {op} {limit}, but got {got} instead."),
        code,
    )
}

fn out_of_range(path: Path<'_>, got: &Number, limit: f64, above: bool) -> SchemaError {
    let param = path.render();
    let (message, code) = out_of_range_message(&param, got, limit, above);
    SchemaError { param, message, code }
}

/// An optional field: absent and `null` are both `None`.
/// `object[key]`. A request carries a handful of fields while the checks
/// ask for some forty by name, so a small object is scanned rather than
/// hashed: serde_json's map is an `IndexMap` in this build
/// (`preserve_order`), and SipHashing every name the checks ask for cost
/// more than the rest of the shape check (callgrind: ~10k instructions per
/// chat request).
fn field<'v>(object: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
    const SCAN_UP_TO: usize = 8;
    if object.len() <= SCAN_UP_TO {
        object.iter().find_map(|(k, v)| (k == key).then_some(v))
    } else {
        object.get(key)
    }
}

fn opt<'v>(object: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
    match field(object, key) {
        None | Some(Value::Null) => None,
        Some(v) => Some(v),
    }
}

fn required<'v>(object: &'v Map<String, Value>, key: &str, path: Path<'_>) -> Result<&'v Value, SchemaError> {
    opt(object, key).ok_or_else(|| missing(path.key(key)))
}

fn as_object<'v>(value: &'v Value, path: Path<'_>) -> Result<&'v Map<String, Value>, SchemaError> {
    value.as_object().ok_or_else(|| invalid_type(path, "an object", value))
}

fn as_str<'v>(value: &'v Value, path: Path<'_>) -> Result<&'v str, SchemaError> {
    value.as_str().ok_or_else(|| invalid_type(path, "a string", value))
}

fn required_str<'v>(object: &'v Map<String, Value>, key: &str, path: Path<'_>) -> Result<&'v str, SchemaError> {
    as_str(required(object, key, path)?, path.key(key))
}

fn required_object<'v>(
    object: &'v Map<String, Value>,
    key: &str,
    path: Path<'_>,
) -> Result<&'v Map<String, Value>, SchemaError> {
    as_object(required(object, key, path)?, path.key(key))
}

fn opt_str(object: &Map<String, Value>, key: &str, path: Path<'_>) -> Check {
    match opt(object, key) {
        None | Some(Value::String(_)) => Ok(()),
        Some(v) => Err(invalid_type(path.key(key), "a string", v)),
    }
}

fn opt_bool(object: &Map<String, Value>, key: &str, path: Path<'_>) -> Check {
    match opt(object, key) {
        None | Some(Value::Bool(_)) => Ok(()),
        Some(v) => Err(invalid_type(path.key(key), "a boolean", v)),
    }
}

fn opt_object(object: &Map<String, Value>, key: &str, path: Path<'_>) -> Check {
    match opt(object, key) {
        None | Some(Value::Object(_)) => Ok(()),
        Some(v) => Err(invalid_type(path.key(key), "an object", v)),
    }
}

fn opt_array(object: &Map<String, Value>, key: &str, path: Path<'_>) -> Check {
    match opt(object, key) {
        None | Some(Value::Array(_)) => Ok(()),
        Some(v) => Err(invalid_type(path.key(key), "an array", v)),
    }
}

/// An optional number within `[min, max]`.
fn opt_decimal(object: &Map<String, Value>, key: &str, path: Path<'_>, min: f64, max: f64) -> Check {
    let Some(value) = opt(object, key) else {
        return Ok(());
    };
    let Value::Number(n) = value else {
        return Err(invalid_type(path.key(key), "a decimal", value));
    };
    let f = n.as_f64().unwrap_or(f64::NAN);
    if f < min {
        return Err(out_of_range(path.key(key), n, min, false));
    }
    if f > max || f.is_nan() {
        return Err(out_of_range(path.key(key), n, max, true));
    }
    Ok(())
}

/// An integer value within `[min, max]` (`max` unbounded when `None`).
fn integer_in(value: &Value, path: Path<'_>, min: i64, max: Option<i64>) -> Check {
    let Value::Number(n) = value else {
        return Err(invalid_type(path, "an integer", value));
    };
    let too_big = |n: &Number| max.map(|m| out_of_range(path, n, m as f64, true));
    if let Some(i) = n.as_i64() {
        if i < min {
            return Err(out_of_range(path, n, min as f64, false));
        }
        if max.is_some_and(|m| i > m) {
            return too_big(n).map_or(Ok(()), Err);
        }
        Ok(())
    } else if n.is_u64() {
        // Above i64::MAX, so above any maximum.
        too_big(n).map_or(Ok(()), Err)
    } else {
        Err(invalid_type(path, "an integer", value))
    }
}

fn opt_integer(object: &Map<String, Value>, key: &str, path: Path<'_>, min: i64, max: Option<i64>) -> Check {
    match opt(object, key) {
        None => Ok(()),
        Some(v) => integer_in(v, path.key(key), min, max),
    }
}

/// An optional string that must be one of `allowed`.
fn opt_enum(object: &Map<String, Value>, key: &str, path: Path<'_>, allowed: &[&str]) -> Check {
    match opt(object, key) {
        None => Ok(()),
        Some(v) => {
            let s = as_str(v, path.key(key))?;
            if allowed.contains(&s) {
                Ok(())
            } else {
                Err(invalid_value(path.key(key), s, allowed))
            }
        }
    }
}

/// A function or tool name: `^[a-zA-Z0-9_-]{1,64}$`.
fn check_name(name: &str, path: Path<'_>) -> Check {
    if name.is_empty() {
        let param = path.render();
        return Err(SchemaError {
            message: format!(
                "Invalid '{param}': empty string. Expected a string with minimum length 1, but got an empty string \
                 instead."
            ),
            param,
            code: "empty_string",
        });
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        let param = path.render();
        return Err(SchemaError {
            message: format!(
                "Invalid '{param}': string does not match pattern. Expected a string that matches the pattern \
                 '^[a-zA-Z0-9_-]+$'."
            ),
            param,
            code: "invalid_value",
        });
    }
    if name.len() > 64 {
        let param = path.render();
        return Err(SchemaError {
            message: format!(
                "Invalid '{param}': string too long. Expected a string with maximum length 64, but got a string \
                 with length {} instead.",
                name.len()
            ),
            param,
            code: "string_above_max_length",
        });
    }
    Ok(())
}

/// Checks a request body's shape for `operation`. Operations without an
/// OpenAI body (OIP v2, listing models, health) pass unchecked.
pub fn validate(operation: Operation, body: &Value) -> Result<(), SchemaError> {
    let request = match operation {
        Operation::ChatCompletions | Operation::Completions | Operation::Embeddings => {
            body.as_object().ok_or_else(|| SchemaError {
                param: String::new(),
                message: "The request body must be a JSON object.".to_owned(),
                code: "invalid_type",
            })?
        }
        _ => return Ok(()),
    };
    check_model(request)?;
    match operation {
        Operation::ChatCompletions => check_chat(request),
        Operation::Completions => check_completions(request),
        Operation::Embeddings => check_embeddings(request),
        _ => Ok(()),
    }
}

fn check_model(request: &Map<String, Value>) -> Check {
    match field(request, "model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(()),
        None | Some(Value::Null) | Some(Value::String(_)) => Err(SchemaError {
            param: "model".to_owned(),
            message: "you must provide a model parameter".to_owned(),
            code: "missing_required_parameter",
        }),
        Some(other) => Err(invalid_type(ROOT.key("model"), "a string", other)),
    }
}

/// Fields shared by chat and completions.
fn check_sampling(request: &Map<String, Value>) -> Check {
    opt_decimal(request, "temperature", ROOT, 0.0, 2.0)?;
    opt_decimal(request, "top_p", ROOT, 0.0, 1.0)?;
    opt_integer(request, "n", ROOT, 1, None)?;
    opt_decimal(request, "presence_penalty", ROOT, -2.0, 2.0)?;
    opt_decimal(request, "frequency_penalty", ROOT, -2.0, 2.0)?;
    check_stop(request)?;
    check_stream(request)?;
    opt_integer(request, "seed", ROOT, i64::MIN, None)?;
    opt_str(request, "user", ROOT)?;
    check_logit_bias(request)
}

fn check_stop(request: &Map<String, Value>) -> Check {
    let path = ROOT.key("stop");
    match opt(request, "stop") {
        None | Some(Value::String(_)) => Ok(()),
        Some(Value::Array(stops)) => {
            if stops.len() > 4 {
                let param = path.render();
                return Err(SchemaError {
                    message: array_too_long_message(&param, 4, stops.len()),
                    param,
                    code: "array_above_max_length",
                });
            }
            for (i, stop) in stops.iter().enumerate() {
                as_str(stop, path.index(i))?;
            }
            Ok(())
        }
        Some(other) => Err(invalid_type(path, "one of a string or array of strings", other)),
    }
}

fn check_stream(request: &Map<String, Value>) -> Check {
    opt_bool(request, "stream", ROOT)?;
    let Some(options) = opt(request, "stream_options") else {
        return Ok(());
    };
    let path = ROOT.key("stream_options");
    let options = as_object(options, path)?;
    opt_bool(options, "include_usage", path)?;
    opt_bool(options, "include_obfuscation", path)?;
    if field(request, "stream") != Some(&Value::Bool(true)) {
        return Err(error(
            path,
            "invalid_value",
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.".to_owned(),
        ));
    }
    Ok(())
}

fn check_logit_bias(request: &Map<String, Value>) -> Check {
    let Some(bias) = opt(request, "logit_bias") else {
        return Ok(());
    };
    let path = ROOT.key("logit_bias");
    let bias = as_object(bias, path)?;
    for (token, value) in bias {
        let token_id = !token.is_empty() && token.len() <= 10 && token.bytes().all(|b| b.is_ascii_digit());
        if !token_id {
            return Err(error(
                path,
                "invalid_value",
                format!(
                    "Invalid key in 'logit_bias': '{}'. Keys must be token IDs: non-negative integers, as strings.",
                    shown(token)
                ),
            ));
        }
        let at = path.key(token);
        let Value::Number(n) = value else {
            return Err(invalid_type(at, "a decimal", value));
        };
        let f = n.as_f64().unwrap_or(f64::NAN);
        if f < -100.0 {
            return Err(out_of_range(at, n, -100.0, false));
        }
        if f > 100.0 || f.is_nan() {
            return Err(out_of_range(at, n, 100.0, true));
        }
    }
    Ok(())
}

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool", "function"];
const TEXT_PARTS: &[&str] = &["text"];
const USER_PARTS: &[&str] = &["text", "image_url", "input_audio", "file", "video_url", "audio_url"];
const ASSISTANT_PARTS: &[&str] = &["text", "refusal"];

fn check_chat(request: &Map<String, Value>) -> Check {
    let path = ROOT.key("messages");
    let messages = required(request, "messages", ROOT)?;
    let Value::Array(messages) = messages else {
        return Err(invalid_type(path, "an array", messages));
    };
    if messages.is_empty() {
        return Err(empty_array(path));
    }
    for (i, message) in messages.iter().enumerate() {
        check_message(message, path.index(i))?;
    }
    check_sampling(request)?;
    opt_integer(request, "max_tokens", ROOT, 1, None)?;
    opt_integer(request, "max_completion_tokens", ROOT, 1, None)?;
    opt_bool(request, "logprobs", ROOT)?;
    opt_integer(request, "top_logprobs", ROOT, 0, Some(20))?;
    check_tools(request)?;
    check_tool_choice(request)?;
    check_functions(request)?;
    check_response_format(request)?;
    opt_bool(request, "parallel_tool_calls", ROOT)?;
    opt_bool(request, "store", ROOT)?;
    opt_object(request, "metadata", ROOT)?;
    opt_array(request, "modalities", ROOT)?;
    opt_object(request, "audio", ROOT)?;
    opt_object(request, "prediction", ROOT)?;
    opt_str(request, "reasoning_effort", ROOT)?;
    opt_str(request, "service_tier", ROOT)?;
    opt_str(request, "safety_identifier", ROOT)?;
    opt_str(request, "prompt_cache_key", ROOT)?;
    opt_str(request, "verbosity", ROOT)?;
    opt_object(request, "web_search_options", ROOT)
}

fn check_message(message: &Value, path: Path<'_>) -> Check {
    let message = as_object(message, path)?;
    let role = required_str(message, "role", path)?;
    match role {
        "system" | "developer" => {
            check_content(required(message, "content", path)?, path.key("content"), TEXT_PARTS)?;
            opt_str(message, "name", path)
        }
        "user" => {
            check_content(required(message, "content", path)?, path.key("content"), USER_PARTS)?;
            opt_str(message, "name", path)
        }
        "assistant" => check_assistant(message, path),
        "tool" => {
            check_content(required(message, "content", path)?, path.key("content"), TEXT_PARTS)?;
            required_str(message, "tool_call_id", path)?;
            Ok(())
        }
        "function" => {
            required_str(message, "name", path)?;
            opt_str(message, "content", path)
        }
        other => Err(invalid_value(path.key("role"), other, ROLES)),
    }
}

fn check_assistant(message: &Map<String, Value>, path: Path<'_>) -> Check {
    match opt(message, "content") {
        Some(content) => check_content(content, path.key("content"), ASSISTANT_PARTS)?,
        // No content is fine when the turn is a call, or an audio reply.
        None if ["tool_calls", "function_call", "audio"]
            .iter()
            .any(|k| opt(message, k).is_some()) => {}
        None => return Err(missing(path.key("content"))),
    }
    opt_str(message, "refusal", path)?;
    opt_str(message, "name", path)?;
    if let Some(calls) = opt(message, "tool_calls") {
        let calls_path = path.key("tool_calls");
        let Value::Array(calls) = calls else {
            return Err(invalid_type(calls_path, "an array", calls));
        };
        if calls.is_empty() {
            return Err(empty_array(calls_path));
        }
        for (i, call) in calls.iter().enumerate() {
            check_tool_call(call, calls_path.index(i))?;
        }
    }
    if let Some(call) = opt(message, "function_call") {
        let call_path = path.key("function_call");
        let call = as_object(call, call_path)?;
        required_str(call, "name", call_path)?;
        required_str(call, "arguments", call_path)?;
    }
    if let Some(audio) = opt(message, "audio") {
        let audio_path = path.key("audio");
        required_str(as_object(audio, audio_path)?, "id", audio_path)?;
    }
    Ok(())
}

fn check_tool_call(call: &Value, path: Path<'_>) -> Check {
    let call = as_object(call, path)?;
    required_str(call, "id", path)?;
    match required_str(call, "type", path)? {
        "function" => {
            let function_path = path.key("function");
            let function = required_object(call, "function", path)?;
            required_str(function, "name", function_path)?;
            required_str(function, "arguments", function_path)?;
        }
        "custom" => {
            let custom_path = path.key("custom");
            let custom = required_object(call, "custom", path)?;
            required_str(custom, "name", custom_path)?;
            required_str(custom, "input", custom_path)?;
        }
        other => return Err(invalid_value(path.key("type"), other, &["function", "custom"])),
    }
    Ok(())
}

fn check_content(content: &Value, path: Path<'_>, allowed: &[&str]) -> Check {
    match content {
        Value::String(_) => Ok(()),
        Value::Array(parts) => {
            if parts.is_empty() {
                return Err(empty_array(path));
            }
            for (i, part) in parts.iter().enumerate() {
                check_part(part, path.index(i), allowed)?;
            }
            Ok(())
        }
        other => Err(invalid_type(path, "one of a string or array of objects", other)),
    }
}

fn check_part(part: &Value, path: Path<'_>, allowed: &[&str]) -> Check {
    let part = as_object(part, path)?;
    let kind = required_str(part, "type", path)?;
    if !allowed.contains(&kind) {
        return Err(invalid_value(path.key("type"), kind, allowed));
    }
    match kind {
        "text" => {
            required_str(part, "text", path)?;
        }
        "refusal" => {
            required_str(part, "refusal", path)?;
        }
        "image_url" => {
            let inner_path = path.key("image_url");
            let image = required_object(part, "image_url", path)?;
            check_media_url(required_str(image, "url", inner_path)?, inner_path.key("url"), "image")?;
            opt_enum(image, "detail", inner_path, &["auto", "low", "high"])?;
        }
        "video_url" | "audio_url" => {
            let inner_path = path.key(kind);
            let media = required_object(part, kind, path)?;
            let media_type = if kind == "video_url" { "video" } else { "audio" };
            check_media_url(
                required_str(media, "url", inner_path)?,
                inner_path.key("url"),
                media_type,
            )?;
        }
        "input_audio" => {
            let inner_path = path.key("input_audio");
            let audio = required_object(part, "input_audio", path)?;
            required_str(audio, "data", inner_path)?;
            let format = required_str(audio, "format", inner_path)?;
            if format.is_empty() {
                return Err(invalid_value(inner_path.key("format"), format, &["wav", "mp3"]));
            }
        }
        "file" => {
            let inner_path = path.key("file");
            let file = required_object(part, "file", path)?;
            opt_str(file, "file_id", inner_path)?;
            opt_str(file, "file_data", inner_path)?;
            opt_str(file, "filename", inner_path)?;
            if opt(file, "file_id").is_none() && opt(file, "file_data").is_none() {
                return Err(error(
                    inner_path,
                    "missing_required_parameter",
                    format!(
                        "Invalid '{}': expected one of 'file_id' or 'file_data'.",
                        inner_path.render()
                    ),
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// A media URL: `https://…`, `http://…`, or `data:<media_type>/…;base64,…`.
fn check_media_url(url: &str, path: Path<'_>, media_type: &str) -> Check {
    // `get` rather than slicing: the URL is the client's and may have a
    // multi-byte character where a prefix would end.
    let has_prefix = |prefix: &str| {
        url.get(..prefix.len()).is_some_and(|p| p.eq_ignore_ascii_case(prefix)) && url.len() > prefix.len()
    };
    if has_prefix("https://") || has_prefix("http://") {
        return Ok(());
    }
    if has_prefix("data:") {
        let rest = &url[5..];
        if let Some((header, payload)) = rest.split_once(',') {
            let mime = header.strip_suffix(";base64").unwrap_or("");
            let right_type = mime
                .split_once('/')
                .is_some_and(|(t, sub)| t.eq_ignore_ascii_case(media_type) && !sub.is_empty());
            if right_type && !payload.is_empty() {
                return Ok(());
            }
        }
    }
    let param = path.render();
    Err(SchemaError {
        message: format!(
            "Invalid '{param}': expected an https:// or http:// URL, or a base64-encoded data URL with {} MIME type \
             (e.g. 'data:{media_type}/{};base64,...').",
            if media_type == "image" { "an image" } else { media_type },
            match media_type {
                "image" => "png",
                "video" => "mp4",
                _ => "wav",
            }
        ),
        param,
        code: "invalid_value",
    })
}

fn check_tools(request: &Map<String, Value>) -> Check {
    let Some(tools) = opt(request, "tools") else {
        return Ok(());
    };
    let path = ROOT.key("tools");
    let Value::Array(tools) = tools else {
        return Err(invalid_type(path, "an array", tools));
    };
    for (i, tool) in tools.iter().enumerate() {
        let tool_path = path.index(i);
        let tool = as_object(tool, tool_path)?;
        match required_str(tool, "type", tool_path)? {
            "function" => {
                let function_path = tool_path.key("function");
                let function = required_object(tool, "function", tool_path)?;
                check_name(
                    required_str(function, "name", function_path)?,
                    function_path.key("name"),
                )?;
                opt_str(function, "description", function_path)?;
                opt_object(function, "parameters", function_path)?;
                opt_bool(function, "strict", function_path)?;
            }
            "custom" => {
                let custom_path = tool_path.key("custom");
                let custom = required_object(tool, "custom", tool_path)?;
                check_name(required_str(custom, "name", custom_path)?, custom_path.key("name"))?;
                opt_str(custom, "description", custom_path)?;
                opt_object(custom, "format", custom_path)?;
            }
            other => return Err(invalid_value(tool_path.key("type"), other, &["function", "custom"])),
        }
    }
    Ok(())
}

fn check_tool_choice(request: &Map<String, Value>) -> Check {
    let path = ROOT.key("tool_choice");
    match opt(request, "tool_choice") {
        None => Ok(()),
        Some(Value::String(mode)) => match mode.as_str() {
            "none" | "auto" | "required" => Ok(()),
            other => Err(invalid_value(path, other, &["none", "auto", "required"])),
        },
        Some(Value::Object(choice)) => match required_str(choice, "type", path)? {
            "function" => {
                let function_path = path.key("function");
                let function = required_object(choice, "function", path)?;
                check_name(
                    required_str(function, "name", function_path)?,
                    function_path.key("name"),
                )
            }
            "custom" => {
                let custom_path = path.key("custom");
                let custom = required_object(choice, "custom", path)?;
                check_name(required_str(custom, "name", custom_path)?, custom_path.key("name"))
            }
            "allowed_tools" => {
                let allowed_path = path.key("allowed_tools");
                let allowed = required_object(choice, "allowed_tools", path)?;
                let mode = required_str(allowed, "mode", allowed_path)?;
                if !matches!(mode, "auto" | "required") {
                    return Err(invalid_value(allowed_path.key("mode"), mode, &["auto", "required"]));
                }
                let tools_path = allowed_path.key("tools");
                let tools = required(allowed, "tools", allowed_path)?;
                let Value::Array(tools) = tools else {
                    return Err(invalid_type(tools_path, "an array", tools));
                };
                for (i, tool) in tools.iter().enumerate() {
                    as_object(tool, tools_path.index(i))?;
                }
                Ok(())
            }
            other => Err(invalid_value(
                path.key("type"),
                other,
                &["function", "custom", "allowed_tools"],
            )),
        },
        Some(other) => Err(invalid_type(path, "one of a string or object", other)),
    }
}

/// The deprecated `functions` and `function_call`.
fn check_functions(request: &Map<String, Value>) -> Check {
    if let Some(functions) = opt(request, "functions") {
        let path = ROOT.key("functions");
        let Value::Array(functions) = functions else {
            return Err(invalid_type(path, "an array", functions));
        };
        for (i, function) in functions.iter().enumerate() {
            let function_path = path.index(i);
            let function = as_object(function, function_path)?;
            check_name(
                required_str(function, "name", function_path)?,
                function_path.key("name"),
            )?;
            opt_str(function, "description", function_path)?;
            opt_object(function, "parameters", function_path)?;
        }
    }
    let path = ROOT.key("function_call");
    match opt(request, "function_call") {
        None => Ok(()),
        Some(Value::String(mode)) => match mode.as_str() {
            "none" | "auto" => Ok(()),
            other => Err(invalid_value(path, other, &["none", "auto"])),
        },
        Some(Value::Object(call)) => check_name(required_str(call, "name", path)?, path.key("name")),
        Some(other) => Err(invalid_type(path, "one of a string or object", other)),
    }
}

fn check_response_format(request: &Map<String, Value>) -> Check {
    let Some(format) = opt(request, "response_format") else {
        return Ok(());
    };
    let path = ROOT.key("response_format");
    let format = as_object(format, path)?;
    match required_str(format, "type", path)? {
        "text" | "json_object" | "structural_tag" => Ok(()),
        "json_schema" => {
            let schema_path = path.key("json_schema");
            let schema = required_object(format, "json_schema", path)?;
            check_name(required_str(schema, "name", schema_path)?, schema_path.key("name"))?;
            opt_str(schema, "description", schema_path)?;
            required_object(schema, "schema", schema_path)?;
            opt_bool(schema, "strict", schema_path)
        }
        other => Err(invalid_value(
            path.key("type"),
            other,
            &["text", "json_object", "json_schema", "structural_tag"],
        )),
    }
}

fn check_completions(request: &Map<String, Value>) -> Check {
    check_token_input(
        request,
        "prompt",
        "a string, array of strings, array of integers, or array of arrays of integers",
    )?;
    check_sampling(request)?;
    opt_integer(request, "max_tokens", ROOT, 0, None)?;
    opt_integer(request, "best_of", ROOT, 1, None)?;
    if let (Some(Value::Number(best_of)), Some(Value::Number(n))) = (opt(request, "best_of"), opt(request, "n"))
        && best_of.as_u64() < n.as_u64()
    {
        return Err(error(
            ROOT.key("best_of"),
            "invalid_value",
            format!("Invalid 'best_of': it must be greater than or equal to 'n', but got {best_of} < {n}."),
        ));
    }
    opt_integer(request, "logprobs", ROOT, 0, None)?;
    opt_bool(request, "echo", ROOT)?;
    opt_str(request, "suffix", ROOT)
}

fn check_embeddings(request: &Map<String, Value>) -> Check {
    check_token_input(
        request,
        "input",
        "a string, array of strings, array of integers, or array of arrays of integers",
    )?;
    opt_enum(request, "encoding_format", ROOT, &["float", "base64"])?;
    opt_integer(request, "dimensions", ROOT, 1, None)?;
    opt_str(request, "user", ROOT)
}

/// `prompt` or `input`: a string, or a non-empty array of strings, of token
/// ids, or of non-empty arrays of token ids. The first element decides which.
fn check_token_input(request: &Map<String, Value>, key: &str, expected: &str) -> Check {
    let path = ROOT.key(key);
    let value = required(request, key, ROOT)?;
    let items = match value {
        Value::String(_) => return Ok(()),
        Value::Array(items) if items.is_empty() => return Err(empty_array(path)),
        Value::Array(items) => items,
        other => return Err(invalid_type(path, &format!("one of {expected}"), other)),
    };
    let token = |v: &Value, at: Path<'_>| integer_in(v, at, 0, None);
    match &items[0] {
        Value::String(_) => {
            for (i, item) in items.iter().enumerate() {
                as_str(item, path.index(i))?;
            }
        }
        Value::Number(_) => {
            for (i, item) in items.iter().enumerate() {
                token(item, path.index(i))?;
            }
        }
        Value::Array(_) => {
            for (i, item) in items.iter().enumerate() {
                let at = path.index(i);
                let Value::Array(tokens) = item else {
                    return Err(invalid_type(at, "an array of integers", item));
                };
                if tokens.is_empty() {
                    return Err(empty_array(at));
                }
                for (j, t) in tokens.iter().enumerate() {
                    token(t, at.index(j))?;
                }
            }
        }
        other => {
            return Err(invalid_type(
                path.index(0),
                "one of a string, an integer, or an array of integers",
                other,
            ));
        }
    }
    Ok(())
}

const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "metadata",
    "modalities",
    "n",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "prompt_cache_key",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "seed",
    "service_tier",
    "stop",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "user",
    "verbosity",
    "web_search_options",
];

const COMPLETIONS_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "best_of",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "suffix",
    "temperature",
    "top_p",
    "user",
];

const EMBEDDINGS_FIELDS: &[&str] = &["model", "input", "dimensions", "encoding_format", "user"];

const MESSAGE_FIELDS: &[&str] = &[
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    "refusal",
    "function_call",
    "audio",
];

/// The top-level fields OpenAI defines for `operation` (empty for
/// operations without an OpenAI body).
pub fn known_fields(operation: Operation) -> &'static [&'static str] {
    match operation {
        Operation::ChatCompletions => CHAT_FIELDS,
        Operation::Completions => COMPLETIONS_FIELDS,
        Operation::Embeddings => EMBEDDINGS_FIELDS,
        _ => &[],
    }
}

/// The paths of fields OpenAI does not define, which [`validate`] lets
/// through: top-level fields (`top_k`, `chat_template_kwargs`) and, for
/// chat, fields of messages (`messages[1].reasoning_content`). In body
/// order; empty for operations without an OpenAI body.
pub fn extra_fields(operation: Operation, body: &Value) -> Vec<String> {
    let known = known_fields(operation);
    let mut extra = Vec::new();
    let Some(request) = body.as_object() else {
        return extra;
    };
    if known.is_empty() {
        return extra;
    }
    for key in request.keys() {
        if !known.contains(&key.as_str()) {
            extra.push(ROOT.key(key).render());
        }
    }
    if operation == Operation::ChatCompletions
        && let Some(Value::Array(messages)) = field(request, "messages")
    {
        let path = ROOT.key("messages");
        for (i, message) in messages.iter().enumerate() {
            let Some(message) = message.as_object() else {
                continue;
            };
            let at = path.index(i);
            for key in message.keys() {
                if !MESSAGE_FIELDS.contains(&key.as_str()) {
                    extra.push(at.key(key).render());
                }
            }
        }
    }
    extra
}

/// Why a custom schema could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSON Schema: {0}")]
pub struct InvalidSchema(pub String);

/// A per-model JSON Schema that request bodies must also satisfy, compiled
/// once from configuration.
///
/// Compiled without any way to fetch: a `$ref` to anything outside the
/// document is an [`InvalidSchema`], never a network or file read. Patterns
/// use the `regex` crate (linear time; no look-around or back-references),
/// so a client's string cannot make a `pattern` backtrack for long.
/// `format` is annotation only, as the 2020-12 draft says.
pub struct CustomSchema {
    validator: jsonschema::Validator,
}

impl fmt::Debug for CustomSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomSchema").finish_non_exhaustive()
    }
}

impl CustomSchema {
    /// Compiles `schema` (any draft the document declares; 2020-12 when it
    /// declares none).
    pub fn new(schema: &Value) -> Result<Self, InvalidSchema> {
        let validator = jsonschema::options()
            .with_pattern_options(jsonschema::PatternOptions::regex())
            .build(schema)
            .map_err(|e| InvalidSchema(e.to_string()))?;
        Ok(CustomSchema { validator })
    }

    /// Checks `body`; the first violation's instance location becomes the
    /// `param` (`messages[0].content`).
    pub fn validate(&self, body: &Value) -> Result<(), SchemaError> {
        let Err(e) = self.validator.validate(body) else {
            return Ok(());
        };
        let param = instance_param(body, e.instance_path().as_str());
        // The message quotes the offending value; a large one is masked.
        let large = match e.instance().as_ref() {
            Value::Array(_) | Value::Object(_) => true,
            Value::String(s) => s.len() > 64,
            _ => false,
        };
        let detail = if large { e.masked().to_string() } else { e.to_string() };
        let message = if param.is_empty() {
            format!("Invalid request body: {detail}.")
        } else {
            format!("Invalid '{param}': {detail}.")
        };
        Err(SchemaError {
            param,
            message,
            code: "invalid_value",
        })
    }
}

/// Turns a JSON Pointer into `body` (`/messages/0/content`) into OpenAI's
/// path style (`messages[0].content`), reading each segment as an index or
/// a key by what the body holds there: `/a/0` is `a[0]` under an array and
/// `a.0` under an object.
fn instance_param(body: &Value, pointer: &str) -> String {
    let mut out = String::new();
    let mut at = Some(body);
    for raw in pointer.split('/').skip(1) {
        let segment = raw.replace("~1", "/").replace("~0", "~");
        match at {
            Some(Value::Array(items)) if let Ok(i) = segment.parse::<usize>() => {
                push_index(&mut out, i);
                at = items.get(i);
            }
            Some(Value::Object(members)) => {
                push_key(&mut out, &segment);
                at = members.get(&segment);
            }
            _ => {
                push_key(&mut out, &segment);
                at = None;
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    fn chat(messages: Value) -> Value {
        json!({"model": "m", "messages": messages})
    }

    fn fail(operation: Operation, body: Value) -> SchemaError {
        validate(operation, &body).unwrap_err()
    }

    fn chat_fail(body: Value) -> SchemaError {
        fail(Operation::ChatCompletions, body)
    }

    fn assert_err(e: &SchemaError, param: &str, message: &str) {
        assert_eq!((e.param.as_str(), e.message.as_str()), (param, message));
    }

    fn with(extra: Value) -> Value {
        let mut body = chat(json!([{"role": "user", "content": "hi"}]));
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    }

    #[test]
    fn a_full_chat_request_passes() {
        let body = json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Really brief."}]},
                {"role": "user", "name": "ann", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                    {"type": "file", "file": {"file_id": "file-1"}},
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"},
                {"role": "assistant", "content": [{"type": "text", "text": "42."}, {"type": "refusal", "refusal": "no"}]},
                {"role": "function", "name": "lookup", "content": null},
            ],
            "temperature": 2, "top_p": 0, "n": 3, "max_tokens": 1, "max_completion_tokens": 100,
            "presence_penalty": -2, "frequency_penalty": 1.5, "logprobs": true, "top_logprobs": 20,
            "stop": ["a", "b", "c", "d"], "stream": true, "stream_options": {"include_usage": true},
            "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": true}},
            "seed": -7, "user": "u", "logit_bias": {"50256": -100, "1": 100, "2": 0.5},
            "tools": [{"type": "function", "function": {"name": "lookup", "description": "d", "parameters": {"type": "object"}, "strict": null}}],
            "tool_choice": {"type": "function", "function": {"name": "lookup"}},
            "parallel_tool_calls": false,
            "top_k": 40, "chat_template_kwargs": {"enable_thinking": false},
        });
        validate(Operation::ChatCompletions, &body).unwrap();
        assert_eq!(
            extra_fields(Operation::ChatCompletions, &body),
            ["top_k", "chat_template_kwargs"]
        );
        // Nulls are absent.
        validate(
            Operation::ChatCompletions,
            &with(json!({"temperature": null, "tools": null, "stop": null, "seed": null})),
        )
        .unwrap();
        for choice in ["none", "auto", "required"] {
            validate(Operation::ChatCompletions, &with(json!({"tool_choice": choice}))).unwrap();
        }
        // Operations without an OpenAI body are not checked.
        validate(Operation::Infer, &json!([1])).unwrap();
    }

    #[test]
    fn model_and_messages_are_required() {
        let e = chat_fail(json!({"messages": []}));
        assert_err(&e, "model", "you must provide a model parameter");
        assert_eq!(e.code, "missing_required_parameter");
        assert_err(
            &chat_fail(json!({"model": 5, "messages": []})),
            "model",
            "Invalid type for 'model': expected a string, but got an integer instead.",
        );
        assert_err(
            &chat_fail(json!({"model": "m"})),
            "messages",
            "Missing required parameter: 'messages'.",
        );
        assert_err(
            &chat_fail(chat(json!([]))),
            "messages",
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
        );
        assert_err(
            &chat_fail(chat(json!("hi"))),
            "messages",
            "Invalid type for 'messages': expected an array, but got a string instead.",
        );
        assert_err(
            &chat_fail(chat(json!([{"role": "user", "content": "a"}, 7]))),
            "messages[1]",
            "Invalid type for 'messages[1]': expected an object, but got an integer instead.",
        );
    }

    #[test]
    fn roles_and_their_content() {
        let e = chat_fail(chat(
            json!([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]),
        ));
        assert_err(
            &e,
            "messages[1].role",
            "Invalid value: 'bot'. Supported values are: 'system', 'developer', 'user', 'assistant', 'tool', and \
             'function'.",
        );
        assert_eq!(e.code, "invalid_value");
        assert_err(
            &chat_fail(chat(json!([{"content": "hi"}]))),
            "messages[0].role",
            "Missing required parameter: 'messages[0].role'.",
        );
        assert_err(
            &chat_fail(chat(json!([{"role": "user"}]))),
            "messages[0].content",
            "Missing required parameter: 'messages[0].content'.",
        );
        assert_err(
            &chat_fail(chat(json!([{"role": "user", "content": 1}]))),
            "messages[0].content",
            "Invalid type for 'messages[0].content': expected one of a string or array of objects, but got an \
             integer instead.",
        );
        assert_err(
            &chat_fail(chat(
                json!([{"role": "user", "content": "q"}, {"role": "tool", "content": "42"}]),
            )),
            "messages[1].tool_call_id",
            "Missing required parameter: 'messages[1].tool_call_id'.",
        );
        // An assistant turn needs content unless it calls a tool.
        assert_err(
            &chat_fail(chat(json!([{"role": "assistant", "content": null}]))),
            "messages[0].content",
            "Missing required parameter: 'messages[0].content'.",
        );
        assert_err(
            &chat_fail(chat(
                json!([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                "function": {"name": "f", "arguments": {}}}]}]),
            )),
            "messages[0].tool_calls[0].function.arguments",
            "Invalid type for 'messages[0].tool_calls[0].function.arguments': expected a string, but got an object \
             instead.",
        );
        assert_err(
            &chat_fail(chat(json!([{"role": "assistant", "tool_calls": []}]))),
            "messages[0].tool_calls",
            "Invalid 'messages[0].tool_calls': empty array. Expected an array with minimum length 1, but got an \
             empty array instead.",
        );
        // Parts a role may not send.
        assert_err(
            &chat_fail(chat(json!([{"role": "system", "content": [{"type": "image_url",
                "image_url": {"url": "https://x/y.png"}}]}]))),
            "messages[0].content[0].type",
            "Invalid value: 'image_url'. Supported values are: 'text'.",
        );
        assert_err(
            &chat_fail(chat(
                json!([{"role": "assistant", "content": [{"type": "refusal", "refusal": 1}]}]),
            )),
            "messages[0].content[0].refusal",
            "Invalid type for 'messages[0].content[0].refusal': expected a string, but got an integer instead.",
        );
        assert_err(
            &chat_fail(chat(
                json!([{"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}]),
            )),
            "messages[0].content[0].type",
            "Invalid value: 'refusal'. Supported values are: 'text', 'image_url', 'input_audio', 'file', \
             'video_url', and 'audio_url'.",
        );
        assert_err(
            &chat_fail(chat(json!([{"role": "user", "content": []}]))),
            "messages[0].content",
            "Invalid 'messages[0].content': empty array. Expected an array with minimum length 1, but got an empty \
             array instead.",
        );
        assert_err(
            &chat_fail(chat(json!([{"role": "user", "content": [{"text": "x"}]}]))),
            "messages[0].content[0].type",
            "Missing required parameter: 'messages[0].content[0].type'.",
        );
        assert_err(
            &chat_fail(chat(json!([{"role": "function", "content": "x"}]))),
            "messages[0].name",
            "Missing required parameter: 'messages[0].name'.",
        );
    }

    #[test]
    fn bad_image_parts() {
        let part = |p: Value| {
            chat_fail(chat(json!([
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "user", "content": [{"type": "text", "text": "look"}, p]},
            ])))
        };
        let e = part(json!({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}));
        assert_err(
            &e,
            "messages[2].content[1].image_url.url",
            "Invalid 'messages[2].content[1].image_url.url': expected an https:// or http:// URL, or a \
             base64-encoded data URL with an image MIME type (e.g. 'data:image/png;base64,...').",
        );
        assert_eq!(e.code, "invalid_value");
        for url in [
            "data:text/plain;base64,aGk=",
            "data:image/png,raw",
            "data:image/png;base64,",
            "https://",
            "ftp://x/y.png",
            "",
            "é",
        ] {
            let e = part(json!({"type": "image_url", "image_url": {"url": url}}));
            assert_eq!(e.param, "messages[2].content[1].image_url.url", "{url}");
        }
        assert_err(
            &part(json!({"type": "image_url", "image_url": "https://x/y.png"})),
            "messages[2].content[1].image_url",
            "Invalid type for 'messages[2].content[1].image_url': expected an object, but got a string instead.",
        );
        assert_err(
            &part(json!({"type": "image_url", "image_url": {}})),
            "messages[2].content[1].image_url.url",
            "Missing required parameter: 'messages[2].content[1].image_url.url'.",
        );
        assert_err(
            &part(json!({"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "ultra"}})),
            "messages[2].content[1].image_url.detail",
            "Invalid value: 'ultra'. Supported values are: 'auto', 'low', and 'high'.",
        );
        assert_err(
            &part(json!({"type": "input_audio", "input_audio": {"data": "AAAA"}})),
            "messages[2].content[1].input_audio.format",
            "Missing required parameter: 'messages[2].content[1].input_audio.format'.",
        );
        assert_err(
            &part(json!({"type": "file", "file": {"filename": "a.pdf"}})),
            "messages[2].content[1].file",
            "Invalid 'messages[2].content[1].file': expected one of 'file_id' or 'file_data'.",
        );
        assert_eq!(
            part(json!({"type": "video_url", "video_url": {"url": "data:image/png;base64,AAAA"}})).param,
            "messages[2].content[1].video_url.url"
        );
        let ok = chat(json!([{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
            {"type": "image_url", "image_url": {"url": "HTTPS://example.com/a.png"}},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
        ]}]));
        validate(Operation::ChatCompletions, &ok).unwrap();
    }

    #[test]
    fn numeric_ranges() {
        let e = chat_fail(with(json!({"temperature": 3})));
        assert_err(
            &e,
            "temperature",
            "Invalid 'temperature': integer above maximum value. Expected a value <= 2, but got 3 instead.",
        );
        assert_err(
            &chat_fail(with(json!({"temperature": 2.5}))),
            "temperature",
            "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 2.5 instead.",
        );
        assert_eq!(
            chat_fail(with(json!({"temperature": 2.5}))).code,
            "decimal_above_max_value"
        );
        assert_err(
            &chat_fail(with(json!({"temperature": "hot"}))),
            "temperature",
            "Invalid type for 'temperature': expected a decimal, but got a string instead.",
        );
        assert_err(
            &chat_fail(with(json!({"top_p": -0.1}))),
            "top_p",
            "Invalid 'top_p': decimal below minimum value. Expected a value >= 0, but got -0.1 instead.",
        );
        let e = chat_fail(with(json!({"n": 0})));
        assert_err(
            &e,
            "n",
            "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead.",
        );
        assert_eq!(e.code, "integer_below_min_value");
        assert_err(
            &chat_fail(with(json!({"n": 1.5}))),
            "n",
            "Invalid type for 'n': expected an integer, but got a decimal instead.",
        );
        assert_err(
            &chat_fail(with(json!({"max_tokens": -5}))),
            "max_tokens",
            "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got -5 instead.",
        );
        assert_err(
            &chat_fail(with(json!({"max_completion_tokens": 0}))),
            "max_completion_tokens",
            "Invalid 'max_completion_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead.",
        );
        assert_err(
            &chat_fail(with(json!({"presence_penalty": -2.01}))),
            "presence_penalty",
            "Invalid 'presence_penalty': decimal below minimum value. Expected a value >= -2, but got -2.01 \
             instead.",
        );
        assert_eq!(
            chat_fail(with(json!({"frequency_penalty": 3}))).param,
            "frequency_penalty"
        );
        assert_err(
            &chat_fail(with(json!({"top_logprobs": 21}))),
            "top_logprobs",
            "Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, but got 21 instead.",
        );
        assert_err(
            &chat_fail(with(json!({"top_logprobs": 18446744073709551615u64}))),
            "top_logprobs",
            "Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, but got \
             18446744073709551615 instead.",
        );
        assert_err(
            &chat_fail(with(json!({"logprobs": 1}))),
            "logprobs",
            "Invalid type for 'logprobs': expected a boolean, but got an integer instead.",
        );
        assert_err(
            &chat_fail(with(json!({"seed": 1.5}))),
            "seed",
            "Invalid type for 'seed': expected an integer, but got a decimal instead.",
        );
        validate(
            Operation::ChatCompletions,
            &with(json!({"seed": 18446744073709551615u64})),
        )
        .unwrap();
        assert_err(
            &chat_fail(with(json!({"user": 1}))),
            "user",
            "Invalid type for 'user': expected a string, but got an integer instead.",
        );
    }

    #[test]
    fn stop_stream_and_logit_bias() {
        assert_err(
            &chat_fail(with(json!({"stop": ["a", "b", "c", "d", "e"]}))),
            "stop",
            "Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length \
             5 instead.",
        );
        assert_err(
            &chat_fail(with(json!({"stop": ["a", 1]}))),
            "stop[1]",
            "Invalid type for 'stop[1]': expected a string, but got an integer instead.",
        );
        assert_err(
            &chat_fail(with(json!({"stop": 1}))),
            "stop",
            "Invalid type for 'stop': expected one of a string or array of strings, but got an integer instead.",
        );
        assert_err(
            &chat_fail(with(json!({"stream": "yes"}))),
            "stream",
            "Invalid type for 'stream': expected a boolean, but got a string instead.",
        );
        assert_err(
            &chat_fail(with(json!({"stream_options": {"include_usage": true}}))),
            "stream_options",
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        );
        assert_err(
            &chat_fail(with(json!({"stream": true, "stream_options": []}))),
            "stream_options",
            "Invalid type for 'stream_options': expected an object, but got an array instead.",
        );
        assert_err(
            &chat_fail(with(json!({"logit_bias": {"abc": 1}}))),
            "logit_bias",
            "Invalid key in 'logit_bias': 'abc'. Keys must be token IDs: non-negative integers, as strings.",
        );
        assert_err(
            &chat_fail(with(json!({"logit_bias": {"50256": 101}}))),
            "logit_bias.50256",
            "Invalid 'logit_bias.50256': integer above maximum value. Expected a value <= 100, but got 101 instead.",
        );
        assert_err(
            &chat_fail(with(json!({"logit_bias": {"1": "x"}}))),
            "logit_bias.1",
            "Invalid type for 'logit_bias.1': expected a decimal, but got a string instead.",
        );
    }

    #[test]
    fn tools_and_choices() {
        let tool = |name: &str| json!({"tools": [{"type": "function", "function": {"name": name}}]});
        validate(Operation::ChatCompletions, &with(tool("get_weather-2"))).unwrap();
        assert_err(
            &chat_fail(with(tool("get weather"))),
            "tools[0].function.name",
            "Invalid 'tools[0].function.name': string does not match pattern. Expected a string that matches the \
             pattern '^[a-zA-Z0-9_-]+$'.",
        );
        assert_err(
            &chat_fail(with(tool(&"a".repeat(65)))),
            "tools[0].function.name",
            "Invalid 'tools[0].function.name': string too long. Expected a string with maximum length 64, but got a \
             string with length 65 instead.",
        );
        assert_eq!(chat_fail(with(tool(""))).code, "empty_string");
        validate(Operation::ChatCompletions, &with(tool(&"a".repeat(64)))).unwrap();
        assert_err(
            &chat_fail(with(json!({"tools": [{"type": "function"}]}))),
            "tools[0].function",
            "Missing required parameter: 'tools[0].function'.",
        );
        assert_err(
            &chat_fail(with(json!({"tools": [{"type": "retrieval"}]}))),
            "tools[0].type",
            "Invalid value: 'retrieval'. Supported values are: 'function' and 'custom'.",
        );
        assert_err(
            &chat_fail(with(
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}),
            )),
            "tools[0].function.parameters",
            "Invalid type for 'tools[0].function.parameters': expected an object, but got a string instead.",
        );
        assert_err(
            &chat_fail(with(json!({"tool_choice": "sometimes"}))),
            "tool_choice",
            "Invalid value: 'sometimes'. Supported values are: 'none', 'auto', and 'required'.",
        );
        assert_err(
            &chat_fail(with(json!({"tool_choice": {"type": "function"}}))),
            "tool_choice.function",
            "Missing required parameter: 'tool_choice.function'.",
        );
        assert_err(
            &chat_fail(with(json!({"tool_choice": 1}))),
            "tool_choice",
            "Invalid type for 'tool_choice': expected one of a string or object, but got an integer instead.",
        );
        validate(
            Operation::ChatCompletions,
            &with(json!({"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "f"}}]}}})),
        )
        .unwrap();
    }

    #[test]
    fn response_formats() {
        for ok in [
            json!({"type": "text"}),
            json!({"type": "json_object"}),
            json!({"type": "json_schema", "json_schema": {"name": "n", "schema": {}}}),
        ] {
            validate(Operation::ChatCompletions, &with(json!({"response_format": ok}))).unwrap();
        }
        assert_err(
            &chat_fail(with(json!({"response_format": {"type": "xml"}}))),
            "response_format.type",
            "Invalid value: 'xml'. Supported values are: 'text', 'json_object', 'json_schema', and 'structural_tag'.",
        );
        assert_err(
            &chat_fail(with(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}}),
            )),
            "response_format.json_schema.schema",
            "Missing required parameter: 'response_format.json_schema.schema'.",
        );
        assert_err(
            &chat_fail(with(
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}),
            )),
            "response_format.json_schema.name",
            "Missing required parameter: 'response_format.json_schema.name'.",
        );
        assert_err(
            &chat_fail(with(json!({"response_format": "json"}))),
            "response_format",
            "Invalid type for 'response_format': expected an object, but got a string instead.",
        );
    }

    #[test]
    fn completions_and_embeddings() {
        let c = Operation::Completions;
        validate(
            c,
            &json!({"model": "m", "prompt": "hi", "max_tokens": 0, "echo": true, "logprobs": 5}),
        )
        .unwrap();
        validate(c, &json!({"model": "m", "prompt": ["a", "b"]})).unwrap();
        validate(c, &json!({"model": "m", "prompt": [1, 2, 3]})).unwrap();
        validate(c, &json!({"model": "m", "prompt": [[1], [2, 3]], "n": 2, "best_of": 3})).unwrap();
        assert_err(
            &fail(c, json!({"model": "m"})),
            "prompt",
            "Missing required parameter: 'prompt'.",
        );
        assert_err(
            &fail(c, json!({"model": "m", "prompt": ["a", 1]})),
            "prompt[1]",
            "Invalid type for 'prompt[1]': expected a string, but got an integer instead.",
        );
        assert_err(
            &fail(c, json!({"model": "m", "prompt": [1, -1]})),
            "prompt[1]",
            "Invalid 'prompt[1]': integer below minimum value. Expected a value >= 0, but got -1 instead.",
        );
        assert_err(
            &fail(c, json!({"model": "m", "prompt": {}})),
            "prompt",
            "Invalid type for 'prompt': expected one of a string, array of strings, array of integers, or array \
             of arrays of integers, but got an object instead.",
        );
        assert_err(
            &fail(c, json!({"model": "m", "prompt": "x", "n": 3, "best_of": 2})),
            "best_of",
            "Invalid 'best_of': it must be greater than or equal to 'n', but got 2 < 3.",
        );
        assert_eq!(
            fail(c, json!({"model": "m", "prompt": "x", "logprobs": true})).param,
            "logprobs"
        );
        assert_eq!(
            fail(c, json!({"model": "m", "prompt": "x", "temperature": 3})).param,
            "temperature"
        );

        let e = Operation::Embeddings;
        validate(
            e,
            &json!({"model": "m", "input": "x", "encoding_format": "base64", "dimensions": 256}),
        )
        .unwrap();
        assert_err(
            &fail(e, json!({"model": "m"})),
            "input",
            "Missing required parameter: 'input'.",
        );
        assert_err(
            &fail(e, json!({"model": "m", "input": []})),
            "input",
            "Invalid 'input': empty array. Expected an array with minimum length 1, but got an empty array instead.",
        );
        assert_err(
            &fail(e, json!({"model": "m", "input": [[1], []]})),
            "input[1]",
            "Invalid 'input[1]': empty array. Expected an array with minimum length 1, but got an empty array \
             instead.",
        );
        assert_err(
            &fail(e, json!({"model": "m", "input": "x", "encoding_format": "int8"})),
            "encoding_format",
            "Invalid value: 'int8'. Supported values are: 'float' and 'base64'.",
        );
        assert_eq!(
            fail(e, json!({"model": "m", "input": "x", "dimensions": 0})).param,
            "dimensions"
        );
        assert_eq!(
            extra_fields(e, &json!({"model": "m", "input": "x", "truncate_prompt_tokens": 5})),
            ["truncate_prompt_tokens"]
        );
    }

    #[test]
    fn the_first_error_wins() {
        let e = chat_fail(json!({"model": "m", "temperature": 9, "messages": [{"role": "x"}]}));
        assert_eq!(e.param, "messages[0].role");
    }

    #[test]
    fn custom_schema_reports_the_instance_path() {
        let schema = CustomSchema::new(&json!({
            "type": "object",
            "properties": {
                "messages": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"content": {"type": "string", "maxLength": 10}}
                }},
                "metadata": {"type": "object", "properties": {"a/b": {"type": "integer"}, "0": {"const": 1}}},
                "user": {"pattern": "^u-[0-9]+$"}
            },
            "required": ["user"]
        }))
        .unwrap();
        schema
            .validate(&json!({"user": "u-1", "messages": [{"content": "short"}]}))
            .unwrap();
        let e = schema
            .validate(&json!({"user": "u-1", "messages": [{"content": "ok"}, {"content": "far too long here"}]}))
            .unwrap_err();
        assert_err(
            &e,
            "messages[1].content",
            "Invalid 'messages[1].content': \"far too long here\" is longer than 10 characters.",
        );
        let e = schema
            .validate(&json!({"user": "u-1", "metadata": {"a/b": "x"}}))
            .unwrap_err();
        assert_eq!(e.param, r#"metadata["a/b"]"#);
        let e = schema
            .validate(&json!({"user": "u-1", "metadata": {"0": 2}}))
            .unwrap_err();
        assert_eq!(e.param, "metadata.0");
        let e = schema.validate(&json!({"user": "x"})).unwrap_err();
        assert_err(&e, "user", "Invalid 'user': \"x\" does not match \"^u-[0-9]+$\".");
        let e = schema.validate(&json!({})).unwrap_err();
        assert_err(&e, "", "Invalid request body: \"user\" is a required property.");
        // Large values are not echoed back.
        let e = schema
            .validate(&json!({"user": "u-1", "messages": [{"content": "x".repeat(100)}]}))
            .unwrap_err();
        assert!(!e.message.contains("xxxx"), "{}", e.message);

        assert!(CustomSchema::new(&json!({"type": 5})).is_err());
        // Nothing is fetched.
        assert!(CustomSchema::new(&json!({"$ref": "https://example.com/schema.json"})).is_err());
        assert!(CustomSchema::new(&json!({"$ref": "file:///etc/schema.json"})).is_err());
        // Look-around is not linear-time, so it is refused.
        assert!(CustomSchema::new(&json!({"pattern": "(?=a)a"})).is_err());
    }

    /// JSON built from the words the checks look for, so that random bodies
    /// reach deep into messages, parts, tools and formats.
    fn arb_shaped() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        const KEYS: &[&str] = &[
            "role",
            "content",
            "type",
            "text",
            "image_url",
            "url",
            "detail",
            "input_audio",
            "data",
            "format",
            "file",
            "file_id",
            "tool_calls",
            "id",
            "function",
            "name",
            "arguments",
            "tool_call_id",
            "json_schema",
            "schema",
            "allowed_tools",
            "mode",
            "tools",
            "include_usage",
            "refusal",
            "custom",
            "input",
            "video_url",
        ];
        const WORDS: &[&str] = &[
            "user",
            "assistant",
            "system",
            "tool",
            "developer",
            "function",
            "text",
            "image_url",
            "input_audio",
            "file",
            "refusal",
            "json_schema",
            "json_object",
            "custom",
            "allowed_tools",
            "auto",
            "required",
            "none",
            "https://x/y",
            "data:image/png;base64,AA",
            "data:",
            "",
            "é",
            "f-1",
            "video_url",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-3.0f64..3.0).prop_map(Value::from),
            prop::sample::select(WORDS).prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 64, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((prop::sample::select(KEYS), inner), 0..5).prop_map(|members| {
                    Value::Object(members.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                }),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn random_bodies_never_panic(
            fields in proptest::collection::vec(
                (proptest::sample::select(CHAT_FIELDS.iter().chain(COMPLETIONS_FIELDS).chain(EMBEDDINGS_FIELDS)
                    .copied().collect::<Vec<_>>()), arb_shaped()),
                0..10,
            ),
            which in 0..3usize,
        ) {
            let body = Value::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect());
            let operation = [Operation::ChatCompletions, Operation::Completions, Operation::Embeddings][which];
            let result = validate(operation, &body);
            if let Err(e) = &result {
                proptest::prop_assert!(!e.message.is_empty());
            }
            let _ = extra_fields(operation, &body);
            let policy = crate::validate::params::ParamPolicy {
                max_tokens: Some(10),
                max_n: Some(1),
                max_tools: Some(1),
                max_messages: Some(1),
                forbidden: vec!["logprobs".into(), "stream_options.include_usage".into(), "a.b.c".into()],
                response_formats: Some(vec!["text".into()]),
            };
            let _ = policy.check(operation, &body);
            // What hygiene parses back is what was checked.
            let bytes = body.to_string();
            if let Ok(parsed) = crate::validate::hygiene::parse_strict(bytes.as_bytes(), &Default::default()) {
                proptest::prop_assert_eq!(validate(operation, &parsed), result);
            }
        }
    }
}
