//! The detectors and the whole-text scan.
//!
//! Each regex detector is one linear-time `regex` pattern with bounded
//! repetitions only, so every raw match is at most `max_len` bytes long:
//! that bound is what lets [`StreamScanner`](super::StreamScanner) hold back
//! a bounded window. A raw match is only a candidate; a validator then checks
//! boundaries, checksums, context and placeholders. Private key blocks and
//! JWTs can be kilobytes long, so they are scanned by hand from their fixed
//! openings (`-----BEGIN`, `eyJ`) and report when a candidate is still open
//! at the end of the buffer; the stream holds back only from such an opening.
//!
//! Regexes with a literal opening (`AKIA`, `ghp_`, `xox`, `sk_`, key names)
//! are skipped by the regex crate's literal prefilter on text without it;
//! the digit-shaped detectors run only when the text has an ASCII digit, so
//! clean prose costs a few passes of memchr-like scanning.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use base64::Engine as _;
use memchr::memmem;
use regex::Regex;

use super::check::{classes, entropy, iban_len, iban_mod97, is_placeholder, luhn};
use super::stream::StreamScanner;
use super::{Action, Finding, Kind, Policy, Scan};

/// Why a scanner could not be built (internal patterns; a policy that
/// passed [`Policy::from_spec`] builds unless the deny terms do not fit the
/// automaton).
#[derive(Debug, thiserror::Error)]
pub enum ScannerError {
    /// A built-in pattern did not compile (a bug, reported rather than
    /// panicking).
    #[error("detector `{kind}` pattern does not compile: {source}")]
    Pattern {
        /// The detector.
        kind: Kind,
        /// The regex error.
        source: regex::Error,
    },
    /// The deny-term automaton could not be built.
    #[error("deny terms do not compile: {0}")]
    DenyTerms(#[from] aho_corasick::BuildError),
}

/// The longest private key block recognised (an RSA-4096 PEM key is about
/// 3.3 KB); a longer one is caught up to this length.
pub(crate) const MAX_PRIVATE_KEY_BYTES: usize = 8192;
/// JWT segment limits (header, payload, signature).
const JWT_MAX: [usize; 3] = [1024, 6144, 1024];
/// Every raw candidate, regex or hand-scanned, is at most this long; the
/// stream never holds back more than this plus its scan step and context.
pub const MAX_HOLD_BACK: usize = MAX_PRIVATE_KEY_BYTES + 128;

/// Scans text for the policy's detectors. Build once, share (`Send + Sync`).
#[derive(Debug)]
pub struct ContentScanner {
    regexes: Vec<RegexDetector>,
    digits: Vec<RegexDetector>,
    private_key: Option<Action>,
    jwt: Option<Action>,
    deny: Option<(AhoCorasick, Action, usize)>,
    hold: usize,
}

#[derive(Debug)]
struct RegexDetector {
    kind: Kind,
    action: Action,
    re: Regex,
    /// Whether the finding is capture group 1 (the match includes a key
    /// name or URL around it).
    group: bool,
}

/// Candidates of one scan pass, before overlaps are resolved.
#[derive(Debug, Default)]
pub(crate) struct Pass {
    /// Validated candidates.
    pub cands: Vec<Finding>,
    /// Every raw match `(start, end)`, validated or not: the stream must not
    /// release a position inside one.
    pub raws: Vec<(usize, usize)>,
    /// The smallest start of a hand-scanned candidate that reached the end
    /// of the buffer and could still grow.
    pub open: Option<usize>,
}

impl ContentScanner {
    /// Compiles the detectors the policy turns on.
    pub fn new(policy: &Policy) -> Result<ContentScanner, ScannerError> {
        let mut regexes = Vec::new();
        let mut digits = Vec::new();
        let mut hold = 0usize;
        for &(kind, pattern, max_len, group, digit) in PATTERNS {
            let Some(action) = policy.action(kind) else { continue };
            let re = Regex::new(pattern).map_err(|source| ScannerError::Pattern { kind, source })?;
            hold = hold.max(max_len);
            let d = RegexDetector {
                kind,
                action,
                re,
                group,
            };
            if digit { digits.push(d) } else { regexes.push(d) }
        }
        let deny = match policy.action(Kind::DenyTerm) {
            Some(action) => {
                let terms = policy.deny_terms();
                let ac = AhoCorasickBuilder::new()
                    .ascii_case_insensitive(true)
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(terms)?;
                let longest = terms.iter().map(String::len).max().unwrap_or(0);
                hold = hold.max(longest);
                Some((ac, action, longest))
            }
            None => None,
        };
        let private_key = policy.action(Kind::PrivateKey);
        let jwt = policy.action(Kind::Jwt);
        if private_key.is_some() {
            // The opening `-----BEGIN` itself must fit in the window.
            hold = hold.max(16);
        }
        if jwt.is_some() {
            hold = hold.max(8);
        }
        // Validators look up to two characters past a raw match.
        Ok(ContentScanner {
            regexes,
            digits,
            private_key,
            jwt,
            deny,
            hold: hold + 16,
        })
    }

