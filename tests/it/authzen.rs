//! An external AuthZEN PDP as the policy engine, against an in-process
//! server speaking the AuthZEN evaluation API: its decisions are enforced,
//! and a PDP that fails, times out or answers nonsense means deny with the
//! reason recorded.

use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::common::*;

/// An AuthZEN PDP: `POST /access/v1/evaluation`. It permits a subject of
/// tenant acme to invoke `demo-chat` (and any `use`/`access`), nothing else;
/// a `mode` path prefix makes it fail instead.
async fn pdp() -> std::net::SocketAddr {
    spawn_upstream(|req: hyper::Request<hyper::body::Incoming>| async move {
        let path = req.uri().path().to_owned();
        let body: Value = serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes()).unwrap();
        // The request has AuthZEN's shape.
        assert!(
            body["subject"]["type"].is_string() && body["subject"]["properties"].is_object(),
            "{body}"
        );
        let decision = match path.as_str() {
            "/access/v1/evaluation" => {
                let acme = body["subject"]["properties"]["tenant"] == "acme";
                match body["action"]["name"].as_str() {
                    Some("invoke") => acme && body["resource"]["id"] == "demo-chat",
                    _ => true,
                }
            }
            "/broken/access/v1/evaluation" => {
                return hyper::Response::builder().status(503).body(full("down")).unwrap();
            }
            "/nonsense/access/v1/evaluation" => {
                return hyper::Response::builder()
                    .header("content-type", "application/json")
                    .body(full(r#"{"decision":"yes"}"#))
                    .unwrap();
            }
            _ => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                true
            }
        };
        hyper::Response::builder()
            .header("content-type", "application/json")
            .body(full(json!({ "decision": decision }).to_string()))
            .unwrap()
    })
    .await
}

async fn gateway(url: String) -> TestGateway {
    let (chat, fraud) = demo_upstreams().await;
    let yaml = config(chat, fraud, "").replace(
        "api_keys:",
        &format!("policy:\n  authzen:\n    url: {url}\n    timeout: 300ms\napi_keys:"),
    );
    TestGateway::start(&yaml).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authzen_decisions_are_enforced() {
    let server = pdp().await;
    let gw = gateway(format!("http://{server}")).await;
    assert_eq!(
        post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        post(
            &gw,
            "/v1/chat/completions",
            Some(GLOBEX),
            &chat_body("demo-chat", false)
        )
        .await
        .status(),
        StatusCode::FORBIDDEN
    );
    let records = gw.audit(2).await;
    assert_eq!(records[0]["decisions"][0]["engine"], "authzen");
    assert_eq!(records[1]["reject_reason"], "policy_denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_authzen_pdp_means_deny_with_the_reason_recorded() {
    let server = pdp().await;
    for (prefix, reason) in [
        ("broken", "status 503"),
        ("nonsense", "no boolean `decision`"),
        ("slow", "timeout"),
    ] {
        let gw = gateway(format!("http://{server}/{prefix}")).await;
        let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false)).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{prefix}");
        let records = gw.audit(1).await;
        assert_eq!(records[0]["decisions"][0]["error"], reason, "{prefix}");
    }
}
