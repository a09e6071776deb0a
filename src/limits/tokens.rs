//! Input tokens of an OpenAI request, counted with the model's real
//! tokenizer, the way the API bills them.
//!
//! A rate limit or budget measured in tokens is only as good as the count:
//! `len / 4` is off by a factor of two or more on code and non-English text,
//! so requests are counted with the BPE the model itself uses. The OpenAI
//! encodings (`o200k_base`, `cl100k_base`) are compiled into `bpe-openai`
//! (GitHub's linear-time BPE, whose tokens are tiktoken's — a test holds
//! the two to the same counts — at several times tiktoken-rs's speed, which
//! matters because every request is counted);
//! an open model's tokenizer is a Hugging Face `tokenizer.json` shipped with
//! the configuration ([`Tokenizer::from_file`]; the repository carries one,
//! Qwen3's, under `tokenizers/`). Nothing is fetched at run time.
//!
//! Chat requests are counted as OpenAI's cookbook counts them
//! (<https://github.com/openai/openai-cookbook/blob/main/examples/How_to_count_tokens_with_tiktoken.ipynb>):
//! every string field of every message, plus [`TOKENS_PER_MESSAGE`] per
//! message, [`TOKENS_PER_NAME`] when a message has a `name`, and
//! [`REPLY_PRIMING`] once. Tool definitions are counted as their JSON text,
//! which is close to (slightly above) what the API charges for them.
//!
//! The per-message framing constants are OpenAI's. Open models wrap messages
//! in their own chat template (Qwen's ChatML, `<|im_start|>{role}\n…<|im_end|>\n`,
//! is four tokens plus the role), so for them the framing is an estimate of
//! the same size; the text itself is counted exactly.
//!
//! Content that is not text (images, audio, files) cannot be counted from the
//! request; rather than guess, the count says how many such parts it skipped
//! ([`TokenCount::uncounted_parts`]) and the caller decides what to charge.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use serde_json::Value;
use sha2::{Digest, Sha256};

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
    #[error("unknown tokenizer {0:?} (known: o200k_base, cl100k_base; or give a tokenizer.json file)")]
    UnknownTokenizer(String),
    /// The embedded encoding failed to load; a broken build, not bad input.
    #[error("tokenizer {name} failed to load: {reason}")]
    Load {
        /// The tokenizer.
        name: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A `tokenizer.json` could not be read or is not a tokenizer.
    #[error("tokenizer file `{path}` failed to load: {reason}")]
    File {
        /// The file, as given.
        path: String,
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

/// A tokenizer a model may use: one of OpenAI's BPE encodings, or an open
/// model's Hugging Face tokenizer loaded from its `tokenizer.json`.
///
/// Cheap to clone: a file tokenizer is shared behind an [`Arc`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Tokenizer {
    /// `o200k_base`: GPT-4o, GPT-4.1, GPT-5, o-series models.
    O200kBase,
    /// `cl100k_base`: GPT-4, GPT-3.5-turbo, `text-embedding-3-*`, `ada-002`.
    Cl100kBase,
    /// A Hugging Face `tokenizer.json` (see [`Tokenizer::from_file`]).
    File(Arc<FileTokenizer>),
}

impl Tokenizer {
    /// The tokenizer named `name` (`o200k_base` or `cl100k_base`).
    pub fn from_name(name: &str) -> Result<Self, TokenError> {
        match name {
            "o200k_base" => Ok(Tokenizer::O200kBase),
            "cl100k_base" => Ok(Tokenizer::Cl100kBase),
            _ => Err(TokenError::UnknownTokenizer(name.to_owned())),
        }
    }

    /// The Hugging Face tokenizer in the `tokenizer.json` at `path`, as the
    /// model's own repository ships it.
    ///
    /// Reading and parsing the file is blocking work (tens of milliseconds
    /// for a 150k-token vocabulary in a release build): do it at
    /// configuration load, not per request. Truncation and padding set in the
    /// file are switched off, since either would change the count.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenError> {
        FileTokenizer::load(path.as_ref()).map(|t| Tokenizer::File(Arc::new(t)))
    }

    /// The tokenizer's name, as written in configuration: the encoding's
    /// name, or the file's path.
    pub fn name(&self) -> &str {
        match self {
            Tokenizer::O200kBase => "o200k_base",
            Tokenizer::Cl100kBase => "cl100k_base",
            Tokenizer::File(file) => &file.path,
        }
    }

    /// Builds the encoding now, if it is not built yet, so that the first
    /// request does not pay for it; meant for configuration load. (A file
    /// tokenizer is built when it is loaded.)
    pub fn preload(&self) -> Result<(), TokenError> {
        // Each encoding is deserialized on first use, once per process.
        match self {
            Tokenizer::O200kBase => o200k::count(""),
            Tokenizer::Cl100kBase => bpe_openai::cl100k_base().count(""),
            Tokenizer::File(_) => 0,
        };
        Ok(())
    }

    /// The number of tokens in `text`.
    ///
    /// OpenAI encodings: special-token markers such as `<|endoftext|>` in
    /// the text are counted as ordinary text, as the API treats them: a
    /// caller cannot make its text cheaper by spelling a special token.
    /// The pre-tokenizer is a DFA (no backtracking), so no text makes it
    /// give up or take more than linear time.
    ///
    /// File tokenizers: the text is encoded as the model server encodes a
    /// prompt, without adding special tokens (`encode(text, false)`); the
    /// added tokens of the file's vocabulary that appear in the text (e.g.
    /// Qwen's `<|im_start|>`) are matched as the single tokens the server
    /// will also see.
    pub fn count(&self, text: &str) -> Result<u64, TokenError> {
        let n = match self {
            Tokenizer::O200kBase => o200k::count(text),
            Tokenizer::Cl100kBase => bpe_openai::cl100k_base().count(text),
            Tokenizer::File(file) => file.count(text)?,
        };
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }
}

