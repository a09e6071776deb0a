//! OIP v2 inference requests held to the model's metadata: the input names,
//! datatypes and shapes it declares, the element count each shape implies,
//! values of the declared type and range, a consistent batch size no larger
//! than the model allows, and only the outputs it has.
//!
//! The metadata is the model's own (`GET /v2/models/{name}`, the
//! `$metadata_model_response` of the Open Inference Protocol), either
//! written into the configuration or fetched once from the upstream; the
//! request is `$inference_request`. A shape dimension of `-1` is variable.

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

/// An OIP v2 tensor datatype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datatype {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bytes,
}

impl Datatype {
    /// Reads a datatype name as the protocol spells it (`FP32`, `BYTES`…).
    pub fn parse(name: &str) -> Option<Datatype> {
        Some(match name {
            "BOOL" => Datatype::Bool,
            "UINT8" => Datatype::Uint8,
            "UINT16" => Datatype::Uint16,
            "UINT32" => Datatype::Uint32,
            "UINT64" => Datatype::Uint64,
            "INT8" => Datatype::Int8,
            "INT16" => Datatype::Int16,
            "INT32" => Datatype::Int32,
            "INT64" => Datatype::Int64,
            "FP16" => Datatype::Fp16,
            "FP32" => Datatype::Fp32,
            "FP64" => Datatype::Fp64,
            "BYTES" => Datatype::Bytes,
            _ => return None,
        })
    }

    /// The protocol's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Datatype::Bool => "BOOL",
            Datatype::Uint8 => "UINT8",
            Datatype::Uint16 => "UINT16",
            Datatype::Uint32 => "UINT32",
            Datatype::Uint64 => "UINT64",
            Datatype::Int8 => "INT8",
            Datatype::Int16 => "INT16",
            Datatype::Int32 => "INT32",
            Datatype::Int64 => "INT64",
            Datatype::Fp16 => "FP16",
            Datatype::Fp32 => "FP32",
            Datatype::Fp64 => "FP64",
            Datatype::Bytes => "BYTES",
        }
    }

    /// Whether `v` is a value of this type, in its range. Integers must be
    /// JSON integers (`1.0` is not an `INT32`); floats must fit the type's
    /// finite range, since a value the model would read as infinity is not
    /// one it was built for.
    fn holds(self, v: &Value) -> bool {
        let int_in = |lo: i64, hi: i64| v.as_i64().is_some_and(|n| (lo..=hi).contains(&n));
        match self {
            Datatype::Bool => v.is_boolean(),
            Datatype::Uint8 => int_in(0, i64::from(u8::MAX)),
            Datatype::Uint16 => int_in(0, i64::from(u16::MAX)),
            Datatype::Uint32 => int_in(0, i64::from(u32::MAX)),
            Datatype::Uint64 => v.is_u64(),
            Datatype::Int8 => int_in(i64::from(i8::MIN), i64::from(i8::MAX)),
            Datatype::Int16 => int_in(i64::from(i16::MIN), i64::from(i16::MAX)),
            Datatype::Int32 => int_in(i64::from(i32::MIN), i64::from(i32::MAX)),
            Datatype::Int64 => v.is_i64(),
            Datatype::Fp16 => v.as_f64().is_some_and(|x| x.abs() <= 65504.0),
            Datatype::Fp32 => v.as_f64().is_some_and(|x| x.abs() <= f64::from(f32::MAX)),
            // JSON numbers the strict parse let through are finite.
            Datatype::Fp64 => v.is_number(),
            Datatype::Bytes => v.is_string(),
        }
    }
}

/// One tensor the model declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The tensor's name.
    pub name: String,
    /// Its datatype.
    pub datatype: Datatype,
    /// Its shape; `-1` is a variable dimension.
    pub shape: Vec<i64>,
}

/// What a model takes and gives: its metadata's `inputs` and `outputs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The inputs a request must carry, every one of them.
    pub inputs: Vec<TensorSpec>,
    /// The outputs it can return; empty when the metadata names none.
    pub outputs: Vec<TensorSpec>,
}

/// Why metadata could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataError(pub String);

impl fmt::Display for MetadataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MetadataError {}

