//! Server-sent events as they pass through: reading the `usage` an upstream
//! reports in a stream, and the error event that ends a stream Warden cuts
//! off.
//!
//! The scanner never holds the stream: it looks at each chunk as it is
//! relayed, keeping only the unfinished last line of a chunk (bounded by
//! [`MAX_LINE`]) so that an event split across chunks is still read. Only
//! `data:` lines that mention `"usage"` are parsed.

use bytes::Bytes;

use crate::audit::Usage;
use crate::config::Protocol;
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
}
