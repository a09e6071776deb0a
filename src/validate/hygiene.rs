//! Request hygiene: one strict pass from the body's bytes to a
//! [`serde_json::Value`], refusing what a lenient parser would let through
//! and what some other parser downstream might read differently.
//!
//! [`parse_strict`] replaces `serde_json::from_slice` on the request path. It
//! is a small iterative parser (an explicit stack, no recursion, so hostile
//! nesting cannot overflow the thread's stack) that builds the same `Value`
//! `serde_json` would, and refuses:
//!
//! - bytes that are not UTF-8, inside strings or out;
//! - `\uXXXX` escapes that leave a lone UTF-16 surrogate (`"\ud800"`), which
//!   are not characters: `serde_json` refuses them too, but with the
//!   misleading "lone leading surrogate" even for a trailing one, and without
//!   saying where; other parsers replace them with U+FFFD or keep them as
//!   WTF-8, so the same bytes would mean different strings to different
//!   readers;
//! - a key that appears twice in one object, at any depth (`serde_json`
//!   silently keeps the last, other parsers the first);
//! - numbers that are not finite in a 64-bit float (`1e999999`);
//! - nesting deeper than [`HygieneLimits::max_depth`], refused when the
//!   offending bracket is reached;
//! - more than [`HygieneLimits::max_elements`] array elements and object
//!   members in total;
//! - a string (key or value) longer than [`HygieneLimits::max_string_bytes`]
//!   once decoded;
//! - a top level that is not an object.
//!
//! Every error carries the JSON path of the offending value in OpenAI's
//! style (`messages[3].content`), as [`HygieneError::param`].
//!
//! Numbers become what `serde_json` makes of them: an integer that fits in
//! `u64` (or, when negative, `i64`) stays an integer, anything else is an
//! `f64` (read with the standard library's correctly rounded parser), and
//! `-0` is the float `-0.0`.

use std::fmt;

use serde_json::map::Entry;
use serde_json::{Map, Value};

/// The deepest nesting [`parse_strict`] ever accepts, whatever
/// [`HygieneLimits::max_depth`] says: `Value`'s `Drop`, `Clone` and
/// `Serialize` recurse, so a `Value` nested much deeper than this could
/// overflow a worker thread's stack long after parsing.
pub const MAX_SUPPORTED_DEPTH: usize = 512;

/// The bounds [`parse_strict`] enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HygieneLimits {
    /// The deepest nesting of arrays and objects; the top-level object is
    /// depth 1 (as `request::json_depth` counts). Capped at
    /// [`MAX_SUPPORTED_DEPTH`].
    pub max_depth: usize,
    /// Array elements plus object members, counted over the whole body.
    pub max_elements: usize,
    /// The longest string, key or value, in bytes of UTF-8 once escapes are
    /// decoded.
    pub max_string_bytes: usize,
}

impl HygieneLimits {
    /// The default element cap.
    pub const DEFAULT_MAX_ELEMENTS: usize = 100_000;
    /// The default string cap: large enough for an inline base64 image or
    /// audio clip; the route's body limit usually binds first.
    pub const DEFAULT_MAX_STRING_BYTES: usize = 32 * 1024 * 1024;

    /// The defaults with the given nesting limit.
    pub fn with_max_depth(max_depth: usize) -> Self {
        HygieneLimits {
            max_depth,
            ..HygieneLimits::default()
        }
    }
}

impl Default for HygieneLimits {
    /// Depth 32 (the gateway's `max_json_depth` default), 100 000 elements,
    /// 32 MiB strings.
    fn default() -> Self {
        HygieneLimits {
            max_depth: 32,
            max_elements: Self::DEFAULT_MAX_ELEMENTS,
            max_string_bytes: Self::DEFAULT_MAX_STRING_BYTES,
        }
    }
}

/// Why a body failed hygiene. Every variant but [`HygieneError::NotAnObject`]
/// has a `path`: where in the body the problem is, in OpenAI's style
/// (`messages[3].content`), empty for the top level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HygieneError {
    /// Not JSON: a missing comma, a bad literal, trailing bytes, an
    /// unescaped control character, a bad escape, the input ending early.
    Syntax {
        /// The value or container where the parser was.
        path: String,
        /// What was expected or found.
        message: &'static str,
        /// 1-based line of the offending byte.
        line: usize,
        /// 1-based column, in bytes.
        column: usize,
    },
    /// Bytes that are not UTF-8.
    InvalidUtf8 {
        /// The string (or container) holding them.
        path: String,
        /// 1-based line of the first bad byte.
        line: usize,
        /// 1-based column, in bytes.
        column: usize,
    },
    /// A `\uXXXX` escape leaving a lone UTF-16 surrogate.
    LoneSurrogate {
        /// The string (for a key: the object) holding it.
        path: String,
        /// The escape as written, e.g. `\ud800`.
        escape: String,
    },
    /// A key present twice in one object.
    DuplicateKey {
        /// The duplicated member, e.g. `model` or `messages[0].role`.
        path: String,
        /// The key.
        key: String,
    },
    /// A number that is not finite as an `f64`.
    NumberOutOfRange {
        /// The number's place.
        path: String,
        /// The number as written, cut to 32 bytes.
        number: String,
    },
    /// Nesting deeper than the limit.
    TooDeep {
        /// The array or object that would be one level too deep.
        path: String,
        /// The limit that applied.
        limit: usize,
    },
    /// More array elements and object members than the limit.
    TooManyElements {
        /// The element that went over.
        path: String,
        /// The limit that applied.
        limit: usize,
    },
    /// A string longer than the limit.
    StringTooLong {
        /// The string (for a key: the object).
        path: String,
        /// The limit that applied, in bytes.
        limit: usize,
    },
    /// Valid JSON, but not an object.
    NotAnObject {
        /// What it is: `array`, `string`, `number`, `boolean` or `null`.
        found: &'static str,
    },
}

