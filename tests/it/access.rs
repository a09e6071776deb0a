//! Warden as an AuthZEN PDP for others: `/access/v1/evaluation(s)` on the
//! admin listener, behind the admin token, answered by the demo's Cedar
//! policies (examples/policies/demo.cedar) exactly as the gateway applies
//! them.

use http::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

const TOKEN: &str = "access-token-0123456789abcdef0123456789abcdef";

/// A gateway on the demo policies with an admin token; the temp dir holds
/// the policies and the token.
async fn gateway(with_token: bool) -> (TestGateway, tempfile::TempDir) {
    let (chat, fraud) = demo_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    let (policies, schema) = demo_policy_files(dir.path());
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let token = write("admin.token", TOKEN);
    let admin = if with_token {
        format!("admin:\n  address: 127.0.0.1:0\n  token: {{ file: {token} }}")
    } else {
        "admin:\n  address: 127.0.0.1:0".to_owned()
    };
    let yaml = config(chat, fraud, "")
        .replace("admin:\n  address: 127.0.0.1:0", &admin)
        .replace(
            "api_keys:",
            &format!("policy:\n  cedar:\n    policies: {policies}\n    schema: {schema}\napi_keys:"),
        );
    (TestGateway::start(&yaml).await, dir)
}

/// `POST {admin}{path}` with `body` (a string, so that broken JSON can be
/// sent) and the token, if given.
async fn post(gw: &TestGateway, path: &str, token: Option<&str>, body: &str) -> reqwest::Response {
    let mut req = client()
        .post(format!("{}{path}", gw.admin_url))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    req.send().await.unwrap()
}

async fn evaluate(gw: &TestGateway, body: &Value) -> Value {
    let resp = post(gw, "/access/v1/evaluation", Some(TOKEN), &body.to_string()).await;
    assert_eq!(resp.status(), StatusCode::OK, "{body}");
    resp.json().await.unwrap()
}

/// A subject of tenant `tenant` on tier `tier`.
fn subject(tenant: &str, tier: &str) -> Value {
    json!({"type": "key", "id": format!("someone@{tenant}.example"),
           "properties": {"tenant": tenant, "tier": tier, "auth_method": "api_key"}})
}

