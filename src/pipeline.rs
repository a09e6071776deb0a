//! The life of a request, top to bottom. [`handle`] is the whole of it: each
//! stage is one call, in request order, and any stage may stop the request
//! with a [`Reject`], which becomes a response in one place. Whatever
//! happens, the exchange is finished once — audit record and metrics — when
//! its response body ends or the client goes away.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use hyper::body::Incoming;

use crate::authn::Identity;
use crate::authz;
use crate::config::{ModelEndpoint, Protocol};
use crate::exchange::{Exchange, Finisher, ResponseBody, Source, SseSource};
use crate::gateway::{Gateway, Runtime};
use crate::reject::Reject;
use crate::request;
use crate::route::{self, Operation, Route};
use crate::server::Peer;
use crate::upstream::{self, AnswerBody, Outbound};
use crate::validate::oip::{MetadataSettings, Signature, SignatureSource};
use crate::validate::stage::{self, Destination};

/// What the stages produced for the client.
enum Reply {
    /// The model server's answer.
    Upstream(upstream::Answer),
    /// Warden's own answer (model list, health).
    Local(serde_json::Value),
}

/// Serves one request on the public listener.
pub async fn handle(gateway: Arc<Gateway>, req: Request<Incoming>, peer: Arc<Peer>) -> Response<ResponseBody> {
    // One snapshot of the configuration for the whole request.
    let runtime = gateway.runtime();
    gateway.metrics.start_request();
    let mut exchange = Exchange::begin(&req, peer.addr);
    exchange.client_ip =
        crate::forwarded::client_ip(peer.addr.ip(), req.headers(), &runtime.config.listen.trusted_proxies);
    let reply = life_of_request(&runtime, &mut exchange, req, &peer).await;
    respond(&gateway, &runtime, exchange, reply)
}