impl HygieneError {
    /// The JSON path of the problem (`messages[3].content`), empty for the
    /// top level.
    pub fn path(&self) -> &str {
        match self {
            HygieneError::Syntax { path, .. }
            | HygieneError::InvalidUtf8 { path, .. }
            | HygieneError::LoneSurrogate { path, .. }
            | HygieneError::DuplicateKey { path, .. }
            | HygieneError::NumberOutOfRange { path, .. }
            | HygieneError::TooDeep { path, .. }
            | HygieneError::TooManyElements { path, .. }
            | HygieneError::StringTooLong { path, .. } => path,
            HygieneError::NotAnObject { .. } => "",
        }
    }

    /// The OpenAI `param`: the JSON path, when the problem is below the top
    /// level.
    pub fn param(&self) -> Option<String> {
        let path = self.path();
        (!path.is_empty()).then(|| path.to_owned())
    }

    /// A stable machine-readable reason, for audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            HygieneError::Syntax { .. } => "invalid_json",
            HygieneError::InvalidUtf8 { .. } => "invalid_utf8",
            HygieneError::LoneSurrogate { .. } => "lone_surrogate",
            HygieneError::DuplicateKey { .. } => "duplicate_key",
            HygieneError::NumberOutOfRange { .. } => "number_out_of_range",
            HygieneError::TooDeep { .. } => "json_too_deep",
            HygieneError::TooManyElements { .. } => "json_too_many_elements",
            HygieneError::StringTooLong { .. } => "json_string_too_long",
            HygieneError::NotAnObject { .. } => "json_not_an_object",
        }
    }
}

/// ` at 'path'`, or nothing at the top level.
struct At<'a>(&'a str);

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, " at '{}'", self.0)
        }
    }
}

impl fmt::Display for HygieneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HygieneError::Syntax {
                path,
                message,
                line,
                column,
            } => write!(f, "{message} at line {line} column {column}{}", At(path)),
            HygieneError::InvalidUtf8 { path, line, column } => {
                write!(f, "invalid UTF-8 at line {line} column {column}{}", At(path))
            }
            HygieneError::LoneSurrogate { path, escape } => write!(
                f,
                "invalid Unicode escape '{escape}'{}: a lone UTF-16 surrogate is not a character \
                 (\\uD800-\\uDBFF must be followed by \\uDC00-\\uDFFF)",
                At(path)
            ),
            HygieneError::DuplicateKey { path, key } => {
                let parent = path.strip_suffix(key.as_str()).unwrap_or("");
                let parent = parent.strip_suffix('.').unwrap_or(parent);
                if parent.is_empty() && path == key {
                    write!(f, "duplicate key '{key}'")
                } else if parent.is_empty() {
                    write!(f, "duplicate key '{key}' at '{path}'")
                } else {
                    write!(f, "duplicate key '{key}' in '{parent}'")
                }
            }
            HygieneError::NumberOutOfRange { path, number } => write!(
                f,
                "number {number}{} is out of range: numbers must be finite 64-bit floats",
                At(path)
            ),
            HygieneError::TooDeep { path, limit } => {
                write!(f, "JSON nesting exceeds the limit of {limit} levels{}", At(path))
            }
            HygieneError::TooManyElements { path, limit } => write!(
                f,
                "the body has more than {limit} array elements and object members in total (the limit is \
                 passed{})",
                At(path)
            ),
            HygieneError::StringTooLong { path, limit } => {
                write!(f, "string{} is longer than {limit} bytes", At(path))
            }
            HygieneError::NotAnObject { found } => write!(f, "the body must be a JSON object, not {found}"),
        }
    }
}

impl std::error::Error for HygieneError {}

/// The longest key spelled out in a path; longer keys are cut, so that a
/// hostile key does not make the error message as large as the body.
const MAX_PATH_KEY: usize = 64;

/// Appends `.key` (or `key` at the start) to an OpenAI-style path. A key
/// that is not a plain word (letters, digits, `_`, `-`, `$`, `@`) is written
/// in brackets as a JSON string: `tools[0].function.parameters["a.b"]`.
pub(crate) fn push_key(path: &mut String, key: &str) {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'$' | b'@'));
    let shown = if key.len() > MAX_PATH_KEY {
        let mut end = MAX_PATH_KEY;
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        &key[..end]
    } else {
        key
    };
    if plain {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(shown);
    } else {
        path.push('[');
        path.push_str(&serde_json::Value::from(shown).to_string());
        if shown.len() < key.len() {
            // Inside the quotes would read as part of the key.
            path.push('…');
        }
        path.push(']');
    }
}

/// Appends `[index]` to an OpenAI-style path.
pub(crate) fn push_index(path: &mut String, index: usize) {
    use fmt::Write;
    let _ = write!(path, "[{index}]");
}

