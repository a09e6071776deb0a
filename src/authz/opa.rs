//! An external policy engine: Open Policy Agent, over its REST data API
//! (`POST /v1/data/<path>` with `{"input": <request>}`). The input is
//! Warden's AuthZEN-shaped request. The answer's `result` must be `true` or
//! `{"allow": true}` to allow; an undefined result (no `result`) is a deny,
//! and so is an error, a timeout or anything else — fail closed, with the
//! reason kept in the decision ([`super::remote`]).

use std::time::Duration;

use serde_json::Value;

use super::remote::RemotePdp;
use super::{AuthzRequest, Decision};

/// An OPA client.
#[derive(Debug)]
pub struct OpaPdp {
    remote: RemotePdp,
}

impl OpaPdp {
    /// A client for the decision at `path` (e.g. `warden/allow`) on the OPA
    /// server at `url`.
    /// `credential`, when given, is the `Authorization` header OPA gets.
    pub fn new(
        url: &str,
        path: &str,
        timeout: Duration,
        cache_ttl: Duration,
        credential: Option<http::HeaderValue>,
    ) -> OpaPdp {
        let endpoint = format!("{}/v1/data/{}", url.trim_end_matches('/'), path.trim_matches('/'));
        OpaPdp {
            remote: RemotePdp::new("opa", endpoint, timeout, cache_ttl, credential),
        }
    }

    /// Asks OPA; any failure is a deny that says why.
    pub async fn decide(&self, request: &AuthzRequest) -> Decision {
        self.remote.decide(serde_json::json!({ "input": request }), read).await
    }
}

fn read(answer: &Value) -> Result<bool, String> {
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
