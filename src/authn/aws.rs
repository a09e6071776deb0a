//! AWS IAM callers, the way HashiCorp Vault's `aws` auth method does it:
//! the caller signs an `sts:GetCallerIdentity` request with its AWS
//! credentials (SigV4) and sends the signed request — not the credentials —
//! in the `x-warden-aws-iam` header; Warden forwards it to STS, which checks
//! the signature and says whose it is.
//!
//! Before forwarding, Warden insists that the request is exactly
//! `Action=GetCallerIdentity&Version=2011-06-15` by POST to the configured
//! STS endpoint, and that it carries and signs `x-warden-server-id` with
//! this gateway's id — so a signed request made for another service cannot
//! be replayed here. The ARN STS returns (an assumed role is reduced to its
//! role) must be a configured principal. Positive answers are cached for a
//! minute by the header's SHA-256; STS unreachable means 503.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::{ApiKey, AwsConfig};
use crate::reject::Reject;

/// The header carrying the signed request.
pub const HEADER: &str = "x-warden-aws-iam";
/// The header the signed request must carry (and sign) with our server id.
pub const SERVER_ID_HEADER: &str = "x-warden-server-id";
const CACHE_TTL: Duration = Duration::from_secs(60);
const MAX_CACHED: usize = 10_000;

/// The signed request, as the caller sends it (base64url JSON).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedRequest {
    method: String,
    url: String,
    body: String,
    headers: HashMap<String, String>,
}

/// A principal STS vouched for, until when it is trusted without asking again.
type Proven = (Instant, Arc<ApiKey>);

/// Verifies AWS callers through STS.
pub struct AwsVerifier {
    settings: AwsConfig,
    client: reqwest::Client,
    cache: Mutex<HashMap<[u8; 32], Proven>>,
}

impl std::fmt::Debug for AwsVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsVerifier")
            .field("sts_endpoint", &self.settings.sts_endpoint)
            .finish_non_exhaustive()
    }
}

impl AwsVerifier {
    /// A verifier for these settings.
    pub fn new(settings: AwsConfig) -> AwsVerifier {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        AwsVerifier {
            settings,
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The configured principal whose signature the header carries.
    pub async fn check(&self, header: &str) -> Result<Arc<ApiKey>, Reject> {
        let digest: [u8; 32] = Sha256::digest(header.as_bytes()).into();
        if let Some(hit) = self.cached(&digest) {
            return Ok(hit);
        }
        let signed = self.parse(header).ok_or(Reject::InvalidCredential)?;
        let arn = self.ask_sts(&signed).await?;
        let principal = self
            .settings
            .principals
            .get(&role_arn(&arn))
            .cloned()
            .ok_or(Reject::InvalidCredential)?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(digest, (Instant::now() + CACHE_TTL, Arc::clone(&principal)));
        }
        Ok(principal)
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<Arc<ApiKey>> {
        let cache = self.cache.lock().ok()?;
        let (until, principal) = cache.get(digest)?;
        (*until > Instant::now()).then(|| Arc::clone(principal))
    }

    /// The signed request, if it is one Warden will forward.
    fn parse(&self, header: &str) -> Option<SignedRequest> {
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header.trim())
            .ok()?;
        let mut signed: SignedRequest = serde_json::from_slice(&json).ok()?;
        signed.headers = signed
            .headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        let mut params: Vec<&str> = signed.body.split('&').collect();
        params.sort_unstable();
        let is_get_caller_identity = params == ["Action=GetCallerIdentity", "Version=2011-06-15"];
        let signed_headers = signed
            .headers
            .get("authorization")?
            .strip_prefix("AWS4-HMAC-SHA256 ")?
            .split(", ")
            .find_map(|part| part.strip_prefix("SignedHeaders="))?
            .split(';')
            .map(str::to_owned)
            .collect::<Vec<_>>();
        let ok = signed.method == "POST"
            && signed.url == self.settings.sts_endpoint
            && is_get_caller_identity
            && signed.headers.get(SERVER_ID_HEADER) == Some(&self.settings.server_id)
            && signed_headers.iter().any(|h| h == SERVER_ID_HEADER)
            && signed_headers.iter().any(|h| h == "host");
        ok.then_some(signed)
    }

    async fn ask_sts(&self, signed: &SignedRequest) -> Result<String, Reject> {
        let mut request = self.client.post(&self.settings.sts_endpoint).body(signed.body.clone());
        for (name, value) in &signed.headers {
            if !matches!(name.as_str(), "content-length" | "connection" | "transfer-encoding") {
                request = request.header(name, value);
            }
        }
        let response = request.send().await.map_err(|e| {
            tracing::error!(error = %e, "STS unreachable");
            Reject::AuthenticationUnavailable
        })?;
        let status = response.status();
        let text = response.text().await.map_err(|_| Reject::AuthenticationUnavailable)?;
        if status.is_client_error() {
            // STS refused the signature (or the request): the caller's fault.
            return Err(Reject::InvalidCredential);
        }
        if !status.is_success() {
            tracing::error!(%status, "STS failed");
            return Err(Reject::AuthenticationUnavailable);
        }
        between(&text, "<Arn>", "</Arn>")
            .map(str::to_owned)
            .ok_or(Reject::AuthenticationUnavailable)
    }
}

/// `arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION` → `arn:aws:iam::ACCOUNT:role/ROLE`;
/// other ARNs unchanged.
pub fn role_arn(arn: &str) -> String {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    if let [partition_prefix, partition, "sts", "", account, resource] = parts.as_slice()
        && let Some(rest) = resource.strip_prefix("assumed-role/")
        && let Some((role, _session)) = rest.split_once('/')
    {
        return format!("{partition_prefix}:{partition}:iam::{account}:role/{role}");
    }
    arn.to_owned()
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let end = text[start..].find(close)? + start;
    Some(text[start..end].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assumed_roles_reduce_to_their_role() {
        assert_eq!(
            role_arn("arn:aws:sts::123456789012:assumed-role/batch-scorer/i-0abc"),
            "arn:aws:iam::123456789012:role/batch-scorer"
        );
        assert_eq!(
            role_arn("arn:aws:iam::123456789012:user/alice"),
            "arn:aws:iam::123456789012:user/alice"
        );
        assert_eq!(role_arn("nonsense"), "nonsense");
    }
}
