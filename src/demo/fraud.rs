//! Fraud-scoring model served over the Open Inference Protocol v2 (KServe v2 REST).
//!
//! A small but real model: a logistic regression with fixed weights over five engineered
//! features of a card transaction (see [`score`]). It answers `POST
//! /v2/models/fraud-scorer[/versions/1]/infer` with one `risk_score` (FP32, 0..1) per row, plus
//! the OIP health, readiness and metadata endpoints. Errors are `{"error":"..."}` as in OIP.
//!
//! Every input is a flat tensor of `N` rows (`shape` `[N]` or `[N, 1]`, `1 <= N <= 10 000`):
//!
//! | name           | datatype       | values                                   |
//! |----------------|----------------|------------------------------------------|
//! | `amount`       | FP64 (or FP32) | transaction amount in dollars, finite, >= 0 |
//! | `merchant_id`  | BYTES          | merchant id string                       |
//! | `country`      | BYTES          | ISO 3166-1 alpha-2 code of the card's use |
//! | `hour`         | INT32          | local hour of day, 0..=23                |
//! | `card_present` | BOOL           | whether the card was physically present  |

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{DemoBody, json_response, read_body};

pub const MODEL_NAME: &str = "fraud-scorer";
pub const MODEL_VERSION: &str = "1";
/// Largest batch (`N`) one request may carry.
pub const MAX_BATCH: usize = 10_000;

/// Weight of `ln(1 + amount)`: risk grows with the order of magnitude of the amount.
pub const W_LOG_AMOUNT: f64 = 0.9;
/// Weight of the night-time indicator (local hour 0..=5).
pub const W_NIGHT: f64 = 1.2;
/// Weight of the foreign-country indicator (country not in [`DOMESTIC_COUNTRIES`]).
pub const W_FOREIGN: f64 = 1.5;
/// Weight of the card-not-present indicator (online and phone orders).
pub const W_CARD_NOT_PRESENT: f64 = 1.1;
/// Weight of the merchant risk bucket in `[0, 1]` (see [`merchant_risk`]).
pub const W_MERCHANT_RISK: f64 = 0.8;
/// Intercept. Chosen so that a $25 daytime domestic card-present purchase scores below 0.04 and
/// a $4,000 3 a.m. foreign card-not-present one above 0.98, whatever the merchant.
pub const BIAS: f64 = -7.0;
/// Countries the (imaginary) issuer considers domestic.
pub const DOMESTIC_COUNTRIES: [&str; 5] = ["US", "CA", "GB", "DE", "FR"];

/// Probability that a transaction is fraudulent: `sigmoid(w · x + b)` over the documented
/// features and weights. Country codes compare case-insensitively.
pub fn score(amount: f64, merchant_id: &str, country: &str, hour: i32, card_present: bool) -> f64 {
    let foreign = !DOMESTIC_COUNTRIES.iter().any(|c| c.eq_ignore_ascii_case(country));
    let z = BIAS
        + W_LOG_AMOUNT * amount.max(0.0).ln_1p()
        + W_NIGHT * f64::from((0..6).contains(&hour))
        + W_FOREIGN * f64::from(foreign)
        + W_CARD_NOT_PRESENT * f64::from(!card_present)
        + W_MERCHANT_RISK * merchant_risk(merchant_id);
    1.0 / (1.0 + (-z).exp())
}

/// A stand-in for a merchant's historical fraud rate: one of 256 evenly spaced buckets in
/// `[0, 1]`, picked by the first byte of SHA-256 of the id, so it is stable across runs.
pub fn merchant_risk(merchant_id: &str) -> f64 {
    f64::from(Sha256::digest(merchant_id.as_bytes())[0]) / 255.0
}

/// Input names in metadata order, with the datatypes each accepts (the first is advertised).
const INPUTS: [(&str, &[&str]); 5] = [
    ("amount", &["FP64", "FP32"]),
    ("merchant_id", &["BYTES"]),
    ("country", &["BYTES"]),
    ("hour", &["INT32"]),
    ("card_present", &["BOOL"]),
];
const OUTPUT: &str = "risk_score";

