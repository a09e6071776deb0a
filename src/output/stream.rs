//! Streaming scan with a bounded hold-back window.
//!
//! Text arrives in pieces (SSE deltas). The scanner keeps the text it has
//! not released yet, plus [`CONTEXT`] bytes before it that validators may
//! look back at. Once at least `hold + STEP` bytes are pending it scans the
//! pending text, starting the search at the first unreleased byte (the
//! context still counts for look-behind), and picks a release point `S`:
//!
//! - at most `len - hold`, where `hold` ([`ContentScanner::hold_back`]) is
//!   the longest raw match of any enabled regex or deny term plus the
//!   validators' look-ahead: a candidate starting before `S` is then complete
//!   and final, whatever text follows;
//! - never after the opening of a private key block or JWT that is still
//!   growing at the end of the buffer (those can be kilobytes; the window
//!   grows only while one is open, up to [`MAX_HOLD_BACK`]);
//! - never inside a raw match (validated or not), so the whole-text scan and
//!   the next window scan start searching in step at `S`.
//!
//! Findings before `S` are resolved and applied (redactions rewritten) and
//! the text up to `S` is released. Hence for every chunking the findings,
//! the verdict and the released text equal the whole-text scan
//! ([`ContentScanner::scan`], [`Scan::redact`](super::Scan::redact)); the
//! property tests in `tests.rs` hold it to that.
//!
//! On a `block` or `route` finding nothing more is released, not even the
//! text before the finding in the same window; the caller ends the stream
//! with [`halt_event`](super::halt_event). Later pushes are still scanned
//! (releasing nothing), so the final verdict is the strongest action over
//! the whole text — a `route` can still become a `block`.
//!
//! Limits: a private key block longer than 8 KiB or a JWT longer than
//! ~8 KiB is caught only up to that bound; releases come in steps of
//! [`STEP`] bytes, so a client sees text up to `hold + STEP` bytes (about
//! 0.9 KB with every detector on) later than without the filter. The
//! scanner reads text only: an SSE parser in front of it extracts the
//! deltas, and tool-call arguments are a separate stream.

#[cfg(doc)]
use super::MAX_HOLD_BACK;
use std::ops::Deref;
use std::sync::Arc;

use super::detect::{ContentScanner, Pass, resolve};
use super::{Action, Finding, push_tag};

/// Bytes kept before the first unreleased byte, for look-behind (boundary
/// characters, `version 1.2.3.4`).
pub const CONTEXT: usize = 64;
/// Pending bytes beyond the hold-back before a scan runs: scanning on every
/// 20-byte delta would rescan the window ~20 times.
pub const STEP: usize = 512;

/// Why a stream stopped releasing text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Halt {
    /// The strongest halting action seen so far (`Route` or `Block`).
    pub action: Action,
    /// The first halting finding (absolute byte offsets in the stream).
    pub finding: Finding,
}

/// Scans text that arrives in pieces; see the module doc.
#[derive(Debug)]
pub struct StreamScanner<S: Deref<Target = ContentScanner> = Arc<ContentScanner>> {
    scanner: S,
    /// The original text from `base` on.
    buf: String,
    /// Absolute offset of `buf[0]`.
    base: usize,
    /// Absolute offset up to which text has been released.
    done: usize,
    findings: Vec<Finding>,
    halt: Option<Halt>,
    finished: bool,
}

impl<S: Deref<Target = ContentScanner>> StreamScanner<S> {
    pub(crate) fn new(scanner: S) -> StreamScanner<S> {
        StreamScanner {
            scanner,
            buf: String::new(),
            base: 0,
            done: 0,
            findings: Vec::new(),
            halt: None,
            finished: false,
        }
    }

    /// Adds `chunk` and appends to `out` whatever text became safe to
    /// release (redacted). `Err` once the policy halted the stream: send
    /// the error event and stop forwarding.
    pub fn push(&mut self, chunk: &str, out: &mut String) -> Result<(), Halt> {
        if !self.finished {
            self.buf.push_str(chunk);
            let pending = self.buf.len() - (self.done - self.base);
            if pending >= self.scanner.hold_back() + STEP {
                self.step(false, out);
            }
        }
        self.halt.map_or(Ok(()), Err)
    }

    /// The end of the text: releases the rest (redacted) unless halted.
    /// Idempotent.
    pub fn finish(&mut self, out: &mut String) -> Result<(), Halt> {
        if !self.finished {
            self.step(true, out);
            self.finished = true;
        }
        self.halt.map_or(Ok(()), Err)
    }

    /// The findings so far (absolute byte offsets, sorted); after
    /// [`finish`](Self::finish) they equal the whole-text scan's.
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// The verdict so far: the strongest action among the findings.
    pub fn action(&self) -> Option<Action> {
        self.findings.iter().map(|f| f.action).max()
    }

    /// Bytes received but not yet released (nor withheld for good).
    pub fn held(&self) -> usize {
        self.base + self.buf.len() - self.done
    }

    fn step(&mut self, at_end: bool, out: &mut String) {
        let from = self.done - self.base;
        let len = self.buf.len();
        let mut pass = Pass::default();
        self.scanner.candidates(&self.buf, from, at_end, &mut pass);
        let mut s = if at_end {
            len
        } else {
            floor(&self.buf, len.saturating_sub(self.scanner.hold_back()))
        };
        if let Some(open) = pass.open {
            // An open block may hold back at most MAX_HOLD_BACK; past that
            // its scan is capped and no longer open, so this only delays.
            s = s.min(open);
        }
        // INVARIANT: every raw match starts at or after `from`, so moving
        // `s` to a start never goes below `from`.
        loop {
            let mut moved = false;
            for &(a, b) in &pass.raws {
                if a < s && s < b {
                    s = a;
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        let s = s.max(from);
        let kept = resolve(pass.cands.into_iter().filter(|f| f.start < s && f.end <= s).collect());
        for f in &kept {
            if f.action.halts() {
                let abs = Finding {
                    start: f.start + self.base,
                    end: f.end + self.base,
                    ..*f
                };
                match &mut self.halt {
                    Some(h) => h.action = h.action.max(f.action),
                    None => {
                        self.halt = Some(Halt {
                            action: f.action,
                            finding: abs,
                        })
                    }
                }
            }
        }
        if self.halt.is_none() {
            let mut at = from;
            for f in &kept {
                if f.action == Action::Redact {
                    out.push_str(self.buf.get(at..f.start).unwrap_or_default());
                    push_tag(out, f.kind);
                    at = f.end;
                }
            }
            out.push_str(self.buf.get(at..s).unwrap_or_default());
        }
        let base = self.base;
        self.findings.extend(kept.into_iter().map(|f| Finding {
            start: f.start + base,
            end: f.end + base,
            ..f
        }));
        self.done = base + s;
        let cut = floor(&self.buf, s.saturating_sub(CONTEXT));
        self.buf.drain(..cut);
        self.base += cut;
    }
}

/// The largest char boundary of `s` at or below `at`.
fn floor(s: &str, at: usize) -> usize {
    let mut i = at.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