async fn life_of_request(
    rt: &Runtime,
    ex: &mut Exchange,
    req: Request<Incoming>,
    peer: &Peer,
) -> Result<Reply, Reject> {
    let (parts, body_stream) = req.into_parts();
    let limits = &rt.config.listen.limits;

    // 2 route (path only). It runs before authentication because the error
    // format and the anonymous health probes depend on it; it reads nothing
    // but the path.
    let route = route::route(&parts.method, parts.uri.path())?;
    ex.protocol = route.protocol;

    // 1 authenticate: every request, unless the route is an anonymous probe.
    // A source that has failed too often is refused before its credential
    // is even looked at; each new failure is counted.
    let key_id = crate::authn::presented_key_id(&parts.headers);
    if let Some(wait) = rt.lockout.blocked(ex.client_ip, key_id) {
        return Err(Reject::TooManyAuthFailures(wait));
    }
    let identity = match authenticate(rt, &route, &parts.headers, peer).await {
        Ok(identity) => identity,
        // No credential at all is not a guess; a wrong one is.
        Err(reject) if reject.status() == http::StatusCode::UNAUTHORIZED && reject != Reject::MissingCredential => {
            rt.lockout.record_failure(ex.client_ip, key_id);
            return Err(reject);
        }
        Err(reject) => return Err(reject),
    };
    ex.identity = Some(identity.clone());

    match route.operation {
        Operation::ListModels => return Ok(Reply::Local(list_models(rt, &identity))),
        Operation::Live => return Ok(Reply::Local(serde_json::json!({ "live": true }))),
        Operation::Ready => return Ok(Reply::Local(serde_json::json!({ "ready": true }))),
        _ => {}
    }

    // OIP v2 names the model in the path, so it is known, and authorized,
    // before its body is read; its own body limit applies from the first byte.
    let mut endpoint = match &route.model {
        Some(name) => {
            let model = find_model(rt, name, route.protocol)?;
            note_model(ex, &model);
            // 3 authorize: endpoint (path-routed).
            let permit = authz::authorize_endpoint(&identity, &model, rt.pdp(), &mut ex.decisions).await?;
            Some((model, permit))
        }
        None => None,
    };

    // 4 read + validate. OpenAI routes name the model in the body, so their
    // body (bounded by the listener's limit) is read before the model is
    // known; only authenticated callers get this far.
    let mut body = None;
    if route.operation.has_body() {
        request::check_content_type(&parts.headers)?;
        let limit = endpoint
            .as_ref()
            .map_or(limits.max_body_bytes, |(m, _)| m.max_body_bytes);
        let bytes = request::read_body(&parts.headers, body_stream, limit, limits.body_read_timeout).await?;
        ex.record_request_body(&bytes);
        let json = request::parse_json_object(&bytes, limits.max_json_depth)?;
        if endpoint.is_none() {
            let model = find_model(rt, request::model_field(&json)?, route.protocol)?;
            note_model(ex, &model);
            // 3 authorize: endpoint (body-routed).
            let permit = authz::authorize_endpoint(&identity, &model, rt.pdp(), &mut ex.decisions).await?;
            endpoint = Some((model, permit));
        }
        body = Some((bytes, json));
    }
    let (model, permit) = endpoint.ok_or_else(|| Reject::UnknownRoute(ex.path.clone()))?;
    let mut review = false;

    let body = match body {
        Some((bytes, mut json)) => {
            if bytes.len() > model.max_body_bytes {
                return Err(Reject::BodyTooLarge {
                    limit: model.max_body_bytes,
                });
            }
            if route.protocol == Protocol::Openai {
                ex.stream = request::stream_field(&json)?;
                // The output policy reads whole answers only: a stream must
                // not be the way around it.
                if ex.stream && model.output.is_some() {
                    return Err(Reject::StreamNotInspected(model.name.clone()));
                }
            }
            // 4 validate: the shape, parameters, context window, injections
            // and input profile the model accepts.
            review = validate(rt, &model, &permit, route.operation, &json, ex).await? == Destination::Review;
            // 4 validate: the model's external prompt-injection detector, once
            // the local checks have passed.
            detect_injection_externally(&model, route.operation, &json, ex).await?;
            // 5 authorize: tenant. Which data partitions the payload touches,
            // each decided on its own.
            if let Some(source) = &model.tenant {
                ex.tenants = authz::tenant::extract(source, &json, &parts.headers, &identity)?;
                authz::authorize_tenants(&identity, &model, &ex.tenants, rt.pdp(), &mut ex.decisions).await?;
            }
            // 5 authorize: action. The operation and the parameters a policy
            // may constrain; only a policy engine constrains them, so they
            // are read only when there is one.
            if let Some(pdp) = rt.pdp() {
                let params = authz::action::params(route.operation, ex.stream, &json);
                authz::authorize_action(&identity, &model, params, Some(pdp), &mut ex.decisions).await?;
            }
            // 6 admit: rate limits and budgets, on the estimate (which may
            // set the request's output limit so the estimate holds).
            let rewritten = match &rt.config.limits {
                Some(limits) => admit(rt, limits, ex, &identity, &model, route.operation, Some(&mut json)).await?,
                None => false,
            };
            upstream_body(&model, route.protocol, bytes, json, rewritten)?
        }
        None => {
            if let Some(limits) = &rt.config.limits {
                admit(rt, limits, ex, &identity, &model, route.operation, None).await?;
            }
            Bytes::new()
        }
    };

    // 6 admit: the model's fair share of capacity. A saturated model's
    // callers wait their turn, tenant by tenant, weighted by tier.
    if let Some(queue) = rt.queues.get(&model.name) {
        let weight = rt.config.limits.as_ref().map_or(1, |l| l.weight(identity.tier()));
        let flow = identity.tenant().unwrap_or_else(|| identity.principal());
        let slot = queue.acquire(flow, weight).await.map_err(|_| Reject::AtCapacity {
            model: model.name.clone(),
            status: model.limits.capacity.as_ref().map_or(429, |c| c.status.as_u16()),
        })?;
        ex.slot = Some(slot);
    }

    // 7 forward: to the model, or to its review upstream when the input
    // profile says so.
    let upstream = match (&model.validation.profile, review) {
        (Some(p), true) => p.route_to.as_ref().unwrap_or(&model.upstream),
        _ => &model.upstream,
    };
    ex.upstream = Some(upstream.name.clone());
    let client = rt.clients.get(&upstream.name).ok_or(Reject::UpstreamUnreachable)?;
    if let Some(admission) = &mut ex.admission {
        admission.forwarded();
    }
    ex.forwarded_at = Some(std::time::Instant::now());
    let mut answer = upstream::forward(
        &permit,
        upstream,
        client,
        Outbound {
            method: parts.method.clone(),
            path: upstream_path(&route, &model, ex),
            client_headers: &parts.headers,
            body,
            request_id: &ex.request_id,
            stream: ex.stream,
        },
    )
    .await?;
    ex.upstream_status = Some(answer.head.status.as_u16());
    ex.upstream_latency = Some(answer.latency);

    // 8 inspect output: the model's content policy, before any of the
    // answer reaches the client. A refused answer's usage is still charged.
    if let Some(scanner) = &model.output
        && let Err(reject) = crate::output::inspect::inspect_answer(scanner, &mut answer, &mut ex.output)
    {
        ex.refused_answer_usage = answer.usage;
        return Err(reject);
    }

    // 9 settle: when the response ends, the finisher settles the admission
    // with the usage.
    Ok(Reply::Upstream(answer))
}

