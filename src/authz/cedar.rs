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
//!   `protocol` and `value_tier`, `"standard"` or `"high"` from
//!   `models[].value_tier`), empty context;
//! - tenant level: action `access` on `Warden::Tenant::"<tenant>"` (with
//!   `name`), context `{ model }`;
//! - action level: action `use` on the model, context `{ operation, stream,
//!   max_tokens, n, logprobs, tools, tool_choice, response_format, outputs }`.
//!
//! Decisions cite policies by their `@id("…")` annotation (positional ids
//! otherwise), in the order they appear in the file; the policy set's
//! version is a hash of its text.
//!
//! Two things keep decisions cheap (see `Index` and `CedarPdp::evaluate`
//! below). The set is sliced once, when it is loaded, by what each policy's
//! scope (and first condition) can match, and a request is evaluated only
//! against the policies that could apply to it: policies written for one
//! model, principal, tenant or tier cost the other requests nothing, while
//! a policy that could apply to every request of an action is evaluated for
//! each of them. And the request shapes Warden builds are checked against
//! the schema once, at load, rather than on every request. Both give
//! exactly the decision, the determining policies and the evaluation errors
//! that evaluating the whole set with every check would give (the tests
//! compare the two).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use cedar_policy::{
    ActionConstraint, AuthorizationError, Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid,
    Policy, PolicyId, PolicySet, PrincipalConstraint, Request, ResourceConstraint, Response, RestrictedExpression,
    Schema, ValidationMode, Validator,
};
use sha2::{Digest, Sha256};

use super::action::ActionParams;
use super::{Action, AuthzRequest, Decision, RequestContext, Resource, Subject};

/// A validated Cedar policy set and its schema.
pub struct CedarPdp {
    /// The whole set: what requests of a shape not checked at load are
    /// evaluated against (with every schema check, as they always were).
    policies: PolicySet,
    /// The same policies, sliced by action and by what their scope or first
    /// condition can match.
    index: Index,
    /// Each policy's `@id("…")` annotation, the name decisions cite (Cedar's
    /// own ids are positional: `policy0`, `policy1`, …), and its place in
    /// the file, the order decisions cite them in.
    names: HashMap<PolicyId, (usize, String)>,
    schema: Schema,
    /// The schema's action entities: what `Entities::from_entities` adds
    /// when given the schema, so that `action in …` sees the action groups.
    actions: Entities,
    /// The request shapes that conform to the schema, found at load (see
    /// [`CedarPdp::shapes`]).
    shapes: Vec<Shape>,
    /// `Warden::Principal`, `Warden::Action`, `Warden::Model` and
    /// `Warden::Tenant`, parsed once.
    types: Types,
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

struct Types {
    principal: EntityTypeName,
    action: EntityTypeName,
    model: EntityTypeName,
    tenant: EntityTypeName,
}

/// What a request looks like to the schema: its action, its resource's
/// type, and which context it carries. Every request of one shape has the
/// same entity types, the same attribute and context names and the same
/// value types; only string contents and set sizes differ, and those cannot
/// change whether it conforms (see [`CedarPdp::shapes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    action: String,
    resource: &'static str,
    model: bool,
    params: bool,
}

/// Variables a policy condition can read attributes of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Var {
    Principal,
    Resource,
    Context,
}

/// Which policies may apply to a request, action by action.
///
/// Cedar evaluates a policy's scope before its conditions, and a policy
/// whose scope does not match (or whose conditions are false) contributes
/// nothing: no permit, no forbid, no error. So a policy may be left out of
/// a request's evaluation exactly when it cannot be satisfied and cannot
/// fail for that request. Each policy goes into the slices of every action
/// its action scope can match (`==`, `in [...]` through the schema's action
/// groups, or any), and, within an action, into one of:
/// - `by_resource` / `by_principal` for `resource == X` / `principal == X`
///   (the request's entity is X or the scope is false);
/// - `by_attr`, when its first condition is a `when` whose leftmost
///   conjunct is `<var>.<attr> == "<literal>"` (either way round): Cedar
///   evaluates that first, and `&&` stops at a false operand, so for a
///   request whose attribute is a String other than the literal the policy
///   is false without evaluating anything else, and so cannot fail either;
/// - `general`: everything else (`in` an entity, `is`, any, `unless`, …).
///
/// A request is evaluated against `general`, the `by_resource` and
/// `by_principal` slices of its own entities and, for each attribute, the
/// slice of its own value; when the request has no String under that
/// attribute, every slice of the attribute (so that what would fail, fails).
#[derive(Default)]
struct Index {
    by_action: HashMap<String, Slices>,
}

#[derive(Default)]
struct Slices {
    general: PolicySet,
    by_resource: HashMap<EntityUid, PolicySet>,
    by_principal: HashMap<EntityUid, PolicySet>,
    by_attr: HashMap<(Var, String), HashMap<String, PolicySet>>,
}

/// The slice of one action a policy belongs in.
enum Slot {
    General,
    Resource(EntityUid),
    Principal(EntityUid),
    Attr(Var, String, String),
}