pub(crate) async fn handle(req: Request<Incoming>) -> Response<DemoBody> {
    let (parts, body) = req.into_parts();
    let route = match route(parts.uri.path()) {
        Ok(route) => route,
        Err(error) => return error.into_response(),
    };
    let allowed = if route == Route::Infer {
        Method::POST
    } else {
        Method::GET
    };
    if parts.method != allowed {
        return OipError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("use {allowed} for this endpoint"),
        )
        .into_response();
    }
    match route {
        Route::Live => json_response(StatusCode::OK, &serde_json::json!({"live": true})),
        Route::Ready => json_response(StatusCode::OK, &serde_json::json!({"ready": true})),
        Route::ModelReady => json_response(StatusCode::OK, &serde_json::json!({"name": MODEL_NAME, "ready": true})),
        Route::Server => json_response(
            StatusCode::OK,
            &serde_json::json!({"name": "warden-demo", "version": env!("CARGO_PKG_VERSION"), "extensions": []}),
        ),
        Route::Metadata => json_response(StatusCode::OK, &metadata()),
        Route::Infer => {
            let result = match read_body(body).await {
                Ok(bytes) => infer(&bytes),
                Err((status, message)) => Err(OipError::new(status, message.to_owned())),
            };
            result.unwrap_or_else(OipError::into_response)
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Live,
    Ready,
    Server,
    Metadata,
    ModelReady,
    Infer,
}

fn route(path: &str) -> Result<Route, OipError> {
    match path {
        "/v2" => return Ok(Route::Server),
        "/v2/health/live" => return Ok(Route::Live),
        "/v2/health/ready" => return Ok(Route::Ready),
        _ => {}
    }
    let not_found = || OipError::new(StatusCode::NOT_FOUND, format!("no route for {path}"));
    let rest = path.strip_prefix("/v2/models/").ok_or_else(not_found)?;
    let segments: Vec<&str> = rest.split('/').collect();
    let (name, version, action) = match segments.as_slice() {
        [name] => (*name, None, None),
        [name, "versions", version] => (*name, Some(*version), None),
        [name, action] => (*name, None, Some(*action)),
        [name, "versions", version, action] => (*name, Some(*version), Some(*action)),
        _ => return Err(not_found()),
    };
    if name != MODEL_NAME {
        return Err(OipError::new(
            StatusCode::NOT_FOUND,
            format!("model `{name}` not found"),
        ));
    }
    if let Some(version) = version.filter(|v| *v != MODEL_VERSION) {
        return Err(OipError::new(
            StatusCode::NOT_FOUND,
            format!("model `{name}` version `{version}` not found"),
        ));
    }
    match action {
        None => Ok(Route::Metadata),
        Some("ready") => Ok(Route::ModelReady),
        Some("infer") => Ok(Route::Infer),
        Some(_) => Err(not_found()),
    }
}

#[derive(Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<Tensor>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Deserialize)]
struct Tensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    /// Flat, row-major data; nested arrays are rejected as wrongly typed elements.
    data: Vec<Value>,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
}

#[derive(Serialize)]
struct InferResponse<'a> {
    model_name: &'static str,
    model_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: [OutputTensor; 1],
}

#[derive(Serialize)]
struct OutputTensor {
    name: &'static str,
    shape: [usize; 1],
    datatype: &'static str,
    data: Vec<f32>,
}

#[derive(Serialize)]
struct Metadata {
    name: &'static str,
    versions: [&'static str; 1],
    platform: &'static str,
    inputs: [TensorMetadata; 5],
    outputs: [TensorMetadata; 1],
}

#[derive(Serialize)]
struct TensorMetadata {
    name: &'static str,
    datatype: &'static str,
    shape: [i64; 1],
}

fn metadata() -> Metadata {
    Metadata {
        name: MODEL_NAME,
        versions: [MODEL_VERSION],
        platform: "warden-demo",
        inputs: INPUTS.map(|(name, types)| TensorMetadata {
            name,
            datatype: types[0],
            shape: [-1],
        }),
        outputs: [TensorMetadata {
            name: OUTPUT,
            datatype: "FP32",
            shape: [-1],
        }],
    }
}

/// An OIP error, rendered as `{"error":"..."}`.
#[derive(Debug)]
struct OipError {
    status: StatusCode,
    message: String,
}

impl OipError {
    fn new(status: StatusCode, message: String) -> Self {
        Self { status, message }
    }

