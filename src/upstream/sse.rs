//! Server-sent events as they pass through: reading the `usage` an upstream
//! reports in a stream, counting (and limiting) the output tokens of a
//! metered stream, and the error event that ends a stream Warden cuts off.
//!
//! [`UsageScanner`] never holds the stream: it looks at each chunk as it is
//! relayed, keeping only the unfinished last line of a chunk (bounded by
//! [`MAX_LINE`]) so that an event split across chunks is still read. Only
//! `data:` lines that mention `"usage"` are parsed.
//!
//! [`StreamMeter`] does the same for a metered stream and also counts the
//! output tokens of each event; with an output limit it holds back the bytes
//! of an unfinished event until the event is whole, so that it can cut the
//! stream exactly before the event that would cross the limit.

use bytes::Bytes;
use serde_json::Value;

use crate::audit::Usage;
use crate::config::Protocol;
use crate::limits::tokens::Tokenizer;
use crate::reject::Reject;

/// Longest SSE line the scanner keeps across chunks; a longer line is skipped
/// (usage chunks are a few hundred bytes).
pub const MAX_LINE: usize = 256 * 1024;

/// Finds the last `usage` object reported in an OpenAI-style event stream.
#[derive(Debug, Default)]
pub struct UsageScanner {
    partial: Vec<u8>,
    skipping: bool,
    usage: Option<Usage>,
}

impl UsageScanner {
    /// Looks at the next chunk of the stream.
    pub fn scan(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(end);
            rest = &tail[1..];
            if self.skipping {
                self.skipping = false;
            } else if self.partial.is_empty() {
                self.line(line);
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.line(&whole);
            }
        }
        if !rest.is_empty() && !self.skipping {
            if self.partial.len() + rest.len() > MAX_LINE {
                self.partial.clear();
                self.skipping = true;
            } else {
                self.partial.extend_from_slice(rest);
            }
        }
    }

    /// The last usage seen.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        if !contains(data, b"\"usage\"") {
            return;
        }
        if let Some(usage) = Usage::from_json(data) {
            self.usage = Some(usage);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// What [`StreamMeter::feed`] lets through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metered {
    /// The bytes to relay to the client now.
    pub pass: Bytes,
    /// The output limit is reached: the stream must end here (typically with
    /// an [`error_event`]). Once true, it stays true and nothing more passes.
    pub exceeded: bool,
}

/// Counts the output tokens of an OpenAI event stream as it is relayed,
/// finds the `usage` it reports, and cuts it at an output-token limit.
///
/// Counted, per event, with the model's tokenizer: chat
/// `choices[*].delta.content`, `.refusal`, `.reasoning_content`,
/// `.tool_calls[*].function.name` and `.arguments` (and the legacy
/// `.function_call.name` and `.arguments`); legacy completions
/// `choices[*].text`. Each of these strings is counted on its own and the
/// counts are added up, so the total can differ by a few tokens from
/// counting the whole concatenated reply at once (a word split across two
/// deltas may be two tokens here and one there); it is the sum of the
/// per-piece counts that [`counted_output_tokens`](Self::counted_output_tokens)
/// reports. An upstream's own `usage`, when it reports one, is the exact
/// figure; the count is what the meter can vouch for while the stream runs.
///
/// The stream is read as the SSE specification frames it: lines end in `\n`
/// or `\r\n` (a lone `\r` is not taken as a line end; OpenAI-compatible
/// servers do not send one), a leading BOM is dropped, an event ends at a
/// blank line, its `data:` lines are joined with `\n`, and comment (`:`)
/// lines and other fields are passed over. `data: [DONE]` and events that are
/// not JSON count zero and pass unchanged. Only payloads in which one of the
/// counted field names (or a `\u` escape, which could spell one) appears are
/// parsed at all, so role, finish and usage events cost a byte scan.
///
/// **Without a limit** every chunk passes at once and unchanged; the meter
/// only looks. **With a limit**, complete events pass as soon as they are
/// complete, and the bytes of an event still unfinished at the end of a chunk
/// are held until its blank line arrives. The event whose tokens would take
/// the count past the limit, and everything after it, is withheld and
/// [`Metered::exceeded`] is set. An event longer than [`MAX_LINE`] is not
/// inspected (the meter keeps no more than that): without a limit it passes
/// uncounted; with a limit it cannot be counted, so it is withheld and the
/// limit taken as exceeded.
///
/// Streams of other protocols are passed through untouched: only OpenAI's
/// events are known.
#[derive(Debug)]
pub struct StreamMeter {
    tokenizer: Tokenizer,
    limit: Option<u64>,
    inspect: bool,
    counted: u64,
    usage: Option<Usage>,
    exceeded: bool,
    /// The unfinished line. Once the event is oversized, only its first two
    /// bytes are kept: enough to tell whether it is blank.
    line: Vec<u8>,
    /// The current event's `data`, each line followed by `\n`.
    data: Vec<u8>,
    /// Bytes of the current event so far, line ends included.
    event_len: usize,
    /// The current event is longer than [`MAX_LINE`].
    oversized: bool,
    /// With a limit: the bytes of the current, unfinished event, held back.
    held: Vec<u8>,
    /// No line has been read yet (the stream may start with a BOM).
    first_line: bool,
}