impl Index {
    /// Slices `set` for the actions `actions` (the schema's: only requests
    /// for those are ever evaluated by slice). `hierarchy` holds the
    /// schema's action entities, for `action in`.
    fn build(set: &PolicySet, actions: &[EntityUid], hierarchy: &Entities) -> Result<Index, String> {
        let mut index = Index::default();
        // Every action gets its slices, even when no policy can match it, so
        // that its requests are never taken for ones of an unknown action.
        for action in actions {
            index.by_action.entry(action.id().unescaped().to_owned()).or_default();
        }
        for policy in set.policies() {
            let matched: Vec<&EntityUid> = match policy.action_constraint() {
                ActionConstraint::Any => actions.iter().collect(),
                ActionConstraint::Eq(a) => actions.iter().filter(|x| **x == a).collect(),
                // `action in [g, …]`: the request's action is one of them or
                // a member of one (the schema's groups are all there are:
                // requests carry no action entities of their own). An
                // entity is not its own ancestor, hence `g == x`.
                ActionConstraint::In(groups) => actions
                    .iter()
                    .filter(|x| groups.iter().any(|g| g == *x || hierarchy.is_ancestor_of(g, x)))
                    .collect(),
            };
            let slot = slot_of(policy);
            for action in matched {
                let slices = index.by_action.entry(action.id().unescaped().to_owned()).or_default();
                let target = match &slot {
                    Slot::General => &mut slices.general,
                    Slot::Resource(uid) => slices.by_resource.entry(uid.clone()).or_default(),
                    Slot::Principal(uid) => slices.by_principal.entry(uid.clone()).or_default(),
                    Slot::Attr(var, attr, value) => slices
                        .by_attr
                        .entry((*var, attr.clone()))
                        .or_default()
                        .entry(value.clone())
                        .or_default(),
                };
                copy_policy(set, policy, target)?;
            }
        }
        Ok(index)
    }

    /// Calls `each` with every slice `r` could match.
    fn for_each_slice<'a>(
        &'a self,
        r: &AuthzRequest,
        principal: &EntityUid,
        resource: &EntityUid,
        mut each: impl FnMut(&'a PolicySet),
    ) -> bool {
        let Some(slices) = self.by_action.get(r.action.name.as_str()) else {
            return false;
        };
        each(&slices.general);
        if let Some(set) = slices.by_resource.get(resource) {
            each(set);
        }
        if let Some(set) = slices.by_principal.get(principal) {
            each(set);
        }
        for ((var, attr), by_value) in &slices.by_attr {
            match string_attr(r, *var, attr) {
                Some(value) => {
                    if let Some(set) = by_value.get(value) {
                        each(set);
                    }
                }
                None => by_value.values().for_each(&mut each),
            }
        }
        true
    }
}

/// Where `policy` goes within an action's slices.
fn slot_of(policy: &Policy) -> Slot {
    if let ResourceConstraint::Eq(uid) = policy.resource_constraint() {
        return Slot::Resource(uid);
    }
    if let PrincipalConstraint::Eq(uid) = policy.principal_constraint() {
        return Slot::Principal(uid);
    }
    match leading_equality(policy) {
        Some((var, attr, value)) => Slot::Attr(var, attr, value),
        None => Slot::General,
    }
}

/// `(var, attr, literal)` when the first thing `policy`'s conditions
/// evaluate is `var.attr == "literal"` or `"literal" == var.attr`: its
/// first condition is a `when` (an `unless` is negated) and that
/// comparison is the leftmost operand of its chain of `&&`. Read from the
/// policy's JSON form (Cedar's EST), whose conditions are in source order,
/// the order Cedar evaluates them in.
fn leading_equality(policy: &Policy) -> Option<(Var, String, String)> {
    let est = policy.to_json().ok()?;
    let first = est.get("conditions")?.as_array()?.first()?;
    if first.get("kind")?.as_str()? != "when" {
        return None;
    }
    let mut expr = first.get("body")?;
    while let Some(and) = expr.get("&&") {
        expr = and.get("left")?;
    }
    let eq = expr.get("==")?;
    let (left, right) = (eq.get("left")?, eq.get("right")?);
    attr_equals(left, right).or_else(|| attr_equals(right, left))
}

fn attr_equals(access: &serde_json::Value, literal: &serde_json::Value) -> Option<(Var, String, String)> {
    let dot = access.get(".")?;
    let var = match dot.get("left")?.get("Var")?.as_str()? {
        "principal" => Var::Principal,
        "resource" => Var::Resource,
        "context" => Var::Context,
        _ => return None,
    };
    let attr = dot.get("attr")?.as_str()?;
    // A JSON string here is a Cedar string; entities and records are objects.
    let value = literal.get("Value")?.as_str()?;
    Some((var, attr.to_owned(), value.to_owned()))
}

/// Adds `policy` (static or template-linked, with its id) from `whole` to `set`.
fn copy_policy(whole: &PolicySet, policy: &Policy, set: &mut PolicySet) -> Result<(), String> {
    if policy.is_static() {
        return set.add(policy.clone()).map_err(|e| e.to_string());
    }
    let (Some(template_id), Some(values)) = (policy.template_id(), policy.template_links()) else {
        return Err(format!("policy `{}` is neither static nor linked", policy.id()));
    };
    if set.template(template_id).is_none() {
        let template = whole
            .template(template_id)
            .ok_or_else(|| format!("no template `{template_id}`"))?;
        set.add_template(template.clone()).map_err(|e| e.to_string())?;
    }
    set.link(template_id.clone(), policy.id().clone(), values)
        .map_err(|e| e.to_string())
}