    /// Scans a whole text.
    pub fn scan(&self, text: &str) -> Scan {
        let mut pass = Pass::default();
        self.candidates(text, 0, true, &mut pass);
        Scan {
            findings: resolve(pass.cands),
        }
    }

    /// Scans `text` and returns its redacted form with the scan.
    pub fn redact(&self, text: &str) -> (String, Scan) {
        let scan = self.scan(text);
        (scan.redact(text), scan)
    }

    /// A scanner for a text that arrives in pieces.
    pub fn stream(&self) -> StreamScanner<&ContentScanner> {
        StreamScanner::new(self)
    }

    /// A scanner for a text that arrives in pieces, owning its share of the
    /// policy (for a stream that outlives the request's stages).
    pub fn stream_owned(self: &std::sync::Arc<Self>) -> StreamScanner {
        StreamScanner::new(std::sync::Arc::clone(self))
    }

    /// Whether no detector is on.
    pub fn is_empty(&self) -> bool {
        self.regexes.is_empty()
            && self.digits.is_empty()
            && self.private_key.is_none()
            && self.jwt.is_none()
            && self.deny.is_none()
    }

    /// The hold-back the short (regex and deny-term) detectors need: the
    /// longest raw match plus the validators' look-ahead.
    pub fn hold_back(&self) -> usize {
        self.hold
    }