impl StreamMeter {
    /// A meter for a stream of `protocol`, counting with `tokenizer`, cutting
    /// the stream once more than `output_limit` tokens would have passed.
    pub fn new(protocol: Protocol, tokenizer: Tokenizer, output_limit: Option<u64>) -> StreamMeter {
        StreamMeter {
            tokenizer,
            limit: output_limit,
            inspect: protocol == Protocol::Openai,
            counted: 0,
            usage: None,
            exceeded: false,
            line: Vec::new(),
            data: Vec::new(),
            event_len: 0,
            oversized: false,
            held: Vec::new(),
            first_line: true,
        }
    }

    /// Looks at the next chunk of the stream and says what of it to relay.
    pub fn feed(&mut self, chunk: Bytes) -> Metered {
        if self.exceeded {
            return Metered {
                pass: Bytes::new(),
                exceeded: true,
            };
        }
        if !self.inspect {
            return Metered {
                pass: chunk,
                exceeded: false,
            };
        }
        let Some(limit) = self.limit else {
            let mut pos = 0;
            while self.next_event(&chunk, &mut pos) {
                if let Some(tokens) = self.end_event() {
                    self.counted = self.counted.saturating_add(tokens);
                }
            }
            return Metered {
                pass: chunk,
                exceeded: false,
            };
        };
        // `chunk[..passed]` ends the last event that fits.
        let mut passed = 0;
        let mut pos = 0;
        while self.next_event(&chunk, &mut pos) {
            let Some(tokens) = self.end_event() else {
                // Too large to count: it cannot be let through.
                self.exceeded = true;
                break;
            };
            self.counted = self.counted.saturating_add(tokens);
            if self.counted > limit {
                self.exceeded = true;
                break;
            }
            passed = pos;
        }
        if !self.exceeded && self.oversized {
            // An event too large to count, still unfinished.
            self.exceeded = true;
        }
        let pass = if passed == 0 {
            Bytes::new()
        } else if self.held.is_empty() {
            chunk.slice(..passed)
        } else {
            let mut whole = std::mem::take(&mut self.held);
            whole.extend_from_slice(&chunk[..passed]);
            Bytes::from(whole)
        };
        if self.exceeded {
            self.held = Vec::new();
            self.line = Vec::new();
            self.data = Vec::new();
        } else {
            self.held.extend_from_slice(&chunk[passed..]);
        }
        Metered {
            pass,
            exceeded: self.exceeded,
        }
    }

