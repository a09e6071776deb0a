//! Input tokens of an OpenAI request, counted with the model's real
//! tokenizer, the way the API bills them.
//!
//! A rate limit or budget measured in tokens is only as good as the count:
//! `len / 4` is off by a factor of two or more on code and non-English text,
//! so requests are counted with the BPE the model itself uses. The encodings
//! (`o200k_base`, `cl100k_base`) are compiled into `tiktoken-rs`, so nothing
//! is fetched at run time.
//!
//! Chat requests are counted as OpenAI's cookbook counts them
//! (<https://github.com/openai/openai-cookbook/blob/main/examples/How_to_count_tokens_with_tiktoken.ipynb>):
//! every string field of every message, plus [`TOKENS_PER_MESSAGE`] per
//! message, [`TOKENS_PER_NAME`] when a message has a `name`, and
//! [`REPLY_PRIMING`] once. Tool definitions are counted as their JSON text,
//! which is close to (slightly above) what the API charges for them.
//!
//! Content that is not text (images, audio, files) cannot be counted from the
//! request; rather than guess, the count says how many such parts it skipped
//! ([`TokenCount::uncounted_parts`]) and the caller decides what to charge.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

use crate::route::Operation;

/// Tokens added for every chat message: its framing
/// (`<|start|>{role}<|message|>…<|end|>`), as the cookbook counts it.
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Tokens added when a chat message has a `name`.
pub const TOKENS_PER_NAME: u64 = 1;
/// Tokens added once per chat request: the priming of the reply
/// (`<|start|>assistant<|message|>`).
pub const REPLY_PRIMING: u64 = 3;

/// Why tokens could not be counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The configured tokenizer name is not one Warden knows.
    #[error("unknown tokenizer {0:?} (known: o200k_base, cl100k_base)")]
    UnknownTokenizer(String),
    /// The embedded encoding failed to load; a broken build, not bad input.
    #[error("tokenizer {name} failed to load: {reason}")]
    Load {
        /// The tokenizer.
        name: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The tokenizer gave up on a text (e.g. its regex hit a backtracking
    /// limit).
    #[error("tokenizing failed: {0}")]
    Encode(String),
    /// The operation carries no text to count.
    #[error("{0:?} requests carry no text tokens")]
    NoText(Operation),
    /// The body does not have the shape the operation requires.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
}

/// A tokenizer (BPE encoding) a model may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tokenizer {
    /// `o200k_base`: GPT-4o, GPT-4.1, GPT-5, o-series models.
    O200kBase,
    /// `cl100k_base`: GPT-4, GPT-3.5-turbo, `text-embedding-3-*`, `ada-002`.
    Cl100kBase,
}

// Building a BPE parses a few megabytes of ranks and takes hundreds of
// milliseconds, so each encoding is built once per process and shared. The
// error is kept as text because the load error type is not `Clone`.
static O200K_BASE: LazyLock<Result<CoreBPE, String>> =
    LazyLock::new(|| tiktoken_rs::o200k_base().map_err(|e| e.to_string()));
static CL100K_BASE: LazyLock<Result<CoreBPE, String>> =
    LazyLock::new(|| tiktoken_rs::cl100k_base().map_err(|e| e.to_string()));

impl Tokenizer {
    /// The tokenizer named `name` (`o200k_base` or `cl100k_base`).
    pub fn from_name(name: &str) -> Result<Self, TokenError> {
        match name {
            "o200k_base" => Ok(Tokenizer::O200kBase),
            "cl100k_base" => Ok(Tokenizer::Cl100kBase),
            _ => Err(TokenError::UnknownTokenizer(name.to_owned())),
        }
    }

    /// The tokenizer's name, as written in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Tokenizer::O200kBase => "o200k_base",
            Tokenizer::Cl100kBase => "cl100k_base",
        }
    }

    /// Builds the encoding now, if it is not built yet, so that the first
    /// request does not pay for it; meant for configuration load.
    pub fn preload(self) -> Result<(), TokenError> {
        self.bpe().map(|_| ())
    }

    fn bpe(self) -> Result<&'static CoreBPE, TokenError> {
        let cell = match self {
            Tokenizer::O200kBase => &O200K_BASE,
            Tokenizer::Cl100kBase => &CL100K_BASE,
        };
        cell.as_ref().map_err(|reason| TokenError::Load {
            name: self.name(),
            reason: reason.clone(),
        })
    }

    /// The number of tokens in `text`.
    ///
    /// Special-token markers such as `<|endoftext|>` in the text are counted
    /// as ordinary text, as the API treats them: a caller cannot make its
    /// text cheaper by spelling a special token. `encode` with no allowed
    /// special tokens is used rather than `encode_ordinary` because the
    /// latter panics where this returns an error.
    pub fn count(self, text: &str) -> Result<u64, TokenError> {
        let n = self
            .bpe()?
            .count(text, &HashSet::new())
            .map_err(|e| TokenError::Encode(e.to_string()))?;
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }
}

