//! An external policy engine speaking the OpenID AuthZEN Authorization API
//! 1.0: `POST <url>/access/v1/evaluation` with
//! `{"subject":{"type","id","properties"},"action":{"name","properties"},
//! "resource":{"type","id","properties"},"context"}` → `{"decision": bool}`.
//! A deny is a 200 with `decision: false`; anything but a boolean
//! `decision` — an error status, a timeout, malformed JSON — is a deny with
//! the reason kept in the decision (fail closed; [`super::remote`]).

use std::time::Duration;

use serde_json::{Value, json};

use super::remote::RemotePdp;
use super::{AuthzRequest, Decision};

/// An AuthZEN PDP client.
#[derive(Debug)]
pub struct AuthzenPdp {
    remote: RemotePdp,
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
        "resource": { "type": r.kind.to_ascii_lowercase(), "id": r.id, "properties": { "protocol": r.protocol } },
        "context": request.context,
    })
}

impl AuthzenPdp {
    /// A client for the PDP at `url` (its base; `/access/v1/evaluation` is added).
    pub fn new(url: &str, timeout: Duration, cache_ttl: Duration) -> AuthzenPdp {
        let endpoint = format!("{}/access/v1/evaluation", url.trim_end_matches('/'));
        AuthzenPdp {
            remote: RemotePdp::new("authzen", endpoint, timeout, cache_ttl),
        }
    }

    /// Asks the PDP; any failure is a deny that says why.
    pub async fn decide(&self, request: &AuthzRequest) -> Decision {
        self.remote.decide(wire(request), read).await
    }
}

fn read(answer: &Value) -> Result<bool, String> {
    answer
        .get("decision")
        .and_then(Value::as_bool)
        .ok_or_else(|| "no boolean `decision`".to_owned())
}
