//! An external OPA as the policy engine, against an in-process server that
//! speaks OPA's data API: allow, deny, undefined (deny), and a PDP that
//! fails, times out or answers nonsense — each a refusal with its reason in
//! the audit record.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::common::*;

/// An OPA stand-in. `/v1/data/warden/allow` decides by model: `demo-chat`
/// true, `other-chat` false, anything else undefined; every `use` and
/// `access` is `{"allow": true}`. Other paths fail in their own way.
async fn opa(calls: Arc<AtomicUsize>) -> std::net::SocketAddr {
    spawn_upstream(move |req: hyper::Request<hyper::body::Incoming>| {
        let calls = Arc::clone(&calls);
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let path = req.uri().path().to_owned();
            let body: Value = serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes()).unwrap();
            let input = &body["input"];
            let answer = match path.as_str() {
                "/v1/data/warden/allow" => match (input["action"]["name"].as_str(), input["resource"]["id"].as_str()) {
                    (Some("invoke"), Some("demo-chat")) => json!({"result": true}).to_string(),
                    (Some("invoke"), Some("other-chat")) => json!({"result": false}).to_string(),
                    (Some("invoke"), _) => json!({}).to_string(),
                    _ => json!({"result": {"allow": true}}).to_string(),
                },
                "/v1/data/warden/broken" => {
                    return hyper::Response::builder().status(500).body(full("boom")).unwrap();
                }
                "/v1/data/warden/garbage" => "{not json".to_owned(),
                "/v1/data/warden/slow" => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    json!({"result": true}).to_string()
                }
                _ => json!({}).to_string(),
            };
            hyper::Response::builder()
                .header("content-type", "application/json")
                .body(full(answer))
                .unwrap()
        }
    })
    .await
}

async fn gateway(opa: std::net::SocketAddr, path: &str) -> TestGateway {
    let (chat, fraud) = demo_upstreams().await;
    let yaml = config(chat, fraud, "").replace(
        "api_keys:",
        &format!("policy:\n  opa:\n    url: http://{opa}\n    path: {path}\n    timeout: 300ms\napi_keys:"),
    );
    TestGateway::start(&yaml).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opa_decides_and_undefined_is_a_deny() {
    let calls = Arc::new(AtomicUsize::new(0));
    let server = opa(Arc::clone(&calls)).await;
    let gw = gateway(server, "warden/allow").await;
    let chat = |model: &'static str| {
        let gw = &gw;
        async move {
            post(gw, "/v1/chat/completions", Some(ACME), &chat_body(model, false))
                .await
                .status()
        }
    };
    assert_eq!(chat("demo-chat").await, StatusCode::OK);
    let after_first = calls.load(Ordering::SeqCst);
    assert_eq!(chat("demo-chat").await, StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), after_first, "decisions are cached");
    assert_eq!(chat("other-chat").await, StatusCode::FORBIDDEN);
    let resp = post(&gw, "/v2/models/fraud-scorer/infer", Some(ACME), &fraud_body(1)).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "an undefined result is a deny");

    let records = gw.audit(4).await;
    let endpoint = |r: &Value| r["decisions"].as_array().unwrap()[0].clone();
    assert_eq!(endpoint(&records[0])["engine"], "opa");
    assert_eq!(endpoint(&records[0])["allowed"], true);
    assert_eq!(records[2]["reject_reason"], "policy_denied");
    assert_eq!(records[3]["reject_reason"], "policy_denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_opa_means_deny_with_the_reason_recorded() {
    let server = opa(Arc::new(AtomicUsize::new(0))).await;
    for (path, reason) in [
        ("warden/broken", "status 500"),
        ("warden/garbage", "malformed answer"),
        ("warden/slow", "timeout"),
    ] {
        let gw = gateway(server, path).await;
        let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false)).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
        let records = gw.audit(1).await;
        let decision = &records[0]["decisions"][0];
        assert_eq!(decision["allowed"], false, "{path}");
        assert_eq!(decision["error"], reason, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warden_presents_its_own_credential_to_the_pdp() {
    const TOKEN: &str = "pdp-s3cret-9f2c";
    // A PDP that answers only callers presenting the token.
    let server = spawn_upstream(|req: hyper::Request<hyper::body::Incoming>| async move {
        let presented = req.headers().get(http::header::AUTHORIZATION).cloned();
        if presented.as_ref().and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
            return hyper::Response::builder().status(401).body(full("")).unwrap();
        }
        hyper::Response::builder()
            .header("content-type", "application/json")
            .body(full(json!({"result": true}).to_string()))
            .unwrap()
    })
    .await;
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("opa-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let (chat, fraud) = demo_upstreams().await;
    let with = |credential: &str| {
        config(chat, fraud, "").replace(
            "api_keys:",
            &format!("policy:\n  opa:\n    url: http://{server}\n    path: warden/allow\n{credential}api_keys:"),
        )
    };

    let gw = TestGateway::start(&with(&format!(
        "    credential: {{ file: {} }}\n",
        token_file.display()
    )))
    .await;
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let records = gw.audit(1).await;
    assert_eq!(records[0]["decisions"][0]["allowed"], true);
    let log = std::fs::read_to_string(&gw.audit_path).unwrap();
    assert!(!log.contains(TOKEN), "the PDP credential reached the audit log");

    // Without it, the PDP refuses to answer: a deny that says why.
    let gw = TestGateway::start(&with("")).await;
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false)).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let records = gw.audit(1).await;
    assert_eq!(records[0]["decisions"][0]["error"], "status 401");
}
