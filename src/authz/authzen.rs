//! An external policy engine speaking the OpenID AuthZEN Authorization API
//! 1.0: `POST <url>/access/v1/evaluation` with
//! `{"subject":{"type","id","properties"},"action":{"name","properties"},
//! "resource":{"type","id","properties"},"context"}` → `{"decision": bool}`.
//! A deny is a 200 with `decision: false`; anything but a boolean
//! `decision` — an error status, a timeout, malformed JSON — is a deny with
//! the reason kept in the decision (fail closed; [`super::remote`]).
//!
//! Several requests at once (the tenant rows of one OIP batch) go as one
//! `POST <url>/access/v1/evaluations`: the members every item shares
//! (`subject`, `action`, `resource`, `context`) are sent once at the top
//! level, as the defaults the items inherit, and each item in `evaluations`
//! carries only what differs; `options.evaluations_semantic` is
//! `execute_all`, so the PDP judges every item. The answer's `evaluations`
//! must hold one boolean `decision` per item, in order; a missing or
//! malformed one, or a count that does not match, denies the whole batch
//! with the reason kept in each decision.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::remote::RemotePdp;
use super::{AuthzRequest, Decision};

/// An AuthZEN PDP client.
#[derive(Debug)]
pub struct AuthzenPdp {
    remote: RemotePdp,
    /// `<url>/access/v1/evaluations`.
    batch_endpoint: String,
}

/// Warden's request in AuthZEN's wire shape.
pub fn wire(request: &AuthzRequest) -> Value {
    let s = &request.subject;
    let r = &request.resource;
    json!({
        "subject": {
            "type": s.kind,
            "id": s.id,
            "properties": {
                "tenant": s.tenant, "tenants": s.tenants, "tier": s.tier,
                "auth_method": s.auth_method, "scopes": s.scopes, "groups": s.groups,
            },
        },
        "action": { "name": request.action.name },
        "resource": { "type": r.kind.to_ascii_lowercase(), "id": r.id, "properties": { "protocol": r.protocol, "value_tier": r.value_tier } },
        "context": request.context,
    })
}

impl AuthzenPdp {
    /// A client for the PDP at `url` (its base; `/access/v1/evaluation` and
    /// `/access/v1/evaluations` are added).
    /// `credential`, when given, is the `Authorization` header the PDP gets.
    pub fn new(url: &str, timeout: Duration, cache_ttl: Duration, credential: Option<http::HeaderValue>) -> AuthzenPdp {
        let base = url.trim_end_matches('/');
        AuthzenPdp {
            remote: RemotePdp::new(
                "authzen",
                format!("{base}/access/v1/evaluation"),
                timeout,
                cache_ttl,
                credential,
            ),
            batch_endpoint: format!("{base}/access/v1/evaluations"),
        }
    }

    /// Asks the PDP; any failure is a deny that says why.
    pub async fn decide(&self, request: &AuthzRequest) -> Decision {
        self.remote.decide(wire(request), read).await
    }

    /// Asks the PDP about several requests in one `evaluations` call (a
    /// lone request goes as `evaluation`); one decision per request, in
    /// order, each cached on its own.
    pub async fn decide_many(&self, requests: &[AuthzRequest]) -> Vec<Decision> {
        if let [request] = requests {
            return vec![self.decide(request).await];
        }
        let items: Vec<Value> = requests.iter().map(wire).collect();
        self.remote
            .decide_many(&self.batch_endpoint, &items, batch, read_batch)
            .await
    }
}

fn read(answer: &Value) -> Result<bool, String> {
    answer
        .get("decision")
        .and_then(Value::as_bool)
        .ok_or_else(|| "no boolean `decision`".to_owned())
}

/// The members an item may inherit from the request's top level.
const DEFAULTS: [&str; 4] = ["subject", "action", "resource", "context"];

/// The `evaluations` request for `items` (each a single-request body): a
/// member equal in every item is sent once, as the default; the others stay
/// in each item. Inheritance replaces a member whole, so only a member that
/// is exactly the same everywhere is lifted.
fn batch(items: &[&Value]) -> Value {
    let mut body = Map::new();
    let mut shared = Vec::new();
    for member in DEFAULTS {
        let first = items.first().and_then(|i| i.get(member));
        if let Some(first) = first
            && items.iter().all(|i| i.get(member) == Some(first))
        {
            body.insert(member.to_owned(), first.clone());
            shared.push(member);
        }
    }
    let evaluations: Vec<Value> = items
        .iter()
        .map(|item| {
            let own: Map<String, Value> = item
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(k, _)| !shared.contains(&k.as_str()))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            Value::Object(own)
        })
        .collect();
    body.insert("evaluations".to_owned(), Value::Array(evaluations));
    body.insert("options".to_owned(), json!({ "evaluations_semantic": "execute_all" }));
    Value::Object(body)
}

/// Each item's verdict, in order, from `{"evaluations":[{"decision":bool},…]}`.
fn read_batch(answer: &Value) -> Result<Vec<bool>, String> {
    let results = answer
        .get("evaluations")
        .and_then(Value::as_array)
        .ok_or_else(|| "no `evaluations` array".to_owned())?;
    results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            r.get("decision")
                .and_then(Value::as_bool)
                .ok_or_else(|| format!("`evaluations[{i}]` has no boolean `decision`"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_members_are_sent_once_and_the_rest_per_item() {
        let a = json!({"subject": {"id": "s"}, "action": {"name": "access"}, "resource": {"id": "acme"}, "context": {"model": "m"}});
        let b = json!({"subject": {"id": "s"}, "action": {"name": "access"}, "resource": {"id": "globex"}, "context": {"model": "m"}});
        let body = batch(&[&a, &b]);
        assert_eq!(body["subject"], json!({"id": "s"}));
        assert_eq!(body["context"], json!({"model": "m"}));
        assert!(body.get("resource").is_none(), "{body}");
        assert_eq!(
            body["evaluations"],
            json!([{"resource": {"id": "acme"}}, {"resource": {"id": "globex"}}])
        );
        assert_eq!(body["options"]["evaluations_semantic"], "execute_all");
    }

    #[test]
    fn a_batch_answer_is_read_in_order_or_refused_whole() {
        let ok = json!({"evaluations": [{"decision": true}, {"decision": false, "context": {}}]});
        assert_eq!(read_batch(&ok), Ok(vec![true, false]));
        assert!(read_batch(&json!({"decision": true})).is_err());
        assert!(read_batch(&json!({"evaluations": [{"decision": true}, {"decision": "no"}]})).is_err());
    }
}
