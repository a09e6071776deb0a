//! Integration tests, one module per concern.

mod access;
mod audit;
mod authzen;
mod aws;
mod errors;
mod examples;
mod ext_authz;
mod introspection;
mod jwt;
mod keys;
mod lifecycle;
mod limits;
mod listener;
mod mtls;
mod opa;
mod openai_client;
mod policy;
mod policy_reload;
mod rate_limits;
mod routes;
mod shared_limits;
mod streaming;
mod tenant;
mod upstream_failures;
mod upstream_pool;
mod validation;