impl FromStr for Tokenizer {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tokenizer::from_name(s)
    }
}

impl fmt::Display for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The input tokens of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenCount {
    /// Tokens counted, overhead included.
    pub tokens: u64,
    /// Content parts that are not text (images, audio, files, unknown part
    /// types) and so are not in [`tokens`](Self::tokens). Zero means
    /// everything was counted.
    pub uncounted_parts: u32,
}

impl TokenCount {
    /// Whether every part of the input was counted.
    pub fn is_complete(&self) -> bool {
        self.uncounted_parts == 0
    }

    fn add(&mut self, tokens: u64) {
        self.tokens = self.tokens.saturating_add(tokens);
    }

    fn skip(&mut self) {
        self.uncounted_parts = self.uncounted_parts.saturating_add(1);
    }
}

/// Counts the input tokens of an OpenAI request body for `operation`.
///
/// - Chat completions: `messages` as described in the module docs, plus
///   `tools` (and the legacy `functions`) as JSON text.
/// - Completions: `prompt` (a string, an array of strings, an array of token
///   ids, or an array of arrays of token ids), plus `suffix`.
/// - Embeddings: `input`, in the same shapes as `prompt`.
///
/// Token-id arrays are counted by their length: each id is one token of the
/// model's own encoding, which is exactly what the API bills.
pub fn count_request(tokenizer: Tokenizer, operation: Operation, body: &Value) -> Result<TokenCount, TokenError> {
    let mut count = TokenCount::default();
    match operation {
        Operation::ChatCompletions => count_chat(tokenizer, body, &mut count)?,
        Operation::Completions => {
            let prompt = body.get("prompt").ok_or(TokenError::Malformed("`prompt` is missing"))?;
            count_prompt(tokenizer, prompt, NOT_A_PROMPT, &mut count)?;
            match body.get("suffix") {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => count.add(tokenizer.count(s)?),
                Some(_) => return Err(TokenError::Malformed("`suffix` is not a string")),
            }
        }
        Operation::Embeddings => {
            let input = body.get("input").ok_or(TokenError::Malformed("`input` is missing"))?;
            count_prompt(tokenizer, input, NOT_AN_INPUT, &mut count)?;
        }
        other => return Err(TokenError::NoText(other)),
    }
    Ok(count)
}

fn count_chat(tokenizer: Tokenizer, body: &Value, count: &mut TokenCount) -> Result<(), TokenError> {
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or(TokenError::Malformed("`messages` is missing or not an array"))?;
    for message in messages {
        let message = message
            .as_object()
            .ok_or(TokenError::Malformed("a message is not an object"))?;
        count.add(TOKENS_PER_MESSAGE);
        // The cookbook encodes every value of the message. Values that are
        // not strings (`tool_calls`, `function_call`) are counted as their
        // JSON text: the API renders them more tersely, so this errs high,
        // which is the safe side for a budget.
        for (key, value) in message {
            match (key.as_str(), value) {
                ("content", content) => count_content(tokenizer, content, count)?,
                (_, Value::Null) => {}
                (key, Value::String(s)) => {
                    count.add(tokenizer.count(s)?);
                    if key == "name" {
                        count.add(TOKENS_PER_NAME);
                    }
                }
                (_, other) => count.add(tokenizer.count(&other.to_string())?),
            }
        }
    }
    count.add(REPLY_PRIMING);
    for key in ["tools", "functions"] {
        match body.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(defs)) => {
                for def in defs {
                    count.add(tokenizer.count(&def.to_string())?);
                }
            }
            Some(_) => return Err(TokenError::Malformed("`tools` or `functions` is not an array")),
        }
    }
    Ok(())
}

/// A message's `content`: a string, `null` (an assistant message that only
/// calls tools), or an array of parts of which only text can be counted.
fn count_content(tokenizer: Tokenizer, content: &Value, count: &mut TokenCount) -> Result<(), TokenError> {
    match content {
        Value::Null => {}
        Value::String(s) => count.add(tokenizer.count(s)?),
        Value::Array(parts) => {
            for part in parts {
                let text = match part.get("type").and_then(Value::as_str) {
                    Some("text") => part.get("text"),
                    Some("refusal") => part.get("refusal"),
                    _ => None,
                };
                match text.and_then(Value::as_str) {
                    Some(text) => count.add(tokenizer.count(text)?),
                    None => count.skip(),
                }
            }
        }
        _ => {
            return Err(TokenError::Malformed(
                "a message's `content` is neither a string nor an array",
            ));
        }
    }
    Ok(())
}

