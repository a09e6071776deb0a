//! Warden as a policy decision point for others: the OpenID AuthZEN
//! Authorization API 1.0 on the admin listener, answered by the policy
//! engine the gateway itself uses (the current runtime's), so a PEP elsewhere
//! gets exactly the decisions Warden enforces.
//!
//! | method and path                          | does                          |
//! |------------------------------------------|-------------------------------|
//! | `POST /access/v1/evaluation`             | one decision                  |
//! | `POST /access/v1/evaluations`            | a batch (at most 100)         |
//! | `GET /.well-known/authzen-configuration` | the PDP's metadata            |
//!
//! The evaluation endpoints need `Authorization: Bearer <admin token>`,
//! checked as for `/admin/v1/` (SHA-256, constant time). Without a
//! configured token they are refused (404, as if absent): never served
//! unauthenticated. The metadata document, public by the specification's
//! design, is served only when the endpoints it names are.
//!
//! The request is the inverse of what [`crate::authz::authzen::wire`] sends
//! to an external PDP:
//!
//! ```json
//! {"subject": {"type": "key", "id": "alice@acme.example",
//!              "properties": {"tenant": "acme", "tenants": ["acme"], "tier": "pro",
//!                             "auth_method": "api_key", "scopes": [], "groups": []}},
//!  "action": {"name": "invoke"},
//!  "resource": {"type": "model", "id": "llama-3.1-8b", "properties": {"protocol": "openai"}},
//!  "context": {"model": null, "action": null}}
//! ```
//!
//! - `subject.type` is the principal's kind (`user`, `service`, `key`); its
//!   properties default to empty (`tenants` to `[tenant]`).
//! - `action.name` is Warden's: `invoke` (the endpoint), `use` (the
//!   operation and its parameters, from `context.action`; defaults as for an
//!   empty body when absent) or `access` (a tenant's data, through the model
//!   in `context.model`, which is then required).
//! - `resource.type` is `model` or `tenant`. A configured model's protocol is
//!   its configured one (and so is its value tier), whatever the request
//!   says, so the decision is the one the gateway would make; an unknown
//!   model's come from `resource.properties`.
//!
//! The answer is `{"decision": bool, "context": {engine, policy_version,
//! policies[, error]}}`, HTTP 200 for a deny too. A request that is not JSON
//! or lacks a required member is 400 with `{"error": "…"}`; in a batch, an
//! item that lacks one is a deny whose context says why (`code` 400 and
//! `reason`), and the rest are still decided. With no policy engine
//! configured every decision is a deny: there is nothing to permit with.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::authz::action::ActionParams;
use crate::authz::{Action, AuthzRequest, RequestContext, Resource, Subject};
use crate::config::Config;
use crate::gateway::{Gateway, Runtime};

/// The single evaluation endpoint.
pub const EVALUATION_PATH: &str = "/access/v1/evaluation";
/// The batch evaluation endpoint.
pub const EVALUATIONS_PATH: &str = "/access/v1/evaluations";
/// The metadata document.
pub const METADATA_PATH: &str = "/.well-known/authzen-configuration";

/// Largest request body: a full batch of full requests fits.
const MAX_BODY: usize = 256 * 1024;
/// Most evaluations in one batch: each is a policy decision (and, with an
/// external engine, a round trip), so a batch is bounded like a body is.
pub const MAX_EVALUATIONS: usize = 100;

/// Whether this module answers `path`.
pub fn owns(path: &str) -> bool {
    path.starts_with("/access/") || path == METADATA_PATH
}

