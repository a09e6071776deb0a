//! Stage 6, admit: rate limits, budgets and fairness.
//!
//! - [`admit`]: the stage itself: a request's rules decided at once, its
//!   estimate reserved, and the reservation settled when it ends.
//! - [`rules`]: the rules as configured and checked, and their keys.
//! - [`headers`]: what clients are told of their limits.
//! - [`fair`]: a model's concurrency capacity, shared by weighted fair
//!   queuing across tenants.
//! - [`store`]: what the stores decide on: limits, charges, settlements,
//!   the usage ledger.
//! - [`memory`]: the in-process store: every rule of one request decided
//!   together, all or nothing.
//! - [`redis`]: the same decisions in Redis, one Lua script per request, so
//!   that several instances enforce one limit.
//! - [`gcra`]: the generic cell rate algorithm, with reservations that are
//!   settled once the actual cost is known.
//! - [`tokens`]: input tokens counted with the model's real tokenizer.
//! - [`cost`]: what a request is estimated to cost, and what it did cost.

pub mod admit;
pub mod cost;
pub mod fair;
pub mod gcra;
pub mod headers;
pub mod memory;
pub mod redis;
pub mod rules;
pub mod store;
pub mod tokens;
