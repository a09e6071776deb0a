//! JWT bearer tokens (JWS compact), checked the way RFC 8725 asks.
//!
//! In order, and before any key is touched:
//! 1. size: a token over `max_token_bytes` is refused unread;
//! 2. shape: exactly three base64url segments, header and claims JSON
//!    objects with no duplicate member ([`super::strict_json`]);
//! 3. header: `alg` is not `none` in any spelling and is one the issuer
//!    allows; `jwk`, `jku`, `x5u`, `x5c` and `x5t` are refused (a token never
//!    chooses its own key); any `crit` is refused (we implement no
//!    extension); `typ` must match when the issuer names one;
//! 4. issuer: `iss` must equal a configured issuer byte for byte (no
//!    trailing-slash or Unicode folding);
//! 5. key: `kid` must equal a key id exactly (it is never used to build a
//!    path or URL); the key's type must fit `alg` (no HS/RS confusion), and a
//!    key that names its own `alg` must agree; an unknown `kid` triggers at
//!    most one JWKS refresh per `min_refresh_interval`;
//! 6. signature, by aws-lc-rs through `jsonwebtoken::crypto::verify`;
//! 7. claims: `exp`, `iss`, `aud`, `sub` present; dates are numbers; `exp`,
//!    `nbf` and `iat` within `leeway`; `aud` names a configured audience.
//!
//! Claims then map to an identity by configuration (tenant, tier, models).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, jwk::JwkSet};
use serde_json::Value;

use super::strict_json;
use crate::config::{ApiKey, IssuerConfig, JwtConfig};

/// Why a token was refused. The name is audited; the client only hears
/// "invalid bearer token".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Longer than `max_token_bytes`.
    #[error("token_too_large")]
    TooLarge,
    /// Not three base64url segments of JSON objects.
    #[error("malformed_token")]
    Malformed,
    /// A JSON member appears twice.
    #[error("duplicate_member")]
    DuplicateMember,
    /// `alg: none`, in any spelling.
    #[error("alg_none")]
    AlgNone,
    /// An algorithm the issuer does not allow.
    #[error("alg_not_allowed")]
    AlgNotAllowed,
    /// A header that would let the token pick its own key.
    #[error("forbidden_header")]
    ForbiddenHeader,
    /// A `crit` header: no extension is understood.
    #[error("unknown_crit")]
    UnknownCrit,
    /// `typ` differs from the issuer's.
    #[error("wrong_typ")]
    WrongTyp,
    /// `iss` names no configured issuer.
    #[error("unknown_issuer")]
    UnknownIssuer,
    /// `kid` matches no key (or is missing where it is needed).
    #[error("unknown_kid")]
    UnknownKid,
    /// The key's type or declared algorithm does not fit `alg`.
    #[error("key_mismatch")]
    KeyMismatch,
    /// The signature does not verify.
    #[error("bad_signature")]
    BadSignature,
    /// `exp` has passed.
    #[error("expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("not_yet_valid")]
    NotYetValid,
    /// `iat` is in the future.
    #[error("issued_in_future")]
    IssuedInFuture,
    /// A required claim is missing.
    #[error("missing_claim")]
    MissingClaim,
    /// A claim has the wrong type (e.g. a date that is a string).
    #[error("bad_claim_type")]
    BadClaimType,
    /// `aud` names none of the issuer's audiences.
    #[error("wrong_audience")]
    WrongAudience,
}

/// One trusted issuer: its checked settings and its keys.
pub struct Issuer {
    /// Issuer, audiences, algorithms, claim mapping.
    pub settings: IssuerConfig,
    /// Where its keys come from.
    pub keys: Keys,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.settings.issuer)
            .finish_non_exhaustive()
    }
}

/// A verification key.
#[derive(Clone)]
pub struct VerificationKey {
    /// `kid`, if the key has one.
    pub kid: Option<String>,
    /// The key.
    pub key: DecodingKey,
    /// The algorithm the key is for, when its JWK says so.
    pub alg: Option<Algorithm>,
}

/// An issuer's keys: fixed, or fetched from a JWKS URL and refreshed.
pub enum Keys {
    /// Keys from the configuration.
    Static(Vec<VerificationKey>),
    /// A JWKS endpoint.
    Jwks(Arc<JwksCache>),
}

/// A JWKS endpoint's keys, the last good set kept when a fetch fails.
pub struct JwksCache {
    url: String,
    client: reqwest::Client,
    keys: ArcSwap<Vec<VerificationKey>>,
    min_refresh: Duration,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl JwksCache {
    /// Fetches the set once; an unreachable endpoint leaves it empty, to be
    /// retried when a token needs it.
    pub async fn start(url: String, min_refresh: Duration) -> Arc<JwksCache> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        let cache = Arc::new(JwksCache {
            url,
            client,
            keys: ArcSwap::from_pointee(Vec::new()),
            min_refresh,
            last_fetch: tokio::sync::Mutex::new(None),
        });
        cache.refresh().await;
        cache
    }