/// Answers one request for a path [`owns`] accepts.
pub async fn handle(gateway: &Arc<Gateway>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let runtime = gateway.runtime();
    // Default deny: without an admin token there is no way to tell a PEP
    // from anyone else, so the API does not exist.
    let Some(token) = runtime.config.admin_token_sha256 else {
        return error(StatusCode::NOT_FOUND, "not found");
    };
    let request_id = req.headers().get("x-request-id").filter(|v| v.len() <= 128).cloned();
    let path = req.uri().path().to_owned();
    let mut response = match (req.method(), path.as_str()) {
        (&Method::GET, METADATA_PATH) => metadata(&req, &runtime),
        (_, METADATA_PATH) => error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        (_, EVALUATION_PATH | EVALUATIONS_PATH) if !super::keys::authorized(&req, &token) => super::unauthorized(),
        (&Method::POST, EVALUATION_PATH | EVALUATIONS_PATH) => match read_json(req).await {
            Err(response) => response,
            Ok(body) if path == EVALUATION_PATH => evaluation(&runtime, &body).await,
            Ok(body) => evaluations(&runtime, &body).await,
        },
        (_, EVALUATION_PATH | EVALUATIONS_PATH) => error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        _ => error(StatusCode::NOT_FOUND, "not found"),
    };
    // AuthZEN: a PDP echoes the PEP's request id.
    if let Some(id) = request_id {
        response.headers_mut().insert("x-request-id", id);
    }
    response
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Response<Full<Bytes>>> {
    let body = match tokio::time::timeout(
        Duration::from_secs(10),
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                &format!("the request body could not be read (at most {MAX_BODY} bytes)"),
            ));
        }
    };
    match serde_json::from_slice::<Value>(&body) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(error(StatusCode::BAD_REQUEST, "the request body must be a JSON object")),
        Err(e) => Err(error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}"))),
    }
}

/// `POST /access/v1/evaluation`.
async fn evaluation(rt: &Runtime, body: &Value) -> Response<Full<Bytes>> {
    match request_of(&rt.config, body, &Map::new()) {
        Ok(request) => json(StatusCode::OK, &decide(rt, &request).await),
        Err(message) => error(StatusCode::BAD_REQUEST, &message),
    }
}

/// How a batch is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Semantic {
    /// Every item, every result.
    ExecuteAll,
    /// Stop after the first deny (an `&&`).
    DenyOnFirstDeny,
    /// Stop after the first permit (an `||`).
    PermitOnFirstPermit,
}

/// `POST /access/v1/evaluations`.
async fn evaluations(rt: &Runtime, body: &Value) -> Response<Full<Bytes>> {
    let items = match body.get("evaluations") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(items)) => items.as_slice(),
        Some(_) => return error(StatusCode::BAD_REQUEST, "`evaluations` must be an array"),
    };
    // Without items the batch is one evaluation of the top-level request
    // (the specification's backward-compatible form).
    if items.is_empty() {
        return evaluation(rt, body).await;
    }
    if items.len() > MAX_EVALUATIONS {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("at most {MAX_EVALUATIONS} evaluations in one request"),
        );
    }
    let semantic = match body.pointer("/options/evaluations_semantic") {
        None | Some(Value::Null) => Semantic::ExecuteAll,
        Some(value) => match Semantic::deserialize(value) {
            Ok(s) => s,
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "`options.evaluations_semantic` must be `execute_all`, `deny_on_first_deny` or `permit_on_first_permit`",
                );
            }
        },
    };
    let mut results = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(item) = item else {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("`evaluations[{i}]` must be an object"),
            );
        };
        let result = match request_of(&rt.config, body, item) {
            Ok(request) => decide(rt, &request).await,
            Err(reason) => json!({"decision": false, "context": {"code": "400", "reason": reason}}),
        };
        let allowed = result["decision"] == true;
        results.push(result);
        match semantic {
            Semantic::DenyOnFirstDeny if !allowed => break,
            Semantic::PermitOnFirstPermit if allowed => break,
            _ => {}
        }
    }
    json(StatusCode::OK, &json!({ "evaluations": results }))
}

/// Decides one request with the engine in force and says how.
async fn decide(rt: &Runtime, request: &AuthzRequest) -> Value {
    let Some(pdp) = rt.pdp() else {
        return json!({"decision": false, "context": {"error": "no policy engine is configured"}});
    };
    let decision = pdp.decide(request).await;
    tracing::debug!(
        principal = request.subject.id,
        action = request.action.name,
        resource = request.resource.id,
        allowed = decision.allowed,
        "access evaluation"
    );
    let mut context = json!({
        "engine": decision.engine,
        "policy_version": decision.policy_version,
        "policies": decision.policies,
    });
    if let Some(e) = &decision.error {
        context["error"] = json!(e);
    }
    json!({ "decision": decision.allowed, "context": context })
}

/// The subject, as AuthZEN carries it.
#[derive(Debug, Deserialize)]
struct WireSubject {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    #[serde(default)]
    properties: Option<SubjectProperties>,
}

