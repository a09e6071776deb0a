//! The operations listener: `/healthz` (the process is up), `/readyz` (it
//! serves traffic; 503 while draining), `/metrics` (Prometheus), and the
//! admin API under `/admin/v1/` ([`keys`], [`policy`], [`usage`]), which needs the admin token. It
//! binds to loopback by default and serves no model traffic. The AuthZEN
//! evaluation API ([`access`]), under `/access/v1/`, answers other PEPs with
//! the gateway's own policies and needs the same token.

pub mod access;
pub mod keys;
pub mod metrics;
pub mod policy;
pub mod request_metrics;
pub mod usage;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::gateway::Gateway;

/// Answers one operations request.
pub async fn handle(gateway: Arc<Gateway>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if policy::owns(&path) {
        return policy::handle(&gateway, req).await;
    }
    if usage::owns(&path) {
        return usage::handle(&gateway, req).await;
    }
    if path.starts_with("/admin/") {
        return keys::handle(&gateway, req).await;
    }
    if access::owns(&path) {
        return access::handle(&gateway, req).await;
    }
    let (status, content_type, body) = match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        (&Method::GET, "/readyz") if gateway.is_ready() => {
            (StatusCode::OK, "text/plain", Bytes::from_static(b"ready\n"))
        }
        (&Method::GET, "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            Bytes::from_static(b"draining\n"),
        ),
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Bytes::from(gateway.metrics.encode()),
        ),
        _ => (StatusCode::NOT_FOUND, "text/plain", Bytes::from_static(b"not found\n")),
    };
    reply(status, content_type, body)
}

/// `None` if the request carries the admin token; else the answer to give:
/// 404 when no token is configured (the admin API is off, as if absent),
/// or 401 with `WWW-Authenticate`.
fn refuse_without_token<B>(runtime: &crate::gateway::Runtime, req: &Request<B>) -> Option<Response<Full<Bytes>>> {
    let Some(token) = runtime.config.admin_token_sha256 else {
        return Some(error(StatusCode::NOT_FOUND, "not found"));
    };
    if keys::authorized(req, &token) {
        return None;
    }
    Some(unauthorized())
}

/// 401 with `WWW-Authenticate: Bearer`.
fn unauthorized() -> Response<Full<Bytes>> {
    let mut response = error(StatusCode::UNAUTHORIZED, "a valid admin token is required");
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// A JSON answer.
fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", Bytes::from(value.to_string()))
}

/// A JSON error answer: `{"error": message}`.
fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message }))
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