    /// Collects candidates starting at or after `from` (a char boundary);
    /// `hay[..from]` is context only. `at_end`: no more text follows, so a
    /// candidate reaching the end of `hay` is complete.
    pub(crate) fn candidates(&self, hay: &str, from: usize, at_end: bool, pass: &mut Pass) {
        let tail = hay.get(from..).unwrap_or_default();
        let mut run = |d: &RegexDetector| {
            let mut at = from;
            while at < hay.len() {
                let (raw, span) = if d.group {
                    let Some(c) = d.re.captures_at(hay, at) else { break };
                    let Some(m) = c.get(0) else { break };
                    // The finding is whichever alternative's group took part.
                    let g = c.get(1).or_else(|| c.get(2)).unwrap_or(m);
                    ((m.start(), m.end()), (g.start(), g.end()))
                } else {
                    let Some(m) = d.re.find_at(hay, at) else { break };
                    ((m.start(), m.end()), (m.start(), m.end()))
                };
                pass.raws.push(raw);
                if let Some((start, end)) = validate(d.kind, hay, span.0, span.1) {
                    pass.cands.push(Finding {
                        kind: d.kind,
                        start,
                        end,
                        action: d.action,
                    });
                }
                // INVARIANT: raw matches are never empty, so this advances.
                at = raw.1.max(at + 1);
                while !hay.is_char_boundary(at) {
                    at += 1;
                }
            }
        };
        self.regexes.iter().for_each(&mut run);
        if tail.bytes().any(|b| b.is_ascii_digit()) {
            self.digits.iter().for_each(&mut run);
        }
        if let Some(action) = self.private_key {
            scan_private_keys(hay, from, at_end, action, pass);
        }
        if let Some(action) = self.jwt {
            scan_jwts(hay, from, at_end, action, pass);
        }
        if let Some((ac, action, _)) = &self.deny {
            let input = aho_corasick::Input::new(hay).span(from..hay.len());
            for m in ac.find_iter(input) {
                pass.raws.push((m.start(), m.end()));
                let term = hay.get(m.start()..m.end()).unwrap_or_default();
                let starts_word = term.chars().next().is_some_and(char::is_alphanumeric);
                let ends_word = term.chars().next_back().is_some_and(char::is_alphanumeric);
                if (starts_word && prev(hay, m.start()).is_some_and(char::is_alphanumeric))
                    || (ends_word && next(hay, m.end()).is_some_and(char::is_alphanumeric))
                {
                    continue;
                }
                pass.cands.push(Finding {
                    kind: Kind::DenyTerm,
                    start: m.start(),
                    end: m.end(),
                    action: *action,
                });
            }
        }
    }
}

/// Keeps non-overlapping findings: the strongest action first, then the
/// more specific detector ([`Kind::rank`]), then the longer span, then the
/// earlier. Returns them sorted by start.
pub(crate) fn resolve(mut cands: Vec<Finding>) -> Vec<Finding> {
    cands.sort_by(|a, b| {
        b.action
            .cmp(&a.action)
            .then(a.kind.rank().cmp(&b.kind.rank()))
            .then((b.end - b.start).cmp(&(a.end - a.start)))
            .then(a.start.cmp(&b.start))
    });
    let mut kept: std::collections::BTreeMap<usize, Finding> = std::collections::BTreeMap::new();
    for c in cands {
        // Kept findings do not overlap, so only the last one starting
        // before `c.end` can overlap `c`.
        let overlaps = kept.range(..c.end).next_back().is_some_and(|(_, f)| f.end > c.start);
        if !overlaps {
            kept.insert(c.start, c);
        }
    }
    kept.into_values().collect()
}

/// `(kind, pattern, longest raw match in bytes, finding is group 1, every
/// raw match contains an ASCII digit)`. Every repetition is bounded so the
/// longest match is known. The last flag lets a scan skip the pattern on a
/// text without digits: exact, because no raw match can exist there (the
/// stream relies on raw matches being the same whichever window is scanned).
const PATTERNS: &[(Kind, &str, usize, bool, bool)] = &[
    // The local part may be internationalised (64 chars, up to 256 bytes).
    (
        Kind::Email,
        r"[\p{L}\p{N}._%+\-]{1,64}@(?:[A-Za-z0-9\-]{1,63}\.){1,4}[A-Za-z]{2,24}",
        537,
        false,
        false,
    ),
    (
        Kind::Phone,
        r"(?:\+\d{1,3} ?-?)?(?:\(\d{1,5}\) ?-?)?\d(?:[ .\-]?\d){3,16}(?: ?(?:x|ext\.? ?)\d{1,5})?",
        64,
        false,
        true,
    ),
    (Kind::Card, r"\d(?:[ \-]?\d){11,18}", 40, false, true),
    (Kind::UsSsn, r"\d{3}-\d{2}-\d{4}", 11, false, true),
    (Kind::Iban, r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,32}", 68, false, true),
    (Kind::Ip, r"(?:\d{1,3}\.){3}\d{1,3}", 15, false, true),
    (
        Kind::Ip,
        r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}",
        39,
        false,
        false,
    ),
    (
        Kind::AwsAccessKeyId,
        r"(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA|ASCA)[A-Z0-9]{16}",
        20,
        false,
        false,
    ),
    (
        Kind::AwsSecretKey,
        r#"(?i:aws_?secret_?access_?key|secret_?access_?key|aws_?secret_?key|aws_?secret)["']?\s{0,3}(?:[:=]|=>)\s{0,3}["']?([A-Za-z0-9/+]{40})"#,
        100,
        true,
        false,
    ),
    (
        Kind::GithubToken,
        r"(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82}",
        93,
        false,
        false,
    ),
    (
        Kind::SlackToken,
        r"xox[abposr]-[A-Za-z0-9\-]{10,250}",
        255,
        false,
        false,
    ),
    (
        Kind::StripeKey,
        r"(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,99}",
        107,
        false,
        false,
    ),
    (
        Kind::OpenAiKey,
        r"sk-(?:proj-|svcacct-|admin-|ant-(?:api|admin)\d{2}-)?[A-Za-z0-9_\-]{20,200}",
        220,
        false,
        false,
    ),
    (
        Kind::ConnectionString,
        r"[A-Za-z][A-Za-z0-9+.\-]{1,20}://[^\s:/@]{1,64}:([^\s@/]{1,128})@[^\s@/]",
        220,
        true,
        false,
    ),
    (
        Kind::Credential,
        r#"(?i:client_?secret|secret_?key|api_?key|apikey|access_?token|auth_?token|refresh_?token|private_?key|password|passwd|passphrase|pwd|secret|token)["']?\s{0,3}(?:[:=]|=>|\s(?:is|was)\s)\s{0,3}["']?([^\s"'`,;]{8,128})|(?i:bearer)\s{1,3}([A-Za-z0-9._~+/=\-]{16,256})"#,
        300,
        true,
        false,
    ),
];

