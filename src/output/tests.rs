use proptest::prelude::*;

use super::*;

const GH: &str = "ghp_u8jzPde0IgxLd6GncfBAepfJBd0Kh8oOOL8d";
const STRIPE: &str = "sk_live_KLzdocJ2isAjIhKtJ0RlgLKO";
const OPENAI: &str = "sk-proj-mxgJTeKdNnFRIBXuDL7DxtpYlSXpfKtHF4vUCsMehGAkWvj7";
const AWS_ID: &str = "AKIA50CE9UVW53EFR4ED";
const AWS_SECRET: &str = "N5KXSc7Tvo+hBKqFYY+kv5ZJr3J1TWDtkwtDDb/x";
const SLACK: &str = "xoxb-4402685995289-0786666176031-nCkhvMdgaKjIg8xNbe3nNyjO";
const JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
const PEM: &str = "-----BEGIN RSA PRIVATE KEY-----\nGSU8po+799NksnRH9ucAUsdMlHUvTCQCyEZDz/TddJ8HyS5SUkCnD8zRA9a9SkpX\nGSU8po+799NksnRH9ucAUsdMlHUvTCQCyEZDz/TddJ8HyS5SUkCnD8zRA9a9==\n-----END RSA PRIVATE KEY-----";

fn scanner(policy: &Policy) -> ContentScanner {
    ContentScanner::new(policy).unwrap()
}

fn all() -> ContentScanner {
    scanner(&Policy::all(Action::Redact))
}

fn redacted(text: &str) -> String {
    all().redact(text).0
}

/// `(detector, secret inside its sentence, expected redacted sentence)`;
/// the secret is the part the streaming tests split.
fn positives() -> Vec<(Kind, String, String, String)> {
    let r = |k: Kind| format!("[REDACTED:{}]", k.tag());
    let mut v = Vec::new();
    let mut add = |k: Kind, before: &str, secret: &str, after: &str| {
        v.push((
            k,
            format!("{before}{secret}{after}"),
            format!("{before}{}{after}", r(k)),
            secret.to_owned(),
        ));
    };
    add(Kind::Email, "mail ", "jane.doe+x@mail.example.co.uk", " now");
    add(Kind::Email, "Schreib an ", "jürgen.müller@example.de", " — danke");
    add(Kind::Phone, "Call ", "+1-257-586-2270x8437", " today");
    add(Kind::Phone, "tel. ", "+44(0)116 496 0423", ".");
    add(Kind::Phone, "Appelez le ", "03 29 61 88 59", " svp");
    add(Kind::Phone, "ring ", "(0808) 157 0158", "");
    add(Kind::Phone, "Hi, call me on ", "8807725524", ".");
    add(Kind::Phone, "Tel. ", "(08367) 08611", "");
    add(Kind::Phone, "東京 ", "+81 3-1234-5678", " です");
    add(Kind::Card, "card ", "4111 1111 1111 1111", ", thanks");
    add(Kind::Card, "amex ", "378282246310005", ".");
    add(Kind::Card, "jcb ", "180033043353492", ".");
    add(Kind::UsSsn, "SSN ", "512-34-7781", ".");
    add(Kind::Iban, "IBAN ", "DE89 3704 0044 0532 0130 00", " (Girokonto)");
    add(Kind::Iban, "to ", "GB82WEST12345698765432", ".");
    add(Kind::Ip, "Login from ", "91.104.185.92", " failed");
    add(Kind::Ip, "from ", "2001:db8:85a3::8a2e:370:7334", " failed");
    add(Kind::AwsAccessKeyId, "export AWS_ACCESS_KEY_ID=", AWS_ID, "\n");
    add(Kind::AwsSecretKey, "export AWS_SECRET_ACCESS_KEY=", AWS_SECRET, "\n");
    add(Kind::PrivateKey, "key:\n", PEM, "\nkeep it safe");
    add(Kind::Jwt, "Authorization: Bearer ", JWT, "\n");
    add(
        Kind::GithubToken,
        "git remote set-url origin https://",
        GH,
        "@github.com/acme/app.git",
    );
    add(Kind::SlackToken, "SLACK_BOT_TOKEN=", SLACK, "");
    add(Kind::StripeKey, "stripe.api_key = \"", STRIPE, "\"");
    add(Kind::OpenAiKey, "OPENAI_API_KEY=", OPENAI, " # do not commit");
    add(
        Kind::ConnectionString,
        "DATABASE_URL=postgres://app:",
        "S3cr3t-Pa55w0rd",
        "@db.internal:5432/app",
    );
    add(Kind::Credential, "db password is ", "xa#dqHbognE60q", "");
    add(Kind::Credential, "password: ", "(%5EP3kaKiAHP+", "");
    add(Kind::Credential, "api_key: ", "9f8e7d6c5b4a39281706f5e4d3c2b1a0", "\n");
    v
}

