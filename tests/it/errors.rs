//! Every rejection, with its exact status and body, in the caller's
//! protocol's error format.

use http::StatusCode;

use crate::common::*;

struct Case {
    name: &'static str,
    path: &'static str,
    key: Option<&'static str>,
    content_type: &'static str,
    body: String,
    status: StatusCode,
    expected: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_have_exact_status_and_body() {
    let gw = demo_gateway().await;
    let chat = chat_body("demo-chat", false).to_string();
    let cases = [
        Case {
            name: "no key",
            path: "/v1/chat/completions",
            key: None,
            content_type: "application/json",
            body: chat.clone(),
            status: StatusCode::UNAUTHORIZED,
            expected: r#"{"error":{"message":"missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`","type":"authentication_error","param":null,"code":"missing_api_key"}}"#,
        },
        Case {
            name: "wrong key",
            path: "/v1/chat/completions",
            key: Some("wdn_demo_acme_wrong"),
            content_type: "application/json",
            body: chat.clone(),
            status: StatusCode::UNAUTHORIZED,
            expected: r#"{"error":{"message":"invalid API key","type":"authentication_error","param":null,"code":"invalid_api_key"}}"#,
        },
        Case {
            name: "wrong key, OIP",
            path: "/v2/models/fraud-scorer/infer",
            key: Some("wdn_demo_acme_wrong"),
            content_type: "application/json",
            body: fraud_body(1).to_string(),
            status: StatusCode::UNAUTHORIZED,
            expected: r#"{"error":"invalid API key"}"#,
        },
        Case {
            name: "model not allowed",
            path: "/v1/chat/completions",
            key: Some(GLOBEX),
            content_type: "application/json",
            body: chat_body("other-chat", false).to_string(),
            status: StatusCode::FORBIDDEN,
            expected: r#"{"error":{"message":"you are not allowed to call the model `other-chat`","type":"permission_error","param":"model","code":"model_not_allowed"}}"#,
        },
        Case {
            name: "model not allowed, OIP",
            path: "/v2/models/fraud-scorer/infer",
            key: Some(GLOBEX),
            content_type: "application/json",
            body: fraud_body(1).to_string(),
            status: StatusCode::FORBIDDEN,
            expected: r#"{"error":"you are not allowed to call the model `fraud-scorer`"}"#,
        },
        Case {
            name: "unknown model",
            path: "/v1/chat/completions",
            key: Some(ACME),
            content_type: "application/json",
            body: chat_body("gpt-9", false).to_string(),
            status: StatusCode::NOT_FOUND,
            expected: r#"{"error":{"message":"the model `gpt-9` does not exist","type":"not_found_error","param":"model","code":"model_not_found"}}"#,
        },
        Case {
            name: "unknown model, OIP",
            path: "/v2/models/nope/infer",
            key: Some(ACME),
            content_type: "application/json",
            body: fraud_body(1).to_string(),
            status: StatusCode::NOT_FOUND,
            expected: r#"{"error":"the model `nope` does not exist"}"#,
        },
        Case {
            name: "an OIP model is not an OpenAI model",
            path: "/v1/chat/completions",
            key: Some(ACME),
            content_type: "application/json",
            body: chat_body("fraud-scorer", false).to_string(),
            status: StatusCode::NOT_FOUND,
            expected: r#"{"error":{"message":"the model `fraud-scorer` does not exist","type":"not_found_error","param":"model","code":"model_not_found"}}"#,
        },
        Case {
            name: "unknown route",
            path: "/v1/engines",
            key: Some(ACME),
            content_type: "application/json",
            body: chat.clone(),
            status: StatusCode::NOT_FOUND,
            expected: r#"{"error":{"message":"unknown route `/v1/engines`","type":"not_found_error","param":null,"code":"unknown_route"}}"#,
        },
        Case {
            name: "not JSON",
            path: "/v1/chat/completions",
            key: Some(ACME),
            content_type: "text/plain",
            body: chat.clone(),
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            expected: r#"{"error":{"message":"unsupported content type: send `Content-Type: application/json`","type":"invalid_request_error","param":null,"code":"unsupported_media_type"}}"#,
        },
        Case {
            name: "broken JSON",
            path: "/v1/chat/completions",
            key: Some(ACME),
            content_type: "application/json",
            body: r#"{"model": "demo-chat", "messages": [}"#.to_owned(),
            status: StatusCode::BAD_REQUEST,
            expected: r#"{"error":{"message":"invalid JSON body: expected a value at line 1 column 37 at 'messages[0]'","type":"invalid_request_error","param":null,"code":"invalid_json"}}"#,
        },
        Case {
            name: "too deep",
            path: "/v1/chat/completions",
            key: Some(ACME),
            content_type: "application/json",
            body: format!(r#"{{"model":"demo-chat","x":{}{}}}"#, "[".repeat(40), "]".repeat(40)),
            status: StatusCode::BAD_REQUEST,
            expected: r#"{"error":{"message":"JSON nesting exceeds the limit of 32 levels","type":"invalid_request_error","param":null,"code":"json_too_deep"}}"#,
        },
        Case {
            name: "no model",
            path: "/v1/chat/completions",
            key: Some(ACME),
            content_type: "application/json",
            body: r#"{"messages":[]}"#.to_owned(),
            status: StatusCode::BAD_REQUEST,
            expected: r#"{"error":{"message":"you must provide a model parameter","type":"invalid_request_error","param":"model","code":"invalid_field"}}"#,
        },
        Case {
            name: "too large for the listener",
            path: "/v1/chat/completions",
            key: Some(ACME),
            content_type: "application/json",
            body: format!(r#"{{"model":"demo-chat","pad":"{}"}}"#, "x".repeat(70 * 1024)),
            status: StatusCode::PAYLOAD_TOO_LARGE,
            expected: r#"{"error":{"message":"request body exceeds 65536 bytes","type":"request_too_large","param":null,"code":"request_too_large"}}"#,
        },
        Case {
            name: "too large for the model",
            path: "/v2/models/fraud-scorer/infer",
            key: Some(ACME),
            content_type: "application/json",
            body: fraud_body(200).to_string(),
            status: StatusCode::PAYLOAD_TOO_LARGE,
            expected: r#"{"error":"request body exceeds 2048 bytes"}"#,
        },
    ];

    for case in &cases {
        let mut req = client()
            .post(format!("{}{}", gw.url, case.path))
            .header("content-type", case.content_type)
            .body(case.body.clone());
        if let Some(key) = case.key {
            req = req.bearer_auth(key);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), case.status, "{}", case.name);
        assert_eq!(resp.headers()["content-type"], "application/json", "{}", case.name);
        assert!(resp.headers().contains_key("x-request-id"), "{}", case.name);
        let body = resp.text().await.unwrap();
        assert_eq!(body, case.expected, "{}", case.name);
    }

    // Every rejection left exactly one audit record, with its reason.
    let records = gw.audit(cases.len()).await;
    assert_eq!(records.len(), cases.len());
    for (record, case) in records.iter().zip(&cases) {
        assert_eq!(record["status"], case.status.as_u16(), "{}", case.name);
        assert!(record["reject_reason"].is_string(), "{}", case.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_tell_sdks_not_to_retry() {
    let gw = demo_gateway().await;
    let resp = post(
        &gw,
        "/v1/chat/completions",
        Some(GLOBEX),
        &chat_body("other-chat", false),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(resp.headers()["x-should-retry"], "false");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_authentication_failures_are_refused_for_a_while() {
    let (chat, fraud) = demo_upstreams().await;
    let yaml = config(chat, fraud, "  trusted_proxies: [127.0.0.1]")
        .replace("max_failures: 1000, window: 1m", "max_failures: 3, window: 1m");
    let gw = TestGateway::start(&yaml).await;
    // Clients told apart by the address their (trusted) proxy reports.
    let from = |ip: &'static str, key: &'static str| {
        client()
            .post(format!("{}/v1/chat/completions", gw.url))
            .header("x-forwarded-for", ip)
            .bearer_auth(key)
            .json(&chat_body("demo-chat", false))
            .send()
    };
    for _ in 0..3 {
        assert_eq!(
            from("198.51.100.1", "guess").await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // Now even the right key is refused from that address...
    let refused = from("198.51.100.1", ACME).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(refused.headers()["x-should-retry"], "false");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_authentication_failures");
    // ...while another address is served.
    assert_eq!(from("198.51.100.2", ACME).await.unwrap().status(), StatusCode::OK);
    let records = gw.audit(5).await;
    assert_eq!(records[3]["reject_reason"], "too_many_authentication_failures");
    assert_eq!(records[3]["client_ip"], "198.51.100.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_can_limit_the_authentication_methods_it_accepts() {
    let (chat, fraud) = demo_upstreams().await;
    let yaml = config(chat, fraud, "").replace(
        "  - name: fraud-scorer\n",
        "  - name: jwt-only\n    protocol: openai\n    upstream: chat\n    upstream_model: demo-chat\n    auth: [jwt]\n  - name: fraud-scorer\n",
    );
    let gw = TestGateway::start(&yaml).await;
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("jwt-only", false)).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "authentication_method_not_accepted");
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false)).await;
    assert_eq!(resp.status(), StatusCode::OK);

    let bad = config(chat, fraud, "").replace("    upstream: chat\n", "    upstream: chat\n    auth: [password]\n");
    let errors = warden::config::Config::parse(&bad, std::path::Path::new("/")).unwrap_err();
    assert!(errors.to_string().contains("unknown method `password`"), "{errors}");
}
