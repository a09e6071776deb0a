//! The admit stage on the request path: rules from configuration, what
//! clients see (429 bodies and headers), reservations settled to the real
//! usage, streams cut off at their reservation, the usage ledger, and a
//! model's capacity shared fairly between tenants.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::common::*;

/// A gateway config with `limits` (a YAML block, at top level) and
/// `model_limits` (spliced under demo-chat's `limits:`), in front of `chat`.
pub fn limited_config(chat: SocketAddr, limits: &str, model_limits: &str) -> String {
    format!(
        r#"
listen:
  address: 127.0.0.1:0
  auth_failure_limit: {{ max_failures: 1000, window: 1m }}
admin:
  address: 127.0.0.1:0
  token: {{ file: admin.token }}
audit:
  file: audit.jsonl
upstreams:
  - name: chat
    url: http://{chat}
    first_byte_timeout: 2s
    idle_timeout: 2s
models:
  - name: demo-chat
    protocol: openai
    upstream: chat
    limits:
{model_limits}
  - name: precious-chat
    protocol: openai
    upstream: chat
    upstream_model: demo-chat
    value_tier: high
api_keys:
  - id: demo-acme
    sha256: {ACME_SHA}
    principal: alice@acme.example
    tenant: acme
    tier: pro
    models: ["*"]
  - id: demo-globex
    sha256: {GLOBEX_SHA}
    principal: bob@globex.example
    tenant: globex
    tier: free
    models: ["*"]
limits:
{limits}
"#
    )
}

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef0123";

/// Starts a gateway on `yaml`, with the admin token file beside it.
pub async fn start_limited(yaml: &str) -> TestGateway {
    TestGateway::start_with_files(yaml, &[("admin.token", ADMIN_TOKEN)]).await
}

fn chat(content: &str) -> Value {
    json!({"model": "demo-chat", "messages": [{"role": "user", "content": content}]})
}

