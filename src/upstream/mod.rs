//! Stage 7, forward: the call to the model server. Each upstream has its own
//! pooled client (HTTP/1.1 or HTTP/2, plain or TLS) with a connect timeout;
//! the response head must arrive within the first-byte timeout. Warden
//! presents its own credential to the upstream and never the caller's, and
//! strips hop-by-hop headers both ways.
//!
//! A streamed (`text/event-stream`) answer to a streaming request is relayed
//! as it arrives; anything else is collected, bounded by the upstream's
//! `max_response_bytes`, so that later stages can inspect it whole.

pub mod pool;
pub mod sse;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::audit::Usage;
use crate::authz::Permit;
use crate::config::Upstream;
use crate::reject::Reject;

pub use pool::{Lease, UpstreamClient};

/// What to send upstream.
#[derive(Debug)]
pub struct Outbound<'a> {
    /// HTTP method.
    pub method: Method,
    /// Path on the upstream, without its prefix, e.g. `/v1/chat/completions`.
    pub path: String,
    /// The client's request headers; only end-to-end, non-credential ones go on.
    pub client_headers: &'a HeaderMap,
    /// The body.
    pub body: Bytes,
    /// `x-request-id`, passed on so upstream logs correlate.
    pub request_id: &'a HeaderValue,
    /// Whether the client asked for a stream.
    pub stream: bool,
}

/// The upstream's answer.
#[derive(Debug)]
pub struct Answer {
    /// Status and headers to send to the client.
    pub head: http::response::Parts,
    /// The body.
    pub body: AnswerBody,
    /// Usage reported in a collected JSON body.
    pub usage: Option<Usage>,
    /// Time to the response head.
    pub latency: Duration,
}

/// An upstream body, collected or still arriving.
#[derive(Debug)]
pub enum AnswerBody {
    /// Collected whole.
    Full(Bytes),
    /// An event stream to relay as it arrives, the longest silence allowed
    /// within it, and the connection it arrives on (back to the pool when
    /// the stream is done).
    Sse(hyper::body::Incoming, Duration, Lease),
}

/// Sends one request upstream. The [`Permit`] is proof that endpoint
/// authorization ran: nothing reaches a model without one.
pub async fn forward(
    _permit: &Permit,
    upstream: &Upstream,
    client: &UpstreamClient,
    out: Outbound<'_>,
) -> Result<Answer, Reject> {
    // Origin form; the pool adds `Host` (HTTP/1.1) or makes it absolute (HTTP/2).
    let uri = if upstream.path_prefix.is_empty() {
        http::Uri::try_from(out.path)
    } else {
        http::Uri::try_from(format!("{}{}", upstream.path_prefix, out.path))
    }
    .map_err(|_| Reject::UpstreamInvalid)?;
    let mut request = Request::builder()
        .method(out.method)
        .uri(uri)
        .body(Full::new(out.body))
        .map_err(|_| Reject::UpstreamInvalid)?;
    let headers = request.headers_mut();
    copy_end_to_end(out.client_headers, headers, CALLER_ONLY);
    headers.insert("x-request-id", out.request_id.clone());
    if let Some(credential) = &upstream.credential {
        headers.insert(credential.header.clone(), credential.value.clone());
    }

    let sent = Instant::now();
    let (response, lease) = match tokio::time::timeout(upstream.first_byte_timeout, client.send(request)).await {
        Err(_) => return Err(Reject::UpstreamTimeout),
        Ok(Err(e)) => {
            tracing::warn!(upstream = %upstream.name, error = %e, "upstream request failed");
            return Err(Reject::UpstreamUnreachable);
        }
        Ok(Ok(sent)) => sent,
    };
    let latency = sent.elapsed();
    let (parts, body) = response.into_parts();
    if parts.status == StatusCode::UNAUTHORIZED || parts.status == StatusCode::FORBIDDEN {
        tracing::error!(upstream = %upstream.name, status = %parts.status, "upstream refused the gateway's credential");
        return Err(Reject::UpstreamAuth);
    }

    let mut head = http::Response::new(()).into_parts().0;
    head.status = parts.status;
    copy_end_to_end(&parts.headers, &mut head.headers, &[]);

    if out.stream && parts.status.is_success() && is_event_stream(&parts.headers) {
        head.headers.remove(header::CONTENT_LENGTH);
        return Ok(Answer {
            head,
            body: AnswerBody::Sse(body, upstream.idle_timeout, lease),
            usage: None,
            latency,
        });
    }

    let bytes = collect(body, upstream.max_response_bytes, upstream.idle_timeout).await?;
    // Read to its end: the connection can serve the next request.
    drop(lease);
    let usage = if parts.status.is_success() && is_json(&parts.headers) {
        Usage::from_json(&bytes)
    } else {
        None
    };
    head.headers.remove(header::CONTENT_LENGTH);
    Ok(Answer {
        head,
        body: AnswerBody::Full(bytes),
        usage,
        latency,
    })
}

/// Reads a whole upstream body, no larger than `limit`, failing if the
/// upstream is silent for longer than `idle`.
async fn collect(mut body: hyper::body::Incoming, limit: usize, idle: Duration) -> Result<Bytes, Reject> {
    let mut buf = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(Reject::UpstreamTimeout),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "upstream body failed");
                return Err(Reject::UpstreamUnreachable);
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > limit {
                        tracing::warn!(limit, "upstream response exceeds max_response_bytes");
                        return Err(Reject::UpstreamInvalid);
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
}

/// Headers not passed upstream: the caller's credentials (never forwarded),
/// headers Warden sets itself, and `accept-encoding`, so that the upstream
/// answers uncompressed and its body can be inspected.
const CALLER_ONLY: &[&str] = &[
    "authorization",
    "cookie",
    "host",
    "content-length",
    "accept-encoding",
    "x-api-key",
    "x-request-id",
    "x-forwarded-for",
    "forwarded",
];

/// Headers meaningful only for one connection (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
];

/// Copies `from` into `to`, leaving out hop-by-hop headers, those the
/// `Connection` header names, and `skip`.
pub fn copy_end_to_end(from: &HeaderMap, to: &mut HeaderMap, skip: &[&str]) {
    let named_by_connection: Vec<&str> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for (name, value) in from {
        if HOP_BY_HOP.contains(&name.as_str())
            || skip.contains(&name.as_str())
            || named_by_connection
                .iter()
                .any(|c| c.eq_ignore_ascii_case(name.as_str()))
        {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("json"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_hop_by_hop_headers_stay_behind() {
        let mut from = HeaderMap::new();
        from.insert("authorization", "Bearer caller-secret".parse().unwrap());
        from.insert("x-api-key", "caller-secret".parse().unwrap());
        from.insert("cookie", "session=1".parse().unwrap());
        from.insert("connection", "keep-alive, x-private".parse().unwrap());
        from.insert("x-private", "1".parse().unwrap());
        from.insert("te", "trailers".parse().unwrap());
        from.insert("content-type", "application/json".parse().unwrap());
        from.insert("openai-organization", "org".parse().unwrap());
        let mut to = HeaderMap::new();
        copy_end_to_end(&from, &mut to, CALLER_ONLY);
        let mut names: Vec<&str> = to.keys().map(http::HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "openai-organization"]);
    }
}
