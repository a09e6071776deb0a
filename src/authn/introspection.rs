//! OAuth 2.0 opaque bearer tokens, checked by RFC 7662 token introspection.
//!
//! A bearer credential that is neither a JWT nor a known API key is sent to
//! the configured introspection endpoint (Warden authenticates to it with
//! its client id and secret, HTTP Basic). The answer must say
//! `"active": true`; `exp` must be in the future; `aud`, when the endpoint
//! returns one, must name a configured audience; every required scope must
//! be in `scope`. Answers are cached by the token's SHA-256 (never the
//! token): positive ones no longer than the token's expiry or `cache_ttl`,
//! negative ones for `negative_cache_ttl`. An endpoint that fails, times
//! out or answers nonsense refuses the request with 503
//! `authentication_unavailable`: never let through.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{ApiKey, IntrospectionConfig};
use crate::reject::Reject;

/// Most cached answers; beyond it expired ones are swept, then all.
const MAX_CACHED: usize = 100_000;

#[derive(Clone)]
enum Cached {
    Active(Arc<ApiKey>),
    Inactive,
}

/// Introspects opaque tokens, with a cache.
pub struct Introspector {
    settings: IntrospectionConfig,
    client: reqwest::Client,
    cache: Mutex<HashMap<[u8; 32], (Instant, Cached)>>,
}

impl std::fmt::Debug for Introspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Introspector")
            .field("endpoint", &self.settings.endpoint)
            .finish_non_exhaustive()
    }
}

impl Introspector {
    /// An introspector for these settings.
    pub fn new(settings: IntrospectionConfig) -> Introspector {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Introspector {
            settings,
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The identity an active token stands for.
    pub async fn check(&self, token: &str) -> Result<Arc<ApiKey>, Reject> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(cached) = self.cached(&digest) {
            return match cached {
                Cached::Active(identity) => Ok(identity),
                Cached::Inactive => Err(Reject::InvalidCredential),
            };
        }
        let answer = self.ask(token).await?;
        let now = jiff::Timestamp::now().as_second();
        let (result, ttl) = match self.judge(&answer, now, &digest) {
            Some((identity, exp)) => {
                let left = exp.map_or(self.settings.cache_ttl, |e| {
                    Duration::from_secs(u64::try_from(e - now).unwrap_or(0))
                });
                (Cached::Active(Arc::new(identity)), left.min(self.settings.cache_ttl))
            }
            None => (Cached::Inactive, self.settings.negative_cache_ttl),
        };
        self.remember(digest, ttl, result.clone());
        match result {
            Cached::Active(identity) => Ok(identity),
            Cached::Inactive => Err(Reject::InvalidCredential),
        }
    }

    async fn ask(&self, token: &str) -> Result<Value, Reject> {
        let response = self
            .client
            .post(&self.settings.endpoint)
            .basic_auth(&self.settings.client_id, Some(&self.settings.client_secret))
            .header(http::header::ACCEPT, "application/json")
            .form(&[("token", token), ("token_type_hint", "access_token")])
            .send()
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "introspection endpoint unreachable");
                Reject::AuthenticationUnavailable
            })?;
        if !response.status().is_success() {
            tracing::error!(status = %response.status(), "introspection endpoint failed");
            return Err(Reject::AuthenticationUnavailable);
        }
        let answer: Value = response.json().await.map_err(|e| {
            tracing::error!(error = %e, "introspection endpoint answered nonsense");
            Reject::AuthenticationUnavailable
        })?;
        if !answer.get("active").is_some_and(Value::is_boolean) {
            tracing::error!("introspection answer has no boolean `active`");
            return Err(Reject::AuthenticationUnavailable);
        }
        Ok(answer)
    }

    /// The identity and expiry of an acceptable answer, or `None`.
    fn judge(&self, answer: &Value, now: i64, digest: &[u8; 32]) -> Option<(ApiKey, Option<i64>)> {
        let s = &self.settings;
        if answer.get("active") != Some(&Value::Bool(true)) {
            return None;
        }
        let exp = match answer.get("exp") {
            None => None,
            Some(v) => Some(v.as_i64()?),
        };
        if exp.is_some_and(|e| e <= now) {
            return None;
        }
        if let Some(aud) = answer.get("aud") {
            let named: Vec<&str> = match aud {
                Value::String(a) => vec![a.as_str()],
                Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
                _ => return None,
            };
            if !named.iter().any(|a| s.audiences.iter().any(|want| want == a)) {
                return None;
            }
        }
        let scopes = super::jwt::scopes(answer);
        if !s.required_scopes.iter().all(|r| scopes.contains(r)) {
            return None;
        }
        let text = |name: &str| answer.get(name).and_then(Value::as_str).map(str::to_owned);
        let subject = text("sub").or_else(|| text("client_id"))?;
        let tenant = text(&s.tenant_claim)?;
        Some((
            ApiKey {
                id: format!("oauth-sha256:{}", hex::encode(&digest[..8])),
                // A token with a subject acts for a user; one without, for
                // the client it was issued to.
                kind: if answer.get("sub").is_some() {
                    crate::config::PrincipalKind::User
                } else {
                    crate::config::PrincipalKind::Service
                },
                principal: subject,
                tenants: vec![tenant.clone()],
                tenant,
                tier: s.tier_claim.as_deref().and_then(text),
                scopes,
                models: s.models.clone(),
                attributes: answer.as_object().cloned().unwrap_or_default(),
                ..ApiKey::default()
            },
            exp,
        ))
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<Cached> {
        let cache = self.cache.lock().ok()?;
        let (until, answer) = cache.get(digest)?;
        (*until > Instant::now()).then(|| answer.clone())
    }

    fn remember(&self, digest: [u8; 32], ttl: Duration, answer: Cached) {
        if ttl.is_zero() {
            return;
        }
        let Ok(mut cache) = self.cache.lock() else { return };
        if cache.len() >= MAX_CACHED {
            let now = Instant::now();
            cache.retain(|_, (until, _)| *until > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(digest, (Instant::now() + ttl, answer));
    }
}
