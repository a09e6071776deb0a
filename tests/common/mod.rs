//! Test harness: start gateways from YAML on ephemeral ports, start demo or
//! purpose-built upstreams, read the audit log.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use warden::app::{self, Running};
use warden::config::Config;

/// The demo keys: may call demo-chat and fraud-scorer.
pub const ACME: &str = "wdn_demo_acme_7Hq2mX9vLk4pR8sT";
/// May call demo-chat only.
pub const GLOBEX: &str = "wdn_demo_globex_3Nf6yW1cZb5dJ0gU";
pub const ACME_SHA: &str = "0afa2299e2d8d131115738eb24dc74d065fbaf69c1e96c00a5331e9d4e5d4f63";
pub const GLOBEX_SHA: &str = "b45ebe945bd961040138fbbdc928c50f7ae194df03b0e998532b8fb8d0c841fb";

/// A running in-process gateway and the temp dir holding its config and audit log.
pub struct TestGateway {
    pub running: Option<Running>,
    pub url: String,
    pub admin_url: String,
    pub audit_path: PathBuf,
    pub dir: tempfile::TempDir,
}

impl TestGateway {
    /// Starts a gateway from YAML; `audit.file` relative paths land in a temp dir.
    pub async fn start(yaml: &str) -> TestGateway {
        TestGateway::start_with_files(yaml, &[]).await
    }

    /// Starts a gateway from YAML after writing `files` (name, contents)
    /// beside its config: tokens and secrets that must exist when the
    /// config is loaded.
    pub async fn start_with_files(yaml: &str, files: &[(&str, &str)]) -> TestGateway {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        let path = dir.path().join("warden.yaml");
        std::fs::write(&path, yaml).unwrap();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let audit_path = config.audit_file.clone();
        let running = app::start(config, Some(path)).await.unwrap();
        TestGateway {
            url: format!("http://{}", running.address),
            admin_url: format!("http://{}", running.admin_address),
            running: Some(running),
            audit_path,
            dir,
        }
    }

    /// Audit records written so far, waiting up to 5 s for at least `n`.
    pub async fn audit(&self, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&self.audit_path).unwrap_or_default();
            let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            if lines.len() >= n || tokio::time::Instant::now() > deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the gateway and waits for it to drain.
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown();
            running.wait().await.unwrap();
        }
    }
}

/// The demo upstreams on ephemeral ports: (chat simulator, fraud model).
pub async fn demo_upstreams() -> (SocketAddr, SocketAddr) {
    let chat = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fraud = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addrs = (chat.local_addr().unwrap(), fraud.local_addr().unwrap());
    tokio::spawn(warden::demo::serve_chat_simulator(chat));
    tokio::spawn(warden::demo::serve_fraud_model(fraud));
    addrs
}

/// A gateway config in front of `chat` (OpenAI) and `fraud` (OIP v2), with
/// the demo keys; `extra_listen` is spliced into the `listen` block.
pub fn config(chat: SocketAddr, fraud: SocketAddr, extra_listen: &str) -> String {
    format!(
        r#"
listen:
  address: 127.0.0.1:0
  max_body_bytes: 64KiB
  # Every test client is 127.0.0.1: the brute-force limit is set per test.
  auth_failure_limit: {{ max_failures: 1000, window: 1m }}
{extra_listen}
admin:
  address: 127.0.0.1:0
audit:
  file: audit.jsonl
upstreams:
  - name: chat
    url: http://{chat}
    first_byte_timeout: 500ms
    idle_timeout: 500ms
  - name: fraud
    url: http://{fraud}
    first_byte_timeout: 500ms
models:
  - name: demo-chat
    protocol: openai
    upstream: chat
  - name: other-chat
    protocol: openai
    upstream: chat
    upstream_model: demo-chat
  - name: fraud-scorer
    protocol: oip_v2
    upstream: fraud
    max_body_bytes: 2KiB
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
    models: [demo-chat]
"#
    )
}

/// A gateway on ephemeral ports with an audit file and the acme demo key
/// (any model), around `upstreams` and `models` (YAML list items).
pub fn gateway_yaml(upstreams: &str, models: &str) -> String {
    format!(
        r#"
listen:
  address: 127.0.0.1:0
  auth_failure_limit: {{ max_failures: 1000, window: 1m }}
admin:
  address: 127.0.0.1:0
audit:
  file: audit.jsonl
upstreams:
{upstreams}
models:
{models}
api_keys:
  - id: demo-acme
    sha256: {ACME_SHA}
    principal: alice@acme.example
    tenant: acme
    models: ["*"]
"#
    )
}