/// 4 validate: the OpenAI shapes (or the model's own schema), parameter
/// policy, context window and prompt injection for OpenAI routes; the
/// model's schema and metadata, injection and the input profile for OIP v2
/// inference. Counts the prompt's tokens only when the context window needs
/// them, and keeps the count for the limits stage.
async fn validate(
    rt: &Runtime,
    model: &ModelEndpoint,
    permit: &authz::Permit,
    operation: Operation,
    json: &serde_json::Value,
    ex: &mut Exchange,
) -> Result<Destination, Reject> {
    let settings = &model.validation;
    match model.protocol {
        Protocol::Openai => {
            ex.prompt_tokens = stage::check_openai_request(model, operation, json, &mut ex.validation)?;
            Ok(Destination::Model)
        }
        Protocol::OipV2 if operation == Operation::Infer => {
            let signature = match &settings.metadata {
                Some(metadata) => Some(model_signature(rt, model, permit, metadata, ex).await?),
                None => None,
            };
            stage::check_oip(settings, signature.as_deref(), json, &mut ex.validation)
        }
        Protocol::OipV2 => Ok(Destination::Model),
    }
}

/// The OIP v2 model's signature: the configured one, or the upstream's own
/// metadata, fetched on first use and kept until the configuration is
/// reloaded. Concurrent first requests share one fetch; a failed fetch is
/// not kept, so the next request tries again.
async fn model_signature(
    rt: &Runtime,
    model: &ModelEndpoint,
    permit: &authz::Permit,
    metadata: &MetadataSettings,
    ex: &mut Exchange,
) -> Result<Arc<Signature>, Reject> {
    let cell = match &metadata.source {
        SignatureSource::Configured(signature) => return Ok(Arc::clone(signature)),
        SignatureSource::Upstream(cell) => cell,
    };
    let fetched = cell
        .get_or_try_init(|| fetch_signature(rt, model, permit, &ex.request_id))
        .await;
    match fetched {
        Ok(signature) => Ok(Arc::clone(signature)),
        Err((reject, reason)) => {
            ex.validation.push(stage::Verdict {
                check: "metadata",
                result: "error",
                score: None,
                reason: Some(reason),
            });
            Err(reject)
        }
    }
}

/// Reads `GET /v2/models/{name}` from the model's upstream, with the
/// gateway's own upstream credential (never the caller's).
async fn fetch_signature(
    rt: &Runtime,
    model: &ModelEndpoint,
    permit: &authz::Permit,
    request_id: &HeaderValue,
) -> Result<Arc<Signature>, (Reject, String)> {
    let upstream = &model.upstream;
    let failed = |reject: Reject, reason: String| {
        tracing::warn!(model = %model.name, upstream = %upstream.name, %reason, "cannot read the model's metadata");
        (reject, reason)
    };
    let client = rt
        .clients
        .get(&upstream.name)
        .ok_or_else(|| failed(Reject::UpstreamUnreachable, "no client for the upstream".to_owned()))?;
    let outbound = Outbound {
        method: http::Method::GET,
        path: format!("/v2/models/{}", model.upstream_model),
        client_headers: &http::HeaderMap::new(),
        body: Bytes::new(),
        request_id,
        stream: false,
    };
    let answer = upstream::forward(permit, upstream, client, outbound)
        .await
        .map_err(|reject| failed(reject, "the metadata request failed".to_owned()))?;
    let bytes = match answer.body {
        AnswerBody::Full(bytes) if answer.head.status.is_success() => bytes,
        _ => {
            let reason = format!("the metadata request returned {}", answer.head.status);
            return Err(failed(Reject::UpstreamInvalid, reason));
        }
    };
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|v| Signature::from_metadata(&v).map_err(|e| e.to_string()))
        .map(Arc::new)
        .map_err(|e| failed(Reject::UpstreamInvalid, format!("unusable metadata: {e}")))
}