/// `o200k_base` counting with a fast path for ASCII text, where most
/// requests' text is: the same count as `bpe_openai::o200k_base().count`,
/// in about a quarter of the time (`cargo bench --bench validation`).
///
/// * Pre-tokenization: o200k's split pattern, evaluated by hand on bytes
///   ([`piece_end`]) instead of by a Unicode regex, whose per-piece
///   anchored search was half the cost. Restricted to ASCII the pattern's
///   classes are plain byte ranges (`\p{Lu}` = `A-Z`, `\p{Ll}` = `a-z`,
///   `\p{N}` = `0-9`, `\s` = `\t\n\x0B\x0C\r `; `\p{Lt}`, `\p{Lm}`,
///   `\p{Lo}`, `\p{M}` are empty), and the tests hold the pieces to
///   `bpe_openai`'s on random ASCII text.
/// * A piece that is itself a token is that one token — in tiktoken (which
///   looks a piece up before merging) and in `bpe` (whose dictionary is
///   checked so that every token encodes to itself) — so the ASCII tokens of
///   up to 16 bytes are kept in a hash set ([`Singles`]) and such a piece is
///   counted without running the BPE (about 98% of English pieces). Other
///   pieces go to `bpe`'s `count`.
///
/// Text with any non-ASCII byte goes through `bpe_openai` unchanged.
mod o200k {
    use std::sync::LazyLock;

    use bpe_openai::byte_pair_encoding::BytePairEncoding;

    /// The o200k_base token count of `text`.
    pub(super) fn count(text: &str) -> usize {
        let tokenizer = bpe_openai::o200k_base();
        let bytes = text.as_bytes();
        if !bytes.is_ascii() {
            return tokenizer.count(text);
        }
        let singles = &*SINGLES;
        let mut tokens = 0;
        let mut start = 0;
        while let Some(piece) = bytes.get(start..piece_end(bytes, start)).filter(|p| !p.is_empty()) {
            tokens += if singles.contains(piece) {
                1
            } else {
                tokenizer.bpe.count(piece)
            };
            start += piece.len();
        }
        tokens
    }

