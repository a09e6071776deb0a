//! Output content policy: precision and recall per detector on the Faker
//! labelled set, and the cost of the output stage per KB.
//!
//!     bench/output/gen.sh              (writes target/pii_dev.jsonl)
//!     cargo bench --bench output
//!
//! Data: `WARDEN_PII_DATA` (default `target/pii_dev.jsonl`, made by
//! `bench/output/gen.sh` from `/work/shared/data/pii/gen_pii.py` with
//! faker==40.63.0). Spans are matched exactly (same detector, same byte
//! span; the file's code-point offsets are converted to byte offsets). A
//! finding that matches no labelled span of its detector is a false
//! positive, also when it lies inside a span of a label no detector covers
//! (PERSON, ADDRESS, DATE_OF_BIRTH). Look-alike negatives: every card and
//! IBAN is also scanned as a copy with its last digit changed (which breaks
//! Luhn and mod 97); a CARD or IBAN finding on that copy is a false
//! positive.
//!
//! Cost: the median time of scanning and redacting a text with every
//! detector on (`redact`), whole and streamed in ~20-byte deltas, divided by
//! the text's size in KB; on clean prose/code and on text with findings.

// A benchmark that cannot set itself up should stop loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::hint::black_box;

use warden::output::{Action, ContentScanner, Kind, Policy};

const DEFAULT_DATA: &str = "target/pii_dev.jsonl";

fn label_kind(label: &str) -> Option<Kind> {
    Some(match label {
        "EMAIL" => Kind::Email,
        "PHONE" => Kind::Phone,
        "CREDIT_CARD" => Kind::Card,
        "US_SSN" => Kind::UsSsn,
        "IBAN" => Kind::Iban,
        "IP_ADDRESS" => Kind::Ip,
        "AWS_ACCESS_KEY_ID" => Kind::AwsAccessKeyId,
        "AWS_SECRET_KEY" => Kind::AwsSecretKey,
        "GITHUB_TOKEN" => Kind::GithubToken,
        "SLACK_TOKEN" => Kind::SlackToken,
        "STRIPE_KEY" => Kind::StripeKey,
        "OPENAI_KEY" => Kind::OpenAiKey,
        "JWT" => Kind::Jwt,
        "PASSWORD" => Kind::Credential,
        _ => return None,
    })
}

struct Row {
    text: String,
    /// `(kind, start, end)` in bytes, covered labels only.
    gold: Vec<(Kind, usize, usize)>,
    dev: bool,
}

fn byte_offset(text: &str, cp: usize) -> usize {
    text.char_indices().nth(cp).map_or(text.len(), |(b, _)| b)
}

fn load(path: &str) -> (Vec<Row>, BTreeMap<String, usize>) {
    let data = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {path}: {e} (run bench/output/gen.sh or set WARDEN_PII_DATA)"));
    let mut uncovered = BTreeMap::new();
    let rows = data
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let text = v["text"].as_str().unwrap().to_owned();
            let mut gold = Vec::new();
            for s in v["spans"].as_array().unwrap() {
                let label = s["label"].as_str().unwrap();
                let start = byte_offset(&text, s["start"].as_u64().unwrap() as usize);
                let end = byte_offset(&text, s["end"].as_u64().unwrap() as usize);
                match label_kind(label) {
                    Some(k) => gold.push((k, start, end)),
                    None => *uncovered.entry(label.to_owned()).or_insert(0) += 1,
                }
            }
            Row {
                text,
                gold,
                dev: v["split"].as_str() == Some("dev"),
            }
        })
        .collect();
    (rows, uncovered)
}

#[derive(Default, Clone, Copy)]
struct Counts {
    tp: usize,
    fp: usize,
    gold: usize,
}

fn score(scanner: &ContentScanner, rows: &[&Row]) -> BTreeMap<Kind, Counts> {
    let mut c: BTreeMap<Kind, Counts> = BTreeMap::new();
    for row in rows {
        for g in &row.gold {
            c.entry(g.0).or_default().gold += 1;
        }
        for f in scanner.scan(&row.text).findings {
            let e = c.entry(f.kind).or_default();
            if row.gold.contains(&(f.kind, f.start, f.end)) {
                e.tp += 1;
            } else {
                e.fp += 1;
            }
        }
    }
    c
}

fn pct(n: usize, d: usize) -> String {
    if d == 0 {
        "–".to_owned()
    } else {
        format!("{:.1}% ({n}/{d})", 100.0 * n as f64 / d as f64)
    }
}

/// Changes the last digit of `text[start..end]`.
fn corrupt(text: &str, start: usize, end: usize) -> Option<String> {
    let span = &text[start..end];
    let (i, d) = span.char_indices().rev().find(|(_, c)| c.is_ascii_digit())?;
    let nd = char::from(b'0' + ((d as u8 - b'0' + 1) % 10));
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..start + i]);
    out.push(nd);
    out.push_str(&text[start + i + 1..]);
    Some(out)
}

fn stream_redact(scanner: &ContentScanner, chunks: &[&str]) -> usize {
    let mut st = scanner.stream();
    let mut out = String::new();
    for c in chunks {
        let _ = st.push(c, &mut out);
    }
    let _ = st.finish(&mut out);
    out.len()
}

fn chunks(text: &str, size: usize) -> Vec<&str> {
    let mut v = Vec::new();
    let mut at = 0;
    while at < text.len() {
        let mut end = (at + size).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        v.push(&text[at..end]);
        at = end;
    }
    v
}

