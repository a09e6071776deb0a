//! Stage 3, authorize the endpoint: may this principal call this model at
//! all. The checks, in order, each a deny when it fails:
//! 1. the model accepts the way the caller authenticated (`auth: [...]`);
//! 2. it has the caller's client certificate if it `require_mtls`;
//! 3. the credential's own model grant names it (a key or token restricted
//!    to some models stays restricted, whatever the policy says);
//! 4. the policy engine, when one is configured, permits it ([`cedar`]).
//!
//! Requests to the policy engine have the AuthZEN shape (subject, action,
//! resource); each decision is kept for the audit record. The [`Permit`]
//! returned is the proof, required by the forwarding stage, that the checks
//! ran.

pub mod action;
pub mod authzen;
pub mod cases;
pub mod cedar;
pub mod history;
pub mod opa;
pub mod remote;
pub mod tenant;

use serde::Serialize;

use crate::authn::Identity;
use crate::config::ModelEndpoint;
use crate::reject::Reject;

/// Proof that a caller may invoke a model endpoint. Only this module makes one.
#[derive(Debug)]
pub struct Permit {
    _private: (),
}

/// An authorization request, in the AuthZEN shape.
#[derive(Debug, Clone, Serialize)]
pub struct AuthzRequest {
    /// Who asks.
    pub subject: Subject,
    /// What they ask to do.
    pub action: Action,
    /// To what.
    pub resource: Resource,
    /// Around what: the model, for tenant decisions.
    pub context: RequestContext,
}

/// The context of a request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestContext {
    /// The model the request is for.
    pub model: Option<String>,
    /// The action level's operation and parameters.
    pub action: Option<action::ActionParams>,
}

/// The subject of a request and the properties policies may use.
#[derive(Debug, Clone, Serialize)]
pub struct Subject {
    /// Principal id.
    pub id: String,
    /// Tenant it acts for.
    pub tenant: String,
    /// Tier, `""` when none.
    pub tier: String,
    /// `user`, `service` or `key`.
    pub kind: String,
    /// How it authenticated.
    pub auth_method: String,
    /// Every tenant it may act for.
    pub tenants: Vec<String>,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Groups.
    pub groups: Vec<String>,
}

/// The action asked for.
#[derive(Debug, Clone, Serialize)]
pub struct Action {
    /// Its name, e.g. `invoke`.
    pub name: String,
}

/// The resource acted on.
#[derive(Debug, Clone, Serialize)]
pub struct Resource {
    /// `Model` or `Tenant`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The model's or tenant's name.
    pub id: String,
    /// A model's protocol.
    pub protocol: Option<String>,
    /// A model's value tier (`standard` or `high`, from `models[].value_tier`).
    pub value_tier: Option<String>,
}

/// One decision, as the audit record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// `endpoint` (later: `tenant`, `action`, `tool`).
    pub level: &'static str,
    /// Allowed or not.
    pub allowed: bool,
    /// The engine that decided.
    pub engine: &'static str,
    /// The version of the policy set that decided.
    pub policy_version: String,
    /// The policies that determined the decision.
    pub policies: Vec<String>,
    /// What the candidate (shadow) policy set would have decided, when one
    /// is being tried: recorded, never enforced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
    /// Why the engine could not decide, when it could not (then a deny).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The policy engine in force.
#[derive(Debug, Clone, Copy)]
pub enum Pdp<'a> {
    /// Embedded Cedar.
    Cedar(&'a cedar::CedarPdp),
    /// External OPA.
    Opa(&'a opa::OpaPdp),
    /// External AuthZEN PDP.
    Authzen(&'a authzen::AuthzenPdp),
}

impl Pdp<'_> {
    /// Decides one request.
    pub async fn decide(&self, request: &AuthzRequest) -> Decision {
        match self {
            Pdp::Cedar(pdp) => pdp.decide(request),
            // Boxed: an HTTP exchange's state is large, and inline it would
            // enlarge every request's future, Cedar-decided or not.
            Pdp::Opa(pdp) => Box::pin(pdp.decide(request)).await,
            Pdp::Authzen(pdp) => Box::pin(pdp.decide(request)).await,
        }
    }
}

/// A shadow policy set's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shadow {
    /// Allowed or not.
    pub allowed: bool,
    /// The candidate set's version.
    pub policy_version: String,
    /// The policies that determined it.
    pub policies: Vec<String>,
}

impl Decision {
    /// An allow by `engine`.
    pub fn allow(engine: &'static str, version: &str, policies: Vec<String>) -> Decision {
        Decision {
            level: "endpoint",
            allowed: true,
            engine,
            policy_version: version.to_owned(),
            policies,
            shadow: None,
            error: None,
        }
    }

    /// Whether a shadow policy set disagrees with this decision.
    pub fn shadow_disagrees(&self) -> bool {
        self.shadow.as_ref().is_some_and(|s| s.allowed != self.allowed)
    }

    /// A deny by `engine`.
    pub fn deny(engine: &'static str, version: &str, policies: Vec<String>) -> Decision {
        Decision {
            allowed: false,
            ..Decision::allow(engine, version, policies)
        }
    }
}

