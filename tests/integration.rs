//! Warden's integration tests: one binary, in-process gateways on ephemeral
//! ports, real upstreams (the demo servers, or purpose-built ones), real clients.

// Tests may panic on anything unexpected: that is how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod it;
