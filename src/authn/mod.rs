//! Stage 1, authenticate: who is calling. This stage knows API keys; it reads
//! the key from `Authorization: Bearer` or `x-api-key`, hashes it and finds
//! the key with that SHA-256 in constant time.
//!
//! Keys come from two places: declared in the configuration by their digest,
//! and managed at run time in a key store ([`key_store`], [`managed`]). A
//! managed key carries its id in its text ([`key_format`]), which finds its
//! record directly; its digest is then compared in constant time.
//!
//! Configured keys are indexed by the first 8 bytes of their digest so the lookup does not
//! scan every key; the full 32-byte digest is then compared with
//! `subtle::ConstantTimeEq`. The index lookup can only reveal whether a key
//! exists whose digest shares a prefix with the digest of the guess, which
//! says nothing about any key.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ApiKey, ModelGrant};
use crate::reject::Reject;

pub mod aws;
pub mod introspection;
pub mod jwt;
pub mod key_format;
pub mod key_store;
pub mod lockout;
pub mod managed;
pub mod mtls;
mod strict_json;

pub use managed::ManagedKeys;

/// How a caller proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A configured API key.
    ApiKey,
    /// A JWT from a trusted issuer.
    Jwt,
    /// A verified client certificate of a known client (and nothing else).
    Mtls,
    /// An opaque OAuth 2.0 token the authorization server vouched for.
    OAuth,
    /// An AWS IAM principal, by a signed `sts:GetCallerIdentity` request.
    AwsIam,
    /// No credential, on a route configured to allow that.
    Anonymous,
}

impl AuthMethod {
    /// The name recorded in the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ApiKey => "api_key",
            AuthMethod::Jwt => "jwt",
            AuthMethod::Mtls => "mtls",
            AuthMethod::OAuth => "oauth_introspection",
            AuthMethod::AwsIam => "aws_iam",
            AuthMethod::Anonymous => "anonymous",
        }
    }
}

/// The authenticated caller, the same shape whatever the method.
#[derive(Debug, Clone)]
pub struct Identity {
    /// How they authenticated.
    pub method: AuthMethod,
    /// The key they used, when they used one.
    pub key: Option<Arc<ApiKey>>,
    /// The known mTLS client on the connection, when there is one (whatever
    /// else authenticated the request).
    pub client_cert: Option<Arc<ApiKey>>,
}

impl Identity {
    /// An unauthenticated caller on a route that allows it.
    pub fn anonymous() -> Identity {
        Identity {
            method: AuthMethod::Anonymous,
            key: None,
            client_cert: None,
        }
    }

    /// Who the caller is.
    pub fn principal(&self) -> &str {
        self.key.as_ref().map_or("anonymous", |k| k.principal.as_str())
    }

    /// The credential id, safe to log.
    pub fn credential_id(&self) -> Option<&str> {
        self.key.as_ref().map(|k| k.id.as_str())
    }

    /// The tenant the caller acts for.
    pub fn tenant(&self) -> Option<&str> {
        self.key.as_ref().map(|k| k.tenant.as_str())
    }

    /// The caller's service tier, when it has one.
    pub fn tier(&self) -> Option<&str> {
        self.key.as_ref().and_then(|k| k.tier.as_deref())
    }

    /// The models the caller may call; an anonymous caller may call none.
    pub fn models(&self) -> Option<&ModelGrant> {
        self.key.as_ref().map(|k| &k.models)
    }
}

/// The configured API keys, ready for lookup.
#[derive(Debug, Default)]
pub struct KeyIndex {
    by_prefix: HashMap<[u8; 8], Vec<Arc<ApiKey>>>,
}

impl KeyIndex {
    /// Indexes the configured keys.
    pub fn new(keys: &[ApiKey]) -> KeyIndex {
        let mut by_prefix: HashMap<[u8; 8], Vec<Arc<ApiKey>>> = HashMap::new();
        for key in keys {
            by_prefix
                .entry(prefix(&key.digest))
                .or_default()
                .push(Arc::new(key.clone()));
        }
        KeyIndex { by_prefix }
    }

    /// Authenticates a request by its headers, against the configured keys
    /// and, when there is a key store, the managed ones.
    pub fn authenticate(&self, headers: &HeaderMap, managed: Option<&ManagedKeys>) -> Result<Identity, Reject> {
        self.authenticate_key(presented_key(headers)?, managed)
    }