/// A gateway in front of fresh demo upstreams.
pub async fn demo_gateway() -> TestGateway {
    let (chat, fraud) = demo_upstreams().await;
    TestGateway::start(&config(chat, fraud, "")).await
}

pub type TestBody = BoxBody<Bytes, Infallible>;

/// Serves `handler` on an ephemeral port: a purpose-built upstream.
pub async fn spawn_upstream<H, F>(handler: H) -> SocketAddr
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// An upstream that answers every request with a chat completion (or an
/// OIP answer) and counts what it received.
pub async fn counting_upstream(received: Arc<AtomicUsize>) -> SocketAddr {
    spawn_upstream(move |_req| {
        let received = Arc::clone(&received);
        async move {
            received.fetch_add(1, Ordering::SeqCst);
            http::Response::builder()
                .header("content-type", "application/json")
                .body(full(
                    r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"model_name":"m","outputs":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
                ))
                .unwrap()
        }
    })
    .await
}

/// A full body for a test upstream.
pub fn full(body: impl Into<Bytes>) -> TestBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(body.into()).boxed()
}

/// A `text/event-stream` response whose body is whatever is sent on `rx`,
/// each message as its own frame, as it is sent.
pub fn sse_response(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response<TestBody> {
    use http_body_util::BodyExt;
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(hyper::body::Frame::data(b)), rx))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(http_body_util::StreamBody::new(stream).boxed())
        .unwrap()
}

/// An address nothing listens on.
pub async fn dead_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// `POST {gateway}{path}` with a JSON body and, if given, `Authorization: Bearer key`.
pub async fn post(gw: &TestGateway, path: &str, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut req = client().post(format!("{}{path}", gw.url)).json(body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    req.send().await.unwrap()
}

/// A plain HTTP client (no retries, no compression).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// `sha256(bytes)` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A chat request body.
pub fn chat_body(model: &str, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "stream_options": if stream { serde_json::json!({"include_usage": true}) } else { Value::Null },
        "messages": [{"role": "user", "content": "Hello Warden"}],
    })
}

/// An OIP v2 fraud request with `n` rows.
pub fn fraud_body(n: usize) -> Value {
    serde_json::json!({
        "inputs": [
            {"name": "amount", "shape": [n], "datatype": "FP64", "data": vec![25.0; n]},
            {"name": "merchant_id", "shape": [n], "datatype": "BYTES", "data": vec!["m-1"; n]},
            {"name": "country", "shape": [n], "datatype": "BYTES", "data": vec!["US"; n]},
            {"name": "hour", "shape": [n], "datatype": "INT32", "data": vec![14; n]},
            {"name": "card_present", "shape": [n], "datatype": "BOOL", "data": vec![true; n]},
        ]
    })
}

pub type Shared<T> = Arc<tokio::sync::Mutex<T>>;

/// The URL of a fresh, empty PostgreSQL schema in database `test` on
/// 127.0.0.1:5432, or `None` when PostgreSQL is not running here and this is
/// not CI (where it must run, so the test fails instead of skipping).
pub async fn fresh_postgres() -> Option<String> {
    let base = "postgres://postgres@127.0.0.1:5432/test";
    let pool = match sqlx::PgPool::connect(base).await {
        Ok(pool) => pool,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: PostgreSQL is not reachable at {base} ({e}); CI runs this test");
            return None;
        }
        Err(e) => panic!("PostgreSQL must be running for CI: {e}"),
    };
    let schema = format!("warden_test_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&pool)
        .await
        .unwrap();
    Some(format!("{base}?options=-c%20search_path%3D{schema}"))
}

/// Writes the demo policies and their schema into `dir`; their paths.
pub fn demo_policy_files(dir: &std::path::Path) -> (String, String) {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    (
        write("demo.cedar", include_str!("../../examples/policies/demo.cedar")),
        write(
            "warden.cedarschema",
            include_str!("../../examples/policies/warden.cedarschema"),
        ),
    )
}