const CLEAN: &str = "To configure the cache, set `cache.ttl` to 300 seconds and restart the service. \
The deployment on 2025-03-14 used image digest sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 \
and commit 4b825dc642cb6eb9a060e54bf8d69288fbee4904. Request id 550e8400-e29b-41d4-a716-446655440000 took 35 ms.\n\n\
```rust\nfn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{}\", v.iter().sum::<u32>());\n}\n```\n\n\
Version 1.24.3 fixes the bug in the token counter; see the changelog for order ORD-48213-XK. \
Große Änderungen: die Übersetzung ist jetzt vollständig. The meeting is at 12:30 in room 4B. \
Here is a summary of the three options, with their trade-offs in latency, cost and operational complexity.\n";

fn main() {
    let path = std::env::var("WARDEN_PII_DATA").unwrap_or_else(|_| DEFAULT_DATA.to_owned());
    let (rows, uncovered) = load(&path);
    let scanner = ContentScanner::new(&Policy::all(Action::Redact)).unwrap();

    println!("# Output content policy: detection and cost\n");
    println!(
        "Command: `cargo bench --bench output` (data: `{path}`, {} rows)\n",
        rows.len()
    );
    let all: Vec<&Row> = rows.iter().collect();
    let dev: Vec<&Row> = rows.iter().filter(|r| r.dev).collect();
    let c_all = score(&scanner, &all);
    let c_dev = score(&scanner, &dev);
    println!("Exact span match, every detector on. `all` = every row; `dev` = the 20% `dev` split only.\n");
    println!("| detector | labelled spans | precision (all) | recall (all) | precision (dev) | recall (dev) |");
    println!("|---|---|---|---|---|---|");
    for kind in Kind::DETECTORS {
        let a = c_all.get(&kind).copied().unwrap_or_default();
        let d = c_dev.get(&kind).copied().unwrap_or_default();
        println!(
            "| `{}` | {} | {} | {} | {} | {} |",
            kind.name(),
            a.gold,
            pct(a.tp, a.tp + a.fp),
            pct(a.tp, a.gold),
            pct(d.tp, d.tp + d.fp),
            pct(d.tp, d.gold)
        );
    }
    let total = c_all.values().fold(Counts::default(), |s, c| Counts {
        tp: s.tp + c.tp,
        fp: s.fp + c.fp,
        gold: s.gold + c.gold,
    });
    println!(
        "| **all covered** | {} | {} | {} | | |",
        total.gold,
        pct(total.tp, total.tp + total.fp),
        pct(total.tp, total.gold)
    );
    println!(
        "\nNot covered (no detector): {}. No labelled data for `private_key` and `connection_string` (unit tests only).",
        uncovered
            .iter()
            .map(|(k, n)| format!("{k} ({n} spans)"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let negatives = rows.iter().filter(|r| r.gold.is_empty()).count();
    let neg_hits = rows
        .iter()
        .filter(|r| r.gold.is_empty() && !scanner.scan(&r.text).findings.is_empty())
        .count();
    println!(
        "\nHard-negative rows (no labelled span: order numbers, SHAs, digests, UUIDs, versions, prose) with any finding: {}",
        pct(neg_hits, negatives)
    );

    let mut corrupted = [(0usize, 0usize); 2];
    for row in &rows {
        for &(k, s, e) in &row.gold {
            let slot = match k {
                Kind::Card => 0,
                Kind::Iban => 1,
                _ => continue,
            };
            let Some(text) = corrupt(&row.text, s, e) else { continue };
            corrupted[slot].0 += 1;
            if scanner
                .scan(&text)
                .findings
                .iter()
                .any(|f| f.kind == k && f.start < e && f.end > s)
            {
                corrupted[slot].1 += 1;
            }
        }
    }
    println!(
        "Look-alikes (last digit changed): cards flagged {}, IBANs flagged {}",
        pct(corrupted[0].1, corrupted[0].0),
        pct(corrupted[1].1, corrupted[1].0)
    );

    // Cost.
    let clean: String = CLEAN.repeat(4);
    let mut findings_text = String::new();
    for row in rows.iter().filter(|r| !r.gold.is_empty()) {
        if findings_text.len() >= 4096 {
            break;
        }
        findings_text.push_str(&row.text);
        findings_text.push('\n');
    }
    println!("\n## Cost per KB of output (every detector on, median)\n");
    println!("| text | size | findings | whole `redact` | streamed, ~20-byte deltas |");
    println!("|---|---|---|---|---|");
    for (name, text) in [
        ("clean prose, code, ids", &clean),
        ("labelled rows with findings", &findings_text),
    ] {
        let kb = text.len() as f64 / 1024.0;
        let n = scanner.scan(text).findings.len();
        let whole = support::median_per_call(50, 41, || {
            black_box(scanner.redact(black_box(text)));
        });
        let parts = chunks(text, 20);
        let streamed = support::median_per_call(50, 41, || {
            black_box(stream_redact(&scanner, black_box(&parts)));
        });
        println!(
            "| {name} | {:.1} KB | {n} | {:.1} µs/KB | {:.1} µs/KB |",
            kb,
            whole * 1e6 / kb,
            streamed * 1e6 / kb
        );
    }
    println!("\nTarget: under 50 µs per KB, median.");
}
