//! Checks `models[].validation` into [`crate::validate::stage`] settings.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::raw::RawValidation;
use super::{Errors, Protocol, Upstream};
use crate::validate::params::ParamPolicy;
use crate::validate::stage::{Action, InjectionSettings, ModelValidation, ProfileSettings};

/// Checks one model's `validation` section.
pub(super) fn check_validation(
    raw: Option<&RawValidation>,
    path: &str,
    base: &Path,
    protocol: Option<Protocol>,
    upstreams: &HashMap<String, Arc<Upstream>>,
    errs: &mut Errors,
) -> ModelValidation {
    let Some(raw) = raw else {
        return ModelValidation::default();
    };
    let path = format!("{path}.validation");
    let action = |field: &str, value: Option<&str>, route: bool, errs: &mut Errors| match value {
        None | Some("block") => Action::Block,
        Some("flag") => Action::Flag,
        Some("route") if route => Action::Route,
        Some(other) => {
            let allowed = if route {
                "`block`, `flag` or `route`"
            } else {
                "`block` or `flag`"
            };
            errs.push(
                &format!("{path}.{field}.action"),
                format!("unknown action `{other}`; expected {allowed}"),
            );
            Action::Block
        }
    };
    if raw.context_window == Some(0) {
        errs.push(&format!("{path}.context_window"), "must be at least 1");
    }
    let params = raw.params.as_ref().map(|p| ParamPolicy {
        max_tokens: p.max_tokens,
        max_n: p.max_n,
        max_tools: p.max_tools,
        max_messages: p.max_messages,
        forbidden: p.forbidden.clone(),
        response_formats: p.response_formats.clone(),
    });
    let schema = raw.schema.as_ref().and_then(|file| {
        let file = super::resolve(base, file);
        let text = std::fs::read_to_string(&file)
            .map_err(|e| {
                errs.push(
                    &format!("{path}.schema"),
                    format!("cannot read `{}`: {e}", file.display()),
                )
            })
            .ok()?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| {
                errs.push(
                    &format!("{path}.schema"),
                    format!("`{}` is not JSON: {e}", file.display()),
                )
            })
            .ok()?;
        crate::validate::openai::CustomSchema::new(&value)
            .map(Arc::new)
            .map_err(|e| errs.push(&format!("{path}.schema"), e.to_string()))
            .ok()
    });
    let injection = raw.injection.as_ref().map(|i| {
        if let Some(t) = i.threshold
            && !(0.0..=1.0).contains(&t)
        {
            errs.push(&format!("{path}.injection.threshold"), "must be between 0 and 1");
        }
        InjectionSettings {
            action: action("injection", i.action.as_deref(), false, errs),
            threshold: i.threshold,
        }
    });
    let profile = raw.profile.as_ref().and_then(|p| {
        if protocol != Some(Protocol::OipV2) {
            errs.push(&format!("{path}.profile"), "a feature profile is for oip_v2 models");
        }
        let action = action("profile", p.action.as_deref(), true, errs);
        let route_to = match (&p.route_to, action) {
            (Some(name), Action::Route) => match upstreams.get(name) {
                Some(u) => Some(Arc::clone(u)),
                None => {
                    errs.push(
                        &format!("{path}.profile.route_to"),
                        format!("no upstream named `{name}`"),
                    );
                    None
                }
            },
            (None, Action::Route) => {
                errs.push(
                    &format!("{path}.profile.route_to"),
                    "`action: route` needs the review upstream",
                );
                None
            }
            (Some(_), _) => {
                errs.push(&format!("{path}.profile.route_to"), "is only read with `action: route`");
                None
            }
            (None, _) => None,
        };
        let file = super::resolve(base, &p.file);
        let mut profile = crate::validate::ood::Profile::load(&file)
            .map_err(|e| errs.push(&format!("{path}.profile.file"), format!("`{}`: {e}", file.display())))
            .ok()?;
        if let Some(t) = p.threshold
            && let Err(e) = profile.set_threshold(t)
        {
            errs.push(&format!("{path}.profile.threshold"), e.to_string());
        }
        Some(ProfileSettings {
            profile: Arc::new(profile),
            action,
            route_to,
        })
    });
    ModelValidation {
        context_window: raw.context_window,
        params,
        schema,
        injection,
        profile,
    }
}