    #[inline]
    fn is_space(b: u8) -> bool {
        matches!(b, b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ')
    }

    /// `[^\s\p{L}\p{N}]` on ASCII.
    #[inline]
    fn is_symbol(b: u8) -> bool {
        !is_space(b) && !b.is_ascii_alphanumeric()
    }

    /// Where the piece of ASCII `text` that starts at `start` ends: the end
    /// of the anchored leftmost-first match at `start` of o200k's pattern
    ///
    /// ```text
    /// [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
    /// |[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
    /// |\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
    /// ```
    ///
    /// (`start` itself when `start` is at or past the end).
    pub(super) fn piece_end(text: &[u8], start: usize) -> usize {
        let at = |i: usize| text.get(i).copied();
        let Some(first) = at(start) else { return start };
        // The two letter branches: an optional non-letter, non-digit,
        // non-newline, then upper case and lower case runs (one of them
        // non-empty; either branch ends at the end of both runs), then a
        // contraction.
        let letters = if first.is_ascii_alphabetic() {
            Some(start)
        } else if !matches!(first, b'\r' | b'\n')
            && !first.is_ascii_digit()
            && at(start + 1).is_some_and(|b| b.is_ascii_alphabetic())
        {
            Some(start + 1)
        } else {
            None
        };
        if let Some(mut end) = letters {
            while at(end).is_some_and(|b| b.is_ascii_uppercase()) {
                end += 1;
            }
            while at(end).is_some_and(|b| b.is_ascii_lowercase()) {
                end += 1;
            }
            if at(end) == Some(b'\'') {
                match (
                    at(end + 1).map(|b| b.to_ascii_lowercase()),
                    at(end + 2).map(|b| b.to_ascii_lowercase()),
                ) {
                    (Some(b's' | b't' | b'm' | b'd'), _) => return end + 2,
                    (Some(b'r' | b'v'), Some(b'e')) | (Some(b'l'), Some(b'l')) => return end + 3,
                    _ => {}
                }
            }
            return end;
        }
        // `\p{N}{1,3}`
        if first.is_ascii_digit() {
            let mut end = start + 1;
            while end < start + 3 && at(end).is_some_and(|b| b.is_ascii_digit()) {
                end += 1;
            }
            return end;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n/]*`
        let symbols = if is_symbol(first) {
            Some(start)
        } else if first == b' ' && at(start + 1).is_some_and(is_symbol) {
            Some(start + 1)
        } else {
            None
        };
        if let Some(mut end) = symbols {
            while at(end).is_some_and(is_symbol) {
                end += 1;
            }
            while matches!(at(end), Some(b'\r' | b'\n' | b'/')) {
                end += 1;
            }
            return end;
        }
        // Every other ASCII byte is whitespace: the run from `start`.
        let mut end = start;
        let mut last_newline = None;
        while let Some(b) = at(end).filter(|&b| is_space(b)) {
            if matches!(b, b'\r' | b'\n') {
                last_newline = Some(end);
            }
            end += 1;
        }
        match last_newline {
            // `\s*[\r\n]+`: up to the run's last line break.
            Some(newline) => newline + 1,
            // `\s+(?!\S)` at the end of the text: the whole run.
            None if end == text.len() => end,
            // `\s+(?!\S)` before a non-space: all but the last character,
            // which joins the next piece.
            None if end - start >= 2 => end - 1,
            // `\s+`
            None => end,
        }
    }

    /// Slots of the table of tokens of up to 8 bytes (105,590 of them).
    const SHORT_BITS: u32 = 18;
    /// Slots of the table of tokens of 9 to 16 bytes (22,970 of them).
    const LONG_BITS: u32 = 16;

    /// The ASCII tokens of o200k_base of 1 to 16 bytes, as two
    /// open-addressing sets of their bytes packed little-endian into an
    /// integer (zero-padded: no token byte is zero, so the packing is
    /// one-to-one; 0 marks an empty slot). 3 MiB, built once (about 10 ms)
    /// by [`super::Tokenizer::preload`] or the first count.
    pub(super) struct Singles {
        short: Box<[u64]>,
        long: Box<[u128]>,
    }

    static SINGLES: LazyLock<Singles> = LazyLock::new(|| Singles::of(&bpe_openai::o200k_base().bpe));

    /// `bytes` packed, if they could be a key: 1 to 16 bytes of ASCII
    /// without zero.
    #[inline]
    fn key(bytes: &[u8]) -> Option<u128> {
        if bytes.is_empty() || bytes.len() > 16 || bytes.iter().any(|&b| b == 0 || b >= 0x80) {
            return None;
        }
        let mut padded = [0u8; 16];
        padded.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(u128::from_le_bytes(padded))
    }

    #[inline]
    fn home(key: u64, bits: u32) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize
    }

    /// Inserts `key` with linear probing (the tables are at most 40% full,
    /// so a free slot is near).
    fn insert<K: Copy + Default + PartialEq>(table: &mut [K], key: K, home: usize) {
        let mask = table.len() - 1;
        for step in 0..table.len() {
            let Some(entry) = table.get_mut((home + step) & mask) else {
                return;
            };
            if *entry == key || *entry == K::default() {
                *entry = key;
                return;
            }
        }
    }

    impl Singles {
        fn of(bpe: &BytePairEncoding) -> Singles {
            let mut singles = Singles {
                short: vec![0; 1 << SHORT_BITS].into_boxed_slice(),
                long: vec![0; 1 << LONG_BITS].into_boxed_slice(),
            };
            for id in 0..u32::try_from(bpe.num_tokens()).unwrap_or(u32::MAX) {
                let bytes = bpe.token_bytes(id);
                match key(bytes) {
                    Some(key) if bytes.len() <= 8 => {
                        insert(&mut singles.short, key as u64, home(key as u64, SHORT_BITS))
                    }
                    Some(key) => insert(&mut singles.long, key, home(fold(key), LONG_BITS)),
                    None => {}
                }
            }
            singles
        }

        /// Whether `piece` is a token (of the ASCII tokens kept).
        #[inline]
        pub(super) fn contains(&self, piece: &[u8]) -> bool {
            let Some(key) = key(piece) else { return false };
            let mask64 = self.short.len() - 1;
            let mask128 = self.long.len() - 1;
            if piece.len() <= 8 {
                let key = key as u64;
                let mut slot = home(key, SHORT_BITS);
                for _ in 0..=mask64 {
                    match self.short.get(slot & mask64) {
                        Some(&k) if k == key => return true,
                        Some(&0) | None => return false,
                        Some(_) => slot += 1,
                    }
                }
            } else {
                let mut slot = home(fold(key), LONG_BITS);
                for _ in 0..=mask128 {
                    match self.long.get(slot & mask128) {
                        Some(&k) if k == key => return true,
                        Some(&0) | None => return false,
                        Some(_) => slot += 1,
                    }
                }
            }
            false
        }
    }

    #[inline]
    fn fold(key: u128) -> u64 {
        (key as u64) ^ ((key >> 64) as u64).rotate_left(29)
    }

    #[cfg(test)]
    #[allow(clippy::unwrap_used)]
    mod tests {
        use super::*;

        /// The pieces of ASCII `text` by [`piece_end`].
        fn pieces(text: &str) -> Vec<&str> {
            let mut out = Vec::new();
            let mut start = 0;
            while start < text.len() {
                let end = piece_end(text.as_bytes(), start);
                assert!(end > start, "{text:?} at {start}");
                out.push(&text[start..end]);
                start = end;
            }
            out
        }

        proptest::proptest! {
            #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]
            /// The hand-written pre-tokenizer splits ASCII text exactly as
            /// `bpe_openai`'s regex does, and the fast count is its count:
            /// letters of both cases, contractions in both cases and cut
            /// short, digit runs, symbols, '/', every ASCII whitespace and
            /// control byte, runs of them, and the end of the text.
            #[test]
            fn ascii_pieces_and_counts_are_bpe_openais(text in "([a-z]{1,6}|[A-Z]{1,4}|[A-Za-z]{1,6}|'|'[stmdSTMD]|'(re|ve|ll|RE|Ve|lL)|'[rvl]|[0-9]{1,5}|[ \t]{1,3}|\r|\n{1,2}|\r\n|[\x0b\x0c\x00-\x08\x0e-\x1f\x7f]|[!-/:-@\\[-`{-~]{1,3}|/|<\\|endoftext\\|>| ){0,40}") {
                let reference: Vec<&str> = bpe_openai::o200k_base().split(&text).collect();
                proptest::prop_assert_eq!(pieces(&text), reference, "{:?}", text);
                proptest::prop_assert_eq!(count(&text), bpe_openai::o200k_base().count(text.as_str()), "{:?}", text);
            }
        }

        #[test]
        fn singles_are_exactly_the_short_ascii_tokens() {
            let bpe = &bpe_openai::o200k_base().bpe;
            let singles = &*SINGLES;
            let mut kept = 0;
            for id in 0..u32::try_from(bpe.num_tokens()).unwrap() {
                let bytes = bpe.token_bytes(id);
                let expected = key(bytes).is_some();
                assert_eq!(singles.contains(bytes), expected, "{bytes:?}");
                kept += usize::from(expected);
            }
            assert_eq!(kept, 105_590 + 22_970);
            // Not tokens: a long word, a made-up word, a piece with a zero
            // byte or a non-ASCII byte, the empty piece.
            for piece in [&b" internationalization"[..], b" zqxjv", b"a\0", b"\xc3\xa9", b""] {
                assert!(!singles.contains(piece), "{piece:?}");
            }
            // Each of these is one token, and is found.
            for piece in [&b" the"[..], b"Hello", b" merchant", b"\n\n", b"!"] {
                assert_eq!(bpe.count(piece), 1, "{piece:?}");
                assert!(singles.contains(piece), "{piece:?}");
            }
        }

        #[test]
        fn hand_checked_pieces() {
            for (text, expected) in [
                (
                    "Hello, I'm DON'T  worry\n\n  12345 /path//x\t!",
                    &[
                        "Hello", ",", " I'm", " DON'T", " ", " worry", "\n\n", " ", " ", "123", "45", " /", "path",
                        "//", "x", "\t", "!",
                    ][..],
                ),
                ("a   ", &["a", "   "]),
                ("", &[]),
            ] {
                assert_eq!(pieces(text), expected, "{text:?}");
                assert_eq!(
                    bpe_openai::o200k_base().split(text).collect::<Vec<_>>(),
                    expected,
                    "{text:?}"
                );
            }
        }
    }
}

