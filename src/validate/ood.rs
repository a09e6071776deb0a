//! Out-of-distribution (OOD) detection for tabular models.
//!
//! A [`Profile`] summarises a sample of legitimate inputs of a tabular model (for the demo, the
//! card transactions [`crate::demo::fraud`] scores) so that the gateway can tell, cheaply and per
//! row, whether a request looks like the data the model was built for:
//!
//! * every **numeric** feature keeps its range, mean, standard deviation and quantiles (p0.1, p1,
//!   p50, p99, p99.9); a value outside the accepted range `[lower, upper]` (by default the
//!   sample's `[min, max]`), a non-integer where the sample only had integers, and NaN or
//!   infinity are hard violations;
//! * every **categorical** feature (strings and booleans) keeps its vocabulary with frequencies;
//!   a value never seen in the sample is a hard violation;
//! * the numeric features together keep a mean vector and covariance matrix, regularised by a
//!   small ridge so that a singular covariance still factors, and the Cholesky factor of the
//!   regularised matrix. The Mahalanobis distance of a row catches rows whose features are each
//!   in range but jointly unusual. The distances of the sample rows calibrate the threshold:
//!   by default the sample's p99.9 distance times a margin ([`DEFAULT_THRESHOLD_MARGIN`]).
//!   Strongly right-skewed non-negative features (amounts) enter the joint model as
//!   `ln(1 + x)` (see [`Transform`]).
//!
//! [`Profile::score_row`] scores one row, [`Profile::score_oip`] every row of an Open Inference
//! Protocol v2 `inputs` array (one tensor per feature, `shape[0]` rows). Scoring allocates nothing
//! per feature beyond the names it reports, and never panics on hostile input: NaN and infinity
//! are out of distribution, malformed tensors are typed [`OodError`]s.
//!
//! Profiles are built from rows ([`build_profile`]) or from a CSV or JSONL sample file
//! ([`build_from_file`], behind `warden profile build`), and stored as versioned JSON
//! ([`PROFILE_VERSION`]). `examples/profiles/` ships the demo fraud model's profile.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Version of the profile JSON format this build reads and writes.
pub const PROFILE_VERSION: u32 = 1;
/// Most numeric features a profile may have (they form the joint Mahalanobis model).
pub const MAX_NUMERIC_FEATURES: usize = 32;
/// Most features, numeric and categorical, a profile may have.
pub const MAX_FEATURES: usize = 1024;
/// Default ridge, relative to each feature's variance, added to the covariance diagonal.
pub const DEFAULT_RIDGE: f64 = 1e-3;
/// Default factor applied to the sample's p99.9 Mahalanobis distance to get the threshold.
pub const DEFAULT_THRESHOLD_MARGIN: f64 = 1.25;
/// Default cap on the distinct values of a categorical feature.
pub const DEFAULT_MAX_VOCABULARY: usize = 10_000;

// ---------------------------------------------------------------------------------------------
// Rows and schemas
// ---------------------------------------------------------------------------------------------

/// One value of a row. Readers produce owned cells; [`Profile::score_oip`] borrows from the
/// request. An empty or whitespace-only [`Cell::Text`] counts as missing.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell<'a> {
    /// No value (empty CSV field, JSON `null` or absent key).
    Missing,
    /// A number; for numeric features it is used as is, for categorical ones its text form
    /// (integers without a fraction: `7`, not `7.0`) is looked up in the vocabulary.
    Number(f64),
    /// A boolean; categorical, looked up as `"true"` / `"false"`.
    Bool(bool),
    /// Text; parsed as a number for numeric features (CSV fields are text).
    Text(Cow<'a, str>),
}

impl<'a> From<&'a str> for Cell<'a> {
    fn from(value: &'a str) -> Self {
        Cell::Text(Cow::Borrowed(value))
    }
}

impl From<String> for Cell<'static> {
    fn from(value: String) -> Self {
        Cell::Text(Cow::Owned(value))
    }
}

impl From<f64> for Cell<'static> {
    fn from(value: f64) -> Self {
        Cell::Number(value)
    }
}

impl From<i64> for Cell<'static> {
    fn from(value: i64) -> Self {
        Cell::Number(value as f64)
    }
}

impl From<bool> for Cell<'static> {
    fn from(value: bool) -> Self {
        Cell::Bool(value)
    }
}

/// A row: one cell per feature, in schema (or profile) order.
pub type Row<'a> = Vec<Cell<'a>>;

/// Whether a feature is numeric or categorical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureKind {
    Numeric,
    Categorical,
}

/// How a numeric feature enters the joint (Mahalanobis) model. Ranges and quantiles are always
/// kept in the feature's own units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// The value itself.
    #[default]
    Identity,
    /// `sign(x) · ln(1 + |x|)`: for right-skewed, non-negative features such as amounts.
    Log1p,
}

impl Transform {
    /// Applies the transform; finite in, finite out.
    pub fn apply(self, x: f64) -> f64 {
        match self {
            Transform::Identity => x,
            Transform::Log1p => x.abs().ln_1p().copysign(x),
        }
    }
}

/// One feature of a schema. `kind: None` infers the kind from the sample: numeric when every
/// value is a number, categorical otherwise (booleans are categorical). `transform: None` picks
/// [`Transform::Log1p`] for a non-negative feature with sample skewness above 1 that the
/// logarithm makes more symmetric (see [`ProfileOptions::auto_log_transform`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureSpec {
    pub name: String,
    pub kind: Option<FeatureKind>,
    pub transform: Option<Transform>,
}

impl FeatureSpec {
    /// A feature whose kind is inferred.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: None,
            transform: None,
        }
    }

    /// A numeric feature.
    pub fn numeric(name: impl Into<String>) -> Self {
        Self {
            kind: Some(FeatureKind::Numeric),
            ..Self::new(name)
        }
    }

    /// A categorical feature.
    pub fn categorical(name: impl Into<String>) -> Self {
        Self {
            kind: Some(FeatureKind::Categorical),
            ..Self::new(name)
        }
    }

    /// The same feature with a fixed transform.
    pub fn with_transform(mut self, transform: Transform) -> Self {
        self.transform = Some(transform);
        self
    }
}

// ---------------------------------------------------------------------------------------------
// The profile
// ---------------------------------------------------------------------------------------------

/// Five quantiles of a numeric feature (linear interpolation between order statistics).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    #[serde(rename = "p0.1")]
    pub p0_1: f64,
    pub p1: f64,
    pub p50: f64,
    pub p99: f64,
    #[serde(rename = "p99.9")]
    pub p99_9: f64,
}

/// Statistics of a numeric feature, in the feature's own units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NumericProfile {
    pub name: String,
    /// Sample rows with a value.
    pub count: u64,
    /// Sample rows without one. When zero, a missing value is a violation.
    pub missing: u64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// Sample standard deviation (`n - 1` denominator).
    pub std_dev: f64,
    pub quantiles: Quantiles,
    /// Every sample value was an integer: a value with a fraction is a violation.
    pub integral: bool,
    /// Accepted range; a value outside it is a violation. `[min, max]` unless the profile was
    /// built with a range tolerance.
    pub lower: f64,
    pub upper: f64,
    /// How the feature enters the joint model.
    pub transform: Transform,
}

impl NumericProfile {
    /// Whether `x` is within the accepted range (and integral if the sample was).
    fn accepts(&self, x: f64) -> bool {
        x.is_finite() && x >= self.lower && x <= self.upper && (!self.integral || x.fract() == 0.0)
    }
}

/// Count and relative frequency of one category.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Category {
    pub count: u64,
    /// `count` over the feature's present values.
    pub frequency: f64,
}

/// Statistics of a categorical feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoricalProfile {
    pub name: String,
    pub count: u64,
    pub missing: u64,
    /// Every sample value was a boolean: text values compare case-insensitively with
    /// `true`/`false`.
    pub boolean: bool,
    pub vocabulary: BTreeMap<String, Category>,
}

/// One feature of a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FeatureProfile {
    Numeric(NumericProfile),
    Categorical(CategoricalProfile),
}

impl FeatureProfile {
    pub fn name(&self) -> &str {
        match self {
            FeatureProfile::Numeric(f) => &f.name,
            FeatureProfile::Categorical(f) => &f.name,
        }
    }

    pub fn kind(&self) -> FeatureKind {
        match self {
            FeatureProfile::Numeric(_) => FeatureKind::Numeric,
            FeatureProfile::Categorical(_) => FeatureKind::Categorical,
        }
    }
}

/// Quantiles of the Mahalanobis distances of the sample rows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Distances {
    pub p50: f64,
    pub p99: f64,
    #[serde(rename = "p99.9")]
    pub p99_9: f64,
    pub max: f64,
}

/// The joint model of the numeric features (after their transforms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JointProfile {
    /// The numeric features, in profile order.
    pub features: Vec<String>,
    /// Sample rows in which every numeric feature was present (the rows the model is fit on).
    pub rows: u64,
    pub mean: Vec<f64>,
    /// Sample covariance (`n - 1` denominator).
    pub covariance: Vec<Vec<f64>>,
    /// Ridge added to the diagonal, relative to each variance (1 for a constant feature).
    pub ridge: f64,
    /// Lower-triangular Cholesky factor `L` of the regularised covariance, row `i` holding
    /// `L[i][0..=i]`. Scoring solves `L y = x - mean`; the distance is `|y|`.
    pub cholesky: Vec<Vec<f64>>,
    pub distances: Distances,
}

/// A versioned profile of a model's legitimate inputs. Deserialising checks it (dimensions,
/// finiteness, a positive Cholesky diagonal), so a loaded profile scores without panicking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ProfileData")]
pub struct Profile {
    version: u32,
    sample_rows: u64,
    features: Vec<FeatureProfile>,
    joint: Option<JointProfile>,
    threshold: f64,
}

/// The unchecked form of [`Profile`], as read from JSON.
#[derive(Deserialize)]
struct ProfileData {
    version: u32,
    sample_rows: u64,
    features: Vec<FeatureProfile>,
    joint: Option<JointProfile>,
    threshold: f64,
}

impl TryFrom<ProfileData> for Profile {
    type Error = String;

    fn try_from(data: ProfileData) -> Result<Self, String> {
        let profile = Profile {
            version: data.version,
            sample_rows: data.sample_rows,
            features: data.features,
            joint: data.joint,
            threshold: data.threshold,
        };
        profile.check()?;
        Ok(profile)
    }
}

/// How one row compares with the profile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RowScore {
    /// Mahalanobis distance of the numeric features (0 without a joint model). Missing and
    /// non-finite values count as the mean (they are reported as violations instead); capped
    /// at `f64::MAX`.
    pub mahalanobis: f64,
    /// Numeric features whose value is outside the accepted range, not integral where the
    /// sample was, not finite, or not a number at all.
    pub out_of_range: Vec<String>,
    /// Categorical features whose value is not in the vocabulary.
    pub unknown_categories: Vec<String>,
    /// Features without a value that the sample always had.
    pub missing: Vec<String>,
    /// `mahalanobis / threshold`, raised to at least 1 by any hard violation above.
    pub score: f64,
    /// `score >= 1`.
    pub out_of_distribution: bool,
}

impl RowScore {
    /// Whether any feature broke a hard rule (range, vocabulary, missing).
    pub fn has_violation(&self) -> bool {
        !(self.out_of_range.is_empty() && self.unknown_categories.is_empty() && self.missing.is_empty())
    }
}

impl Profile {
    /// Parses and checks a profile.
    pub fn from_json(json: &str) -> Result<Self, ProfileError> {
        serde_json::from_str(json).map_err(|e| ProfileError::InvalidProfile(e.to_string()))
    }