    fn bad(message: String) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn into_response(self) -> Response<DemoBody> {
        #[derive(Serialize)]
        struct Envelope<'a> {
            error: &'a str,
        }
        json_response(self.status, &Envelope { error: &self.message })
    }
}

fn infer(body: &[u8]) -> Result<Response<DemoBody>, OipError> {
    let req: InferRequest =
        serde_json::from_slice(body).map_err(|e| OipError::bad(format!("invalid inference request: {e}")))?;
    if let Some(output) = req.outputs.iter().flatten().find(|o| o.name != OUTPUT) {
        return Err(OipError::bad(format!(
            "unknown output `{}`; the model produces `{OUTPUT}`",
            output.name
        )));
    }

    let mut slots: [Option<&Tensor>; 5] = [None; 5];
    for tensor in &req.inputs {
        let Some(slot) = INPUTS.iter().position(|(name, _)| *name == tensor.name) else {
            let expected = INPUTS.map(|(name, _)| name).join(", ");
            return Err(OipError::bad(format!(
                "unexpected input `{}`; expected {expected}",
                tensor.name
            )));
        };
        if slots[slot].replace(tensor).is_some() {
            return Err(OipError::bad(format!(
                "input `{}` is given more than once",
                tensor.name
            )));
        }
    }
    let mut rows = None;
    for ((name, datatypes), slot) in INPUTS.iter().zip(&slots) {
        let tensor = slot.ok_or_else(|| OipError::bad(format!("missing required input `{name}`")))?;
        if !datatypes.contains(&tensor.datatype.as_str()) {
            let expected = datatypes.join(" or ");
            return Err(OipError::bad(format!(
                "input `{name}` must have datatype {expected}, got {}",
                tensor.datatype
            )));
        }
        let n = tensor_rows(tensor)?;
        match rows {
            None => rows = Some((n, *name)),
            Some((first, first_name)) if first != n => {
                let message = format!("input `{name}` has {n} rows but input `{first_name}` has {first}");
                return Err(OipError::bad(message));
            }
            Some(_) => {}
        }
    }
    let [Some(amount), Some(merchant), Some(country), Some(hour), Some(card)] = slots else {
        return Err(OipError::bad("missing required input".to_owned()));
    };

    let fp32 = amount.datatype == "FP32";
    let amounts = column(amount, "a finite number >= 0", |v| {
        v.as_f64()
            .filter(|a| a.is_finite() && *a >= 0.0 && !(fp32 && (*a as f32).is_infinite()))
    })?;
    let merchants = column(merchant, "a string", Value::as_str)?;
    let countries = column(country, "a two-letter ISO 3166-1 alpha-2 code", |v| {
        v.as_str()
            .filter(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()))
    })?;
    let hours = column(hour, "an integer hour in 0..=23", |v| {
        v.as_i64().filter(|h| (0..24).contains(h))
    })?;
    let cards = column(card, "a boolean", Value::as_bool)?;

    let data: Vec<f32> = (0..amounts.len())
        .map(|i| score(amounts[i], merchants[i], countries[i], hours[i] as i32, cards[i]) as f32)
        .collect();
    let output = OutputTensor {
        name: OUTPUT,
        shape: [data.len()],
        datatype: "FP32",
        data,
    };
    let response = InferResponse {
        model_name: MODEL_NAME,
        model_version: MODEL_VERSION,
        id: req.id.as_deref(),
        outputs: [output],
    };
    Ok(json_response(StatusCode::OK, &response))
}