/// An open model's tokenizer, loaded from a Hugging Face `tokenizer.json`.
///
/// Two are equal when their files' contents are (compared by SHA-256).
pub struct FileTokenizer {
    path: String,
    sha256: [u8; 32],
    inner: tokenizers::Tokenizer,
}

impl FileTokenizer {
    fn load(path: &Path) -> Result<FileTokenizer, TokenError> {
        let shown = path.display().to_string();
        let fail = |reason: String| TokenError::File {
            path: shown.clone(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| fail(e.to_string()))?;
        // A `tokenizer.json` made for a fixed-length encoder carries
        // truncation (MiniLM's stops at 128) and padding; either would make
        // the count the padded or truncated length rather than the text's.
        inner.with_truncation(None).map_err(|e| fail(e.to_string()))?;
        inner.with_padding(None);
        Ok(FileTokenizer {
            sha256: Sha256::digest(&bytes).into(),
            path: shown,
            inner,
        })
    }

    /// The file's path, as given.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// SHA-256 of the file, in lowercase hex: which tokenizer this is.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    fn count(&self, text: &str) -> Result<usize, TokenError> {
        // `encode_fast` is `encode` without the offsets, which a count does
        // not need; the ids are the same.
        self.inner
            .encode_fast(text, false)
            .map(|encoding| encoding.len())
            .map_err(|e| TokenError::Encode(e.to_string()))
    }