    /// Reads and checks a profile file.
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let json = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&json)
    }

    /// The profile as pretty-printed JSON, with a trailing newline.
    pub fn to_json(&self) -> Result<String, ProfileError> {
        let mut json = serde_json::to_string_pretty(self).map_err(|e| ProfileError::InvalidProfile(e.to_string()))?;
        json.push('\n');
        Ok(json)
    }

    /// Writes the profile as JSON to `path`.
    pub fn save(&self, path: &Path) -> Result<(), ProfileError> {
        std::fs::write(path, self.to_json()?).map_err(|source| ProfileError::Io {
            path: path.to_owned(),
            source,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Rows in the sample the profile was built from.
    pub fn sample_rows(&self) -> u64 {
        self.sample_rows
    }

    /// The features, in the order [`Profile::score_row`] expects cells.
    pub fn features(&self) -> &[FeatureProfile] {
        &self.features
    }

    pub fn feature(&self, name: &str) -> Option<&FeatureProfile> {
        self.features.iter().find(|f| f.name() == name)
    }

    pub fn joint(&self) -> Option<&JointProfile> {
        self.joint.as_ref()
    }

    /// Mahalanobis distance at which a row is out of distribution.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Overrides the threshold (a finite distance > 0).
    pub fn set_threshold(&mut self, threshold: f64) -> Result<(), OodError> {
        if !(threshold.is_finite() && threshold > 0.0) {
            return Err(OodError::InvalidThreshold(threshold));
        }
        self.threshold = threshold;
        Ok(())
    }

    /// The profile with another threshold.
    pub fn with_threshold(mut self, threshold: f64) -> Result<Self, OodError> {
        self.set_threshold(threshold)?;
        Ok(self)
    }

    /// Scores one row, given one cell per feature in [`Profile::features`] order (absent
    /// trailing cells count as missing, extra ones are ignored).
    pub fn score_row(&self, row: &[Cell<'_>]) -> RowScore {
        static MISSING: Cell<'static> = Cell::Missing;
        let mut delta = [0.0_f64; MAX_NUMERIC_FEATURES];
        let mut numeric = 0;
        let mut score = RowScore {
            mahalanobis: 0.0,
            out_of_range: Vec::new(),
            unknown_categories: Vec::new(),
            missing: Vec::new(),
            score: 0.0,
            out_of_distribution: false,
        };
        for (index, feature) in self.features.iter().enumerate() {
            let cell = row.get(index).unwrap_or(&MISSING);
            match feature {
                FeatureProfile::Numeric(f) => {
                    match numeric_value(cell) {
                        Some(Some(x)) => {
                            if !f.accepts(x) {
                                score.out_of_range.push(f.name.clone());
                            }
                            let mean = self.joint.as_ref().and_then(|j| j.mean.get(numeric));
                            if let (true, Some(mean), Some(slot)) = (x.is_finite(), mean, delta.get_mut(numeric)) {
                                *slot = f.transform.apply(x) - mean;
                            }
                        }
                        Some(None) => score.out_of_range.push(f.name.clone()),
                        None if f.missing == 0 => score.missing.push(f.name.clone()),
                        None => {}
                    }
                    numeric += 1;
                }
                FeatureProfile::Categorical(f) => match category_known(f, cell) {
                    Some(true) => {}
                    Some(false) => score.unknown_categories.push(f.name.clone()),
                    None if f.missing == 0 => score.missing.push(f.name.clone()),
                    None => {}
                },
            }
        }
        if let Some(joint) = &self.joint {
            let k = joint.cholesky.len().min(MAX_NUMERIC_FEATURES);
            score.mahalanobis = forward_distance(&joint.cholesky, &mut delta[..k]);
        }
        let mut combined = score.mahalanobis / self.threshold;
        if !combined.is_finite() {
            combined = f64::MAX;
        }
        if score.has_violation() {
            combined = combined.max(1.0);
        }
        score.score = combined;
        score.out_of_distribution = combined >= 1.0;
        score
    }

    /// Scores every row of an OIP v2 request's `inputs` array. Each profiled feature must be one
    /// tensor, found by name, of shape `[N]` (or `[N, 1, ...]`) holding `N` flat values; tensors
    /// the profile does not know are ignored. Numeric features take FP16/FP32/FP64, INT* and
    /// UINT* tensors (FP values may also be the strings `"NaN"`, `"Infinity"`, `"-Infinity"`,
    /// which score as out of distribution); categorical ones take BYTES or integer tensors,
    /// boolean ones BOOL or BYTES.
    pub fn score_oip(&self, inputs: &Value) -> Result<Vec<RowScore>, OodError> {
        let tensors = inputs.as_array().ok_or(OodError::NotAnArray)?;
        let mut columns: Vec<Option<OipColumn<'_>>> = vec![None; self.features.len()];
        for (index, tensor) in tensors.iter().enumerate() {
            let object = tensor.as_object().ok_or(OodError::BadTensor {
                index,
                reason: "is not an object",
            })?;
            let name = object.get("name").and_then(Value::as_str).ok_or(OodError::BadTensor {
                index,
                reason: "has no string `name`",
            })?;
            let Some(position) = self.features.iter().position(|f| f.name() == name) else {
                continue;
            };
            let (Some(feature), Some(slot)) = (self.features.get(position), columns.get_mut(position)) else {
                continue;
            };
            let column = OipColumn::parse(name, object, feature)?;
            if slot.replace(column).is_some() {
                return Err(OodError::DuplicateTensor(name.to_owned()));
            }
        }
        let mut rows: Option<(usize, &str)> = None;
        let mut resolved = Vec::with_capacity(columns.len());
        for (feature, column) in self.features.iter().zip(columns) {
            let column = column.ok_or_else(|| OodError::MissingTensor(feature.name().to_owned()))?;
            let n = column.data.len();
            match rows {
                None => rows = Some((n, column.name)),
                Some((first_rows, first)) if first_rows != n => {
                    return Err(OodError::RowCountMismatch {
                        name: column.name.to_owned(),
                        rows: n,
                        first: first.to_owned(),
                        first_rows,
                    });
                }
                Some(_) => {}
            }
            resolved.push(column);
        }
        let n = rows.map_or(0, |(n, _)| n);
        let mut cells: Vec<Cell<'_>> = Vec::with_capacity(resolved.len());
        let mut scores = Vec::with_capacity(n);
        for row in 0..n {
            cells.clear();
            for column in &resolved {
                cells.push(column.cell(row)?);
            }
            scores.push(self.score_row(&cells));
        }
        Ok(scores)
    }

    /// Checks everything scoring relies on.
    fn check(&self) -> Result<(), String> {
        if self.version != PROFILE_VERSION {
            return Err(format!(
                "unsupported profile version {}; this build reads version {PROFILE_VERSION}",
                self.version
            ));
        }
        if self.features.is_empty() {
            return Err("the profile has no features".to_owned());
        }
        if self.features.len() > MAX_FEATURES {
            return Err(format!("the profile has more than {MAX_FEATURES} features"));
        }
        let mut names = HashSet::new();
        let mut numeric_names = Vec::new();
        for feature in &self.features {
            let name = feature.name();
            if !names.insert(name) {
                return Err(format!("feature `{name}` appears more than once"));
            }
            match feature {
                FeatureProfile::Numeric(f) => {
                    let q = &f.quantiles;
                    let values = [
                        f.min, f.max, f.mean, f.std_dev, q.p0_1, q.p1, q.p50, q.p99, q.p99_9, f.lower, f.upper,
                    ];
                    if !values.iter().all(|v| v.is_finite()) {
                        return Err(format!("feature `{name}` has a statistic that is not a finite number"));
                    }
                    if f.lower > f.upper {
                        return Err(format!("feature `{name}` has lower > upper"));
                    }
                    numeric_names.push(name);
                }
                FeatureProfile::Categorical(f) => {
                    if !f.vocabulary.values().all(|c| c.frequency.is_finite()) {
                        return Err(format!("feature `{name}` has a frequency that is not a finite number"));
                    }
                }
            }
        }
        let k = numeric_names.len();
        if k > MAX_NUMERIC_FEATURES {
            return Err(format!(
                "the profile has {k} numeric features; at most {MAX_NUMERIC_FEATURES} are supported"
            ));
        }
        if let Some(joint) = &self.joint {
            if joint
                .features
                .iter()
                .map(String::as_str)
                .ne(numeric_names.iter().copied())
            {
                return Err("`joint.features` must list the numeric features in profile order".to_owned());
            }
            let square = joint.covariance.len() == k && joint.covariance.iter().all(|row| row.len() == k);
            if joint.mean.len() != k || !square {
                return Err(format!(
                    "`joint.mean` and `joint.covariance` must be {k} long and {k}x{k}"
                ));
            }
            let triangular =
                joint.cholesky.len() == k && joint.cholesky.iter().enumerate().all(|(i, row)| row.len() == i + 1);
            if !triangular {
                return Err(format!(
                    "`joint.cholesky` must have {k} rows, row i holding i + 1 values"
                ));
            }
            let d = &joint.distances;
            let finite = joint
                .mean
                .iter()
                .chain(joint.covariance.iter().flatten())
                .chain(joint.cholesky.iter().flatten())
                .chain(&[joint.ridge, d.p50, d.p99, d.p99_9, d.max])
                .all(|v| v.is_finite());
            if !finite {
                return Err("the joint model has a value that is not a finite number".to_owned());
            }
            if !joint.cholesky.iter().all(|row| row.last().is_some_and(|d| *d > 0.0)) {
                return Err("`joint.cholesky` must have a positive diagonal".to_owned());
            }
        }
        if !(self.threshold.is_finite() && self.threshold > 0.0) {
            return Err(format!("threshold must be a finite number > 0, got {}", self.threshold));
        }
        Ok(())
    }
}

/// `None`: missing; `Some(None)`: present but not a number; `Some(Some(x))`: a number.
fn numeric_value(cell: &Cell<'_>) -> Option<Option<f64>> {
    match cell {
        Cell::Missing => None,
        Cell::Number(x) => Some(Some(*x)),
        Cell::Bool(_) => Some(None),
        Cell::Text(text) => {
            let text = text.trim();
            if text.is_empty() {
                None
            } else {
                Some(text.parse::<f64>().ok())
            }
        }
    }
}

/// `None`: missing; otherwise whether the value is in the vocabulary.
fn category_known(feature: &CategoricalProfile, cell: &Cell<'_>) -> Option<bool> {
    let known = |key: &str| feature.vocabulary.contains_key(key);
    match cell {
        Cell::Missing => None,
        Cell::Text(text) if text.trim().is_empty() => None,
        Cell::Text(text) if feature.boolean => Some(parse_bool(text).is_some_and(|b| known(bool_str(b)))),
        Cell::Text(text) => Some(known(text)),
        Cell::Bool(b) => Some(known(bool_str(*b))),
        Cell::Number(x) => {
            let mut key = StackStr::default();
            Some(write_number(*x, &mut key).is_ok() && known(key.as_str()))
        }
    }
}

/// Solves `L y = delta` in place and returns `|y|`, capped at `f64::MAX` (NaN included).
fn forward_distance(cholesky: &[Vec<f64>], delta: &mut [f64]) -> f64 {
    let mut sum = 0.0;
    for (i, row) in cholesky.iter().enumerate().take(delta.len()) {
        let (solved, rest) = delta.split_at_mut(i);
        let (Some((diag, off)), Some(value)) = (row.split_last(), rest.first_mut()) else {
            break;
        };
        let dot: f64 = off.iter().zip(solved.iter()).map(|(l, y)| l * y).sum();
        *value = (*value - dot) / diag;
        sum += *value * *value;
    }
    let distance = sum.sqrt();
    if distance <= f64::MAX { distance } else { f64::MAX }
}

fn parse_bool(text: &str) -> Option<bool> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("true") {
        Some(true)
    } else if text.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

fn bool_str(value: bool) -> &'static str {
    if value { "true" } else { "false" }
}

/// The text form of a number used as a category: integers without a fraction.
fn write_number(x: f64, out: &mut impl fmt::Write) -> fmt::Result {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 9.0e15 {
        write!(out, "{}", x as i64)
    } else {
        write!(out, "{x}")
    }
}

/// A small string on the stack, for looking numbers up in a vocabulary without allocating.
struct StackStr {
    buf: [u8; 48],
    len: usize,
}

impl Default for StackStr {
    fn default() -> Self {
        Self { buf: [0; 48], len: 0 }
    }
}

impl StackStr {
    fn as_str(&self) -> &str {
        self.buf
            .get(..self.len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or_default()
    }
}

impl fmt::Write for StackStr {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        let slot = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// OIP v2 tensors
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Datatype {
    Bool,
    Uint(u64),
    Int(i64, i64),
    Fp16,
    Fp32,
    Fp64,
    Bytes,
}

impl Datatype {
    fn parse(datatype: &str) -> Option<Self> {
        Some(match datatype {
            "BOOL" => Datatype::Bool,
            "UINT8" => Datatype::Uint(u8::MAX.into()),
            "UINT16" => Datatype::Uint(u16::MAX.into()),
            "UINT32" => Datatype::Uint(u32::MAX.into()),
            "UINT64" => Datatype::Uint(u64::MAX),
            "INT8" => Datatype::Int(i8::MIN.into(), i8::MAX.into()),
            "INT16" => Datatype::Int(i16::MIN.into(), i16::MAX.into()),
            "INT32" => Datatype::Int(i32::MIN.into(), i32::MAX.into()),
            "INT64" => Datatype::Int(i64::MIN, i64::MAX),
            "FP16" => Datatype::Fp16,
            "FP32" => Datatype::Fp32,
            "FP64" => Datatype::Fp64,
            "BYTES" => Datatype::Bytes,
            _ => return None,
        })
    }

    fn is_numeric(self) -> bool {
        matches!(
            self,
            Datatype::Uint(_) | Datatype::Int(..) | Datatype::Fp16 | Datatype::Fp32 | Datatype::Fp64
        )
    }

    fn element(self) -> &'static str {
        match self {
            Datatype::Bool => "a boolean",
            Datatype::Uint(_) | Datatype::Int(..) => "an integer within the datatype's range",
            Datatype::Fp16 | Datatype::Fp32 | Datatype::Fp64 => "a number (or \"NaN\", \"Infinity\", \"-Infinity\")",
            Datatype::Bytes => "a string",
        }
    }

    fn decode(self, value: &Value) -> Option<Cell<'_>> {
        match self {
            Datatype::Bool => value.as_bool().map(Cell::Bool),
            Datatype::Uint(max) => value.as_u64().filter(|v| *v <= max).map(|v| Cell::Number(v as f64)),
            Datatype::Int(min, max) => value
                .as_i64()
                .filter(|v| (min..=max).contains(v))
                .map(|v| Cell::Number(v as f64)),
            Datatype::Fp16 | Datatype::Fp32 | Datatype::Fp64 => {
                let x = match value {
                    Value::Number(n) => n.as_f64()?,
                    Value::String(s) => special_float(s)?,
                    _ => return None,
                };
                let overflows = match self {
                    Datatype::Fp16 => x.abs() >= 65_520.0,
                    Datatype::Fp32 => (x as f32).is_infinite(),
                    _ => false,
                };
                Some(Cell::Number(if overflows && x.is_finite() {
                    f64::INFINITY.copysign(x)
                } else {
                    x
                }))
            }
            Datatype::Bytes => value.as_str().map(|s| Cell::Text(Cow::Borrowed(s))),
        }
    }
}

fn special_float(text: &str) -> Option<f64> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let x = if rest.eq_ignore_ascii_case("nan") {
        f64::NAN
    } else if rest.eq_ignore_ascii_case("inf") || rest.eq_ignore_ascii_case("infinity") {
        f64::INFINITY
    } else {
        return None;
    };
    Some(if negative { -x } else { x })
}

/// One profiled feature's tensor, checked but not yet decoded.
#[derive(Clone, Copy)]
struct OipColumn<'v> {
    name: &'v str,
    datatype: Datatype,
    data: &'v [Value],
}