const NOT_A_PROMPT: &str = "`prompt` is not a string, an array of strings or an array of token ids";
const NOT_AN_INPUT: &str = "`input` is not a string, an array of strings or an array of token ids";

/// `prompt` or `input`: a string, or an array of strings, of token ids, or of
/// arrays of token ids.
fn count_prompt(
    tokenizer: Tokenizer,
    prompt: &Value,
    shape_error: &'static str,
    count: &mut TokenCount,
) -> Result<(), TokenError> {
    let malformed = || TokenError::Malformed(shape_error);
    match prompt {
        Value::String(s) => count.add(tokenizer.count(s)?),
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(s) => count.add(tokenizer.count(s)?),
                    Value::Number(n) if n.is_u64() => count.add(1),
                    Value::Array(ids) => {
                        if !ids.iter().all(Value::is_u64) {
                            return Err(malformed());
                        }
                        count.add(u64::try_from(ids.len()).unwrap_or(u64::MAX));
                    }
                    _ => return Err(malformed()),
                }
            }
        }
        _ => return Err(malformed()),
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    const BOTH: [Tokenizer; 2] = [Tokenizer::O200kBase, Tokenizer::Cl100kBase];

    fn bpe(t: Tokenizer) -> &'static CoreBPE {
        t.bpe().unwrap()
    }

    /// The count straight from the encoding, independent of `count`.
    fn n(t: Tokenizer, text: &str) -> u64 {
        bpe(t).encode_with_special_tokens(text).len() as u64
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for t in BOTH {
            assert_eq!(Tokenizer::from_name(t.name()).unwrap(), t);
            assert_eq!(t.to_string().parse::<Tokenizer>().unwrap(), t);
            t.preload().unwrap();
        }
        assert_eq!(
            Tokenizer::from_name("p50k_base"),
            Err(TokenError::UnknownTokenizer("p50k_base".into()))
        );
    }

    #[test]
    fn known_literal_counts() {
        for t in BOTH {
            assert_eq!(t.count("hello world").unwrap(), 2, "{t}");
            assert_eq!(t.count("").unwrap(), 0, "{t}");
        }
        // The cookbook's example string, with the token ids it lists.
        assert_eq!(Tokenizer::Cl100kBase.count("tiktoken is great!").unwrap(), 6);
        assert_eq!(Tokenizer::O200kBase.count("tiktoken is great!").unwrap(), 6);
        assert_eq!(
            bpe(Tokenizer::Cl100kBase).encode_ordinary("tiktoken is great!"),
            [83, 1609, 5963, 374, 2294, 0]
        );
        assert_eq!(
            bpe(Tokenizer::O200kBase).encode_ordinary("tiktoken is great!"),
            [83, 8251, 2488, 382, 2212, 0]
        );
    }

    #[test]
    fn special_token_text_is_counted_as_text() {
        // As ordinary text `<|endoftext|>` is several tokens; as a special
        // token it would be one. Callers must not get the cheaper reading.
        for t in BOTH {
            let c = t.count("<|endoftext|>").unwrap();
            assert!(c > 1, "{t}: {c}");
            assert_eq!(c, bpe(t).encode_ordinary("<|endoftext|>").len() as u64);
        }
    }

    #[test]
    fn chat_follows_the_cookbook() {
        // The cookbook's example conversation.
        let messages = json!([
            {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
            {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
            {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
            {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
            {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
            {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
        ]);
        let body = json!({"model": "gpt-4o", "messages": messages});
        for t in BOTH {
            // The cookbook's loop, written out independently.
            let mut expected = 0;
            for m in messages.as_array().unwrap() {
                expected += 3;
                for (k, v) in m.as_object().unwrap() {
                    expected += n(t, v.as_str().unwrap());
                    if k == "name" {
                        expected += 1;
                    }
                }
            }
            expected += 3;
            let got = count_request(t, Operation::ChatCompletions, &body).unwrap();
            assert_eq!(
                got,
                TokenCount {
                    tokens: expected,
                    uncounted_parts: 0
                },
                "{t}"
            );
        }
        // The cookbook reports, matching the API's usage, 129 prompt tokens
        // for this conversation on gpt-4 (cl100k_base) and 124 on gpt-4o
        // (o200k_base).
        let got = count_request(Tokenizer::Cl100kBase, Operation::ChatCompletions, &body).unwrap();
        assert_eq!(got.tokens, 129);
        let got = count_request(Tokenizer::O200kBase, Operation::ChatCompletions, &body).unwrap();
        assert_eq!(got.tokens, 124);
    }

    #[test]
    fn chat_single_message_literal() {
        // 3 (message) + 1 ("user") + 2 ("hello world") + 3 (priming).
        let body = json!({"messages": [{"role": "user", "content": "hello world"}]});
        for t in BOTH {
            assert_eq!(
                count_request(t, Operation::ChatCompletions, &body).unwrap().tokens,
                9,
                "{t}"
            );
        }
    }

    #[test]
    fn chat_text_parts_images_and_tools() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let tool_calls = json!([{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]);
        let body = json!({
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "And the weather in Paris?"},
                ]},
                {"role": "assistant", "content": null, "tool_calls": tool_calls},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            "tools": tools,
        });
        for t in BOTH {
            let expected = 3 * 3
                + 3
                + n(t, "user")
                + n(t, "What is in this image?")
                + n(t, "And the weather in Paris?")
                + n(t, "assistant")
                + n(t, &tool_calls.to_string())
                + n(t, "tool")
                + n(t, "call_1")
                + n(t, "sunny")
                + n(t, &tools[0].to_string());
            let got = count_request(t, Operation::ChatCompletions, &body).unwrap();
            assert_eq!(got.tokens, expected, "{t}");
            assert_eq!(got.uncounted_parts, 1, "{t}: the image is not guessed at");
            assert!(!got.is_complete());
        }
    }

    #[test]
    fn completions_and_embeddings_in_every_shape() {
        let t = Tokenizer::O200kBase;
        let count = |op, body: Value| count_request(t, op, &body).unwrap().tokens;
        assert_eq!(count(Operation::Completions, json!({"prompt": "hello world"})), 2);
        assert_eq!(
            count(
                Operation::Completions,
                json!({"prompt": ["hello world", "hello world"], "suffix": "hello world"})
            ),
            6
        );
        // Token ids are billed one each.
        assert_eq!(count(Operation::Completions, json!({"prompt": [1, 2, 3]})), 3);
        assert_eq!(count(Operation::Embeddings, json!({"input": [[1, 2], [3]]})), 3);
        assert_eq!(count(Operation::Embeddings, json!({"input": "hello world"})), 2);
        assert_eq!(
            count(Operation::Embeddings, json!({"input": ["a b c", "hello world"]})),
            n(t, "a b c") + 2
        );
    }

    #[test]
    fn malformed_bodies_and_bodiless_operations_are_errors() {
        let t = Tokenizer::Cl100kBase;
        let err = |op, body: Value| count_request(t, op, &body).unwrap_err();
        assert!(matches!(
            err(Operation::ChatCompletions, json!({})),
            TokenError::Malformed(_)
        ));
        assert!(matches!(
            err(Operation::ChatCompletions, json!({"messages": ["hi"]})),
            TokenError::Malformed(_)
        ));
        assert!(matches!(
            err(
                Operation::ChatCompletions,
                json!({"messages": [{"role": "user", "content": 5}]})
            ),
            TokenError::Malformed(_)
        ));
        assert!(matches!(
            err(Operation::Completions, json!({})),
            TokenError::Malformed(_)
        ));
        assert!(matches!(
            err(Operation::Completions, json!({"prompt": 7})),
            TokenError::Malformed(_)
        ));
        assert!(matches!(
            err(Operation::Embeddings, json!({"input": [[1, -2]]})),
            TokenError::Malformed(_)
        ));
        assert!(matches!(
            err(Operation::Embeddings, json!({"input": [{"x": 1}]})),
            TokenError::Malformed(_)
        ));
        assert_eq!(err(Operation::Infer, json!({})), TokenError::NoText(Operation::Infer));
    }

    #[test]
    fn a_ten_kilobyte_prompt_is_counted() {
        let sentence = "The quick brown fox jumps over the lazy dog. ";
        let prompt = sentence.repeat(10_240 / sentence.len() + 1);
        assert!(prompt.len() >= 10_240);
        for t in BOTH {
            let got = count_request(t, Operation::Completions, &json!({"prompt": prompt})).unwrap();
            assert_eq!(got.tokens, n(t, &prompt), "{t}");
            // English prose runs about four bytes a token; far from it means
            // the text was not really tokenized.
            assert!((1_500..4_000).contains(&got.tokens), "{t}: {}", got.tokens);
        }
        // One long unbroken "word" is the slow path of BPE; it must finish.
        let blob = "a".repeat(10_240);
        for t in BOTH {
            assert!(t.count(&blob).unwrap() > 0);
        }
    }

    #[test]
    fn hostile_text_is_an_error_not_a_panic() {
        // A megabyte of spaces exceeds fancy-regex's backtracking limit on
        // o200k_base (tiktoken-rs 0.12), where `encode_ordinary` would
        // panic. Whether a given version manages it or not, the answer must
        // be a count or `TokenError::Encode`, never a dead worker. (Only
        // o200k_base: cl100k_base gets through, slowly, in a debug build.)
        let spaces = " ".repeat(1 << 20);
        match Tokenizer::O200kBase.count(&spaces) {
            Ok(n) => assert!(n > 0),
            Err(e) => assert!(matches!(e, TokenError::Encode(_)), "{e}"),
        }
    }
}
