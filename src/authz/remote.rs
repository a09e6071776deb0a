//! What the external policy engines share: the HTTP exchange with the PDP
//! (a POST of a JSON body within a timeout), a bounded decision cache with a
//! TTL keyed by the SHA-256 of that body, and failing closed — a deny that
//! says why — whenever the PDP cannot give a usable answer. Each engine
//! supplies only its URL, its request body and how to read its answer.
//!
//! A batch ([`RemotePdp::decide_many`]) consults the cache item by item,
//! sends only the misses, in one request, and keeps every answer as its own
//! decision and its own cache entry (the key is the item's single-request
//! body, so a batch and a lone request share their cached answers).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::Decision;

/// An external PDP reached over HTTP.
pub struct RemotePdp {
    engine: &'static str,
    endpoint: String,
    client: reqwest::Client,
    /// Warden's own `Authorization` for the PDP (sensitive: never logged).
    authorization: Option<http::HeaderValue>,
    cache: DecisionCache,
}

impl std::fmt::Debug for RemotePdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemotePdp")
            .field("engine", &self.engine)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl RemotePdp {
    /// A PDP answering `POST endpoint` within `timeout`; decisions reused for `cache_ttl`.
    /// `authorization`, when given, goes with every call.
    pub fn new(
        engine: &'static str,
        endpoint: String,
        timeout: Duration,
        cache_ttl: Duration,
        authorization: Option<http::HeaderValue>,
    ) -> RemotePdp {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        RemotePdp {
            engine,
            endpoint,
            client,
            authorization,
            cache: DecisionCache::new(cache_ttl),
        }
    }

    /// Sends `body` (or reuses a fresh answer to it); `read` turns the
    /// PDP's JSON answer into allow or deny, or says why it cannot.
    pub async fn decide(
        &self,
        body: serde_json::Value,
        read: fn(&serde_json::Value) -> Result<bool, String>,
    ) -> Decision {
        let key = DecisionCache::key(&body);
        if let Some(allowed) = self.cache.get(&key) {
            return verdict(self.engine, allowed, None);
        }
        match self.ask(&body, read).await {
            Ok(allowed) => {
                self.cache.put(key, allowed);
                verdict(self.engine, allowed, None)
            }
            Err(reason) => {
                tracing::warn!(engine = self.engine, endpoint = %self.endpoint, %reason, "no usable decision from the PDP: denied");
                verdict(self.engine, false, Some(reason))
            }
        }
    }

    async fn ask(
        &self,
        body: &serde_json::Value,
        read: fn(&serde_json::Value) -> Result<bool, String>,
    ) -> Result<bool, String> {
        read(&self.post(&self.endpoint, body).await?)
    }

    /// Decides several requests, `items` being each one's single-request
    /// body: fresh cached answers are reused, and the rest go to `endpoint`
    /// together in the body `batch` makes of them. `read` turns the answer
    /// into verdicts, which must be exactly one per item sent, in order;
    /// otherwise (or when the PDP fails) every item sent is a deny that says
    /// why — fail closed, as for a single request. The decisions come
    /// back in the order of `items`.
    pub async fn decide_many(
        &self,
        endpoint: &str,
        items: &[serde_json::Value],
        batch: fn(&[&serde_json::Value]) -> serde_json::Value,
        read: fn(&serde_json::Value) -> Result<Vec<bool>, String>,
    ) -> Vec<Decision> {
        let keys: Vec<[u8; 32]> = items.iter().map(DecisionCache::key).collect();
        let mut decisions: Vec<Option<Decision>> = keys
            .iter()
            .map(|key| self.cache.get(key).map(|allowed| verdict(self.engine, allowed, None)))
            .collect();
        let missing: Vec<usize> = (0..items.len()).filter(|&i| decisions[i].is_none()).collect();
        if !missing.is_empty() {
            let sent: Vec<&serde_json::Value> = missing.iter().map(|&i| &items[i]).collect();
            let answer = match self.post(endpoint, &batch(&sent)).await {
                Ok(answer) => read(&answer),
                Err(reason) => Err(reason),
            };
            match answer {
                Ok(verdicts) if verdicts.len() == missing.len() => {
                    for (&i, allowed) in missing.iter().zip(verdicts) {
                        self.cache.put(keys[i], allowed);
                        decisions[i] = Some(verdict(self.engine, allowed, None));
                    }
                }
                other => {
                    let reason = match other {
                        Err(reason) => reason,
                        Ok(verdicts) => format!("{} answers for {} requests", verdicts.len(), missing.len()),
                    };
                    tracing::warn!(engine = self.engine, %endpoint, %reason, items = missing.len(), "no usable batch decision from the PDP: all denied");
                    for &i in &missing {
                        decisions[i] = Some(verdict(self.engine, false, Some(reason.clone())));
                    }
                }
            }
        }
        decisions
            .into_iter()
            .map(|d| d.unwrap_or_else(|| verdict(self.engine, false, Some("no decision".to_owned()))))
            .collect()
    }

    /// POSTs `body` to `endpoint`: the JSON answer of a 2xx, or why there is none.
    async fn post(&self, endpoint: &str, body: &serde_json::Value) -> Result<serde_json::Value, String> {
        let mut request = self.client.post(endpoint).json(body);
        if let Some(authorization) = &self.authorization {
            request = request.header(http::header::AUTHORIZATION, authorization.clone());
        }
        let response = request.send().await.map_err(|e| failure(&e))?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status().as_u16()));
        }
        response.json().await.map_err(|_| "malformed answer".to_owned())
    }
}

/// Most cached decisions; beyond it the cache starts over.
const MAX_CACHED: usize = 10_000;

/// Recent decisions of an external engine.
#[derive(Debug)]
struct DecisionCache {
    ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], (Instant, bool)>>,
}

impl DecisionCache {
    /// Decisions are reused for `ttl` (zero: never).
    fn new(ttl: Duration) -> DecisionCache {
        DecisionCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The cache key of a request body.
    fn key(body: &serde_json::Value) -> [u8; 32] {
        Sha256::digest(body.to_string().as_bytes()).into()
    }

    /// A still-fresh decision for `key`.
    fn get(&self, key: &[u8; 32]) -> Option<bool> {
        let entries = self.entries.lock().ok()?;
        let (until, allowed) = entries.get(key)?;
        (*until > Instant::now()).then_some(*allowed)
    }

    /// Keeps a decision for the TTL.
    fn put(&self, key: [u8; 32], allowed: bool) {
        if self.ttl.is_zero() {
            return;
        }
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= MAX_CACHED {
                entries.clear();
            }
            entries.insert(key, (Instant::now() + self.ttl, allowed));
        }
    }
}

/// An external engine's decision; `error` says why it could not decide.
fn verdict(engine: &'static str, allowed: bool, error: Option<String>) -> Decision {
    let mut decision = if allowed {
        Decision::allow(engine, "", Vec::new())
    } else {
        Decision::deny(engine, "", Vec::new())
    };
    decision.error = error;
    decision
}

/// Why a request to an external engine failed, in a few words.
fn failure(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".to_owned()
    } else {
        format!("unreachable: {e}")
    }
}