fn prev(hay: &str, at: usize) -> Option<char> {
    hay.get(..at).and_then(|s| s.chars().next_back())
}

fn next(hay: &str, at: usize) -> Option<char> {
    hay.get(at..).and_then(|s| s.chars().next())
}

fn next2(hay: &str, at: usize) -> (Option<char>, Option<char>) {
    let mut it = hay.get(at..).unwrap_or_default().chars();
    (it.next(), it.next())
}

/// The next char is a separator continuing a number (`.5`, `-7`): the match
/// is a piece of something longer.
fn continues_number(hay: &str, at: usize) -> bool {
    match next2(hay, at) {
        (Some(c), _) if c.is_alphanumeric() => true,
        (Some('.' | '-' | '/' | ','), Some(d)) => d.is_ascii_digit(),
        _ => false,
    }
}

/// Checks one raw candidate and returns the finding's span, or `None`.
fn validate(kind: Kind, hay: &str, s: usize, e: usize) -> Option<(usize, usize)> {
    let v = hay.get(s..e)?;
    let before = prev(hay, s);
    let after = next(hay, e);
    let ok = match kind {
        Kind::Email => email(v, before, hay, e),
        Kind::Phone => {
            !before.is_some_and(|c| c.is_alphanumeric() || "+-._/:#@$".contains(c))
                && !continues_number(hay, e)
                && phone(v, phone_context(hay, s))
        }
        Kind::Card => {
            !before.is_some_and(|c| c.is_alphanumeric() || "-._/+".contains(c)) && !continues_number(hay, e) && card(v)
        }
        Kind::UsSsn => {
            !before.is_some_and(|c| c.is_alphanumeric() || "-._/+".contains(c)) && !continues_number(hay, e) && ssn(v)
        }
        Kind::Iban => {
            if before.is_some_and(char::is_alphanumeric) {
                return None;
            }
            return iban(v)
                .map(|len| (s, s + len))
                .filter(|&(_, end)| !next(hay, end).is_some_and(char::is_alphanumeric));
        }
        Kind::Ip => ip(v, hay, s, e),
        Kind::AwsAccessKeyId => {
            !before.is_some_and(|c| c.is_ascii_alphanumeric())
                && !after.is_some_and(|c| c.is_ascii_alphanumeric())
                && v.get(4..).is_some_and(|body| !is_placeholder(body))
        }
        Kind::AwsSecretKey => {
            !after.is_some_and(|c| c.is_ascii_alphanumeric() || "/+=".contains(c))
                && !is_placeholder(v)
                && entropy(v) >= 4.0
        }
        Kind::GithubToken => {
            let body = v.split_once('_').map(|x| x.1).unwrap_or_default();
            let body = body.strip_prefix("pat_").unwrap_or(body);
            !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && !is_placeholder(body)
                && entropy(body) >= 3.5
        }
        Kind::SlackToken => {
            let trimmed = v.trim_end_matches('-');
            if before.is_some_and(|c| c.is_ascii_alphanumeric()) || !slack(trimmed) {
                return None;
            }
            return Some((s, s + trimmed.len()));
        }
        Kind::StripeKey => {
            let body = v.get(8..).unwrap_or_default();
            !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && !after.is_some_and(|c| c.is_ascii_alphanumeric())
                && !is_placeholder(body)
                && entropy(body) >= 3.0
        }
        Kind::OpenAiKey => {
            let body = v.rsplit('-').next().unwrap_or_default();
            let whole = v.get(3..).unwrap_or_default();
            !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                && !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                && !is_placeholder(whole)
                && body.len() >= 16
                && classes(whole) >= 2
                && entropy(whole) >= 3.5
        }
        Kind::ConnectionString => connection_password(v),
        Kind::Credential => {
            let t = v.trim_end_matches('.');
            if !credential(t) {
                return None;
            }
            return Some((s, s + t.len()));
        }
        Kind::PrivateKey | Kind::Jwt | Kind::DenyTerm => false,
    };
    ok.then_some((s, e))
}

