//! Stage 6, admit: rate limits, budgets and fairness (issue 5). Built up
//! piece by piece; not yet on the request path.
//!
//! - [`gcra`]: the generic cell rate algorithm, with reservations that are
//!   settled once the actual cost is known.
//! - [`memory`]: the in-process store: every rule of one request decided
//!   together, all or nothing.
//! - [`redis`]: the same decisions in Redis, one Lua script per request, so
//!   that several instances enforce one limit.
//! - [`tokens`]: input tokens counted with the model's real tokenizer.
//! - [`cost`]: what a request is estimated to cost, and what it did cost.

pub mod cost;
pub mod fair;
pub mod gcra;
pub mod memory;
pub mod redis;
pub mod store;
pub mod tokens;
