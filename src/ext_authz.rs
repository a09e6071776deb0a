//! Warden as Envoy's external authorizer: the ext_authz gRPC API
//! (`envoy.service.auth.v3.Authorization/Check`), so that an Envoy or Istio
//! mesh asks Warden, request by request, what the gateway itself would
//! decide for a model call.
//!
//! Each `CheckRequest` goes through the gateway's own stages, with the
//! current runtime (a reload applies to the next check):
//!
//! 1. **Subject.** The credential in the client's headers as Envoy forwards
//!    them (`authorization: Bearer`, `x-api-key`, `x-warden-aws-iam`),
//!    verified by Warden itself exactly as on the public listener: API keys,
//!    JWTs, introspection, AWS IAM, with the same failure lockout (by the
//!    client address Envoy reports). No header that merely *names* a
//!    principal (an `x-…-principal` set upstream of Warden) is trusted: a
//!    client could send it itself wherever the proxy does not strip it, and
//!    Warden can check the credential directly. Only with
//!    `ext_authz.trust_source_principal` does a request without a credential
//!    get an identity from `attributes.source.principal` — the SPIFFE ID
//!    Envoy read from the client's verified certificate — and only if it is
//!    one of the `mtls` clients. Anyone who can reach this listener can put
//!    any principal there, hence off by default. Otherwise no credential
//!    means 401.
//! 2. **Resource.** The model: `attributes.context_extensions["model"]`,
//!    which only the Envoy operator sets (per route, in `check_settings`);
//!    else the model in an OIP v2 path (`/v2/models/{m}/…`); else, on an
//!    OpenAI route, the body's `model` (Envoy sends the body with
//!    `with_request_body`). It must be a configured model (404 otherwise,
//!    as on the gateway); a request that names none is refused with 403.
//! 3. **Action.** `invoke` on the model: the endpoint level, with every
//!    check of [`crate::authz::authorize_endpoint`] — the model accepts the
//!    way the caller authenticated, has its certificate if it
//!    `require_mtls`, the credential's own model grant names it, and the
//!    policy engine permits it.
//!
//! Allowed: `OkHttpResponse`, with `x-warden-principal` and `x-warden-tenant`
//! set (overwritten, never appended) on the request Envoy forwards. Refused:
//! `DeniedHttpResponse` with the status, headers and body the gateway would
//! have sent (401, 403 policy deny, 404, 429 …, in the route's error format).
//! A policy engine that fails denies (fail closed); so does anything Warden
//! cannot read. Decisions are logged at debug level, never a credential.
//!
//! The listener is plain HTTP/2 (h2c), with the public listener's
//! connection limits and drain; bind it where only the proxy reaches it.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, HeaderAppendAction, HttpStatus,
};
use envoy_types::ext_authz::v3::{CheckRequestExt, CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tonic::codegen::Service;

use crate::authn::Identity;
use crate::config::Protocol;
use crate::gateway::{Gateway, Runtime};
use crate::reject::Reject;
use crate::server::{self, ListenerOptions, Peer, ShutdownSignal};

/// Largest `CheckRequest` accepted: headers plus a body Envoy buffered for
/// us (`with_request_body.max_request_bytes`), well above what a model
/// request needs to name its model.
const MAX_CHECK_BYTES: usize = 1024 * 1024;

/// The context extension naming the model (set by the Envoy operator).
pub const MODEL_EXTENSION: &str = "model";

/// The ext_authz service.
#[derive(Debug)]
pub struct ExtAuthz {
    gateway: Arc<Gateway>,
}

/// Serves the ext_authz API on `listener` until `shutdown`, then drains it
/// like the other listeners.
pub async fn serve(
    listener: TcpListener,
    options: ListenerOptions,
    gateway: Arc<Gateway>,
    shutdown: ShutdownSignal,
) -> std::io::Result<()> {
    let address = listener.local_addr()?;
    let trusting = gateway
        .runtime()
        .config
        .ext_authz
        .as_ref()
        .is_some_and(|e| e.trust_source_principal);
    if trusting && !address.ip().is_loopback() {
        tracing::warn!(
            %address,
            "ext_authz trusts the principal its callers report and is reachable off this host: whoever reaches it can claim to be any mtls client"
        );
    }
    tracing::info!(%address, trust_source_principal = trusting, "ext_authz listening");
    let service = AuthorizationServer::new(ExtAuthz { gateway }).max_decoding_message_size(MAX_CHECK_BYTES);
    server::serve(
        listener,
        options,
        None,
        move |req, peer| call(service.clone(), req, peer),
        shutdown,
    )
    .await
}

async fn call(
    mut service: AuthorizationServer<ExtAuthz>,
    mut req: http::Request<Incoming>,
    peer: Arc<Peer>,
) -> http::Response<tonic::body::Body> {
    // The connection's peer, for when Envoy reports no client address.
    req.extensions_mut().insert(peer);
    match service.call(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let connection = request.extensions().get::<Arc<Peer>>().map(|p| p.addr.ip());
        let check = request.into_inner();
        let runtime = self.gateway.runtime();
        let answer = match decide(&runtime, &check, connection).await {
            Ok(allowed) => {
                tracing::debug!(
                    principal = allowed.principal,
                    model = allowed.model,
                    "ext_authz: allowed"
                );
                allowed.response()
            }
            Err(refusal) => {
                tracing::debug!(reason = refusal.code(), "ext_authz: denied");
                refusal.response()
            }
        };
        Ok(tonic::Response::new(answer))
    }
}

/// A permitted check.
#[derive(Debug)]
struct Allowed {
    principal: String,
    tenant: String,
    model: String,
}

impl Allowed {
    fn response(&self) -> CheckResponse {
        let mut ok = OkHttpResponseBuilder::new();
        // Overwrite: a client's own `x-warden-*` header must not survive
        // beside (or instead of) the verified one.
        let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
        ok.add_header("x-warden-principal", &self.principal, overwrite, false);
        ok.add_header("x-warden-tenant", &self.tenant, overwrite, false);
        let mut response = CheckResponse::with_status(tonic::Status::ok("allowed"));
        response.set_http_response(ok);
        response
    }
}

/// A refused check, in the format of the route it was for.
#[derive(Debug)]
struct Refusal {
    /// What the gateway would have refused it with; `None` when the request
    /// names no model Warden could decide for.
    reject: Option<Reject>,
    protocol: Protocol,
}

impl Refusal {
    fn code(&self) -> &'static str {
        self.reject.as_ref().map_or("no_model", Reject::code)
    }

    fn response(&self) -> CheckResponse {
        let (status, headers, body) = match &self.reject {
            Some(reject) => {
                let (parts, body) = reject.into_parts(self.protocol);
                (parts.status, parts.headers, body)
            }
            None => {
                let message = "Warden cannot tell which model this request is for";
                let body = match self.protocol {
                    Protocol::Openai => serde_json::json!({"error": {
                        "message": message, "type": "permission_error", "param": "model", "code": "no_model",
                    }}),
                    Protocol::OipV2 => serde_json::json!({ "error": message }),
                };
                let mut headers = HeaderMap::new();
                headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
                (StatusCode::FORBIDDEN, headers, bytes::Bytes::from(body.to_string()))
            }
        };
        let mut denied = DeniedHttpResponseBuilder::new();
        for (name, value) in &headers {
            if let Ok(value) = value.to_str() {
                denied.add_header(
                    name.as_str(),
                    value,
                    Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
                    false,
                );
            }
        }
        denied.set_body(String::from_utf8_lossy(&body));
        let mut denied = denied.build();
        denied.status = Some(HttpStatus {
            code: i32::from(status.as_u16()),
        });
        let message = self
            .reject
            .as_ref()
            .map_or_else(|| "no model".to_owned(), ToString::to_string);
        let grpc = match status {
            StatusCode::UNAUTHORIZED => tonic::Status::unauthenticated(message),
            StatusCode::TOO_MANY_REQUESTS => tonic::Status::resource_exhausted(message),
            s if s.is_server_error() => tonic::Status::unavailable(message),
            _ => tonic::Status::permission_denied(message),
        };
        let mut response = CheckResponse::with_status(grpc);
        response.set_http_response(denied);
        response
    }
}

