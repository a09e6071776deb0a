//! Server-sent events pass through as they arrive: never buffered whole,
//! cut off with an error event when the upstream goes silent, and audited
//! however they end.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio::sync::{Notify, mpsc};

use crate::common::*;

const FIRST: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"first\"}}]}\n\n";
const LAST: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" last\"}}]}\n\n\
    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2,\"total_tokens\":6}}\n\n\
    data: [DONE]\n\n";

/// An SSE upstream that sends `FIRST`, waits for `release`, then sends the
/// events of `LAST` one by one (or, with `stall`, sends nothing more for 3 s).
async fn pausing_upstream(release: Arc<Notify>, stall: bool) -> std::net::SocketAddr {
    spawn_upstream(move |_req| {
        let release = Arc::clone(&release);
        async move {
            let (tx, rx) = mpsc::channel::<Bytes>(4);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(FIRST.as_bytes())).await;
                if stall {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    return;
                }
                release.notified().await;
                // One event at a time, with pauses: a write to a connection
                // the client has closed only fails once the peer's reset is
                // back, so a single final write could still "succeed".
                for event in LAST.split_inclusive("\n\n") {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    if tx.send(Bytes::from(event.to_owned())).await.is_err() {
                        return;
                    }
                }
            });
            sse_response(rx)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_event_arrives_before_the_upstream_sends_its_last() {
    let release = Arc::new(Notify::new());
    let upstream = pausing_upstream(Arc::clone(&release), false).await;
    let gw = TestGateway::start(&config(upstream, upstream, "")).await;
    let mut resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", true)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    // The upstream is holding back everything after FIRST until released, so
    // receiving FIRST proves it was relayed on its own.
    let first = tokio::time::timeout(Duration::from_secs(2), resp.chunk())
        .await
        .expect("first event not relayed while the upstream paused")
        .unwrap()
        .unwrap();
    assert_eq!(first, FIRST.as_bytes());
    release.notify_one();
    let mut received = first.to_vec();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        received.extend_from_slice(&chunk);
    }
    assert_eq!(received, format!("{FIRST}{LAST}").as_bytes());

    let records = gw.audit(1).await;
    let record = &records[0];
    assert_eq!(record["stream"], true);
    assert_eq!(record["outcome"], "completed");
    assert_eq!(record["response_sha256"], sha256_hex(&received));
    assert_eq!(record["response_bytes"], received.len());
    assert_eq!(record["usage"]["total_tokens"], 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_is_cut_off_with_an_error_event() {
    let upstream = pausing_upstream(Arc::new(Notify::new()), true).await;
    let gw = TestGateway::start(&config(upstream, upstream, "")).await;
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", true)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    // idle_timeout is 500ms in the harness config; the upstream stalls for 3s.
    let body = tokio::time::timeout(Duration::from_secs(2), resp.bytes())
        .await
        .expect("stream not cut off")
        .unwrap();
    let text = std::str::from_utf8(&body).unwrap();
    assert!(text.starts_with(FIRST), "{text}");
    assert!(
        text.ends_with("data: {\"error\":{\"message\":\"the model server did not answer in time\",\"type\":\"api_error\",\"param\":null,\"code\":\"upstream_timeout\"}}\n\n"),
        "{text}"
    );
    let records = gw.audit(1).await;
    assert_eq!(records[0]["outcome"], "upstream_idle_timeout");
    assert_eq!(records[0]["response_sha256"], sha256_hex(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_stream_is_still_audited() {
    let release = Arc::new(Notify::new());
    let upstream = pausing_upstream(Arc::clone(&release), false).await;
    let gw = TestGateway::start(&config(upstream, upstream, "")).await;
    let mut resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", true)).await;
    let first = resp.chunk().await.unwrap().unwrap();
    assert_eq!(first, FIRST.as_bytes());
    drop(resp);
    // The gateway notices when it next writes to the closed connection.
    release.notify_one();
    let records = gw.audit(1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["outcome"], "client_disconnected");
    assert_eq!(records[0]["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_model_streams_with_usage() {
    let gw = demo_gateway().await;
    let resp = post(&gw, "/v1/chat/completions", Some(ACME), &chat_body("demo-chat", true)).await;
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.len() > 3, "{text}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let records = gw.audit(1).await;
    assert!(records[0]["usage"]["completion_tokens"].as_u64().unwrap() > 0);
}
