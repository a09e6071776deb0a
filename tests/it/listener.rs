//! The public listener: TLS with HTTP/2 by ALPN, h2c, request head limits,
//! slow clients, the connection limit and per-model body limits, exercised
//! with real clients and raw TCP.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::common::*;

/// A response read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads one HTTP/1.1 response (head, then a `Content-Length` body or
/// everything up to EOF). A reset after the head is treated as EOF: a server
/// that closes with unread request bytes resets the connection.
async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.unwrap_or_else(|e| {
            panic!(
                "read failed before a response head ({e}); got {:?}",
                String::from_utf8_lossy(&buf)
            )
        });
        assert!(
            n > 0,
            "connection closed before a complete response head; got {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let mut response = RawResponse {
        status,
        head,
        body: buf[head_end..].to_vec(),
    };
    let length = response.header("content-length").map(|v| v.parse::<usize>().unwrap());
    loop {
        if length.is_some_and(|len| response.body.len() >= len) {
            break;
        }
        match stream.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => response.body.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read failed in the response body: {e}"),
        }
    }
    if let Some(len) = length {
        assert_eq!(response.body.len(), len, "short body in {response:?}");
    }
    response
}

/// Sends `request` on a new connection and reads the response, bounded.
async fn exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    timeout(Duration::from_secs(3), async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        read_response(&mut stream).await
    })
    .await
    .expect("no response within 3 s")
}

fn address(gw: &TestGateway) -> SocketAddr {
    gw.running.as_ref().unwrap().address
}

