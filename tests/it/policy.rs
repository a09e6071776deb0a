//! Endpoint authorization by embedded Cedar policies, as a table of requests
//! and expected decisions; policies that do not validate are refused.

use http::StatusCode;

use crate::common::*;

const INITECH: &str = "initech-key-0001";
const INITECH_SHA: &str = "9b1988fc7e8e62a5607cd1a5b81d5ba427fa06be9027ef5d030ae2f88c50c553";

const POLICIES: &str = r#"
@id("acme-all")
permit (principal, action == Warden::Action::"invoke", resource) when { principal.tenant == "acme" };

@id("globex-and-initech-chat")
permit (principal, action == Warden::Action::"invoke", resource == Warden::Model::"demo-chat")
when { principal.tenant == "globex" };

@id("initech-oip")
permit (principal, action == Warden::Action::"invoke", resource == Warden::Model::"fraud-scorer")
when { principal.tenant == "initech" };

@id("any-operation")
permit (principal, action == Warden::Action::"use", resource);

@id("no-logprobs-below-enterprise")
forbid (principal, action == Warden::Action::"use", resource) when { context.logprobs && principal.tier != "enterprise" };

@id("short-answers-on-free")
forbid (principal, action == Warden::Action::"use", resource) when { principal.tier == "free" && context.max_tokens > 100 };

@id("no-free-tier-on-oip")
forbid (principal, action == Warden::Action::"invoke", resource) when { principal.tier == "free" && resource.protocol == "oip_v2" };
"#;

const SCHEMA: &str = include_str!("../../examples/policies/warden.cedarschema");