fn invoke(tenant: &str, tier: &str, model: &str) -> Value {
    json!({"subject": subject(tenant, tier), "action": {"name": "invoke"},
           "resource": {"type": "model", "id": model}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluation_answers_with_the_gateways_policies() {
    let (gw, _dir) = gateway(true).await;
    // (request, decision, determining policies)
    let table = [
        (invoke("acme", "pro", "demo-chat"), true, json!(["chat-for-everyone"])),
        // The fraud model is enterprise-only: a deny is still a 200.
        (invoke("acme", "pro", "fraud-scorer"), false, json!([])),
        (
            invoke("acme", "enterprise", "fraud-scorer"),
            true,
            json!(["fraud-for-enterprise"]),
        ),
        // Tenant level: a merchant's own data only, through the model in context.
        (
            json!({"subject": subject("acme", "pro"), "action": {"name": "access"},
                   "resource": {"type": "tenant", "id": "globex"}, "context": {"model": "fraud-scorer"}}),
            false,
            json!([]),
        ),
        (
            json!({"subject": subject("acme", "pro"), "action": {"name": "access"},
                   "resource": {"type": "tenant", "id": "acme"}, "context": {"model": "fraud-scorer"}}),
            true,
            json!(["own-transactions-only"]),
        ),
        // Action level: the refund tool is for support staff.
        (
            json!({"subject": subject("acme", "pro"), "action": {"name": "use"},
                   "resource": {"type": "model", "id": "demo-chat"},
                   "context": {"action": {"operation": "chat", "tools": ["refund"]}}}),
            false,
            json!(["refunds-for-support"]),
        ),
    ];
    for (request, decision, policies) in table {
        let answer = evaluate(&gw, &request).await;
        assert_eq!(answer["decision"], decision, "{request} → {answer}");
        assert_eq!(answer["context"]["policies"], policies, "{request} → {answer}");
        assert_eq!(answer["context"]["engine"], "cedar");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluation_needs_the_admin_token_and_a_well_formed_request() {
    let (gw, _dir) = gateway(true).await;
    let good = invoke("acme", "pro", "demo-chat").to_string();
    for token in [None, Some("wrong"), Some(&TOKEN[1..])] {
        for path in ["/access/v1/evaluation", "/access/v1/evaluations"] {
            let resp = post(&gw, path, token, &good).await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path} {token:?}");
            assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        }
    }
    for (body, message) in [
        ("{\"subject\":", "invalid JSON body"),
        ("[1]", "must be a JSON object"),
        (
            r#"{"action":{"name":"invoke"},"resource":{"type":"model","id":"demo-chat"}}"#,
            "`subject` is required",
        ),
        (
            r#"{"subject":{"type":"key"},"action":{"name":"invoke"},"resource":{"type":"model","id":"demo-chat"}}"#,
            "`subject`: missing field `id`",
        ),
        (
            r#"{"subject":{"type":"key","id":"a"},"action":{"name":"invoke"},"resource":{"type":"document","id":"1"}}"#,
            "`resource.type` must be `model` or `tenant`",
        ),
    ] {
        let resp = post(&gw, "/access/v1/evaluation", Some(TOKEN), body).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
        let error: Value = resp.json().await.unwrap();
        let text = error["error"].as_str().unwrap();
        assert!(text.contains(message), "{body} → {text}");
    }
    // Only POST.
    let resp = client()
        .get(format!("{}/access/v1/evaluation", gw.admin_url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    // The PEP's request id comes back.
    let resp = client()
        .post(format!("{}/access/v1/evaluation", gw.admin_url))
        .bearer_auth(TOKEN)
        .header("x-request-id", "pep-42")
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "pep-42");
    assert_eq!(resp.json::<Value>().await.unwrap()["decision"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_token_the_api_does_not_exist() {
    let (gw, _dir) = gateway(false).await;
    let good = invoke("acme", "pro", "demo-chat").to_string();
    for token in [None, Some(TOKEN)] {
        let resp = post(&gw, "/access/v1/evaluation", token, &good).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }
    let resp = client()
        .get(format!("{}/.well-known/authzen-configuration", gw.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_names_the_endpoints() {
    let (gw, _dir) = gateway(true).await;
    let meta: Value = client()
        .get(format!("{}/.well-known/authzen-configuration", gw.admin_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["policy_decision_point"], gw.admin_url);
    assert_eq!(
        meta["access_evaluation_endpoint"],
        format!("{}/access/v1/evaluation", gw.admin_url)
    );
    assert_eq!(
        meta["access_evaluations_endpoint"],
        format!("{}/access/v1/evaluations", gw.admin_url)
    );
}

/// The decisions of a batch, in order.
async fn batch(gw: &TestGateway, body: &Value) -> Vec<Value> {
    let resp = post(gw, "/access/v1/evaluations", Some(TOKEN), &body.to_string()).await;
    assert_eq!(resp.status(), StatusCode::OK, "{body}");
    let answer: Value = resp.json().await.unwrap();
    answer["evaluations"].as_array().unwrap().clone()
}

fn decisions(results: &[Value]) -> Vec<bool> {
    results.iter().map(|r| r["decision"].as_bool().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluations_inherit_defaults_and_honour_each_semantic() {
    let (gw, _dir) = gateway(true).await;
    // Items give only the resource; subject and action are inherited.
    let items = |models: &[&str]| -> Value {
        models
            .iter()
            .map(|m| json!({"resource": {"type": "model", "id": m}}))
            .collect()
    };
    let body = |models: &[&str], semantic: Option<&str>| {
        let mut body = json!({"subject": subject("acme", "pro"), "action": {"name": "invoke"},
                              "evaluations": items(models)});
        if let Some(s) = semantic {
            body["options"] = json!({ "evaluations_semantic": s });
        }
        body
    };
    let mixed = ["demo-chat", "fraud-scorer", "demo-chat"];
    // execute_all, by default and by name: every item.
    for semantic in [None, Some("execute_all")] {
        let results = batch(&gw, &body(&mixed, semantic)).await;
        assert_eq!(decisions(&results), [true, false, true], "{semantic:?}");
    }
    // deny_on_first_deny stops after the deny.
    let results = batch(&gw, &body(&mixed, Some("deny_on_first_deny"))).await;
    assert_eq!(decisions(&results), [true, false]);
    // permit_on_first_permit stops after the permit.
    let results = batch(
        &gw,
        &body(
            &["fraud-scorer", "demo-chat", "fraud-scorer"],
            Some("permit_on_first_permit"),
        ),
    )
    .await;
    assert_eq!(decisions(&results), [false, true]);
    let results = batch(&gw, &body(&["fraud-scorer"; 3], Some("permit_on_first_permit"))).await;
    assert_eq!(decisions(&results), [false, false, false]);

    // An item may override an inherited member: an enterprise subject for the fraud model.
    let mut overriding = body(&["fraud-scorer"], None);
    overriding["evaluations"][0]["subject"] = subject("acme", "enterprise");
    assert_eq!(decisions(&batch(&gw, &overriding).await), [true]);

    // A broken item is a deny that says why; the others are still decided.
    let mut broken = body(&mixed, None);
    broken["evaluations"][1] = json!({"resource": {"type": "model"}});
    let results = batch(&gw, &broken).await;
    assert_eq!(decisions(&results), [true, false, true]);
    assert_eq!(results[1]["context"]["code"], "400");
    assert!(
        results[1]["context"]["reason"]
            .as_str()
            .unwrap()
            .contains("missing field `id`"),
        "{}",
        results[1]
    );

    // Without items, the top level is one evaluation.
    let resp = post(
        &gw,
        "/access/v1/evaluations",
        Some(TOKEN),
        &invoke("acme", "pro", "demo-chat").to_string(),
    )
    .await;
    assert_eq!(resp.json::<Value>().await.unwrap()["decision"], true);

    // Bounded, and only the three semantics.
    let too_many: Vec<&str> = vec!["demo-chat"; 101];
    for bad in [
        body(&too_many, None),
        body(&mixed, Some("first_wins")),
        json!({"evaluations": {"resource": {}}}),
    ] {
        let resp = post(&gw, "/access/v1/evaluations", Some(TOKEN), &bad.to_string()).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }
}