    #[cfg(test)]
    fn ids(&self, text: &str) -> Vec<u32> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }
}

impl fmt::Debug for FileTokenizer {
    // Not the vocabulary: it is a hundred thousand entries.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileTokenizer")
            .field("path", &self.path)
            .field("sha256", &self.sha256_hex())
            .finish_non_exhaustive()
    }
}

impl PartialEq for FileTokenizer {
    fn eq(&self, other: &Self) -> bool {
        self.sha256 == other.sha256
    }
}

impl Eq for FileTokenizer {}

impl Hash for FileTokenizer {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.sha256.hash(state);
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
pub fn count_request(tokenizer: &Tokenizer, operation: Operation, body: &Value) -> Result<TokenCount, TokenError> {
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

fn count_chat(tokenizer: &Tokenizer, body: &Value, count: &mut TokenCount) -> Result<(), TokenError> {
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
fn count_content(tokenizer: &Tokenizer, content: &Value, count: &mut TokenCount) -> Result<(), TokenError> {
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
    tokenizer: &Tokenizer,
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
    use std::sync::LazyLock;

    use serde_json::json;

    use super::*;

    const BOTH: [Tokenizer; 2] = [Tokenizer::O200kBase, Tokenizer::Cl100kBase];

    /// tiktoken's own encoding, the reference the counts are held to.
    fn bpe(t: &Tokenizer) -> &'static tiktoken_rs::CoreBPE {
        match t {
            Tokenizer::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Tokenizer::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
            Tokenizer::File(_) => panic!("{t} is not a tiktoken encoding"),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Counts are tiktoken's, on text mixing scripts, digits, marks,
        /// punctuation, runs of whitespace and newlines (where the two
        /// pre-tokenizers differ in how they express look-ahead).
        #[test]
        fn counts_are_tiktokens(text in "([a-zA-Z]{1,8}|[0-9]{1,5}|[ \t]{1,4}|\r?\n{1,3}|[.,;:!?'\"()<>|/-]{1,3}|'(s|t|re|ve|m|ll|d)|[éüßçñ]|[\u{0300}-\u{036f}]|[а-я]{1,5}|[一-龥]{1,3}|[ぁ-ん]{1,3}|[🙂🚀]| ){0,60}") {
            for t in BOTH {
                let reference = bpe(&t).encode_ordinary(&text).len() as u64;
                proptest::prop_assert_eq!(t.count(&text).unwrap(), reference, "{} on {:?}", t, text);
            }
        }
    }

    /// The count straight from the encoding, independent of `count`.
    fn n(t: &Tokenizer, text: &str) -> u64 {
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
            bpe(&Tokenizer::Cl100kBase).encode_ordinary("tiktoken is great!"),
            [83, 1609, 5963, 374, 2294, 0]
        );
        assert_eq!(
            bpe(&Tokenizer::O200kBase).encode_ordinary("tiktoken is great!"),
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
            assert_eq!(c, bpe(&t).encode_ordinary("<|endoftext|>").len() as u64);
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
                    expected += n(&t, v.as_str().unwrap());
                    if k == "name" {
                        expected += 1;
                    }
                }
            }
            expected += 3;
            let got = count_request(&t, Operation::ChatCompletions, &body).unwrap();
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
        let got = count_request(&Tokenizer::Cl100kBase, Operation::ChatCompletions, &body).unwrap();
        assert_eq!(got.tokens, 129);
        let got = count_request(&Tokenizer::O200kBase, Operation::ChatCompletions, &body).unwrap();
        assert_eq!(got.tokens, 124);
    }

    #[test]
    fn chat_single_message_literal() {
        // 3 (message) + 1 ("user") + 2 ("hello world") + 3 (priming).
        let body = json!({"messages": [{"role": "user", "content": "hello world"}]});
        for t in BOTH {
            assert_eq!(
                count_request(&t, Operation::ChatCompletions, &body).unwrap().tokens,
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
                + n(&t, "user")
                + n(&t, "What is in this image?")
                + n(&t, "And the weather in Paris?")
                + n(&t, "assistant")
                + n(&t, &tool_calls.to_string())
                + n(&t, "tool")
                + n(&t, "call_1")
                + n(&t, "sunny")
                + n(&t, &tools[0].to_string());
            let got = count_request(&t, Operation::ChatCompletions, &body).unwrap();
            assert_eq!(got.tokens, expected, "{t}");
            assert_eq!(got.uncounted_parts, 1, "{t}: the image is not guessed at");
            assert!(!got.is_complete());
        }
    }

    #[test]
    fn completions_and_embeddings_in_every_shape() {
        let t = Tokenizer::O200kBase;
        let count = |op, body: Value| count_request(&t, op, &body).unwrap().tokens;
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
            n(&t, "a b c") + 2
        );
    }

    #[test]
    fn malformed_bodies_and_bodiless_operations_are_errors() {
        let t = Tokenizer::Cl100kBase;
        let err = |op, body: Value| count_request(&t, op, &body).unwrap_err();
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
            let got = count_request(&t, Operation::Completions, &json!({"prompt": prompt})).unwrap();
            assert_eq!(got.tokens, n(&t, &prompt), "{t}");
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

    // --- Hugging Face tokenizer files -------------------------------------

    /// The shipped Qwen3 tokenizer (see `tokenizers/README.md`), loaded once
    /// for all tests: parsing 11 MB of JSON takes seconds in a debug build.
    static QWEN3: LazyLock<Tokenizer> = LazyLock::new(|| Tokenizer::from_file(QWEN3_PATH).unwrap());
    const QWEN3_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tokenizers/qwen3/tokenizer.json");
    const QWEN3_SHA256: &str = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4";

    fn qwen3() -> Tokenizer {
        QWEN3.clone()
    }

    fn file_of(t: &Tokenizer) -> &FileTokenizer {
        match t {
            Tokenizer::File(file) => file,
            other => panic!("{other} is not a file tokenizer"),
        }
    }

    #[test]
    fn the_shipped_qwen3_file_is_the_one_the_readme_names() {
        let t = qwen3();
        let file = file_of(&t);
        assert_eq!(file.sha256_hex(), QWEN3_SHA256);
        assert_eq!(file.path(), QWEN3_PATH);
        assert_eq!(t.name(), QWEN3_PATH);
        assert_eq!(t.to_string(), QWEN3_PATH);
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tokenizers/README.md")).unwrap();
        assert!(readme.contains(QWEN3_SHA256));
        t.preload().unwrap();
    }

    #[test]
    fn qwen3_hand_checked_ids() {
        let t = qwen3();
        let file = file_of(&t);
        // Ids as they stand in the file's vocabulary: `Hello` 9707, `,` 11,
        // `Ġworld` 1879 (Ġ is the byte-level space), `!` 0, `hello` 14990.
        assert_eq!(file.ids("Hello, world!"), [9707, 11, 1879, 0]);
        assert_eq!(t.count("Hello, world!").unwrap(), 4);
        assert_eq!(file.ids("hello world"), [14990, 1879]);
        assert_eq!(t.count("hello world").unwrap(), 2);
        // Qwen's pre-tokenizer splits numbers into single digits (`\p{N}`),
        // where cl100k_base takes up to three at a time.
        assert_eq!(file.ids("2024"), [17, 15, 17, 19]);
        assert_eq!(t.count("2024").unwrap(), 4);
        assert_eq!(Tokenizer::Cl100kBase.count("2024").unwrap(), 2);
        assert_eq!(t.count("").unwrap(), 0);
        // No special tokens are added around the text...
        assert_eq!(t.count("a").unwrap(), 1);
        // ...and an added token spelled in the text is the one token the
        // model server will see too.
        assert_eq!(file.ids("<|im_start|>"), [151644]);
        assert_eq!(t.count("<|im_start|>user").unwrap(), 2);
    }

    #[test]
    fn qwen3_ids_follow_the_files_vocabulary() {
        let t = qwen3();
        let file = file_of(&t);
        // Every word of this sentence is one entry of the vocabulary, the
        // words after the first with the byte-level space `Ġ` in front.
        let words = [
            "The", "Ġquick", "Ġbrown", "Ġfox", "Ġjumps", "Ġover", "Ġthe", "Ġlazy", "Ġdog", ".",
        ];
        let expected: Vec<u32> = words
            .iter()
            .map(|w| {
                file.inner
                    .token_to_id(w)
                    .unwrap_or_else(|| panic!("{w} not in the vocabulary"))
            })
            .collect();
        let sentence = "The quick brown fox jumps over the lazy dog.";
        assert_eq!(file.ids(sentence), expected);
        assert_eq!(t.count(sentence).unwrap(), words.len() as u64);
        // `count` (encode_fast) and `encode` agree on longer, mixed text.
        let mixed = "Grüße! 你好，世界。 fn main() { println!(\"{}\", 1 + 2); }\n\n\tend";
        assert_eq!(t.count(mixed).unwrap(), file.ids(mixed).len() as u64);
        assert!(t.count(mixed).unwrap() > 10);
    }

    #[test]
    fn requests_are_counted_with_a_file_tokenizer() {
        let t = qwen3();
        // 3 (message) + 1 ("user") + 2 ("hello world") + 3 (priming).
        let body = json!({"messages": [{"role": "user", "content": "hello world"}]});
        assert_eq!(count_request(&t, Operation::ChatCompletions, &body).unwrap().tokens, 9);
        let body = json!({"prompt": ["Hello, world!", "2024"], "suffix": "hello world"});
        assert_eq!(
            count_request(&t, Operation::Completions, &body).unwrap().tokens,
            4 + 4 + 2
        );
        let sentence = "The quick brown fox jumps over the lazy dog. ";
        let prompt = sentence.repeat(10_240 / sentence.len() + 1);
        let got = count_request(&t, Operation::Embeddings, &json!({"input": prompt})).unwrap();
        assert_eq!(got.tokens, file_of(&t).ids(&prompt).len() as u64);
        assert!((1_500..4_000).contains(&got.tokens), "{}", got.tokens);
    }

    #[test]
    fn file_tokenizers_are_cheap_clones_equal_by_content() {
        let a = qwen3();
        let b = a.clone();
        let (Tokenizer::File(fa), Tokenizer::File(fb)) = (&a, &b) else {
            panic!("not file tokenizers")
        };
        assert!(Arc::ptr_eq(fa, fb));
        // The same bytes under another name are the same tokenizer.
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("copy.json");
        std::fs::copy(QWEN3_PATH, &copy).unwrap();
        let c = Tokenizer::from_file(&copy).unwrap();
        assert_eq!(a, c);
        assert_ne!(c.name(), a.name());
        assert_ne!(a, Tokenizer::O200kBase);
        let debug = format!("{a:?}");
        assert!(debug.contains(QWEN3_SHA256) && debug.len() < 400, "{debug}");
    }

    /// A tokenizer.json small enough to check by hand: whitespace-split
    /// words, with the truncation and padding an encoder model's file has.
    const WORD_LEVEL: &str = r#"{
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": null,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3, "c": 4}, "unk_token": "[UNK]"}
    }"#;

    #[test]
    fn truncation_and_padding_in_the_file_do_not_change_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, WORD_LEVEL).unwrap();
        // As the file stands, every text would be 8 tokens.
        let raw = tokenizers::Tokenizer::from_file(&path).unwrap();
        assert_eq!(raw.encode("a b c a", false).unwrap().len(), 8);
        let t = Tokenizer::from_file(&path).unwrap();
        assert_eq!(t.count("a b c a").unwrap(), 4);
        assert_eq!(t.count("a zzz").unwrap(), 2, "an unknown word is one [UNK]");
        assert_eq!(t.count("").unwrap(), 0);
        assert_eq!(file_of(&t).ids("c b a"), [4, 3, 2]);
    }

    #[test]
    fn unreadable_or_invalid_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        match Tokenizer::from_file(&missing) {
            Err(TokenError::File { path, .. }) => assert_eq!(path, missing.display().to_string()),
            other => panic!("{other:?}"),
        }
        let bogus = dir.path().join("bogus.json");
        std::fs::write(&bogus, r#"{"model": {"type": "BPE"}, "oops": true}"#).unwrap();
        assert!(matches!(Tokenizer::from_file(&bogus), Err(TokenError::File { .. })));
        std::fs::write(&bogus, "not json").unwrap();
        let err = Tokenizer::from_file(&bogus).unwrap_err();
        assert!(err.to_string().contains("bogus.json"), "{err}");
    }

    #[test]
    fn hostile_text_through_a_file_tokenizer_is_counted_or_an_error() {
        // Long runs that stress the pre-tokenizer's regex and the BPE.
        let t = qwen3();
        for text in [" ".repeat(64 << 10), "a".repeat(64 << 10), "\n".repeat(64 << 10)] {
            match t.count(&text) {
                Ok(n) => assert!(n > 0),
                Err(e) => assert!(matches!(e, TokenError::Encode(_)), "{e}"),
            }
        }
    }
}
