//! Upstream connections are pooled per worker: reused across requests and
//! streams while they stay open, and never reused once the upstream has
//! closed them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::common::*;

const COMPLETION: &str = r#"{"id":"c1","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;

/// One worker, so that every request uses the same pool.
const ONE_WORKER: &str = "  workers: 1";

/// A keep-alive upstream that counts the connections it accepts; streamed
/// requests get a two-event SSE answer, the others a JSON completion.
async fn counting_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    use http_body_util::BodyExt;
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let streamed = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["stream"] == true;
                    let response = if streamed {
                        let (tx, rx) = tokio::sync::mpsc::channel(4);
                        tx.send(Bytes::from_static(b"data: {\"choices\":[]}\n\n"))
                            .await
                            .unwrap();
                        tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await.unwrap();
                        sse_response(rx)
                    } else {
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(full(COMPLETION))
                            .unwrap()
                    };
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upstream_connection_serves_requests_and_streams_one_after_another() {
    let (upstream, accepted) = counting_upstream().await;
    let gw = TestGateway::start(&config(upstream, upstream, ONE_WORKER)).await;
    for i in 0..30 {
        let stream = i % 3 == 2;
        let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", stream)).await;
        assert_eq!(resp.status(), StatusCode::OK, "request {i}");
        let text = resp.text().await.unwrap();
        if stream {
            assert!(text.ends_with("data: [DONE]\n\n"), "request {i}: {text}");
        } else {
            assert_eq!(text, COMPLETION, "request {i}");
        }
    }
    // Each exchange gave its connection back to the pool once its body (or
    // stream) was done, so the next one found it.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let records = gw.audit(30).await;
    assert!(
        records
            .iter()
            .all(|r| r["status"] == 200 && r["outcome"] == "completed")
    );
}

/// An upstream that answers one request per connection as if it kept the
/// connection alive (no `Connection: close`), then closes it: the pool must
/// notice, never send a request on it, and open a new one.
async fn closing_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // Head, then as many body bytes as Content-Length says.
                let (head_end, length) = loop {
                    let n = stream.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the gateway closed before sending a request");
                    request.extend_from_slice(&buf[..n]);
                    if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap());
                        break (end + 4, length);
                    }
                };
                while request.len() < head_end + length {
                    let n = stream.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the gateway closed mid-body");
                    request.extend_from_slice(&buf[..n]);
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{COMPLETION}",
                    COMPLETION.len()
                );
                stream.write_all(response.as_bytes()).await.unwrap();
                // Closed without a word, as an upstream whose keep-alive
                // timeout has just run out does.
                drop(stream);
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_upstream_closed_is_never_used_again() {
    let (upstream, accepted) = closing_upstream().await;
    let gw = TestGateway::start(&config(upstream, upstream, ONE_WORKER)).await;
    for i in 0..30 {
        let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", false)).await;
        assert_eq!(resp.status(), StatusCode::OK, "request {i}");
        assert_eq!(resp.text().await.unwrap(), COMPLETION, "request {i}");
        // Give the closed connection time to be noticed, or not: either
        // way no request may fail.
        if i % 2 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 30);
}