async fn usage(gw: &TestGateway, query: &str) -> Value {
    let resp = client()
        .get(format!("{}/admin/v1/usage?{query}", gw.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_gets_openai_429s_and_headers() {
    let (chat_addr, _) = demo_upstreams().await;
    let gw = start_limited(&limited_config(
        chat_addr,
        "  rules:\n    - { name: key-rate, key: [api_key], rate: 3/hour }\n",
        "      default_max_tokens: 64\n",
    ))
    .await;
    for remaining in ["2", "1", "0"] {
        let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat("hi")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-ratelimit-limit-requests"], "3");
        assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], remaining);
        // An hour's rate of 3: one more every 20 minutes.
        assert!(
            resp.headers()["x-ratelimit-reset-requests"]
                .to_str()
                .unwrap()
                .ends_with('s')
        );
    }
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat("hi")).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let headers = resp.headers().clone();
    let retry_ms: u64 = headers["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!((1_000_000..=1_200_000).contains(&retry_ms), "{retry_ms}");
    assert_eq!(headers["retry-after"], retry_ms.div_ceil(1000).to_string().as_str());
    assert_eq!(headers["x-should-retry"], "true");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "requests");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("rule `key-rate`") && message.contains("try again in"),
        "{message}"
    );
    // Another key is counted apart.
    let resp = post(&gw, "/v1/chat/completions", Some(GLOBEX), &chat("hi")).await;
    assert_eq!(resp.status(), StatusCode::OK);

    let records = gw.audit(5).await;
    let refused = &records[3];
    assert_eq!(refused["status"], 429);
    assert_eq!(refused["reject_reason"], "rate_limit_exceeded");
    assert_eq!(refused["limits"][0]["rule"], "key-rate");
    assert_eq!(refused["limits"][0]["allowed"], false);
    assert_eq!(records[0]["limits"][0]["allowed"], true);
    assert_eq!(records[0]["limits"][0]["remaining"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_reserves_the_estimate_settles_the_usage_and_refuses_with_insufficient_quota() {
    let (chat_addr, _) = demo_upstreams().await;
    // $10 per million output tokens; 1000 reserved per request is $0.01.
    let gw = start_limited(&limited_config(
        chat_addr,
        "  rules:\n    - { name: daily-spend, key: [tenant], unit: dollars, budget: \"$0.05\", per: day }\n",
        "      prices: { input: \"$1\", output: \"$10\" }\n      default_max_tokens: 1000\n",
    ))
    .await;
    // Ten requests, twice what the budget holds at their estimate: each
    // settles to the few tokens it really used, so all pass.
    for i in 0..10 {
        let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat(&format!("hello {i}"))).await;
        assert_eq!(resp.status(), StatusCode::OK, "request {i}");
    }
    let report = usage(&gw, "tenant=acme").await;
    let row = &report["data"][0];
    assert_eq!(row["requests"], 10, "{report}");
    assert_eq!(row["model"], "demo-chat");
    let spent: f64 = row["dollars"].as_str().unwrap().parse().unwrap();
    assert!(
        spent > 0.0 && spent < 0.01,
        "settled to the real usage, far below 10 × $0.01: {report}"
    );
    // The reservation went upstream as max_tokens, so the estimate holds.
    let records = gw.audit(10).await;
    assert_eq!(
        records[0]["limits"][0]["cost"].as_u64().unwrap() / 1000,
        10,
        "{}",
        records[0]
    );

    // A request whose reservation alone exceeds the budget can never pass.
    let mut big = chat("write a novel");
    big["max_tokens"] = json!(100_000);
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &big).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    assert!(resp.headers().get("retry-after").is_none());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert_eq!(body["error"]["type"], "insufficient_quota");
    // Nothing was reserved by the refusal: a normal request still passes.
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat("still fine")).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiers_carry_their_own_rules_and_high_value_models_are_tighter() {
    let (chat_addr, _) = demo_upstreams().await;
    let gw = start_limited(&limited_config(
        chat_addr,
        r#"  high_value_factor: 0.5
  ietf_headers: true
  tiers:
    free:
      rules:
        - { name: free-rate, key: [api_key], rate: 2/hour }
  rules:
    - { name: key-rate, key: [api_key], rate: 4/hour }
"#,
        "      default_max_tokens: 64\n",
    ))
    .await;
    // globex is free: its tier's 2/hour applies before the common 4/hour.
    for _ in 0..2 {
        assert_eq!(
            post(&gw, "/v1/chat/completions", Some(GLOBEX), &chat("hi"))
                .await
                .status(),
            200
        );
    }
    let resp = post(&gw, "/v1/chat/completions", Some(GLOBEX), &chat("hi")).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("free-rate"),
        "{body}"
    );

    // acme (pro) on the high-value model: half of 4, counted apart from
    // its standard-model count.
    let mut precious = chat("hi");
    precious["model"] = json!("precious-chat");
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &precious).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-ratelimit-limit-requests"], "2");
    assert_eq!(resp.headers()["ratelimit-policy"], "\"key-rate\";q=2;w=3600");
    assert_eq!(resp.headers()["ratelimit"], "\"key-rate\";r=1;t=1800");
    assert_eq!(
        post(&gw, "/v1/chat/completions", Some(ACME), &precious).await.status(),
        200
    );
    assert_eq!(
        post(&gw, "/v1/chat/completions", Some(ACME), &precious).await.status(),
        429
    );
    // The standard model still has all four.
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat("hi")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], "3");
}

