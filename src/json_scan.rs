//! Finding one top-level member of a JSON object without decoding the rest.
//!
//! Every collected upstream response is searched for its `usage` report,
//! and every stream event too. Decoding the whole object to reach one
//! member (even skipping the others with serde) cost about 6,000
//! instructions for a short chat completion; this scan walks the
//! structure, skips strings with `memchr` and decodes nothing. What it
//! returns is then decoded strictly by serde.
//!
//! Only structure is checked here: the object must be closed, strings
//! terminated and brackets balanced, with nothing after the object. Text
//! inside strings can never be mistaken for a member: a model that writes
//! `"usage":{…}` in its answer writes it inside a string value.

/// The raw JSON text of the member `key` of the object `bytes`, at the top
/// level only. `None` when `bytes` is not a well-formed object, when the
/// member is absent, or when it appears more than once (which of two
/// reports is true cannot be told).
pub fn top_level_member<'a>(bytes: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let mut scan = Scanner { bytes, at: 0 };
    scan.whitespace();
    scan.expect(b'{')?;
    scan.whitespace();
    let mut found = None;
    if scan.peek() == Some(b'}') {
        scan.at += 1;
    } else {
        loop {
            scan.whitespace();
            // Keys are compared as written: an escaped spelling of `key` is
            // not `key`, as the upstreams that report usage never escape it.
            let name = scan.string()?;
            scan.whitespace();
            scan.expect(b':')?;
            scan.whitespace();
            let start = scan.at;
            scan.value()?;
            if name == key.as_bytes() {
                if found.is_some() {
                    return None;
                }
                found = Some(&bytes[start..scan.at]);
            }
            scan.whitespace();
            match scan.next()? {
                b',' => {}
                b'}' => break,
                _ => return None,
            }
        }
    }
    scan.whitespace();
    if scan.at != bytes.len() {
        return None;
    }
    found
}

struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    fn expect(&mut self, wanted: u8) -> Option<()> {
        (self.next()? == wanted).then_some(())
    }

    fn whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// A string starting here; returns its contents as written (escapes
    /// not decoded).
    fn string(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let start = self.at;
        loop {
            let rest = self.bytes.get(self.at..)?;
            let offset = memchr::memchr2(b'"', b'\\', rest)?;
            self.at += offset;
            if self.next()? == b'"' {
                return Some(&self.bytes[start..self.at - 1]);
            }
            // A backslash: the next byte is escaped, whatever it is.
            self.next()?;
        }
    }

    /// Skips one value: a string, an object or array (to its matching
    /// bracket), or a scalar (to the next delimiter).
    fn value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' | b'[' => {
                // The open brackets, innermost lowest, one bit each (1 for
                // `{`): deeper than 64 levels is not a response to read.
                let (mut open, mut depth) = (0u64, 0u32);
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b @ (b'{' | b'[') => {
                            if depth == 64 {
                                return None;
                            }
                            open = (open << 1) | u64::from(b == b'{');
                            depth += 1;
                        }
                        b @ (b'}' | b']') => {
                            if depth == 0 || (open & 1 == 1) != (b == b'}') {
                                return None;
                            }
                            open >>= 1;
                            depth -= 1;
                            if depth == 0 {
                                self.at += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.at += 1;
                }
            }
            _ => {
                let start = self.at;
                while let Some(b) = self.peek() {
                    if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.at += 1;
                }
                (self.at > start).then_some(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::top_level_member;

    fn member<'a>(json: &'a str, key: &str) -> Option<&'a str> {
        top_level_member(json.as_bytes(), key).and_then(|b| std::str::from_utf8(b).ok())
    }

    #[test]
    fn finds_a_top_level_member_whatever_comes_before_it() {
        let json = r#"{"id":"x","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}],
            "n": -1.5e3, "ok": true, "none": null, "usage" : {"prompt_tokens":3,"completion_tokens":2} }"#;
        assert_eq!(
            member(json, "usage"),
            Some(r#"{"prompt_tokens":3,"completion_tokens":2}"#)
        );
        assert_eq!(member(json, "n"), Some("-1.5e3"));
        assert_eq!(member(json, "none"), Some("null"));
        assert_eq!(member(json, "id"), Some(r#""x""#));
        assert_eq!(member(json, "missing"), None);
        assert_eq!(member("{}", "usage"), None);
    }

    #[test]
    fn text_inside_strings_and_nested_members_are_not_top_level() {
        // A model that writes a usage report in its answer, with escaped
        // quotes and a backslash before the closing quote.
        let spoof =
            r#"{"choices":[{"message":{"content":"\"usage\":{\"prompt_tokens\":1} \\","usage":{"prompt_tokens":9}}}]}"#;
        assert_eq!(member(spoof, "usage"), None);
        let nested = r#"{"data":{"usage":{"prompt_tokens":9}},"x":"}{]["}"#;
        assert_eq!(member(nested, "usage"), None);
        assert_eq!(member(nested, "x"), Some(r#""}{][""#));
    }

    #[test]
    fn broken_or_ambiguous_objects_give_nothing() {
        for json in [
            r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":1}"#,
            r#"{"usage":{"prompt_tokens":1}}}"#,
            r#"{"usage":{"prompt_tokens":1]}"#,
            r#"{"usage":{"prompt_tokens":1}} trailing"#,
            r#"{"usage":}"#,
            r#"{"usage" {"prompt_tokens":1}}"#,
            r#"{"a":"unterminated}"#,
            r#"["usage"]"#,
            "",
        ] {
            assert_eq!(member(json, "usage"), None, "{json}");
        }
        let deep = |n| format!(r#"{{"usage":1,"deep":{}{}}}"#, "[".repeat(n), "]".repeat(n));
        assert_eq!(member(&deep(64), "usage"), Some("1"));
        assert_eq!(member(&deep(65), "usage"), None);
    }
}
