//! The tenant level: the data partition a request touches, read from its
//! payload, decided tenant by tenant — and every cross-tenant attempt
//! refused.

use http::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

/// The harness config with tenant sources on three models: a JSON pointer,
/// an OIP tensor, and a header (mTLS services only).
fn tenant_config(chat: std::net::SocketAddr, fraud: std::net::SocketAddr, policy: &str) -> String {
    config(chat, fraud, "")
        .replace(
            "    upstream_model: demo-chat\n",
            "    upstream_model: demo-chat\n    tenant: { json_pointer: /metadata/merchant_id }\n",
        )
        .replace("    max_body_bytes: 2KiB\n", "    max_body_bytes: 2KiB\n    tenant: { tensor: merchant_id }\n")
        .replace(
            "  - name: fraud-scorer\n",
            "  - name: svc-chat\n    protocol: openai\n    upstream: chat\n    upstream_model: demo-chat\n    tenant: { header: x-tenant-id }\n  - name: fraud-scorer\n",
        )
        .replace("api_keys:", &format!("{policy}api_keys:"))
}

fn scoring(merchants: &[&str]) -> Value {
    let mut body = fraud_body(merchants.len());
    body["inputs"][1]["data"] = json!(merchants);
    body
}

fn chat_for(merchant: Value) -> Value {
    let mut body = chat_body("other-chat", false);
    body["metadata"] = json!({ "merchant_id": merchant });
    body
}

async fn run_table(gw: &TestGateway, engine: &str) {
    /// (what, key, path, body, status, reject reason)
    type Row<'a> = (&'a str, &'a str, &'a str, Value, StatusCode, Option<&'a str>);
    let table: Vec<Row> = vec![
        (
            "own rows",
            ACME,
            "/v2/models/fraud-scorer/infer",
            scoring(&["acme", "acme"]),
            StatusCode::OK,
            None,
        ),
        (
            "another merchant's row",
            ACME,
            "/v2/models/fraud-scorer/infer",
            scoring(&["globex"]),
            StatusCode::FORBIDDEN,
            Some("tenant_not_allowed"),
        ),
        (
            "a batch mixing merchants",
            ACME,
            "/v2/models/fraud-scorer/infer",
            scoring(&["acme", "globex", "acme"]),
            StatusCode::FORBIDDEN,
            Some("tenant_not_allowed"),
        ),
        (
            "confusable tenant id",
            ACME,
            "/v2/models/fraud-scorer/infer",
            scoring(&["\u{0430}cme"]),
            StatusCode::FORBIDDEN,
            Some("tenant_not_allowed"),
        ),
        (
            "own tenant in the body",
            ACME,
            "/v1/chat/completions",
            chat_for(json!("acme")),
            StatusCode::OK,
            None,
        ),
        (
            "another tenant in the body",
            ACME,
            "/v1/chat/completions",
            chat_for(json!("globex")),
            StatusCode::FORBIDDEN,
            Some("tenant_not_allowed"),
        ),
        (
            "tenant field missing",
            ACME,
            "/v1/chat/completions",
            chat_body("other-chat", false),
            StatusCode::BAD_REQUEST,
            Some("tenant_missing"),
        ),
        (
            "tenant field an array",
            ACME,
            "/v1/chat/completions",
            chat_for(json!(["acme", "globex"])),
            StatusCode::BAD_REQUEST,
            Some("tenant_invalid"),
        ),
        (
            "tenant field a number",
            ACME,
            "/v1/chat/completions",
            chat_for(json!(7)),
            StatusCode::BAD_REQUEST,
            Some("tenant_invalid"),
        ),
    ];
    for (what, key, path, body, status, _) in &table {
        let resp = post(gw, path, Some(key), body).await;
        assert_eq!(resp.status(), *status, "{what}");
    }
    // A tenant in a header from a caller that is not an mTLS service.
    let resp = client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(ACME)
        .header("x-tenant-id", "acme")
        .json(&chat_body("svc-chat", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    let records = gw.audit(table.len() + 1).await;
    for ((what, _, _, _, _, reason), record) in table.iter().zip(&records) {
        assert_eq!(record["reject_reason"].as_str(), *reason, "{what}");
    }
    assert_eq!(records[table.len()]["reject_reason"], "tenant_header_not_allowed");
    // The mixed batch was judged row by row: acme allowed, globex denied.
    let mixed = &records[2];
    assert_eq!(mixed["data_tenants"], json!(["acme", "globex"]));
    let tenant_decisions: Vec<(&str, bool)> = mixed["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["level"] == "tenant")
        .map(|d| (d["engine"].as_str().unwrap(), d["allowed"].as_bool().unwrap()))
        .collect();
    assert_eq!(tenant_decisions, [(engine, true), (engine, false)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_tenant_attempts_are_refused_by_the_credentials_own_tenants() {
    let (chat, fraud) = demo_upstreams().await;
    let gw = TestGateway::start(&tenant_config(chat, fraud, "")).await;
    run_table(&gw, "credential").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_tenant_attempts_are_refused_by_cedar() {
    let (chat, fraud) = demo_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("p.cedar");
    std::fs::write(
        &policies,
        r#"
        permit (principal, action == Warden::Action::"invoke", resource);
        permit (principal, action == Warden::Action::"use", resource);
        @id("own-tenants-only")
        permit (principal, action == Warden::Action::"access", resource) when { principal.tenants.contains(resource.name) };
        "#,
    )
    .unwrap();
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policies/warden.cedarschema");
    let policy = format!(
        "policy:\n  cedar:\n    policies: {}\n    schema: {schema}\n",
        policies.display()
    );
    let gw = TestGateway::start(&tenant_config(chat, fraud, &policy)).await;
    run_table(&gw, "cedar").await;
}