impl<'v> OipColumn<'v> {
    fn parse(name: &'v str, tensor: &'v Map<String, Value>, feature: &FeatureProfile) -> Result<Self, OodError> {
        let bad = |reason| OodError::BadInput {
            name: name.to_owned(),
            reason,
        };
        let datatype_name = tensor
            .get("datatype")
            .and_then(Value::as_str)
            .ok_or(bad("has no string `datatype`"))?;
        let expected = match feature {
            FeatureProfile::Numeric(_) => "a numeric datatype (FP16, FP32, FP64, INT*, UINT*)",
            FeatureProfile::Categorical(f) if f.boolean => "BOOL or BYTES",
            FeatureProfile::Categorical(_) => "BYTES or an integer datatype (INT*, UINT*)",
        };
        let wrong = || OodError::WrongDatatype {
            name: name.to_owned(),
            datatype: datatype_name.chars().take(32).collect(),
            expected,
        };
        let datatype = Datatype::parse(datatype_name).ok_or_else(wrong)?;
        let fits = match feature {
            FeatureProfile::Numeric(_) => datatype.is_numeric(),
            FeatureProfile::Categorical(f) if f.boolean => matches!(datatype, Datatype::Bool | Datatype::Bytes),
            FeatureProfile::Categorical(_) => {
                matches!(datatype, Datatype::Bytes | Datatype::Uint(_) | Datatype::Int(..))
            }
        };
        if !fits {
            return Err(wrong());
        }
        let shape = tensor
            .get("shape")
            .and_then(Value::as_array)
            .ok_or(bad("has no `shape` array"))?;
        let (first, rest) = shape
            .split_first()
            .ok_or(bad("has an empty shape; expected [N] or [N, 1]"))?;
        let rows = first
            .as_u64()
            .ok_or(bad("has a shape whose first dimension is not an integer >= 0"))?;
        if rest.iter().any(|d| d.as_u64() != Some(1)) {
            return Err(bad("must have shape [N] or [N, 1]: one column per feature"));
        }
        let data = tensor
            .get("data")
            .and_then(Value::as_array)
            .ok_or(bad("has no `data` array"))?;
        if u64::try_from(data.len()).ok() != Some(rows) {
            return Err(OodError::DataLength {
                name: name.to_owned(),
                rows,
                values: data.len(),
            });
        }
        Ok(Self { name, datatype, data })
    }

    fn cell(&self, row: usize) -> Result<Cell<'v>, OodError> {
        self.data
            .get(row)
            .and_then(|value| self.datatype.decode(value))
            .ok_or_else(|| OodError::BadElement {
                name: self.name.to_owned(),
                index: row,
                expected: self.datatype.element(),
            })
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a profile could not be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid CSV sample: {message}")]
    Csv { line: Option<u64>, message: String },
    #[error("invalid JSONL sample, line {line}: {message}")]
    Jsonl { line: u64, message: String },
    #[error("cannot tell the format of {}: name it .csv, .jsonl or .ndjson", .0.display())]
    UnknownFormat(PathBuf),
    #[error("the sample has no rows")]
    EmptySample,
    #[error("no features to profile")]
    NoFeatures,
    #[error("{count} features; a profile supports at most {limit}")]
    TooManyFeatures { count: usize, limit: usize },
    #[error(
        "{count} numeric features; the joint model supports at most {limit}: mark some categorical or leave them out"
    )]
    TooManyNumericFeatures { count: usize, limit: usize },
    #[error("feature `{0}` is given more than once")]
    DuplicateFeature(String),
    #[error("feature `{0}` is not in the sample")]
    UnknownFeature(String),
    #[error("row {row} has {got} values but the schema has {expected} features")]
    RowWidth { row: u64, expected: usize, got: usize },
    #[error("feature `{feature}`, row {row}: {value:?} is not a number")]
    NotNumeric { feature: String, row: u64, value: String },
    #[error("feature `{feature}`, row {row}: {value} is not a finite number")]
    NonFinite { feature: String, row: u64, value: f64 },
    #[error("feature `{0}` has no values in the sample")]
    EmptyFeature(String),
    #[error("feature `{feature}` has more than {limit} distinct values; leave it out or raise the vocabulary limit")]
    VocabularyTooLarge { feature: String, limit: usize },
    #[error("no sample row has every numeric feature present")]
    NoCompleteRows,
    #[error("the covariance of the numeric features is not positive definite with ridge {ridge}; raise the ridge")]
    NotPositiveDefinite { ridge: f64 },
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("invalid profile: {0}")]
    InvalidProfile(String),
}

impl From<Infallible> for ProfileError {
    fn from(never: Infallible) -> Self {
        match never {}
    }
}

/// Why an OIP `inputs` array could not be scored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OodError {
    #[error("`inputs` must be an array of tensors")]
    NotAnArray,
    #[error("input {index} {reason}")]
    BadTensor { index: usize, reason: &'static str },
    #[error("input `{name}` {reason}")]
    BadInput { name: String, reason: &'static str },
    #[error("missing input `{0}`")]
    MissingTensor(String),
    #[error("input `{0}` is given more than once")]
    DuplicateTensor(String),
    #[error("input `{name}` has datatype {datatype:?}; the profile expects {expected}")]
    WrongDatatype {
        name: String,
        datatype: String,
        expected: &'static str,
    },
    #[error("input `{name}` has {rows} rows but {values} data values")]
    DataLength { name: String, rows: u64, values: usize },
    #[error("input `{name}` has {rows} rows but input `{first}` has {first_rows}")]
    RowCountMismatch {
        name: String,
        rows: usize,
        first: String,
        first_rows: usize,
    },
    #[error("input `{name}`: element {index} must be {expected}")]
    BadElement {
        name: String,
        index: usize,
        expected: &'static str,
    },
    #[error("threshold must be a finite number > 0, got {0}")]
    InvalidThreshold(f64),
}

// ---------------------------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------------------------

/// Settings of the statistics (as opposed to how the sample is read).
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileOptions {
    /// Ridge added to the covariance diagonal, relative to each variance. `>= 0`.
    pub ridge: f64,
    /// Threshold = sample p99.9 Mahalanobis distance × margin (at least `sqrt(k)` for `k`
    /// numeric features). `> 0`.
    pub threshold_margin: f64,
    /// A fixed threshold instead.
    pub threshold: Option<f64>,
    /// Widens each numeric feature's accepted range by this fraction of `max - min` on both
    /// sides. `>= 0`; 0 accepts exactly the sample's range.
    pub range_tolerance: f64,
    /// Most distinct values of a categorical feature.
    pub max_vocabulary: usize,
    /// Pick [`Transform::Log1p`] for skewed features whose spec leaves the transform open.
    pub auto_log_transform: bool,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        Self {
            ridge: DEFAULT_RIDGE,
            threshold_margin: DEFAULT_THRESHOLD_MARGIN,
            threshold: None,
            range_tolerance: 0.0,
            max_vocabulary: DEFAULT_MAX_VOCABULARY,
            auto_log_transform: true,
        }
    }
}

impl ProfileOptions {
    fn check(&self) -> Result<(), ProfileError> {
        let invalid = |message: String| Err(ProfileError::InvalidOption(message));
        if !(self.ridge.is_finite() && self.ridge >= 0.0) {
            return invalid(format!("ridge must be a finite number >= 0, got {}", self.ridge));
        }
        if !(self.threshold_margin.is_finite() && self.threshold_margin > 0.0) {
            return invalid(format!(
                "threshold margin must be a finite number > 0, got {}",
                self.threshold_margin
            ));
        }
        if let Some(t) = self.threshold.filter(|t| !(t.is_finite() && *t > 0.0)) {
            return invalid(format!("threshold must be a finite number > 0, got {t}"));
        }
        if !(self.range_tolerance.is_finite() && self.range_tolerance >= 0.0) {
            return invalid(format!(
                "range tolerance must be a finite number >= 0, got {}",
                self.range_tolerance
            ));
        }
        if self.max_vocabulary == 0 {
            return invalid("the vocabulary limit must be at least 1".to_owned());
        }
        Ok(())
    }
}

/// Sample file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleFormat {
    /// Comma-separated, with a header row naming the features.
    Csv,
    /// One JSON object per line (blank lines are skipped).
    Jsonl,
}

impl SampleFormat {
    /// From the file extension: `.csv`, `.jsonl` or `.ndjson` (any case).
    pub fn from_path(path: &Path) -> Result<Self, ProfileError> {
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if extension.eq_ignore_ascii_case("csv") {
            Ok(SampleFormat::Csv)
        } else if extension.eq_ignore_ascii_case("jsonl") || extension.eq_ignore_ascii_case("ndjson") {
            Ok(SampleFormat::Jsonl)
        } else {
            Err(ProfileError::UnknownFormat(path.to_owned()))
        }
    }
}

/// Options of `warden profile build`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildOptions {
    /// `None`: from the input's extension.
    pub format: Option<SampleFormat>,
    /// `--features a,b,c`: the features to profile, in this order. `None`: every CSV column /
    /// every key of the first JSONL object.
    pub features: Option<Vec<String>>,
    /// `--categorical x,y`: features to treat as categorical even if they look numeric.
    pub categorical: Vec<String>,
    /// Features to treat as numeric (an error if a value is not a number).
    pub numeric: Vec<String>,
    pub profile: ProfileOptions,
}

impl BuildOptions {
    /// The schema for a sample with these feature names.
    pub fn schema(&self, names: &[String]) -> Result<Vec<FeatureSpec>, ProfileError> {
        for name in self.categorical.iter().chain(&self.numeric) {
            if !names.contains(name) {
                return Err(ProfileError::UnknownFeature(name.clone()));
            }
        }
        if let Some(both) = self.categorical.iter().find(|n| self.numeric.contains(n)) {
            return Err(ProfileError::InvalidOption(format!(
                "feature `{both}` is marked both categorical and numeric"
            )));
        }
        let schema = names.iter().map(|name| {
            let kind = if self.categorical.contains(name) {
                Some(FeatureKind::Categorical)
            } else if self.numeric.contains(name) {
                Some(FeatureKind::Numeric)
            } else {
                None
            };
            FeatureSpec {
                kind,
                ..FeatureSpec::new(name.clone())
            }
        });
        Ok(schema.collect())
    }
}

/// Builds a profile from a CSV or JSONL sample file: the library side of
/// `warden profile build --input sample.csv|jsonl --output profile.json [--features a,b,c]
/// [--categorical x,y]`.
pub fn build_from_file(input: &Path, options: &BuildOptions) -> Result<Profile, ProfileError> {
    let format = match options.format {
        Some(format) => format,
        None => SampleFormat::from_path(input)?,
    };
    let file = File::open(input).map_err(|source| ProfileError::Io {
        path: input.to_owned(),
        source,
    })?;
    let reader = BufReader::new(file);
    let features = options.features.as_deref();
    match format {
        SampleFormat::Csv => {
            let rows = CsvRows::new(reader, features)?;
            let schema = options.schema(rows.names())?;
            build_profile_with(rows, &schema, &options.profile)
        }
        SampleFormat::Jsonl => {
            let rows = JsonlRows::new(reader, features)?;
            let schema = options.schema(rows.names())?;
            build_profile_with(rows, &schema, &options.profile)
        }
    }
}

/// Builds a profile with the default [`ProfileOptions`]. Each row holds one cell per schema
/// feature, in schema order.
pub fn build_profile<'a, E>(
    rows: impl IntoIterator<Item = Result<Row<'a>, E>>,
    schema: &[FeatureSpec],
) -> Result<Profile, ProfileError>
where
    E: Into<ProfileError>,
{
    build_profile_with(rows, schema, &ProfileOptions::default())
}

/// Builds a profile. Memory is proportional to the sample's numeric values (kept for exact
/// quantiles) plus the vocabularies.
pub fn build_profile_with<'a, E>(
    rows: impl IntoIterator<Item = Result<Row<'a>, E>>,
    schema: &[FeatureSpec],
    options: &ProfileOptions,
) -> Result<Profile, ProfileError>
where
    E: Into<ProfileError>,
{
    options.check()?;
    check_schema(schema)?;
    let mut columns: Vec<Column> = schema.iter().map(|spec| Column::new(spec.kind)).collect();
    let mut sample_rows: u64 = 0;
    for row in rows {
        let row = row.map_err(Into::into)?;
        sample_rows += 1;
        if row.len() != schema.len() {
            return Err(ProfileError::RowWidth {
                row: sample_rows,
                expected: schema.len(),
                got: row.len(),
            });
        }
        for ((cell, column), spec) in row.iter().zip(&mut columns).zip(schema) {
            column.push(cell, &spec.name, sample_rows, options.max_vocabulary)?;
        }
    }
    if sample_rows == 0 {
        return Err(ProfileError::EmptySample);
    }

    let mut features = Vec::with_capacity(schema.len());
    let mut numeric: Vec<(Vec<f64>, Transform)> = Vec::new();
    for (spec, column) in schema.iter().zip(columns) {
        match column.finish(spec, options)? {
            Finished::Numeric(profile, values) => {
                numeric.push((values, profile.transform));
                features.push(FeatureProfile::Numeric(profile));
            }
            Finished::Categorical(profile) => features.push(FeatureProfile::Categorical(profile)),
        }
    }
    if numeric.len() > MAX_NUMERIC_FEATURES {
        return Err(ProfileError::TooManyNumericFeatures {
            count: numeric.len(),
            limit: MAX_NUMERIC_FEATURES,
        });
    }
    let numeric_names = features
        .iter()
        .filter(|f| f.kind() == FeatureKind::Numeric)
        .map(|f| f.name().to_owned())
        .collect();
    let joint = if numeric.is_empty() {
        None
    } else {
        Some(joint_profile(numeric_names, &numeric, sample_rows, options.ridge)?)
    };
    let threshold = match (options.threshold, &joint) {
        (Some(threshold), _) => threshold,
        (None, Some(joint)) => {
            let floor = (joint.features.len() as f64).sqrt();
            (joint.distances.p99_9 * options.threshold_margin).max(floor)
        }
        (None, None) => 1.0,
    };
    let profile = Profile {
        version: PROFILE_VERSION,
        sample_rows,
        features,
        joint,
        threshold,
    };
    profile.check().map_err(ProfileError::InvalidProfile)?;
    Ok(profile)
}

