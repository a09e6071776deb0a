//! Opaque OAuth 2.0 tokens through RFC 7662 introspection, against an
//! in-process authorization server: active and inactive tokens, audience and
//! scope checks, caching both ways, and an outage that refuses with 503.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use base64::Engine;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::json;

use crate::common::*;

struct AuthServer {
    calls: AtomicUsize,
    down: AtomicBool,
}

async fn authorization_server(state: Arc<AuthServer>) -> std::net::SocketAddr {
    spawn_upstream(move |req: hyper::Request<hyper::body::Incoming>| {
        let state = Arc::clone(&state);
        async move {
            state.calls.fetch_add(1, Ordering::SeqCst);
            if state.down.load(Ordering::SeqCst) {
                return hyper::Response::builder().status(500).body(full("down")).unwrap();
            }
            let expected = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("warden:introspection-secret")
            );
            if req.headers().get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
                return hyper::Response::builder().status(401).body(full("who are you")).unwrap();
            }
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let form = String::from_utf8(body.to_vec()).unwrap();
            let token = form
                .split('&')
                .find_map(|pair| pair.strip_prefix("token="))
                .unwrap_or_default()
                .to_owned();
            let now = jiff::Timestamp::now().as_second();
            let answer = match token.as_str() {
                "tok-active" => json!({"active": true, "sub": "svc-reporting", "tenant": "acme", "exp": now + 600, "aud": "warden", "scope": "chat read"}),
                "tok-other" => json!({"active": true, "sub": "svc-other", "tenant": "acme", "exp": now + 600, "scope": "chat"}),
                "tok-no-scope" => json!({"active": true, "sub": "svc", "tenant": "acme", "exp": now + 600, "scope": "read"}),
                "tok-wrong-aud" => json!({"active": true, "sub": "svc", "tenant": "acme", "exp": now + 600, "aud": ["billing"], "scope": "chat"}),
                "tok-expired" => json!({"active": true, "sub": "svc", "tenant": "acme", "exp": now - 10, "scope": "chat"}),
                _ => json!({"active": false}),
            };
            hyper::Response::builder()
                .header("content-type", "application/json")
                .body(full(answer.to_string()))
                .unwrap()
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tokens_are_introspected_cached_and_fail_closed() {
    let state = Arc::new(AuthServer {
        calls: AtomicUsize::new(0),
        down: AtomicBool::new(false),
    });
    let server = authorization_server(Arc::clone(&state)).await;
    let (chat, fraud) = demo_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client.secret");
    std::fs::write(&secret, "introspection-secret").unwrap();
    let yaml = config(chat, fraud, "").replace(
        "api_keys:",
        &format!(
            "introspection:\n  endpoint: http://{server}/introspect\n  client_id: warden\n  client_secret: {{ file: {} }}\n  audiences: [warden]\n  required_scopes: [chat]\n  negative_cache_ttl: 1m\n  models: [demo-chat]\napi_keys:",
            secret.display()
        ),
    );
    let gw = TestGateway::start(&yaml).await;
    let status = |token: &'static str| {
        let gw = &gw;
        async move {
            post(gw, "/v1/chat/completions", Some(token), &chat_body("demo-chat", false))
                .await
                .status()
        }
    };
    let calls = || state.calls.load(Ordering::SeqCst);

    assert_eq!(status("tok-active").await, StatusCode::OK);
    assert_eq!(calls(), 1);
    assert_eq!(status("tok-active").await, StatusCode::OK);
    assert_eq!(calls(), 1, "an active answer is cached");

    assert_eq!(status("tok-inactive").await, StatusCode::UNAUTHORIZED);
    assert_eq!(status("tok-inactive").await, StatusCode::UNAUTHORIZED);
    assert_eq!(calls(), 2, "an inactive answer is cached too");

    for refused in ["tok-no-scope", "tok-wrong-aud", "tok-expired"] {
        assert_eq!(status(refused).await, StatusCode::UNAUTHORIZED, "{refused}");
    }
    // Keys of our own format are never sent to the authorization server.
    let before = calls();
    assert_eq!(
        status("wdn_aaaaaaaaaaaa_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa_00000000").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(status(ACME).await, StatusCode::OK, "API keys still work");
    assert_eq!(calls(), before);

    // Outage: a token not in the cache is refused with 503, never let through;
    // a cached one keeps working.
    state.down.store(true, Ordering::SeqCst);
    let resp = post(
        &gw,
        "/v1/chat/completions",
        Some("tok-other"),
        &chat_body("demo-chat", false),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "authentication_unavailable");
    assert_eq!(status("tok-active").await, StatusCode::OK);

    let records = gw.audit(11).await;
    assert_eq!(records.len(), 11, "one record per request");
    assert_eq!(records[0]["auth_method"], "oauth_introspection");
    assert_eq!(records[0]["principal"], "svc-reporting");
    assert_eq!(records[0]["tenant"], "acme");
    assert!(records[0]["key_id"].as_str().unwrap().starts_with("oauth-sha256:"));
    let text: String = records.iter().map(|r| r.to_string()).collect();
    assert!(!text.contains("tok-active"), "tokens never reach the audit log");
}