async fn gateway(policies: &str) -> Result<TestGateway, String> {
    let (chat, fraud) = demo_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), policies).unwrap();
    std::fs::write(dir.path().join("s.cedarschema"), SCHEMA).unwrap();
    let yaml = config(chat, fraud, "")
        .replace(
            "api_keys:",
            &format!(
                "policy:\n  cedar:\n    policies: {}\n    schema: {}\napi_keys:\n  - id: initech\n    sha256: {INITECH_SHA}\n    principal: peter@initech.example\n    tenant: initech\n    tier: free\n    models: [\"*\"]",
                dir.path().join("p.cedar").display(),
                dir.path().join("s.cedarschema").display()
            ),
        );
    let path = dir.path().join("warden.yaml");
    std::fs::write(&path, &yaml).unwrap();
    warden::config::Config::load(&path).map_err(|e| e.to_string())?;
    let gw = TestGateway::start(&yaml).await;
    drop(dir);
    Ok(gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_of_requests_and_decisions() {
    let gw = gateway(POLICIES).await.unwrap();
    /// (key, model, status, reject reason, determining policies)
    type Row<'a> = (&'a str, &'a str, StatusCode, Option<&'a str>, &'a [&'a str]);
    let table: [Row; 6] = [
        (ACME, "demo-chat", StatusCode::OK, None, &["acme-all"]),
        (ACME, "fraud-scorer", StatusCode::OK, None, &["acme-all"]),
        (GLOBEX, "demo-chat", StatusCode::OK, None, &["globex-and-initech-chat"]),
        // The key's own grant stops globex before any policy is asked.
        (
            GLOBEX,
            "other-chat",
            StatusCode::FORBIDDEN,
            Some("model_not_allowed"),
            &[],
        ),
        // Granted every model, but no policy permits initech's chat: default deny.
        (INITECH, "demo-chat", StatusCode::FORBIDDEN, Some("policy_denied"), &[]),
        // Permitted, then forbidden: forbid wins, and says why.
        (
            INITECH,
            "fraud-scorer",
            StatusCode::FORBIDDEN,
            Some("policy_denied"),
            &["no-free-tier-on-oip"],
        ),
    ];
    for (key, model, status, _, _) in &table {
        let resp = if *model == "fraud-scorer" {
            post(&gw, "/v2/models/fraud-scorer/infer", Some(key), &fraud_body(1)).await
        } else {
            post(&gw, "/v1/chat/completions", Some(key), &chat_body(model, false)).await
        };
        assert_eq!(resp.status(), *status, "{key} → {model}");
    }
    let records = gw.audit(table.len()).await;
    for ((key, model, _, reason, policies), record) in table.iter().zip(&records) {
        assert_eq!(record["reject_reason"].as_str(), *reason, "{key} → {model}");
        let decisions: Vec<&serde_json::Value> = record["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["level"] == "endpoint")
            .collect();
        if *reason == Some("model_not_allowed") {
            assert!(decisions.is_empty(), "{key} → {model}: {decisions:?}");
            continue;
        }
        assert_eq!(decisions.len(), 1, "{key} → {model}");
        let decision = &decisions[0];
        assert_eq!(decision["level"], "endpoint");
        assert_eq!(decision["engine"], "cedar");
        assert_eq!(decision["allowed"], reason.is_none(), "{key} → {model}");
        assert_eq!(decision["policy_version"].as_str().unwrap().len(), 16);
        let got: Vec<&str> = decision["policies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(got, *policies, "{key} → {model}");
    }
}

#[tokio::test]
async fn policies_that_do_not_validate_are_refused() {
    // A misspelt attribute would otherwise never match, silently.
    let typo =
        r#"permit (principal, action == Warden::Action::"invoke", resource) when { principal.tenent == "acme" };"#;
    let error = gateway(typo).await.err().expect("a policy with a typo must be refused");
    assert!(error.contains("policy.cedar"), "{error}");
    assert!(error.contains("tenent"), "{error}");
    let error = gateway("permit (principal, action, resource) when {")
        .await
        .err()
        .unwrap();
    assert!(error.contains("policy.cedar"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_action_level_constrains_operations_and_parameters() {
    let gw = gateway(POLICIES).await.unwrap();
    let with = |extra: serde_json::Value| {
        let mut body = chat_body("demo-chat", false);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let plain = post(&gw, "/v1/chat/completions", Some(ACME), &with(serde_json::json!({}))).await;
    assert_eq!(plain.status(), StatusCode::OK);
    let logprobs = post(
        &gw,
        "/v1/chat/completions",
        Some(ACME),
        &with(serde_json::json!({"logprobs": true, "top_logprobs": 5})),
    )
    .await;
    assert_eq!(logprobs.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = logprobs.json().await.unwrap();
    assert_eq!(body["error"]["code"], "action_denied");
    let records = gw.audit(2).await;
    let action = records[1]["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["level"] == "action")
        .unwrap()
        .clone();
    assert_eq!(action["allowed"], false);
    assert_eq!(action["policies"], serde_json::json!(["no-logprobs-below-enterprise"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_policy_set_is_recorded_and_counted_but_not_enforced() {
    let (chat, fraud) = demo_upstreams().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), POLICIES).unwrap();
    std::fs::write(dir.path().join("s.cedarschema"), SCHEMA).unwrap();
    // The candidate would stop acme from using the chat model.
    let candidate = format!(
        "{POLICIES}\n@id(\"candidate-no-acme-chat\")\nforbid (principal, action == Warden::Action::\"invoke\", resource == Warden::Model::\"demo-chat\") when {{ principal.tenant == \"acme\" }};\n"
    );
    std::fs::write(dir.path().join("candidate.cedar"), candidate).unwrap();
    let yaml = config(chat, fraud, "").replace(
        "api_keys:",
        &format!(
            "policy:\n  cedar:\n    policies: {0}/p.cedar\n    schema: {0}/s.cedarschema\n    shadow_policies: {0}/candidate.cedar\napi_keys:",
            dir.path().display()
        ),
    );
    let gw = TestGateway::start(&yaml).await;
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false)).await;
    assert_eq!(resp.status(), StatusCode::OK, "the shadow set is never enforced");

    let records = gw.audit(1).await;
    let endpoint = records[0]["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["level"] == "endpoint")
        .unwrap()
        .clone();
    assert_eq!(endpoint["allowed"], true);
    assert_eq!(endpoint["shadow"]["allowed"], false);
    assert_eq!(
        endpoint["shadow"]["policies"],
        serde_json::json!(["candidate-no-acme-chat"])
    );
    assert_ne!(endpoint["shadow"]["policy_version"], endpoint["policy_version"]);

    let metrics = client()
        .get(format!("{}/metrics", gw.admin_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("warden_policy_shadow_disagreements_total{level=\"endpoint\"} 1"),
        "{metrics}"
    );
}

/// The test config with the fraud model configured `value_tier: high`.
fn with_high_value_fraud(yaml: &str) -> String {
    let marked = yaml.replace(
        "    max_body_bytes: 2KiB\n",
        "    max_body_bytes: 2KiB\n    value_tier: high\n",
    );
    assert_ne!(marked, yaml, "the test config changed shape");
    marked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_on_the_models_value_tier_decides() {
    // Everyone may invoke everything, except high-value models below enterprise.
    let policies = r#"
@id("everything") permit (principal, action, resource);
@id("high-value-for-enterprise")
forbid (principal, action == Warden::Action::"invoke", resource)
when { resource.value_tier == "high" && principal.tier != "enterprise" };
"#;
    for (high, status, determining) in [
        (false, StatusCode::OK, "everything"),
        (true, StatusCode::FORBIDDEN, "high-value-for-enterprise"),
    ] {
        let (chat, fraud) = demo_upstreams().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.cedar"), policies).unwrap();
        std::fs::write(dir.path().join("s.cedarschema"), SCHEMA).unwrap();
        let mut yaml = config(chat, fraud, "").replace(
            "api_keys:",
            &format!(
                "policy:\n  cedar:\n    policies: {0}/p.cedar\n    schema: {0}/s.cedarschema\napi_keys:",
                dir.path().display()
            ),
        );
        if high {
            yaml = with_high_value_fraud(&yaml);
        }
        let gw = TestGateway::start(&yaml).await;
        // The acme key is on the pro tier.
        let resp = post(&gw, "/v2/models/fraud-scorer/infer", Some(ACME), &fraud_body(1)).await;
        assert_eq!(resp.status(), status, "value_tier high: {high}");
        let chat = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false)).await;
        assert_eq!(chat.status(), StatusCode::OK, "a standard model is unaffected");
        let records = gw.audit(2).await;
        let endpoint = records[0]["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["level"] == "endpoint")
            .unwrap()
            .clone();
        assert_eq!(
            endpoint["policies"],
            serde_json::json!([determining]),
            "value_tier high: {high}"
        );
        if high {
            assert_eq!(records[0]["reject_reason"], "policy_denied");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_engines_get_the_value_tier_as_a_resource_property() {
    // An OPA stand-in that allows everything and keeps what it was asked.
    let inputs = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let seen = std::sync::Arc::clone(&inputs);
    let opa = spawn_upstream(move |req: hyper::Request<hyper::body::Incoming>| {
        let seen = std::sync::Arc::clone(&seen);
        async move {
            use http_body_util::BodyExt;
            let body: serde_json::Value =
                serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes()).unwrap();
            seen.lock().unwrap().push(body["input"].clone());
            hyper::Response::builder()
                .header("content-type", "application/json")
                .body(full(r#"{"result": true}"#))
                .unwrap()
        }
    })
    .await;
    let (chat, fraud) = demo_upstreams().await;
    let yaml = with_high_value_fraud(&config(chat, fraud, "").replace(
        "api_keys:",
        &format!("policy:\n  opa:\n    url: http://{opa}\n    path: warden/allow\napi_keys:"),
    ));
    let gw = TestGateway::start(&yaml).await;
    let resp = post(&gw, "/v2/models/fraud-scorer/infer", Some(ACME), &fraud_body(1)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let inputs = inputs.lock().unwrap().clone();
    let tier_of = |model: &str, action: &str| {
        inputs
            .iter()
            .find(|i| i["resource"]["id"] == model && i["action"]["name"] == action)
            .unwrap_or_else(|| panic!("no {action} on {model} in {inputs:?}"))["resource"]["value_tier"]
            .clone()
    };
    assert_eq!(tier_of("fraud-scorer", "invoke"), "high");
    assert_eq!(tier_of("demo-chat", "invoke"), "standard");
    assert_eq!(tier_of("demo-chat", "use"), "standard");
}
