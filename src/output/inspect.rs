//! Stage 8, inspect output: a collected answer is checked against the
//! model's content policy before any of it reaches the client.
//!
//! Every string value of a JSON answer is scanned, not only the fields
//! where a protocol puts the model's text: an answer that carries a secret
//! in `reasoning_content`, in tool-call arguments or in an OIP v2 `BYTES`
//! output is caught the same way, and a new field in an upstream's format
//! is no way around the policy. Object keys are the format's own and are
//! not scanned. An answer that is not JSON is scanned as text. Redactions
//! rewrite the strings in place and the body is serialized again (members
//! keep their order); `block` withholds the whole answer.
//!
//! Streamed answers are not inspected here: until the stream scanner is
//! wired into the relay, a model with an output policy refuses streaming
//! requests (see `pipeline`), so a stream is never a way around it.

use bytes::Bytes;
use http::header;
use serde::Serialize;

use super::{Action, ContentScanner, Scan};
use crate::reject::Reject;
use crate::upstream::{Answer, AnswerBody};

/// What the content policy found in one answer, per detector and action:
/// the audit record's `output` entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutputFinding {
    /// The detector's configuration name (`card`, `aws_access_key_id`, …).
    pub detector: &'static str,
    /// What was done: `flag`, `redact` or `block`.
    pub action: &'static str,
    /// How many spans it matched.
    pub count: u32,
}

/// Applies `scanner` to a collected answer: records every finding in
/// `findings`, rewrites the body when something was redacted, and refuses
/// the answer when a `block` (or `route`) detector matched or when the body
/// cannot be inspected (not UTF-8, or a stream).
pub fn inspect_answer(
    scanner: &ContentScanner,
    answer: &mut Answer,
    findings: &mut Vec<OutputFinding>,
) -> Result<(), Reject> {
    let bytes = match &answer.body {
        AnswerBody::Full(bytes) => bytes,
        // Never forwarded for a model with a policy; refused rather than
        // relayed unread should that ever change.
        AnswerBody::Sse(..) => return Err(Reject::OutputNotInspectable),
    };
    if bytes.is_empty() {
        return Ok(());
    }
    let rewritten = match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(mut json) => {
            let mut redacted = false;
            scan_strings(scanner, &mut json, findings, &mut redacted);
            check_verdict(findings)?;
            if redacted {
                Some(Bytes::from(
                    serde_json::to_vec(&json).map_err(|_| Reject::UpstreamInvalid)?,
                ))
            } else {
                None
            }
        }
        Err(_) => {
            let text = std::str::from_utf8(bytes).map_err(|_| Reject::OutputNotInspectable)?;
            let scan = scanner.scan(text);
            record(&scan, findings);
            check_verdict(findings)?;
            has_redaction(&scan).then(|| Bytes::from(scan.redact(text)))
        }
    };
    if let Some(body) = rewritten {
        // The length changed; hyper writes the new one from the body.
        answer.head.headers.remove(header::CONTENT_LENGTH);
        answer.body = AnswerBody::Full(body);
    }
    Ok(())
}

/// Scans every string value under `value`, redacting in place.
fn scan_strings(
    scanner: &ContentScanner,
    value: &mut serde_json::Value,
    findings: &mut Vec<OutputFinding>,
    redacted: &mut bool,
) {
    match value {
        serde_json::Value::String(text) => {
            let scan = scanner.scan(text);
            if scan.findings.is_empty() {
                return;
            }
            record(&scan, findings);
            if has_redaction(&scan) {
                *text = scan.redact(text);
                *redacted = true;
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                scan_strings(scanner, item, findings, redacted);
            }
        }
        serde_json::Value::Object(members) => {
            for (_, member) in members.iter_mut() {
                scan_strings(scanner, member, findings, redacted);
            }
        }
        _ => {}
    }
}

fn has_redaction(scan: &Scan) -> bool {
    scan.findings.iter().any(|f| f.action == Action::Redact)
}

/// Adds a scan's findings to the per-detector counts.
fn record(scan: &Scan, findings: &mut Vec<OutputFinding>) {
    for f in &scan.findings {
        let (detector, action) = (f.kind.name(), f.action.name());
        match findings
            .iter_mut()
            .find(|o| o.detector == detector && o.action == action)
        {
            Some(entry) => entry.count = entry.count.saturating_add(1),
            None => findings.push(OutputFinding {
                detector,
                action,
                count: 1,
            }),
        }
    }
}