/// The String attributes of the principal, exactly as sent.
fn principal_strings(s: &Subject) -> [(&'static str, &str); 4] {
    [
        ("tenant", &s.tenant),
        ("tier", &s.tier),
        ("kind", &s.kind),
        ("auth_method", &s.auth_method),
    ]
}

/// The String attributes of the resource (all it has), exactly as sent.
fn resource_strings(r: &Resource) -> [Option<(&'static str, &str)>; 2] {
    match r.kind {
        "Tenant" => [Some(("name", &r.id)), None],
        // A model resource built without them says `""`: no policy's
        // literal tier or protocol matches it.
        _ => [
            Some(("protocol", r.protocol.as_deref().unwrap_or_default())),
            Some(("value_tier", r.value_tier.as_deref().unwrap_or_default())),
        ],
    }
}

/// The String members of the context, exactly as sent.
fn context_strings(c: &RequestContext) -> [Option<(&'static str, &str)>; 4] {
    let a = c.action.as_ref();
    [
        c.model.as_deref().map(|m| ("model", m)),
        a.map(|a| ("operation", a.operation.as_str())),
        a.map(|a| ("tool_choice", a.tool_choice.as_str())),
        a.map(|a| ("response_format", a.response_format.as_str())),
    ]
}

/// The String Warden sends as `var.attr` in `r`, if it sends one.
fn string_attr<'a>(r: &'a AuthzRequest, var: Var, attr: &str) -> Option<&'a str> {
    let found = |(name, value): (&'static str, &'a str)| (name == attr).then_some(value);
    match var {
        Var::Principal => principal_strings(&r.subject).into_iter().find_map(found),
        Var::Resource => resource_strings(&r.resource).into_iter().flatten().find_map(found),
        Var::Context => context_strings(&r.context).into_iter().flatten().find_map(found),
    }
}

/// The permits and forbids that were satisfied, and the policies that
/// failed, over one or more disjoint slices.
#[derive(Debug, Default)]
struct Outcome {
    permits: Vec<PolicyId>,
    forbids: Vec<PolicyId>,
    errors: Vec<AuthorizationError>,
}

impl Outcome {
    /// Adds one slice's response. Cedar's reasons are the satisfied forbids
    /// when there are any (a deny), else the satisfied permits (an allow),
    /// else none: so a deny's reasons are all its slice's satisfied
    /// forbids, and an allow's all its satisfied permits (its slice
    /// satisfied no forbid). A deny's satisfied permits are not listed, and
    /// need not be: a forbid decides the whole request then.
    fn add(&mut self, response: &Response) {
        let reasons = response.diagnostics().reason().cloned();
        match response.decision() {
            cedar_policy::Decision::Allow => self.permits.extend(reasons),
            cedar_policy::Decision::Deny => self.forbids.extend(reasons),
        }
        self.errors.extend(response.diagnostics().errors().cloned());
    }

    /// Cedar's rule over the union: allowed when some permit and no forbid
    /// is satisfied.
    fn allowed(&self) -> bool {
        self.forbids.is_empty() && !self.permits.is_empty()
    }

    /// The determining policies, as Cedar would list them for the union.
    fn determining(&self) -> &[PolicyId] {
        if self.forbids.is_empty() {
            &self.permits
        } else {
            &self.forbids
        }
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
        CedarPdp::from_set(set, schema, policies)
    }

    /// Validates `set` (parsed from `source`) against `schema` and indexes it.
    fn from_set(set: PolicySet, schema: Schema, source: &str) -> Result<CedarPdp, Vec<String>> {
        let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
        if !result.validation_passed() {
            return Err(result.validation_errors().map(|e| format!("policies: {e}")).collect());
        }
        let version = hex::encode(&Sha256::digest(source.as_bytes())[..8]);
        let names = set
            .policies()
            .enumerate()
            .map(|(position, p)| {
                (
                    p.id().clone(),
                    (
                        position,
                        p.annotation("id").map_or_else(|| p.id().to_string(), str::to_owned),
                    ),
                )
            })
            .collect();
        let internal = |e: String| vec![format!("policies: cannot index the policy set: {e}")];
        let parse = |name: &str| EntityTypeName::from_str(name).map_err(|e| internal(e.to_string()));
        let types = Types {
            principal: parse("Warden::Principal")?,
            action: parse("Warden::Action")?,
            model: parse("Warden::Model")?,
            tenant: parse("Warden::Tenant")?,
        };
        let actions = schema.action_entities().map_err(|e| internal(e.to_string()))?;
        let warden_actions: Vec<EntityUid> = schema
            .actions()
            .filter(|a| *a.type_name() == types.action)
            .cloned()
            .collect();
        let index = Index::build(&set, &warden_actions, &actions).map_err(internal)?;
        let mut pdp = CedarPdp {
            names,
            policies: set,
            index,
            schema,
            actions,
            shapes: Vec::new(),
            types,
            version,
            shadow: None,
            source: source.to_owned(),
        };
        pdp.shapes = pdp.shapes(&warden_actions);
        Ok(pdp)
    }

    /// The request shapes, among those Warden can build for the schema's
    /// actions, that conform to the schema.
    ///
    /// Why checking each shape once is enough: a request's entities and
    /// context are built by [`CedarPdp::build`] alone, with fixed attribute
    /// names and value types (Strings, Sets of Strings, Longs, Bools) and
    /// no parents; what comes from credentials and bodies is only string
    /// contents, set sizes and numbers. Conformance to the schema depends on
    /// entity types, the action, attribute and context names and value
    /// types (and, for an enumerated entity type, the id). So a probe of
    /// each shape, with ids no enumeration would list and non-empty sets
    /// (an empty set conforms wherever a non-empty one does), conforms
    /// exactly when every request of that shape does. The check stays for
    /// any other shape (an `AuthzRequest` built elsewhere, with a resource
    /// type or context its action does not take): those are built and
    /// checked in full, every time, and evaluated against the whole set, as
    /// before. Dropping the check where it is proved once matters because
    /// a policy that fails (a missing attribute) does not apply: a forbid
    /// that should have denied would be skipped, so a request of the wrong
    /// shape must be refused, never evaluated.
    fn shapes(&self, actions: &[EntityUid]) -> Vec<Shape> {
        let probe_id = "\u{1}warden-shape-probe";
        let some = || vec![probe_id.to_owned()];
        let mut shapes = Vec::new();
        for action in actions {
            for resource in ["Model", "Tenant"] {
                for (model, params) in [(false, false), (true, false), (false, true), (true, true)] {
                    let probe = AuthzRequest {
                        subject: Subject {
                            id: probe_id.to_owned(),
                            tenant: probe_id.to_owned(),
                            tier: probe_id.to_owned(),
                            kind: probe_id.to_owned(),
                            auth_method: probe_id.to_owned(),
                            tenants: some(),
                            scopes: some(),
                            groups: some(),
                        },
                        action: Action {
                            name: action.id().unescaped().to_owned(),
                        },
                        resource: Resource {
                            kind: resource,
                            id: probe_id.to_owned(),
                            protocol: Some(probe_id.to_owned()),
                            value_tier: Some(probe_id.to_owned()),
                        },
                        context: RequestContext {
                            model: model.then(|| probe_id.to_owned()),
                            action: params.then(|| ActionParams {
                                operation: probe_id.to_owned(),
                                tools: some(),
                                tool_choice: probe_id.to_owned(),
                                response_format: probe_id.to_owned(),
                                outputs: some(),
                                ..ActionParams::default()
                            }),
                        },
                    };
                    if self.build(&probe, true).is_ok() {
                        shapes.push(Shape {
                            action: probe.action.name,
                            resource,
                            model,
                            params,
                        });
                    }
                }
            }
        }
        shapes
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
            Ok(outcome) => {
                if !outcome.errors.is_empty() {
                    let errors: Vec<String> = outcome.errors.iter().map(ToString::to_string).collect();
                    tracing::warn!(
                        ?errors,
                        "policy errors during evaluation (a failing policy does not apply)"
                    );
                }
                let mut cited: Vec<(usize, String)> = outcome
                    .determining()
                    .iter()
                    .map(|id| {
                        self.names
                            .get(id)
                            .cloned()
                            .unwrap_or_else(|| (usize::MAX, id.to_string()))
                    })
                    .collect();
                cited.sort();
                let reasons = cited.into_iter().map(|(_, name)| name).collect();
                if outcome.allowed() {
                    Decision::allow("cedar", &self.version, reasons)
                } else {
                    Decision::deny("cedar", &self.version, reasons)
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "policy evaluation failed: denied");
                Decision::deny("cedar", &self.version, Vec::new())
            }
        }
    }

    /// Whether every request shaped like `r` is known to conform to the schema.
    fn conforms(&self, r: &AuthzRequest) -> bool {
        self.shapes.iter().any(|s| {
            s.action == r.action.name
                && s.resource == r.resource.kind
                && s.model == r.context.model.is_some()
                && s.params == r.context.action.is_some()
        })
    }

    /// Evaluates `r`: by slice when its shape is known to conform, else
    /// checked in full against the schema and evaluated against the whole
    /// set.
    fn evaluate(&self, r: &AuthzRequest) -> Result<Outcome, String> {
        let conforms = self.conforms(r);
        let (request, entities, principal, resource) = self.build(r, !conforms)?;
        let authorizer = Authorizer::new();
        let mut outcome = Outcome::default();
        let sliced = conforms
            && self.index.for_each_slice(r, &principal, &resource, |set| {
                if !set.is_empty() {
                    outcome.add(&authorizer.is_authorized(&request, set, &entities));
                }
            });
        if !sliced {
            outcome.add(&authorizer.is_authorized(&request, &self.policies, &entities));
        }
        Ok(outcome)
    }

    /// Evaluates `r` the plain way: every schema check, the whole set.
    #[cfg(test)]
    fn evaluate_whole(&self, r: &AuthzRequest) -> Result<Outcome, String> {
        let (request, entities, _, _) = self.build(r, true)?;
        let mut outcome = Outcome::default();
        outcome.add(&Authorizer::new().is_authorized(&request, &self.policies, &entities));
        Ok(outcome)
    }

    /// The Cedar request and entities for `r` (and the principal's and
    /// resource's uids). With `check`, both are validated against the
    /// schema; without, the caller has proved the shape conforms.
    fn build(&self, r: &AuthzRequest, check: bool) -> Result<(Request, Entities, EntityUid, EntityUid), String> {
        let principal = EntityUid::from_type_name_and_id(self.types.principal.clone(), EntityId::new(&r.subject.id));
        let resource_type = match r.resource.kind {
            "Model" => self.types.model.clone(),
            "Tenant" => self.types.tenant.clone(),
            other => EntityTypeName::from_str(&format!("Warden::{other}")).map_err(|e| e.to_string())?,
        };
        let resource = EntityUid::from_type_name_and_id(resource_type, EntityId::new(&r.resource.id));
        let action = EntityUid::from_type_name_and_id(self.types.action.clone(), EntityId::new(&r.action.name));
        let strings = |items: &[String]| {
            RestrictedExpression::new_set(items.iter().cloned().map(RestrictedExpression::new_string))
        };
        let text = |s: &str| RestrictedExpression::new_string(s.to_owned());
        let subject = &r.subject;
        let mut principal_attrs: HashMap<String, RestrictedExpression> = principal_strings(subject)
            .into_iter()
            .map(|(name, value)| (name.to_owned(), text(value)))
            .collect();
        principal_attrs.extend([
            ("tenants".to_owned(), strings(&subject.tenants)),
            ("scopes".to_owned(), strings(&subject.scopes)),
            ("groups".to_owned(), strings(&subject.groups)),
        ]);
        let principal_entity =
            Entity::new(principal.clone(), principal_attrs, HashSet::new()).map_err(|e| e.to_string())?;
        let resource_attrs = resource_strings(&r.resource)
            .into_iter()
            .flatten()
            .map(|(name, value)| (name.to_owned(), text(value)))
            .collect();
        let resource_entity =
            Entity::new(resource.clone(), resource_attrs, HashSet::new()).map_err(|e| e.to_string())?;
        let entities = if check {
            Entities::from_entities([principal_entity, resource_entity], Some(&self.schema))
        } else {
            // The same entities, and the schema's action entities that
            // `from_entities` would have added.
            self.actions
                .clone()
                .add_entities([principal_entity, resource_entity], None)
        }
        .map_err(|e| e.to_string())?;
        let mut pairs: Vec<(String, RestrictedExpression)> = context_strings(&r.context)
            .into_iter()
            .flatten()
            .map(|(name, value)| (name.to_owned(), text(value)))
            .collect();
        if let Some(a) = &r.context.action {
            pairs.extend([
                ("stream".to_owned(), RestrictedExpression::new_bool(a.stream)),
                ("max_tokens".to_owned(), RestrictedExpression::new_long(a.max_tokens)),
                ("n".to_owned(), RestrictedExpression::new_long(a.n)),
                ("logprobs".to_owned(), RestrictedExpression::new_bool(a.logprobs)),
                ("tools".to_owned(), strings(&a.tools)),
                ("outputs".to_owned(), strings(&a.outputs)),
            ]);
        }
        let context = Context::from_pairs(pairs).map_err(|e| e.to_string())?;
        let schema = check.then_some(&self.schema);
        let request =
            Request::new(principal.clone(), action, resource.clone(), context, schema).map_err(|e| e.to_string())?;
        Ok((request, entities, principal, resource))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const SCHEMA: &str = include_str!("../../examples/policies/warden.cedarschema");

    /// Warden's schema with an action group over the two model actions, so
    /// that `action in <group>` scopes can be tried.
    fn schema_with_groups() -> String {
        let text = SCHEMA
            .replace("action invoke appliesTo", "action invoke in [model_calls] appliesTo")
            .replace("action use appliesTo", "action use in [model_calls] appliesTo")
            .replace("namespace Warden {", "namespace Warden {\n  action model_calls;");
        assert_eq!(text.matches("model_calls").count(), 3, "the schema changed shape");
        text
    }

    /// A policy of every scope shape, permits and forbids, some indexed by
    /// their first condition, some that fail when evaluated.
    const EVERY_SHAPE: &str = r#"
@id("any-action-for-services")
permit (principal, action, resource) when { principal.kind == "service" };

@id("root")
permit (principal == Warden::Principal::"root@acme.example", action, resource);

@id("chat-by-list")
permit (principal, action in [Warden::Action::"invoke", Warden::Action::"use"], resource == Warden::Model::"chat");

@id("high-value-not-on-free")
forbid (principal, action in Warden::Action::"model_calls", resource)
when { principal.tier == "free" && resource.value_tier == "high" };

@id("acme-tenant-by-in")
permit (principal, action == Warden::Action::"access", resource in Warden::Tenant::"acme")
when { principal.tenants.contains(resource.name) };

@id("standard-models-by-is")
permit (principal, action == Warden::Action::"invoke", resource is Warden::Model)
when { resource.value_tier == "standard" && principal.tier != "" };

@id("use-by-is-in")
permit (principal is Warden::Principal, action == Warden::Action::"use", resource is Warden::Model in Warden::Model::"secret")
when { principal.tier == "enterprise" };

@id("acme-overflow")
forbid (principal, action == Warden::Action::"use", resource)
when { principal.tenant == "acme" && context.max_tokens + 9223372036854775807 > 0 };

@id("overflow-permit")
permit (principal, action == Warden::Action::"use", resource)
when { context.max_tokens * 4611686018427387904 > 0 };

@id("only-own-tenants")
forbid (principal, action == Warden::Action::"access", resource)
unless { principal.tenants.contains(resource.name) };

@id("secret-only-for-acme")
forbid (principal, action == Warden::Action::"invoke", resource == Warden::Model::"secret")
when { principal.tenant != "acme" };

@id("auditors-read-globex")
permit (principal, action == Warden::Action::"access", resource)
when { "globex" == resource.name && principal.groups.contains("auditors") };

@id("embeddings-for-enterprise")
forbid (principal, action == Warden::Action::"use", resource)
when { context.operation == "embedding" && principal.tier != "enterprise" };

@id("pro-streams")
permit (principal, action == Warden::Action::"use", resource)
when { principal.tier == "pro" } when { context.stream };

@id("streams-for-pro-and-enterprise")
forbid (principal, action == Warden::Action::"use", resource)
unless { principal.tier == "pro" } when { context.stream && principal.tier != "enterprise" };

@id("overflow-then-tenant")
forbid (principal, action == Warden::Action::"use", resource)
when { context.max_tokens * 4611686018427387904 > 1 && principal.tenant == "globex" };

@id("through-the-model")
permit (principal, action == Warden::Action::"access", resource)
when { context.model == "fraud" && principal.tier == "enterprise" };

@id("linkable")
permit (principal == ?principal, action == Warden::Action::"invoke", resource == ?resource);
"#;

    fn subject(id: &str, tenant: &str, tier: &str, kind: &str, groups: &[&str]) -> Subject {
        Subject {
            id: id.to_owned(),
            tenant: tenant.to_owned(),
            tier: tier.to_owned(),
            kind: kind.to_owned(),
            auth_method: "api_key".to_owned(),
            tenants: vec![tenant.to_owned()],
            scopes: Vec::new(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    fn subjects() -> Vec<Subject> {
        vec![
            subject("alice@acme.example", "acme", "pro", "key", &[]),
            subject("bob@globex.example", "globex", "free", "key", &["auditors"]),
            subject("root@acme.example", "acme", "", "user", &[]),
            subject("svc@initech.example", "initech", "enterprise", "service", &[]),
            subject("linked@acme.example", "acme", "enterprise", "key", &[]),
        ]
    }

    fn model(id: &str, protocol: &str, tier: &str) -> Resource {
        Resource {
            kind: "Model",
            id: id.to_owned(),
            protocol: Some(protocol.to_owned()),
            value_tier: Some(tier.to_owned()),
        }
    }

    fn models() -> Vec<Resource> {
        vec![
            model("chat", "openai", "standard"),
            model("secret", "openai", "high"),
            model("fraud", "oip_v2", "high"),
        ]
    }

    fn params(operation: &str, max_tokens: i64, stream: bool) -> ActionParams {
        ActionParams {
            operation: operation.to_owned(),
            max_tokens,
            stream,
            n: 1,
            ..ActionParams::default()
        }
    }

    /// Every subject × every request Warden makes: `invoke` and `use` on
    /// every model (with parameters that do and do not reach the failing
    /// policies), `access` to every tenant through two models.
    fn requests() -> Vec<AuthzRequest> {
        let mut all = Vec::new();
        for s in subjects() {
            for m in models() {
                all.push(AuthzRequest {
                    subject: s.clone(),
                    action: Action { name: "invoke".into() },
                    resource: m.clone(),
                    context: RequestContext::default(),
                });
                for p in [
                    params("chat", 0, false),
                    params("chat", 1, true),
                    params("chat", 5, false),
                    params("embedding", 0, true),
                ] {
                    all.push(AuthzRequest {
                        subject: s.clone(),
                        action: Action { name: "use".into() },
                        resource: m.clone(),
                        context: RequestContext {
                            model: None,
                            action: Some(p),
                        },
                    });
                }
            }
            for tenant in ["acme", "globex", "initech"] {
                for through in ["chat", "fraud"] {
                    all.push(AuthzRequest {
                        subject: s.clone(),
                        action: Action { name: "access".into() },
                        resource: Resource {
                            kind: "Tenant",
                            id: tenant.to_owned(),
                            protocol: None,
                            value_tier: None,
                        },
                        context: RequestContext {
                            model: Some(through.to_owned()),
                            action: None,
                        },
                    });
                }
            }
        }
        all
    }

    /// The set above, with the template linked to one principal and model.
    fn every_shape() -> CedarPdp {
        let schema = Schema::from_cedarschema_str(&schema_with_groups()).unwrap().0;
        let mut set = PolicySet::from_str(EVERY_SHAPE).unwrap();
        let template = set.templates().next().unwrap().id().clone();
        let uid = |ty: &str, id: &str| EntityUid::from_type_name_and_id(ty.parse().unwrap(), EntityId::new(id));
        set.link(
            template,
            PolicyId::new("linked-secret"),
            HashMap::from([
                (
                    cedar_policy::SlotId::principal(),
                    uid("Warden::Principal", "linked@acme.example"),
                ),
                (cedar_policy::SlotId::resource(), uid("Warden::Model", "secret")),
            ]),
        )
        .unwrap();
        CedarPdp::from_set(set, schema, EVERY_SHAPE).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn sorted(ids: impl IntoIterator<Item = impl ToString>) -> Vec<String> {
        let mut ids: Vec<String> = ids.into_iter().map(|id| id.to_string()).collect();
        ids.sort();
        ids
    }

    fn failing(outcome: &Outcome) -> Vec<String> {
        sorted(outcome.errors.iter().map(|e| match e {
            AuthorizationError::PolicyEvaluationError(e) => e.policy_id().clone(),
        }))
    }

    /// How many policies `r` is evaluated against.
    fn evaluated(pdp: &CedarPdp, r: &AuthzRequest) -> usize {
        let (_, _, principal, resource) = pdp.build(r, true).unwrap();
        let mut n = 0;
        assert!(pdp.conforms(r));
        assert!(
            pdp.index
                .for_each_slice(r, &principal, &resource, |set| n += set.policies().count())
        );
        n
    }

    #[test]
    fn sliced_evaluation_decides_exactly_as_the_whole_set() {
        let pdp = every_shape();
        assert_eq!(pdp.policies.policies().count(), 18);
        let (mut allowed, mut forbidden, mut by_default, mut with_errors) = (0, 0, 0, 0);
        let mut determined = HashSet::new();
        for r in requests() {
            assert!(pdp.conforms(&r), "{r:?} is a shape Warden builds");
            let sliced = pdp.evaluate(&r).unwrap();
            let whole = pdp.evaluate_whole(&r).unwrap();
            let what = format!("{} {} {} {:?}", r.subject.id, r.action.name, r.resource.id, r.context);
            assert_eq!(sliced.allowed(), whole.allowed(), "{what}");
            assert_eq!(sorted(sliced.determining()), sorted(whole.determining()), "{what}");
            assert_eq!(failing(&sliced), failing(&whole), "{what}");
            // And what decide() reports is the same decision.
            let decision = pdp.decide(&r);
            assert_eq!(decision.allowed, whole.allowed(), "{what}");
            let names: Vec<String> = whole.determining().iter().map(|id| pdp.names[id].1.clone()).collect();
            assert_eq!(sorted(&decision.policies), sorted(names), "{what}");
            match (whole.allowed(), whole.forbids.is_empty()) {
                (true, _) => allowed += 1,
                (false, false) => forbidden += 1,
                (false, true) => by_default += 1,
            }
            with_errors += usize::from(!whole.errors.is_empty());
            determined.extend(whole.determining().iter().cloned());
            determined.extend(whole.errors.iter().map(|e| match e {
                AuthorizationError::PolicyEvaluationError(e) => e.policy_id().clone(),
            }));
        }
        // The table reaches every outcome and every policy decides (or
        // fails) somewhere, so a policy sliced away wrongly would show.
        assert!(
            allowed > 20 && forbidden > 20 && by_default > 5 && with_errors > 10,
            "allowed {allowed}, forbidden {forbidden}, by default {by_default}, with errors {with_errors}"
        );
        let every: HashSet<PolicyId> = pdp.policies.policies().map(|p| p.id().clone()).collect();
        let missing: Vec<_> = every.difference(&determined).collect();
        assert!(missing.is_empty(), "never decided nor failed: {missing:?}");
    }

    #[test]
    fn known_decisions_of_the_every_shape_set() {
        let pdp = every_shape();
        let all = requests();
        let find = |who: &str, action: &str, what: &str, max_tokens: Option<i64>| {
            all.iter()
                .find(|r| {
                    r.subject.id.starts_with(who)
                        && r.action.name == action
                        && r.resource.id == what
                        && r.context.action.as_ref().map(|a| a.max_tokens) == max_tokens
                        && r.context.action.as_ref().is_none_or(|a| a.operation == "chat")
                        && r.context.model.as_deref().is_none_or(|m| m == "chat")
                })
                .unwrap()
        };
        let rows: [(&AuthzRequest, bool, &[&str]); 10] = [
            (
                find("alice", "invoke", "chat", None),
                true,
                &["chat-by-list", "standard-models-by-is"],
            ),
            // Free tier on a high-value model: the group-scoped forbid.
            (find("bob", "invoke", "fraud", None), false, &["high-value-not-on-free"]),
            (
                find("bob", "invoke", "secret", None),
                false,
                &["high-value-not-on-free", "secret-only-for-acme"],
            ),
            (find("root", "invoke", "fraud", None), true, &["root"]),
            // A linked policy is cited by its template's `@id`.
            (find("linked", "invoke", "secret", None), true, &["linkable"]),
            (find("svc", "invoke", "secret", None), false, &["secret-only-for-acme"]),
            (
                find("linked", "invoke", "chat", None),
                true,
                &["chat-by-list", "standard-models-by-is"],
            ),
            // acme with max_tokens > 0: the forbid fails and does not apply.
            (
                find("alice", "use", "secret", Some(1)),
                true,
                &["overflow-permit", "pro-streams"],
            ),
            (find("alice", "use", "secret", Some(5)), false, &[]),
            (find("bob", "access", "globex", None), true, &["auditors-read-globex"]),
        ];
        for (r, allowed, policies) in rows {
            let decision = pdp.decide(r);
            assert_eq!(
                decision.allowed, allowed,
                "{} {} {}",
                r.subject.id, r.action.name, r.resource.id
            );
            assert_eq!(
                decision.policies, policies,
                "{} {} {}",
                r.subject.id, r.action.name, r.resource.id
            );
        }
    }

    #[test]
    fn a_request_is_evaluated_against_only_what_could_match_it() {
        let pdp = every_shape();
        let alice = subjects().remove(0);
        let invoke_chat = AuthzRequest {
            subject: alice.clone(),
            action: Action { name: "invoke".into() },
            resource: model("chat", "openai", "standard"),
            context: RequestContext::default(),
        };
        // any-action (kind != service: no), chat-by-list, high-value (tier
        // free: no), standard-models: 2 of 18.
        assert_eq!(evaluated(&pdp, &invoke_chat), 2);
        let access = AuthzRequest {
            subject: alice,
            action: Action { name: "access".into() },
            resource: Resource {
                kind: "Tenant",
                id: "acme".into(),
                protocol: None,
                value_tier: None,
            },
            context: RequestContext {
                model: Some("chat".into()),
                action: None,
            },
        };
        // acme-tenant-by-in and only-own-tenants (general); not
        // auditors-read-globex (name), through-the-model (model).
        assert_eq!(evaluated(&pdp, &access), 2);
    }

    #[test]
    fn policies_indexed_by_their_first_condition_only_when_it_is_exact() {
        let slots = |text: &str| -> Vec<Option<(Var, String, String)>> {
            PolicySet::from_str(text)
                .unwrap()
                .policies()
                .map(leading_equality)
                .collect()
        };
        let tenant = Some((Var::Principal, "tenant".to_owned(), "acme".to_owned()));
        assert_eq!(
            slots(
                r#"permit (principal, action, resource) when { principal.tenant == "acme" && principal.tier == "pro" };"#
            ),
            std::slice::from_ref(&tenant)
        );
        assert_eq!(
            slots(
                r#"permit (principal, action, resource) when { ("acme" == principal.tenant && context.n > 1) && resource.x };"#
            ),
            [tenant]
        );
        for text in [
            // Not the first thing evaluated: a failure on the left would show.
            r#"permit (principal, action, resource) when { context.n > 1 && principal.tenant == "acme" };"#,
            r#"permit (principal, action, resource) unless { principal.tenant == "acme" };"#,
            r#"permit (principal, action, resource) when { principal.tenant != "acme" };"#,
            r#"permit (principal, action, resource) when { principal.tenant == "acme" || principal.tier == "pro" };"#,
            r#"permit (principal, action, resource) when { principal.n == 1 };"#,
            r#"permit (principal, action, resource) when { principal.owner == principal.tenant };"#,
            r#"permit (principal, action, resource) when { principal.owner == Warden::Principal::"acme" };"#,
            r#"permit (principal, action, resource) when { principal.owner.tenant == "acme" };"#,
            r#"permit (principal, action, resource);"#,
        ] {
            assert_eq!(slots(text), [None], "{text}");
        }
    }

    #[test]
    fn requests_of_another_shape_are_still_checked_in_full() {
        let pdp = CedarPdp::new("permit (principal, action, resource);", SCHEMA).unwrap();
        let (invoke, access, use_) = (
            (true, "invoke", "Model", false, false),
            (true, "access", "Tenant", true, false),
            (true, "use", "Model", false, true),
        );
        for (conforms, action, resource, model, params) in [
            invoke,
            access,
            use_,
            (false, "invoke", "Tenant", false, false),
            (false, "access", "Model", true, false),
            (false, "access", "Tenant", false, false),
            (false, "invoke", "Model", true, false),
            (false, "use", "Model", false, false),
        ] {
            let r = AuthzRequest {
                subject: subjects().remove(0),
                action: Action { name: action.into() },
                resource: Resource {
                    kind: resource,
                    id: "x".into(),
                    protocol: Some("openai".into()),
                    value_tier: Some("standard".into()),
                },
                context: RequestContext {
                    model: model.then(|| "m".into()),
                    action: params.then(params_default),
                },
            };
            assert_eq!(pdp.conforms(&r), conforms, "{action} {resource} {model} {params}");
            // The permit-all set allows what conforms and nothing else: the
            // full check refuses the rest before anything is evaluated.
            assert_eq!(pdp.decide(&r).allowed, conforms, "{action} {resource} {model} {params}");
        }
    }

    fn params_default() -> ActionParams {
        params("chat", 0, false)
    }

    #[test]
    fn a_schema_that_does_not_declare_what_warden_sends_gets_the_full_check() {
        // `tier` declared a Long: no principal Warden builds conforms, so
        // every request is checked and refused, never evaluated.
        let schema = SCHEMA.replace("tier: String,", "tier: Long,");
        assert_ne!(schema, SCHEMA);
        let pdp = CedarPdp::new("permit (principal, action, resource);", &schema).unwrap();
        assert!(pdp.shapes.is_empty(), "{:?}", pdp.shapes);
        let r = requests().remove(0);
        assert!(!pdp.decide(&r).allowed);
    }

    #[test]
    fn the_value_tier_reaches_policies() {
        let pdp = CedarPdp::new(
            r#"
            @id("models") permit (principal, action == Warden::Action::"invoke", resource);
            @id("high-value-for-enterprise")
            forbid (principal, action == Warden::Action::"invoke", resource)
            when { resource.value_tier == "high" && principal.tier != "enterprise" };
            "#,
            SCHEMA,
        )
        .unwrap();
        let invoke = |tier: &str, value_tier: &str| {
            pdp.decide(&AuthzRequest {
                subject: subject("a", "acme", tier, "key", &[]),
                action: Action { name: "invoke".into() },
                resource: model("fraud", "oip_v2", value_tier),
                context: RequestContext::default(),
            })
        };
        assert!(invoke("pro", "standard").allowed);
        let refused = invoke("pro", "high");
        assert!(!refused.allowed);
        assert_eq!(refused.policies, ["high-value-for-enterprise"]);
        assert!(invoke("enterprise", "high").allowed);
    }
}
