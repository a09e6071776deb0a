//! Each route is proxied to its upstream, with the right credentials.

use std::sync::{Arc, Mutex};

use http::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_are_proxied() {
    let gw = demo_gateway().await;
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("x-request-id"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("Hello Warden"), "{content}");
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_embeddings_are_proxied() {
    let gw = demo_gateway().await;
    let resp = client()
        .post(format!("{}/v1/completions", gw.url))
        .header("x-api-key", ACME)
        .json(&json!({"model": "demo-chat", "prompt": "Say this is a test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "text_completion");
    assert!(
        body["choices"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Say this is a test")
    );

    let resp = post(
        &gw,
        "/v1/embeddings",
        Some(ACME),
        &json!({"model": "demo-chat", "input": ["a", "b"], "dimensions": 16}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["data"][1]["embedding"].as_array().unwrap().len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_list_shows_only_what_the_caller_may_call() {
    let gw = demo_gateway().await;
    let ids = |body: Value| -> Vec<String> {
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let get = |key: &'static str| client().get(format!("{}/v1/models", gw.url)).bearer_auth(key).send();
    let acme: Value = get(ACME).await.unwrap().json().await.unwrap();
    assert_eq!(ids(acme), ["demo-chat", "other-chat"]);
    let globex: Value = get(GLOBEX).await.unwrap().json().await.unwrap();
    assert_eq!(ids(globex), ["demo-chat"]);
    let anonymous = client().get(format!("{}/v1/models", gw.url)).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oip_inference_metadata_and_health_are_served() {
    let gw = demo_gateway().await;
    let mut request = fraud_body(2);
    // Row 2: a large night-time foreign card-not-present payment.
    request["inputs"][0]["data"] = json!([25.0, 4000.0]);
    request["inputs"][2]["data"] = json!(["US", "BR"]);
    request["inputs"][3]["data"] = json!([14, 3]);
    request["inputs"][4]["data"] = json!([true, false]);
    for path in [
        "/v2/models/fraud-scorer/infer",
        "/v2/models/fraud-scorer/versions/1/infer",
    ] {
        let resp = client()
            .post(format!("{}{path}", gw.url))
            .bearer_auth(ACME)
            .json(&request)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let body: Value = resp.json().await.unwrap();
        let scores: Vec<f64> = body["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let expected = [
            warden::demo::fraud::score(25.0, "m-1", "US", 14, true),
            warden::demo::fraud::score(4000.0, "m-1", "BR", 3, false),
        ];
        for (got, want) in scores.iter().zip(expected) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        assert!(scores[1] > scores[0]);
    }

    let meta: Value = client()
        .get(format!("{}/v2/models/fraud-scorer", gw.url))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["name"], "fraud-scorer");
    for (path, field) in [("/v2/health/live", "live"), ("/v2/health/ready", "ready")] {
        let resp = client()
            .get(format!("{}{path}", gw.url))
            .bearer_auth(GLOBEX)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.json::<Value>().await.unwrap()[field], true);
        // Health routes need a credential unless `anonymous_health` is set.
        let resp = client().get(format!("{}{path}", gw.url)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_health_probes_when_configured() {
    let (chat, fraud) = demo_upstreams().await;
    let gw = TestGateway::start(&config(chat, fraud, "  anonymous_health: true")).await;
    let resp = client()
        .get(format!("{}/v2/health/ready", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // A wrong credential is still an error, never a fallback to anonymous.
    let resp = client()
        .get(format!("{}/v2/health/ready", gw.url))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Everything else still needs a key.
    let resp = client()
        .get(format!("{}/v2/models/fraud-scorer", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

/// An upstream that records the headers and body it receives.
async fn recording_upstream() -> (std::net::SocketAddr, Arc<Mutex<Vec<(http::HeaderMap, Vec<u8>)>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::clone(&seen);
    let addr = spawn_upstream(move |req: hyper::Request<hyper::body::Incoming>| {
        let store = Arc::clone(&store);
        async move {
            use http_body_util::BodyExt;
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await.unwrap().to_bytes();
            store.lock().unwrap().push((parts.headers, bytes.to_vec()));
            hyper::Response::builder()
                .header("content-type", "application/json")
                .header("connection", "x-upstream-private")
                .header("x-upstream-private", "1")
                .body(full(r#"{"object":"chat.completion","choices":[]}"#))
                .unwrap()
        }
    })
    .await;
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_gets_the_gateway_credential_never_the_callers() {
    let (upstream, seen) = recording_upstream().await;
    let (_, fraud) = demo_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("upstream.key");
    std::fs::write(&secret_file, "upstream-secret\n").unwrap();
    let yaml = config(upstream, fraud, "").replace(
        &format!("url: http://{upstream}\n"),
        &format!(
            "url: http://{upstream}\n    credential: {{ file: {} }}\n",
            secret_file.display()
        ),
    );
    let gw = TestGateway::start(&yaml).await;
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(ACME)
        .header("x-api-key", ACME)
        .header("cookie", "session=secret")
        .header("x-request-id", "req-123")
        .header("x-custom", "kept")
        .json(&chat_body("other-chat", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-request-id"], "req-123");
    assert!(
        !resp.headers().contains_key("x-upstream-private"),
        "hop-by-hop header leaked"
    );
    let seen = seen.lock().unwrap();
    let (headers, body) = &seen[0];
    assert_eq!(headers["authorization"], "Bearer upstream-secret");
    assert!(!headers.contains_key("x-api-key"));
    assert!(!headers.contains_key("cookie"));
    assert_eq!(headers["x-request-id"], "req-123");
    assert_eq!(headers["x-custom"], "kept");
    // `other-chat` is known upstream as `demo-chat`.
    let forwarded: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(forwarded["model"], "demo-chat");
}