#[test]
fn every_positive_is_found_with_its_exact_span_and_redaction() {
    let s = all();
    for (kind, text, want, secret) in positives() {
        let (out, scan) = s.redact(&text);
        assert_eq!(out, want, "{kind}: {text:?}");
        assert_eq!(scan.findings.len(), 1, "{kind}: {text:?} -> {:?}", scan.findings);
        let f = scan.findings[0];
        assert_eq!(f.kind, kind, "{text:?}");
        assert_eq!(&text[f.start..f.end], secret, "{kind}");
        assert_eq!(f.action, Action::Redact);
    }
}

#[test]
fn look_alikes_are_not_findings() {
    let negatives = [
        // Luhn-invalid cards, all-same digits, too-short numbers.
        "card 4111 1111 1111 1112 declined",
        "test 5500 0000 0000 0005 and 0000 0000 0000 0000",
        "1733200000000 ms since the epoch",
        // IBAN with a broken check digit, unknown country.
        "IBAN DE89370400440532013001 or ZZ89370400440532013000",
        // SSNs never issued.
        "ids 000-12-3456, 666-12-3456, 900-12-3456, 123-45-6789",
        // UUIDs, git SHAs, digests.
        "Request id 550e8400-e29b-41d4-a716-446655440000 took 35 ms.",
        "Build 3f2a9b1c0d4e passed; commit 4b825dc642cb6eb9a060e54bf8d69288fbee4904 merged",
        "image digest sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "FROM python@sha256:2bb18b0b16bf1d5bce4a6d6c2c8a0bd7f4a3e3e3b4c8b1f1e1c9f7b5a3c1d2e4",
        // Placeholders.
        "SLACK_BOT_TOKEN=xoxb-your-token-here",
        "AWS_ACCESS_KEY_ID=AKIAXXXXXXXXXXXXXXXX",
        "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "stripe key sk_live_xxxxxxxxxxxxxxxxxxxxxxxx",
        "GITHUB_TOKEN=ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "OPENAI_API_KEY=sk-your-api-key-here-please-replace",
        "password: ********",
        "the password is incorrect, try again",
        "postgres://user:password@localhost/db and postgres://app:${DB_PASSWORD}@db/app",
        "Authorization: Bearer <token>",
        "token = process.env.GITHUB_TOKEN_VALUE",
        // A 40-character string without an AWS key name.
        "checksum N5KXSc7Tvo+hBKqFYY+kv5ZJr3J1TWDtkwtDDb/x",
        // Versions, order numbers, dates, times, MACs, code.
        "Version 1.2.3 fixes the cache bug; version 10.0.19041.1 and release 2.10.3.4 too",
        "Order ORD-48213-XK ships on 2025-03-14; order #123456789 on 14.03.2025 or 03/14/2025",
        "at 12:30:45 from 00:1a:2b:3c:4d:5e via std::fs::read",
        "took 1234567 ms, pi is 3.14159265",
        "order 8807725524 and invoice 1733200000",
        "password = $DB_PASSWORD and secret: ${API_SECRET}",
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
        "eyJhbGciOi... (truncated)",
    ];
    let s = all();
    for text in negatives {
        let scan = s.scan(text);
        let hits: Vec<_> = scan.findings.iter().map(|f| (f.kind, &text[f.start..f.end])).collect();
        assert!(hits.is_empty(), "{text:?} -> {hits:?}");
    }
}

#[test]
fn jwt_header_must_name_an_algorithm() {
    // `eyJ` + base64 of `{"foo":"bar"}`-like JSON without `alg`.
    let text = "x eyJmb28iOiJiYXIiLCJiYXoiOjF9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV y";
    assert!(all().scan(text).findings.is_empty());
}

#[test]
fn truncated_private_key_is_caught_to_the_end_of_its_body() {
    let text = "here:\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\nAAAAAAAB\n";
    assert_eq!(redacted(text), "here:\n[REDACTED:PRIVATE_KEY]\n");
}