/// Decides one check as the gateway would decide the request it describes.
async fn decide(rt: &Runtime, check: &CheckRequest, connection: Option<IpAddr>) -> Result<Allowed, Refusal> {
    let attributes = check.attributes.as_ref();
    let http = attributes
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref());
    // `path` is the request target: the query is not part of the route.
    let target = http.map_or("", |h| h.path.as_str());
    let path = target.split('?').next().unwrap_or_default();
    let protocol = crate::route::protocol_of_path(path);
    let refuse = |reject: Reject| Refusal {
        reject: Some(reject),
        protocol,
    };
    let headers = http.map(headers_of).unwrap_or_default();
    let client_ip = check
        .get_client_address()
        .and_then(|a| a.parse::<IpAddr>().ok())
        .or(connection)
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));

    // 1 the subject, with the gateway's lockout: a guess through Envoy
    // counts as a guess.
    let key_id = crate::authn::presented_key_id(&headers);
    if let Some(wait) = rt.lockout.blocked(client_ip, key_id) {
        return Err(refuse(Reject::TooManyAuthFailures(wait)));
    }
    let source_principal = attributes
        .and_then(|a| a.source.as_ref())
        .map(|s| s.principal.as_str())
        .filter(|p| !p.is_empty());
    let identity = match authenticate(rt, &headers, source_principal).await {
        Ok(identity) => identity,
        Err(reject) if reject.status() == StatusCode::UNAUTHORIZED && reject != Reject::MissingCredential => {
            rt.lockout.record_failure(client_ip, key_id);
            return Err(refuse(reject));
        }
        Err(reject) => return Err(refuse(reject)),
    };

    // 2 the resource.
    let Some((name, path_protocol)) = model_of(rt, check, http, path).map_err(refuse)? else {
        return Err(Refusal { reject: None, protocol });
    };
    let model = match rt.config.models.get(&name) {
        Some(m) if path_protocol.is_none_or(|p| p == m.protocol) => Arc::clone(m),
        _ => return Err(refuse(Reject::ModelNotFound(name))),
    };

    // 3 the endpoint decision, every check of it.
    let mut decisions = Vec::new();
    crate::authz::authorize_endpoint(&identity, &model, rt.pdp(), &mut decisions)
        .await
        .map_err(refuse)?;
    Ok(Allowed {
        principal: identity.principal().to_owned(),
        tenant: identity.key.as_ref().map(|k| k.tenant.clone()).unwrap_or_default(),
        model: model.name.clone(),
    })
}

