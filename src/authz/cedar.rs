//! The embedded policy engine: Cedar. Policies and their schema come from
//! files; a policy set that does not validate against the schema is refused
//! (at `warden check`, start and reload), so a typo in an attribute name can
//! never become a silent deny or allow.
//!
//! What Warden sends (the schema must declare it, in namespace `Warden`; see
//! `examples/policies/warden.cedarschema`):
//! - principal `Warden::Principal::"<principal>"` with `tenant`, `tier`
//!   (`""` when none), `kind`, `auth_method` (Strings) and `tenants`,
//!   `scopes`, `groups` (Sets of Strings);
//! - endpoint level: action `invoke` on `Warden::Model::"<model>"` (with
//!   `protocol`), empty context;
//! - tenant level: action `access` on `Warden::Tenant::"<tenant>"` (with
//!   `name`), context `{ model }`;
//! - action level: action `use` on the model, context `{ operation, stream,
//!   max_tokens, n, logprobs, tools, tool_choice, response_format, outputs }`.
//!
//! Decisions cite policies by their `@id("…")` annotation (positional ids
//! otherwise); the policy set's version is a hash of its text.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet, Request,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use sha2::{Digest, Sha256};

use super::{AuthzRequest, Decision};

/// A validated Cedar policy set and its schema.
pub struct CedarPdp {
    policies: PolicySet,
    /// Each policy's `@id("…")` annotation, the name decisions cite (Cedar's
    /// own ids are positional: `policy0`, `policy1`, …).
    names: HashMap<PolicyId, String>,
    schema: Schema,
    /// First 16 hex digits of the SHA-256 of the policy text.
    version: String,
    /// A candidate set evaluated beside this one and never enforced.
    shadow: Option<Box<CedarPdp>>,
    /// The policy text, kept for the version history.
    source: String,
}