/// Refuses the answer when any finding halts it.
fn check_verdict(findings: &[OutputFinding]) -> Result<(), Reject> {
    let halted = findings
        .iter()
        .filter_map(|f| Action::parse(f.action))
        .any(Action::halts);
    if halted { Err(Reject::OutputBlocked) } else { Ok(()) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::output::{Kind, Policy};
    use std::time::Duration;

    fn answer(body: &str) -> Answer {
        let mut head = http::Response::new(()).into_parts().0;
        head.headers.insert(header::CONTENT_LENGTH, body.len().into());
        Answer {
            head,
            body: AnswerBody::Full(Bytes::from(body.to_owned())),
            usage: None,
            latency: Duration::ZERO,
        }
    }

    fn body(answer: &Answer) -> &[u8] {
        match &answer.body {
            AnswerBody::Full(b) => b,
            AnswerBody::Sse(..) => panic!("not collected"),
        }
    }

    fn scanner(policy: Policy) -> ContentScanner {
        ContentScanner::new(&policy).unwrap()
    }

    const CHAT: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Your card is 4111 1111 1111 1111, key AKIAIOSFODNN7REALKEY."},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":9,"total_tokens":12}}"#;

    #[test]
    fn redactions_rewrite_the_string_and_drop_the_stale_length() {
        let s = scanner(
            Policy::new()
                .with(Kind::Card, Action::Redact)
                .with(Kind::AwsAccessKeyId, Action::Redact),
        );
        let mut a = answer(CHAT);
        let mut found = Vec::new();
        inspect_answer(&s, &mut a, &mut found).unwrap();
        assert_eq!(
            std::str::from_utf8(body(&a)).unwrap(),
            r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Your card is [REDACTED:CARD], key [REDACTED:AWS_ACCESS_KEY_ID]."},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":9,"total_tokens":12}}"#
        );
        assert!(a.head.headers.get(header::CONTENT_LENGTH).is_none());
        assert_eq!(
            found,
            vec![
                OutputFinding {
                    detector: "card",
                    action: "redact",
                    count: 1
                },
                OutputFinding {
                    detector: "aws_access_key_id",
                    action: "redact",
                    count: 1
                },
            ]
        );
    }

    #[test]
    fn a_block_refuses_the_answer_and_still_records_what_was_found() {
        let s = scanner(
            Policy::new()
                .with(Kind::Card, Action::Redact)
                .with(Kind::AwsAccessKeyId, Action::Block),
        );
        let mut a = answer(CHAT);
        let mut found = Vec::new();
        assert_eq!(inspect_answer(&s, &mut a, &mut found), Err(Reject::OutputBlocked));
        assert_eq!(found.len(), 2);
        assert!(
            found
                .iter()
                .any(|f| f.detector == "aws_access_key_id" && f.action == "block")
        );
    }

    #[test]
    fn flags_and_clean_answers_leave_the_bytes_alone() {
        let s = scanner(Policy::new().with(Kind::Card, Action::Flag));
        let mut a = answer(CHAT);
        let mut found = Vec::new();
        inspect_answer(&s, &mut a, &mut found).unwrap();
        assert_eq!(body(&a), CHAT.as_bytes());
        assert!(a.head.headers.get(header::CONTENT_LENGTH).is_some());
        assert_eq!(
            found,
            vec![OutputFinding {
                detector: "card",
                action: "flag",
                count: 1
            }]
        );

        let clean = r#"{"choices":[{"message":{"content":"Order 1234-5678 ships on 2026-12-03."}}]}"#;
        let mut a = answer(clean);
        let mut found = Vec::new();
        inspect_answer(&scanner(Policy::all(Action::Block)), &mut a, &mut found).unwrap();
        assert_eq!(body(&a), clean.as_bytes());
        assert!(found.is_empty());
    }

    #[test]
    fn secrets_outside_the_content_field_are_caught_too() {
        // Tool-call arguments (a JSON string inside the JSON) and a field the
        // OpenAI format does not have.
        let text = r#"{"choices":[{"message":{"content":null,"reasoning_content":"use 4111111111111111","tool_calls":[{"type":"function","function":{"name":"pay","arguments":"{\"card\":\"4111 1111 1111 1111\"}"}}]}}]}"#;
        let mut a = answer(text);
        let mut found = Vec::new();
        inspect_answer(
            &scanner(Policy::new().with(Kind::Card, Action::Redact)),
            &mut a,
            &mut found,
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_slice(body(&a)).unwrap();
        let message = &json["choices"][0]["message"];
        assert_eq!(message["reasoning_content"], "use [REDACTED:CARD]");
        assert_eq!(
            message["tool_calls"][0]["function"]["arguments"],
            r#"{"card":"[REDACTED:CARD]"}"#
        );
        assert_eq!(
            found,
            vec![OutputFinding {
                detector: "card",
                action: "redact",
                count: 2
            }]
        );
    }

    #[test]
    fn text_answers_are_scanned_as_text_and_binary_ones_refused() {
        let mut a = answer("card 4111 1111 1111 1111\n");
        let mut found = Vec::new();
        inspect_answer(
            &scanner(Policy::new().with(Kind::Card, Action::Redact)),
            &mut a,
            &mut found,
        )
        .unwrap();
        assert_eq!(body(&a), b"card [REDACTED:CARD]\n");

        let mut a = answer("");
        a.body = AnswerBody::Full(Bytes::from_static(b"\xff\xfe binary"));
        assert_eq!(
            inspect_answer(&scanner(Policy::all(Action::Redact)), &mut a, &mut Vec::new()),
            Err(Reject::OutputNotInspectable)
        );
    }
}
