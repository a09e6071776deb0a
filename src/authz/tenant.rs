//! Which data partition (tenant) a request touches, read from the payload
//! by the model's configuration:
//! - a JSON pointer into the body (e.g. `/metadata/merchant_id`, `/user`):
//!   exactly one string;
//! - an OIP v2 input tensor by name: one string per row, every row judged;
//! - a header, believed only from a caller with a verified client
//!   certificate of a known mTLS client (a service), never from anyone else.
//!
//! A model that declares a tenant source refuses a request without one, and
//! a value of the wrong shape (an array where one string is expected, a
//! number, an empty string). Tenant ids are compared exactly, so a
//! look-alike (confusable Unicode) is simply another tenant.

use http::HeaderMap;
use serde_json::Value;

use crate::authn::Identity;
use crate::config::TenantSource;
use crate::reject::Reject;

/// The distinct tenants a request names, in first-seen order.
pub fn extract(
    source: &TenantSource,
    body: &Value,
    headers: &HeaderMap,
    identity: &Identity,
) -> Result<Vec<String>, Reject> {
    let mut tenants: Vec<String> = Vec::new();
    let mut add = |t: &str| -> Result<(), Reject> {
        if t.is_empty() {
            return Err(Reject::TenantInvalid("the tenant is empty".into()));
        }
        if !tenants.iter().any(|seen| seen == t) {
            tenants.push(t.to_owned());
        }
        Ok(())
    };
    match source {
        TenantSource::JsonPointer(pointer) => match body.pointer(pointer) {
            None | Some(Value::Null) => return Err(Reject::TenantMissing(pointer.clone())),
            Some(Value::String(t)) => add(t)?,
            Some(Value::Array(_)) => {
                return Err(Reject::TenantInvalid(format!(
                    "`{pointer}` must be one tenant, not an array"
                )));
            }
            Some(_) => return Err(Reject::TenantInvalid(format!("`{pointer}` must be a string"))),
        },
        TenantSource::Tensor(name) => {
            let input = body
                .get("inputs")
                .and_then(Value::as_array)
                .and_then(|inputs| {
                    inputs
                        .iter()
                        .find(|i| i.get("name").and_then(Value::as_str) == Some(name))
                })
                .ok_or_else(|| Reject::TenantMissing(format!("input `{name}`")))?;
            let rows = input
                .get("data")
                .and_then(Value::as_array)
                .filter(|rows| !rows.is_empty())
                .ok_or_else(|| Reject::TenantMissing(format!("input `{name}`")))?;
            for row in rows {
                match row {
                    Value::String(t) => add(t)?,
                    _ => {
                        return Err(Reject::TenantInvalid(format!(
                            "every row of input `{name}` must be a tenant string"
                        )));
                    }
                }
            }
        }
        TenantSource::Header(name) => {
            let mut values = headers.get_all(name).iter();
            let (Some(value), None) = (values.next(), values.next()) else {
                return Err(if headers.contains_key(name) {
                    Reject::TenantInvalid(format!("`{name}` must appear once"))
                } else {
                    Reject::TenantMissing(format!("header `{name}`"))
                });
            };
            // Only a service proven by its certificate may say whose data it
            // touches in a header: anyone else could write any tenant there.
            if identity.client_cert.is_none() {
                return Err(Reject::TenantHeaderNotAllowed(name.to_string()));
            }
            add(value
                .to_str()
                .map_err(|_| Reject::TenantInvalid(format!("`{name}` is not text")))?)?;
        }
    }
    Ok(tenants)
}
