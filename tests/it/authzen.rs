//! An external AuthZEN PDP as the policy engine, against an in-process
//! server speaking the AuthZEN evaluation API: its decisions are enforced,
//! and a PDP that fails, times out or answers nonsense means deny with the
//! reason recorded. The tenant rows of one request go as one batched
//! `evaluations` call, each answer kept as its own decision.

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

/// What the batch PDP stand-in was asked: (path, body) per call.
type Calls = std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>;

/// An AuthZEN PDP that also answers `POST /access/v1/evaluations`. Subject
/// tenant acme may touch the data of tenants `acme` and `acme-eu`, nothing
/// else; every `invoke` and `use` is allowed. Under `/short` a batch gets
/// one answer too few, under `/garbled` no `evaluations` array at all.
async fn batch_pdp() -> (std::net::SocketAddr, Calls) {
    let calls: Calls = Calls::default();
    let seen = calls.clone();
    let addr = spawn_upstream(move |req: hyper::Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            let path = req.uri().path().to_owned();
            let body: Value = serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes()).unwrap();
            seen.lock().unwrap().push((path.clone(), body.clone()));
            // An item's member, else the request's default (AuthZEN inheritance).
            let judge = |item: &Value| {
                let member = |name: &str| item.get(name).unwrap_or(&body[name]).clone();
                match member("action")["name"].as_str() {
                    Some("access") => {
                        member("subject")["properties"]["tenant"] == "acme"
                            && ["acme", "acme-eu"].contains(&member("resource")["id"].as_str().unwrap_or(""))
                    }
                    _ => true,
                }
            };
            let answer = match path.rsplit_once("/access/v1/") {
                Some((_, "evaluation")) => json!({ "decision": judge(&json!({})) }),
                Some((prefix, "evaluations")) => {
                    let items = body["evaluations"].as_array().cloned().unwrap_or_default();
                    let mut results: Vec<Value> = items.iter().map(|i| json!({ "decision": judge(i) })).collect();
                    match prefix {
                        "/short" => {
                            results.pop();
                            json!({ "evaluations": results })
                        }
                        "/garbled" => json!({ "evaluations": "all fine" }),
                        _ => json!({ "evaluations": results }),
                    }
                }
                _ => return hyper::Response::builder().status(404).body(full("")).unwrap(),
            };
            hyper::Response::builder()
                .header("content-type", "application/json")
                .body(full(answer.to_string()))
                .unwrap()
        }
    })
    .await;
    (addr, calls)
}

/// The harness config with the fraud model's tenant read from its
/// `merchant_id` tensor, and the AuthZEN PDP at `url`.
async fn tenant_gateway(url: String) -> TestGateway {
    let (chat, fraud) = demo_upstreams().await;
    let yaml = config(chat, fraud, "")
        .replace(
            "    max_body_bytes: 2KiB\n",
            "    max_body_bytes: 2KiB\n    tenant: { tensor: merchant_id }\n",
        )
        .replace(
            "api_keys:",
            &format!("policy:\n  authzen:\n    url: {url}\n    timeout: 1s\n    cache_ttl: 1m\napi_keys:"),
        );
    TestGateway::start(&yaml).await
}

/// An OIP v2 scoring request whose rows belong to `merchants`.
fn scoring(merchants: &[&str]) -> Value {
    let mut body = fraud_body(merchants.len());
    body["inputs"][1]["data"] = json!(merchants);
    body
}

/// The tenant-level decisions of an audit record: (tenant order kept) allowed, error.
fn tenant_decisions(record: &Value) -> Vec<(bool, Option<String>)> {
    record["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["level"] == "tenant")
        .map(|d| {
            assert_eq!(d["engine"], "authzen", "{d}");
            (d["allowed"].as_bool().unwrap(), d["error"].as_str().map(str::to_owned))
        })
        .collect()
}

/// The `evaluations` calls made since the last look, emptying the record.
fn batches(calls: &Calls) -> Vec<Value> {
    let mut calls = calls.lock().unwrap();
    let taken: Vec<(String, Value)> = calls.drain(..).collect();
    // No tenant decision went as a lone `evaluation`.
    for (path, body) in &taken {
        if path.ends_with("/evaluation") {
            assert_ne!(body["action"]["name"], "access", "a tenant row was asked alone: {body}");
        }
    }
    taken
        .into_iter()
        .filter(|(path, _)| path.ends_with("/evaluations"))
        .map(|(_, body)| body)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_rows_go_to_the_pdp_as_one_batch_and_are_judged_row_by_row() {
    let (server, calls) = batch_pdp().await;
    let gw = tenant_gateway(format!("http://{server}")).await;
    let infer = "/v2/models/fraud-scorer/infer";

    // Two tenants, both allowed: one `evaluations` call holding both.
    let resp = post(&gw, infer, Some(ACME), &scoring(&["acme", "acme-eu", "acme"])).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let sent = batches(&calls);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let batch = &sent[0];
    assert_eq!(batch["options"]["evaluations_semantic"], "execute_all", "{batch}");
    // What the rows share is sent once, as the defaults; each item is its resource.
    assert_eq!(batch["subject"]["id"], "alice@acme.example", "{batch}");
    assert_eq!(batch["action"]["name"], "access", "{batch}");
    assert_eq!(batch["context"]["model"], "fraud-scorer", "{batch}");
    let ids: Vec<&str> = batch["evaluations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["resource"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acme", "acme-eu"]);

    // Mixed: allowed and denied rows in one batch, each decision kept; the
    // cached rows (acme, acme-eu) are not asked again.
    let resp = post(
        &gw,
        infer,
        Some(ACME),
        &scoring(&["acme", "globex", "acme-eu", "initech"]),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let sent = batches(&calls);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let ids: Vec<&str> = sent[0]["evaluations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["resource"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["globex", "initech"], "only the rows not in the cache are sent");

    let records = gw.audit(2).await;
    assert_eq!(tenant_decisions(&records[0]), [(true, None), (true, None)]);
    assert_eq!(records[1]["reject_reason"], "tenant_not_allowed");
    assert_eq!(
        tenant_decisions(&records[1]),
        [(true, None), (false, None), (true, None), (false, None)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_batch_answer_denies_every_row_with_the_reason() {
    let (server, calls) = batch_pdp().await;
    for (prefix, reason) in [
        ("short", "1 answers for 2 requests"),
        ("garbled", "no `evaluations` array"),
    ] {
        let gw = tenant_gateway(format!("http://{server}/{prefix}")).await;
        let resp = post(
            &gw,
            "/v2/models/fraud-scorer/infer",
            Some(ACME),
            &scoring(&["acme", "acme-eu"]),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{prefix}");
        assert_eq!(batches(&calls).len(), 1, "{prefix}");
        let records = gw.audit(1).await;
        assert_eq!(records[0]["reject_reason"], "tenant_not_allowed", "{prefix}");
        assert_eq!(
            tenant_decisions(&records[0]),
            [(false, Some(reason.to_owned())), (false, Some(reason.to_owned()))],
            "{prefix}"
        );
    }
}