fn check_schema(schema: &[FeatureSpec]) -> Result<(), ProfileError> {
    if schema.is_empty() {
        return Err(ProfileError::NoFeatures);
    }
    if schema.len() > MAX_FEATURES {
        return Err(ProfileError::TooManyFeatures {
            count: schema.len(),
            limit: MAX_FEATURES,
        });
    }
    let mut seen = HashSet::new();
    for spec in schema {
        if !seen.insert(spec.name.as_str()) {
            return Err(ProfileError::DuplicateFeature(spec.name.clone()));
        }
    }
    Ok(())
}

/// Accumulates one feature's sample values while its kind may still be open.
struct Column {
    forced: Option<FeatureKind>,
    /// One value per row while every present value is a number; NaN marks a missing value.
    numbers: Vec<f64>,
    numeric: bool,
    non_finite: Option<(u64, f64)>,
    categories: HashMap<String, u64>,
    /// More distinct values than the vocabulary limit (counting stopped).
    overflow: bool,
    boolean: bool,
    present: u64,
    missing: u64,
}

enum Finished {
    Numeric(NumericProfile, Vec<f64>),
    Categorical(CategoricalProfile),
}

impl Column {
    fn new(forced: Option<FeatureKind>) -> Self {
        Self {
            forced,
            numbers: Vec::new(),
            numeric: forced != Some(FeatureKind::Categorical),
            non_finite: None,
            categories: HashMap::new(),
            overflow: false,
            boolean: true,
            present: 0,
            missing: 0,
        }
    }

    fn push(&mut self, cell: &Cell<'_>, name: &str, row: u64, max_vocabulary: usize) -> Result<(), ProfileError> {
        let number = match cell {
            Cell::Missing => None,
            Cell::Text(text) if text.trim().is_empty() => None,
            _ => Some(numeric_value(cell).flatten()),
        };
        let Some(number) = number else {
            self.missing += 1;
            if self.numeric {
                self.numbers.push(f64::NAN);
            }
            return Ok(());
        };
        self.present += 1;
        if self.numeric {
            match number {
                Some(x) if !x.is_finite() && self.forced == Some(FeatureKind::Numeric) => {
                    return Err(ProfileError::NonFinite {
                        feature: name.to_owned(),
                        row,
                        value: x,
                    });
                }
                Some(x) => {
                    if !x.is_finite() && self.non_finite.is_none() {
                        self.non_finite = Some((row, x));
                    }
                    self.numbers.push(x);
                }
                None if self.forced == Some(FeatureKind::Numeric) => {
                    let value = match cell {
                        Cell::Text(text) => text.chars().take(64).collect(),
                        other => format!("{other:?}"),
                    };
                    return Err(ProfileError::NotNumeric {
                        feature: name.to_owned(),
                        row,
                        value,
                    });
                }
                None => {
                    self.numeric = false;
                    self.numbers = Vec::new();
                }
            }
        }
        let as_bool = match cell {
            Cell::Bool(b) => Some(*b),
            Cell::Text(text) => parse_bool(text),
            _ => None,
        };
        self.boolean &= as_bool.is_some();
        if self.forced != Some(FeatureKind::Numeric) && !self.overflow {
            let key: Cow<'_, str> = match cell {
                Cell::Bool(b) => Cow::Borrowed(bool_str(*b)),
                Cell::Text(text) => Cow::Borrowed(text.as_ref()),
                Cell::Number(x) => {
                    let mut text = String::new();
                    // Writing to a String cannot fail.
                    let _ = write_number(*x, &mut text);
                    Cow::Owned(text)
                }
                Cell::Missing => Cow::Borrowed(""),
            };
            if let Some(count) = self.categories.get_mut(key.as_ref()) {
                *count += 1;
            } else if self.categories.len() < max_vocabulary {
                self.categories.insert(key.into_owned(), 1);
            } else {
                self.overflow = true;
                self.categories = HashMap::new();
            }
        }
        if self.overflow && !self.numeric {
            return Err(ProfileError::VocabularyTooLarge {
                feature: name.to_owned(),
                limit: max_vocabulary,
            });
        }
        Ok(())
    }

    fn finish(self, spec: &FeatureSpec, options: &ProfileOptions) -> Result<Finished, ProfileError> {
        let name = &spec.name;
        if self.present == 0 {
            return Err(ProfileError::EmptyFeature(name.clone()));
        }
        let numeric = match self.forced {
            Some(kind) => kind == FeatureKind::Numeric,
            None => self.numeric,
        };
        if !numeric {
            let mut vocabulary = BTreeMap::new();
            for (key, count) in self.categories {
                let key = match (self.boolean, parse_bool(&key)) {
                    (true, Some(b)) => bool_str(b).to_owned(),
                    _ => key,
                };
                vocabulary
                    .entry(key)
                    .or_insert(Category {
                        count: 0,
                        frequency: 0.0,
                    })
                    .count += count;
            }
            for category in vocabulary.values_mut() {
                category.frequency = category.count as f64 / self.present as f64;
            }
            return Ok(Finished::Categorical(CategoricalProfile {
                name: name.clone(),
                count: self.present,
                missing: self.missing,
                boolean: self.boolean,
                vocabulary,
            }));
        }
        if let Some((row, value)) = self.non_finite {
            return Err(ProfileError::NonFinite {
                feature: name.clone(),
                row,
                value,
            });
        }
        let mut sorted: Vec<f64> = self.numbers.iter().copied().filter(|x| !x.is_nan()).collect();
        sorted.sort_by(f64::total_cmp);
        let (Some(&min), Some(&max)) = (sorted.first(), sorted.last()) else {
            return Err(ProfileError::EmptyFeature(name.clone()));
        };
        let n = sorted.len() as f64;
        let mean = sorted.iter().sum::<f64>() / n;
        let variance = if sorted.len() > 1 {
            sorted.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        let transform = spec
            .transform
            .unwrap_or(if options.auto_log_transform && prefers_log(&sorted) {
                Transform::Log1p
            } else {
                Transform::Identity
            });
        let widen = options.range_tolerance * (max - min);
        let profile = NumericProfile {
            name: name.clone(),
            count: self.present,
            missing: self.missing,
            min,
            max,
            mean,
            std_dev: variance.sqrt(),
            quantiles: Quantiles {
                p0_1: quantile(&sorted, 0.001),
                p1: quantile(&sorted, 0.01),
                p50: quantile(&sorted, 0.5),
                p99: quantile(&sorted, 0.99),
                p99_9: quantile(&sorted, 0.999),
            },
            integral: sorted.iter().all(|x| x.fract() == 0.0),
            lower: min - widen,
            upper: max + widen,
            transform,
        };
        Ok(Finished::Numeric(profile, self.numbers))
    }
}

/// Linear interpolation between the order statistics of a sorted, non-empty slice (the
/// "type 7" definition of R and NumPy).
fn quantile(sorted: &[f64], p: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    let h = p.clamp(0.0, 1.0) * last as f64;
    let lo = (h.floor() as usize).min(last);
    let t = h - lo as f64;
    let a = sorted.get(lo).copied().unwrap_or_default();
    let b = sorted.get(lo + 1).copied().unwrap_or(a);
    if t == 0.0 { a } else { a * (1.0 - t) + b * t }
}

/// Whether `ln(1 + x)` suits a feature better: non-negative, skewness above 1, and the
/// logarithm reduces it.
fn prefers_log(sorted: &[f64]) -> bool {
    if sorted.first().is_none_or(|min| *min < 0.0) {
        return false;
    }
    let raw = skewness(sorted.iter().copied());
    let logged = skewness(sorted.iter().map(|x| x.ln_1p()));
    raw > 1.0 && logged.abs() < raw.abs()
}

fn skewness(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let (n, sum) = values.clone().fold((0.0, 0.0), |(n, sum), x| (n + 1.0, sum + x));
    if n < 3.0 {
        return 0.0;
    }
    let mean = sum / n;
    let (m2, m3) = values.fold((0.0, 0.0), |(m2, m3), x| {
        let d = x - mean;
        (m2 + d * d, m3 + d * d * d)
    });
    let (m2, m3) = (m2 / n, m3 / n);
    if m2 > 0.0 { m3 / m2.powf(1.5) } else { 0.0 }
}

/// Mean, covariance, regularised Cholesky factor and distance quantiles of the numeric
/// features over the rows where all of them are present.
fn joint_profile(
    features: Vec<String>,
    numeric: &[(Vec<f64>, Transform)],
    sample_rows: u64,
    ridge: f64,
) -> Result<JointProfile, ProfileError> {
    let k = numeric.len();
    let rows = usize::try_from(sample_rows).unwrap_or(usize::MAX);
    let mut points: Vec<f64> = Vec::new();
    for row in 0..rows {
        let values = numeric
            .iter()
            .map(|(values, _)| values.get(row).copied().unwrap_or(f64::NAN));
        if values.clone().all(|x| !x.is_nan()) {
            points.extend(values.zip(numeric).map(|(x, (_, transform))| transform.apply(x)));
        }
    }
    let m = points.len() / k;
    if m == 0 {
        return Err(ProfileError::NoCompleteRows);
    }
    let mut mean = vec![0.0; k];
    for point in points.chunks_exact(k) {
        for (sum, x) in mean.iter_mut().zip(point) {
            *sum += x;
        }
    }
    for sum in &mut mean {
        *sum /= m as f64;
    }
    let mut covariance = vec![vec![0.0; k]; k];
    for point in points.chunks_exact(k) {
        for (i, row) in covariance.iter_mut().enumerate() {
            let di = point.get(i).copied().unwrap_or_default() - mean.get(i).copied().unwrap_or_default();
            for ((cell, x), mu) in row.iter_mut().zip(point).zip(&mean) {
                *cell += di * (x - mu);
            }
        }
    }
    let denominator = if m > 1 { (m - 1) as f64 } else { 1.0 };
    for cell in covariance.iter_mut().flatten() {
        *cell /= denominator;
    }
    let mut regularised = covariance.clone();
    for (i, row) in regularised.iter_mut().enumerate() {
        if let Some(diagonal) = row.get_mut(i) {
            let scale = if *diagonal > 0.0 { *diagonal } else { 1.0 };
            *diagonal += ridge * scale;
        }
    }
    let cholesky = cholesky(&regularised).ok_or(ProfileError::NotPositiveDefinite { ridge })?;
    let mut distances: Vec<f64> = Vec::with_capacity(m);
    let mut delta = vec![0.0; k];
    for point in points.chunks_exact(k) {
        for ((d, x), mu) in delta.iter_mut().zip(point).zip(&mean) {
            *d = x - mu;
        }
        distances.push(forward_distance(&cholesky, &mut delta));
    }
    distances.sort_by(f64::total_cmp);
    Ok(JointProfile {
        features,
        rows: m as u64,
        mean,
        covariance,
        ridge,
        cholesky,
        distances: Distances {
            p50: quantile(&distances, 0.5),
            p99: quantile(&distances, 0.99),
            p99_9: quantile(&distances, 0.999),
            max: distances.last().copied().unwrap_or_default(),
        },
    })
}

/// Cholesky factor of a symmetric matrix as lower-triangular rows, or `None` if it is not
/// (numerically) positive definite.
fn cholesky(matrix: &[Vec<f64>]) -> Option<Vec<Vec<f64>>> {
    let mut factor: Vec<Vec<f64>> = Vec::with_capacity(matrix.len());
    for (i, source) in matrix.iter().enumerate() {
        let mut row: Vec<f64> = Vec::with_capacity(i + 1);
        for j in 0..=i {
            let above = if j == i {
                Some(row.as_slice())
            } else {
                factor.get(j).map(Vec::as_slice)
            };
            let dot: f64 = row.iter().zip(above?).map(|(a, b)| a * b).sum();
            let value = source.get(j)? - dot;
            if j == i {
                if !(value > 0.0 && value.is_finite()) {
                    return None;
                }
                row.push(value.sqrt());
            } else {
                row.push(value / factor.get(j)?.get(j)?);
            }
        }
        factor.push(row);
    }
    Some(factor)
}

// ---------------------------------------------------------------------------------------------
// Sample readers
// ---------------------------------------------------------------------------------------------

/// Rows of a CSV sample with a header row. Empty fields are missing; every other field is
/// text (numbers are parsed when the profile is built).
pub struct CsvRows<R> {
    names: Vec<String>,
    columns: Vec<usize>,
    records: csv::StringRecordsIntoIter<R>,
}

impl<R: io::Read> CsvRows<R> {
    /// Reads the header. `features` picks and orders columns; `None` takes them all.
    pub fn new(reader: R, features: Option<&[String]>) -> Result<Self, ProfileError> {
        let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(reader);
        let header: Vec<String> = reader
            .headers()
            .map_err(csv_error)?
            .iter()
            .map(|h| h.trim().to_owned())
            .collect();
        let mut seen = HashSet::new();
        if let Some(duplicate) = header.iter().find(|h| !seen.insert(h.as_str())) {
            return Err(ProfileError::DuplicateFeature(duplicate.clone()));
        }
        let names = match features {
            Some(features) => features.to_vec(),
            None => header.clone(),
        };
        let mut seen = HashSet::new();
        let mut columns = Vec::with_capacity(names.len());
        for name in &names {
            if !seen.insert(name.as_str()) {
                return Err(ProfileError::DuplicateFeature(name.clone()));
            }
            let column = header
                .iter()
                .position(|h| h == name)
                .ok_or_else(|| ProfileError::UnknownFeature(name.clone()))?;
            columns.push(column);
        }
        Ok(Self {
            names,
            columns,
            records: reader.into_records(),
        })
    }

    /// The feature names, in row order.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

impl<R: io::Read> Iterator for CsvRows<R> {
    type Item = Result<Row<'static>, ProfileError>;

