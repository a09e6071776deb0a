//! The real `warden` binary: reloading on SIGHUP, draining on SIGTERM,
//! `warden check` and `warden demo`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use serde_json::Value;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, sleep, timeout};

use crate::common::*;

const WARDEN: &str = env!("CARGO_BIN_EXE_warden");

/// A loopback address with a port that was free a moment ago.
fn free_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// The harness configuration with fixed listener and admin addresses.
fn binary_config(chat: SocketAddr, fraud: SocketAddr, listen: SocketAddr, admin: SocketAddr, extra: &str) -> String {
    let yaml = config(chat, fraud, extra)
        .replacen("address: 127.0.0.1:0", &format!("address: {listen}"), 1)
        .replacen("address: 127.0.0.1:0", &format!("address: {admin}"), 1);
    assert!(
        yaml.contains(&format!("address: {listen}")) && yaml.contains(&format!("address: {admin}")),
        "{yaml}"
    );
    yaml
}

/// Sends `signal` (e.g. `HUP`) to `pid` with the `kill` command.
fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A client that opens a new connection for every request.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap()
}

/// A `warden serve` process and its files.
struct Served {
    child: Child,
    pid: u32,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    url: String,
    admin_url: String,
    listen: SocketAddr,
}

impl Served {
    /// Writes `yaml` into a temp dir and starts `warden serve` on it,
    /// waiting (at most 5 s) until `/readyz` answers 200.
    async fn start(yaml: &str, listen: SocketAddr, admin: SocketAddr) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("warden.yaml");
        std::fs::write(&config_path, yaml).unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let child = Command::new(WARDEN)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Debug logging, so tests can check what even verbose logs hold.
            .env("RUST_LOG", "debug")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let mut served = Served {
            child,
            pid,
            dir,
            config_path,
            url: format!("http://{listen}"),
            admin_url: format!("http://{admin}"),
            listen,
        };
        served.wait_ready().await;
        served
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let client = fresh_client();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("warden exited early with {status}:\n{}", self.stderr());
            }
            if let Ok(resp) = client.get(format!("{}/readyz", self.admin_url)).send().await
                && resp.status() == StatusCode::OK
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "warden not ready after 5 s:\n{}",
                self.stderr()
            );
            sleep(Duration::from_millis(50)).await;
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        send_signal(self.pid, signal);
    }

    async fn metrics(&self) -> String {
        let resp = fresh_client()
            .get(format!("{}/metrics", self.admin_url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.text().await.unwrap()
    }

    /// Status of a non-streamed chat completion with `key`.
    async fn chat_status(&self, key: &str) -> StatusCode {
        fresh_client()
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(key)
            .json(&chat_body("demo-chat", false))
            .send()
            .await
            .unwrap()
            .status()
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// The value of the sample named exactly `name` (with labels, if any).
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

const LAST_RELOAD_OK: &str = "warden_config_last_reload_successful";
const RELOAD_FAILURES: &str = "warden_config_reloads_total{result=\"failure\"}";
const RELOAD_SUCCESSES: &str = "warden_config_reloads_total{result=\"success\"}";

/// Polls `/metrics` (at most 3 s) until `name` has `value`.
async fn wait_for_sample(served: &Served, name: &str, value: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let metrics = served.metrics().await;
        if sample(&metrics, name) == Some(value) {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never became {value}; metrics:\n{metrics}\nstderr:\n{}",
            served.stderr()
        );
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_broken_config_keeps_the_old_one_serving() {
    let (chat, fraud) = demo_upstreams().await;
    let (listen, admin) = (free_address(), free_address());
    let yaml = binary_config(chat, fraud, listen, admin, "");
    let mut served = Served::start(&yaml, listen, admin).await;

    assert_eq!(served.chat_status(ACME).await, StatusCode::OK);
    assert_eq!(served.chat_status(GLOBEX).await, StatusCode::OK);
    let metrics = served.metrics().await;
    assert_eq!(sample(&metrics, LAST_RELOAD_OK), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, RELOAD_FAILURES), None, "{metrics}");

    // A model with an unknown field: the reload fails, the old config serves.
    let broken = yaml.replacen(
        "  - name: demo-chat\n    protocol: openai\n",
        "  - name: demo-chat\n    temperature: 0.7\n    protocol: openai\n",
        1,
    );
    assert_ne!(broken, yaml);
    std::fs::write(&served.config_path, &broken).unwrap();
    served.signal("HUP");
    let metrics = wait_for_sample(&served, RELOAD_FAILURES, 1.0).await;
    assert_eq!(sample(&metrics, LAST_RELOAD_OK), Some(0.0), "{metrics}");
    assert_eq!(sample(&metrics, RELOAD_SUCCESSES), None, "{metrics}");
    assert!(
        served.child.try_wait().unwrap().is_none(),
        "warden exited on a bad reload"
    );
    assert_eq!(served.chat_status(ACME).await, StatusCode::OK);
    assert_eq!(served.chat_status(GLOBEX).await, StatusCode::OK);

    // A valid config without the globex key: in effect after the next SIGHUP.
    let cut = yaml
        .find("  - id: demo-globex")
        .expect("globex key in the harness config");
    let without_globex = &yaml[..cut];
    std::fs::write(&served.config_path, without_globex).unwrap();
    served.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(2);
    while served.chat_status(GLOBEX).await != StatusCode::UNAUTHORIZED {
        assert!(
            Instant::now() < deadline,
            "the globex key still works 2 s after a reload removed it:\n{}",
            served.stderr()
        );
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served.chat_status(ACME).await, StatusCode::OK);
    let metrics = wait_for_sample(&served, RELOAD_SUCCESSES, 1.0).await;
    assert_eq!(sample(&metrics, LAST_RELOAD_OK), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, RELOAD_FAILURES), Some(1.0), "{metrics}");

    // The audit log survived the reloads and recorded the refusal.
    served.signal("TERM");
    let status = timeout(Duration::from_secs(5), served.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}:\n{}", served.stderr());
    let records = served.audit();
    let last = records.last().unwrap();
    assert_eq!(last["status"], 200, "{records:?}");
    let refused: Vec<&Value> = records.iter().filter(|r| r["status"] == 401).collect();
    assert!(!refused.is_empty(), "{records:?}");
    assert!(
        refused.iter().all(|r| r["reject_reason"] == "invalid_api_key"),
        "{refused:?}"
    );
}

const FIRST: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"first\"}}]}\n\n";
const REST: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" second\"}}]}\n\n\
    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2,\"total_tokens\":6}}\n\n\
    data: [DONE]\n\n";

/// An SSE upstream that sends `FIRST`, then waits for `release` before
/// sending `REST`.
async fn held_stream_upstream(release: Arc<Notify>) -> SocketAddr {
    spawn_upstream(move |_req| {
        let release = Arc::clone(&release);
        async move {
            let (tx, rx) = mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(FIRST.as_bytes())).await;
                release.notified().await;
                let _ = tx.send(Bytes::from_static(REST.as_bytes())).await;
            });
            sse_response(rx)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_in_flight_stream_then_exits_0() {
    let release = Arc::new(Notify::new());
    let upstream = held_stream_upstream(Arc::clone(&release)).await;
    let (listen, admin) = (free_address(), free_address());
    let yaml = binary_config(upstream, upstream, listen, admin, "  shutdown_grace: 5s");
    let mut served = Served::start(&yaml, listen, admin).await;

    let mut resp = client()
        .post(format!("{}/v1/chat/completions", served.url))
        .bearer_auth(ACME)
        .json(&chat_body("demo-chat", true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let first = timeout(Duration::from_secs(2), resp.chunk())
        .await
        .expect("first event not relayed")
        .unwrap()
        .unwrap();
    assert_eq!(first, FIRST.as_bytes());

    served.signal("TERM");

    // Readiness turns false (503), or the admin listener is already closed.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fresh_client().get(format!("{}/readyz", served.admin_url)).send().await {
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => break,
            Ok(r) => assert_eq!(r.status(), StatusCode::OK, "unexpected /readyz answer"),
            Err(e) => {
                assert!(e.is_connect(), "unexpected /readyz failure: {e}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "/readyz still 200 2 s after SIGTERM");
        sleep(Duration::from_millis(20)).await;
    }
    // New connections to the public listener are refused.
    let deadline = Instant::now() + Duration::from_secs(2);
    while tokio::net::TcpStream::connect(served.listen).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the public listener still accepts 2 s after SIGTERM"
        );
        sleep(Duration::from_millis(20)).await;
    }
    // The stream in flight holds the process open.
    sleep(Duration::from_millis(200)).await;
    assert!(
        served.child.try_wait().unwrap().is_none(),
        "warden exited with a stream in flight:\n{}",
        served.stderr()
    );

    release.notify_one();
    let mut received = first.to_vec();
    let rest = timeout(Duration::from_secs(3), async {
        while let Some(chunk) = resp.chunk().await.unwrap() {
            received.extend_from_slice(&chunk);
        }
    })
    .await;
    assert!(
        rest.is_ok(),
        "stream not finished: {:?}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(String::from_utf8_lossy(&received), format!("{FIRST}{REST}"));

    let status = timeout(Duration::from_secs(4), served.child.wait())
        .await
        .expect("warden did not exit after its last stream ended")
        .unwrap();
    assert!(status.success(), "exit status {status}:\n{}", served.stderr());

    let records = served.audit();
    let streams: Vec<&Value> = records.iter().filter(|r| r["stream"] == true).collect();
    assert_eq!(streams.len(), 1, "{records:?}");
    let record = streams[0];
    assert_eq!(record["status"], 200);
    assert_eq!(record["outcome"], "completed");
    assert_eq!(record["model"], "demo-chat");
    assert_eq!(record["response_bytes"], received.len());
    assert_eq!(record["response_sha256"], sha256_hex(&received));
    assert_eq!(record["usage"]["total_tokens"], 6);
}

async fn run_check(path: &Path) -> (std::process::ExitStatus, String) {
    // Generous: the annotated example loads a Hugging Face tokenizer.
    let output = timeout(
        Duration::from_secs(30),
        Command::new(WARDEN).arg("check").arg("--config").arg(path).output(),
    )
    .await
    .unwrap()
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_every_error_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        r#"
listen:
  address: 127.0.0.1-8080
audit:
  file: audit.jsonl
upstreams:
  - name: chat
    url: http://127.0.0.1:8081
models:
  - name: demo-chat
    protocol: openai
    upstream: no-such-upstream
api_keys:
  - id: k1
    sha256: 0123456789
    principal: someone@example.com
    tenant: t1
    models: ["*"]
"#,
    )
    .unwrap();
    let (status, text) = run_check(&path).await;
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains("3 error(s)"), "{text}");
    for path in ["listen.address", "models[0].upstream", "api_keys[0].sha256"] {
        assert!(text.contains(&format!("{path}: ")), "`{path}` not reported:\n{text}");
    }
    // Nothing was started or written.
    assert!(!dir.path().join("audit.jsonl").exists());

    let demo = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo.yaml"));
    let (status, text) = run_check(demo).await;
    assert!(status.success(), "{text}");
    assert!(text.contains("ok (2 models, 2 API keys)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_accepts_the_annotated_example() {
    let example = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/warden.yaml"));
    let (status, text) = run_check(example).await;
    assert!(status.success(), "`warden check` rejects examples/warden.yaml:\n{text}");
    assert!(text.contains(": ok ("), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_commands_that_work() {
    let [gateway, admin, chat, fraud] = [free_address(), free_address(), free_address(), free_address()];
    let audit_dir = tempfile::tempdir().unwrap();
    let stderr_path = audit_dir.path().join("stderr.log");
    let mut child = Command::new(WARDEN)
        .arg("demo")
        .arg("--listen")
        .arg(gateway.to_string())
        .arg("--admin")
        .arg(admin.to_string())
        .arg("--chat-upstream")
        .arg(chat.to_string())
        .arg("--fraud-upstream")
        .arg(fraud.to_string())
        .arg("--issuer")
        .arg(free_address().to_string())
        .arg("--audit-dir")
        .arg(audit_dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();

    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = Vec::new();
    let read = timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.starts_with("Press Ctrl-C");
            banner.push(line);
            if done {
                return;
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "banner incomplete after 30 s: {banner:?}\nstderr:\n{}",
        stderr()
    );
    let text = banner.join("\n");
    assert!(text.contains("Warden demo is running."), "{text}");
    assert!(text.contains(&format!("gateway      http://{gateway}")), "{text}");
    assert!(text.contains(&format!("http://{admin}/metrics")), "{text}");
    let commands: Vec<&String> = banner.iter().filter(|l| l.starts_with("curl ")).collect();
    assert_eq!(commands.len(), 12, "{text}");

    let mut outputs = Vec::new();
    for command in &commands {
        let output = timeout(
            Duration::from_secs(6),
            Command::new("sh")
                .arg("-c")
                .arg(format!("{command} --max-time 5 -w '\\nHTTP_CODE=%{{http_code}}'"))
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, code) = out
            .rsplit_once("\nHTTP_CODE=")
            .unwrap_or_else(|| panic!("no status from `{command}`: {out:?}"));
        outputs.push((code.trim().to_owned(), body.to_owned()));
    }
    let codes: Vec<&str> = outputs.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        codes,
        [
            "200", "200", "401", "403", "200", "200", "403", "429", "200", "400", "400", "400"
        ],
        "{outputs:#?}"
    );
    // The budget refusal is OpenAI's insufficient_quota, and never retried.
    assert!(
        outputs[7].1.contains("\"code\":\"insufficient_quota\""),
        "{}",
        outputs[7].1
    );
    assert!(
        outputs[7].1.to_ascii_lowercase().contains("x-should-retry: false"),
        "{}",
        outputs[7].1
    );
    // Validation: an injection, the context window, an out-of-profile row.
    for (i, expected) in [
        (9, r#""code":"prompt_injection_detected""#),
        (10, r#""code":"context_length_exceeded""#),
        (11, "outside the model's input profile"),
    ] {
        assert!(outputs[i].1.contains(expected), "{}", outputs[i].1);
    }
    // The fraud model's scores are real: two in-profile rows, two scores.
    let scored: Value = serde_json::from_str(&outputs[4].1).unwrap();
    assert_eq!(
        scored["outputs"][0]["data"].as_array().map(Vec::len),
        Some(2),
        "{scored}"
    );
    // The ledger has acme's chat usage of today.
    let usage: Value = serde_json::from_str(&outputs[8].1).unwrap();
    let rows = usage["data"].as_array().unwrap();
    assert!(
        rows.iter()
            .any(|r| r["tenant"] == "acme" && r["model"] == "demo-chat" && r["requests"].as_u64() >= Some(2)),
        "{usage}"
    );

    // The printed rate-limit loop shows the headers, then a 429 with Retry-After.
    let loop_command = banner
        .iter()
        .skip_while(|l| !l.starts_with("# 10."))
        .find(|l| l.starts_with("for "))
        .unwrap_or_else(|| panic!("no rate-limit loop in {text}"));
    let looped = Command::new("sh").arg("-c").arg(loop_command).output().await.unwrap();
    let looped = String::from_utf8_lossy(&looped.stdout).to_ascii_lowercase();
    assert!(looped.contains("x-ratelimit-remaining-requests: 4"), "{looped}");
    assert!(looped.contains(" 429"), "{looped}");
    assert!(looped.contains("retry-after: "), "{looped}");
    assert!(
        outputs[6].1.contains("tenant_not_allowed") || outputs[6].1.contains("globex"),
        "{}",
        outputs[6].1
    );

    // The printed `warden policy … explain` shows why the cross-tenant call was refused.
    let explain_command = banner
        .iter()
        .skip_while(|l| !l.starts_with("# 9."))
        .nth(1)
        .unwrap_or_else(|| panic!("no explain command in {text}"));
    let explained = Command::new("sh")
        .arg("-c")
        .arg(explain_command)
        .output()
        .await
        .unwrap();
    assert!(
        explained.status.success(),
        "{}",
        String::from_utf8_lossy(&explained.stderr)
    );
    let explained = String::from_utf8_lossy(&explained.stdout).into_owned();
    assert!(
        explained.contains("merchant acme scores merchant globex's transaction"),
        "{explained}"
    );
    assert!(explained.contains("\"decision\": \"deny\""), "{explained}");
    assert!(outputs[5].1.contains("Hello from a JWT"), "{}", outputs[5].1);

    // The printed `warden keys … create` command makes a key the demo accepts.
    let keys_command = banner
        .iter()
        .skip_while(|l| !l.starts_with("# 7."))
        .nth(1)
        .unwrap_or_else(|| panic!("no keys command in {text}"));
    assert!(
        keys_command.contains(" keys --config ") && keys_command.contains(" create "),
        "{keys_command}"
    );
    let created = Command::new("sh").arg("-c").arg(keys_command).output().await.unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let created: Value = serde_json::from_slice(&created.stdout).unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let status = fresh_client()
            .post(format!("http://{gateway}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat_body("demo-chat", false))
            .send()
            .await
            .unwrap()
            .status();
        if status == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the demo never accepted the key it printed a command for"
        );
        sleep(Duration::from_millis(100)).await;
    }
    let reply: Value = serde_json::from_str(&outputs[0].1).unwrap();
    assert!(
        reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Hello Warden"),
        "{reply}"
    );
    assert!(outputs[1].1.trim_end().ends_with("data: [DONE]"), "{}", outputs[1].1);
    assert!(outputs[1].1.contains("Stream"), "{}", outputs[1].1);
    assert!(
        outputs[2].1.contains("\"code\":\"missing_api_key\""),
        "{}",
        outputs[2].1
    );
    assert!(outputs[3].1.contains("fraud-scorer"), "{}", outputs[3].1);
    let scores: Value = serde_json::from_str(&outputs[4].1).unwrap();
    assert!(scores["outputs"].is_array(), "{scores}");

    send_signal(pid, "TERM");
    let status = timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("the demo did not stop within 5 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}:\n{}", stderr());

    let audit = std::fs::read_to_string(audit_dir.path().join("warden-demo-audit.jsonl")).unwrap();
    let statuses: Vec<u64> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["status"].as_u64().unwrap())
        .collect();
    // The seven printed calls, then the new key's (401 until the store was read).
    assert_eq!(statuses[..7], [200, 200, 401, 403, 200, 200, 403], "{audit}");
    assert_eq!(statuses.last(), Some(&200), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_or_admin_token_reaches_a_log_line_or_the_audit_log() {
    let (chat, fraud) = demo_upstreams().await;
    let (listen, admin) = (free_address(), free_address());
    let secrets = tempfile::tempdir().unwrap();
    let token = "admin-token-0123456789abcdef0123456789abcdef";
    std::fs::write(secrets.path().join("admin.token"), token).unwrap();
    let yaml = binary_config(chat, fraud, listen, admin, "").replace(
        "api_keys:",
        &format!(
            "key_store:\n  sqlite: {}\n  refresh_interval: 200ms\napi_keys:",
            secrets.path().join("keys.db").display()
        ),
    );
    let yaml = yaml.replacen(
        &format!("address: {admin}"),
        &format!(
            "address: {admin}\n  token: {{ file: {} }}",
            secrets.path().join("admin.token").display()
        ),
        1,
    );
    let mut served = Served::start(&yaml, listen, admin).await;

    let created: Value = fresh_client()
        .post(format!("{}/admin/v1/keys", served.admin_url))
        .bearer_auth(token)
        .json(&serde_json::json!({"principal": "frank@acme.example", "tenants": ["acme"], "models": ["demo-chat"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(2);
    while served.chat_status(&key).await != StatusCode::OK {
        assert!(Instant::now() < deadline, "the new key was not accepted within 2 s");
        sleep(Duration::from_millis(50)).await;
    }
    // A wrong key that looks right, and the demo key, for good measure.
    let wrong = format!("{}x", &key[..key.len() - 1]);
    assert_eq!(served.chat_status(&wrong).await, StatusCode::UNAUTHORIZED);
    assert_eq!(served.chat_status(ACME).await, StatusCode::OK);

    served.signal("TERM");
    let status = timeout(Duration::from_secs(10), served.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let logs = served.stderr();
    assert!(logs.contains("DEBUG"), "debug logging was on");
    let audit: String = served.audit().iter().map(Value::to_string).collect();
    assert!(audit.contains(created["record"]["kid"].as_str().unwrap()));
    for secret in [key.as_str(), wrong.as_str(), ACME, token] {
        assert!(!logs.contains(secret), "a secret is in the logs");
        assert!(!audit.contains(secret), "a secret is in the audit log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_sharing_postgres_see_a_revocation_within_two_seconds() {
    let Some(url) = fresh_postgres().await else { return };
    let (chat, fraud) = demo_upstreams().await;
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("pg.url"), &url).unwrap();
    let token = "admin-token-0123456789abcdef0123456789abcdef";
    std::fs::write(secrets.path().join("admin.token"), token).unwrap();
    let process = |listen: SocketAddr, admin: SocketAddr| {
        binary_config(chat, fraud, listen, admin, "")
            .replace(
                "api_keys:",
                &format!(
                    "key_store:\n  postgres: {{ file: {} }}\n  refresh_interval: 500ms\napi_keys:",
                    secrets.path().join("pg.url").display()
                ),
            )
            .replacen(
                &format!("address: {admin}"),
                &format!(
                    "address: {admin}\n  token: {{ file: {} }}",
                    secrets.path().join("admin.token").display()
                ),
                1,
            )
    };
    let (listen_a, admin_a, listen_b, admin_b) = (free_address(), free_address(), free_address(), free_address());
    let first = Served::start(&process(listen_a, admin_a), listen_a, admin_a).await;
    let second = Served::start(&process(listen_b, admin_b), listen_b, admin_b).await;

    // Created through the first process's admin API...
    let created: Value = fresh_client()
        .post(format!("{}/admin/v1/keys", first.admin_url))
        .bearer_auth(token)
        .json(&serde_json::json!({"principal": "ivy@acme.example", "tenants": ["acme"], "models": ["*"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let kid = created["record"]["kid"].as_str().unwrap().to_owned();
    // ...accepted by both...
    for served in [&first, &second] {
        let deadline = Instant::now() + Duration::from_secs(2);
        while served.chat_status(&key).await != StatusCode::OK {
            assert!(
                Instant::now() < deadline,
                "a process did not accept the new key within 2 s"
            );
            sleep(Duration::from_millis(50)).await;
        }
    }
    // ...revoked through the first, refused by the second within 2 s.
    let revoked = fresh_client()
        .post(format!("{}/admin/v1/keys/{kid}/revoke", first.admin_url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    let started = Instant::now();
    while second.chat_status(&key).await != StatusCode::UNAUTHORIZED {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the other process still accepted a revoked key after 2 s"
        );
        sleep(Duration::from_millis(50)).await;
    }
    eprintln!("revocation reached the other process after {:?}", started.elapsed());
}

#[tokio::test]
async fn policy_test_and_explain_for_policy_authors() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let warden = |args: &[&str]| {
        std::process::Command::new(WARDEN)
            .args(["policy", "--config", &format!("{examples}/warden.yaml")])
            .args(args)
            .output()
            .unwrap()
    };
    let passing = warden(&["test", &format!("{examples}/policies/tests.yaml")]);
    let out = String::from_utf8_lossy(&passing.stdout).into_owned();
    assert!(passing.status.success(), "{out}");
    assert!(out.contains("policy: 8 passed, 0 failed"), "{out}");

    // A case that expects the wrong decision fails the run, and says why.
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.yaml");
    std::fs::write(
        &wrong,
        "- name: cross-tenant read\n  principal: { id: a, tenant: acme, tier: enterprise }\n  action: access\n  model: fraud-scorer\n  tenant: globex\n  expect: allow\n",
    )
    .unwrap();
    let failing = warden(&["test", wrong.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&failing.stdout).into_owned();
    assert!(!failing.status.success());
    assert!(
        out.contains("FAIL cross-tenant read: expected allow, got deny"),
        "{out}"
    );
    assert!(out.contains("policy: 0 passed, 1 failed"), "{out}");

    // Explain names the policy that decided.
    let explain = warden(&["explain", &format!("{examples}/policies/tests.yaml")]);
    assert!(explain.status.success());
    let text = String::from_utf8_lossy(&explain.stdout).into_owned();
    let decisions: Vec<Value> = serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .map(Result::unwrap)
        .collect();
    assert_eq!(decisions.len(), 8);
    let logprobs = decisions
        .iter()
        .find(|d| d["case"] == "no log-probabilities below enterprise")
        .unwrap();
    assert_eq!(logprobs["decision"], "deny");
    assert_eq!(
        logprobs["determining_policies"],
        serde_json::json!(["no-logprobs-below-enterprise"])
    );
    let own = decisions
        .iter()
        .find(|d| d["case"] == "a caller reads only its own tenant's data")
        .unwrap();
    assert_eq!(own["determining_policies"], serde_json::json!(["own-tenants-only"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_through_the_cli_restores_the_earlier_decisions() {
    let (chat, fraud) = demo_upstreams().await;
    let (listen, admin) = (free_address(), free_address());
    let files = tempfile::tempdir().unwrap();
    let policies = files.path().join("warden.cedar");
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policies/warden.cedarschema");
    let allow_all = "permit (principal, action, resource);\n";
    std::fs::write(&policies, allow_all).unwrap();
    let yaml = binary_config(chat, fraud, listen, admin, "").replace(
        "api_keys:",
        &format!(
            "policy:\n  cedar:\n    policies: {}\n    schema: {schema}\napi_keys:",
            policies.display()
        ),
    );
    let mut served = Served::start(&yaml, listen, admin).await;
    assert_eq!(served.chat_status(ACME).await, StatusCode::OK);

    // Version 2 stops acme's chat; it takes effect on SIGHUP.
    std::fs::write(
        &policies,
        format!(
            "{allow_all}@id(\"stop-acme-chat\")\nforbid (principal, action == Warden::Action::\"invoke\", resource == Warden::Model::\"demo-chat\") when {{ principal.tenant == \"acme\" }};\n"
        ),
    )
    .unwrap();
    served.signal("HUP");
    wait_for_status(&served, StatusCode::FORBIDDEN).await;

    let cli = |args: &[&str]| {
        std::process::Command::new(WARDEN)
            .args(["policy", "--config"])
            .arg(&served.config_path)
            .args(args)
            .output()
            .unwrap()
    };
    let history: Value = serde_json::from_slice(&cli(&["history"]).stdout).unwrap();
    let sequences: Vec<u64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(sequences, [1, 2]);

    let rolled = cli(&["rollback", "1"]);
    assert!(rolled.status.success(), "{}", String::from_utf8_lossy(&rolled.stderr));
    assert_eq!(std::fs::read_to_string(&policies).unwrap(), allow_all);
    served.signal("HUP");
    wait_for_status(&served, StatusCode::OK).await;

    served.signal("TERM");
    let status = timeout(Duration::from_secs(10), served.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

/// Waits (at most 3 s) until ACME's chat call gets `want`.
async fn wait_for_status(served: &Served, want: StatusCode) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let got = served.chat_status(ACME).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still {got} after 3 s; wanted {want}:\n{}",
            served.stderr()
        );
        sleep(Duration::from_millis(50)).await;
    }
}