/// 4 validate: the external prompt-injection detector of a model that has
/// one, over the texts the model would read; its verdict joins the local
/// ones. Flagged and blocked: 400, as the local detector. No answer: 503
/// when it fails closed, on through when it fails open.
async fn detect_injection_externally(
    model: &ModelEndpoint,
    operation: Operation,
    json: &serde_json::Value,
    ex: &mut Exchange,
) -> Result<(), Reject> {
    let Some(injection) = &model.validation.injection else {
        return Ok(());
    };
    crate::validate::external::check(
        injection,
        &model.name,
        model.protocol,
        operation,
        json,
        &mut ex.validation,
    )
    .await
}

/// 6 admit: estimates the request, reserves the estimate against every
/// rule that applies, and keeps the reservation in the exchange to be
/// settled when it finishes. Returns whether the body was changed.
async fn admit(
    rt: &Runtime,
    limits: &crate::limits::rules::LimitsConfig,
    ex: &mut Exchange,
    identity: &Identity,
    model: &ModelEndpoint,
    operation: Operation,
    body: Option<&mut serde_json::Value>,
) -> Result<bool, Reject> {
    use crate::limits::admit::RefusalReason;
    let Some(limiter) = &rt.limiter else { return Ok(false) };
    let estimate = crate::limits::admit::estimate(limits, &model.limits, operation, ex.stream, ex.prompt_tokens, body)?;
    let subject = crate::limits::rules::Subject {
        principal: identity.principal(),
        api_key: identity.credential_id(),
        client_ip: ex.client_ip,
        tenant: identity.tenant(),
        model: &model.name,
        tier: identity.tier(),
        high_value: model.value_tier == crate::config::ValueTier::High,
    };
    let hold_id = ex.request_id.to_str().unwrap_or("invalid");
    match limiter
        .admit(limits, &subject, estimate.demand, model.limits.prices, hold_id)
        .await
    {
        Ok(admission) => {
            ex.admission = Some(admission);
            Ok(estimate.rewritten)
        }
        Err(refusal) => {
            let reject = match &refusal.reason {
                RefusalReason::Limited { index, quota } => {
                    match refusal.outcomes.get(*index).cloned().map(Box::new) {
                        Some(outcome) if *quota => Reject::QuotaExceeded(outcome),
                        Some(outcome) => Reject::RateLimited(outcome),
                        // The index comes from the same list; never absent.
                        None => Reject::LimitsUnavailable(String::new()),
                    }
                }
                RefusalReason::StoreUnavailable { rule } => Reject::LimitsUnavailable(rule.clone()),
            };
            ex.refused_limits = refusal.outcomes;
            Err(reject)
        }
    }
}

/// 10 audit happens when the body returned here ends: it owns the finisher.
fn respond(
    gateway: &Arc<Gateway>,
    rt: &Runtime,
    mut ex: Exchange,
    reply: Result<Reply, Reject>,
) -> Response<ResponseBody> {
    let (mut head, source, usage) = match reply {
        Ok(Reply::Upstream(answer)) => {
            let source = match answer.body {
                AnswerBody::Full(bytes) => Source::Full(Some(bytes)),
                AnswerBody::Sse(body, idle, connection) => {
                    let meter = stream_meter(rt, &ex);
                    Source::Sse(Box::new(SseSource::new(body, idle, connection, ex.protocol, meter)))
                }
            };
            (answer.head, source, answer.usage)
        }
        Ok(Reply::Local(value)) => {
            let mut head = Response::new(()).into_parts().0;
            head.headers
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            (head, Source::Full(Some(Bytes::from(value.to_string()))), None)
        }
        Err(reject) => {
            let (head, body) = reject.into_parts(ex.protocol);
            tracing::debug!(request_id = ?ex.request_id, reason = reject.code(), "request rejected");
            ex.reject = Some(reject);
            let usage = ex.refused_answer_usage;
            (head, Source::Full(Some(body)), usage)
        }
    };
    head.headers.insert("x-request-id", ex.request_id.clone());
    if let Some(limits) = &rt.config.limits {
        crate::limits::headers::add(ex.limit_outcomes(), limits.ietf_headers, &mut head.headers);
    }
    let finisher = Finisher::new(
        ex,
        head.status.as_u16(),
        Arc::clone(&rt.audit),
        Arc::clone(&gateway.metrics),
    );
    Response::from_parts(head, ResponseBody::new(source, usage, finisher))
}