    /// Authenticates the key a request presents.
    fn authenticate_key(&self, presented: &str, managed: Option<&ManagedKeys>) -> Result<Identity, Reject> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if let (Some(managed), Some(kid)) = (managed, key_format::kid_of(presented))
            && let Some(found) = managed.get(kid)
        {
            if bool::from(found.key.digest.ct_eq(&digest)) {
                found
                    .last_used
                    .store(key_store::now_secs(), std::sync::atomic::Ordering::Relaxed);
                return Ok(Identity {
                    method: AuthMethod::ApiKey,
                    key: Some(Arc::clone(&found.key)),
                    client_cert: None,
                });
            }
            return Err(Reject::InvalidCredential);
        }
        let candidates = self.by_prefix.get(&prefix(&digest)).map_or(&[][..], Vec::as_slice);
        let mut found = None;
        // INVARIANT: every candidate is compared, so the time taken does not
        // depend on which one matched.
        for key in candidates {
            if bool::from(key.digest.ct_eq(&digest)) {
                found = Some(key);
            }
        }
        match found {
            Some(key) => Ok(Identity {
                method: AuthMethod::ApiKey,
                key: Some(Arc::clone(key)),
                client_cert: None,
            }),
            None => Err(Reject::InvalidCredential),
        }
    }
}

/// Everything that can vouch for a caller, as configured.
#[derive(Debug, Clone, Copy)]
pub struct Authenticators<'a> {
    /// Keys declared in the configuration.
    pub keys: &'a KeyIndex,
    /// Keys managed at run time.
    pub managed: Option<&'a ManagedKeys>,
    /// JWT issuers.
    pub jwt: Option<&'a jwt::JwtVerifier>,
    /// Opaque-token introspection.
    pub introspection: Option<&'a introspection::Introspector>,
    /// AWS IAM through STS.
    pub aws: Option<&'a aws::AwsVerifier>,
}

/// Authenticates a request. A signed AWS request (`x-warden-aws-iam`) goes
/// to STS; a bearer credential shaped like a JWT goes to the JWT verifier;
/// anything else is an API key, or, failing that, an opaque OAuth token for
/// introspection. Two different credentials on one request are refused as
/// ambiguous.
///
/// The methods that wait on a network or verify a signature run boxed: left
/// inline, their large states would make every request's future larger, and
/// an API-key request would pay for copying them.
pub async fn authenticate(headers: &HeaderMap, with: Authenticators<'_>) -> Result<Identity, Reject> {
    if let Some(signed) = headers.get(aws::HEADER) {
        if headers.contains_key(http::header::AUTHORIZATION) || headers.contains_key("x-api-key") {
            return Err(Reject::ConflictingCredentials);
        }
        let verifier = with.aws.ok_or(Reject::InvalidCredential)?;
        let signed = signed.to_str().map_err(|_| Reject::InvalidCredential)?;
        return Ok(Identity {
            method: AuthMethod::AwsIam,
            key: Some(Box::pin(verifier.check(signed)).await?),
            client_cert: None,
        });
    }
    let presented = presented_key(headers)?;
    if let Some(verifier) = with.jwt
        && jwt::looks_like_jwt(presented)
    {
        let subject = Box::pin(verifier.verify(presented))
            .await
            .map_err(Reject::InvalidToken)?;
        return Ok(Identity {
            method: AuthMethod::Jwt,
            key: Some(Arc::new(subject)),
            client_cert: None,
        });
    }
    match (with.keys.authenticate_key(presented, with.managed), with.introspection) {
        // An opaque bearer token that is no key of ours: ask the authorization
        // server. Generated keys (`wdn_…`) never leave the gateway.
        (Err(Reject::InvalidCredential), Some(introspector))
            if headers.contains_key(http::header::AUTHORIZATION) && !presented.starts_with(key_format::PREFIX) =>
        {
            Ok(Identity {
                method: AuthMethod::OAuth,
                key: Some(Box::pin(introspector.check(presented)).await?),
                client_cert: None,
            })
        }
        (other, _) => other,
    }
}