/// `N` for a `[N]` or `[N, 1]` tensor whose data really holds `N` values.
fn tensor_rows(tensor: &Tensor) -> Result<usize, OipError> {
    let name = &tensor.name;
    let n = match tensor.shape.as_slice() {
        [n] | [n, 1] => *n,
        shape => {
            return Err(OipError::bad(format!(
                "input `{name}` must have shape [N] or [N, 1], got {shape:?}"
            )));
        }
    };
    let n = usize::try_from(n)
        .ok()
        .filter(|n| (1..=MAX_BATCH).contains(n))
        .ok_or_else(|| {
            OipError::bad(format!(
                "input `{name}` must have between 1 and {MAX_BATCH} rows, got {n}"
            ))
        })?;
    if tensor.data.len() != n {
        let message = format!(
            "input `{name}` has shape {:?} but {} data values",
            tensor.shape,
            tensor.data.len()
        );
        return Err(OipError::bad(message));
    }
    Ok(n)
}

/// Decodes every element of `tensor` with `decode`, naming the input and index on failure.
fn column<'a, T>(tensor: &'a Tensor, what: &str, decode: impl Fn(&'a Value) -> Option<T>) -> Result<Vec<T>, OipError> {
    let name = &tensor.name;
    let decoded = tensor.data.iter().enumerate().map(|(i, value)| {
        decode(value).ok_or_else(|| OipError::bad(format!("input `{name}`: element {i} must be {what}, got {value}")))
    });
    decoded.collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::demo::serve_fraud_model;
    use crate::demo::test_support::{Reply, send, start};

    const MERCHANTS: [&str; 6] = [
        "m-001",
        "coffee-corner",
        "acme-electronics",
        "",
        "casino-royale",
        "gift-cards-4u",
    ];

    #[test]
    fn small_domestic_daytime_purchase_is_low_risk() {
        for merchant in MERCHANTS {
            let s = score(25.0, merchant, "US", 14, true);
            assert!(s < 0.05, "{merchant}: {s}");
        }
    }

    #[test]
    fn large_foreign_night_card_not_present_purchase_is_high_risk() {
        for merchant in MERCHANTS {
            let s = score(4_000.0, merchant, "NG", 3, false);
            assert!(s > 0.9, "{merchant}: {s}");
        }
    }

    #[test]
    fn score_is_monotone_in_amount() {
        for merchant in MERCHANTS {
            let mut previous = score(0.0, merchant, "GB", 12, true);
            for step in 1..=400 {
                let next = score(f64::from(step) * 50.0, merchant, "GB", 12, true);
                assert!(next > previous, "{merchant} at {step}");
                previous = next;
            }
        }
    }

    #[test]
    fn each_risk_factor_raises_the_score() {
        let base = score(100.0, "m-001", "US", 12, true);
        assert!(score(100.0, "m-001", "US", 2, true) > base);
        assert!(score(100.0, "m-001", "BR", 12, true) > base);
        assert!(score(100.0, "m-001", "US", 12, false) > base);
        assert_eq!(
            score(100.0, "m-001", "us", 12, true),
            base,
            "country codes are case-insensitive"
        );
        assert_eq!(score(100.0, "m-001", "US", 6, true), base, "06:00 is daytime");
        let risks: Vec<f64> = MERCHANTS.iter().map(|m| merchant_risk(m)).collect();
        assert!(risks.iter().all(|r| (0.0..=1.0).contains(r)));
        assert!(
            risks.windows(2).any(|w| w[0] != w[1]),
            "merchants land in different buckets"
        );
        assert_eq!(merchant_risk("m-001"), risks[0]);
    }

    fn batch() -> Value {
        json!({
            "id": "req-42",
            "inputs": [
                {"name": "amount", "shape": [3], "datatype": "FP64", "data": [25.0, 4000, 310.5]},
                {"name": "merchant_id", "shape": [3], "datatype": "BYTES", "data": ["coffee-corner", "gift-cards-4u", "acme"]},
                {"name": "country", "shape": [3], "datatype": "BYTES", "data": ["US", "NG", "fr"]},
                {"name": "hour", "shape": [3], "datatype": "INT32", "data": [14, 3, 23]},
                {"name": "card_present", "shape": [3], "datatype": "BOOL", "data": [true, false, false]}
            ]
        })
    }

    async fn infer(addr: std::net::SocketAddr, body: &Value) -> Reply {
        send(addr, "POST", "/v2/models/fraud-scorer/infer", Some(&body.to_string())).await
    }

    fn scores(reply: &Reply) -> Vec<f32> {
        assert_eq!(reply.status, 200, "{}", reply.text());
        let body = reply.json();
        assert_eq!(body["model_name"], "fraud-scorer");
        assert_eq!(body["model_version"], "1");
        let output = &body["outputs"][0];
        assert_eq!(output["name"], "risk_score");
        assert_eq!(output["datatype"], "FP32");
        let data: Vec<f32> = output["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(output["shape"], json!([data.len()]));
        data
    }

    #[tokio::test]
    async fn infer_round_trip_matches_score() {
        let addr = start(serve_fraud_model).await;
        let reply = infer(addr, &batch()).await;
        assert_eq!(reply.json()["id"], "req-42");
        let expected = [
            score(25.0, "coffee-corner", "US", 14, true) as f32,
            score(4000.0, "gift-cards-4u", "NG", 3, false) as f32,
            score(310.5, "acme", "FR", 23, false) as f32,
        ];
        assert_eq!(scores(&reply), expected);
        assert!(expected[0] < 0.05 && expected[1] > 0.9);

        // Versioned path, [N, 1] shapes, FP32 amounts, no id and an explicit output request.
        let mut body = batch();
        body.as_object_mut().unwrap().remove("id");
        body["outputs"] = json!([{"name": "risk_score"}]);
        body["inputs"][0]["datatype"] = json!("FP32");
        for input in body["inputs"].as_array_mut().unwrap() {
            input["shape"] = json!([3, 1]);
        }
        let reply = send(
            addr,
            "POST",
            "/v2/models/fraud-scorer/versions/1/infer",
            Some(&body.to_string()),
        )
        .await;
        assert!(reply.json().get("id").is_none());
        assert_eq!(scores(&reply), expected);
    }

    #[tokio::test]
    async fn infer_full_batch() {
        let addr = start(serve_fraud_model).await;
        let n = MAX_BATCH;
        let amounts: Vec<f64> = (0..n).map(|i| i as f64).collect();
        let body = json!({"inputs": [
            {"name": "amount", "shape": [n], "datatype": "FP64", "data": amounts},
            {"name": "merchant_id", "shape": [n], "datatype": "BYTES", "data": vec!["m"; n]},
            {"name": "country", "shape": [n], "datatype": "BYTES", "data": vec!["CA"; n]},
            {"name": "hour", "shape": [n], "datatype": "INT32", "data": vec![12; n]},
            {"name": "card_present", "shape": [n], "datatype": "BOOL", "data": vec![true; n]}
        ]});
        let data = scores(&infer(addr, &body).await);
        assert_eq!(data.len(), n);
        assert_eq!(data[n - 1], score((n - 1) as f64, "m", "CA", 12, true) as f32);
        assert!(data.windows(2).all(|w| w[0] <= w[1]));
    }

    async fn rejected(addr: std::net::SocketAddr, body: &Value, expected: &str) {
        let reply = infer(addr, body).await;
        assert_eq!(reply.status, 400, "{expected}: {}", reply.text());
        let error = reply.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains(expected), "expected {expected:?} in {error:?}");
    }

    #[tokio::test]
    async fn bad_inference_requests_are_rejected() {
        let addr = start(serve_fraud_model).await;
        let cases = [
            (
                "/inputs/3/data",
                json!([1, 2]),
                "input `hour` has shape [3] but 2 data values",
            ),
            ("/inputs/3/shape", json!([2]), "input `hour`"),
            (
                "/inputs/0/data/1",
                json!(-5.0),
                "input `amount`: element 1 must be a finite number >= 0",
            ),
            ("/inputs/0/data/1", json!("12"), "input `amount`: element 1"),
            (
                "/inputs/3/datatype",
                json!("FP32"),
                "input `hour` must have datatype INT32",
            ),
            ("/inputs/3/data/0", json!(24), "input `hour`: element 0"),
            ("/inputs/3/data/0", json!(1.5), "input `hour`: element 0"),
            ("/inputs/2/data/0", json!("USA"), "input `country`: element 0"),
            ("/inputs/4/data/0", json!(1), "input `card_present`: element 0"),
            ("/inputs/1/data/2", json!(["nested"]), "input `merchant_id`: element 2"),
            (
                "/inputs/0/shape",
                json!([3, 2]),
                "input `amount` must have shape [N] or [N, 1]",
            ),
            ("/inputs/4/name", json!("cvv"), "unexpected input `cvv`"),
            ("/id", json!({"outputs": 1}), "invalid inference request"),
        ];
        for (pointer, value, expected) in cases {
            let mut body = batch();
            *body.pointer_mut(pointer).unwrap() = value;
            rejected(addr, &body, expected).await;
        }

        let mut body = batch();
        body["inputs"].as_array_mut().unwrap().remove(4);
        rejected(addr, &body, "missing required input `card_present`").await;

        let mut body = batch();
        let copy = body["inputs"][0].clone();
        body["inputs"].as_array_mut().unwrap().push(copy);
        rejected(addr, &body, "input `amount` is given more than once").await;

        let mut body = batch();
        body["outputs"] = json!([{"name": "label"}]);
        rejected(addr, &body, "unknown output `label`").await;

        let mut body = batch();
        for input in body["inputs"].as_array_mut().unwrap() {
            input["shape"] = json!([0]);
            input["data"] = json!([]);
        }
        rejected(addr, &body, "input `amount` must have between 1 and 10000 rows, got 0").await;

        let reply = send(addr, "POST", "/v2/models/fraud-scorer/infer", Some("{\"inputs\": [")).await;
        assert_eq!(reply.status, 400);
        assert!(
            reply.json()["error"]
                .as_str()
                .unwrap()
                .starts_with("invalid inference request")
        );
    }

    #[tokio::test]
    async fn metadata_health_and_routing() {
        let addr = start(serve_fraud_model).await;
        let get = |path: &'static str| send(addr, "GET", path, None);
        assert_eq!(get("/v2/health/live").await.json(), json!({"live": true}));
        assert_eq!(get("/v2/health/ready").await.json(), json!({"ready": true}));
        assert_eq!(
            get("/v2/models/fraud-scorer/ready").await.json(),
            json!({"name": "fraud-scorer", "ready": true})
        );
        let metadata = get("/v2/models/fraud-scorer").await;
        assert_eq!(metadata.status, 200);
        assert_eq!(
            metadata.json(),
            json!({
                "name": "fraud-scorer",
                "versions": ["1"],
                "platform": "warden-demo",
                "inputs": [
                    {"name": "amount", "datatype": "FP64", "shape": [-1]},
                    {"name": "merchant_id", "datatype": "BYTES", "shape": [-1]},
                    {"name": "country", "datatype": "BYTES", "shape": [-1]},
                    {"name": "hour", "datatype": "INT32", "shape": [-1]},
                    {"name": "card_present", "datatype": "BOOL", "shape": [-1]}
                ],
                "outputs": [{"name": "risk_score", "datatype": "FP32", "shape": [-1]}]
            })
        );
        assert_eq!(get("/v2/models/fraud-scorer/versions/1").await.json(), metadata.json());

        let reply = send(addr, "POST", "/v2/models/other/infer", Some(&batch().to_string())).await;
        assert_eq!(reply.status, 404);
        assert_eq!(reply.json(), json!({"error": "model `other` not found"}));
        let reply = get("/v2/models/fraud-scorer/versions/2/ready").await;
        assert_eq!(reply.status, 404);
        assert_eq!(
            reply.json(),
            json!({"error": "model `fraud-scorer` version `2` not found"})
        );
        assert_eq!(get("/v2/models/fraud-scorer/explain").await.status, 404);
        assert_eq!(get("/nope").await.status, 404);
        assert_eq!(get("/v2/models/fraud-scorer/infer").await.status, 405);
        assert_eq!(send(addr, "POST", "/v2/health/live", None).await.status, 405);
    }
}