    /// The end of the stream: an event left unfinished (no blank line after
    /// it) is read as if it were complete. With a limit its held bytes pass
    /// if it fits; a client would drop such an event, but it is not Warden's
    /// to change the stream. Without a limit, or after the limit was
    /// exceeded, nothing is left to pass.
    pub fn finish(&mut self) -> Metered {
        if self.exceeded || !self.inspect {
            return Metered {
                pass: Bytes::new(),
                exceeded: self.exceeded,
            };
        }
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.field(&line);
        }
        let tokens = self.end_event();
        let held = Bytes::from(std::mem::take(&mut self.held));
        if let Some(tokens) = tokens {
            self.counted = self.counted.saturating_add(tokens);
        }
        match self.limit {
            None => Metered::default(),
            Some(limit) if tokens.is_some() && self.counted <= limit => Metered {
                pass: held,
                exceeded: false,
            },
            Some(_) => {
                self.exceeded = true;
                Metered {
                    pass: Bytes::new(),
                    exceeded: true,
                }
            }
        }
    }

    /// The last usage the upstream reported.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Output tokens counted so far: every event read whole, including the
    /// one that crossed the limit (the upstream produced it, though the
    /// client did not get it), excluding events too large to inspect and
    /// anything after the cut.
    pub fn counted_output_tokens(&self) -> u64 {
        self.counted
    }

    /// Reads lines from `chunk[*pos..]` until one ends an event (true, with
    /// `*pos` just past it) or the chunk is used up (false; its unfinished
    /// last line is kept).
    fn next_event(&mut self, chunk: &[u8], pos: &mut usize) -> bool {
        while *pos < chunk.len() {
            let rest = &chunk[*pos..];
            let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                self.grow(rest.len());
                if self.oversized {
                    let room = 2usize.saturating_sub(self.line.len()).min(rest.len());
                    self.line.extend_from_slice(&rest[..room]);
                } else {
                    self.line.extend_from_slice(rest);
                }
                *pos = chunk.len();
                return false;
            };
            *pos += nl + 1;
            self.grow(nl + 1);
            let segment = &rest[..nl];
            let blank = if self.oversized {
                let blank = matches!((self.line.as_slice(), segment), ([], []) | ([], b"\r") | (b"\r", []));
                self.line.clear();
                self.first_line = false;
                blank
            } else if self.line.is_empty() {
                self.field(segment)
            } else {
                let mut whole = std::mem::take(&mut self.line);
                whole.extend_from_slice(segment);
                let blank = self.field(&whole);
                whole.clear();
                self.line = whole;
                blank
            };
            if blank {
                return true;
            }
        }
        false
    }

    /// Adds `n` bytes to the current event; past [`MAX_LINE`] the event is
    /// oversized and what was kept of it is let go.
    fn grow(&mut self, n: usize) {
        self.event_len = self.event_len.saturating_add(n);
        if !self.oversized && self.event_len > MAX_LINE {
            self.oversized = true;
            self.data = Vec::new();
            self.line.truncate(2);
            self.line.shrink_to_fit();
        }
    }

    /// Takes in one whole line (without its `\n`); true if it is blank.
    fn field(&mut self, line: &[u8]) -> bool {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        // The specification lets a stream start with a UTF-8 BOM.
        let line = if std::mem::take(&mut self.first_line) {
            line.strip_prefix("\u{feff}".as_bytes()).unwrap_or(line)
        } else {
            line
        };
        if line.is_empty() {
            return true;
        }
        let value = match line.strip_prefix(b"data") {
            Some([]) => &[][..],
            Some([b':', value @ ..]) => value.strip_prefix(b" ").unwrap_or(value),
            // Comments, other fields, and fields merely starting with "data".
            _ => return false,
        };
        self.data.extend_from_slice(value);
        self.data.push(b'\n');
        false
    }

    /// Ends the current event: its tokens, or `None` if it was too large to
    /// read.
    fn end_event(&mut self) -> Option<u64> {
        self.event_len = 0;
        self.line.clear();
        if std::mem::take(&mut self.oversized) {
            self.data.clear();
            return None;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        let tokens = if data.is_empty() { 0 } else { self.payload(&data) };
        data.clear();
        self.data = data;
        Some(tokens)
    }

    /// One event's `data`: records its usage and returns its output tokens.
    fn payload(&mut self, data: &[u8]) -> u64 {
        if data == b"[DONE]" {
            return 0;
        }
        let keys = scan_keys(data);
        if keys.usage
            && let Some(usage) = Usage::from_json(data)
        {
            self.usage = Some(usage);
        }
        if !keys.text {
            return 0;
        }
        let Ok(event) = serde_json::from_slice::<Value>(data) else {
            return 0;
        };
        let mut tokens = 0u64;
        for piece in output_texts(&event) {
            tokens = tokens.saturating_add(self.count(piece));
        }
        tokens
    }

    fn count(&self, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        // A text the tokenizer gives up on is charged a token a byte: no
        // BPE token is shorter than a byte, so this is never an undercount.
        self.tokenizer
            .count(text)
            .unwrap_or_else(|_| u64::try_from(text.len()).unwrap_or(u64::MAX))
    }
}

/// Which interesting keys a payload may hold, by a scan of its bytes.
#[derive(Debug, Default, PartialEq, Eq)]
struct Keys {
    /// A counted text field, or a `\u` escape that could spell one.
    text: bool,
    /// `"usage"`.
    usage: bool,
}

