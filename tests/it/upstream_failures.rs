//! An upstream that is down gives 502, one that is too slow 504, in the
//! caller's protocol's error format.

use std::time::{Duration, Instant};

use http::StatusCode;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502() {
    let dead = dead_address().await;
    let gw = TestGateway::start(&config(dead, dead, "")).await;
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false)).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.headers()["x-should-retry"], "true");
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"error":{"message":"the model server could not be reached","type":"api_error","param":null,"code":"upstream_unreachable"}}"#
    );
    let resp = post(&gw, "/v2/models/fraud-scorer/infer", Some(ACME), &fraud_body(1)).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"error":"the model server could not be reached"}"#
    );
    let records = gw.audit(2).await;
    assert_eq!(records[0]["reject_reason"], "upstream_unreachable");
    assert_eq!(records[0]["fault"], "upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_too_slow_is_504() {
    let slow = spawn_upstream(|_req| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        hyper::Response::new(full("{}"))
    })
    .await;
    let gw = TestGateway::start(&config(slow, slow, "")).await;
    let started = Instant::now();
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false)).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    // first_byte_timeout is 500ms in the harness config.
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"error":{"message":"the model server did not answer in time","type":"api_error","param":null,"code":"upstream_timeout"}}"#
    );
    let resp = post(&gw, "/v2/models/fraud-scorer/infer", Some(ACME), &fraud_body(1)).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"error":"the model server did not answer in time"}"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refusing_the_gateway_credential_is_not_a_client_auth_error() {
    let refusing = spawn_upstream(|_req| async {
        hyper::Response::builder()
            .status(401)
            .body(full(r#"{"error":{"message":"bad key"}}"#))
            .unwrap()
    })
    .await;
    let gw = TestGateway::start(&config(refusing, refusing, "")).await;
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false)).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_auth_failed");
}