impl std::fmt::Debug for CedarPdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CedarPdp")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl CedarPdp {
    /// Parses and validates a policy set against its schema; every problem
    /// comes back as one message each.
    pub fn new(policies: &str, schema: &str) -> Result<CedarPdp, Vec<String>> {
        let schema = Schema::from_cedarschema_str(schema)
            .map(|(s, _warnings)| s)
            .map_err(|e| vec![format!("schema: {e}")])?;
        let set = PolicySet::from_str(policies).map_err(|e| vec![format!("policies: {e}")])?;
        let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
        if !result.validation_passed() {
            return Err(result.validation_errors().map(|e| format!("policies: {e}")).collect());
        }
        let version = hex::encode(&Sha256::digest(policies.as_bytes())[..8]);
        let names = set
            .policies()
            .map(|p| {
                (
                    p.id().clone(),
                    p.annotation("id").map_or_else(|| p.id().to_string(), str::to_owned),
                )
            })
            .collect();
        Ok(CedarPdp {
            names,
            policies: set,
            schema,
            version,
            shadow: None,
            source: policies.to_owned(),
        })
    }

    /// Tries `candidate` beside this set on every decision: its verdicts are
    /// recorded (and disagreements counted) but never enforced.
    pub fn with_shadow(mut self, candidate: CedarPdp) -> CedarPdp {
        self.shadow = Some(Box::new(candidate));
        self
    }

    /// The policy set's version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The policy text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Decides one request. Anything Cedar cannot evaluate is a deny.
    pub fn decide(&self, request: &AuthzRequest) -> Decision {
        let mut decision = self.decide_alone(request);
        if let Some(candidate) = &self.shadow {
            let verdict = candidate.decide_alone(request);
            decision.shadow = Some(super::Shadow {
                allowed: verdict.allowed,
                policy_version: verdict.policy_version,
                policies: verdict.policies,
            });
        }
        decision
    }

    fn decide_alone(&self, request: &AuthzRequest) -> Decision {
        match self.evaluate(request) {
            Ok(decision) => decision,
            Err(e) => {
                tracing::error!(error = %e, "policy evaluation failed: denied");
                Decision::deny("cedar", &self.version, Vec::new())
            }
        }
    }

    fn evaluate(&self, r: &AuthzRequest) -> Result<Decision, String> {
        let uid = |ty: &str, id: &str| -> Result<EntityUid, String> {
            let ty = EntityTypeName::from_str(ty).map_err(|e| e.to_string())?;
            Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
        };
        let principal = uid("Warden::Principal", &r.subject.id)?;
        let resource = uid(&format!("Warden::{}", r.resource.kind), &r.resource.id)?;
        let action = uid("Warden::Action", &r.action.name)?;
        let strings = |items: &[String]| {
            RestrictedExpression::new_set(items.iter().cloned().map(RestrictedExpression::new_string))
        };
        let text = |s: &str| RestrictedExpression::new_string(s.to_owned());
        let subject = &r.subject;
        let principal_entity = Entity::new(
            principal.clone(),
            HashMap::from([
                ("tenant".to_owned(), text(&subject.tenant)),
                ("tenants".to_owned(), strings(&subject.tenants)),
                ("tier".to_owned(), text(&subject.tier)),
                ("kind".to_owned(), text(&subject.kind)),
                ("auth_method".to_owned(), text(&subject.auth_method)),
                ("scopes".to_owned(), strings(&subject.scopes)),
                ("groups".to_owned(), strings(&subject.groups)),
            ]),
            HashSet::new(),
        )
        .map_err(|e| e.to_string())?;
        let resource_attrs = match r.resource.kind {
            "Tenant" => HashMap::from([("name".to_owned(), text(&r.resource.id))]),
            _ => HashMap::from([(
                "protocol".to_owned(),
                text(r.resource.protocol.as_deref().unwrap_or_default()),
            )]),
        };
        let resource_entity =
            Entity::new(resource.clone(), resource_attrs, HashSet::new()).map_err(|e| e.to_string())?;
        let entities = Entities::from_entities([principal_entity, resource_entity], Some(&self.schema))
            .map_err(|e| e.to_string())?;
        let mut pairs = Vec::new();
        if let Some(model) = &r.context.model {
            pairs.push(("model".to_owned(), text(model)));
        }
        if let Some(a) = &r.context.action {
            pairs.extend([
                ("operation".to_owned(), text(&a.operation)),
                ("stream".to_owned(), RestrictedExpression::new_bool(a.stream)),
                ("max_tokens".to_owned(), RestrictedExpression::new_long(a.max_tokens)),
                ("n".to_owned(), RestrictedExpression::new_long(a.n)),
                ("logprobs".to_owned(), RestrictedExpression::new_bool(a.logprobs)),
                ("tools".to_owned(), strings(&a.tools)),
                ("tool_choice".to_owned(), text(&a.tool_choice)),
                ("response_format".to_owned(), text(&a.response_format)),
                ("outputs".to_owned(), strings(&a.outputs)),
            ]);
        }
        let context = Context::from_pairs(pairs).map_err(|e| e.to_string())?;
        let request =
            Request::new(principal, action, resource, context, Some(&self.schema)).map_err(|e| e.to_string())?;
        let response = Authorizer::new().is_authorized(&request, &self.policies, &entities);
        let reasons: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|id| self.names.get(id).cloned().unwrap_or_else(|| id.to_string()))
            .collect();
        let errors: Vec<String> = response.diagnostics().errors().map(ToString::to_string).collect();
        if !errors.is_empty() {
            tracing::warn!(
                ?errors,
                "policy errors during evaluation (a failing policy does not apply)"
            );
        }
        Ok(match response.decision() {
            cedar_policy::Decision::Allow => Decision::allow("cedar", &self.version, reasons),
            cedar_policy::Decision::Deny => Decision::deny("cedar", &self.version, reasons),
        })
    }
}