impl Signature {
    /// Reads a model metadata response (`GET /v2/models/{name}`).
    pub fn from_metadata(metadata: &Value) -> Result<Signature, MetadataError> {
        let tensors = |field: &str, required: bool| -> Result<Vec<TensorSpec>, MetadataError> {
            let Some(list) = metadata.get(field) else {
                return if required {
                    Err(MetadataError(format!("the metadata has no `{field}`")))
                } else {
                    Ok(Vec::new())
                };
            };
            let list = list
                .as_array()
                .ok_or_else(|| MetadataError(format!("`{field}` is not an array")))?;
            list.iter()
                .enumerate()
                .map(|(i, t)| tensor_spec(t).map_err(|e| MetadataError(format!("{field}[{i}]: {e}"))))
                .collect()
        };
        let signature = Signature {
            inputs: tensors("inputs", true)?,
            outputs: tensors("outputs", false)?,
        };
        signature.check_names()?;
        Ok(signature)
    }

    /// Refuses metadata that names a tensor twice or declares none.
    pub fn check_names(&self) -> Result<(), MetadataError> {
        if self.inputs.is_empty() {
            return Err(MetadataError("the model declares no inputs".to_owned()));
        }
        for (kind, list) in [("input", &self.inputs), ("output", &self.outputs)] {
            for (i, t) in list.iter().enumerate() {
                if list[..i].iter().any(|u| u.name == t.name) {
                    return Err(MetadataError(format!("{kind} `{}` is declared twice", t.name)));
                }
            }
        }
        Ok(())
    }