#[test]
fn several_findings_and_overlaps() {
    let text = format!("SSN 512-34-7781, mail a@b.io, key {STRIPE}; stripe.api_key = \"{STRIPE}\"");
    assert_eq!(
        redacted(&text),
        "SSN [REDACTED:SSN], mail [REDACTED:EMAIL], key [REDACTED:STRIPE_KEY]; stripe.api_key = \"[REDACTED:STRIPE_KEY]\""
    );
    // JWT beats the generic `Bearer` credential over the same span.
    assert_eq!(redacted(&format!("Bearer {JWT}")), "Bearer [REDACTED:JWT]");
    // A stronger action wins an overlap, even from a generic detector.
    let p = Policy::new()
        .with(Kind::Jwt, Action::Redact)
        .with(Kind::Credential, Action::Block);
    let text = format!("Bearer {JWT}");
    let scan = scanner(&p).scan(&text);
    assert_eq!(
        scan.findings,
        vec![Finding {
            kind: Kind::Credential,
            start: 7,
            end: text.len(),
            action: Action::Block
        }]
    );
    assert_eq!(scan.action(), Some(Action::Block));
}

#[test]
fn actions_flag_block_route() {
    let p = Policy::new()
        .with(Kind::Email, Action::Flag)
        .with(Kind::Card, Action::Block)
        .with(Kind::UsSsn, Action::Route);
    let s = scanner(&p);
    let (out, scan) = s.redact("a@b.io");
    assert_eq!(out, "a@b.io");
    assert_eq!(scan.action(), Some(Action::Flag));
    assert_eq!(s.scan("pay 4111 1111 1111 1111").action(), Some(Action::Block));
    assert_eq!(
        s.scan("SSN 512-34-7781 card 4111111111111111").action(),
        Some(Action::Block)
    );
    assert_eq!(s.scan("SSN 512-34-7781").action(), Some(Action::Route));
    assert_eq!(s.scan("nothing here").action(), None);
    // Detectors that are off find nothing.
    assert!(s.scan("203.0.113.9").findings.is_empty());
}

#[test]
fn deny_terms_are_case_insensitive_and_word_bounded() {
    let p = Policy::new()
        .with_deny_terms(&["Project Falcon", "acme-internal", "C++"], Action::Redact)
        .unwrap();
    let s = scanner(&p);
    assert_eq!(
        s.redact("project FALCON ships; ACME-INTERNAL docs; projects falcon; Project Falconry; xacme-internal")
            .0,
        "[REDACTED:DENY_TERM] ships; [REDACTED:DENY_TERM] docs; projects falcon; Project Falconry; xacme-internal"
    );
    assert_eq!(s.redact("we use C++.").0, "we use [REDACTED:DENY_TERM].");
    assert_eq!(
        s.redact("Grüße vom Project Falcon!").0,
        "Grüße vom [REDACTED:DENY_TERM]!"
    );
}

#[test]
fn policy_reports_every_error() {
    let spec = PolicySpec {
        detectors: vec![
            ("email".into(), "redact".into()),
            ("emial".into(), "redact".into()),
            ("card".into(), "hide".into()),
            ("email".into(), "block".into()),
        ],
        deny_terms: vec!["ok".into(), "  ".into(), "x".repeat(300)],
        deny_action: Some("nuke".into()),
    };
    let err = Policy::from_spec(&spec).unwrap_err();
    assert_eq!(
        err.0,
        vec![
            PolicyError::UnknownDetector("emial".into()),
            PolicyError::UnknownAction {
                detector: "card".into(),
                action: "hide".into()
            },
            PolicyError::DuplicateDetector("email".into()),
            PolicyError::EmptyDenyTerm(1),
            PolicyError::DenyTermTooLong { index: 2, len: 300 },
            PolicyError::UnknownAction {
                detector: "deny_terms".into(),
                action: "nuke".into()
            },
        ]
    );
    assert!(err.to_string().contains("unknown detector `emial`"));
    let ok = PolicySpec {
        detectors: vec![("jwt".into(), "block".into())],
        deny_terms: vec![" falcon ".into()],
        deny_action: None,
    };
    let p = Policy::from_spec(&ok).unwrap();
    assert_eq!(p.action(Kind::Jwt), Some(Action::Block));
    assert_eq!(p.action(Kind::DenyTerm), Some(Action::Redact));
    assert_eq!(p.deny_terms(), ["falcon"]);
    for k in Kind::DETECTORS {
        assert_eq!(Kind::parse(k.name()), Some(k));
    }
}

