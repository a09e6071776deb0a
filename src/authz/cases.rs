//! Policy test cases for `warden policy test` and `warden policy explain`:
//! a request described in YAML, and the decision expected of it.
//!
//! ```yaml
//! - name: acme may chat
//!   principal: { id: alice@acme.example, tenant: acme, tier: pro }
//!   action: invoke            # invoke | access | use
//!   model: llama-3.1-8b       # also: protocol (openai), value_tier (standard)
//!   expect: allow             # allow | deny (optional for explain)
//! - name: no logprobs on the free tier
//!   principal: { id: bob, tenant: globex, tier: free }
//!   action: use
//!   model: llama-3.1-8b
//!   params: { operation: chat, logprobs: true }
//!   expect: deny
//! - name: acme may not read globex's data
//!   principal: { id: alice, tenant: acme }
//!   action: access
//!   model: fraud-scorer
//!   tenant: globex
//!   expect: deny
//! ```

use serde::Deserialize;

use super::action::ActionParams;
use super::{Action, AuthzRequest, RequestContext, Resource, Subject};

/// One case.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// What the case shows.
    pub name: String,
    /// Who asks.
    pub principal: CasePrincipal,
    /// `invoke`, `access` or `use`.
    pub action: String,
    /// The model.
    pub model: String,
    /// The model's protocol. Default `openai`.
    #[serde(default = "openai")]
    pub protocol: String,
    /// The model's value tier (`models[].value_tier`). Default `standard`.
    #[serde(default = "standard")]
    pub value_tier: String,
    /// For `access`: the tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// For `use`: the operation and parameters.
    #[serde(default)]
    pub params: Option<CaseParams>,
    /// The decision expected.
    #[serde(default)]
    pub expect: Option<Expect>,
}

fn openai() -> String {
    "openai".to_owned()
}

fn standard() -> String {
    crate::config::ValueTier::Standard.as_str().to_owned()
}

/// An expected decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// Permitted.
    Allow,
    /// Refused.
    Deny,
}

/// The principal of a case.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasePrincipal {
    /// Principal id.
    pub id: String,
    /// Its default tenant.
    pub tenant: String,
    /// Every tenant it may act for; default `[tenant]`.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Tier; default `""`.
    #[serde(default)]
    pub tier: String,
    /// Kind; default `key`.
    #[serde(default = "key")]
    pub kind: String,
    /// Auth method; default `api_key`.
    #[serde(default = "api_key")]
    pub auth_method: String,
    /// Scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Groups.
    #[serde(default)]
    pub groups: Vec<String>,
}

fn key() -> String {
    "key".to_owned()
}

fn api_key() -> String {
    "api_key".to_owned()
}

/// The parameters of a `use` case; defaults as Warden reads an empty body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseParams {
    #[serde(default)]
    operation: Option<String>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    max_tokens: i64,
    #[serde(default)]
    n: Option<i64>,
    #[serde(default)]
    logprobs: bool,
    #[serde(default)]
    tools: Vec<String>,
    #[serde(default)]
    tool_choice: String,
    #[serde(default)]
    response_format: String,
    #[serde(default)]
    outputs: Vec<String>,
}

impl Case {
    /// The authorization request the case describes.
    pub fn request(&self) -> Result<AuthzRequest, String> {
        let p = &self.principal;
        let subject = Subject {
            id: p.id.clone(),
            tenant: p.tenant.clone(),
            tier: p.tier.clone(),
            kind: p.kind.clone(),
            auth_method: p.auth_method.clone(),
            tenants: if p.tenants.is_empty() {
                vec![p.tenant.clone()]
            } else {
                p.tenants.clone()
            },
            scopes: p.scopes.clone(),
            groups: p.groups.clone(),
        };
        let model = Resource {
            kind: "Model",
            id: self.model.clone(),
            protocol: Some(self.protocol.clone()),
            value_tier: Some(self.value_tier.clone()),
        };
        let (resource, context) = match self.action.as_str() {
            "invoke" => (model, RequestContext::default()),
            "access" => {
                let tenant = self.tenant.clone().ok_or("an `access` case needs `tenant`")?;
                (
                    Resource {
                        kind: "Tenant",
                        id: tenant,
                        protocol: None,
                        value_tier: None,
                    },
                    RequestContext {
                        model: Some(self.model.clone()),
                        action: None,
                    },
                )
            }
            "use" => {
                let q = self.params.as_ref();
                let params = ActionParams {
                    operation: q.and_then(|q| q.operation.clone()).unwrap_or_else(|| "chat".into()),
                    stream: q.is_some_and(|q| q.stream),
                    max_tokens: q.map_or(0, |q| q.max_tokens),
                    n: q.and_then(|q| q.n).unwrap_or(1),
                    logprobs: q.is_some_and(|q| q.logprobs),
                    tools: q.map(|q| q.tools.clone()).unwrap_or_default(),
                    tool_choice: q.map(|q| q.tool_choice.clone()).unwrap_or_default(),
                    response_format: q.map(|q| q.response_format.clone()).unwrap_or_default(),
                    outputs: q.map(|q| q.outputs.clone()).unwrap_or_default(),
                };
                (
                    model,
                    RequestContext {
                        model: None,
                        action: Some(params),
                    },
                )
            }
            other => {
                return Err(format!(
                    "unknown action `{other}`; expected `invoke`, `access` or `use`"
                ));
            }
        };
        Ok(AuthzRequest {
            subject,
            action: Action {
                name: self.action.clone(),
            },
            resource,
            context,
        })
    }
}

/// Reads a file of cases (a YAML list).
pub fn load(path: &std::path::Path) -> Result<Vec<Case>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_case_names_the_models_value_tier_or_gets_standard() {
        let cases: Vec<Case> = serde_saphyr::from_str(
            "- name: high\n  principal: { id: a, tenant: acme }\n  action: invoke\n  model: fraud-scorer\n  value_tier: high\n\
             - name: default\n  principal: { id: a, tenant: acme }\n  action: use\n  model: chat\n\
             - name: tenant\n  principal: { id: a, tenant: acme }\n  action: access\n  model: chat\n  tenant: acme\n",
        )
        .unwrap();
        let tiers: Vec<Option<String>> = cases.iter().map(|c| c.request().unwrap().resource.value_tier).collect();
        assert_eq!(tiers, [Some("high".into()), Some("standard".into()), None]);
    }
}