/// Parses a request body strictly; see the module documentation for what is
/// refused. Never panics, whatever the bytes.
pub fn parse_strict(bytes: &[u8], limits: &HygieneLimits) -> Result<Value, HygieneError> {
    let mut parser = Parser {
        bytes,
        pos: 0,
        max_depth: limits.max_depth.min(MAX_SUPPORTED_DEPTH),
        max_elements: limits.max_elements,
        max_string_bytes: limits.max_string_bytes,
        elements: 0,
    };
    let value = parser.parse()?;
    match value {
        Value::Object(_) => Ok(value),
        Value::Array(_) => Err(HygieneError::NotAnObject { found: "an array" }),
        Value::String(_) => Err(HygieneError::NotAnObject { found: "a string" }),
        Value::Number(_) => Err(HygieneError::NotAnObject { found: "a number" }),
        Value::Bool(_) => Err(HygieneError::NotAnObject { found: "a boolean" }),
        Value::Null => Err(HygieneError::NotAnObject { found: "null" }),
    }
}

/// An array or object being filled. An object remembers the key whose
/// value is being parsed; an array's next index is its length. Together the
/// frames of the stack spell the path of the value being parsed.
enum Frame {
    Array(Vec<Value>),
    Object(Map<String, Value>, String),
}

/// The OpenAI-style path the frames spell.
fn path_of(frames: &[Frame]) -> String {
    let mut path = String::new();
    for frame in frames {
        match frame {
            Frame::Array(items) => push_index(&mut path, items.len()),
            Frame::Object(_, key) => push_key(&mut path, key),
        }
    }
    path
}

struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
    max_depth: usize,
    max_elements: usize,
    max_string_bytes: usize,
    elements: usize,
}