fn email(v: &str, before: Option<char>, hay: &str, e: usize) -> bool {
    if before.is_some_and(|c| c.is_alphanumeric() || "._%+-".contains(c)) {
        return false;
    }
    // A longer domain (a fifth label, a longer TLD) means the match is cut.
    match next2(hay, e) {
        (Some(c), _) if c.is_ascii_alphanumeric() || c == '-' => return false,
        (Some('.'), Some(c)) if c.is_ascii_alphanumeric() => return false,
        _ => {}
    }
    let Some((local, _)) = v.split_once('@') else {
        return false;
    };
    !local.starts_with('.') && !local.ends_with('.') && !local.contains("..")
}

/// Phone layout: 7–15 digits; an international prefix, a parenthesised area
/// code, at least three digit groups, or a national number starting with 0
/// (at least 9 digits); never a date, an SSN layout or a dotted non-NANP
/// number (versions, IPv4).
fn phone(v: &str, context: bool) -> bool {
    let core = match v.find(['x', 'e']) {
        Some(i) => v.get(..i).unwrap_or(v).trim_end(),
        None => v,
    };
    let digits = core.bytes().filter(u8::is_ascii_digit).count();
    if !(7..=15).contains(&digits) {
        return false;
    }
    let groups: Vec<&str> = core
        .split(|c: char| !c.is_ascii_digit())
        .filter(|g| !g.is_empty())
        .collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    let seps: String = core.chars().filter(|c| !c.is_ascii_digit()).collect();
    // Dates: 2025-03-14, 14.03.2025, 03/14/2025.
    if lens.len() == 3
        && ((lens[0] == 4 && lens[1] <= 2 && lens[2] <= 2) || (lens[0] <= 2 && lens[1] <= 2 && lens[2] == 4))
    {
        return false;
    }
    if lens == [3, 2, 4] && seps == "--" {
        return false;
    }
    if seps.contains('.') && !(lens == [3, 3, 4] || lens == [1, 3, 3, 4]) && !core.starts_with('+') {
        return false;
    }
    let international = core.starts_with('+');
    let paren = core.contains('(');
    let national = core.starts_with('0') && digits >= 9;
    let grouped = groups.len() >= 3
        && lens.iter().all(|&l| l <= 4)
        && !(seps.chars().all(|c| c == ' ') && lens.iter().all(|&l| l <= 2) && groups.len() < 5);
    // A bare 10-digit NANP number (area and exchange codes start 2-9) only
    // right after a phone word: bare digit runs are mostly ids and amounts.
    let nanp = groups.len() == 1
        && digits == 10
        && core.bytes().next().is_some_and(|b| b >= b'2')
        && core.as_bytes().get(3).is_some_and(|&b| b >= b'2');
    international || paren || national || grouped || (nanp && context)
}