    /// Fetches the set unless that happened less than `min_refresh` ago.
    async fn refresh(&self) {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.min_refresh) {
            return;
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => self.keys.store(Arc::new(keys)),
            Err(e) => tracing::warn!(url = %self.url, error = %e, "JWKS fetch failed; keeping the last good set"),
        }
    }

    async fn fetch(&self) -> Result<Vec<VerificationKey>, String> {
        let response = self.client.get(&self.url).send().await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let bytes = response.bytes().await.map_err(|e| e.to_string())?;
        jwks_keys(&bytes)
    }
}

/// The `jwks_uri` of an OpenID provider, whose discovery document must name
/// `issuer` exactly (OpenID Connect Discovery 1.0, §4.3).
async fn discover_jwks_uri(discovery: &str, issuer: &str) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let document: Value = client
        .get(discovery)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    if document.get("issuer").and_then(Value::as_str) != Some(issuer) {
        return Err(format!("the discovery document does not name the issuer `{issuer}`"));
    }
    let uri = document
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or("the discovery document has no `jwks_uri`")?;
    if !(uri.starts_with("https://") || uri.starts_with("http://127.") || uri.starts_with("http://localhost")) {
        return Err(format!("`jwks_uri` `{uri}` is not https"));
    }
    Ok(uri.to_owned())
}

/// The usable keys of a JWKS document.
pub fn jwks_keys(bytes: &[u8]) -> Result<Vec<VerificationKey>, String> {
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS: {e}"))?;
    Ok(set
        .keys
        .iter()
        .filter_map(|jwk| {
            let key = DecodingKey::from_jwk(jwk).ok()?;
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            Some(VerificationKey {
                kid: jwk.common.key_id.clone(),
                key,
                alg,
            })
        })
        .collect())
}

/// Every trusted issuer.
#[derive(Debug)]
pub struct JwtVerifier {
    issuers: HashMap<String, Issuer>,
    max_token_bytes: usize,
}

impl JwtVerifier {
    /// Builds the issuers' key sources: fixed keys, a JWKS URL, or one found
    /// by OpenID Connect discovery (whose `issuer` must match exactly; if it
    /// cannot be read, that issuer has no keys and its tokens are refused).
    pub async fn start(settings: &JwtConfig) -> JwtVerifier {
        let mut issuers = Vec::new();
        for i in &settings.issuers {
            let min = i.min_refresh_interval;
            let keys = match (&i.jwks_url, &i.discovery_url) {
                (Some(url), _) => Keys::Jwks(JwksCache::start(url.clone(), min).await),
                (None, Some(discovery)) => match discover_jwks_uri(discovery, &i.issuer).await {
                    Ok(url) => Keys::Jwks(JwksCache::start(url, min).await),
                    Err(e) => {
                        tracing::error!(issuer = %i.issuer, error = %e, "OIDC discovery failed; this issuer's tokens are refused until a reload");
                        Keys::Static(Vec::new())
                    }
                },
                (None, None) => Keys::Static(i.static_keys.clone()),
            };
            issuers.push(Issuer {
                settings: i.clone(),
                keys,
            });
        }
        JwtVerifier::new(issuers, settings.max_token_bytes)
    }

    /// A verifier for these issuers.
    pub fn new(issuers: Vec<Issuer>, max_token_bytes: usize) -> JwtVerifier {
        JwtVerifier {
            issuers: issuers.into_iter().map(|i| (i.settings.issuer.clone(), i)).collect(),
            max_token_bytes,
        }
    }