    fn next(&mut self) -> Option<Self::Item> {
        let record = match self.records.next()? {
            Ok(record) => record,
            Err(error) => return Some(Err(csv_error(error))),
        };
        let row = self.columns.iter().map(|&column| match record.get(column) {
            Some(field) if !field.trim().is_empty() => Cell::Text(Cow::Owned(field.to_owned())),
            _ => Cell::Missing,
        });
        Some(Ok(row.collect()))
    }
}

fn csv_error(error: csv::Error) -> ProfileError {
    ProfileError::Csv {
        line: error.position().map(csv::Position::line),
        message: error.to_string(),
    }
}

/// Rows of a JSONL sample: one object per line, values strings, numbers, booleans or null.
/// Absent keys are missing. When the features are taken from the first object, a later key
/// that it lacks is an error; with explicit features other keys are ignored.
pub struct JsonlRows<R> {
    names: Vec<String>,
    reader: R,
    line: u64,
    buffer: String,
    pending: Option<Row<'static>>,
    strict: bool,
}

impl<R: BufRead> JsonlRows<R> {
    /// `features` picks and orders keys; `None` takes the keys of the first object.
    pub fn new(reader: R, features: Option<&[String]>) -> Result<Self, ProfileError> {
        let mut rows = Self {
            names: features.map(<[String]>::to_vec).unwrap_or_default(),
            reader,
            line: 0,
            buffer: String::new(),
            pending: None,
            strict: features.is_none(),
        };
        let mut seen = HashSet::new();
        if let Some(duplicate) = rows.names.iter().find(|n| !seen.insert(n.as_str())) {
            return Err(ProfileError::DuplicateFeature(duplicate.clone()));
        }
        if features.is_none() {
            let first = rows.next_object()?.ok_or(ProfileError::EmptySample)?;
            rows.names = first.keys().cloned().collect();
            rows.pending = Some(rows.row(&first)?);
        }
        Ok(rows)
    }

    /// The feature names, in row order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    fn error(&self, message: String) -> ProfileError {
        ProfileError::Jsonl {
            line: self.line,
            message,
        }
    }

    fn next_object(&mut self) -> Result<Option<Map<String, Value>>, ProfileError> {
        loop {
            self.buffer.clear();
            let read = self
                .reader
                .read_line(&mut self.buffer)
                .map_err(|e| ProfileError::Jsonl {
                    line: self.line + 1,
                    message: e.to_string(),
                })?;
            if read == 0 {
                return Ok(None);
            }
            self.line += 1;
            let text = self.buffer.trim_start_matches('\u{feff}').trim();
            if text.is_empty() {
                continue;
            }
            return match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(object)) => Ok(Some(object)),
                Ok(_) => Err(self.error("expected a JSON object".to_owned())),
                Err(e) => Err(self.error(e.to_string())),
            };
        }
    }

    fn row(&self, object: &Map<String, Value>) -> Result<Row<'static>, ProfileError> {
        if self.strict
            && let Some(key) = object.keys().find(|key| !self.names.contains(key))
        {
            return Err(self.error(format!(
                "key `{key}` is not in the first row; name the features explicitly"
            )));
        }
        let cells = self.names.iter().map(|name| match object.get(name) {
            None | Some(Value::Null) => Ok(Cell::Missing),
            Some(Value::Bool(b)) => Ok(Cell::Bool(*b)),
            Some(Value::Number(n)) => Ok(Cell::Number(n.as_f64().unwrap_or(f64::NAN))),
            Some(Value::String(s)) => Ok(Cell::Text(Cow::Owned(s.clone()))),
            Some(_) => Err(self.error(format!("`{name}` must be a string, number, boolean or null"))),
        });
        cells.collect()
    }
}

