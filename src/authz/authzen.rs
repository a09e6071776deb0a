//! An external policy engine speaking the OpenID AuthZEN Authorization API
//! 1.0: `POST <url>/access/v1/evaluation` with
//! `{"subject":{"type","id","properties"},"action":{"name","properties"},
//! "resource":{"type","id","properties"},"context"}` → `{"decision": bool}`.
//! A deny is a 200 with `decision: false`; anything but a boolean
//! `decision` — an error status, a timeout, malformed JSON — is a deny with
//! the reason kept in the decision (fail closed). Answers are cached by the
//! request's SHA-256 for `cache_ttl`, in a bounded map.

use std::time::Duration;

use serde_json::{Value, json};

use super::remote::{DecisionCache, failure, verdict};
use super::{AuthzRequest, Decision};

/// An AuthZEN PDP client.
pub struct AuthzenPdp {
    endpoint: String,
    client: reqwest::Client,
    cache: DecisionCache,
}

impl std::fmt::Debug for AuthzenPdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthzenPdp")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
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
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        AuthzenPdp {
            endpoint: format!("{}/access/v1/evaluation", url.trim_end_matches('/')),
            client,
            cache: DecisionCache::new(cache_ttl),
        }
    }

    /// Asks the PDP; any failure is a deny that says why.
    pub async fn decide(&self, request: &AuthzRequest) -> Decision {
        let body = wire(request);
        let key = DecisionCache::key(&body);
        if let Some(allowed) = self.cache.get(&key) {
            return verdict("authzen", allowed, None);
        }
        match self.ask(&body).await {
            Ok(allowed) => {
                self.cache.put(key, allowed);
                verdict("authzen", allowed, None)
            }
            Err(reason) => {
                tracing::warn!(endpoint = %self.endpoint, %reason, "AuthZEN PDP gave no usable decision: denied");
                verdict("authzen", false, Some(reason))
            }
        }
    }

    async fn ask(&self, body: &Value) -> Result<bool, String> {
        let response = self
            .client
            .post(&self.endpoint)
            .json(body)
            .send()
            .await
            .map_err(|e| failure(&e))?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status().as_u16()));
        }
        let answer: Value = response.json().await.map_err(|_| "malformed answer".to_owned())?;
        answer
            .get("decision")
            .and_then(Value::as_bool)
            .ok_or_else(|| "no boolean `decision`".to_owned())
    }
}