/// A meter for a stream whose reservation counts output tokens (directly,
/// or as dollars): it cuts the stream at the tokens reserved, so that
/// concurrent streams cannot jointly overrun a budget.
fn stream_meter(rt: &Runtime, ex: &Exchange) -> Option<(crate::upstream::sse::StreamMeter, u64)> {
    use crate::limits::rules::Unit;
    let admission = ex.admission.as_ref()?;
    if !admission.counts(&[Unit::OutputTokens, Unit::TotalTokens, Unit::Dollars]) {
        return None;
    }
    let model = rt.config.models.get(ex.model.as_deref()?)?;
    let limit = admission.reserved.output_tokens;
    let meter = crate::upstream::sse::StreamMeter::new(ex.protocol, model.limits.tokenizer.clone(), Some(limit));
    Some((meter, limit))
}

fn note_model(ex: &mut Exchange, model: &ModelEndpoint) {
    ex.model = Some(model.name.clone());
    ex.upstream = Some(model.upstream.name.clone());
}

async fn authenticate(rt: &Runtime, route: &Route, headers: &http::HeaderMap, peer: &Peer) -> Result<Identity, Reject> {
    // A verified client certificate names a client only if it is a known one.
    let client = match (&peer.client_cert, &rt.config.mtls) {
        (Some(cert), Some(mtls)) => cert
            .identity(mtls.identity_from)
            .and_then(|id| mtls.clients.get(id))
            .cloned(),
        _ => None,
    };
    // Health probes may be anonymous, when configured, for a caller that
    // presents nothing at all.
    let probe = matches!(route.operation, Operation::Live | Operation::Ready);
    if probe && client.is_none() && rt.config.listen.anonymous_health && !crate::authn::has_credential(headers) {
        return Ok(Identity::anonymous());
    }
    crate::authn::authenticate_with_certificate(headers, rt.authenticators(), client).await
}

fn find_model(rt: &Runtime, name: &str, protocol: Protocol) -> Result<Arc<ModelEndpoint>, Reject> {
    match rt.config.models.get(name) {
        Some(model) if model.protocol == protocol => Ok(Arc::clone(model)),
        _ => Err(Reject::ModelNotFound(name.to_owned())),
    }
}

/// `GET /v1/models`: only the models this caller may call.
fn list_models(rt: &Runtime, identity: &Identity) -> serde_json::Value {
    let mut names: Vec<&str> = rt
        .config
        .models
        .values()
        .filter(|m| m.protocol == Protocol::Openai)
        .filter(|m| identity.models().is_some_and(|g| g.allows(&m.name)))
        .map(|m| m.name.as_str())
        .collect();
    names.sort_unstable();
    let data: Vec<serde_json::Value> = names
        .into_iter()
        .map(|id| serde_json::json!({ "id": id, "object": "model", "created": 0, "owned_by": "warden" }))
        .collect();
    serde_json::json!({ "object": "list", "data": data })
}

/// The bytes to send upstream: the client's own bytes, unless the upstream
/// knows the model by another name and the body names it, or the admit
/// stage set the request's output limit or asked a stream for its usage.
fn upstream_body(
    model: &ModelEndpoint,
    protocol: Protocol,
    bytes: Bytes,
    mut json: serde_json::Value,
    rewritten: bool,
) -> Result<Bytes, Reject> {
    if protocol != Protocol::Openai || (model.upstream_model == model.name && !rewritten) {
        return Ok(bytes);
    }
    if let Some(field) = json.get_mut("model") {
        *field = serde_json::Value::String(model.upstream_model.clone());
    }
    serde_json::to_vec(&json)
        .map(Bytes::from)
        .map_err(|_| Reject::UpstreamInvalid)
}

fn upstream_path(route: &Route, model: &ModelEndpoint, ex: &Exchange) -> String {
    let name = &model.upstream_model;
    let versioned = |suffix: &str| match &route.version {
        Some(v) => format!("/v2/models/{name}/versions/{v}{suffix}"),
        None => format!("/v2/models/{name}{suffix}"),
    };
    match route.operation {
        Operation::Infer => versioned("/infer"),
        Operation::ModelMetadata => versioned(""),
        Operation::ModelReady => versioned("/ready"),
        _ => ex.path.clone(),
    }
}