/// The names of the fields that carry output text, as they appear quoted.
const TEXT_KEYS: [&[u8]; 6] = [
    b"content\"",
    b"text\"",
    b"arguments\"",
    b"name\"",
    b"refusal\"",
    b"reasoning_content\"",
];

fn scan_keys(data: &[u8]) -> Keys {
    let mut keys = Keys::default();
    for (i, &b) in data.iter().enumerate() {
        match b {
            b'"' => {
                let after = &data[i + 1..];
                if !keys.text && TEXT_KEYS.iter().any(|k| after.starts_with(k)) {
                    keys.text = true;
                } else if !keys.usage && after.starts_with(b"usage\"") {
                    keys.usage = true;
                }
            }
            b'\\' if data.get(i + 1) == Some(&b'u') => keys.text = true,
            _ => continue,
        }
        if keys.text && keys.usage {
            break;
        }
    }
    keys
}

/// The output text pieces of one OpenAI stream event, in order.
fn output_texts<'a>(event: &'a Value) -> Vec<&'a str> {
    let mut pieces = Vec::new();
    let Some(choices) = event.get("choices").and_then(Value::as_array) else {
        return pieces;
    };
    let mut push = |v: Option<&'a Value>| {
        if let Some(s) = v.and_then(Value::as_str) {
            pieces.push(s);
        }
    };
    for choice in choices {
        push(choice.get("text"));
        let Some(delta) = choice.get("delta") else { continue };
        push(delta.get("content"));
        push(delta.get("refusal"));
        push(delta.get("reasoning_content"));
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for function in calls.iter().filter_map(|c| c.get("function")) {
                push(function.get("name"));
                push(function.get("arguments"));
            }
        }
        if let Some(function) = delta.get("function_call") {
            push(function.get("name"));
            push(function.get("arguments"));
        }
    }
    pieces
}