/// Whether a phone word (`call`, `phone`, `tel`, …) ends within the 24
/// bytes before `s`.
fn phone_context(hay: &str, s: usize) -> bool {
    let mut from = s.saturating_sub(24);
    while !hay.is_char_boundary(from) {
        from += 1;
    }
    let lead = hay.get(from..s).unwrap_or_default().to_lowercase();
    [
        "call", "phone", "tel", "mobile", "cell", "fax", "whatsapp", "sms", "ring", "dial",
    ]
    .iter()
    .any(|w| lead.contains(w))
}

fn card(v: &str) -> bool {
    let seps: Vec<char> = v.chars().filter(|c| !c.is_ascii_digit()).collect();
    if seps.windows(2).any(|w| w[0] != w[1]) {
        return false;
    }
    let digits: Vec<u8> = v.bytes().filter(u8::is_ascii_digit).collect();
    let n = digits.len();
    let first = digits.first().copied().unwrap_or(b'0');
    // JCB's old 15-digit range starts 1800.
    let jcb15 = n == 15 && digits.starts_with(b"1800");
    if !(12..=19).contains(&n) || !((b'2'..=b'6').contains(&first) || jcb15) {
        return false;
    }
    // 12-digit numbers are cards only for Maestro (5x, 6x).
    if n == 12 && first < b'5' {
        return false;
    }
    if digits.iter().all(|&d| d == first) {
        return false;
    }
    luhn(v)
}

fn ssn(v: &str) -> bool {
    let area = v.get(0..3).unwrap_or("000");
    let group = v.get(4..6).unwrap_or("00");
    let serial = v.get(7..11).unwrap_or("0000");
    // Never issued: area 000, 666, 9xx; group 00; serial 0000. The two
    // famous examples are placeholders.
    area != "000"
        && area != "666"
        && !area.starts_with('9')
        && group != "00"
        && serial != "0000"
        && v != "123-45-6789"
        && v != "078-05-1120"
}

/// The IBAN's length in bytes within `v` when its first characters form a
/// valid IBAN (country length and mod 97), spaces allowed between groups.
fn iban(v: &str) -> Option<usize> {
    let bytes = v.as_bytes();
    let want = iban_len(bytes.get(..2)?)?;
    let mut compact = Vec::with_capacity(want);
    let mut end = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if compact.len() == want {
            break;
        }
        if b == b' ' {
            continue;
        }
        compact.push(b);
        end = i + 1;
    }
    (compact.len() == want && iban_mod97(&compact)).then_some(end)
}

fn ip(v: &str, hay: &str, s: usize, e: usize) -> bool {
    let before = prev(hay, s);
    if v.contains('.') {
        if before.is_some_and(|c| c.is_alphanumeric() || ".-_".contains(c)) || continues_number(hay, e) {
            return false;
        }
        let mut octets = [0u16; 4];
        for (i, part) in v.split('.').enumerate() {
            if part.len() > 1 && part.starts_with('0') {
                return false;
            }
            match (octets.get_mut(i), part.parse::<u16>()) {
                (Some(o), Ok(n)) if n <= 255 => *o = n,
                _ => return false,
            }
        }
        if octets == [0, 0, 0, 0] || octets == [255, 255, 255, 255] {
            return false;
        }
        // `version 1.2.3.4`, `v1.2.3.4`: a version, not an address.
        let lead = hay
            .get(s.saturating_sub(16)..s)
            .unwrap_or_default()
            .to_ascii_lowercase();
        let lead = lead.trim_end();
        return !(lead.ends_with("version") || lead.ends_with("release") || lead.ends_with("build"));
    }
    if before.is_some_and(|c| c.is_alphanumeric() || c == ':' || c == '_')
        || next(hay, e).is_some_and(|c| c.is_alphanumeric() || c == ':' || c == '_')
    {
        return false;
    }
    let hex = v.bytes().filter(u8::is_ascii_hexdigit).count();
    hex >= 5
        && v.bytes().any(|b| b.is_ascii_digit())
        && v.parse::<std::net::Ipv6Addr>().is_ok_and(|a| !a.is_unspecified())
}

