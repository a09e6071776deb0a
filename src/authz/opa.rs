//! An external policy engine: Open Policy Agent, over its REST data API
//! (`POST /v1/data/<path>` with `{"input": <request>}`). The input is
//! Warden's AuthZEN-shaped request. The answer's `result` must be `true` or
//! `{"allow": true}` to allow; an undefined result (no `result`) is a deny,
//! and so is an error, a timeout or anything else — fail closed, with the
//! reason kept in the decision. Answers are cached by the request's SHA-256
//! for `cache_ttl`, in a bounded map.

use std::time::Duration;

use serde_json::Value;

use super::remote::{DecisionCache, failure, verdict};
use super::{AuthzRequest, Decision};

/// An OPA client.
pub struct OpaPdp {
    endpoint: String,
    client: reqwest::Client,
    cache: DecisionCache,
}

impl std::fmt::Debug for OpaPdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpaPdp")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl OpaPdp {
    /// A client for the decision at `path` (e.g. `warden/allow`) on the OPA
    /// server at `url`.
    pub fn new(url: &str, path: &str, timeout: Duration, cache_ttl: Duration) -> OpaPdp {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        OpaPdp {
            endpoint: format!("{}/v1/data/{}", url.trim_end_matches('/'), path.trim_matches('/')),
            client,
            cache: DecisionCache::new(cache_ttl),
        }
    }

    /// Asks OPA; any failure is a deny that says why.
    pub async fn decide(&self, request: &AuthzRequest) -> Decision {
        let input = serde_json::json!({ "input": request });
        let key = DecisionCache::key(&input);
        if let Some(allowed) = self.cache.get(&key) {
            return verdict("opa", allowed, None);
        }
        match self.ask(&input).await {
            Ok(allowed) => {
                self.cache.put(key, allowed);
                verdict("opa", allowed, None)
            }
            Err(reason) => {
                tracing::warn!(endpoint = %self.endpoint, %reason, "OPA gave no usable decision: denied");
                verdict("opa", false, Some(reason))
            }
        }
    }

    async fn ask(&self, input: &Value) -> Result<bool, String> {
        let response = self
            .client
            .post(&self.endpoint)
            .json(input)
            .send()
            .await
            .map_err(|e| failure(&e))?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status().as_u16()));
        }
        let answer: Value = response.json().await.map_err(|_| "malformed answer".to_owned())?;
        match answer.get("result") {
            // Undefined: no rule produced a value.
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Object(o)) => match o.get("allow") {
                Some(Value::Bool(b)) => Ok(*b),
                _ => Err("`result` has no boolean `allow`".to_owned()),
            },
            Some(_) => Err("`result` is neither a boolean nor an object".to_owned()),
        }
    }
}