/// A streaming upstream that ignores `max_tokens`: `words` content events
/// of one token each (` hello`), 5 ms apart, then `[DONE]` without usage.
/// It counts the streams it served.
async fn endless_streamer(words: usize, served: Arc<AtomicUsize>) -> SocketAddr {
    spawn_upstream(move |_req| {
        let served = Arc::clone(&served);
        async move {
            served.fetch_add(1, Ordering::SeqCst);
            let (tx, rx) = mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                for _ in 0..words {
                    let event = Bytes::from_static(
                        b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" hello\"}}]}\n\n",
                    );
                    if tx.send(event).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
            });
            sse_response(rx)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_outgrows_its_reservation_is_cut_off_and_streams_cannot_jointly_overrun() {
    let served = Arc::new(AtomicUsize::new(0));
    let upstream = endless_streamer(400, Arc::clone(&served)).await;
    // 100 output tokens at $10/M is $0.001 a stream; the budget holds three.
    let gw = start_limited(&limited_config(
        upstream,
        "  rules:\n    - { name: spend, key: [tenant], unit: dollars, budget: \"$0.003\", per: day }\n",
        "      prices: { output: \"$10\" }\n      default_max_tokens: 100\n",
    ))
    .await;
    let mut body = chat("go on forever");
    body["stream"] = json!(true);

    // Six streams at once: only three fit the budget.
    let mut streams = Vec::new();
    for _ in 0..6 {
        let (url, body) = (gw.url.clone(), body.clone());
        streams.push(tokio::spawn(async move {
            let resp = client()
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(ACME)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            (status, resp.text().await.unwrap())
        }));
    }
    let mut admitted = 0;
    for stream in streams {
        let (status, text) = stream.await.unwrap();
        if status == StatusCode::OK {
            admitted += 1;
            let words = text.matches(" hello").count();
            assert_eq!(words, 100, "cut at its 100 reserved tokens");
            assert!(
                text.contains("output_limit_exceeded"),
                "ends with an error event: {text}"
            );
            assert!(!text.contains("[DONE]"));
        } else {
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{text}");
            assert!(text.contains("insufficient_quota"), "{text}");
        }
    }
    println!("streams admitted: {admitted} of 6 (budget holds 3)");
    assert_eq!(admitted, 3);
    assert_eq!(served.load(Ordering::SeqCst), 3);
    let records = gw.audit(6).await;
    let cut: Vec<&Value> = records.iter().filter(|r| r["status"] == 200).collect();
    assert!(cut.iter().all(|r| r["outcome"] == "output_limit_exceeded"), "{cut:?}");
    // What was spent is what was counted: within the budget.
    let report = usage(&gw, "").await;
    let spent: f64 = report["total"]["dollars"].as_str().unwrap().parse().unwrap();
    println!("spent ${spent} of a $0.003 budget");
    assert!(spent <= 0.003 + 1e-9, "{report}");
    assert!(spent > 0.0029, "three streams of 100 tokens: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_does_not_starve_a_normal_one() {
    // Every request holds a capacity slot for 20 ms upstream.
    let upstream = spawn_upstream(|_req| async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        http::Response::builder()
            .header("content-type", "application/json")
            .body(full(
                r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
            ))
            .unwrap()
    })
    .await;
    let gw = start_limited(&limited_config(
        upstream,
        "  rules: []\n",
        "      capacity: { concurrency: 4, queue: 64, queue_timeout: 1s }\n",
    ))
    .await;
    let run_for = Duration::from_secs(4);
    let started = Instant::now();
    // The flood: acme keeps 40 requests outstanding, ten times the capacity.
    let mut flood = Vec::new();
    for _ in 0..40 {
        let url = gw.url.clone();
        flood.push(tokio::spawn(async move {
            let c = client();
            let mut results = Vec::new();
            while started.elapsed() < run_for {
                let t = Instant::now();
                let resp = c
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(ACME)
                    .json(&chat("flood"))
                    .send()
                    .await
                    .unwrap();
                let ok = resp.status() == StatusCode::OK;
                let _ = resp.bytes().await;
                results.push((ok, t.elapsed()));
                if !ok {
                    // A refused flooder retries at once, as a flood does.
                    tokio::task::yield_now().await;
                }
            }
            results
        }));
    }
    // The normal tenant: a request every 25 ms, within its share, each sent
    // on schedule whether or not the one before has been answered.
    let normal = {
        let url = gw.url.clone();
        tokio::spawn(async move {
            let c = client();
            let mut sent = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(25));
            while started.elapsed() < run_for {
                tick.tick().await;
                let (c, url) = (c.clone(), url.clone());
                sent.push(tokio::spawn(async move {
                    let t = Instant::now();
                    let resp = c
                        .post(format!("{url}/v1/chat/completions"))
                        .bearer_auth(GLOBEX)
                        .json(&chat("normal"))
                        .send()
                        .await
                        .unwrap();
                    let ok = resp.status() == StatusCode::OK;
                    let _ = resp.bytes().await;
                    (ok, t.elapsed())
                }));
            }
            let mut results = Vec::new();
            for s in sent {
                results.push(s.await.unwrap());
            }
            results
        })
    };
    let mut flood_results = Vec::new();
    for f in flood {
        flood_results.extend(f.await.unwrap());
    }
    let normal_results = normal.await.unwrap();
    let summary = |name: &str, results: &[(bool, Duration)]| {
        let ok = results.iter().filter(|(ok, _)| *ok).count();
        let mut latencies: Vec<Duration> = results.iter().map(|(_, d)| *d).collect();
        latencies.sort();
        let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
        let rate = ok as f64 / results.len() as f64;
        println!(
            "{name:>7}: {} requests, {:.1}% succeeded, p99 latency {:.1} ms",
            results.len(),
            rate * 100.0,
            p99.as_secs_f64() * 1e3
        );
        (rate, p99)
    };
    let (flood_rate, _) = summary("flood", &flood_results);
    let (normal_rate, normal_p99) = summary("normal", &normal_results);
    assert!(normal_results.len() >= 20, "the normal tenant kept sending");
    assert!(normal_rate >= 0.95, "normal tenant success {normal_rate}");
    assert!(flood_rate > 0.0, "the flood is served its share");
    // Printed above; bounded here only by the queue timeout, since timing
    // on a loaded test machine is no measurement.
    assert!(normal_p99 < Duration::from_secs(1), "normal p99 {normal_p99:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_path_leaves_a_reservation_behind() {
    // One request in flight per key, and a budget that holds one
    // reservation ($0.001 of $0.0015): a reservation left behind by any
    // path below would refuse the next request.
    let limits = "  rules:\n    - { name: one-at-a-time, key: [api_key], concurrency: 1 }\n    - { name: spend, key: [tenant], unit: dollars, budget: \"$0.0015\", per: day }\n";
    let model = "      prices: { output: \"$10\" }\n      default_max_tokens: 100\n";

    // The upstream is down: 502, and the reservation is given back.
    let gw = start_limited(&limited_config(dead_address().await, limits, model)).await;
    for _ in 0..4 {
        let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat("hi")).await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    }
    let records = gw.audit(4).await;
    assert!(records.iter().all(|r| r["limits"][1]["allowed"] == true), "{records:?}");

    // The client goes away mid-stream: its hold is released and its
    // budget settled to what was streamed.
    let served = Arc::new(AtomicUsize::new(0));
    let gw = start_limited(&limited_config(
        endless_streamer(400, Arc::clone(&served)).await,
        limits,
        model,
    ))
    .await;
    let mut body = chat("stream");
    body["stream"] = json!(true);
    for round in 0..3 {
        let mut resp = post(&gw, "/v1/chat/completions", Some(ACME), &body).await;
        assert_eq!(resp.status(), StatusCode::OK, "round {round}");
        let first = resp.chunk().await.unwrap();
        assert!(first.is_some());
        // While it streams, a second request is over the concurrency cap.
        let second = post(&gw, "/v1/chat/completions", Some(ACME), &chat("me too")).await;
        assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
        drop(resp);
        // The gateway sees the disconnect on its next write.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let records = gw.audit(2 * round + 2).await;
            if records.iter().filter(|r| r["outcome"] == "client_disconnected").count() > round {
                break;
            }
            assert!(Instant::now() < deadline, "the disconnect was never seen: {records:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let report = usage(&gw, "").await;
    let spent: f64 = report["total"]["dollars"].as_str().unwrap().parse().unwrap();
    println!("three abandoned streams spent ${spent} (each reserved $0.001)");
    assert!(spent < 0.001, "settled to the few tokens streamed: {report}");
    assert_eq!(served.load(Ordering::SeqCst), 3);
}
