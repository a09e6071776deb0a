//! Stage 4, read and check the request: JSON content type, a body no larger
//! than the route allows and received in time, nesting within bounds, JSON
//! that parses into an object. The body is parsed once here and the parsed
//! value travels with the exchange; the original bytes are what is hashed
//! and forwarded.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;

use crate::reject::Reject;

/// Rejects a body not declared as JSON (`application/json` or `application/*+json`).
pub fn check_content_type(headers: &HeaderMap) -> Result<(), Reject> {
    let Some(value) = headers.get(http::header::CONTENT_TYPE) else {
        return Err(Reject::UnsupportedMediaType);
    };
    let text = value.to_str().map_err(|_| Reject::UnsupportedMediaType)?;
    let essence = text.split(';').next().unwrap_or("").trim();
    let (kind, subtype) = essence.split_once('/').ok_or(Reject::UnsupportedMediaType)?;
    let json = kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json") || subtype.to_ascii_lowercase().ends_with("+json"));
    if json {
        Ok(())
    } else {
        Err(Reject::UnsupportedMediaType)
    }
}

/// Reads the whole request body, refusing it early when `Content-Length`
/// already exceeds `limit`, and cutting off a client that sends more than
/// `limit` bytes or takes longer than `timeout`.
pub async fn read_body<B>(headers: &HeaderMap, body: B, limit: usize, timeout: Duration) -> Result<Bytes, Reject>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Reject::BodyTooLarge { limit });
    }
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect())
        .await
        .map_err(|_| Reject::BodyTimeout)?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(Reject::BodyTooLarge { limit }),
        Err(_) => Err(Reject::BodyRead),
    }
}

/// Parses a JSON object body, the one parse of a request: strictly
/// ([`crate::validate::hygiene`]: no duplicate keys, lone surrogates,
/// non-finite numbers, nesting deeper than `max_depth`, oversized strings
/// or element counts).
pub fn parse_json_object(bytes: &[u8], max_depth: usize) -> Result<Value, Reject> {
    use crate::validate::hygiene::{HygieneError, HygieneLimits, parse_strict};
    parse_strict(bytes, &HygieneLimits::with_max_depth(max_depth)).map_err(|e| match e {
        HygieneError::NotAnObject { .. } => Reject::InvalidJson("the body must be a JSON object".to_owned()),
        HygieneError::TooDeep { .. } => Reject::JsonTooDeep(max_depth),
        HygieneError::Syntax { .. } => Reject::InvalidJson(e.to_string()),
        other => Reject::InvalidRequest {
            param: other.param(),
            message: other.to_string(),
            code: other.code(),
        },
    })
}

/// The deepest nesting of arrays and objects in a JSON text, counted without
/// parsing it. Brackets inside strings do not count. Invalid JSON gives some
/// number; the parser reports the real error.
pub fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// The `model` field of an OpenAI request.
pub fn model_field(body: &Value) -> Result<&str, Reject> {
    match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(m),
        Some(Value::String(_)) | None => Err(Reject::InvalidField {
            param: "model",
            message: "you must provide a model parameter".to_owned(),
        }),
        Some(_) => Err(Reject::InvalidField {
            param: "model",
            message: "`model` must be a string".to_owned(),
        }),
    }
}

/// The `stream` flag of an OpenAI request.
pub fn stream_field(body: &Value) -> Result<bool, Reject> {
    match body.get("stream") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(Reject::InvalidField {
            param: "stream",
            message: "`stream` must be a boolean".to_owned(),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn depth_ignores_brackets_in_strings() {
        assert_eq!(json_depth(br#"{"a":[1,{"b":"[[[{{{"}]}"#), 3);
        assert_eq!(json_depth(br#"{"a":"\"[[["}"#), 1);
        assert_eq!(json_depth(b"1"), 0);
    }

    #[test]
    fn deep_json_is_refused_before_parsing() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(parse_json_object(deep.as_bytes(), 32), Err(Reject::JsonTooDeep(32)));
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert_eq!(check_content_type(&h), Err(Reject::UnsupportedMediaType));
        for (ct, ok) in [
            ("application/json", true),
            ("Application/JSON; charset=utf-8", true),
            ("application/vnd.api+json", true),
            ("text/plain", false),
            ("application/jsonx", false),
            ("multipart/form-data; boundary=x", false),
        ] {
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            assert_eq!(check_content_type(&h).is_ok(), ok, "{ct}");
        }
    }

    #[tokio::test]
    async fn body_over_the_limit_is_refused() {
        let h = HeaderMap::new();
        let body = http_body_util::Full::new(Bytes::from(vec![b'x'; 11]));
        let got = read_body(&h, body, 10, Duration::from_secs(1)).await;
        assert_eq!(got, Err(Reject::BodyTooLarge { limit: 10 }));
        let body = http_body_util::Full::new(Bytes::from(vec![b'x'; 10]));
        assert_eq!(read_body(&h, body, 10, Duration::from_secs(1)).await.unwrap().len(), 10);
    }
}
