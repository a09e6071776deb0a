//! Embedded demo upstreams for `warden demo`, the integration tests and the benchmark.
//!
//! Two small, real HTTP servers (HTTP/1.1 and h2c on the same port) that stand in for the model
//! servers Warden normally fronts:
//!
//! * [`chat`] simulates an OpenAI-compatible chat/completions/embeddings API. It does no
//!   inference: replies are derived deterministically from the request and "tokens" are counted
//!   as whitespace-separated words.
//! * [`fraud`] serves a genuine (if tiny) fraud-scoring model, a logistic regression with fixed
//!   weights, over the Open Inference Protocol v2.
//!
//! Both answer deterministically, never block, sleep or lock on the request path (the benchmark
//! uses them as the upstream), and turn every malformed request into a 4xx instead of panicking.

pub mod chat;
pub mod fraud;
pub mod issuer;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Largest request body the simulators accept; a 10 000-row OIP batch is well under 2 MiB.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Serves the OpenAI-compatible chat simulator on `listener` until the task is dropped/aborted.
pub async fn serve_chat_simulator(listener: TcpListener) {
    serve(listener, "chat simulator", chat::handle).await;
}

/// Serves the OIP v2 fraud-scoring model on `listener` until the task is dropped/aborted.
pub async fn serve_fraud_model(listener: TcpListener) {
    serve(listener, "fraud model", fraud::handle).await;
}

async fn serve<F, Fut>(listener: TcpListener, name: &'static str, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Response<DemoBody>> + Send + 'static,
{
    let builder = Builder::new(TokioExecutor::new());
    // Connections live in a JoinSet so that aborting the server also closes its connections.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        tracing::warn!(%error, server = name, "demo upstream accept failed");
                        // Errors such as EMFILE persist; back off briefly instead of spinning.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                // SSE events are written as separate frames; Nagle would hold them back.
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%error, "demo upstream could not set TCP_NODELAY");
                }
                let builder = builder.clone();
                connections.spawn(async move {
                    let service =
                        service_fn(move |req| async move { Ok::<_, Infallible>(handler(req).await) });
                    if let Err(error) = builder.serve_connection(TokioIo::new(stream), service).await {
                        tracing::debug!(%peer, %error, server = name, "demo upstream connection error");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Response body made of pre-rendered chunks, each sent as its own frame.
///
/// Everything the simulators send is known up front, so a queue of `Bytes` is all a streamed
/// (SSE) response needs, without boxing or channels.
pub(crate) struct DemoBody {
    chunks: VecDeque<Bytes>,
    streaming: bool,
}

impl DemoBody {
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        Self {
            chunks: VecDeque::from([bytes.into()]),
            streaming: false,
        }
    }

    /// A body whose length is not announced, so HTTP/1.1 uses chunked encoding like a real
    /// streaming upstream would.
    pub(crate) fn stream(chunks: Vec<Bytes>) -> Self {
        Self {
            chunks: chunks.into(),
            streaming: true,
        }
    }
}

impl Body for DemoBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.chunks.pop_front().map(|chunk| Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.streaming {
            SizeHint::default()
        } else {
            SizeHint::with_exact(self.chunks.iter().map(|c| c.len() as u64).sum())
        }
    }
}

pub(crate) fn response(status: StatusCode, content_type: &'static str, body: DemoBody) -> Response<DemoBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub(crate) fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<DemoBody> {
    match serde_json::to_vec(value) {
        Ok(bytes) => response(status, "application/json", DemoBody::full(bytes)),
        Err(error) => {
            tracing::error!(%error, "demo upstream failed to serialise a response");
            response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "application/json",
                DemoBody::full(&br#"{"error":"internal serialisation error"}"#[..]),
            )
        }
    }
}

/// Reads a whole request body, capped at [`MAX_BODY_BYTES`]; the error is ready for the caller to
/// wrap in its protocol's error format.
pub(crate) async fn read_body(body: Incoming) -> Result<Bytes, (StatusCode, &'static str)> {
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => {
            Err((StatusCode::PAYLOAD_TOO_LARGE, "request body exceeds 16 MiB"))
        }
        Err(_) => Err((StatusCode::BAD_REQUEST, "request body could not be read")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn streamed_bodies_keep_their_frames_and_hide_their_length() {
        let mut body = DemoBody::stream(vec![Bytes::from_static(b"a"), Bytes::from_static(b"bc")]);
        assert_eq!(body.size_hint().exact(), None);
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame.unwrap().into_data().unwrap());
        }
        assert_eq!(frames, ["a", "bc"]);
        assert!(body.is_end_stream());
        assert_eq!(DemoBody::full(&b"xyz"[..]).size_hint().exact(), Some(3));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod test_support {
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http::{HeaderMap, Request, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tokio::net::TcpListener;

    /// Binds an ephemeral port and runs `serve` on it for the rest of the test's runtime.
    pub async fn start<F, Fut>(serve: F) -> SocketAddr
    where
        F: FnOnce(TcpListener) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener));
        addr
    }

    pub struct Reply {
        pub status: StatusCode,
        pub headers: HeaderMap,
        pub body: Bytes,
    }

    impl Reply {
        pub fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).unwrap()
        }

        pub fn text(&self) -> &str {
            std::str::from_utf8(&self.body).unwrap()
        }
    }

    pub async fn send(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Reply {
        send_with(addr, method, path, body, false).await
    }

    pub async fn send_with(addr: SocketAddr, method: &str, path: &str, body: Option<&str>, http2: bool) -> Reply {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build_http::<Full<Bytes>>();
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))
            .unwrap();
        let response = client.request(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply { status, headers, body }
    }
}