#[test]
fn halt_event_is_an_openai_error() {
    let v: serde_json::Value =
        serde_json::from_str(halt_event(Action::Block).strip_prefix("data: ").unwrap().trim_end()).unwrap();
    assert_eq!(v["error"]["code"], "output_blocked");
    assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string());
}

// ---- streaming ----

/// Streams `text` cut at `cuts` (byte offsets on char boundaries).
fn stream(s: &ContentScanner, text: &str, cuts: &[usize]) -> (String, Vec<Finding>, Result<(), Halt>) {
    let mut st = s.stream();
    let mut out = String::new();
    let mut at = 0;
    for &c in cuts.iter().chain([text.len()].iter()) {
        let _ = st.push(&text[at..c], &mut out);
        at = c;
    }
    let r = st.finish(&mut out);
    (out, st.findings().to_vec(), r)
}

/// The stream must match the whole-text scan: same findings and verdict;
/// the same text when nothing halts, else a prefix of it that stops before
/// the first halting finding.
fn assert_same(s: &ContentScanner, text: &str, cuts: &[usize]) {
    let whole = s.scan(text);
    let want = whole.redact(text);
    let (out, findings, r) = stream(s, text, cuts);
    assert_eq!(findings, whole.findings, "findings, cuts {cuts:?}, text {text:?}");
    match whole.findings.iter().find(|f| f.action.halts()) {
        None => {
            assert_eq!(out, want, "cuts {cuts:?}");
            assert!(r.is_ok());
        }
        Some(first) => {
            let halt = r.unwrap_err();
            assert_eq!(halt.finding, *first);
            assert_eq!(Some(halt.action), whole.action());
            let before = whole.redact(&text[..first.start]);
            assert!(
                before.starts_with(&out),
                "released {out:?} is not a prefix of {before:?}"
            );
        }
    }
}

fn boundaries(text: &str) -> Vec<usize> {
    (1..text.len()).filter(|&i| text.is_char_boundary(i)).collect()
}

#[test]
fn a_secret_split_across_two_and_three_chunks_is_caught() {
    let s = all();
    // Long filler in front so the stream has released text before the
    // secret arrives, exercising the window rather than one final scan.
    let filler = "The quick brown fox jumps over the lazy dog. ".repeat(30);
    for (kind, text, _, secret) in positives() {
        let text = format!("{filler}{text}");
        let start = text.find(&secret).unwrap();
        let inner: Vec<usize> = boundaries(&secret).into_iter().map(|i| start + i).collect();
        let (a, b, c) = (
            inner[inner.len() / 3],
            inner[inner.len() / 2],
            inner[2 * inner.len() / 3],
        );
        assert_same(&s, &text, &[b]);
        assert_same(&s, &text, &[a, c]);
        let (out, findings, _) = stream(&s, &text, &[a, c]);
        assert!(!out.contains(&secret), "{kind} leaked");
        assert_eq!(findings.len(), 1, "{kind}");
    }
}

#[test]
fn one_byte_chunks_match_the_whole_text() {
    let s = all();
    let text: String = positives().into_iter().map(|p| p.1).collect::<Vec<_>>().join("\n");
    assert_same(&s, &text, &boundaries(&text));
    // Every char its own chunk on a non-ASCII text.
    let text = "Grüße aus München: jürgen@example.de, Tel. +49 (0) 7178 031896 — 東京".to_owned();
    assert_same(&s, &text, &boundaries(&text));
}

#[test]
fn a_blocked_stream_releases_nothing_of_the_secret() {
    for kind in Kind::DETECTORS {
        let s = scanner(&Policy::new().with(kind, Action::Block));
        for (k, text, _, secret) in positives().into_iter().filter(|p| p.0 == kind) {
            let text = format!(
                "{}{text} and more text after it. {}",
                "Some prose. ".repeat(80),
                "More. ".repeat(100)
            );
            let cuts: Vec<usize> = boundaries(&text).into_iter().step_by(17).collect();
            assert_same(&s, &text, &cuts);
            let (out, _, r) = stream(&s, &text, &cuts);
            let halt = r.unwrap_err();
            assert_eq!(halt.action, Action::Block, "{k}");
            assert!(!out.contains(&secret[..secret.len().min(6)]) || text[..halt.finding.start].contains(&secret[..6]));
            assert!(out.len() <= halt.finding.start, "{k}: released past the finding");
        }
    }
}