/// 0x01 in every byte of a word.
const ONES: u64 = 0x0101_0101_0101_0101;
/// 0x80 in every byte of a word.
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether none of the eight bytes is `"`, `\` or a control character. The
/// classic "has a zero byte" trick: it can flag a byte above a true match by
/// borrow, but never misses one, which is all a skip needs.
fn plain_word(word: u64) -> bool {
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let has_quote = quote.wrapping_sub(ONES) & !quote;
    let has_backslash = backslash.wrapping_sub(ONES) & !backslash;
    let has_control = word.wrapping_sub(ONES * 0x20) & !word;
    (has_quote | has_backslash | has_control) & HIGHS == 0
}

impl Parser<'_> {
    fn parse(&mut self) -> Result<Value, HygieneError> {
        let mut stack: Vec<Frame> = Vec::new();
        'value: loop {
            self.skip_ws();
            let mut value = match self.peek() {
                Some(b'{') => {
                    self.open(&stack)?;
                    self.skip_ws();
                    if self.peek() == Some(b'}') {
                        self.pos += 1;
                        Value::Object(Map::new())
                    } else {
                        let key = self.parse_key(&stack, false)?;
                        stack.push(Frame::Object(Map::new(), key));
                        self.count(&stack)?;
                        continue 'value;
                    }
                }
                Some(b'[') => {
                    self.open(&stack)?;
                    self.skip_ws();
                    if self.peek() == Some(b']') {
                        self.pos += 1;
                        Value::Array(Vec::new())
                    } else {
                        stack.push(Frame::Array(Vec::new()));
                        self.count(&stack)?;
                        continue 'value;
                    }
                }
                Some(b'"') => {
                    self.pos += 1;
                    Value::String(self.parse_string(&stack)?)
                }
                Some(b'-' | b'0'..=b'9') => self.parse_number(&stack)?,
                Some(b't') => self.literal(&stack, b"true", Value::Bool(true))?,
                Some(b'f') => self.literal(&stack, b"false", Value::Bool(false))?,
                Some(b'n') => self.literal(&stack, b"null", Value::Null)?,
                Some(b']') if matches!(stack.last(), Some(Frame::Array(items)) if !items.is_empty()) => {
                    return Err(self.syntax(&stack[..stack.len() - 1], "trailing comma in an array"));
                }
                Some(_) => return Err(self.syntax(&stack, "expected a value")),
                None => return Err(self.syntax(&stack, "unexpected end of input: expected a value")),
            };
            // A value is complete: put it in its container, and close every
            // container that ends right after it.
            loop {
                let depth = stack.len();
                match stack.last_mut() {
                    None => {
                        self.skip_ws();
                        if self.pos < self.bytes.len() {
                            return Err(self.syntax(&[], "trailing characters after the JSON value"));
                        }
                        return Ok(value);
                    }
                    Some(Frame::Array(items)) => {
                        items.push(value);
                        self.skip_ws();
                        match self.peek() {
                            Some(b',') => {
                                self.pos += 1;
                                self.count(&stack)?;
                                continue 'value;
                            }
                            Some(b']') => {
                                self.pos += 1;
                                value = Value::Array(std::mem::take(items));
                                stack.pop();
                            }
                            Some(_) => return Err(self.syntax(&stack[..depth - 1], "expected ',' or ']' in an array")),
                            None => {
                                return Err(self.syntax(&stack[..depth - 1], "unexpected end of input in an array"));
                            }
                        }
                    }
                    Some(Frame::Object(map, key)) => {
                        match map.entry(std::mem::take(key)) {
                            Entry::Vacant(slot) => {
                                slot.insert(value);
                            }
                            Entry::Occupied(slot) => {
                                let key = slot.key().clone();
                                let mut path = path_of(&stack[..depth - 1]);
                                push_key(&mut path, &key);
                                return Err(HygieneError::DuplicateKey { path, key });
                            }
                        }
                        self.skip_ws();
                        match self.peek() {
                            Some(b',') => {
                                self.pos += 1;
                                self.skip_ws();
                                let next = self.parse_key(&stack[..depth - 1], true)?;
                                if let Some(Frame::Object(_, key)) = stack.last_mut() {
                                    *key = next;
                                }
                                self.count(&stack)?;
                                continue 'value;
                            }
                            Some(b'}') => {
                                self.pos += 1;
                                value = Value::Object(std::mem::take(map));
                                stack.pop();
                            }
                            Some(_) => {
                                return Err(self.syntax(&stack[..depth - 1], "expected ',' or '}' in an object"));
                            }
                            None => {
                                return Err(self.syntax(&stack[..depth - 1], "unexpected end of input in an object"));
                            }
                        }
                    }
                }
            }
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    /// 1-based line and column of `offset`.
    fn line_column(&self, offset: usize) -> (usize, usize) {
        let before = &self.bytes[..offset.min(self.bytes.len())];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        (line, before.len() - line_start + 1)
    }

    fn syntax(&self, frames: &[Frame], message: &'static str) -> HygieneError {
        self.syntax_at(frames, message, self.pos)
    }

    fn syntax_at(&self, frames: &[Frame], message: &'static str, offset: usize) -> HygieneError {
        let (line, column) = self.line_column(offset);
        HygieneError::Syntax {
            path: path_of(frames),
            message,
            line,
            column,
        }
    }

    /// Enters an array or object at `self.pos`, if it is not too deep.
    fn open(&mut self, stack: &[Frame]) -> Result<(), HygieneError> {
        if stack.len() >= self.max_depth {
            return Err(HygieneError::TooDeep {
                path: path_of(stack),
                limit: self.max_depth,
            });
        }
        self.pos += 1;
        Ok(())
    }

    /// Counts one more element or member, the one `stack` spells.
    fn count(&mut self, stack: &[Frame]) -> Result<(), HygieneError> {
        self.elements += 1;
        if self.elements > self.max_elements {
            return Err(HygieneError::TooManyElements {
                path: path_of(stack),
                limit: self.max_elements,
            });
        }
        Ok(())
    }

    fn literal(&mut self, stack: &[Frame], word: &'static [u8], value: Value) -> Result<Value, HygieneError> {
        if self.bytes[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(value)
        } else {
            Err(self.syntax(stack, "invalid literal: expected a value"))
        }
    }

    /// A key and its colon. `container` spells the object's path.
    fn parse_key(&mut self, container: &[Frame], after_comma: bool) -> Result<String, HygieneError> {
        match self.peek() {
            Some(b'"') => self.pos += 1,
            Some(b'}') if after_comma => return Err(self.syntax(container, "trailing comma in an object")),
            Some(_) => return Err(self.syntax(container, "expected a string key in an object")),
            None => return Err(self.syntax(container, "unexpected end of input in an object")),
        }
        let key = self.parse_string(container)?;
        self.skip_ws();
        if self.peek() != Some(b':') {
            return Err(self.syntax(container, "expected ':' after an object key"));
        }
        self.pos += 1;
        Ok(key)
    }

    /// The first byte at or after `from` that is `"`, `\` or a control
    /// character, or the end.
    fn scan_plain(&self, from: usize) -> usize {
        let mut i = from;
        while let Some(chunk) = self.bytes.get(i..i + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            if !plain_word(u64::from_le_bytes(word)) {
                break;
            }
            i += 8;
        }
        while let Some(&b) = self.bytes.get(i) {
            if b == b'"' || b == b'\\' || b < 0x20 {
                break;
            }
            i += 1;
        }
        i
    }

    /// A run of plain bytes as text, if it is UTF-8. A run ends at an ASCII
    /// byte, so it never splits a character.
    fn run(&self, frames: &[Frame], start: usize, end: usize) -> Result<&str, HygieneError> {
        std::str::from_utf8(&self.bytes[start..end]).map_err(|e| {
            let (line, column) = self.line_column(start + e.valid_up_to());
            HygieneError::InvalidUtf8 {
                path: path_of(frames),
                line,
                column,
            }
        })
    }

    fn too_long(&self, frames: &[Frame]) -> HygieneError {
        HygieneError::StringTooLong {
            path: path_of(frames),
            limit: self.max_string_bytes,
        }
    }

    /// The rest of a string whose opening quote is behind `self.pos`.
    fn parse_string(&mut self, frames: &[Frame]) -> Result<String, HygieneError> {
        let start = self.pos;
        let end = self.scan_plain(start);
        if self.bytes.get(end) == Some(&b'"') {
            // No escapes: the common case, one copy.
            if end - start > self.max_string_bytes {
                return Err(self.too_long(frames));
            }
            let text = self.run(frames, start, end)?.to_owned();
            self.pos = end + 1;
            return Ok(text);
        }
        let mut out = String::new();
        let (mut run_start, mut i) = (start, end);
        loop {
            out.push_str(self.run(frames, run_start, i)?);
            if out.len() > self.max_string_bytes {
                return Err(self.too_long(frames));
            }
            match self.bytes.get(i) {
                Some(b'"') => {
                    self.pos = i + 1;
                    return Ok(out);
                }
                Some(b'\\') => i = self.escape(frames, i, &mut out)?,
                Some(_) => {
                    return Err(self.syntax_at(
                        frames,
                        "control character (U+0000 to U+001F) in a string: it must be escaped",
                        i,
                    ));
                }
                None => return Err(self.syntax_at(frames, "unexpected end of input in a string", i)),
            }
            if out.len() > self.max_string_bytes {
                return Err(self.too_long(frames));
            }
            run_start = i;
            i = self.scan_plain(i);
        }
    }

    /// Four hex digits at `at`.
    fn hex4(&self, at: usize) -> Option<u16> {
        let digits = self.bytes.get(at..at + 4)?;
        let mut n: u16 = 0;
        for &d in digits {
            let v = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return None,
            };
            n = (n << 4) | u16::from(v);
        }
        Some(n)
    }

    /// Decodes the escape whose backslash is at `at` into `out`; returns
    /// the offset after it.
    fn escape(&self, frames: &[Frame], at: usize, out: &mut String) -> Result<usize, HygieneError> {
        let simple = match self.bytes.get(at + 1) {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => return self.unicode_escape(frames, at, out),
            Some(_) => return Err(self.syntax_at(frames, "invalid escape in a string", at)),
            None => return Err(self.syntax_at(frames, "unexpected end of input in a string", at)),
        };
        out.push(simple);
        Ok(at + 2)
    }

    /// A `\uXXXX` escape, or a surrogate pair of two, at `at`.
    fn unicode_escape(&self, frames: &[Frame], at: usize, out: &mut String) -> Result<usize, HygieneError> {
        let bad_hex = || self.syntax_at(frames, "invalid \\u escape: expected four hex digits", at);
        let first = self.hex4(at + 2).ok_or_else(bad_hex)?;
        let lone = |offset: usize| HygieneError::LoneSurrogate {
            path: path_of(frames),
            escape: String::from_utf8_lossy(&self.bytes[offset..offset + 6]).into_owned(),
        };
        let code = match first {
            0xD800..=0xDBFF => {
                let low = if self.bytes.get(at + 6..at + 8) == Some(b"\\u") {
                    self.hex4(at + 8)
                } else {
                    None
                };
                match low {
                    Some(low @ 0xDC00..=0xDFFF) => {
                        let code = 0x10000 + ((u32::from(first) - 0xD800) << 10) + (u32::from(low) - 0xDC00);
                        let c = char::from_u32(code).ok_or_else(|| lone(at))?;
                        out.push(c);
                        return Ok(at + 12);
                    }
                    _ => return Err(lone(at)),
                }
            }
            0xDC00..=0xDFFF => return Err(lone(at)),
            other => u32::from(other),
        };
        out.push(char::from_u32(code).ok_or_else(|| lone(at))?);
        Ok(at + 6)
    }

    /// A number at `self.pos`, as `serde_json` would make it.
    fn parse_number(&mut self, stack: &[Frame]) -> Result<Value, HygieneError> {
        let start = self.pos;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        let digits_start = self.pos;
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.skip_digits(),
            _ => return Err(self.syntax(stack, "invalid number: expected a digit")),
        }
        let digits_end = self.pos;
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.syntax(stack, "invalid number: expected a digit after the decimal point"));
            }
            self.skip_digits();
            integer = false;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.syntax(stack, "invalid number: expected a digit in the exponent"));
            }
            self.skip_digits();
            integer = false;
        }
        if integer {
            let mut n: u64 = 0;
            let mut fits = true;
            for &d in &self.bytes[digits_start..digits_end] {
                match n.checked_mul(10).and_then(|n| n.checked_add(u64::from(d - b'0'))) {
                    Some(next) => n = next,
                    None => {
                        fits = false;
                        break;
                    }
                }
            }
            if fits {
                if !negative {
                    return Ok(Value::from(n));
                }
                if n == 0 {
                    return Ok(Value::from(-0.0f64));
                }
                if n <= 1 << 63 {
                    // 2^63 wraps to i64::MIN, which is what it means here.
                    return Ok(Value::from(0i64.wrapping_sub_unsigned(n)));
                }
            }
        }
        let text = &self.bytes[start..self.pos];
        // The grammar above admits only ASCII, all of which Rust's float
        // syntax accepts.
        let parsed = std::str::from_utf8(text).ok().and_then(|t| t.parse::<f64>().ok());
        match parsed {
            Some(f) if f.is_finite() => Ok(Value::from(f)),
            Some(_) => Err(HygieneError::NumberOutOfRange {
                path: path_of(stack),
                number: String::from_utf8_lossy(&text[..text.len().min(32)]).into_owned(),
            }),
            None => Err(self.syntax_at(stack, "invalid number", start)),
        }
    }

    fn skip_digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }
}

