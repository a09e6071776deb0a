//! The cost of the three embedded Cedar decisions of one request (endpoint,
//! tenant, action), median of many batches:
//!
//!     cargo bench --bench authz
//!
//! Targets (issue 4): under 50 µs with the example policies, under 200 µs
//! with 1,000 generated policies.

// A benchmark that cannot set itself up should stop loudly.
#![allow(clippy::expect_used)]

mod support;

use std::hint::black_box;

use warden::authz::action::ActionParams;
use warden::authz::cedar::CedarPdp;
use warden::authz::{Action, AuthzRequest, RequestContext, Resource, Subject};

const SCHEMA: &str = include_str!("../examples/policies/warden.cedarschema");
const POLICIES: &str = include_str!("../examples/policies/warden.cedar");
const BATCH: usize = 200;
const BATCHES: usize = 51;

fn median_per_call(call: impl FnMut()) -> f64 {
    support::median_per_call(BATCH, BATCHES, call)
}

/// The three requests Warden makes for one chat call by an acme key.
fn requests() -> [AuthzRequest; 3] {
    let subject = Subject {
        id: "alice@acme.example".into(),
        tenant: "acme".into(),
        tier: "enterprise".into(),
        kind: "key".into(),
        auth_method: "api_key".into(),
        tenants: vec!["acme".into()],
        scopes: vec!["chat".into()],
        groups: vec!["support".into()],
    };
    let model = Resource {
        kind: "Model",
        id: "llama-3.1-8b".into(),
        protocol: Some("openai".into()),
        value_tier: Some("standard".into()),
    };
    [
        AuthzRequest {
            subject: subject.clone(),
            action: Action { name: "invoke".into() },
            resource: model.clone(),
            context: RequestContext::default(),
        },
        AuthzRequest {
            subject: subject.clone(),
            action: Action { name: "access".into() },
            resource: Resource {
                kind: "Tenant",
                id: "acme".into(),
                protocol: None,
                value_tier: None,
            },
            context: RequestContext {
                model: Some("llama-3.1-8b".into()),
                action: None,
            },
        },
        AuthzRequest {
            subject,
            action: Action { name: "use".into() },
            resource: model,
            context: RequestContext {
                model: None,
                action: Some(ActionParams {
                    operation: "chat".into(),
                    stream: true,
                    max_tokens: 256,
                    n: 1,
                    tools: vec!["lookup".into()],
                    tool_choice: "auto".into(),
                    ..ActionParams::default()
                }),
            },
        },
    ]
}

fn measure(name: &str, policies: &str, target_us: f64) {
    let pdp = CedarPdp::new(policies, SCHEMA).expect("policies validate");
    let requests = requests();
    for r in &requests {
        assert!(pdp.decide(r).allowed, "{name}: {:?} must be allowed", r.action.name);
    }
    let per_request = median_per_call(|| {
        for r in &requests {
            black_box(pdp.decide(black_box(r)));
        }
    });
    println!("  {name:<36} {:>8.1} µs   target < {target_us} µs", per_request * 1e6);
}

fn main() {
    println!("three Cedar decisions per request, median ({BATCHES} batches of {BATCH}):");
    measure("example policies", POLICIES, 50.0);
    // 1,000 more policies of the usual shapes, none matching the request's
    // principal, so every one of them is evaluated.
    let mut many = POLICIES.to_owned();
    for i in 0..1_000 {
        many.push_str(&match i % 3 {
            0 => format!(
                "permit (principal, action == Warden::Action::\"invoke\", resource == Warden::Model::\"model-{i}\") when {{ principal.tenant == \"tenant-{i}\" }};\n"
            ),
            1 => format!(
                "forbid (principal, action == Warden::Action::\"use\", resource) when {{ principal.tenant == \"tenant-{i}\" && context.max_tokens > {i} }};\n"
            ),
            _ => format!(
                "permit (principal, action == Warden::Action::\"access\", resource) when {{ resource.name == \"tenant-{i}\" && principal.groups.contains(\"group-{i}\") }};\n"
            ),
        });
    }
    measure("example + 1,000 generated policies", &many, 200.0);
}
