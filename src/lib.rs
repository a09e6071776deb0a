//! Warden: a secure gateway for AI model serving.
//!
//! Every inference request passes through one pipeline, read top to bottom in
//! [`pipeline::handle`]. The modules below are listed in request order:
//!
//! - [`server`]: listeners (HTTP/1.1, h2c, TLS with ALPN), connection limits,
//!   graceful shutdown.
//! - [`exchange`]: the per-request context every stage fills in; the audit
//!   record is built from it.
//! - [`authn`]: who is calling (API keys).
//! - [`route`]: which model endpoint, upstream and protocol.
//! - [`authz`]: may this principal call this model.
//! - [`request`]: reading and checking the request body.
//! - [`limits`]: rate limits, budgets and their stores (being built; not yet
//!   on the request path).
//! - [`upstream`]: the pooled upstream client, forwarding and streaming.
//! - [`audit`]: one record per request, written to a file.
//! - [`reject`]: every reason a request can fail, turned into a response in
//!   exactly one place.
//! - [`admin`]: health, readiness and Prometheus metrics on a separate listener.
//! - [`ext_authz`]: Envoy's external authorization gRPC API, answered by the
//!   same stages and policies.
//! - [`app`]: starting, reloading and stopping the gateway; `warden demo`.
//! - [`config`]: raw YAML types, checked runtime types, reload.
//! - [`demo`]: embedded demo upstreams for `warden demo`, tests and benchmarks.

pub mod admin;
pub mod app;
pub mod audit;
pub mod authn;
pub mod authz;
pub mod config;
pub mod demo;
pub mod exchange;
pub mod ext_authz;
pub mod forwarded;
pub mod gateway;
pub mod json_scan;
pub mod limits;
pub mod output;
pub mod pipeline;
pub mod reject;
pub mod request;
pub mod route;
pub mod server;
pub mod upstream;
pub mod validate;