/// Decides whether `identity` may call `model`. Default deny: a caller with
/// no grant (an anonymous one) may call nothing, and a policy engine that
/// permits nothing permits nothing. Policy decisions are appended to
/// `decisions`.
pub async fn authorize_endpoint(
    identity: &Identity,
    model: &ModelEndpoint,
    policy: Option<Pdp<'_>>,
    decisions: &mut Vec<Decision>,
) -> Result<Permit, Reject> {
    if let Some(accepted) = &model.auth_methods
        && !accepted.contains(&identity.method)
    {
        return Err(Reject::AuthMethodNotAccepted(model.name.clone()));
    }
    if model.require_mtls && identity.client_cert.is_none() {
        return Err(Reject::ClientCertificateRequired(model.name.clone()));
    }
    let subject = match &identity.key {
        Some(subject) if subject.models.allows(&model.name) => subject,
        _ => return Err(Reject::ModelNotAllowed(model.name.clone())),
    };
    if let Some(pdp) = policy {
        let request = AuthzRequest {
            subject: subject_of(identity, subject),
            action: Action { name: "invoke".into() },
            resource: Resource {
                kind: "Model",
                id: model.name.clone(),
                protocol: Some(model.protocol.as_str().to_owned()),
                value_tier: Some(model.value_tier.as_str().to_owned()),
            },
            context: RequestContext::default(),
        };
        let decision = pdp.decide(&request).await;
        let allowed = decision.allowed;
        decisions.push(decision);
        if !allowed {
            return Err(Reject::PolicyDenied(model.name.clone()));
        }
    }
    Ok(Permit { _private: () })
}

/// Decides, tenant by tenant, whether `identity` may touch the data
/// partitions a request names. Without a policy engine the rule is the
/// credential's own: only the tenants it acts for. Each decision is kept.
/// An external AuthZEN PDP is asked about every tenant in one batch (one
/// round trip for an OIP batch's rows); every decision it returns is kept,
/// and the first denied tenant is the one refused. The other engines are
/// asked tenant by tenant and stop at the first deny.
pub async fn authorize_tenants(
    identity: &Identity,
    model: &ModelEndpoint,
    tenants: &[String],
    policy: Option<Pdp<'_>>,
    decisions: &mut Vec<Decision>,
) -> Result<(), Reject> {
    let Some(subject) = identity.key.as_deref() else {
        return Err(Reject::TenantNotAllowed(tenants.first().cloned().unwrap_or_default()));
    };
    let request = |tenant: &String| AuthzRequest {
        subject: subject_of(identity, subject),
        action: Action { name: "access".into() },
        resource: Resource {
            kind: "Tenant",
            id: tenant.clone(),
            protocol: None,
            value_tier: None,
        },
        context: RequestContext {
            model: Some(model.name.clone()),
            action: None,
        },
    };
    if let Some(Pdp::Authzen(pdp)) = policy {
        let requests: Vec<AuthzRequest> = tenants.iter().map(request).collect();
        let mut refused = None;
        for (tenant, mut decision) in tenants.iter().zip(Box::pin(pdp.decide_many(&requests)).await) {
            decision.level = "tenant";
            if !decision.allowed && refused.is_none() {
                refused = Some(tenant.clone());
            }
            decisions.push(decision);
        }
        return refused.map_or(Ok(()), |tenant| Err(Reject::TenantNotAllowed(tenant)));
    }
    for tenant in tenants {
        let mut decision = match policy {
            Some(pdp) => pdp.decide(&request(tenant)).await,
            None if subject.tenants.iter().any(|t| t == tenant) || subject.tenant == *tenant => {
                Decision::allow("credential", "", vec!["own-tenants".into()])
            }
            None => Decision::deny("credential", "", Vec::new()),
        };
        decision.level = "tenant";
        let allowed = decision.allowed;
        decisions.push(decision);
        if !allowed {
            return Err(Reject::TenantNotAllowed(tenant.clone()));
        }
    }
    Ok(())
}

fn subject_of(identity: &Identity, subject: &crate::config::ApiKey) -> Subject {
    Subject {
        id: subject.principal.clone(),
        tenant: subject.tenant.clone(),
        tier: subject.tier.clone().unwrap_or_default(),
        kind: subject.kind.as_str().to_owned(),
        auth_method: identity.method.as_str().to_owned(),
        tenants: if subject.tenants.is_empty() {
            vec![subject.tenant.clone()]
        } else {
            subject.tenants.clone()
        },
        scopes: subject.scopes.clone(),
        groups: subject.groups.clone(),
    }
}

/// Decides whether the operation and its parameters are allowed on this
/// model. Only a policy engine constrains actions: without one, a caller
/// allowed to call the model may ask it anything well formed.
pub async fn authorize_action(
    identity: &Identity,
    model: &ModelEndpoint,
    params: action::ActionParams,
    policy: Option<Pdp<'_>>,
    decisions: &mut Vec<Decision>,
) -> Result<(), Reject> {
    let (Some(pdp), Some(subject)) = (policy, identity.key.as_deref()) else {
        return Ok(());
    };
    let operation = params.operation.clone();
    let mut decision = pdp
        .decide(&AuthzRequest {
            subject: subject_of(identity, subject),
            action: Action { name: "use".into() },
            resource: Resource {
                kind: "Model",
                id: model.name.clone(),
                protocol: Some(model.protocol.as_str().to_owned()),
                value_tier: Some(model.value_tier.as_str().to_owned()),
            },
            context: RequestContext {
                model: None,
                action: Some(params),
            },
        })
        .await;
    decision.level = "action";
    let allowed = decision.allowed;
    decisions.push(decision);
    if allowed {
        Ok(())
    } else {
        Err(Reject::ActionDenied(operation))
    }
}