#[derive(Debug, Default, Deserialize)]
struct SubjectProperties {
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    tenants: Option<Vec<String>>,
    #[serde(default)]
    tier: Option<String>,
    #[serde(default)]
    auth_method: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    groups: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct WireAction {
    name: String,
}

#[derive(Debug, Deserialize)]
struct WireResource {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    #[serde(default)]
    properties: Option<ResourceProperties>,
}

#[derive(Debug, Default, Deserialize)]
struct ResourceProperties {
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    value_tier: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct WireContext {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    action: Option<WireParams>,
}

/// The action level's parameters; what is missing is as Warden reads an
/// empty body.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct WireParams {
    operation: String,
    stream: bool,
    max_tokens: i64,
    n: i64,
    logprobs: bool,
    tools: Vec<String>,
    tool_choice: String,
    response_format: String,
    outputs: Vec<String>,
}

impl Default for WireParams {
    fn default() -> Self {
        WireParams {
            operation: "chat".to_owned(),
            stream: false,
            max_tokens: 0,
            n: 1,
            logprobs: false,
            tools: Vec::new(),
            tool_choice: String::new(),
            response_format: String::new(),
            outputs: Vec::new(),
        }
    }
}

impl From<WireParams> for ActionParams {
    fn from(p: WireParams) -> ActionParams {
        ActionParams {
            operation: p.operation,
            stream: p.stream,
            max_tokens: p.max_tokens,
            n: p.n,
            logprobs: p.logprobs,
            tools: p.tools,
            tool_choice: p.tool_choice,
            response_format: p.response_format,
            outputs: p.outputs,
        }
    }
}

/// Reads member `name` of `item`, or of `defaults` when the item has none
/// (a batch item inherits each top-level member it does not give).
fn member<T: serde::de::DeserializeOwned>(
    defaults: &Value,
    item: &Map<String, Value>,
    name: &str,
) -> Result<Option<T>, String> {
    let value = match item.get(name) {
        Some(v) => v,
        None => match defaults.get(name) {
            Some(v) => v,
            None => return Ok(None),
        },
    };
    if value.is_null() {
        return Ok(None);
    }
    T::deserialize(value).map(Some).map_err(|e| format!("`{name}`: {e}"))
}

/// The Warden request an AuthZEN request describes.
fn request_of(config: &Config, defaults: &Value, item: &Map<String, Value>) -> Result<AuthzRequest, String> {
    let subject: WireSubject = member(defaults, item, "subject")?.ok_or("`subject` is required")?;
    let action: WireAction = member(defaults, item, "action")?.ok_or("`action` is required")?;
    let resource: WireResource = member(defaults, item, "resource")?.ok_or("`resource` is required")?;
    let context: WireContext = member(defaults, item, "context")?.unwrap_or_default();

    let p = subject.properties.unwrap_or_default();
    let tenant = p.tenant.unwrap_or_default();
    let tenants = match p.tenants {
        Some(t) if !t.is_empty() => t,
        _ if tenant.is_empty() => Vec::new(),
        _ => vec![tenant.clone()],
    };
    let subject = Subject {
        id: subject.id,
        tenant,
        tier: p.tier.unwrap_or_default(),
        kind: subject.kind,
        auth_method: p.auth_method.unwrap_or_default(),
        tenants,
        scopes: p.scopes.unwrap_or_default(),
        groups: p.groups.unwrap_or_default(),
    };
    let kind = match resource.kind.to_ascii_lowercase().as_str() {
        "model" => "Model",
        "tenant" => "Tenant",
        other => return Err(format!("`resource.type` must be `model` or `tenant`, not `{other}`")),
    };
    // A configured model's protocol and value tier are the ones the gateway
    // decides with, whatever the request says.
    let properties = resource.properties.unwrap_or_default();
    let (protocol, value_tier) = match (kind, config.models.get(&resource.id)) {
        ("Model", Some(m)) => (
            Some(m.protocol.as_str().to_owned()),
            Some(m.value_tier.as_str().to_owned()),
        ),
        ("Model", None) => (properties.protocol, properties.value_tier),
        _ => (None, None),
    };
    let params = match (context.action, action.name.as_str()) {
        (Some(params), _) => Some(params.into()),
        (None, "use") => Some(WireParams::default().into()),
        (None, _) => None,
    };
    if action.name == "access" && context.model.is_none() {
        return Err("`context.model` is required for the action `access`".to_owned());
    }
    Ok(AuthzRequest {
        subject,
        action: Action { name: action.name },
        resource: Resource {
            kind,
            id: resource.id,
            protocol,
            value_tier,
        },
        context: RequestContext {
            model: context.model,
            action: params,
        },
    })
}

/// The metadata document. Its base URL is the one the caller used to reach
/// this listener (its `Host`), which is the only one that is sure to work
/// for it; the listener speaks plain HTTP.
fn metadata<B>(req: &Request<B>, rt: &Runtime) -> Response<Full<Bytes>> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .map_or_else(|| rt.config.admin_address.to_string(), |a| a.to_string());
    let base = format!("http://{host}");
    json(
        StatusCode::OK,
        &json!({
            "policy_decision_point": base,
            "access_evaluation_endpoint": format!("{base}{EVALUATION_PATH}"),
            "access_evaluations_endpoint": format!("{base}{EVALUATIONS_PATH}"),
        }),
    )
}

