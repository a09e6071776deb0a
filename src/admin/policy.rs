//! The admin API for the Cedar policy set, the same operations as `warden
//! policy history|rollback` plus a reload:
//!
//! | method and path                          | does                                      |
//! |------------------------------------------|-------------------------------------------|
//! | `GET /admin/v1/policy`                   | the active version, sequence, load time   |
//! | `POST /admin/v1/policy/reload`           | reload now: 200 and the active version, or 422 and every error |
//! | `GET /admin/v1/policy/history`           | the stored versions, oldest first         |
//! | `POST /admin/v1/policy/rollback/{seq}`   | make stored version `seq` active at once  |
//!
//! A reload re-reads the whole configuration, as SIGHUP does (the policy
//! set is part of it); one that fails leaves the active set deciding, and is
//! logged and counted like any other. A rollback writes the stored version
//! over the policy file and reloads; if that reload refuses it, the file
//! gets its previous content back and the answer is 422.
//!
//! Every call needs `Authorization: Bearer <admin token>`, checked as for
//! `/admin/v1/keys`; without a configured token the API answers 404 as if
//! it did not exist.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};

use super::{error, json};
use crate::authz::history;
use crate::gateway::{BuildError, Gateway, RollbackError, Runtime};

/// Whether `path` belongs to this API.
pub fn owns(path: &str) -> bool {
    path == "/admin/v1/policy" || path.starts_with("/admin/v1/policy/")
}

/// Answers one policy admin request.
pub async fn handle<B>(gateway: &Arc<Gateway>, req: Request<B>) -> Response<Full<Bytes>> {
    let runtime = gateway.runtime();
    if let Some(refused) = super::refuse_without_token(&runtime, &req) {
        return refused;
    }
    let segments: Vec<&str> = req.uri().path().trim_start_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["admin", "v1", "policy"]) => json(StatusCode::OK, &active(&runtime)),
        (&Method::POST, ["admin", "v1", "policy", "reload"]) => {
            if !gateway.reloadable() {
                return error(
                    StatusCode::CONFLICT,
                    "the gateway was not started from a configuration file",
                );
            }
            let result = gateway.reload().await;
            let now = gateway.runtime();
            tracing::info!(
                ok = result.is_ok(),
                version = now.active_policy.as_ref().map(|p| p.version.as_str()),
                "admin policy reload"
            );
            match result {
                Ok(()) => json(StatusCode::OK, &active(&now)),
                Err(e) => refused(&e, &now),
            }
        }
        (&Method::GET, ["admin", "v1", "policy", "history"]) => {
            let Some(file) = &runtime.config.policy_file else {
                return error(StatusCode::NOT_FOUND, "no `policy.cedar` is configured");
            };
            match history::list(&history::dir_for(file)) {
                Ok(versions) => json(StatusCode::OK, &json!(versions)),
                Err(e) => {
                    tracing::error!(error = %e, "the policy history could not be read");
                    error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the policy history could not be read",
                    )
                }
            }
        }
        (&Method::POST, ["admin", "v1", "policy", "rollback", sequence]) => {
            let Ok(sequence) = sequence.parse::<u64>() else {
                return error(StatusCode::BAD_REQUEST, "the sequence must be a number");
            };
            let result = gateway.rollback_policy(sequence).await;
            let now = gateway.runtime();
            tracing::info!(sequence, ok = result.is_ok(), "admin policy rollback");
            match result {
                Ok(restored) => {
                    let mut body = active(&now);
                    body["restored"] = json!(restored);
                    json(StatusCode::OK, &body)
                }
                Err(RollbackError::NoPolicyFile) => error(StatusCode::NOT_FOUND, "no `policy.cedar` is configured"),
                Err(RollbackError::History(e @ history::RollbackError::Unknown(_))) => {
                    error(StatusCode::NOT_FOUND, &e.to_string())
                }
                Err(RollbackError::History(e @ history::RollbackError::Io(_))) => {
                    tracing::error!(error = %e, "policy rollback could not write the policy file");
                    error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the policy file could not be written",
                    )
                }
                Err(RollbackError::Reload(e)) => refused(&e, &now),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// The engine in force and, for Cedar, the active version.
fn active(runtime: &Runtime) -> Value {
    let engine = match runtime.pdp() {
        Some(crate::authz::Pdp::Cedar(_)) => Some("cedar"),
        Some(crate::authz::Pdp::Opa(_)) => Some("opa"),
        Some(crate::authz::Pdp::Authzen(_)) => Some("authzen"),
        None => None,
    };
    let mut body = json!({ "engine": engine });
    if let Some(p) = &runtime.active_policy {
        body["version"] = json!(p.version);
        body["sequence"] = json!(p.sequence);
        body["loaded_at"] = json!(p.loaded_at);
    }
    body
}

/// A reload that was refused: the reasons, and the version still active.
/// Only configuration errors are shown; the others (a database, the audit
/// file) may carry details that belong in the log, not in an answer.
fn refused(e: &BuildError, now: &Runtime) -> Response<Full<Bytes>> {
    let active = active(now);
    match e {
        BuildError::Config(errors) => json(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({
                "error": "the configuration was refused; the active policy set stays",
                "errors": errors.0.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "active": active,
            }),
        ),
        _ => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({
                "error": "the configuration could not be applied (see the gateway's log); the active policy set stays",
                "active": active,
            }),
        ),
    }
}
