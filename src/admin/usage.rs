//! The usage ledger through the admin API: `GET /admin/v1/usage`, the
//! totals per day, principal, tenant and model — requests, tokens, compute
//! seconds and dollars — that spend reports and limit calibration start
//! from. The ledger lives in the limit store (Redis when shared, so every
//! instance's usage is in one place).
//!
//! Query parameters, all optional: `from` and `to` (`YYYY-MM-DD`, UTC,
//! inclusive; default today), and `tenant`, `principal`, `model` to filter.
//! The answer is `{"from", "to", "data": [row…], "total": {…}}`, each row
//! `{day, principal, tenant, model, requests, input_tokens, output_tokens,
//! compute_seconds, dollars}` with dollars as a decimal string, exact.
//!
//! Needs `Authorization: Bearer <admin token>` as the rest of the admin API.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};

use super::{error, json};
use crate::gateway::Gateway;
use crate::limits::store::{LedgerRow, LedgerUsage};

/// Whether `path` belongs to this API.
pub fn owns(path: &str) -> bool {
    path == "/admin/v1/usage"
}

/// The widest range one call may ask for.
const MAX_DAYS: i32 = 400;

/// Answers one usage request.
pub async fn handle<B>(gateway: &Arc<Gateway>, req: Request<B>) -> Response<Full<Bytes>> {
    let runtime = gateway.runtime();
    if let Some(refused) = super::refuse_without_token(&runtime, &req) {
        return refused;
    }
    if req.method() != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    let Some(limiter) = &runtime.limiter else {
        return error(
            StatusCode::NOT_FOUND,
            "no `limits:` are configured, so no usage is kept",
        );
    };
    let query = match Query::parse(req.uri().query().unwrap_or("")) {
        Ok(q) => q,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    match limiter.ledger(&query.from, &query.to).await {
        Ok(rows) => json(StatusCode::OK, &report(&query, rows)),
        Err(e) => {
            tracing::warn!(error = %e, "the usage ledger could not be read");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the usage ledger cannot be read right now",
            )
        }
    }
}

/// A parsed query.
#[derive(Debug, PartialEq, Eq)]
pub struct Query {
    /// First day.
    pub from: String,
    /// Last day.
    pub to: String,
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only this principal.
    pub principal: Option<String>,
    /// Only this model.
    pub model: Option<String>,
}

impl Query {
    /// Reads `from`, `to`, `tenant`, `principal` and `model`.
    pub fn parse(query: &str) -> Result<Query, String> {
        let today = jiff::Timestamp::now().strftime("%Y-%m-%d").to_string();
        let mut q = Query {
            from: today.clone(),
            to: today,
            tenant: None,
            principal: None,
            model: None,
        };
        let mut from = None;
        for (name, value) in form_urlencoded(query) {
            match name.as_str() {
                "from" => from = Some(day(&value)?),
                "to" => q.to = day(&value)?,
                "tenant" => q.tenant = Some(value),
                "principal" => q.principal = Some(value),
                "model" => q.model = Some(value),
                other => return Err(format!("unknown parameter `{other}`")),
            }
        }
        q.from = from.unwrap_or_else(|| q.to.clone());
        let (a, b) = (parse_day(&q.from)?, parse_day(&q.to)?);
        if a > b {
            return Err("`from` is after `to`".to_owned());
        }
        if a.until(b).map_err(|e| e.to_string())?.get_days() >= MAX_DAYS {
            return Err(format!("at most {MAX_DAYS} days at once"));
        }
        Ok(q)
    }

    fn keeps(&self, row: &LedgerRow) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == row.tenant)
            && self.principal.as_ref().is_none_or(|p| *p == row.principal)
            && self.model.as_ref().is_none_or(|m| *m == row.model)
    }
}

fn parse_day(text: &str) -> Result<jiff::civil::Date, String> {
    text.parse::<jiff::civil::Date>()
        .map_err(|_| format!("`{text}` is not a day such as 2026-12-01"))
}

fn day(text: &str) -> Result<String, String> {
    parse_day(text).map(|d| d.to_string())
}

/// Splits `a=b&c=d`, percent-decoding names and values (`+` is a space).
fn form_urlencoded(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(name), decode(value))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let hex = |b: u8| char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(high), Some(low)) => {
                out.push(high * 16 + low);
                i += 2;
            }
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Micro-dollars as an exact decimal string: `1234567` is `"1.234567"`.
pub fn dollars(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

fn usage_json(u: &LedgerUsage) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("requests".into(), json!(u.requests));
    m.insert("input_tokens".into(), json!(u.input_tokens));
    m.insert("output_tokens".into(), json!(u.output_tokens));
    m.insert("compute_seconds".into(), json!(u.compute_ns as f64 / 1e9));
    m.insert("dollars".into(), json!(dollars(u.micro_dollars)));
    m
}

/// The answer for `rows`, filtered and summed.
pub fn report(query: &Query, mut rows: Vec<LedgerRow>) -> Value {
    rows.retain(|r| query.keeps(r));
    rows.sort_by(|a, b| (&a.day, &a.tenant, &a.principal, &a.model).cmp(&(&b.day, &b.tenant, &b.principal, &b.model)));
    let mut total = LedgerUsage::default();
    let data: Vec<Value> = rows
        .iter()
        .map(|r| {
            total.add(&r.usage);
            let mut m = serde_json::Map::new();
            m.insert("day".into(), json!(r.day));
            m.insert("principal".into(), json!(r.principal));
            m.insert("tenant".into(), json!(r.tenant));
            m.insert("model".into(), json!(r.model));
            m.extend(usage_json(&r.usage));
            Value::Object(m)
        })
        .collect();
    json!({ "from": query.from, "to": query.to, "data": data, "total": Value::Object(usage_json(&total)) })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_checked() {
        let q = Query::parse("from=2026-11-01&to=2026-11-30&tenant=acme%20co").unwrap();
        assert_eq!((q.from.as_str(), q.to.as_str()), ("2026-11-01", "2026-11-30"));
        assert_eq!(q.tenant.as_deref(), Some("acme co"));
        assert!(Query::parse("from=2026-12-02&to=2026-12-01").is_err());
        assert!(Query::parse("from=yesterday").is_err());
        assert!(Query::parse("colour=blue").is_err());
        assert!(Query::parse("from=2020-01-01&to=2026-01-01").is_err());
        let q = Query::parse("to=2026-11-05").unwrap();
        assert_eq!(q.from, "2026-11-05");
    }

    #[test]
    fn dollars_are_exact() {
        assert_eq!(dollars(0), "0.000000");
        assert_eq!(dollars(1_234_567), "1.234567");
        assert_eq!(dollars(5), "0.000005");
    }
}