fn json(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    super::reply(status, "application/json", Bytes::from(value.to_string()))
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, &json!({ "error": message }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn what_warden_sends_an_external_pdp_reads_back_as_the_same_request() {
        let original = AuthzRequest {
            subject: Subject {
                id: "alice@acme.example".into(),
                tenant: "acme".into(),
                tier: "pro".into(),
                kind: "key".into(),
                auth_method: "api_key".into(),
                tenants: vec!["acme".into(), "acme-eu".into()],
                scopes: vec!["chat".into()],
                groups: vec!["support".into()],
            },
            action: Action { name: "use".into() },
            resource: Resource {
                kind: "Model",
                id: "not-configured".into(),
                protocol: Some("openai".into()),
                value_tier: None,
            },
            context: RequestContext {
                model: Some("m".into()),
                action: Some(ActionParams {
                    operation: "completion".into(),
                    stream: true,
                    max_tokens: 7,
                    n: 3,
                    logprobs: true,
                    tools: vec!["refund".into()],
                    tool_choice: "auto".into(),
                    response_format: "json_object".into(),
                    outputs: vec!["score".into()],
                }),
            },
        };
        let config = config();
        let wire = crate::authz::authzen::wire(&original);
        let read = request_of(&config, &wire, &Map::new()).unwrap();
        assert_eq!(
            serde_json::to_value(&read).unwrap(),
            serde_json::to_value(&original).unwrap()
        );
    }

    #[test]
    fn a_batch_item_inherits_each_member_it_does_not_give() {
        let config = config();
        let top = json!({
            "subject": {"type": "key", "id": "alice", "properties": {"tenant": "acme"}},
            "action": {"name": "invoke"},
            "resource": {"type": "model", "id": "a"},
        });
        let item = json!({"resource": {"type": "Tenant", "id": "globex"}, "action": {"name": "access"}, "context": {"model": "a"}});
        let read = request_of(&config, &top, item.as_object().unwrap()).unwrap();
        assert_eq!(read.subject.id, "alice");
        assert_eq!(read.subject.tenants, ["acme"]);
        assert_eq!((read.resource.kind, read.resource.id.as_str()), ("Tenant", "globex"));
        assert_eq!(read.action.name, "access");
    }

    #[test]
    fn missing_or_malformed_members_say_which() {
        let config = config();
        let ok = json!({"subject": {"type": "key", "id": "a"}, "action": {"name": "invoke"}, "resource": {"type": "model", "id": "m"}});
        assert!(request_of(&config, &ok, &Map::new()).is_ok());
        for (pointer, replacement, expected) in [
            ("/subject", Value::Null, "`subject` is required"),
            ("/subject", json!({"type": "key"}), "`subject`: missing field `id`"),
            ("/action", json!({"id": 1}), "`action`: missing field `name`"),
            ("/resource/type", json!("document"), "`resource.type` must be"),
            (
                "/subject",
                json!({"type": "key", "id": "a", "properties": {"tenants": "acme"}}),
                "`subject`: invalid type",
            ),
            ("/action/name", json!("access"), "`context.model` is required"),
        ] {
            let mut body = ok.clone();
            *body.pointer_mut(pointer).unwrap() = replacement;
            let message = request_of(&config, &body, &Map::new()).unwrap_err();
            assert!(message.starts_with(expected), "{pointer}: {message}");
        }
    }

    fn config() -> Config {
        Config::parse(
            "listen: {address: 127.0.0.1:0}\naudit: {file: audit.jsonl}\n",
            &std::env::temp_dir(),
        )
        .unwrap()
    }
}