/// A `GET /v1/models` request head with `extra` header lines (each ending in CRLF).
fn models_request(extra: &str) -> Vec<u8> {
    format!(
        "GET /v1/models HTTP/1.1\r\nHost: warden\r\nAuthorization: Bearer {ACME}\r\nConnection: close\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// Writes a self-signed certificate for `localhost` and 127.0.0.1 into
/// `dir`; returns the `tls:` block for the listener and the certificate PEM.
fn self_signed_tls(dir: &Path) -> (String, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert_pem = certified.cert.pem();
    let cert_file = dir.join("server.crt");
    let key_file = dir.join("server.key");
    std::fs::write(&cert_file, &cert_pem).unwrap();
    std::fs::write(&key_file, certified.signing_key.serialize_pem()).unwrap();
    let block = format!(
        "  tls:\n    cert_file: {}\n    key_file: {}",
        cert_file.display(),
        key_file.display()
    );
    (block, cert_pem)
}

fn tls_client(cert_pem: &str, addr: SocketAddr, http1_only: bool) -> reqwest::Client {
    let cert = reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap();
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .https_only(true)
        .tls_certs_only([cert])
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(5));
    if http1_only {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}

async fn assert_chat_reply(resp: reqwest::Response) {
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("Hello Warden"), "{content}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_negotiates_http2_by_alpn_and_still_serves_http1() {
    let certs = tempfile::tempdir().unwrap();
    let (tls, cert_pem) = self_signed_tls(certs.path());
    let (chat, fraud) = demo_upstreams().await;
    let gw = TestGateway::start(&config(chat, fraud, &tls)).await;
    let addr = address(&gw);
    let url = format!("https://localhost:{}/v1/chat/completions", addr.port());

    let h2 = tls_client(&cert_pem, addr, false);
    let resp = h2
        .post(&url)
        .bearer_auth(ACME)
        .json(&chat_body("demo-chat", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2, "ALPN did not select h2");
    assert_chat_reply(resp).await;

    let h1 = tls_client(&cert_pem, addr, true);
    let resp = h1
        .post(&url)
        .bearer_auth(ACME)
        .json(&chat_body("demo-chat", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_11);
    assert_chat_reply(resp).await;

    // The same request by IP address: the certificate also names 127.0.0.1.
    let resp = h2
        .post(format!("https://{addr}/v1/chat/completions"))
        .bearer_auth(ACME)
        .json(&chat_body("demo-chat", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_chat_reply(resp).await;

    // Plain HTTP to the TLS listener gets no HTTP answer.
    let plain = client()
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(ACME)
        .json(&chat_body("demo-chat", false))
        .timeout(Duration::from_secs(3))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered on the TLS listener: {plain:?}");

    let records = gw.audit(3).await;
    assert_eq!(records.len(), 3, "{records:?}");
    assert!(records.iter().all(|r| r["status"] == 200), "{records:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_is_served() {
    let gw = demo_gateway().await;
    let h2c = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let resp = h2c
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(ACME)
        .json(&chat_body("demo-chat", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_chat_reply(resp).await;

    // A streamed reply over h2c arrives whole, ending in [DONE].
    let resp = h2c
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(ACME)
        .json(&chat_body("demo-chat", true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let text = resp.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_get_431() {
    let (chat, fraud) = demo_upstreams().await;
    let gw = TestGateway::start(&config(chat, fraud, "  max_header_bytes: 8KiB\n  max_headers: 20")).await;
    let addr = address(&gw);

    // A 6 KiB header fits in 8 KiB; a 20 KiB one does not.
    let resp = exchange(
        addr,
        &models_request(&format!("X-Padding: {}\r\n", "a".repeat(6 * 1024))),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.json()["object"], "list");
    let resp = exchange(
        addr,
        &models_request(&format!("X-Padding: {}\r\n", "a".repeat(20 * 1024))),
    )
    .await;
    assert_eq!(resp.status, 431, "{resp:?}");
    assert!(
        resp.head
            .starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{}",
        resp.head
    );

    // Host, Authorization and Connection plus 17 more is exactly 20 headers;
    // one more is too many.
    let headers = |n: usize| (0..n).map(|i| format!("X-Extra-{i}: {i}\r\n")).collect::<String>();
    let resp = exchange(addr, &models_request(&headers(17))).await;
    assert_eq!(resp.status, 200, "20 headers must be accepted: {resp:?}");
    let resp = exchange(addr, &models_request(&headers(18))).await;
    assert_eq!(resp.status, 431, "21 headers must be refused: {resp:?}");
    let resp = exchange(addr, &models_request(&headers(60))).await;
    assert_eq!(resp.status, 431, "{resp:?}");

    // hyper refuses these before Warden's pipeline sees them: only the two
    // accepted requests are audited.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let records = gw.audit(2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(records.iter().all(|r| r["status"] == 200), "{records:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_head_is_disconnected() {
    let (chat, fraud) = demo_upstreams().await;
    let gw = TestGateway::start(&config(chat, fraud, "  header_read_timeout: 300ms")).await;
    let mut stream = TcpStream::connect(address(&gw)).await.unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 1024];
    let read = timeout(Duration::from_millis(1500), stream.read(&mut buf))
        .await
        .expect("the connection was still open 1.5 s after a partial request head (header_read_timeout 300ms)");
    let elapsed = started.elapsed();
    match read {
        // Closed without a response: what hyper does on a header timeout.
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        // Or a 408 before closing.
        Ok(n) => {
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(
                text.starts_with("HTTP/1.1 408 "),
                "unexpected answer to a partial head: {text:?}"
            );
        }
        Err(e) => panic!("unexpected read error: {e}"),
    }
    assert!(
        elapsed >= Duration::from_millis(250),
        "closed after {elapsed:?}, before the header timeout"
    );
}

/// A connection that never sends a byte must not hold a connection slot
/// longer than the header read timeout: otherwise `max_connections` silent
/// sockets lock every client out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_by_the_header_read_timeout() {
    let (chat, fraud) = demo_upstreams().await;
    let gw = TestGateway::start(&config(
        chat,
        fraud,
        "  header_read_timeout: 300ms\n  max_connections: 1",
    ))
    .await;
    let addr = address(&gw);
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Let the gateway accept it and start waiting for its first byte.
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Another client, sending a complete request, must get through once the
    // silent connection has been dropped (300 ms).
    let resp = timeout(Duration::from_secs(2), async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&models_request("")).await.unwrap();
        read_response(&mut stream).await
    })
    .await
    .expect("a silent connection held the only connection slot for 2 s despite header_read_timeout: 300ms");
    assert_eq!(resp.status, 200);

    let mut buf = [0u8; 64];
    let read = timeout(Duration::from_millis(500), silent.read(&mut buf))
        .await
        .expect("the silent connection is still open");
    assert!(
        matches!(read, Ok(0)) || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    let (chat, fraud) = demo_upstreams().await;
    let gw = TestGateway::start(&config(chat, fraud, "  body_read_timeout: 300ms")).await;
    let mut stream = TcpStream::connect(address(&gw)).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ACME}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(b"{\"model\":").await.unwrap();
    let started = Instant::now();
    let resp = timeout(Duration::from_millis(1500), read_response(&mut stream))
        .await
        .expect("no answer 1.5 s after a stalled body (body_read_timeout 300ms)");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(250), "answered after {elapsed:?}");
    assert_eq!(resp.status, 408, "{resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("x-should-retry"), Some("true"));
    assert_eq!(
        resp.json(),
        json!({"error": {
            "message": "request body not received in time",
            "type": "invalid_request_error",
            "param": null,
            "code": "request_timeout",
        }})
    );

    let records = gw.audit(1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record["status"], 408);
    assert_eq!(record["reject_reason"], "request_timeout");
    assert_eq!(record["fault"], "client");
    assert_eq!(record["principal"], "alice@acme.example");
    assert_eq!(record["path"], "/v1/chat/completions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let (chat, fraud) = demo_upstreams().await;
    let gw = TestGateway::start(&config(chat, fraud, "  max_connections: 1")).await;
    let addr = address(&gw);
    let keep_alive =
        format!("GET /v1/models HTTP/1.1\r\nHost: warden\r\nAuthorization: Bearer {ACME}\r\n\r\n").into_bytes();

    // The first connection is served and kept open.
    let mut first = TcpStream::connect(addr).await.unwrap();
    first.write_all(&keep_alive).await.unwrap();
    let resp = timeout(Duration::from_secs(2), read_response(&mut first))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_ne!(resp.header("connection"), Some("close"));

    // The second connects (the kernel queues it) but is not served.
    let mut second = TcpStream::connect(addr).await.unwrap();
    second.write_all(&keep_alive).await.unwrap();
    let mut buf = [0u8; 1];
    let early = timeout(Duration::from_millis(300), second.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "a second connection was served beyond max_connections: 1: {early:?}"
    );

    // The first still works while it holds the slot.
    first.write_all(&keep_alive).await.unwrap();
    let resp = timeout(Duration::from_secs(2), read_response(&mut first))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);

    drop(first);
    let resp = timeout(Duration::from_secs(2), read_response(&mut second))
        .await
        .expect("the waiting connection was not served after the first closed");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["object"], "list");
}

/// The smallest OIP v2 fraud request of at least `bytes` bytes.
fn fraud_body_of_at_least(bytes: usize) -> Vec<u8> {
    (1..)
        .map(|n| serde_json::to_vec(&fraud_body(n)).unwrap())
        .find(|b| b.len() >= bytes)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_model_has_its_own_body_limit() {
    let gw = demo_gateway().await;
    let infer = format!("{}/v2/models/fraud-scorer/infer", gw.url);

    // Under fraud-scorer's 2 KiB: scored.
    let small = fraud_body_of_at_least(1024);
    assert!(small.len() < 2048);
    let resp = client()
        .post(&infer)
        .bearer_auth(ACME)
        .header("content-type", "application/json")
        .body(small)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // 3 KiB, declared by Content-Length: refused up front.
    let big = fraud_body_of_at_least(3 * 1024);
    assert!(big.len() < 4 * 1024);
    let resp = client()
        .post(&infer)
        .bearer_auth(ACME)
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"error":"request body exceeds 2048 bytes"}"#
    );

    // The same 3 KiB without a declared length (chunked): cut off at the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big.chunks(512).map(|c| Ok(c.to_vec())).collect();
    let resp = client()
        .post(&infer)
        .bearer_auth(ACME)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        resp.text().await.unwrap(),
        r#"{"error":"request body exceeds 2048 bytes"}"#
    );

    // A 3 KiB chat body is well within demo-chat's 64 KiB.
    let text = format!("Hello Warden {}", "padding ".repeat(400));
    let chat = json!({"model": "demo-chat", "messages": [{"role": "user", "content": text}]});
    let chat_len = serde_json::to_vec(&chat).unwrap().len();
    assert!((3 * 1024..4 * 1024).contains(&chat_len), "{chat_len}");
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat).await;
    assert_chat_reply(resp).await;

    let records = gw.audit(4).await;
    assert_eq!(records.len(), 4, "{records:?}");
    let too_large: Vec<&Value> = records.iter().filter(|r| r["status"] == 413).collect();
    assert_eq!(too_large.len(), 2, "{records:?}");
    for r in too_large {
        assert_eq!(r["reject_reason"], "request_too_large");
        assert_eq!(r["model"], "fraud-scorer");
    }
}
