//! Checks `models[].validation` into [`crate::validate::stage`] settings.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::raw::{RawExternalDetector, RawTensor, RawValidation};
use super::{Errors, Protocol, Upstream};
use crate::validate::external::{DetectorKind, ExternalDetector, FailMode};
use crate::validate::oip::{MetadataSettings, Signature, SignatureSource};
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
            external: i
                .external
                .as_ref()
                .and_then(|e| check_external(e, &format!("{path}.injection.external"), base, errs))
                .map(Arc::new),
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
    let metadata = raw.metadata.as_ref().and_then(|m| {
        let path = format!("{path}.metadata");
        if protocol != Some(Protocol::OipV2) {
            errs.push(&path, "metadata is for oip_v2 models");
        }
        if m.max_rows == Some(0) {
            errs.push(&format!("{path}.max_rows"), "must be at least 1");
        }
        let source = match (&m.inputs, m.fetch) {
            (Some(_), true) => {
                errs.push(&path, "give `inputs` or `fetch: true`, not both");
                return None;
            }
            (None, false) => {
                errs.push(&path, "needs `inputs` (and `outputs`) or `fetch: true`");
                return None;
            }
            (None, true) if !m.outputs.is_empty() => {
                errs.push(&format!("{path}.outputs"), "is only read with `inputs`");
                return None;
            }
            (None, true) => SignatureSource::Upstream(tokio::sync::OnceCell::new()),
            (Some(inputs), false) => {
                let tensors = |field: &str, list: &[RawTensor], errs: &mut Errors| {
                    let mut out = Vec::with_capacity(list.len());
                    for (i, t) in list.iter().enumerate() {
                        let value = serde_json::json!({"name": t.name, "datatype": t.datatype, "shape": t.shape});
                        match crate::validate::oip::tensor_spec(&value) {
                            Ok(spec) => out.push(spec),
                            Err(e) => errs.push(&format!("{path}.{field}[{i}]"), e),
                        }
                    }
                    out
                };
                let signature = Signature {
                    inputs: tensors("inputs", inputs, errs),
                    outputs: tensors("outputs", &m.outputs, errs),
                };
                // Names are checked once every tensor could be read.
                let complete = signature.inputs.len() == inputs.len() && signature.outputs.len() == m.outputs.len();
                if complete && let Err(e) = signature.check_names() {
                    errs.push(&path, e.to_string());
                }
                SignatureSource::Configured(Arc::new(signature))
            }
        };
        Some(Arc::new(MetadataSettings {
            source,
            max_rows: m.max_rows,
        }))
    });
    ModelValidation {
        context_window: raw.context_window,
        params,
        schema,
        injection,
        profile,
        metadata,
    }
}

/// Checks an external injection detector and builds its client.
fn check_external(raw: &RawExternalDetector, path: &str, base: &Path, errs: &mut Errors) -> Option<ExternalDetector> {
    let before = errs.0.len();
    let kind = match raw.kind.as_deref() {
        Some("lakera") => Some(DetectorKind::Lakera),
        Some("llm_guard") => Some(DetectorKind::LlmGuard),
        Some(other) => {
            errs.push(
                &format!("{path}.kind"),
                format!("unknown detector `{other}`; expected `lakera` or `llm_guard`"),
            );
            None
        }
        None => {
            errs.push(&format!("{path}.kind"), "missing: `lakera` or `llm_guard`");
            None
        }
    };
    match raw.url.as_deref() {
        Some(url) if !super::fetchable(url) => {
            errs.push(&format!("{path}.url"), "must be https:// (plain http only on loopback)");
        }
        Some(_) => {}
        None => errs.push(&format!("{path}.url"), "missing: the detector's URL"),
    }
    let fail = match raw.fail.as_deref() {
        None | Some("closed") => FailMode::Closed,
        Some("open") => FailMode::Open,
        Some(other) => {
            errs.push(
                &format!("{path}.fail"),
                format!("unknown fail mode `{other}`; expected `open` or `closed`"),
            );
            FailMode::Closed
        }
    };
    let timeout = errs.duration(
        &format!("{path}.timeout"),
        raw.timeout.as_deref(),
        Duration::from_millis(500),
    );
    let authorization = super::pdp_credential(raw.api_key.as_ref(), &format!("{path}.api_key"), base, errs);
    if kind == Some(DetectorKind::Lakera) && raw.api_key.is_none() {
        errs.push(
            &format!("{path}.api_key"),
            "Lakera Guard needs an API key: `{env: NAME}` or `{file: PATH}`",
        );
    }
    if errs.0.len() != before {
        return None;
    }
    Some(ExternalDetector::new(
        kind?,
        raw.url.as_deref()?,
        authorization,
        timeout,
        fail,
    ))
}
