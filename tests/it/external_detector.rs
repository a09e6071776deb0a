//! The external prompt-injection detector (`validation.injection.external`):
//! Lakera Guard v2 and the LLM Guard API, each played by a server in the test
//! that speaks its protocol — it checks the path and Warden's own bearer
//! key, parses the request body, flags any text that mentions
//! "pumpernickel" (which the local detector finds harmless) and answers in
//! the real response shape; a text that mentions "slowpoke" gets its answer
//! two seconds late. Every refusal is checked with its exact body, and the
//! model upstream is shown to have received nothing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::common::*;

const LAKERA_KEY: &str = "lakera-test-key-0123456789";
const LLM_GUARD_KEY: &str = "llm-guard-test-key-0123456789";

/// What a detector received: path, every header, the parsed body.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn json_response(status: u16, body: &Value) -> http::Response<TestBody> {
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .unwrap()
}

/// A detector server: checks the path and the key, records what it got and
/// answers with `judge(body)` — or 400 on a body it cannot parse.
async fn detector(
    path: &'static str,
    key: &'static str,
    log: Log,
    judge: fn(&Value) -> Option<(bool, Value)>,
) -> SocketAddr {
    spawn_upstream(move |req: hyper::Request<hyper::body::Incoming>| {
        let log = Arc::clone(&log);
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            let parsed: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            log.lock().unwrap().push(Seen {
                path: parts.uri.path().to_owned(),
                headers: parts
                    .headers
                    .iter()
                    .map(|(n, v)| {
                        (
                            n.as_str().to_owned(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
                body: parsed.clone(),
            });
            if parts.uri.path() != path {
                return json_response(404, &json!({"detail": "Not Found"}));
            }
            let expected = format!("Bearer {key}");
            if parts.headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
                return json_response(401, &json!({"detail": "Invalid authentication credentials"}));
            }
            let Some((slow, answer)) = judge(&parsed) else {
                return json_response(400, &json!({"detail": "invalid request body"}));
            };
            if slow {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            json_response(200, &answer)
        }
    })
    .await
}

/// Lakera Guard v2: `{"messages":[{"role","content"}],"breakdown":bool}` →
/// `{"flagged":bool,"breakdown":[…]}` (the breakdown only when asked).
fn lakera_judge(body: &Value) -> Option<(bool, Value)> {
    let messages = body.get("messages")?.as_array()?;
    let mut flagged = false;
    let mut slow = false;
    for m in messages {
        let role = m.get("role")?.as_str()?;
        if !["system", "user", "assistant"].contains(&role) {
            return None;
        }
        let content = m.get("content")?.as_str()?;
        flagged |= content.contains("pumpernickel");
        slow |= content.contains("slowpoke");
    }
    let mut answer = json!({ "flagged": flagged });
    if body.get("breakdown").and_then(Value::as_bool) == Some(true) {
        answer["breakdown"] = json!([
            {"project_id": "project-7539648934", "policy_id": "policy-a2412e48-42eb-4e39-b6d8-8591171d48f2",
             "detector_id": "detector-lakera-default-prompt-attack", "detector_type": "prompt_attack", "detected": flagged},
            {"project_id": "project-7539648934", "policy_id": "policy-a2412e48-42eb-4e39-b6d8-8591171d48f2",
             "detector_id": "detector-lakera-pii-email", "detector_type": "pii/email", "detected": false},
        ]);
    }
    Some((slow, answer))
}

/// The LLM Guard API: `{"prompt"}` → `{"sanitized_prompt","is_valid","scanners"}`.
fn llm_guard_judge(body: &Value) -> Option<(bool, Value)> {
    let prompt = body.get("prompt")?.as_str()?;
    let injection = prompt.contains("pumpernickel");
    Some((
        prompt.contains("slowpoke"),
        json!({
            "sanitized_prompt": prompt,
            "is_valid": !injection,
            "scanners": {"PromptInjection": if injection { 0.97 } else { -1.0 }, "Toxicity": 0.0},
        }),
    ))
}

struct Setup {
    gw: TestGateway,
    received: Arc<AtomicUsize>,
    lakera: Log,
    llm_guard: Log,
}

/// A model per case, each named after its detector settings.
async fn setup() -> Setup {
    let received = Arc::new(AtomicUsize::new(0));
    let lakera: Log = Arc::default();
    let llm_guard: Log = Arc::default();
    let up = counting_upstream(Arc::clone(&received)).await;
    let lk = detector("/v2/guard", LAKERA_KEY, Arc::clone(&lakera), lakera_judge).await;
    let lg = detector(
        "/analyze/prompt",
        LLM_GUARD_KEY,
        Arc::clone(&llm_guard),
        llm_guard_judge,
    )
    .await;
    let lakera_at = |extra: &str| {
        format!(
            "{{ kind: lakera, url: \"http://{lk}/v2/guard\", api_key: {{ file: lakera.key }}, timeout: 300ms{extra} }}"
        )
    };
    let llm_guard_at = |extra: &str| {
        format!(
            "{{ kind: llm_guard, url: \"http://{lg}\", api_key: {{ file: llm-guard.key }}, timeout: 300ms{extra} }}"
        )
    };
    let model = |name: &str, protocol: &str, action: &str, external: String| {
        format!(
            "  - name: {name}\n    protocol: {protocol}\n    upstream: up\n    validation:\n      injection: {{ action: {action}, external: {external} }}\n"
        )
    };
    let models = [
        model("lakera-block", "openai", "block", lakera_at("")),
        model("lakera-flag", "openai", "flag", lakera_at("")),
        model("lakera-open", "openai", "block", lakera_at(", fail: open")),
        model("lakera-closed", "openai", "block", lakera_at(", fail: closed")),
        model("lakera-oip", "oip_v2", "block", lakera_at("")),
        model("llm-guard-block", "openai", "block", llm_guard_at("")),
        model("llm-guard-flag", "openai", "flag", llm_guard_at("")),
        model("llm-guard-open", "openai", "block", llm_guard_at(", fail: open")),
        model("llm-guard-closed", "openai", "block", llm_guard_at("")),
        // The detector answers 404 on this path: no usable answer.
        model(
            "lakera-wrong-path",
            "openai",
            "block",
            format!("{{ kind: lakera, url: \"http://{lk}/v1/guard\", api_key: {{ file: lakera.key }} }}"),
        ),
    ]
    .concat();
    let yaml = gateway_yaml(&format!(r#"  - {{ name: up, url: "http://{up}" }}"#), &models);
    // The keys must exist before the config is loaded, in files beside it.
    let gw = TestGateway::start_with_files(
        &yaml,
        &[
            ("lakera.key", &format!("{LAKERA_KEY}\n")),
            ("llm-guard.key", LLM_GUARD_KEY),
        ],
    )
    .await;
    Setup {
        gw,
        received,
        lakera,
        llm_guard,
    }
}

async fn chat(gw: &TestGateway, model: &str, messages: Value) -> (StatusCode, Value) {
    let body = json!({"model": model, "max_tokens": 8, "messages": messages});
    let resp = post(gw, "/v1/chat/completions", Some(ACME), &body).await;
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// The `injection_external` verdict of the `n`th audit record (1-based).
async fn external_verdict(gw: &TestGateway, n: usize) -> (Value, Value) {
    let records = gw.audit(n).await;
    let record = records[n - 1].clone();
    let verdict = record["validation"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["check"] == "injection_external")
        .cloned()
        .unwrap_or(Value::Null);
    (record, verdict)
}

fn injection_error(place: &str) -> Value {
    json!({"error": {
        "message": format!("the request was refused: the text at `{place}` looks like a prompt injection"),
        "type": "invalid_request_error",
        "param": place,
        "code": "prompt_injection_detected",
    }})
}

const UNAVAILABLE: &str =
    "the request could not be checked for prompt injection: the detector is unavailable, try again shortly";

fn unavailable_error() -> Value {
    json!({"error": {"message": UNAVAILABLE, "type": "api_error", "param": null, "code": "detector_unavailable"}})
}

/// No detector request carries the caller's key, and each carries its own.
fn only_own_keys(log: &Log, key: &str) {
    let seen = log.lock().unwrap();
    assert!(!seen.is_empty());
    for s in seen.iter() {
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {key}").as_str()),
            "{s:?}"
        );
        assert!(s.header("x-api-key").is_none(), "{s:?}");
        for (name, value) in &s.headers {
            assert!(
                !value.contains(ACME),
                "the caller's key reached the detector in `{name}`"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lakera_flags_block_with_the_local_refusal_and_clean_texts_pass_with_their_roles() {
    let s = setup().await;
    let gw = &s.gw;

    // Flagged: the local detector's 400, and the model sees nothing.
    let (status, body) = chat(gw, "lakera-block", user("Tell me about pumpernickel bread.")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body, injection_error("messages[0].content"));
    assert_eq!(s.received.load(Ordering::SeqCst), 0);
    let (record, verdict) = external_verdict(gw, 1).await;
    assert_eq!(
        verdict,
        json!({"check": "injection_external", "result": "block", "reason": "lakera flagged prompt_attack (1 text)"})
    );
    assert_eq!(record["reject_reason"], "prompt_injection_detected");
    // The local detector ran first and passed.
    assert!(
        record["validation"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["check"] == "injection" && v["result"] == "pass"),
        "{record}"
    );

    // Clean: passes, and Lakera got every text with its role, and the breakdown asked for.
    let messages = json!([
        {"role": "system", "content": "You are a baker."},
        {"role": "user", "content": "How long should rye dough rest?"},
    ]);
    let (status, _) = chat(gw, "lakera-block", messages).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.received.load(Ordering::SeqCst), 1);
    let (_, verdict) = external_verdict(gw, 2).await;
    assert_eq!(
        verdict,
        json!({"check": "injection_external", "result": "pass", "reason": "lakera: not flagged (2 texts)"})
    );
    let last = s.lakera.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.path, "/v2/guard");
    assert_eq!(
        last.body,
        json!({"messages": [
            {"role": "system", "content": "You are a baker."},
            {"role": "user", "content": "How long should rye dough rest?"},
        ], "breakdown": true})
    );

    // Several texts, one flagged: the request as a whole is at fault.
    let messages = json!([
        {"role": "system", "content": "You are a baker."},
        {"role": "user", "content": "And pumpernickel?"},
    ]);
    let (status, body) = chat(gw, "lakera-block", messages).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body, injection_error("messages"));
    assert_eq!(s.received.load(Ordering::SeqCst), 1);

    only_own_keys(&s.lakera, LAKERA_KEY);
    // The key is in no audit record.
    let audit = std::fs::read_to_string(&gw.audit_path).unwrap();
    assert!(!audit.contains(LAKERA_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_guard_flags_block_and_clean_texts_pass() {
    let s = setup().await;
    let gw = &s.gw;

    let (status, body) = chat(gw, "llm-guard-block", user("Tell me about pumpernickel bread.")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body, injection_error("messages[0].content"));
    assert_eq!(s.received.load(Ordering::SeqCst), 0);
    let (_, verdict) = external_verdict(gw, 1).await;
    assert_eq!(
        verdict,
        json!({"check": "injection_external", "result": "block", "score": 0.97,
               "reason": "llm_guard flagged PromptInjection 0.97 (1 text)"})
    );

    let messages = json!([
        {"role": "system", "content": "You are a baker."},
        {"role": "user", "content": "How long should rye dough rest?"},
    ]);
    let (status, _) = chat(gw, "llm-guard-block", messages).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.received.load(Ordering::SeqCst), 1);
    let (_, verdict) = external_verdict(gw, 2).await;
    assert_eq!(
        verdict,
        json!({"check": "injection_external", "result": "pass", "score": -1.0,
               "reason": "llm_guard: not flagged (2 texts)"})
    );
    // One prompt: the texts the model reads, in order.
    let last = s.llm_guard.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.path, "/analyze/prompt");
    assert_eq!(
        last.body,
        json!({"prompt": "You are a baker.\n\nHow long should rye dough rest?"})
    );

    only_own_keys(&s.llm_guard, LLM_GUARD_KEY);
    assert!(s.lakera.lock().unwrap().is_empty());
    let audit = std::fs::read_to_string(&gw.audit_path).unwrap();
    assert!(!audit.contains(LLM_GUARD_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_action_flag_a_flagged_text_passes_and_the_audit_carries_the_verdict() {
    let s = setup().await;
    let gw = &s.gw;
    let (status, body) = chat(gw, "lakera-flag", user("Tell me about pumpernickel bread.")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["choices"][0]["message"]["content"], "ok");
    let (record, verdict) = external_verdict(gw, 1).await;
    assert_eq!(
        verdict,
        json!({"check": "injection_external", "result": "flag", "reason": "lakera flagged prompt_attack (1 text)"})
    );
    assert_eq!(record["status"], 200);

    let (status, _) = chat(gw, "llm-guard-flag", user("Tell me about pumpernickel bread.")).await;
    assert_eq!(status, StatusCode::OK);
    let (_, verdict) = external_verdict(gw, 2).await;
    assert_eq!(
        verdict,
        json!({"check": "injection_external", "result": "flag", "score": 0.97,
               "reason": "llm_guard flagged PromptInjection 0.97 (1 text)"})
    );
    assert_eq!(s.received.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detector_that_times_out_fails_closed_with_503_or_open_with_the_error_recorded() {
    let s = setup().await;
    let gw = &s.gw;

    // Closed (the default, and said outright): 503, nothing forwarded.
    for (i, model) in ["lakera-closed", "llm-guard-closed"].into_iter().enumerate() {
        let started = std::time::Instant::now();
        let resp = post(
            gw,
            "/v1/chat/completions",
            Some(ACME),
            &json!({"model": model, "max_tokens": 8, "messages": user("Explain slowpoke fermentation.")}),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "{model}");
        assert_eq!(resp.headers()["x-should-retry"], "true");
        assert_eq!(resp.json::<Value>().await.unwrap(), unavailable_error(), "{model}");
        assert!(started.elapsed() < Duration::from_millis(1500), "the timeout held");
        assert_eq!(s.received.load(Ordering::SeqCst), 0, "{model}");
        let (record, verdict) = external_verdict(gw, i + 1).await;
        let kind = if i == 0 { "lakera" } else { "llm_guard" };
        assert_eq!(
            verdict,
            json!({"check": "injection_external", "result": "error",
                   "reason": format!("{kind}: no answer within 300ms; failed closed")})
        );
        assert_eq!(record["reject_reason"], "detector_unavailable");
        assert_eq!(
            record["reject_detail"],
            format!("{kind}: no answer within 300ms; failed closed")
        );
        assert_eq!(record["fault"], "gateway");
    }

    // Open: the request goes on, the verdict records the error.
    for (i, model) in ["lakera-open", "llm-guard-open"].into_iter().enumerate() {
        let (status, _) = chat(gw, model, user("Explain slowpoke fermentation.")).await;
        assert_eq!(status, StatusCode::OK, "{model}");
        assert_eq!(s.received.load(Ordering::SeqCst), i + 1);
        let (record, verdict) = external_verdict(gw, i + 3).await;
        let kind = if i == 0 { "lakera" } else { "llm_guard" };
        assert_eq!(
            verdict,
            json!({"check": "injection_external", "result": "error",
                   "reason": format!("{kind}: no answer within 300ms; failed open")})
        );
        assert_eq!(record["status"], 200);
    }

    let metrics = client()
        .get(format!("{}/metrics", gw.admin_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (model, kind) in [
        ("lakera-closed", "lakera"),
        ("llm-guard-closed", "llm_guard"),
        ("lakera-open", "lakera"),
        ("llm-guard-open", "llm_guard"),
    ] {
        let line = format!(
            "warden_injection_detector_failures_total{{model=\"{model}\",kind=\"{kind}\",reason=\"timeout\"}} 1"
        );
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    assert!(!metrics.contains(LAKERA_KEY) && !metrics.contains(LLM_GUARD_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detector_error_status_fails_closed_and_oip_routes_get_their_own_error_format() {
    let s = setup().await;
    let gw = &s.gw;

    // A 404 from the detector is no answer.
    let (status, body) = chat(gw, "lakera-wrong-path", user("How long should rye dough rest?")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, unavailable_error());
    let (_, verdict) = external_verdict(gw, 1).await;
    assert_eq!(
        verdict,
        json!({"check": "injection_external", "result": "error", "reason": "lakera: status 404; failed closed"})
    );
    assert_eq!(s.received.load(Ordering::SeqCst), 0);

    // OIP v2: every BYTES string is a user message.
    let infer = |texts: &[&str]| json!({"inputs": [{"name": "text", "shape": [texts.len()], "datatype": "BYTES", "data": texts}]});
    let resp = post(gw, "/v2/models/lakera-oip/infer", Some(ACME), &infer(&["pumpernickel"])).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"error":"the request was refused: the text at `inputs.text[0]` looks like a prompt injection"}"#
    );
    assert_eq!(s.received.load(Ordering::SeqCst), 0);
    let resp = post(gw, "/v2/models/lakera-oip/infer", Some(ACME), &infer(&["rye", "spelt"])).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(s.received.load(Ordering::SeqCst), 1);
    let last = s.lakera.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        last.body,
        json!({"messages": [{"role": "user", "content": "rye"}, {"role": "user", "content": "spelt"}], "breakdown": true})
    );
    let resp = post(gw, "/v2/models/lakera-oip/infer", Some(ACME), &infer(&["slowpoke"])).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.text().await.unwrap(), format!(r#"{{"error":"{UNAVAILABLE}"}}"#));
    assert_eq!(s.received.load(Ordering::SeqCst), 1);
    only_own_keys(&s.lakera, LAKERA_KEY);
}
