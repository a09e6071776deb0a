//! Integration tests, one module per concern.

mod audit;
mod authzen;
mod aws;
mod errors;
mod examples;
mod introspection;
mod jwt;
mod keys;
mod lifecycle;
mod listener;
mod mtls;
mod opa;
mod openai_client;
mod policy;
mod routes;
mod streaming;
mod tenant;
mod upstream_failures;