    /// Checks an inference request's `inputs` and `outputs` against the
    /// signature; returns the batch size (the first dimension shared by
    /// inputs whose first dimension is variable), refused above `max_rows`.
    /// The error is the message for the caller.
    pub fn check(&self, request: &Value, max_rows: Option<u64>) -> Result<u64, String> {
        let inputs = request
            .get("inputs")
            .and_then(Value::as_array)
            .ok_or("`inputs` must be an array of tensors")?;
        let mut seen: Vec<bool> = vec![false; self.inputs.len()];
        let mut batch: Option<(u64, &str)> = None;
        for (index, tensor) in inputs.iter().enumerate() {
            let name = tensor
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("inputs[{index}] has no string `name`"))?;
            let Some(position) = self.inputs.iter().position(|s| s.name == name) else {
                return Err(format!(
                    "input `{name}` is not one of the model's inputs ({})",
                    self.names()
                ));
            };
            if std::mem::replace(&mut seen[position], true) {
                return Err(format!("input `{name}` is given twice"));
            }
            let spec = &self.inputs[position];
            let shape = check_tensor(spec, tensor)?;
            if spec.shape.first() == Some(&-1)
                && let Some(&rows) = shape.first()
            {
                match batch {
                    None => batch = Some((rows, &spec.name)),
                    Some((first, first_name)) if first != rows => {
                        return Err(format!(
                            "input `{name}` has {rows} rows but `{first_name}` has {first}; every input needs the same batch size"
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some(missing) = self.inputs.iter().zip(&seen).find(|(_, seen)| !**seen) {
            return Err(format!("input `{}` is missing", missing.0.name));
        }
        let rows = batch.map_or(1, |(rows, _)| rows);
        if let Some(max) = max_rows
            && rows > max
        {
            return Err(format!("{rows} rows exceed the model's limit of {max} per request"));
        }
        if let Some(outputs) = request.get("outputs") {
            let outputs = outputs.as_array().ok_or("`outputs` must be an array")?;
            for (i, o) in outputs.iter().enumerate() {
                let name = o
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("outputs[{i}] has no string `name`"))?;
                if !self.outputs.is_empty() && !self.outputs.iter().any(|s| s.name == name) {
                    return Err(format!("output `{name}` is not one of the model's outputs"));
                }
            }
        }
        Ok(rows)
    }

    fn names(&self) -> String {
        self.inputs
            .iter()
            .map(|s| format!("`{}`", s.name))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Reads one `$metadata_tensor`: `{"name", "datatype", "shape"}`.
pub fn tensor_spec(t: &Value) -> Result<TensorSpec, String> {
    let name = t.get("name").and_then(Value::as_str).ok_or("no string `name`")?;
    let datatype = t
        .get("datatype")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("`{name}` has no string `datatype`"))?;
    let datatype = Datatype::parse(datatype).ok_or_else(|| format!("`{name}` has unknown datatype `{datatype}`"))?;
    let shape = t
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("`{name}` has no `shape` array"))?
        .iter()
        .map(|d| d.as_i64().filter(|d| *d >= -1))
        .collect::<Option<Vec<i64>>>()
        .ok_or_else(|| format!("`{name}` has a shape dimension that is not an integer ≥ -1"))?;
    Ok(TensorSpec {
        name: name.to_owned(),
        datatype,
        shape,
    })
}

/// Checks one request tensor against its spec; returns its shape.
fn check_tensor(spec: &TensorSpec, tensor: &Value) -> Result<Vec<u64>, String> {
    let name = &spec.name;
    let datatype = tensor
        .get("datatype")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("input `{name}` has no string `datatype`"))?;
    if datatype != spec.datatype.as_str() {
        return Err(format!(
            "input `{name}` must have datatype {}, got {datatype}",
            spec.datatype.as_str()
        ));
    }
    let shape = tensor
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("input `{name}` has no `shape` array"))?
        .iter()
        .map(Value::as_u64)
        .collect::<Option<Vec<u64>>>()
        .ok_or_else(|| format!("input `{name}` has a shape dimension that is not a non-negative integer"))?;
    let fits = shape.len() == spec.shape.len()
        && shape
            .iter()
            .zip(&spec.shape)
            .all(|(&got, &want)| want == -1 || u64::try_from(want) == Ok(got));
    if !fits {
        return Err(format!(
            "input `{name}` must have shape {}, got {}",
            show_shape(&spec.shape),
            show_shape(&shape)
        ));
    }
    let expected = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("input `{name}` has a shape too large to hold"))?;
    let data = tensor
        .get("data")
        .ok_or_else(|| format!("input `{name}` has no `data`"))?;
    let mut count = 0u64;
    let mut bad: Option<&Value> = None;
    for_each_element(data, &mut |v| {
        count += 1;
        if bad.is_none() && !spec.datatype.holds(v) {
            bad = Some(v);
        }
    });
    if count != expected {
        return Err(format!(
            "input `{name}` has shape {} ({expected} elements) but {count} data values",
            show_shape(&shape)
        ));
    }
    if let Some(v) = bad {
        return Err(format!(
            "input `{name}` holds {} where {} values are expected",
            describe(v),
            spec.datatype.as_str()
        ));
    }
    Ok(shape)
}

/// Visits the elements of `data`, flat or nested in row-major order (both
/// are valid OIP JSON); a non-array `data` is one element.
fn for_each_element<'a>(data: &'a Value, visit: &mut impl FnMut(&'a Value)) {
    match data {
        Value::Array(items) => {
            for item in items {
                for_each_element(item, visit);
            }
        }
        other => visit(other),
    }
}

fn show_shape<T: fmt::Display>(shape: &[T]) -> String {
    let dims: Vec<String> = shape.iter().map(T::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// A short description of a wrong value, without echoing long strings.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(_) => "a string".to_owned(),
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}

/// Where a model's signature comes from.
#[derive(Debug)]
pub enum SignatureSource {
    /// Written in the configuration.
    Configured(Arc<Signature>),
    /// Fetched from the upstream's metadata on first use and kept until the
    /// configuration is reloaded. A failed fetch is not kept: the next
    /// request tries again.
    Upstream(tokio::sync::OnceCell<Arc<Signature>>),
}

/// A model's metadata settings (`models[].validation.metadata`).
#[derive(Debug)]
pub struct MetadataSettings {
    /// The signature, or where to find it.
    pub source: SignatureSource,
    /// The most rows (batch size) one request may carry.
    pub max_rows: Option<u64>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn signature() -> Signature {
        Signature::from_metadata(&json!({
            "name": "fraud",
            "versions": ["1"],
            "platform": "demo",
            "inputs": [
                {"name": "amount", "datatype": "FP64", "shape": [-1]},
                {"name": "country", "datatype": "BYTES", "shape": [-1]},
                {"name": "hour", "datatype": "INT32", "shape": [-1]},
                {"name": "embedding", "datatype": "FP32", "shape": [-1, 2]}
            ],
            "outputs": [{"name": "risk_score", "datatype": "FP32", "shape": [-1]}]
        }))
        .expect("valid metadata")
    }

    fn request(rows: usize) -> Value {
        json!({
            "inputs": [
                {"name": "amount", "datatype": "FP64", "shape": [rows], "data": vec![12.5; rows]},
                {"name": "country", "datatype": "BYTES", "shape": [rows], "data": vec!["US"; rows]},
                {"name": "hour", "datatype": "INT32", "shape": [rows], "data": vec![14; rows]},
                {"name": "embedding", "datatype": "FP32", "shape": [rows, 2], "data": vec![[0.5, 1.5]; rows]}
            ],
            "outputs": [{"name": "risk_score"}]
        })
    }

    #[test]
    fn a_request_that_matches_passes_with_its_batch_size() {
        assert_eq!(signature().check(&request(3), Some(10)), Ok(3));
    }

    #[test]
    fn each_mismatch_is_refused_with_its_reason() {
        let s = signature();
        let refuse = |edit: &dyn Fn(&mut Value), expected: &str| {
            let mut r = request(2);
            edit(&mut r);
            assert_eq!(s.check(&r, Some(10)), Err(expected.to_owned()), "{r}");
        };
        refuse(
            &|r| r["inputs"][0]["datatype"] = json!("FP32"),
            "input `amount` must have datatype FP64, got FP32",
        );
        refuse(
            &|r| r["inputs"][3]["shape"] = json!([2, 3]),
            "input `embedding` must have shape [-1, 2], got [2, 3]",
        );
        refuse(
            &|r| r["inputs"][2]["shape"] = json!([2, 1]),
            "input `hour` must have shape [-1], got [2, 1]",
        );
        refuse(
            &|r| r["inputs"][1]["data"] = json!(["US"]),
            "input `country` has shape [2] (2 elements) but 1 data values",
        );
        refuse(
            &|r| r["inputs"][2]["data"] = json!([14, 3_000_000_000_i64]),
            "input `hour` holds 3000000000 where INT32 values are expected",
        );
        refuse(
            &|r| r["inputs"][2]["data"] = json!([14, 2.5]),
            "input `hour` holds 2.5 where INT32 values are expected",
        );
        refuse(
            &|r| r["inputs"][3]["data"] = json!([[0.5, 1e300], [1, 2]]),
            "input `embedding` holds 1e+300 where FP32 values are expected",
        );
        refuse(
            &|r| r["inputs"][1]["data"] = json!(["US", 7]),
            "input `country` holds 7 where BYTES values are expected",
        );
        refuse(
            &|r| {
                r["inputs"][0]["shape"] = json!([3]);
                r["inputs"][0]["data"] = json!([1, 2, 3]);
            },
            "input `country` has 2 rows but `amount` has 3; every input needs the same batch size",
        );
        refuse(
            &|r| {
                r["inputs"].as_array_mut().expect("array").remove(2);
            },
            "input `hour` is missing",
        );
        refuse(
            &|r| r["inputs"][2]["name"] = json!("minute"),
            "input `minute` is not one of the model's inputs (`amount`, `country`, `hour`, `embedding`)",
        );
        refuse(
            &|r| r["inputs"][2]["name"] = json!("amount"),
            "input `amount` is given twice",
        );
        refuse(
            &|r| r["outputs"][0]["name"] = json!("weights"),
            "output `weights` is not one of the model's outputs",
        );
        refuse(&|r| r["inputs"] = json!({}), "`inputs` must be an array of tensors");
    }

    #[test]
    fn the_batch_size_is_capped() {
        assert_eq!(
            signature().check(&request(11), Some(10)),
            Err("11 rows exceed the model's limit of 10 per request".to_owned())
        );
        assert_eq!(signature().check(&request(11), None), Ok(11));
    }

    #[test]
    fn flat_and_nested_data_count_the_same() {
        let mut r = request(2);
        r["inputs"][3]["data"] = json!([0.5, 1.5, 0.5, 1.5]);
        assert_eq!(signature().check(&r, None), Ok(2));
    }

    #[test]
    fn metadata_that_cannot_describe_a_model_is_refused() {
        let bad = |m: Value, why: &str| assert_eq!(Signature::from_metadata(&m), Err(MetadataError(why.to_owned())));
        bad(json!({"name": "m"}), "the metadata has no `inputs`");
        bad(json!({"inputs": []}), "the model declares no inputs");
        bad(
            json!({"inputs": [{"name": "x", "datatype": "FP128", "shape": [1]}]}),
            "inputs[0]: `x` has unknown datatype `FP128`",
        );
        bad(
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-2]}]}),
            "inputs[0]: `x` has a shape dimension that is not an integer ≥ -1",
        );
        bad(
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}, {"name": "x", "datatype": "FP32", "shape": [1]}]}),
            "input `x` is declared twice",
        );
    }
}