/// The event that ends a stream Warden cuts off: OpenAI's SDKs raise an error
/// on a `data:` event carrying an `error` object.
pub fn error_event(protocol: Protocol, reject: &Reject) -> Bytes {
    let body = reject.body(protocol);
    let mut event = Vec::with_capacity(body.len() + 10);
    event.extend_from_slice(b"data: ");
    event.extend_from_slice(&body);
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn usage_is_found_however_the_stream_is_split() {
        let want = Usage {
            prompt_tokens: 5,
            completion_tokens: 2,
            total_tokens: 7,
            ..Usage::default()
        };
        for size in [1, 2, 3, 7, 16, 64, STREAM.len()] {
            let mut scanner = UsageScanner::default();
            for chunk in STREAM.as_bytes().chunks(size) {
                scanner.scan(chunk);
            }
            assert_eq!(scanner.usage(), Some(want), "chunk size {size}");
        }
    }

    #[test]
    fn null_usage_and_overlong_lines_are_ignored() {
        let mut scanner = UsageScanner::default();
        scanner.scan(b"data: {\"usage\":null}\n\n");
        assert_eq!(scanner.usage(), None);
        let long = format!(
            "data: {{\"usage\":{{\"prompt_tokens\":1}},\"pad\":\"{}\"}}\n",
            "x".repeat(2 * MAX_LINE)
        );
        for chunk in long.as_bytes().chunks(4096) {
            scanner.scan(chunk);
        }
        assert_eq!(scanner.usage(), None);
        assert!(scanner.partial.is_empty());
        scanner.scan(b"data: {\"usage\":{\"prompt_tokens\":3}}\n");
        assert_eq!(scanner.usage().map(|u| u.prompt_tokens), Some(3));
    }

    // --- StreamMeter ------------------------------------------------------

    /// A chat stream with everything the meter must read: a comment, a role
    /// event, `\r\n` line ends, reasoning, a `data` field over two lines,
    /// other fields, non-ASCII text, a tool call in two pieces, a refusal
    /// without the space after `data:`, a broken event, the finish event,
    /// usage, and `[DONE]`.
    const EVENTS: [&str; 13] = [
        ": keep-alive\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello there, \"}}]}\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"Let me think.\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\ndata: \"delta\":{\"content\":\"how are you?\"}}]}\n\n",
        "event: message\nid: 7\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" Ünïcödé 你好\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\": \\\"Paris\\\"}\"}}]}}]}\n\n",
        "data:{\"choices\":[{\"index\":0,\"delta\":{\"refusal\":\"I can't\"}}]}\r\n\r\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"oops\"\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":21,\"total_tokens\":26}}\n\n",
        "data: [DONE]\n\n",
    ];

    /// The text pieces of each event of [`EVENTS`], as the meter must find
    /// them.
    const PIECES: [&[&str]; 13] = [
        &[],
        &[""],
        &["Hello there, "],
        &["Let me think."],
        &["how are you?"],
        &[" Ünïcödé 你好"],
        &["get_weather", ""],
        &["{\"city\": \"Paris\"}"],
        &["I can't"],
        &[],
        &[],
        &[],
        &[],
    ];

    const REPORTED: Usage = Usage {
        prompt_tokens: 5,
        completion_tokens: 21,
        total_tokens: 26,
        cached_tokens: None,
    };

    fn tokenizer() -> Tokenizer {
        Tokenizer::O200kBase
    }

    fn stream() -> String {
        EVENTS.concat()
    }

    /// Tokens of each event: the sum of its pieces' counts.
    fn event_tokens() -> Vec<u64> {
        PIECES
            .iter()
            .map(|pieces| pieces.iter().map(|p| tokenizer().count(p).unwrap()).sum())
            .collect()
    }

    fn meter(limit: Option<u64>) -> StreamMeter {
        StreamMeter::new(Protocol::Openai, tokenizer(), limit)
    }

    /// Feeds `chunks`, then finishes; what passed in all, whether the limit
    /// was exceeded, and the meter.
    fn run<'a>(limit: Option<u64>, chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<u8>, bool, StreamMeter) {
        let mut meter = meter(limit);
        let mut out = Vec::new();
        let mut exceeded = false;
        for chunk in chunks {
            let m = meter.feed(Bytes::copy_from_slice(chunk));
            assert!(!exceeded || m.pass.is_empty(), "bytes passed after the cut");
            exceeded |= m.exceeded;
            out.extend_from_slice(&m.pass);
        }
        let m = meter.finish();
        assert!(!exceeded || m.pass.is_empty(), "bytes passed after the cut");
        exceeded |= m.exceeded;
        out.extend_from_slice(&m.pass);
        (out, exceeded, meter)
    }

    /// What must pass under `limit`: the events up to the first whose tokens
    /// take the running total past it; whether there is one; the count.
    fn expected(limit: Option<u64>) -> (Vec<u8>, bool, u64) {
        let mut out = Vec::new();
        let mut total = 0;
        for (event, tokens) in EVENTS.iter().zip(event_tokens()) {
            total += tokens;
            if limit.is_some_and(|l| total > l) {
                return (out, true, total);
            }
            out.extend_from_slice(event.as_bytes());
        }
        (out, false, total)
    }

    #[test]
    fn the_meter_counts_every_text_piece_and_finds_usage() {
        for limit in [None, Some(10_000)] {
            let stream = stream();
            let (out, exceeded, meter) = run(limit, [stream.as_bytes()]);
            assert_eq!(out, stream.as_bytes());
            assert!(!exceeded);
            let want: u64 = event_tokens().iter().sum();
            assert_eq!(meter.counted_output_tokens(), want);
            assert!(want > 20, "{want}");
            assert_eq!(meter.usage(), Some(REPORTED));
        }
    }

    #[test]
    fn the_count_is_the_sum_of_per_piece_counts() {
        // Counting piece by piece may differ from counting the whole reply
        // at once by at most a token or so per boundary: that is the
        // documented price of counting as the stream passes.
        let (_, _, meter) = run(None, [stream().as_bytes()]);
        let pieces: Vec<&str> = PIECES.iter().flat_map(|p| p.iter().copied()).collect();
        let per_piece: u64 = pieces.iter().map(|p| tokenizer().count(p).unwrap()).sum();
        assert_eq!(meter.counted_output_tokens(), per_piece);
        let whole = tokenizer().count(&pieces.concat()).unwrap();
        assert!(
            per_piece.abs_diff(whole) <= pieces.len() as u64,
            "{per_piece} vs {whole}"
        );
        // A word split across deltas is where the two differ: "Hello" is one
        // token, "Hel" and "lo" one each.
        let split = "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n\
                     data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n";
        let (_, _, meter) = run(None, [split.as_bytes()]);
        let t = tokenizer();
        assert_eq!(t.count("Hello").unwrap(), 1);
        assert_eq!(
            meter.counted_output_tokens(),
            t.count("Hel").unwrap() + t.count("lo").unwrap()
        );
        assert_eq!(meter.counted_output_tokens(), 2);
    }

    #[test]
    fn a_stream_split_at_every_byte_gives_the_same_bytes_and_count() {
        let stream = stream();
        let bytes = stream.as_bytes();
        let total: u64 = event_tokens().iter().sum();
        for limit in [None, Some(total), Some(total / 2), Some(0)] {
            let (want, want_exceeded, want_count) = expected(limit);
            let (whole, exceeded, meter) = run(limit, [bytes]);
            assert_eq!(
                (whole.as_slice(), exceeded),
                (want.as_slice(), want_exceeded),
                "{limit:?}"
            );
            assert_eq!(meter.counted_output_tokens(), want_count, "{limit:?}");
            // Two chunks, cut at every byte.
            for at in 0..=bytes.len() {
                let (out, exceeded, meter) = run(limit, [&bytes[..at], &bytes[at..]]);
                assert_eq!(out, want, "{limit:?}, cut at {at}");
                assert_eq!(exceeded, want_exceeded, "{limit:?}, cut at {at}");
                assert_eq!(meter.counted_output_tokens(), want_count, "{limit:?}, cut at {at}");
                assert_eq!(meter.usage(), (!want_exceeded).then_some(REPORTED));
            }
            // One byte at a time.
            let (out, exceeded, meter) = run(limit, bytes.chunks(1));
            assert_eq!((out, exceeded), (want, want_exceeded), "{limit:?}, bytewise");
            assert_eq!(meter.counted_output_tokens(), want_count);
        }
    }

    #[test]
    fn a_limit_cuts_exactly_before_the_crossing_event() {
        let tokens = event_tokens();
        let total: u64 = tokens.iter().sum();
        let stream = stream();
        for limit in 0..=total + 1 {
            let (want, want_exceeded, _) = expected(Some(limit));
            for size in [1, 7, 64, stream.len()] {
                let (out, exceeded, meter) = run(Some(limit), stream.as_bytes().chunks(size));
                assert_eq!(out, want, "limit {limit}, chunks of {size}");
                assert_eq!(exceeded, want_exceeded, "limit {limit}");
                assert_eq!(exceeded, limit < total);
                // Whole events only: what passed ends an event.
                let ends = EVENTS.iter().scan(0, |at, e| {
                    *at += e.len();
                    Some(*at)
                });
                assert!(out.is_empty() || ends.clone().any(|end| end == out.len()));
                if exceeded {
                    assert!(meter.counted_output_tokens() > limit);
                }
            }
        }
        // The first content event alone is over a limit of its own size - 1:
        // the comment and role events pass, nothing else.
        let first = tokens[2];
        let (out, exceeded, meter) = run(Some(first - 1), [stream.as_bytes()]);
        assert!(exceeded);
        assert_eq!(out, [EVENTS[0], EVENTS[1]].concat().as_bytes());
        assert_eq!(meter.counted_output_tokens(), first);
    }

    #[test]
    fn complete_events_pass_at_once_and_unfinished_ones_wait() {
        let mut m = meter(Some(1_000));
        let (a, b) = EVENTS[2].split_at(20);
        let first = format!("{}{}{a}", EVENTS[0], EVENTS[1]);
        let out = m.feed(Bytes::from(first));
        assert_eq!(out.pass, [EVENTS[0], EVENTS[1]].concat().as_bytes());
        assert!(!out.exceeded);
        // The rest of the event, and the start of the next one.
        let out = m.feed(Bytes::from(format!("{b}data: {{\"cho")));
        assert_eq!(out.pass, EVENTS[2].as_bytes());
        let out = m.feed(Bytes::from_static(b"ices\":[]}\n"));
        assert!(out.pass.is_empty());
        let out = m.feed(Bytes::from_static(b"\n"));
        assert_eq!(out.pass, b"data: {\"choices\":[]}\n\n".as_slice());
        assert_eq!(m.counted_output_tokens(), tokenizer().count("Hello there, ").unwrap());
        // Once cut, nothing more passes.
        let mut m = meter(Some(0));
        assert!(m.feed(Bytes::from_static(EVENTS[2].as_bytes())).exceeded);
        let after = m.feed(Bytes::from_static(EVENTS[0].as_bytes()));
        assert_eq!(
            after,
            Metered {
                pass: Bytes::new(),
                exceeded: true
            }
        );
        assert_eq!(
            m.finish(),
            Metered {
                pass: Bytes::new(),
                exceeded: true
            }
        );
    }

    #[test]
    fn without_a_limit_chunks_pass_unchanged_and_at_once() {
        let mut m = meter(None);
        let stream = stream();
        for chunk in stream.as_bytes().chunks(5) {
            let chunk = Bytes::copy_from_slice(chunk);
            let out = m.feed(chunk.clone());
            assert!(!out.exceeded);
            // The very same bytes, not a copy.
            assert_eq!(out.pass.as_ptr(), chunk.as_ptr());
            assert_eq!(out.pass.len(), chunk.len());
        }
        assert_eq!(m.finish(), Metered::default());
        assert_eq!(m.usage(), Some(REPORTED));
        assert_eq!(m.counted_output_tokens(), event_tokens().iter().sum::<u64>());
    }

    #[test]
    fn done_comments_and_invalid_json_count_zero_and_pass() {
        let text = ": comment\n\ndata: [DONE]\n\ndata: {not json, \"content\": \"hi\"}\n\ndata: \"content\"\n\n";
        for limit in [None, Some(0)] {
            let (out, exceeded, m) = run(limit, [text.as_bytes()]);
            assert_eq!(out, text.as_bytes());
            assert!(!exceeded);
            assert_eq!(m.counted_output_tokens(), 0);
            assert_eq!(m.usage(), None);
        }
    }

    #[test]
    fn legacy_completions_tool_calls_and_escaped_keys_are_counted() {
        let t = tokenizer();
        let text = "data: {\"choices\":[{\"text\":\"Once upon\",\"index\":0},{\"text\":\" a time\",\"index\":1}]}\n\n";
        let (_, _, m) = run(None, [text.as_bytes()]);
        assert_eq!(
            m.counted_output_tokens(),
            t.count("Once upon").unwrap() + t.count(" a time").unwrap()
        );
        // Tool-call names and arguments, several calls in one event, and the
        // legacy `function_call`.
        let text = "data: {\"choices\":[{\"delta\":{\"tool_calls\":[\
            {\"index\":0,\"function\":{\"name\":\"lookup\",\"arguments\":\"{\\\"q\\\":\"}},\
            {\"index\":1,\"function\":{\"arguments\":\"\\\"rust\\\"}\"}}]}}]}\n\n\
            data: {\"choices\":[{\"delta\":{\"function_call\":{\"name\":\"old\",\"arguments\":\"{}\"}}}]}\n\n";
        let (_, _, m) = run(None, [text.as_bytes()]);
        let want = ["lookup", "{\"q\":", "\"rust\"}", "old", "{}"]
            .iter()
            .map(|p| t.count(p).unwrap())
            .sum::<u64>();
        assert_eq!(m.counted_output_tokens(), want);
        // A key spelled with a JSON escape is still the key.
        let text = "data: {\"choices\":[{\"delta\":{\"\\u0063ontent\":\"sneaky text\"}}]}\n\n";
        let (_, _, m) = run(None, [text.as_bytes()]);
        assert_eq!(m.counted_output_tokens(), t.count("sneaky text").unwrap());
        // Usage and content in the same event (vLLM's continuous usage).
        let text = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\n\n";
        let (_, _, m) = run(None, [text.as_bytes()]);
        assert_eq!(m.counted_output_tokens(), t.count("hi").unwrap());
        assert_eq!(m.usage().map(|u| u.total_tokens), Some(2));
    }

    #[test]
    fn the_key_scan_is_cheap_and_right() {
        assert_eq!(
            scan_keys(b"{\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}"),
            Keys::default()
        );
        assert_eq!(
            scan_keys(b"{\"choices\":[],\"usage\":{}}"),
            Keys {
                text: false,
                usage: true
            }
        );
        assert!(scan_keys(b"{\"delta\":{\"content\":\"x\"}}").text);
        assert!(scan_keys(b"{\"x\":\"\\u00e9\"}").text);
        // A field named "content_filter" is not "content".
        assert!(!scan_keys(b"{\"content_filter\":1}").text);
    }

    #[test]
    fn oversized_events_pass_uncounted_without_a_limit_and_cut_with_one() {
        let pad = "x".repeat(MAX_LINE);
        let big = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{pad}\"}}}}]}}\n\n");
        let after = EVENTS[2];
        let stream = format!("{}{big}{after}", EVENTS[0]);
        for size in [4096, stream.len()] {
            let (out, exceeded, m) = run(None, stream.as_bytes().chunks(size));
            assert_eq!(out, stream.as_bytes());
            assert!(!exceeded);
            // The big event is not counted; the one after it is.
            assert_eq!(m.counted_output_tokens(), event_tokens()[2]);
            assert!(m.line.capacity() <= 2 * MAX_LINE && m.data.capacity() <= 2 * MAX_LINE);

            let (out, exceeded, m) = run(Some(1_000_000), stream.as_bytes().chunks(size));
            assert_eq!(out, EVENTS[0].as_bytes(), "chunks of {size}");
            assert!(exceeded);
            assert_eq!(m.counted_output_tokens(), 0);
            assert!(m.held.is_empty());
        }
        // An event just within the bound is read.
        // (Words, not one long run: a single huge word is BPE's slow path.)
        let fits = "ab ".repeat((MAX_LINE - 64) / 3);
        let event = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{fits}\"}}}}]}}\n\n");
        assert!(event.len() <= MAX_LINE);
        let (out, exceeded, m) = run(Some(1_000_000), event.as_bytes().chunks(1000));
        assert_eq!((out.len(), exceeded), (event.len(), false));
        assert_eq!(m.counted_output_tokens(), tokenizer().count(&fits).unwrap());
    }

    #[test]
    fn an_unfinished_last_event_is_read_at_the_end() {
        let text = "data: {\"choices\":[{\"delta\":{\"content\":\"tail\"}}]}";
        let t = tokenizer();
        let mut m = meter(Some(100));
        assert!(m.feed(Bytes::from_static(text.as_bytes())).pass.is_empty());
        let end = m.finish();
        assert_eq!((end.pass.as_ref(), end.exceeded), (text.as_bytes(), false));
        assert_eq!(m.counted_output_tokens(), t.count("tail").unwrap());
        // Over the limit, it is withheld.
        let mut m = meter(Some(0));
        assert!(m.feed(Bytes::from_static(text.as_bytes())).pass.is_empty());
        assert_eq!(
            m.finish(),
            Metered {
                pass: Bytes::new(),
                exceeded: true
            }
        );
        // Without a limit it was already passed; it is still counted.
        let mut m = meter(None);
        assert_eq!(m.feed(Bytes::from_static(text.as_bytes())).pass, text.as_bytes());
        assert_eq!(m.finish(), Metered::default());
        assert_eq!(m.counted_output_tokens(), t.count("tail").unwrap());
    }

    #[test]
    fn a_leading_bom_and_bare_data_fields_are_read() {
        let text = "\u{feff}data: {\"choices\":[{\"delta\":{\"content\":\"first\"}}]}\n\ndata\ndata: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n";
        // The second event's data is "\n{...}": still JSON.
        let t = tokenizer();
        for chunks in [1, text.len()] {
            let (out, _, m) = run(Some(100), text.as_bytes().chunks(chunks));
            assert_eq!(out, text.as_bytes());
            assert_eq!(
                m.counted_output_tokens(),
                t.count("first").unwrap() + t.count("x").unwrap()
            );
        }
    }

    #[test]
    fn other_protocols_pass_untouched() {
        let mut m = StreamMeter::new(Protocol::OipV2, tokenizer(), Some(0));
        let chunk = Bytes::from_static(EVENTS[2].as_bytes());
        let out = m.feed(chunk.clone());
        assert_eq!(
            out,
            Metered {
                pass: chunk,
                exceeded: false
            }
        );
        assert_eq!(m.finish(), Metered::default());
        assert_eq!(m.counted_output_tokens(), 0);
    }

    #[test]
    fn a_file_tokenizer_meters_too() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tokenizers/qwen3/tokenizer.json");
        let qwen = Tokenizer::from_file(path).unwrap();
        let text = "data: {\"choices\":[{\"delta\":{\"content\":\"Hello, world!\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"2024\"}}]}\n\n";
        let mut m = StreamMeter::new(Protocol::Openai, qwen, Some(4));
        let out = m.feed(Bytes::from_static(text.as_bytes()));
        // 4 tokens, then 4 more: the second event crosses.
        assert!(out.exceeded);
        assert_eq!(out.pass.len(), text.find("\n\n").unwrap() + 2);
        assert_eq!(m.counted_output_tokens(), 8);
    }
}