/// Slack tokens carry numeric workspace/user ids between dashes; the
/// documentation placeholders (`xoxb-your-token-here`) do not.
fn slack(v: &str) -> bool {
    let mut parts = v.split('-');
    parts.next();
    let parts: Vec<&str> = parts.collect();
    let numeric = parts
        .iter()
        .filter(|p| p.len() >= 8 && p.bytes().all(|b| b.is_ascii_digit()))
        .count();
    let last = parts.last().copied().unwrap_or_default();
    numeric >= 2
        && v.len() >= 30
        && !is_placeholder(v.get(5..).unwrap_or_default())
        && (last.len() < 8 || entropy(last) >= 3.0)
}

/// Passwords that are themselves placeholders in documentation.
const PLACEHOLDER_PASSWORDS: &[&str] = &[
    "password",
    "pass",
    "passwd",
    "pwd",
    "secret",
    "changeme",
    "mypassword",
    "pw",
];

fn connection_password(p: &str) -> bool {
    let lower = p.to_ascii_lowercase();
    !PLACEHOLDER_PASSWORDS.contains(&lower.as_str())
        && !is_placeholder(p)
        && !p.starts_with('$')
        && !p.starts_with('%')
        && !p.starts_with('{')
}

/// A value after a credential key name counts when it looks like a real
/// secret: several character classes (a password), or long, mixed and
/// high-entropy (a token). Plain words (`password is incorrect`), variables
/// and placeholders do not.
fn credential(v: &str) -> bool {
    if v.len() < 8 || is_placeholder(v) {
        return false;
    }
    let lower = v.to_ascii_lowercase();
    // Template and environment references, not values. A password may
    // itself start with `$` or `(`, so only the reference shapes count.
    let var = v.strip_prefix('$').is_some_and(|r| {
        r.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    });
    if var
        || v.starts_with("${")
        || v.starts_with("$(")
        || v.starts_with("{{")
        || v.starts_with("%(")
        || (v.starts_with('%') && v.ends_with('%'))
        || v.starts_with('<')
        || lower.starts_with("process.env")
        || lower.starts_with("os.environ")
        || lower.starts_with("env.")
        || lower.starts_with("getenv")
        || lower.starts_with("secrets.")
    {
        return false;
    }
    let c = classes(v);
    let has_digit = v.bytes().any(|b| b.is_ascii_digit());
    let has_alpha = v.bytes().any(|b| b.is_ascii_alphabetic());
    (c >= 3 && has_digit && has_alpha && entropy(v) >= 2.5)
        || (v.len() >= 16 && c >= 2 && has_digit && has_alpha && entropy(v) >= 3.5)
}

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// JWTs: `eyJ` header, payload, signature, base64url, dot-separated; the
/// header must decode to JSON naming an `alg`.
fn scan_jwts(hay: &str, from: usize, at_end: bool, action: Action, pass: &mut Pass) {
    let bytes = hay.as_bytes();
    let finder = memmem::Finder::new("eyJ");
    let mut at = from;
    while let Some(i) = bytes.get(at..).and_then(|t| finder.find(t)) {
        let p = at + i;
        at = p + 3;
        if p > 0 && bytes.get(p - 1).is_some_and(|&b| is_b64url(b) || b == b'.') {
            continue;
        }
        let mut pos = p;
        let mut ends = [0usize; 3];
        let mut ok = true;
        for (seg, &max) in JWT_MAX.iter().enumerate() {
            let start = pos;
            while pos < bytes.len() && pos - start <= max && bytes.get(pos).is_some_and(|&b| is_b64url(b)) {
                pos += 1;
            }
            if pos == bytes.len() && !at_end {
                // Still growing: decided once more text arrives.
                pass.open = Some(pass.open.map_or(p, |o| o.min(p)));
                ok = false;
                break;
            }
            let len = pos - start;
            let min = [10, 4, 10][seg];
            if len > max || len < min {
                ok = false;
                break;
            }
            ends[seg] = pos;
            if seg < 2 {
                if bytes.get(pos) != Some(&b'.') {
                    ok = false;
                    break;
                }
                pos += 1;
            }
        }
        if !ok {
            continue;
        }
        // A fourth segment: a JWE or something else dotted.
        if bytes.get(ends[2]) == Some(&b'.') && bytes.get(ends[2] + 1).is_some_and(|&b| is_b64url(b)) {
            continue;
        }
        let header = hay.get(p..ends[0]).unwrap_or_default();
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header.trim_end_matches('='));
        if !decoded.is_ok_and(|h| h.starts_with(b"{") && memmem::find(&h, b"\"alg\"").is_some()) {
            continue;
        }
        pass.raws.push((p, ends[2]));
        pass.cands.push(Finding {
            kind: Kind::Jwt,
            start: p,
            end: ends[2],
            action,
        });
        at = ends[2];
    }
}