/// Authenticates a caller who may also have shown a known client
/// certificate (`client`: the mTLS client it maps to). Without any
/// credential header the certificate alone identifies the caller, or
/// nothing does (401). With one, the credential must pass, and the
/// certificate is kept beside it for models that `require_mtls`.
pub async fn authenticate_with_certificate(
    headers: &HeaderMap,
    with: Authenticators<'_>,
    client: Option<Arc<ApiKey>>,
) -> Result<Identity, Reject> {
    if !has_credential(headers) {
        return match client {
            Some(client) => Ok(Identity {
                method: AuthMethod::Mtls,
                key: Some(Arc::clone(&client)),
                client_cert: Some(client),
            }),
            None => Err(Reject::MissingCredential),
        };
    }
    let mut identity = authenticate(headers, with).await?;
    identity.client_cert = client;
    Ok(identity)
}

/// The key id of a generated key the request presents, if it presents one.
pub fn presented_key_id(headers: &HeaderMap) -> Option<&str> {
    presented_key(headers).ok().and_then(key_format::kid_of)
}

/// Whether the request carries any credential header at all.
pub fn has_credential(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::AUTHORIZATION)
        || headers.contains_key("x-api-key")
        || headers.contains_key(aws::HEADER)
}

fn prefix(digest: &[u8; 32]) -> [u8; 8] {
    let mut p = [0u8; 8];
    p.copy_from_slice(&digest[..8]);
    p
}

/// The key the request presents, from `Authorization: Bearer` or `x-api-key`.
fn presented_key(headers: &HeaderMap) -> Result<&str, Reject> {
    let bearer = match headers.get(http::header::AUTHORIZATION) {
        None => None,
        Some(value) => {
            let text = value.to_str().map_err(|_| Reject::InvalidCredential)?;
            let (scheme, token) = text.split_once(' ').ok_or(Reject::InvalidCredential)?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(Reject::InvalidCredential);
            }
            Some(token.trim())
        }
    };
    let api_key = match headers.get("x-api-key") {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| Reject::InvalidCredential)?.trim()),
    };
    let key = match (bearer, api_key) {
        (Some(a), Some(b)) if a.as_bytes().ct_eq(b.as_bytes()).into() => a,
        (Some(_), Some(_)) => return Err(Reject::ConflictingCredentials),
        (Some(k), None) | (None, Some(k)) => k,
        (None, None) => return Err(Reject::MissingCredential),
    };
    if key.is_empty() {
        return Err(Reject::MissingCredential);
    }
    Ok(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn key(id: &str, secret: &str) -> ApiKey {
        ApiKey {
            id: id.into(),
            digest: Sha256::digest(secret.as_bytes()).into(),
            principal: format!("{id}@example"),
            tenant: "t".into(),
            tier: None,
            models: ModelGrant::Only(HashSet::from(["m".to_owned()])),
            ..ApiKey::default()
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn table_of_credentials() {
        let index = KeyIndex::new(&[key("a", "secret-a"), key("b", "secret-b")]);
        type Case<'a> = (&'a [(&'static str, &'a str)], Result<&'a str, Reject>);
        let cases: &[Case] = &[
            (&[("authorization", "Bearer secret-a")], Ok("a")),
            (&[("authorization", "bearer secret-b")], Ok("b")),
            (&[("x-api-key", "secret-b")], Ok("b")),
            (
                &[("authorization", "Bearer secret-a"), ("x-api-key", "secret-a")],
                Ok("a"),
            ),
            (
                &[("authorization", "Bearer secret-a"), ("x-api-key", "secret-b")],
                Err(Reject::ConflictingCredentials),
            ),
            (&[], Err(Reject::MissingCredential)),
            (&[("authorization", "Bearer ")], Err(Reject::MissingCredential)),
            (
                &[("authorization", "Basic c2VjcmV0LWE=")],
                Err(Reject::InvalidCredential),
            ),
            (&[("authorization", "Bearer secret-c")], Err(Reject::InvalidCredential)),
            (&[("authorization", "Bearer secret-a ")], Ok("a")),
            (&[("x-api-key", "SECRET-A")], Err(Reject::InvalidCredential)),
        ];
        for (pairs, want) in cases {
            let got = index
                .authenticate(&headers(pairs), None)
                .map(|i| i.credential_id().unwrap().to_owned());
            assert_eq!(got.as_deref().map_err(Clone::clone), want.clone(), "headers {pairs:?}");
        }
    }
}
