//! One audit line per request, allowed and rejected alike, whose hashes
//! match the bytes actually sent.

use http::StatusCode;
use serde_json::Value;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_record_per_request_with_matching_hashes() {
    let gw = demo_gateway().await;
    let mut sent = Vec::new();
    // Allowed, streamed, OIP, and three different rejections.
    let requests: Vec<(&str, Option<&str>, String)> = vec![
        (
            "/v1/chat/completions",
            Some(ACME),
            chat_body("demo-chat", false).to_string(),
        ),
        (
            "/v1/chat/completions",
            Some(ACME),
            chat_body("demo-chat", true).to_string(),
        ),
        ("/v2/models/fraud-scorer/infer", Some(ACME), fraud_body(3).to_string()),
        ("/v1/chat/completions", None, chat_body("demo-chat", false).to_string()),
        (
            "/v1/chat/completions",
            Some(GLOBEX),
            chat_body("other-chat", false).to_string(),
        ),
        ("/v1/chat/completions", Some(ACME), "{not json".to_owned()),
    ];
    for (path, key, body) in &requests {
        let mut req = client()
            .post(format!("{}{path}", gw.url))
            .header("content-type", "application/json")
            .header("user-agent", "warden-test")
            .body(body.clone());
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        let bytes = resp.bytes().await.unwrap();
        sent.push((status, request_id, body.clone(), bytes));
    }

    let records = gw.audit(requests.len()).await;
    assert_eq!(records.len(), requests.len(), "exactly one record per request");
    for ((status, request_id, body, bytes), (_, key, _)) in sent.iter().zip(&requests) {
        let record: &Value = records
            .iter()
            .find(|r| r["request_id"] == request_id.as_str())
            .unwrap_or_else(|| panic!("no record for {request_id}"));
        assert_eq!(record["status"], status.as_u16());
        assert_eq!(record["response_sha256"], sha256_hex(bytes), "{request_id}");
        assert_eq!(record["response_bytes"], bytes.len());
        assert_eq!(record["user_agent"], "warden-test");
        assert_eq!(record["client_ip"], "127.0.0.1");
        // Authentication runs before the body is read: a 401 never reads it.
        if key.is_some() {
            assert_eq!(record["request_sha256"], sha256_hex(body.as_bytes()), "{request_id}");
        } else {
            assert_eq!(record["request_sha256"], Value::Null);
        }
        // The key itself never appears, only its id.
        let line = record.to_string();
        assert!(!line.contains(ACME) && !line.contains(GLOBEX));
    }

    let allowed = &records[0];
    assert_eq!(allowed["principal"], "alice@acme.example");
    assert_eq!(allowed["auth_method"], "api_key");
    assert_eq!(allowed["principal_kind"], "key");
    assert_eq!(allowed["key_id"], "demo-acme");
    assert_eq!(allowed["tenant"], "acme");
    assert_eq!(allowed["model"], "demo-chat");
    assert_eq!(allowed["upstream"], "chat");
    assert_eq!(allowed["protocol"], "openai");
    assert_eq!(allowed["upstream_status"], 200);
    assert!(allowed["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(allowed["latency_ms"].as_f64().unwrap() > 0.0);

    let oip = &records[2];
    assert_eq!(oip["protocol"], "oip_v2");
    assert_eq!(oip["model"], "fraud-scorer");

    let unauthenticated = &records[3];
    assert_eq!(unauthenticated["status"], StatusCode::UNAUTHORIZED.as_u16());
    assert_eq!(unauthenticated["principal"], Value::Null);
    assert_eq!(unauthenticated["reject_reason"], "missing_api_key");

    let denied = &records[4];
    assert_eq!(denied["reject_reason"], "model_not_allowed");
    assert_eq!(denied["key_id"], "demo-globex");
    assert_eq!(denied["fault"], "client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let (chat, fraud) = demo_upstreams().await;
    for (extra, want) in [("", "127.0.0.1"), ("  trusted_proxies: [127.0.0.0/8]", "198.51.100.7")] {
        let gw = TestGateway::start(&config(chat, fraud, extra)).await;
        let resp = client()
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(ACME)
            .header("x-forwarded-for", "203.0.113.1, 198.51.100.7")
            .json(&chat_body("demo-chat", false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(gw.audit(1).await[0]["client_ip"], want, "with `{extra}`");
    }
}
