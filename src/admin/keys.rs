//! The admin API for managed keys, the same operations as `warden keys`:
//!
//! | method and path                      | does                         |
//! |--------------------------------------|------------------------------|
//! | `POST /admin/v1/keys`                | create (the key, shown once) |
//! | `GET /admin/v1/keys`                 | list                         |
//! | `GET /admin/v1/keys/{kid}`           | show                         |
//! | `POST /admin/v1/keys/{kid}/revoke`   | revoke                       |
//! | `POST /admin/v1/keys/{kid}/rotate`   | rotate (the new key, once)   |
//!
//! Every call needs `Authorization: Bearer <admin token>`; the token is
//! configured by reference and only its SHA-256 is held, compared in
//! constant time. Without a configured token, or without a key store, the
//! API answers 404 as if it did not exist.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{error, json};
use crate::authn::key_format;
use crate::authn::key_store::{KeySpec, KeyStoreError};
use crate::gateway::Gateway;

/// Largest admin request body.
const MAX_BODY: usize = 64 * 1024;

/// Body of `POST /admin/v1/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    principal: String,
    tenants: Vec<String>,
    #[serde(default)]
    tier: Option<String>,
    models: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
    /// e.g. `90d`.
    #[serde(default)]
    expires_in: Option<String>,
}

/// Body of `POST /admin/v1/keys/{kid}/rotate` (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateKey {
    /// e.g. `1h`; defaults to `key_store.rotation_overlap`.
    #[serde(default)]
    overlap: Option<String>,
}

/// Answers one admin API request.
pub async fn handle(gateway: &Arc<Gateway>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let runtime = gateway.runtime();
    let (Some(token), Some(managed), Some(settings)) = (
        runtime.config.admin_token_sha256,
        runtime.managed_keys.clone(),
        runtime.config.key_store.clone(),
    ) else {
        return error(StatusCode::NOT_FOUND, "not found");
    };
    if !authorized(&req, &token) {
        return super::unauthorized();
    }
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(Duration::from_secs(10), Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => return error(StatusCode::BAD_REQUEST, "the request body could not be read"),
    };
    let store = managed.store();
    let segments: Vec<&str> = parts.uri.path().trim_start_matches('/').split('/').collect();
    let result = match (&parts.method, segments.as_slice()) {
        (&Method::POST, ["admin", "v1", "keys"]) => match parse::<CreateKey>(&body) {
            Err(message) => return error(StatusCode::BAD_REQUEST, &message),
            Ok(req) => {
                let expires_in = match req.expires_in.as_deref().map(humantime::parse_duration).transpose() {
                    Ok(d) => d,
                    Err(e) => return error(StatusCode::BAD_REQUEST, &format!("`expires_in`: {e}")),
                };
                let spec = KeySpec {
                    principal: req.principal,
                    tenants: req.tenants,
                    tier: req.tier,
                    models: req.models,
                    scopes: req.scopes,
                    expires_in,
                };
                store.create(&spec).await.map(|(new, record)| {
                    (
                        StatusCode::CREATED,
                        serde_json::json!({"key": new.key, "record": record}),
                    )
                })
            }
        },
        (&Method::GET, ["admin", "v1", "keys"]) => store.list().await.map(|l| (StatusCode::OK, serde_json::json!(l))),
        (&Method::GET, ["admin", "v1", "keys", kid]) if key_format::is_kid(kid) => {
            store.show(kid).await.map(|r| (StatusCode::OK, serde_json::json!(r)))
        }
        (&Method::POST, ["admin", "v1", "keys", kid, "revoke"]) if key_format::is_kid(kid) => {
            store.revoke(kid).await.map(|r| (StatusCode::OK, serde_json::json!(r)))
        }
        (&Method::POST, ["admin", "v1", "keys", kid, "rotate"]) if key_format::is_kid(kid) => {
            let req = if body.is_empty() {
                RotateKey::default()
            } else {
                match parse::<RotateKey>(&body) {
                    Ok(r) => r,
                    Err(message) => return error(StatusCode::BAD_REQUEST, &message),
                }
            };
            let overlap = match req.overlap.as_deref().map(humantime::parse_duration).transpose() {
                Ok(d) => d.unwrap_or(settings.rotation_overlap),
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("`overlap`: {e}")),
            };
            store
                .rotate(kid, overlap)
                .await
                .map(|(new, record)| (StatusCode::OK, serde_json::json!({"key": new.key, "record": record})))
        }
        _ => return error(StatusCode::NOT_FOUND, "not found"),
    };
    match result {
        Ok((status, value)) => {
            // Key management is a security event: say who was changed, never the key.
            let kid = value
                .get("record")
                .unwrap_or(&value)
                .get("kid")
                .and_then(|k| k.as_str());
            tracing::info!(method = %parts.method, path = parts.uri.path(), kid, "admin key operation");
            json(status, &value)
        }
        Err(KeyStoreError::NotFound(kid)) => error(StatusCode::NOT_FOUND, &format!("no key with id `{kid}`")),
        Err(KeyStoreError::Invalid(message)) => error(StatusCode::BAD_REQUEST, &message),
        Err(e @ KeyStoreError::Database(_)) => {
            tracing::error!(error = %e, "admin key operation failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "the key store is unavailable")
        }
    }
}

pub(super) fn authorized<B>(req: &Request<B>, token_sha256: &[u8; 32]) -> bool {
    let Some(presented) = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
    digest.ct_eq(token_sha256).into()
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))
}