/// The client's request headers as Envoy forwards them (the map, or the raw
/// list with `encode_raw_headers`). Pseudo-headers and anything that is not
/// a valid header are left out: they carry no credential.
fn headers_of(http: &HttpRequest) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut add = |name: &str, value: &[u8]| {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value)) {
            headers.append(name, value);
        }
    };
    for (name, value) in &http.headers {
        add(name, value.as_bytes());
    }
    if let Some(raw) = &http.header_map {
        for h in &raw.headers {
            let value = if h.raw_value.is_empty() {
                h.value.as_bytes()
            } else {
                &h.raw_value
            };
            add(&h.key, value);
        }
    }
    headers
}

/// Who the check is for: the credential the client sent, verified here, or
/// (when trusted and the request has none) the peer identity Envoy reports.
async fn authenticate(rt: &Runtime, headers: &HeaderMap, source_principal: Option<&str>) -> Result<Identity, Reject> {
    let trusted = rt.config.ext_authz.as_ref().is_some_and(|e| e.trust_source_principal);
    let client = match (trusted, source_principal, &rt.config.mtls) {
        (true, Some(principal), Some(mtls)) => mtls.clients.get(principal).cloned(),
        _ => None,
    };
    // As on the gateway: a known certificate beside a credential counts for
    // models that `require_mtls`.
    crate::authn::authenticate_with_certificate(headers, rt.authenticators(), client).await
}

/// The model the check is about and, when the path named it, the protocol
/// the path implies. `None` when nothing names one.
fn model_of(
    rt: &Runtime,
    check: &CheckRequest,
    http: Option<&HttpRequest>,
    path: &str,
) -> Result<Option<(String, Option<Protocol>)>, Reject> {
    if let Some(name) = check
        .attributes
        .as_ref()
        .and_then(|a| a.context_extensions.get(MODEL_EXTENSION))
    {
        return Ok(Some((name.clone(), None)));
    }
    let Some(http) = http else { return Ok(None) };
    let Ok(method) = Method::from_bytes(http.method.as_bytes()) else {
        return Ok(None);
    };
    let Ok(route) = crate::route::route(&method, path) else {
        return Ok(None);
    };
    if let Some(name) = route.model {
        return Ok(Some((name, Some(route.protocol))));
    }
    if !route.operation.has_body() {
        return Ok(None);
    }
    let body = if http.raw_body.is_empty() {
        http.body.as_bytes()
    } else {
        &http.raw_body
    };
    if body.is_empty() {
        return Ok(None);
    }
    let json = crate::request::parse_json_object(body, rt.config.listen.limits.max_json_depth)?;
    let name = crate::request::model_field(&json)?;
    Ok(Some((name.to_owned(), Some(route.protocol))))
}