    /// Checks a token and maps its claims to an identity.
    pub async fn verify(&self, token: &str) -> Result<ApiKey, TokenError> {
        if token.len() > self.max_token_bytes {
            return Err(TokenError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(h64), Some(c64), Some(s64), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError::Malformed);
        };
        let header = decode_object(h64)?;
        let claims = decode_object(c64)?;

        let alg_name = header.get("alg").and_then(Value::as_str).ok_or(TokenError::Malformed)?;
        if alg_name.eq_ignore_ascii_case("none") {
            return Err(TokenError::AlgNone);
        }
        if ["jwk", "jku", "x5u", "x5c", "x5t", "x5t#S256"]
            .iter()
            .any(|h| header.get(*h).is_some())
        {
            return Err(TokenError::ForbiddenHeader);
        }
        if header.get("crit").is_some() {
            return Err(TokenError::UnknownCrit);
        }
        let iss = claims.get("iss").ok_or(TokenError::MissingClaim)?;
        let iss = iss.as_str().ok_or(TokenError::BadClaimType)?;
        let issuer = self.issuers.get(iss).ok_or(TokenError::UnknownIssuer)?;
        // Exact spelling only: "RS256" is an algorithm, "rs256" is not.
        let alg = issuer
            .settings
            .algorithms
            .iter()
            .copied()
            .find(|a| alg_label(*a) == Some(alg_name))
            .ok_or(TokenError::AlgNotAllowed)?;
        if let Some(typ) = &issuer.settings.typ {
            let given = header.get("typ").and_then(Value::as_str).unwrap_or("");
            if !given.eq_ignore_ascii_case(typ) {
                return Err(TokenError::WrongTyp);
            }
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(TokenError::Malformed),
        };

        let key = find_key(issuer, kid, alg).await?;
        let message_len = h64.len() + 1 + c64.len();
        let message = token.get(..message_len).ok_or(TokenError::Malformed)?;
        match jsonwebtoken::crypto::verify(s64, message.as_bytes(), &key.key, alg) {
            Ok(true) => {}
            _ => return Err(TokenError::BadSignature),
        }

        check_claims(&issuer.settings, &claims, jiff::Timestamp::now().as_second())?;
        identity(&issuer.settings, &claims, token)
    }
}

/// The key that must have signed a token, by exact `kid` (or the only key
/// of the right type when the token has none). An unknown `kid` refreshes a
/// JWKS once, rate-limited.
async fn find_key(issuer: &Issuer, kid: Option<&str>, alg: Algorithm) -> Result<VerificationKey, TokenError> {
    let pick = |keys: &[VerificationKey]| -> Result<Option<VerificationKey>, TokenError> {
        let fits = |k: &&VerificationKey| k.key.family() == alg.family();
        let found = match kid {
            Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None => {
                let mut fitting = keys.iter().filter(fits);
                match (fitting.next(), fitting.next()) {
                    (Some(only), None) => Some(only),
                    _ => None,
                }
            }
        };
        match found {
            None => Ok(None),
            Some(k) if !fits(&k) || k.alg.is_some_and(|a| a != alg) => Err(TokenError::KeyMismatch),
            Some(k) => Ok(Some(k.clone())),
        }
    };
    match &issuer.keys {
        Keys::Static(keys) => pick(keys)?.ok_or(TokenError::UnknownKid),
        Keys::Jwks(cache) => {
            if let Some(key) = pick(&cache.keys.load())? {
                return Ok(key);
            }
            cache.refresh().await;
            pick(&cache.keys.load())?.ok_or(TokenError::UnknownKid)
        }
    }
}

fn check_claims(issuer: &IssuerConfig, claims: &Value, now: i64) -> Result<(), TokenError> {
    let date = |name: &str| -> Result<Option<f64>, TokenError> {
        match claims.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_f64().map(Some).ok_or(TokenError::BadClaimType),
            Some(_) => Err(TokenError::BadClaimType),
        }
    };
    let now = now as f64;
    let leeway = issuer.leeway as f64;
    let exp = date("exp")?.ok_or(TokenError::MissingClaim)?;
    if exp <= now - leeway {
        return Err(TokenError::Expired);
    }
    if date("nbf")?.is_some_and(|nbf| nbf > now + leeway) {
        return Err(TokenError::NotYetValid);
    }
    if date("iat")?.is_some_and(|iat| iat > now + leeway) {
        return Err(TokenError::IssuedInFuture);
    }
    match claims.get("sub") {
        Some(Value::String(s)) if !s.is_empty() => {}
        Some(Value::String(_)) | None => return Err(TokenError::MissingClaim),
        Some(_) => return Err(TokenError::BadClaimType),
    }
    let audiences: Vec<&str> = match claims.get("aud") {
        None => return Err(TokenError::MissingClaim),
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|a| a.as_str().ok_or(TokenError::BadClaimType))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(TokenError::BadClaimType),
    };
    if !audiences.iter().any(|a| issuer.audiences.iter().any(|want| want == a)) {
        return Err(TokenError::WrongAudience);
    }
    Ok(())
}

