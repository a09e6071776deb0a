//! The output content policy on collected answers: redaction rewrites what
//! the client gets (and the audit hashes what was sent), `block` refuses the
//! answer, and a streamed request to a guarded model is refused rather than
//! relayed unread.

use http::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

const ANSWER: &str = r#"{"id":"chatcmpl-7","object":"chat.completion","model":"demo-chat","choices":[{"index":0,"message":{"role":"assistant","content":"Card 4111 1111 1111 1111, write to ops@acme.example."},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":11,"total_tokens":16}}"#;

async fn guarded_gateway(policy: &str) -> TestGateway {
    let upstream = spawn_upstream(|_req| async {
        hyper::Response::builder()
            .header("content-type", "application/json")
            .body(full(ANSWER))
            .unwrap()
    })
    .await;
    TestGateway::start(&gateway_yaml(
        &format!("  - name: chat\n    url: http://{upstream}\n"),
        &format!("  - name: demo-chat\n    protocol: openai\n    upstream: chat\n    output:\n{policy}"),
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redacted_answers_reach_the_client_rewritten_and_are_audited() {
    let gw = guarded_gateway("      detectors: { card: redact, email: flag }\n").await;
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.bytes().await.unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Card [REDACTED:CARD], write to ops@acme.example."
    );
    assert_eq!(body["usage"]["total_tokens"], 16);
    let record = &gw.audit(1).await[0];
    assert_eq!(
        record["output"],
        json!([{"detector":"card","action":"redact","count":1},{"detector":"email","action":"flag","count":1}])
    );
    assert_eq!(record["response_sha256"], sha256_hex(&bytes));
    assert_eq!(record["response_bytes"], bytes.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_answer_is_refused_and_its_usage_still_recorded() {
    let gw = guarded_gateway("      detectors: { card: block }\n").await;
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false)).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"error":{"message":"the response was blocked by the output content policy","type":"content_policy_violation","param":null,"code":"output_blocked"}}"#
    );
    let record = &gw.audit(1).await[0];
    assert_eq!(record["reject_reason"], "output_blocked");
    assert_eq!(record["fault"], "upstream");
    assert_eq!(
        record["output"],
        json!([{"detector":"card","action":"block","count":1}])
    );
    assert_eq!(record["usage"]["completion_tokens"], 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_no_way_around_the_output_policy() {
    let gw = guarded_gateway("      detectors: { card: redact }\n").await;
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", true)).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"error":{"message":"streaming is not available for the model `demo-chat`: its output content policy inspects whole responses; send the request without `stream`","type":"invalid_request_error","param":"stream","code":"stream_not_supported"}}"#
    );
    let record = &gw.audit(1).await[0];
    assert_eq!(record["reject_reason"], "stream_not_supported");
    assert!(record["upstream_status"].is_null());
}