#[test]
fn route_then_block_upgrades_the_verdict() {
    let p = Policy::new()
        .with(Kind::Email, Action::Route)
        .with(Kind::Card, Action::Block);
    let s = scanner(&p);
    let text = format!(
        "mail a@b.io. {} card 4111 1111 1111 1111 end",
        "filler text ".repeat(200)
    );
    let cuts: Vec<usize> = (1..text.len()).step_by(20).collect();
    assert_same(&s, &text, &cuts);
    let (_, _, r) = stream(&s, &text, &cuts);
    let h = r.unwrap_err();
    assert_eq!((h.action, h.finding.kind), (Action::Block, Kind::Email));
}

#[test]
fn hold_back_is_bounded() {
    let s = all();
    let mut st = s.stream();
    let mut out = String::new();
    let text = "plain words and more plain words ".repeat(500);
    for piece in text.as_bytes().chunks(20) {
        st.push(std::str::from_utf8(piece).unwrap(), &mut out).unwrap();
        assert!(st.held() <= s.hold_back() + STEP + 20, "held {}", st.held());
    }
    st.finish(&mut out).unwrap();
    assert_eq!(out, text);
    // An open private key holds back more, but never past its cap.
    let mut st = s.stream();
    let mut out = String::new();
    st.push("-----BEGIN RSA PRIVATE KEY-----\n", &mut out).unwrap();
    for _ in 0..400 {
        st.push("QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\n", &mut out).unwrap();
        assert!(st.held() <= super::detect::MAX_PRIVATE_KEY_BYTES + s.hold_back() + STEP + 64);
    }
    assert!(!out.contains("BEGIN"));
}

fn piece() -> impl Strategy<Value = String> {
    let mut samples: Vec<String> = positives().into_iter().map(|p| p.1).collect();
    samples.extend(
        [
            "Request id 550e8400-e29b-41d4-a716-446655440000 took 35 ms.",
            "commit 4b825dc642cb6eb9a060e54bf8d69288fbee4904",
            "xoxb-your-token-here",
            "card 4111 1111 1111 1112",
            "Version 1.2.3.4",
            "ORD-48213-XK on 2025-03-14",
            "Grüße, 東京 ",
            "Project Falcon",
            "-----BEGIN RSA PRIVATE KEY-----\nQUJD",
            "eyJhbGciOiJIUzI1NiJ9.eyJz",
            "@",
            ":",
            "-",
            " ",
            "\n",
        ]
        .map(String::from),
    );
    prop_oneof![
        3 => proptest::sample::select(samples),
        2 => "[a-zA-Z0-9 .,:@/+=_-]{0,40}",
        1 => "[ -~äöü東]{0,200}",
    ]
}

/// Compiled once: building the scanners in every proptest case would
/// dominate the test's time in debug builds.
static POLICIES: std::sync::LazyLock<Vec<ContentScanner>> = std::sync::LazyLock::new(policies);

fn policies() -> Vec<ContentScanner> {
    let mixed = Policy::new()
        .with(Kind::Email, Action::Flag)
        .with(Kind::Phone, Action::Redact)
        .with(Kind::Card, Action::Route)
        .with(Kind::Jwt, Action::Redact)
        .with(Kind::PrivateKey, Action::Block)
        .with(Kind::Credential, Action::Redact)
        .with_deny_terms(&["project falcon"], Action::Redact)
        .unwrap();
    let with_terms = Policy::all(Action::Redact)
        .with_deny_terms(&["falcon", "東京"], Action::Redact)
        .unwrap();
    vec![scanner(&with_terms), scanner(&mixed)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// For any text and any chunking, the stream gives the whole-text
    /// findings, verdict and redacted text.
    #[test]
    fn streamed_equals_whole(pieces in proptest::collection::vec(piece(), 0..60), sizes in proptest::collection::vec(1usize..64, 1..200)) {
        let text: String = pieces.concat();
        let mut cuts = Vec::new();
        let mut at = 0;
        for n in sizes.iter().cycle() {
            at += n;
            if at >= text.len() || sizes.is_empty() {
                break;
            }
            let mut c = at;
            while !text.is_char_boundary(c) {
                c += 1;
            }
            if cuts.last() != Some(&c) && c < text.len() {
                cuts.push(c);
            }
            at = c;
        }
        for s in POLICIES.iter() {
            assert_same(s, &text, &cuts);
        }
    }
}