/// A chat body of about 2 KB.
#[cfg(test)]
pub(crate) fn chat_body_2k() -> String {
    let mut messages =
        vec![serde_json::json!({"role": "system", "content": "You are a helpful assistant. Answer briefly."})];
    for i in 0..8 {
        messages.push(serde_json::json!({"role": "user", "content": format!("Question {i}: what is the capital of France, and why does it matter? \u{e9}")}));
        messages.push(serde_json::json!({"role": "assistant", "content": format!("Answer {i}: Paris. It is the seat of government; \"quoted\".\n")}));
    }
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": messages,
        "temperature": 0.7,
        "top_p": 0.95,
        "max_tokens": 256,
        "n": 1,
        "stream": false,
        "stop": ["\n\n", "END"],
        "user": "user-1234",
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
        "tool_choice": "auto",
    });
    body.to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn parse(text: &str) -> Result<Value, HygieneError> {
        parse_strict(text.as_bytes(), &HygieneLimits::default())
    }

    fn err(text: &str) -> HygieneError {
        parse(text).unwrap_err()
    }

    #[test]
    fn builds_what_serde_json_builds() {
        let text = r#" {"model":"m","messages":[{"role":"user","content":"hi \"there\" \u00e9\ud83d\ude00\n"}],
            "n":1,"t":0.5,"neg":-3,"big":18446744073709551615,"bigger":18446744073709551616,
            "min":-9223372036854775808,"below":-9223372036854775809,"z":-0,"e":1E+2,"f":false,"nil":null,
            "empty":{},"none":[],"nested":[[1,[2]],{"a":{"b":[]}}]} "#;
        let ours = parse(text).unwrap();
        let theirs: Value = serde_json::from_str(text).unwrap();
        assert_eq!(ours, theirs);
        assert_eq!(ours["messages"][0]["content"], "hi \"there\" é😀\n");
        assert!(ours["big"].is_u64() && ours["min"].is_i64() && ours["bigger"].is_f64() && ours["z"].is_f64());
        // Key order is kept (serde_json's `preserve_order`).
        let keys: Vec<&String> = ours.as_object().unwrap().keys().collect();
        assert_eq!(keys[..3], ["model", "messages", "n"]);
    }

    #[test]
    fn duplicate_keys_are_refused_with_their_path() {
        let e = err(r#"{"model":"a","model":"b"}"#);
        assert_eq!(
            e,
            HygieneError::DuplicateKey {
                path: "model".into(),
                key: "model".into()
            }
        );
        assert_eq!(e.param().as_deref(), Some("model"));
        assert_eq!(e.to_string(), "duplicate key 'model'");

        let e = err(r#"{"model":"a","messages":[{"role":"user"},{"role":"user","content":"x","role":"system"}]}"#);
        assert_eq!(e.param().as_deref(), Some("messages[1].role"));
        assert_eq!(e.to_string(), "duplicate key 'role' in 'messages[1]'");

        let e = err(r#"{"a":{"b c":1,"b c":2}}"#);
        assert_eq!(e.param().as_deref(), Some(r#"a["b c"]"#));
        // Equal after unescaping is equal.
        assert_eq!(err(r#"{"ab":1,"a\u0062":2}"#).param().as_deref(), Some("ab"));
        // The same key in different objects is fine.
        assert!(parse(r#"{"a":{"k":1},"b":{"k":1},"c":[{"k":1},{"k":2}]}"#).is_ok());
    }

    #[test]
    fn lone_surrogates_are_refused() {
        // serde_json refuses them too, but says "lone leading surrogate"
        // even for a trailing one, and not where.
        assert!(serde_json::from_str::<Value>(r#"{"a":"\udc00"}"#).is_err());
        let e = err(r#"{"messages":[{"content":"x\ud800"}]}"#);
        assert_eq!(
            e,
            HygieneError::LoneSurrogate {
                path: "messages[0].content".into(),
                escape: "\\ud800".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "invalid Unicode escape '\\ud800' at 'messages[0].content': a lone UTF-16 surrogate is not a \
             character (\\uD800-\\uDBFF must be followed by \\uDC00-\\uDFFF)"
        );
        for bad in [
            r#"{"a":"\uDC00"}"#,
            r#"{"a":"\ud800\u0041"}"#,
            r#"{"a":"\ud800\ud800"}"#,
            r#"{"a":"\ud800x"}"#,
            r#"{"a":"\ud800"#,
        ] {
            assert!(matches!(err(bad), HygieneError::LoneSurrogate { .. }), "{bad}");
        }
        // In a key, the path is the object.
        assert_eq!(
            err(r#"{"a":{"\ud800":1}}"#),
            HygieneError::LoneSurrogate {
                path: "a".into(),
                escape: "\\ud800".into()
            }
        );
        assert_eq!(parse(r#"{"a":"\uD83D\uDE00"}"#).unwrap()["a"], "😀");
    }

    #[test]
    fn invalid_utf8_is_refused() {
        let e = parse_strict(b"{\"a\":\"ok\xff\"}", &HygieneLimits::default()).unwrap_err();
        assert_eq!(
            e,
            HygieneError::InvalidUtf8 {
                path: "a".into(),
                line: 1,
                column: 9
            }
        );
        assert_eq!(e.to_string(), "invalid UTF-8 at line 1 column 9 at 'a'");
        // A truncated character, and an overlong encoding.
        assert!(matches!(
            parse_strict(b"{\"a\":\"\xe2\x82\"}", &HygieneLimits::default()),
            Err(HygieneError::InvalidUtf8 { .. })
        ));
        assert!(matches!(
            parse_strict(b"{\"a\":\"\xc0\xaf\"}", &HygieneLimits::default()),
            Err(HygieneError::InvalidUtf8 { .. })
        ));
        // Outside a string it is just not JSON.
        assert!(matches!(
            parse_strict(b"{\xff}", &HygieneLimits::default()),
            Err(HygieneError::Syntax { .. })
        ));
        assert_eq!(parse("{\"a\":\"é ü 日本\"}").unwrap()["a"], "é ü 日本");
    }

    #[test]
    fn numbers_must_be_finite() {
        let e = err(r#"{"temperature":1e999999}"#);
        assert_eq!(
            e,
            HygieneError::NumberOutOfRange {
                path: "temperature".into(),
                number: "1e999999".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "number 1e999999 at 'temperature' is out of range: numbers must be finite 64-bit floats"
        );
        assert!(matches!(
            err(r#"{"a":[-1e309]}"#),
            HygieneError::NumberOutOfRange { .. }
        ));
        let huge = format!(r#"{{"a":{}}}"#, "9".repeat(400));
        assert_eq!(
            err(&huge),
            HygieneError::NumberOutOfRange {
                path: "a".into(),
                number: "9".repeat(32)
            }
        );
        // Underflow is zero, as everywhere.
        assert_eq!(parse(r#"{"a":1e-999999}"#).unwrap()["a"], 0.0);
        for bad in [
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":+1}"#,
            r#"{"a":1e}"#,
            r#"{"a":-}"#,
            r#"{"a":NaN}"#,
            r#"{"a":Infinity}"#,
        ] {
            assert!(matches!(err(bad), HygieneError::Syntax { .. }), "{bad}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let e = parse_strict(deep.as_bytes(), &HygieneLimits::with_max_depth(32)).unwrap_err();
        assert_eq!(
            e,
            HygieneError::TooDeep {
                path: "[0]".repeat(32),
                limit: 32
            }
        );
        let deep_object = format!(r#"{{"messages":{}1{}}}"#, r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
        let e = parse_strict(deep_object.as_bytes(), &HygieneLimits::with_max_depth(3)).unwrap_err();
        assert_eq!(e.param().as_deref(), Some("messages.a.a"));
        assert_eq!(
            e.to_string(),
            "JSON nesting exceeds the limit of 3 levels at 'messages.a.a'"
        );
        // Even an unlimited depth is capped, so nothing overflows later.
        let limits = HygieneLimits {
            max_depth: usize::MAX,
            ..HygieneLimits::default()
        };
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            parse_strict(deep.as_bytes(), &limits),
            Err(HygieneError::TooDeep {
                limit: MAX_SUPPORTED_DEPTH,
                ..
            })
        ));
        // Exactly at the limit passes: the top-level object is depth 1.
        assert!(parse_strict(br#"{"a":[[1]]}"#, &HygieneLimits::with_max_depth(3)).is_ok());
        assert!(parse_strict(br#"{"a":[[{}]]}"#, &HygieneLimits::with_max_depth(3)).is_err());
    }

    #[test]
    fn element_and_string_caps() {
        let limits = HygieneLimits {
            max_elements: 5,
            max_string_bytes: 8,
            ..HygieneLimits::default()
        };
        assert!(parse_strict(br#"{"a":[1,2,3],"b":{}}"#, &limits).is_ok());
        let e = parse_strict(br#"{"a":[1,2,3],"b":{"c":1}}"#, &limits).unwrap_err();
        assert_eq!(
            e,
            HygieneError::TooManyElements {
                path: "b.c".into(),
                limit: 5
            }
        );
        let e = parse_strict(br#"{"a":[1,2,3,4,5]}"#, &limits).unwrap_err();
        assert_eq!(e.param().as_deref(), Some("a[4]"));
        assert_eq!(
            e.to_string(),
            "the body has more than 5 array elements and object members in total (the limit is passed at 'a[4]')"
        );
        assert!(parse_strict(br#"{"s":"12345678"}"#, &limits).is_ok());
        let e = parse_strict(br#"{"s":"123456789"}"#, &limits).unwrap_err();
        assert_eq!(
            e,
            HygieneError::StringTooLong {
                path: "s".into(),
                limit: 8
            }
        );
        assert_eq!(e.to_string(), "string at 's' is longer than 8 bytes");
        // Decoded length counts: six escapes of one byte each fit.
        assert!(parse_strict(br#"{"s":"\u0041\u0041\u0041\u0041\u0041\u0041"}"#, &limits).is_ok());
        assert!(parse_strict(br#"{"s":"\n\n\n\n\n\n\n\n\n"}"#, &limits).is_err());
        // Keys count too; the path is then the object.
        assert_eq!(
            parse_strict(br#"{"o":{"123456789":1}}"#, &limits)
                .unwrap_err()
                .param()
                .as_deref(),
            Some("o")
        );
    }

    #[test]
    fn syntax_errors_say_where() {
        let e = err("{\"model\":\"m\",\n \"n\": 1 \"x\"}");
        assert_eq!(
            e,
            HygieneError::Syntax {
                path: String::new(),
                message: "expected ',' or '}' in an object",
                line: 2,
                column: 9
            }
        );
        assert_eq!(e.param(), None);
        assert_eq!(e.to_string(), "expected ',' or '}' in an object at line 2 column 9");
        assert_eq!(
            err(r#"{"messages":[{"role":"user",}]}"#).to_string(),
            "trailing comma in an object at line 1 column 29 at 'messages[0]'"
        );
        assert_eq!(
            err(r#"{"a":[1,]}"#).to_string(),
            "trailing comma in an array at line 1 column 9 at 'a'"
        );
        assert_eq!(
            err("{\"a\":\"x\ty\"}").to_string(),
            "control character (U+0000 to U+001F) in a string: it must be escaped at line 1 column 8 at 'a'"
        );
        assert!(matches!(err(r#"{"a":"\x"}"#), HygieneError::Syntax { .. }));
        assert!(matches!(err(r#"{"a":"\u12"}"#), HygieneError::Syntax { .. }));
        assert!(matches!(err(r#"{"a":1} {}"#), HygieneError::Syntax { .. }));
        assert!(matches!(err(r#"{"a" 1}"#), HygieneError::Syntax { .. }));
        assert!(matches!(err(r#"{a:1}"#), HygieneError::Syntax { .. }));
        assert!(matches!(err(r#"{"a":tru}"#), HygieneError::Syntax { .. }));
        assert!(matches!(err(""), HygieneError::Syntax { .. }));
        assert!(matches!(err("{"), HygieneError::Syntax { .. }));
        assert!(matches!(err(r#"{"a":"#), HygieneError::Syntax { .. }));
        assert!(matches!(err(r#"{"a":[1"#), HygieneError::Syntax { .. }));
        assert!(matches!(err(r#"{"a":"xyz"#), HygieneError::Syntax { .. }));
        // Only JSON's four whitespace characters.
        assert!(matches!(err("{\u{a0}}"), HygieneError::Syntax { .. }));
        assert!(parse(" \t\r\n{ \t\r\n} \t\r\n").is_ok());
    }

    #[test]
    fn the_top_level_must_be_an_object() {
        assert_eq!(err("[]"), HygieneError::NotAnObject { found: "an array" });
        assert_eq!(
            err(r#""x""#).to_string(),
            "the body must be a JSON object, not a string"
        );
        assert_eq!(err("1").param(), None);
        assert_eq!(err("null"), HygieneError::NotAnObject { found: "null" });
        assert_eq!(err("true"), HygieneError::NotAnObject { found: "a boolean" });
    }

    #[test]
    fn hostile_keys_are_cut_in_paths() {
        let key = "k".repeat(1000);
        let text = format!(r#"{{"{key}":1,"{key}":2}}"#);
        let e = err(&text);
        assert_eq!(e.param().unwrap(), "k".repeat(MAX_PATH_KEY));
        let key = "é".repeat(100);
        let text = format!(r#"{{"{key} ":1,"{key} ":2}}"#);
        let param = err(&text).param().unwrap();
        assert!(param.len() < 80 && param.ends_with("\"…]"), "{param}");
    }

    #[test]
    fn a_chat_body_parses_to_what_serde_json_builds() {
        // Its cost is measured by `cargo bench --bench validation`.
        let body = chat_body_2k();
        assert!((1800..2600).contains(&body.len()), "{}", body.len());
        let bytes = body.as_bytes();
        assert_eq!(
            parse_strict(bytes, &HygieneLimits::default()).unwrap(),
            serde_json::from_slice::<Value>(bytes).unwrap()
        );
    }

    /// Arbitrary JSON values, nested a few levels.
    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
            "[\\\\\"\\x00-\\x1f\\x7f-\\x{10ffff}]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((".{0,6}", inner), 0..6)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_strict(&bytes, &HygieneLimits::default());
        }

        #[test]
        fn json_like_bytes_never_panic(text in "[{}\\[\\]\":,0-9.eE+\\-\\\\ua-f tnrl\u{e9}]{0,64}") {
            let small = HygieneLimits { max_depth: 4, max_elements: 6, max_string_bytes: 5 };
            let _ = parse_strict(text.as_bytes(), &small);
            // What we accept, serde_json accepts, and reads the same.
            if let Ok(ours) = parse_strict(text.as_bytes(), &HygieneLimits::default()) {
                let theirs: Value = serde_json::from_slice(text.as_bytes()).unwrap();
                prop_assert_eq!(ours, theirs);
            }
        }

        #[test]
        fn random_json_parses_like_serde_json(value in arb_json(), pretty in any::<bool>()) {
            let body = json!({"v": value});
            let text = if pretty { serde_json::to_string_pretty(&body).unwrap() } else { body.to_string() };
            let ours = parse_strict(text.as_bytes(), &HygieneLimits::default()).unwrap();
            let theirs: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(ours, theirs);
        }

        #[test]
        fn mangled_json_never_panics_and_agrees(value in arb_json(), cut in any::<prop::sample::Index>(),
                                                 byte in any::<u8>()) {
            let mut bytes = json!({"v": value}).to_string().into_bytes();
            let at = cut.index(bytes.len());
            bytes[at] = byte;
            let small = HygieneLimits { max_depth: 3, max_elements: 4, max_string_bytes: 3 };
            let _ = parse_strict(&bytes, &small);
            let _ = parse_strict(&bytes[..at], &HygieneLimits::default());
            if let Ok(ours) = parse_strict(&bytes, &HygieneLimits::default()) {
                // serde_json keeps the last of duplicate keys; we refused those.
                let theirs: Value = serde_json::from_slice(&bytes).unwrap();
                prop_assert_eq!(ours, theirs);
            }
        }
    }
}