impl<R: BufRead> Iterator for JsonlRows<R> {
    type Item = Result<Row<'static>, ProfileError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(row) = self.pending.take() {
            return Some(Ok(row));
        }
        match self.next_object() {
            Ok(Some(object)) => Some(self.row(&object)),
            Ok(None) => None,
            Err(error) => Some(Err(error)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::fmt::Write as _;
    use std::time::Instant;

    use serde_json::json;

    use super::*;

    // -----------------------------------------------------------------------------------------
    // The demo sample generator (deterministic; see examples/profiles/README.md)
    // -----------------------------------------------------------------------------------------

    /// Seed and size of the shipped demo sample `examples/profiles/fraud-sample.csv`.
    const DEMO_SEED: u64 = 6005;
    const DEMO_ROWS: usize = 5000;

    /// SplitMix64: tiny, fast and stable forever (unlike `rand`'s `StdRng`), so the sample can be
    /// regenerated bit for bit.
    struct SplitMix64(u64);

    impl SplitMix64 {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in `[0, 1)`.
        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1_u64 << 53) as f64
        }

        /// Standard normal (Box-Muller).
        fn normal(&mut self) -> f64 {
            let u1 = 1.0 - self.uniform();
            let u2 = self.uniform();
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        }

        /// An index drawn with the given (unnormalised) weights.
        fn pick(&mut self, weights: &[f64]) -> usize {
            let total: f64 = weights.iter().sum();
            let mut target = self.uniform() * total;
            for (i, w) in weights.iter().enumerate() {
                if target < *w {
                    return i;
                }
                target -= w;
            }
            weights.len() - 1
        }
    }

    /// Merchant, share of transactions, median amount ($), log-normal sigma, P(card present).
    const MERCHANTS: [(&str, f64, f64, f64, f64); 5] = [
        ("globex", 0.34, 38.0, 0.55, 0.95),   // supermarkets
        ("umbrella", 0.22, 24.0, 0.50, 0.93), // pharmacies
        ("initech", 0.18, 55.0, 0.60, 0.08),  // online software and subscriptions
        ("acme", 0.14, 140.0, 0.70, 0.75),    // electronics
        ("soylent", 0.12, 32.0, 0.45, 0.90),  // restaurants
    ];
    /// Country of use and its share: mostly the issuer's domestic countries.
    const COUNTRIES: [(&str, f64); 9] = [
        ("US", 0.56),
        ("CA", 0.12),
        ("GB", 0.11),
        ("DE", 0.09),
        ("FR", 0.08),
        ("NL", 0.015),
        ("IE", 0.01),
        ("ES", 0.01),
        ("IT", 0.005),
    ];
    /// Relative weight of each local hour 0..=23: quiet nights, busy days and evenings.
    const HOUR_WEIGHTS: [f64; 24] = [
        0.4, 0.25, 0.15, 0.1, 0.1, 0.2, 0.6, 1.5, 3.0, 4.5, 5.5, 6.5, 7.5, 7.0, 6.5, 6.5, 7.0, 7.5, 7.5, 7.0, 6.0, 4.5,
        3.0, 1.5,
    ];

    /// `rows` legitimate demo-fraud transactions as CSV (header
    /// `amount,merchant_id,country,hour,card_present`), fully determined by `seed`.
    fn demo_sample_csv(rows: usize, seed: u64) -> String {
        let mut rng = SplitMix64(seed);
        let merchant_weights = MERCHANTS.map(|m| m.1);
        let country_weights = COUNTRIES.map(|c| c.1);
        let mut csv = String::from("amount,merchant_id,country,hour,card_present\n");
        for _ in 0..rows {
            let (merchant, _, median, sigma, p_present) = MERCHANTS[rng.pick(&merchant_weights)];
            let amount = (median * (sigma * rng.normal()).exp()).clamp(0.5, 5_000.0);
            let country = COUNTRIES[rng.pick(&country_weights)].0;
            let hour = rng.pick(&HOUR_WEIGHTS);
            let card_present = rng.uniform() < p_present;
            writeln!(csv, "{amount:.2},{merchant},{country},{hour},{card_present}").unwrap();
        }
        csv
    }

    fn manifest_path(relative: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
    }

    const SHIPPED_SAMPLE: &str = "examples/profiles/fraud-sample.csv";
    const SHIPPED_PROFILE: &str = "examples/profiles/fraud-scorer.profile.json";

    /// Regenerates the shipped demo sample and profile:
    /// `cargo test --lib validate::ood::tests::regenerate_demo_profile -- --ignored`.
    #[test]
    #[ignore = "writes examples/profiles/; run by hand to regenerate the demo profile"]
    fn regenerate_demo_profile() {
        let sample = manifest_path(SHIPPED_SAMPLE);
        std::fs::create_dir_all(sample.parent().unwrap()).unwrap();
        std::fs::write(&sample, demo_sample_csv(DEMO_ROWS, DEMO_SEED)).unwrap();
        let profile = build_from_file(&sample, &BuildOptions::default()).unwrap();
        profile.save(&manifest_path(SHIPPED_PROFILE)).unwrap();
    }

    fn demo_profile() -> Profile {
        let csv = demo_sample_csv(DEMO_ROWS, DEMO_SEED);
        let rows = CsvRows::new(csv.as_bytes(), None).unwrap();
        let schema = BuildOptions::default().schema(rows.names()).unwrap();
        build_profile(rows, &schema).unwrap()
    }

    fn txn(amount: f64, merchant: &'static str, country: &'static str, hour: f64, present: bool) -> Row<'static> {
        vec![
            Cell::Number(amount),
            Cell::from(merchant),
            Cell::from(country),
            Cell::Number(hour),
            Cell::Bool(present),
        ]
    }

    fn numeric<'p>(profile: &'p Profile, name: &str) -> &'p NumericProfile {
        match profile.feature(name) {
            Some(FeatureProfile::Numeric(f)) => f,
            other => panic!("{name}: {other:?}"),
        }
    }

    fn categorical<'p>(profile: &'p Profile, name: &str) -> &'p CategoricalProfile {
        match profile.feature(name) {
            Some(FeatureProfile::Categorical(f)) => f,
            other => panic!("{name}: {other:?}"),
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
    }

    #[track_caller]
    fn assert_close(a: f64, b: f64) {
        assert!(close(a, b), "{a} != {b}");
    }

    fn ok_rows(rows: Vec<Row<'static>>) -> impl Iterator<Item = Result<Row<'static>, Infallible>> {
        rows.into_iter().map(Ok)
    }

    // -----------------------------------------------------------------------------------------
    // Building
    // -----------------------------------------------------------------------------------------

    #[test]
    fn statistics_of_a_hand_checked_sample() {
        let rows: Vec<Row<'static>> = [
            (1.0, "2", Some("a"), Cell::Bool(true)),
            (2.0, "4", Some("b"), Cell::Bool(false)),
            (3.0, "6", Some("a"), Cell::from("TRUE")),
            (4.0, "8", Some("a"), Cell::Bool(true)),
            (100.0, "10", None, Cell::from(" true")),
        ]
        .into_iter()
        .map(|(x, y, c, flag)| {
            let c = c.map_or(Cell::Missing, Cell::from);
            vec![Cell::Number(x), Cell::from(y), c, flag]
        })
        .collect();
        let schema = [
            FeatureSpec::numeric("x").with_transform(Transform::Identity),
            FeatureSpec::new("y"),
            FeatureSpec::new("c"),
            FeatureSpec::new("flag"),
        ];
        let profile = build_profile(ok_rows(rows), &schema).unwrap();
        assert_eq!(profile.version(), PROFILE_VERSION);
        assert_eq!(profile.sample_rows(), 5);

        let x = numeric(&profile, "x");
        assert_eq!((x.count, x.missing, x.min, x.max), (5, 0, 1.0, 100.0));
        assert_close(x.mean, 22.0);
        // Squared deviations 441 + 400 + 361 + 324 + 6084 = 7610, over n - 1 = 4.
        assert_close(x.std_dev, 1902.5_f64.sqrt());
        // Type-7 quantiles: h = 4p, interpolating the sorted values.
        assert_close(x.quantiles.p0_1, 1.004);
        assert_close(x.quantiles.p1, 1.04);
        assert_close(x.quantiles.p50, 3.0);
        assert_close(x.quantiles.p99, 96.16);
        assert_close(x.quantiles.p99_9, 99.616);
        assert!(x.integral);
        assert_eq!((x.lower, x.upper, x.transform), (1.0, 100.0, Transform::Identity));

        let y = numeric(&profile, "y");
        assert_close(y.mean, 6.0);
        assert_close(y.std_dev, 10.0_f64.sqrt());
        assert_eq!(y.transform, Transform::Identity, "symmetric: no log");

        let c = categorical(&profile, "c");
        assert_eq!((c.count, c.missing, c.boolean), (4, 1, false));
        assert_eq!(c.vocabulary.len(), 2);
        assert_eq!(
            c.vocabulary["a"],
            Category {
                count: 3,
                frequency: 0.75
            }
        );
        assert_eq!(
            c.vocabulary["b"],
            Category {
                count: 1,
                frequency: 0.25
            }
        );

        let flag = categorical(&profile, "flag");
        assert!(flag.boolean);
        assert_eq!(flag.vocabulary.keys().collect::<Vec<_>>(), ["false", "true"]);
        assert_eq!(flag.vocabulary["true"].count, 4);
        assert_close(flag.vocabulary["false"].frequency, 0.2);

        let joint = profile.joint().unwrap();
        assert_eq!(joint.features, ["x", "y"]);
        assert_eq!(joint.rows, 5);
        assert_close(joint.mean[0], 22.0);
        assert_close(joint.mean[1], 6.0);
        // Cross deviations: 84 + 40 + 0 - 36 + 312 = 400, over 4.
        let expected = [[1902.5, 100.0], [100.0, 10.0]];
        for (row, expected) in joint.covariance.iter().zip(expected) {
            for (a, b) in row.iter().zip(expected) {
                assert_close(*a, b);
            }
        }
        assert_eq!(joint.ridge, DEFAULT_RIDGE);
        // L Lᵀ is the regularised covariance.
        let a = [
            [1902.5 * (1.0 + DEFAULT_RIDGE), 100.0],
            [100.0, 10.0 * (1.0 + DEFAULT_RIDGE)],
        ];
        let l = &joint.cholesky;
        assert_close(l[0][0] * l[0][0], a[0][0]);
        assert_close(l[1][0] * l[0][0], a[1][0]);
        assert_close(l[1][0] * l[1][0] + l[1][1] * l[1][1], a[1][1]);

        // Distances against the closed-form 2x2 inverse.
        let det = a[0][0] * a[1][1] - a[0][1] * a[1][0];
        let mut distances: Vec<f64> = [(1.0, 2.0), (2.0, 4.0), (3.0, 6.0), (4.0, 8.0), (100.0, 10.0)]
            .iter()
            .map(|(x, y)| {
                let (dx, dy) = (x - 22.0, y - 6.0);
                ((a[1][1] * dx * dx - 2.0 * a[0][1] * dx * dy + a[0][0] * dy * dy) / det).sqrt()
            })
            .collect();
        distances.sort_by(f64::total_cmp);
        assert_close(joint.distances.p50, distances[2]);
        assert_close(joint.distances.max, distances[4]);
        assert_close(joint.distances.p99, 0.04 * distances[3] + 0.96 * distances[4]);
        assert_close(joint.distances.p99_9, 0.004 * distances[3] + 0.996 * distances[4]);
        assert_close(
            profile.threshold(),
            (joint.distances.p99_9 * DEFAULT_THRESHOLD_MARGIN).max(2.0_f64.sqrt()),
        );

        // Scoring a sample row reproduces its distance.
        let score = profile.score_row(&[Cell::Number(3.0), Cell::Number(6.0), Cell::from("a"), Cell::Bool(true)]);
        let direct = (a[1][1] * 19.0 * 19.0 / det).sqrt();
        assert_close(score.mahalanobis, direct);
        assert!(!score.out_of_distribution && !score.has_violation());
    }

    #[test]
    fn kinds_and_transforms_are_inferred() {
        let csv = "\
amount , merchant,hour,present,code,mixed
12.5,\"acme, inc\",14,true,7,1
300,globex,9,FALSE,8,x
1.25,acme,,true,7,2
8000,globex,23,false,9,3
4.5,acme,11,true,7,4
";
        let options = BuildOptions {
            categorical: vec!["code".to_owned()],
            ..BuildOptions::default()
        };
        let rows = CsvRows::new(csv.as_bytes(), None).unwrap();
        assert_eq!(rows.names(), ["amount", "merchant", "hour", "present", "code", "mixed"]);
        let schema = options.schema(rows.names()).unwrap();
        let profile = build_profile(rows, &schema).unwrap();
        let kinds: Vec<FeatureKind> = profile.features().iter().map(FeatureProfile::kind).collect();
        use FeatureKind::{Categorical as C, Numeric as N};
        assert_eq!(kinds, [N, C, N, C, C, C]);
        assert_eq!(
            numeric(&profile, "amount").transform,
            Transform::Log1p,
            "skewed amounts"
        );
        assert_eq!(numeric(&profile, "hour").transform, Transform::Identity);
        assert_eq!(numeric(&profile, "hour").missing, 1);
        assert!(!numeric(&profile, "amount").integral);
        let merchant = categorical(&profile, "merchant");
        assert_eq!(
            merchant.vocabulary.keys().collect::<Vec<_>>(),
            ["acme", "acme, inc", "globex"]
        );
        assert!(categorical(&profile, "present").boolean);
        assert_eq!(categorical(&profile, "present").vocabulary["false"].count, 2);
        assert_eq!(categorical(&profile, "code").vocabulary["7"].count, 3);
        assert_eq!(categorical(&profile, "mixed").vocabulary.len(), 5);
        // The joint model is over amount and hour, on the 4 rows with both.
        let joint = profile.joint().unwrap();
        assert_eq!(
            (joint.features.clone(), joint.rows),
            (vec!["amount".to_owned(), "hour".to_owned()], 4)
        );
        let logs = [12.5_f64, 300.0, 8000.0, 4.5].map(f64::ln_1p);
        assert_close(joint.mean[0], logs.iter().sum::<f64>() / 4.0);
        // A categorical code given as a number is looked up by its text form.
        let row = [
            Cell::from("20"),
            Cell::from("acme"),
            Cell::Number(12.0),
            Cell::Bool(true),
            Cell::Number(7.0),
            Cell::from("x"),
        ];
        let score = profile.score_row(&row);
        assert!(!score.has_violation(), "{score:?}");
    }

    #[test]
    fn bad_samples_are_typed_errors() {
        let build = |csv: &str, options: &BuildOptions| {
            let rows = CsvRows::new(csv.as_bytes(), options.features.as_deref())?;
            let schema = options.schema(rows.names())?;
            build_profile_with(rows, &schema, &options.profile)
        };
        let default = BuildOptions::default();
        assert!(matches!(build("a,b\n", &default), Err(ProfileError::EmptySample)));
        assert!(matches!(build("", &default), Err(ProfileError::NoFeatures)));
        assert!(matches!(build("a,b\n1,\n2,\n", &default), Err(ProfileError::EmptyFeature(f)) if f == "b"));
        assert!(matches!(
            build("a,a\n1,2\n", &default),
            Err(ProfileError::DuplicateFeature(_))
        ));
        assert!(matches!(
            build("a,b\n1,2\n3\n", &default),
            Err(ProfileError::Csv { line: Some(3), .. })
        ));
        let nan = build("a,b\n1,x\nNaN,y\n", &default);
        assert!(
            matches!(nan, Err(ProfileError::NonFinite { ref feature, row: 2, .. }) if feature == "a"),
            "{nan:?}"
        );
        assert!(matches!(
            build("a\n1\ninf\n", &default),
            Err(ProfileError::NonFinite { .. })
        ));
        let forced = BuildOptions {
            numeric: vec!["b".to_owned()],
            ..BuildOptions::default()
        };
        let not_numeric = build("a,b\n1,2\n3,four\n", &forced);
        assert!(
            matches!(not_numeric, Err(ProfileError::NotNumeric { ref value, row: 2, .. }) if value == "four"),
            "{not_numeric:?}"
        );
        let unknown = BuildOptions {
            categorical: vec!["zz".to_owned()],
            ..BuildOptions::default()
        };
        assert!(matches!(build("a\n1\n", &unknown), Err(ProfileError::UnknownFeature(f)) if f == "zz"));
        let selected = BuildOptions {
            features: Some(vec!["nope".to_owned()]),
            ..BuildOptions::default()
        };
        assert!(matches!(
            build("a\n1\n", &selected),
            Err(ProfileError::UnknownFeature(_))
        ));
        let both = BuildOptions {
            categorical: vec!["a".to_owned()],
            numeric: vec!["a".to_owned()],
            ..BuildOptions::default()
        };
        assert!(matches!(build("a\n1\n", &both), Err(ProfileError::InvalidOption(_))));
        let small_vocabulary = BuildOptions {
            profile: ProfileOptions {
                max_vocabulary: 2,
                ..ProfileOptions::default()
            },
            ..BuildOptions::default()
        };
        assert!(matches!(
            build("a\nx\ny\nz\n", &small_vocabulary),
            Err(ProfileError::VocabularyTooLarge { limit: 2, .. })
        ));
        // A numeric column is not limited by the vocabulary cap.
        assert!(build("a\n1\n2\n3\n4\n", &small_vocabulary).is_ok());
        for bad in [
            ProfileOptions {
                ridge: -1.0,
                ..ProfileOptions::default()
            },
            ProfileOptions {
                threshold_margin: 0.0,
                ..ProfileOptions::default()
            },
            ProfileOptions {
                threshold: Some(f64::NAN),
                ..ProfileOptions::default()
            },
            ProfileOptions {
                range_tolerance: f64::INFINITY,
                ..ProfileOptions::default()
            },
            ProfileOptions {
                max_vocabulary: 0,
                ..ProfileOptions::default()
            },
        ] {
            let options = BuildOptions {
                profile: bad,
                ..BuildOptions::default()
            };
            assert!(matches!(build("a\n1\n", &options), Err(ProfileError::InvalidOption(_))));
        }

        let row_width = build_profile(
            ok_rows(vec![vec![Cell::Number(1.0)]]),
            &[FeatureSpec::new("a"), FeatureSpec::new("b")],
        );
        assert!(matches!(
            row_width,
            Err(ProfileError::RowWidth {
                row: 1,
                expected: 2,
                got: 1
            })
        ));
        let wide: Vec<FeatureSpec> = (0..33).map(|i| FeatureSpec::new(format!("f{i}"))).collect();
        let many = build_profile(ok_rows(vec![vec![Cell::Number(1.0); 33]]), &wide);
        assert!(matches!(
            many,
            Err(ProfileError::TooManyNumericFeatures { count: 33, limit: 32 })
        ));
        let none: [FeatureSpec; 0] = [];
        assert!(matches!(
            build_profile(ok_rows(vec![]), &none),
            Err(ProfileError::NoFeatures)
        ));
        let reader_error = build_profile(vec![Err(ProfileError::EmptySample)], &[FeatureSpec::new("a")]);
        assert!(matches!(reader_error, Err(ProfileError::EmptySample)));
    }

    #[test]
    fn range_tolerance_and_fixed_threshold() {
        let rows = (0..=10).map(|i| vec![Cell::Number(f64::from(i))]).collect();
        let options = ProfileOptions {
            range_tolerance: 0.1,
            threshold: Some(7.5),
            ..ProfileOptions::default()
        };
        let profile = build_profile_with(ok_rows(rows), &[FeatureSpec::new("n")], &options).unwrap();
        let n = numeric(&profile, "n");
        assert_eq!((n.lower, n.upper), (-1.0, 11.0));
        assert_eq!(profile.threshold(), 7.5);
        assert!(!profile.score_row(&[Cell::Number(11.0)]).has_violation());
        assert_eq!(profile.score_row(&[Cell::Number(12.0)]).out_of_range, ["n"]);
    }

    // -----------------------------------------------------------------------------------------
    // Scoring rows
    // -----------------------------------------------------------------------------------------

    #[test]
    fn in_profile_rows_pass() {
        let profile = demo_profile();
        for row in [
            txn(42.0, "globex", "US", 14.0, true),
            txn(180.0, "acme", "GB", 17.0, true),
            txn(23.5, "initech", "DE", 10.0, false),
        ] {
            let score = profile.score_row(&row);
            assert!(!score.out_of_distribution, "{row:?}: {score:?}");
            assert!(!score.has_violation() && score.score < 1.0 && score.mahalanobis < profile.threshold());
        }
        // Text cells (as in a CSV) score the same as typed ones.
        let text = ["42", "globex", "US", "14", "TRUE"].map(Cell::from);
        assert_eq!(
            profile.score_row(&text),
            profile.score_row(&txn(42.0, "globex", "US", 14.0, true))
        );
    }

    #[test]
    fn out_of_profile_rows_are_flagged() {
        let profile = demo_profile();
        let p99_9 = numeric(&profile, "amount").quantiles.p99_9;
        /// A row and the features it should report out of range, unknown and missing.
        type Case = (
            Row<'static>,
            &'static [&'static str],
            &'static [&'static str],
            &'static [&'static str],
        );
        let cases: [Case; 11] = [
            (txn(10.0 * p99_9, "globex", "US", 14.0, true), &["amount"], &[], &[]),
            (txn(42.0, "globex", "ZZ", 14.0, true), &[], &["country"], &[]),
            (
                txn(42.0, "casino-royale", "NG", 14.0, true),
                &[],
                &["merchant_id", "country"],
                &[],
            ),
            (txn(42.0, "globex", "US", 25.0, true), &["hour"], &[], &[]),
            (txn(42.0, "globex", "US", -1.0, true), &["hour"], &[], &[]),
            (txn(42.0, "globex", "US", 13.5, true), &["hour"], &[], &[]),
            (txn(f64::NAN, "globex", "US", 14.0, true), &["amount"], &[], &[]),
            (txn(f64::INFINITY, "globex", "US", 14.0, true), &["amount"], &[], &[]),
            (
                txn(-5.0, "globex", "US", f64::NEG_INFINITY, true),
                &["amount", "hour"],
                &[],
                &[],
            ),
            (
                // A short row with wrongly typed cells: a boolean hour, a numeric country.
                vec![
                    Cell::from("12 dollars"),
                    Cell::from("globex"),
                    Cell::Number(7.0),
                    Cell::Bool(true),
                ],
                &["amount", "hour"],
                &["country"],
                &["card_present"],
            ),
            (
                vec![
                    Cell::Number(42.0),
                    Cell::Missing,
                    Cell::from(" "),
                    Cell::Number(14.0),
                    Cell::from("yes"),
                ],
                &[],
                &["card_present"],
                &["merchant_id", "country"],
            ),
        ];
        for (row, out_of_range, unknown, missing) in cases {
            let score = profile.score_row(&row);
            assert!(score.out_of_distribution, "{row:?}: {score:?}");
            assert!(score.score >= 1.0 && score.score.is_finite() && score.mahalanobis.is_finite());
            assert_eq!(score.out_of_range, out_of_range, "{row:?}");
            assert_eq!(score.unknown_categories, unknown, "{row:?}");
            assert_eq!(score.missing, missing, "{row:?}");
        }
        // Absurd magnitudes still give finite scores.
        let score = profile.score_row(&txn(f64::MAX, "globex", "US", -f64::MAX, true));
        assert!(score.out_of_distribution && score.score.is_finite() && score.mahalanobis.is_finite());
        assert_eq!(score.mahalanobis, f64::MAX);
    }

    #[test]
    fn threshold_is_overridable() {
        let mut profile = demo_profile();
        let row = txn(42.0, "globex", "US", 14.0, true);
        let distance = profile.score_row(&row).mahalanobis;
        assert!(distance > 0.0);
        profile.set_threshold(distance / 2.0).unwrap();
        let score = profile.score_row(&row);
        assert!(score.out_of_distribution && !score.has_violation());
        assert_close(score.score, 2.0);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(profile.set_threshold(bad), Err(OodError::InvalidThreshold(_))));
        }
        let profile = profile.with_threshold(1e6).unwrap();
        assert!(!profile.score_row(&row).out_of_distribution);
    }

    #[test]
    fn mahalanobis_catches_jointly_unusual_rows() {
        let mut rng = SplitMix64(7);
        let rows: Vec<Row<'static>> = (0..2000)
            .map(|_| {
                let x = rng.normal();
                let y = x + 0.1 * rng.normal();
                vec![Cell::Number(x), Cell::Number(y)]
            })
            .collect();
        let profile = build_profile(ok_rows(rows), &[FeatureSpec::new("x"), FeatureSpec::new("y")]).unwrap();
        let (x, y) = (numeric(&profile, "x"), numeric(&profile, "y"));
        assert!(x.min < -1.5 && x.max > 1.5 && y.min < -1.5 && y.max > 1.5);
        let joint = profile.joint().unwrap();
        let correlation = joint.covariance[0][1] / (joint.covariance[0][0] * joint.covariance[1][1]).sqrt();
        assert!(correlation > 0.99, "{correlation}");

        let along = profile.score_row(&[Cell::Number(1.5), Cell::Number(1.5)]);
        assert!(!along.out_of_distribution, "{along:?}");
        let across = profile.score_row(&[Cell::Number(1.5), Cell::Number(-1.5)]);
        assert!(!across.has_violation(), "each value is in range: {across:?}");
        assert!(across.out_of_distribution, "{across:?}");
        assert!(across.mahalanobis > 3.0 * profile.threshold(), "{across:?}");
    }

    #[test]
    fn ridge_makes_a_singular_covariance_invertible() {
        let rows: Vec<Row<'static>> = (0..100)
            .map(|i| {
                let x = f64::from(i);
                vec![Cell::Number(x), Cell::Number(2.0 * x), Cell::Number(5.0)]
            })
            .collect();
        let schema = [
            FeatureSpec::new("x"),
            FeatureSpec::new("double"),
            FeatureSpec::new("constant"),
        ];
        let profile = build_profile(ok_rows(rows.clone()), &schema).unwrap();
        let ok = profile.score_row(&[Cell::Number(40.0), Cell::Number(80.0), Cell::Number(5.0)]);
        assert!(!ok.out_of_distribution, "{ok:?}");
        let broken = profile.score_row(&[Cell::Number(40.0), Cell::Number(60.0), Cell::Number(5.0)]);
        assert!(broken.out_of_distribution && !broken.has_violation(), "{broken:?}");
        let constant = profile.score_row(&[Cell::Number(40.0), Cell::Number(80.0), Cell::Number(6.0)]);
        assert_eq!(constant.out_of_range, ["constant"]);

        let no_ridge = ProfileOptions {
            ridge: 0.0,
            ..ProfileOptions::default()
        };
        let singular = build_profile_with(ok_rows(rows), &schema, &no_ridge);
        assert!(
            matches!(singular, Err(ProfileError::NotPositiveDefinite { .. })),
            "{singular:?}"
        );

        // A single row: zero covariance, still a usable profile.
        let one = build_profile(ok_rows(vec![vec![Cell::Number(3.0)]]), &[FeatureSpec::new("a")]).unwrap();
        assert!(!one.score_row(&[Cell::Number(3.0)]).out_of_distribution);
        assert!(one.score_row(&[Cell::Number(3.5)]).out_of_distribution);
    }

    #[test]
    fn missing_values_seen_in_the_sample_are_accepted() {
        let rows = vec![
            vec![Cell::Number(1.0), Cell::from("a")],
            vec![Cell::Missing, Cell::Missing],
            vec![Cell::Number(3.0), Cell::from("b")],
        ];
        let profile = build_profile(ok_rows(rows), &[FeatureSpec::new("n"), FeatureSpec::new("c")]).unwrap();
        assert_eq!(profile.joint().unwrap().rows, 2);
        let score = profile.score_row(&[Cell::Missing, Cell::Missing]);
        assert!(!score.has_violation() && !score.out_of_distribution, "{score:?}");
        // Short rows count as missing.
        assert_eq!(profile.score_row(&[]), score);
    }

    #[test]
    fn a_profile_without_numeric_features_has_no_joint_model() {
        let rows = vec![vec![Cell::from("a")], vec![Cell::from("b")]];
        let profile = build_profile(ok_rows(rows), &[FeatureSpec::new("c")]).unwrap();
        assert!(profile.joint().is_none());
        let score = profile.score_row(&[Cell::from("a")]);
        assert_eq!((score.mahalanobis, score.out_of_distribution), (0.0, false));
        assert!(profile.score_row(&[Cell::from("z")]).out_of_distribution);
    }

    // -----------------------------------------------------------------------------------------
    // Profile files
    // -----------------------------------------------------------------------------------------

    #[test]
    fn profiles_round_trip_through_json() {
        let profile = demo_profile();
        let json = profile.to_json().unwrap();
        let loaded = Profile::from_json(&json).unwrap();
        // serde_json's float parser may differ from the written value in the last bit.
        assert_json_close(
            &serde_json::to_value(&loaded).unwrap(),
            &serde_json::to_value(&profile).unwrap(),
            "",
        );
        let value: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["version"], 1);
        assert_eq!(value["features"][0]["kind"], "numeric");
        assert_eq!(value["features"][0]["transform"], "log1p");
        assert!(value["features"][0]["quantiles"]["p99.9"].is_f64());
        assert_eq!(
            value["features"][2]["vocabulary"]["US"]["count"]
                .as_u64()
                .map(|c| c > 2000),
            Some(true)
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        profile.save(&path).unwrap();
        assert_eq!(Profile::load(&path).unwrap(), loaded);
        assert!(matches!(
            Profile::load(&dir.path().join("none.json")),
            Err(ProfileError::Io { .. })
        ));
    }

    #[test]
    fn invalid_profiles_are_rejected_when_loaded() {
        let good: Value = serde_json::from_str(&demo_profile().to_json().unwrap()).unwrap();
        let edits: [(&str, Value); 16] = [
            ("/version", json!(2)),
            ("/threshold", json!(0)),
            ("/threshold", json!(-3.5)),
            ("/threshold", Value::Null),
            ("/features", json!([])),
            ("/features/1/name", json!("amount")),
            ("/features/0/kind", json!("ordinal")),
            ("/features/0/lower", json!(1e9)),
            ("/features/0/quantiles", json!({})),
            ("/joint/features", json!(["hour", "amount"])),
            ("/joint/mean", json!([1.0])),
            ("/joint/covariance/1", json!([1.0])),
            ("/joint/cholesky/0", json!([1.0, 0.0])),
            ("/joint/cholesky/1/1", json!(-0.5)),
            ("/joint/cholesky/1/1", json!(0.0)),
            ("/joint/mean/0", json!("x")),
        ];
        for (pointer, value) in edits {
            let mut edited = good.clone();
            *edited.pointer_mut(pointer).unwrap() = value;
            let result = Profile::from_json(&edited.to_string());
            assert!(
                matches!(result, Err(ProfileError::InvalidProfile(_))),
                "{pointer}: {result:?}"
            );
        }
        // Without a joint model the profile still scores, on the per-feature checks alone.
        let mut edited = good.clone();
        edited["joint"] = Value::Null;
        let profile = Profile::from_json(&edited.to_string()).unwrap();
        let score = profile.score_row(&txn(42.0, "globex", "US", 14.0, true));
        assert_eq!((score.mahalanobis, score.out_of_distribution), (0.0, false));
        assert!(Profile::from_json("not json").is_err());
    }

    // -----------------------------------------------------------------------------------------
    // Readers
    // -----------------------------------------------------------------------------------------

    #[test]
    fn jsonl_reader() {
        let jsonl = concat!(
            "\u{feff}{\"amount\": 12.5, \"merchant\": \"acme\", \"present\": true, \"note\": null}\n",
            "\n  \n",
            "{\"amount\": 30, \"merchant\": \"globex\", \"present\": false}\n",
        );
        let rows = JsonlRows::new(jsonl.as_bytes(), None).unwrap();
        assert_eq!(rows.names(), ["amount", "merchant", "present", "note"]);
        let rows: Vec<Row<'static>> = rows.collect::<Result<_, _>>().unwrap();
        assert_eq!(
            rows,
            [
                vec![Cell::Number(12.5), Cell::from("acme"), Cell::Bool(true), Cell::Missing],
                vec![
                    Cell::Number(30.0),
                    Cell::from("globex"),
                    Cell::Bool(false),
                    Cell::Missing
                ],
            ]
        );

        let errors = [
            ("{\"a\": 1}\n{\"a\": [1]}\n", 2),
            ("{\"a\": 1}\n{\"a\": 2, \"b\": 3}\n", 2),
            ("{\"a\": 1}\n\n[1, 2]\n", 3),
            ("{\"a\": 1}\n{\"a\": \n", 2),
            ("{\"a\": {\"b\": 1}}\n", 1),
        ];
        for (jsonl, line) in errors {
            let result = JsonlRows::new(jsonl.as_bytes(), None).and_then(|rows| rows.collect::<Result<Vec<_>, _>>());
            assert!(
                matches!(result, Err(ProfileError::Jsonl { line: l, .. }) if l == line),
                "{jsonl:?}: {result:?}"
            );
        }
        assert!(matches!(
            JsonlRows::new("\n".as_bytes(), None),
            Err(ProfileError::EmptySample)
        ));

        // Explicit features: other keys are ignored, absent ones missing.
        let features = ["b".to_owned(), "a".to_owned()];
        let rows = JsonlRows::new(
            "{\"a\": 1, \"z\": [true]}\n{\"b\": \"x\"}\n".as_bytes(),
            Some(&features),
        )
        .unwrap();
        let rows: Vec<Row<'static>> = rows.collect::<Result<_, _>>().unwrap();
        assert_eq!(
            rows,
            [
                vec![Cell::Missing, Cell::Number(1.0)],
                vec![Cell::from("x"), Cell::Missing]
            ]
        );
        let twice = ["a".to_owned(), "a".to_owned()];
        assert!(matches!(
            JsonlRows::new("".as_bytes(), Some(&twice)),
            Err(ProfileError::DuplicateFeature(_))
        ));
    }

    #[test]
    fn build_from_csv_and_jsonl_files() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("sample.csv");
        let jsonl = dir.path().join("sample.jsonl");
        let mut jsonl_text = String::new();
        let mut rng = SplitMix64(11);
        let mut csv_text = String::from("amount,country,hour,card_present,extra\n");
        for i in 0..200 {
            let amount = (rng.uniform() * 10_000.0).round() / 100.0;
            let country = ["US", "CA", "GB"][i % 3];
            let hour = i % 24;
            let present = i % 4 != 0;
            writeln!(csv_text, "{amount},{country},{hour},{present},{i}").unwrap();
            let object =
                json!({"amount": amount, "country": country, "hour": hour, "card_present": present, "extra": i});
            writeln!(jsonl_text, "{object}").unwrap();
        }
        std::fs::write(&csv, csv_text).unwrap();
        std::fs::write(&jsonl, jsonl_text).unwrap();
        let options = BuildOptions {
            features: Some(["amount", "country", "hour", "card_present"].map(String::from).to_vec()),
            categorical: vec!["hour".to_owned()],
            ..BuildOptions::default()
        };
        let from_csv = build_from_file(&csv, &options).unwrap();
        let from_jsonl = build_from_file(&jsonl, &options).unwrap();
        assert_eq!(from_csv, from_jsonl);
        assert_eq!(from_csv.features().len(), 4);
        assert_eq!(categorical(&from_csv, "hour").vocabulary.len(), 24);
        assert!(categorical(&from_csv, "card_present").boolean);
        assert_eq!(from_csv.joint().unwrap().features, ["amount"]);

        let as_jsonl = BuildOptions {
            format: Some(SampleFormat::Jsonl),
            ..options.clone()
        };
        let renamed = dir.path().join("sample.txt");
        std::fs::copy(&jsonl, &renamed).unwrap();
        assert_eq!(build_from_file(&renamed, &as_jsonl).unwrap(), from_jsonl);
        assert!(matches!(
            build_from_file(&renamed, &options),
            Err(ProfileError::UnknownFormat(_))
        ));
        let missing = dir.path().join("missing.csv");
        assert!(matches!(
            build_from_file(&missing, &options),
            Err(ProfileError::Io { .. })
        ));
        assert_eq!(
            SampleFormat::from_path(Path::new("x.NDJSON")).unwrap(),
            SampleFormat::Jsonl
        );
    }

    // -----------------------------------------------------------------------------------------
    // OIP v2
    // -----------------------------------------------------------------------------------------

    fn oip_body() -> Value {
        json!({
            "id": "req-42",
            "inputs": [
                {"name": "amount", "shape": [3], "datatype": "FP64", "data": [25.0, 40000, 310.5]},
                {"name": "merchant_id", "shape": [3], "datatype": "BYTES", "data": ["globex", "gift-cards-4u", "acme"]},
                {"name": "country", "shape": [3], "datatype": "BYTES", "data": ["US", "NG", "FR"]},
                {"name": "hour", "shape": [3], "datatype": "INT32", "data": [14, 3, 23]},
                {"name": "card_present", "shape": [3], "datatype": "BOOL", "data": [true, false, false]}
            ]
        })
    }

    #[test]
    fn scores_an_oip_request() {
        let profile = demo_profile();
        let body: Value = serde_json::from_str(&oip_body().to_string()).unwrap();
        let scores = profile.score_oip(&body["inputs"]).unwrap();
        assert_eq!(scores.len(), 3);
        assert!(!scores[0].out_of_distribution, "{:?}", scores[0]);
        assert!(scores[1].out_of_distribution);
        assert_eq!(scores[1].out_of_range, ["amount"]);
        assert_eq!(scores[1].unknown_categories, ["merchant_id", "country"]);
        assert!(!scores[2].out_of_distribution, "{:?}", scores[2]);
        assert_eq!(scores[0], profile.score_row(&txn(25.0, "globex", "US", 14.0, true)));
        assert_eq!(scores[2], profile.score_row(&txn(310.5, "acme", "FR", 23.0, false)));

        // [N, 1] shapes, FP32, other integer types, another order and an input the profile
        // does not know.
        let mut body = oip_body();
        let inputs = body["inputs"].as_array_mut().unwrap();
        inputs.reverse();
        inputs.push(json!({"name": "note", "shape": [7], "datatype": "BYTES", "data": []}));
        for input in inputs.iter_mut() {
            input["shape"] = json!([3, 1]);
        }
        inputs[4]["datatype"] = json!("FP32");
        inputs[1]["datatype"] = json!("UINT8");
        let again = profile.score_oip(&body["inputs"]).unwrap();
        assert_eq!(again, scores);

        // NaN and infinities (as strings: JSON has no such numbers), and FP32 overflow, are out
        // of distribution rather than errors.
        let mut body = oip_body();
        body["inputs"][0]["data"] = json!(["NaN", "-Infinity", 1e39]);
        body["inputs"][0]["datatype"] = json!("FP32");
        let scores = profile.score_oip(&body["inputs"]).unwrap();
        for score in &scores {
            assert!(
                score.out_of_distribution && score.out_of_range.contains(&"amount".to_owned()),
                "{score:?}"
            );
        }

        // Zero rows: nothing to score.
        let mut body = oip_body();
        for input in body["inputs"].as_array_mut().unwrap() {
            input["shape"] = json!([0]);
            input["data"] = json!([]);
        }
        assert_eq!(profile.score_oip(&body["inputs"]).unwrap(), []);
    }

    #[test]
    fn hostile_oip_inputs_are_errors() {
        let profile = demo_profile();
        let check = |body: &Value, expected: fn(&OodError) -> bool| {
            let result = profile.score_oip(&body["inputs"]);
            match result {
                Err(error) if expected(&error) => assert!(!error.to_string().is_empty()),
                other => panic!("{body}: {other:?}"),
            }
        };
        let edit = |pointer: &str, value: Value| {
            let mut body = oip_body();
            *body.pointer_mut(pointer).unwrap() = value;
            body
        };
        check(&json!({"inputs": {"amount": []}}), |e| *e == OodError::NotAnArray);
        check(&json!({}), |e| *e == OodError::NotAnArray);
        check(&json!({"inputs": [1]}), |e| {
            matches!(e, OodError::BadTensor { index: 0, .. })
        });
        check(&json!({"inputs": [{"shape": [1]}]}), |e| {
            matches!(e, OodError::BadTensor { .. })
        });
        check(&json!({"inputs": []}), |e| {
            *e == OodError::MissingTensor("amount".to_owned())
        });
        let mut body = oip_body();
        body["inputs"].as_array_mut().unwrap().remove(4);
        check(&body, |e| *e == OodError::MissingTensor("card_present".to_owned()));
        let mut body = oip_body();
        let copy = body["inputs"][0].clone();
        body["inputs"].as_array_mut().unwrap().push(copy);
        check(&body, |e| *e == OodError::DuplicateTensor("amount".to_owned()));

        for (pointer, datatype) in [
            ("/inputs/0/datatype", "BYTES"),
            ("/inputs/0/datatype", "BOOL"),
            ("/inputs/2/datatype", "FP64"),
            ("/inputs/2/datatype", "BOOL"),
            ("/inputs/3/datatype", "BOOL"),
            ("/inputs/4/datatype", "INT32"),
            ("/inputs/0/datatype", "COMPLEX128"),
            ("/inputs/0/datatype", "fp64"),
        ] {
            check(&edit(pointer, json!(datatype)), |e| {
                matches!(e, OodError::WrongDatatype { .. })
            });
        }
        for (pointer, value) in [
            ("/inputs/0/datatype", json!(64)),
            ("/inputs/0/shape", json!([-1])),
            ("/inputs/0/shape", json!([3.0])),
            ("/inputs/0/shape", json!([1e300])),
            ("/inputs/0/shape", json!([3, 2])),
            ("/inputs/0/shape", json!([3, 1, 0])),
            ("/inputs/0/shape", json!([])),
            ("/inputs/0/shape", json!("3")),
            ("/inputs/0/data", json!("25.0")),
            ("/inputs/0/data", Value::Null),
        ] {
            check(&edit(pointer, value), |e| matches!(e, OodError::BadInput { .. }));
        }
        for shape in [
            json!([u64::MAX]),
            json!([4]),
            json!([2]),
            json!([1_000_000_000_000_u64]),
        ] {
            check(&edit("/inputs/1/shape", shape), |e| {
                matches!(e, OodError::DataLength { .. })
            });
        }
        let mut body = oip_body();
        body["inputs"][3]["shape"] = json!([2]);
        body["inputs"][3]["data"] = json!([1, 2]);
        check(&body, |e| {
            matches!(
                e,
                OodError::RowCountMismatch {
                    rows: 2,
                    first_rows: 3,
                    ..
                }
            )
        });

        for (pointer, value, datatype) in [
            ("/inputs/0/data/1", json!("40000"), None),
            ("/inputs/0/data/1", Value::Null, None),
            ("/inputs/0/data/1", json!([40000]), None),
            ("/inputs/3/data/0", json!(1.5), None),
            ("/inputs/3/data/0", json!("14"), None),
            ("/inputs/3/data/0", json!(1_i64 << 40), None),
            ("/inputs/3/data/0", json!(300), Some("INT8")),
            ("/inputs/3/data/0", json!(-1), Some("UINT8")),
            ("/inputs/4/data/0", json!(1), None),
            ("/inputs/1/data/2", json!(["nested"]), None),
            ("/inputs/1/data/2", json!(7.5), None),
        ] {
            let mut body = edit(pointer, value);
            if let Some(datatype) = datatype {
                let tensor = pointer.rsplitn(3, '/').nth(2).unwrap();
                *body.pointer_mut(&format!("{tensor}/datatype")).unwrap() = json!(datatype);
            }
            check(&body, |e| matches!(e, OodError::BadElement { .. }));
        }
    }

    #[test]
    fn random_mutations_of_oip_requests_never_panic() {
        let profile = demo_profile();
        let pool = [
            json!(null),
            json!(true),
            json!(-1),
            json!(0),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(1e308),
            json!(-1e-308),
            json!("NaN"),
            json!("-inf"),
            json!(""),
            json!("FP32"),
            json!("BYTES"),
            json!("INT8"),
            json!("amount"),
            json!([]),
            json!([3]),
            json!([3, 1]),
            json!([[1]]),
            json!({}),
            json!({"name": "hour"}),
        ];
        let fields = ["name", "shape", "datatype", "data"];
        let mut rng = SplitMix64(99);
        let (mut ok, mut errors) = (0, 0);
        for _ in 0..3000 {
            let mut body = oip_body();
            for _ in 0..1 + rng.next_u64() % 3 {
                let tensor = rng.next_u64() % 5;
                let field = fields[(rng.next_u64() % 4) as usize];
                let value = pool[(rng.next_u64() % pool.len() as u64) as usize].clone();
                let target = if field == "data" && rng.uniform() < 0.5 {
                    format!("/inputs/{tensor}/data/{}", rng.next_u64() % 3)
                } else {
                    format!("/inputs/{tensor}/{field}")
                };
                if let Some(slot) = body.pointer_mut(&target) {
                    *slot = value;
                }
            }
            match profile.score_oip(&body["inputs"]) {
                Ok(scores) => {
                    ok += 1;
                    assert!(scores.iter().all(|s| s.score.is_finite() && s.mahalanobis.is_finite()));
                }
                Err(_) => errors += 1,
            }
        }
        assert!(ok > 0 && errors > 0, "{ok} ok, {errors} errors");
    }

    // -----------------------------------------------------------------------------------------
    // The shipped demo profile
    // -----------------------------------------------------------------------------------------

    #[test]
    fn shipped_demo_profile_accepts_its_sample_and_rejects_anomalies() {
        let profile = Profile::load(&manifest_path(SHIPPED_PROFILE)).unwrap();
        let names: Vec<&str> = profile.features().iter().map(FeatureProfile::name).collect();
        assert_eq!(names, ["amount", "merchant_id", "country", "hour", "card_present"]);
        assert_eq!(profile.sample_rows(), DEMO_ROWS as u64);

        let file = File::open(manifest_path(SHIPPED_SAMPLE)).unwrap();
        let rows = CsvRows::new(BufReader::new(file), None).unwrap();
        assert_eq!(rows.names(), names);
        let rows: Vec<Row<'static>> = rows.collect::<Result<_, _>>().unwrap();
        let accepted = rows
            .iter()
            .filter(|row| !profile.score_row(row).out_of_distribution)
            .count();
        assert!(accepted * 100 >= rows.len() * 99, "{accepted} of {}", rows.len());

        // The same rows as OIP batches score the same.
        let batch = &rows[..500];
        let column = |index: usize, datatype: &str| {
            let data: Vec<Value> = batch
                .iter()
                .map(|row| match (&row[index], datatype) {
                    (Cell::Text(text), "FP64" | "INT32") => json!(text.parse::<f64>().unwrap()),
                    (Cell::Text(text), "BOOL") => json!(text.as_ref() == "true"),
                    (Cell::Text(text), _) => json!(text),
                    (other, _) => panic!("{other:?}"),
                })
                .collect();
            json!({"name": names[index], "shape": [batch.len()], "datatype": datatype, "data": data})
        };
        let mut inputs = json!([
            column(0, "FP64"),
            column(1, "BYTES"),
            column(2, "BYTES"),
            column(3, "INT32"),
            column(4, "BOOL")
        ]);
        for tensor in inputs.as_array_mut().unwrap() {
            if tensor["datatype"] == "INT32" {
                let ints: Vec<i64> = tensor["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as i64)
                    .collect();
                tensor["data"] = json!(ints);
            }
        }
        let scores = profile.score_oip(&inputs).unwrap();
        let expected: Vec<RowScore> = batch.iter().map(|row| profile.score_row(row)).collect();
        assert_eq!(scores, expected);

        let anomalous = profile.score_row(&txn(50_000.0, "casino-royale", "NG", 3.0, false));
        assert!(anomalous.out_of_distribution);
        assert_eq!(anomalous.out_of_range, ["amount"]);
        assert_eq!(anomalous.unknown_categories, ["merchant_id", "country"]);
        // Every value in range and known, but a $1,400 purchase at 3 a.m. is far from the sample.
        let unusual = profile.score_row(&txn(1_400.0, "acme", "US", 3.0, true));
        assert!(unusual.out_of_distribution && !unusual.has_violation(), "{unusual:?}");
        assert!(unusual.mahalanobis > profile.threshold());
    }

    /// Numbers equal to 1e-9 relative, everything else exactly.
    fn assert_json_close(a: &Value, b: &Value, at: &str) {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => {
                assert!(close(x.as_f64().unwrap(), y.as_f64().unwrap()), "{at}: {x} != {y}");
            }
            (Value::Array(x), Value::Array(y)) => {
                assert_eq!(x.len(), y.len(), "{at}");
                for (i, (x, y)) in x.iter().zip(y).enumerate() {
                    assert_json_close(x, y, &format!("{at}/{i}"));
                }
            }
            (Value::Object(x), Value::Object(y)) => {
                assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{at}");
                for (key, x) in x {
                    assert_json_close(x, &y[key], &format!("{at}/{key}"));
                }
            }
            _ => assert_eq!(a, b, "{at}"),
        }
    }

    #[test]
    fn shipped_demo_files_are_reproducible() {
        let shipped = std::fs::read_to_string(manifest_path(SHIPPED_SAMPLE)).unwrap();
        let generated = demo_sample_csv(DEMO_ROWS, DEMO_SEED);
        assert_eq!(shipped.lines().count(), DEMO_ROWS + 1);
        for (line, (a, b)) in shipped.lines().zip(generated.lines()).enumerate() {
            let (a, b): (Vec<&str>, Vec<&str>) = (a.split(',').collect(), b.split(',').collect());
            assert_eq!(a[1..], b[1..], "line {}", line + 1);
            if line > 0 {
                // Amounts may differ by a cent where another platform's `exp` rounds differently.
                let (x, y): (f64, f64) = (a[0].parse().unwrap(), b[0].parse().unwrap());
                assert!((x - y).abs() < 0.011, "line {}: {x} != {y}", line + 1);
            }
        }
        let rebuilt = build_from_file(&manifest_path(SHIPPED_SAMPLE), &BuildOptions::default()).unwrap();
        let rebuilt: Value = serde_json::from_str(&rebuilt.to_json().unwrap()).unwrap();
        let shipped: Value =
            serde_json::from_str(&std::fs::read_to_string(manifest_path(SHIPPED_PROFILE)).unwrap()).unwrap();
        assert_json_close(&rebuilt, &shipped, "");
    }

    /// `cargo test --release --lib validate::ood::tests::scoring_cost -- --ignored --nocapture`
    #[test]
    #[ignore = "timing; run by hand"]
    fn scoring_cost() {
        let profile = demo_profile();
        let rows = [
            txn(42.0, "globex", "US", 14.0, true),
            txn(50_000.0, "casino-royale", "NG", 3.0, false),
        ];
        let n = 1_000_000;
        for (what, row) in ["in-profile", "anomalous"].iter().zip(&rows) {
            let start = Instant::now();
            let mut flagged = 0;
            for _ in 0..n {
                flagged += usize::from(profile.score_row(std::hint::black_box(row)).out_of_distribution);
            }
            let per_row = start.elapsed().as_nanos() as f64 / n as f64;
            println!("score_row, {what}: {per_row:.0} ns/row ({flagged} flagged)");
        }

        let rows = 10_000;
        let inputs = json!([
            {"name": "amount", "shape": [rows], "datatype": "FP64", "data": vec![42.5; rows]},
            {"name": "merchant_id", "shape": [rows], "datatype": "BYTES", "data": vec!["globex"; rows]},
            {"name": "country", "shape": [rows], "datatype": "BYTES", "data": vec!["US"; rows]},
            {"name": "hour", "shape": [rows], "datatype": "INT32", "data": vec![14; rows]},
            {"name": "card_present", "shape": [rows], "datatype": "BOOL", "data": vec![true; rows]}
        ]);
        let start = Instant::now();
        let scores = profile.score_oip(&inputs).unwrap();
        let per_row = start.elapsed().as_nanos() as f64 / rows as f64;
        println!("score_oip: {per_row:.0} ns/row over {} rows", scores.len());
    }
}