fn is_pem_body(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+/=\r\n \t:,-".contains(&b)
}

/// Private key blocks: a `-----BEGIN … PRIVATE KEY-----` line, the body, and
/// the END line. Without an END line the block runs to the end of the body
/// characters (a truncated key is still a key).
fn scan_private_keys(hay: &str, from: usize, at_end: bool, action: Action, pass: &mut Pass) {
    let bytes = hay.as_bytes();
    let finder = memmem::Finder::new("-----BEGIN ");
    let mut at = from;
    while let Some(i) = bytes.get(at..).and_then(|t| finder.find(t)) {
        let p = at + i;
        at = p + 11;
        let label_start = p + 11;
        let mut q = label_start;
        while q < bytes.len()
            && q - label_start <= 48
            && bytes
                .get(q)
                .is_some_and(|&b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' ')
        {
            q += 1;
        }
        if q + 5 > bytes.len() {
            if !at_end && bytes.get(q..).is_some_and(|rest| b"-----".starts_with(rest)) {
                pass.open = Some(pass.open.map_or(p, |o| o.min(p)));
            }
            continue;
        }
        let label = hay.get(label_start..q).unwrap_or_default();
        if bytes.get(q..q + 5) != Some(b"-----")
            || !(label.ends_with("PRIVATE KEY") || label.ends_with("PRIVATE KEY BLOCK"))
        {
            continue;
        }
        let body_start = q + 5;
        let cap = p + MAX_PRIVATE_KEY_BYTES;
        let mut r = body_start;
        while r < bytes.len() && r < cap && bytes.get(r).is_some_and(|&b| is_pem_body(b)) {
            r += 1;
        }
        let body = bytes.get(body_start..r).unwrap_or_default();
        let end = match memmem::find(body, b"-----END ") {
            Some(k) => {
                let f = body_start + k + 9;
                let mut g = f;
                while g < r
                    && bytes
                        .get(g)
                        .is_some_and(|&b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' ')
                {
                    g += 1;
                }
                if bytes.get(g..g + 5) == Some(b"-----") {
                    Some(g + 5)
                } else if g + 5 > bytes.len() && !at_end {
                    None
                } else {
                    Some(r)
                }
            }
            None => Some(r),
        };
        let growing = !at_end && r == bytes.len() && r < cap;
        let end = match end {
            Some(end) if !(growing && end == r) => end,
            _ => {
                pass.open = Some(pass.open.map_or(p, |o| o.min(p)));
                continue;
            }
        };
        // A truncated block's body ends at its last non-blank byte.
        let trimmed = hay.get(p..end).map_or(end, |t| p + t.trim_end().len());
        pass.raws.push((p, trimmed));
        pass.cands.push(Finding {
            kind: Kind::PrivateKey,
            start: p,
            end: trimmed,
            action,
        });
        at = trimmed.max(at);
    }
}