fn identity(issuer: &IssuerConfig, claims: &Value, token: &str) -> Result<ApiKey, TokenError> {
    let text = |name: &str| claim(claims, name).and_then(Value::as_str).map(str::to_owned);
    let principal = match &issuer.principal_claim {
        Some(name) => text(name).filter(|p| !p.is_empty()).ok_or(TokenError::MissingClaim)?,
        None => format!("{}#{}", issuer.issuer, text("sub").ok_or(TokenError::MissingClaim)?),
    };
    let tenant = match (claim(claims, &issuer.tenant_claim), &issuer.tenant) {
        (Some(Value::String(t)), _) if !t.is_empty() => t.clone(),
        (Some(Value::String(_)) | None, Some(fixed)) => fixed.clone(),
        (Some(Value::String(_)) | None, None) => return Err(TokenError::MissingClaim),
        (Some(_), _) => return Err(TokenError::BadClaimType),
    };
    // The credential id names this token without revealing it: its `jti`,
    // or a fingerprint of the token.
    let id = text("jti").map_or_else(
        || {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(token.as_bytes());
            format!("jwt-sha256:{}", hex::encode(&digest[..8]))
        },
        |jti| format!("jwt:{jti}"),
    );
    Ok(ApiKey {
        id,
        principal,
        kind: issuer.kind,
        tenants: vec![tenant.clone()],
        tenant,
        tier: issuer.tier_claim.as_deref().and_then(text),
        scopes: scopes(claims),
        groups: string_list(claim(claims, &issuer.groups_claim)),
        models: issuer.models.clone(),
        // Every claim is a policy attribute; none is secret (the signature is
        // not a claim).
        attributes: claims.as_object().cloned().unwrap_or_default(),
        ..ApiKey::default()
    })
}

/// Scopes from `scope` (space-separated, RFC 8693/9068) or `scp` (a list or
/// a string, as Entra ID and Okta send it).
pub fn scopes(claims: &Value) -> Vec<String> {
    match claims.get("scope").or_else(|| claims.get("scp")) {
        Some(Value::String(s)) => s.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect(),
        other => string_list(other),
    }
}

fn string_list(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// A claim by name, or by JSON pointer when the name starts with `/`
/// (nested claims such as Kubernetes' `/kubernetes.io/namespace`).
fn claim<'a>(claims: &'a Value, name: &str) -> Option<&'a Value> {
    if name.starts_with('/') {
        claims.pointer(name)
    } else {
        claims.get(name)
    }
}

fn decode_object(segment: &str) -> Result<Value, TokenError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| TokenError::Malformed)?;
    let value = strict_json::parse(&bytes).map_err(|e| {
        if e.to_string().contains("duplicate member") {
            TokenError::DuplicateMember
        } else {
            TokenError::Malformed
        }
    })?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(TokenError::Malformed)
    }
}

/// The JOSE name of an algorithm (`None` for one added to the library
/// after this was written, which is then never accepted).
pub fn alg_label(alg: Algorithm) -> Option<&'static str> {
    Some(match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::EdDSA => "EdDSA",
        _ => return None,
    })
}

/// Whether a bearer credential is meant as a JWT: base64url of a JSON object
/// (`eyJ`) followed by a dot. Anything else is an API key. A token that is
/// meant as a JWT but malformed is refused as a token, not tried as a key.
pub fn looks_like_jwt(credential: &str) -> bool {
    credential.starts_with("eyJ") && credential.contains('.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelGrant, PrincipalKind};

    fn issuer() -> IssuerConfig {
        IssuerConfig {
            issuer: "https://issuer.test".into(),
            audiences: vec!["warden".into()],
            algorithms: vec![],
            typ: None,
            leeway: 30,
            jwks_url: None,
            discovery_url: None,
            static_keys: vec![],
            min_refresh_interval: std::time::Duration::from_secs(30),
            principal_claim: None,
            kind: PrincipalKind::User,
            groups_claim: "groups".into(),
            tenant: None,
            tenant_claim: "tenant".into(),
            tier_claim: Some("tier".into()),
            models: ModelGrant::All,
        }
    }

    #[test]
    fn claims_become_a_rich_identity() {
        let claims = serde_json::json!({
            "iss": "https://issuer.test", "sub": "u1", "tenant": "acme", "tier": "pro",
            "scope": "chat  embed", "groups": ["ml-eng", "oncall"], "jti": "t-1", "dept": "risk",
        });
        let id = identity(&issuer(), &claims, "token").unwrap();
        assert_eq!(id.principal, "https://issuer.test#u1");
        assert_eq!(id.id, "jwt:t-1");
        assert_eq!(
            (id.tenant.as_str(), id.tenants.as_slice()),
            ("acme", &["acme".to_owned()][..])
        );
        assert_eq!(id.tier.as_deref(), Some("pro"));
        assert_eq!(id.scopes, ["chat", "embed"]);
        assert_eq!(id.groups, ["ml-eng", "oncall"]);
        assert_eq!(id.attributes["dept"], "risk");
        assert_eq!(id.kind, PrincipalKind::User);
        // `scp` as a list (Entra ID), and a static tenant when the token has none.
        let claims = serde_json::json!({"iss": "https://issuer.test", "sub": "u2", "scp": ["a", "b"]});
        let fixed = IssuerConfig {
            tenant: Some("fixed".into()),
            ..issuer()
        };
        let id = identity(&fixed, &claims, "token").unwrap();
        assert_eq!(id.scopes, ["a", "b"]);
        assert_eq!(id.tenant, "fixed");
        assert!(identity(&issuer(), &claims, "token").is_err(), "no tenant anywhere");
    }
}
