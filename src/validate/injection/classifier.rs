//! The embedded logistic-regression model.
//!
//! `models/injection/model.bin`, written by `tools/train_injection`, is
//! compiled into the binary with `include_bytes!`; nothing is read from disk
//! at run time. Layout (all integers little-endian):
//!
//! | bytes | content |
//! |---|---|
//! | 4 | magic `WPIM` |
//! | 4 | `u32` length *n* of the header |
//! | *n* | JSON header: format, version, feature settings, threshold, training provenance, cross-validation metrics |
//! | 4 | `f32` scale |
//! | 4 | `f32` bias |
//! | [`BUCKETS`] | one `i8` weight per hash bucket; weight = `i8 × scale` |
//!
//! The weights are used in place (a `&'static [u8]`): loading parses only the
//! header.

use serde::Deserialize;

use super::features::{self, BUCKETS, CHAR_NGRAMS, HASHING, Linear, Scratch, WINDOW_CHARS, WINDOW_STEP, WORD_NGRAMS};

/// The model shipped with warden.
pub static EMBEDDED: &[u8] = include_bytes!("../../../models/injection/model.bin");

const MAGIC: &[u8; 4] = b"WPIM";
const FORMAT: &str = "warden-injection-linear";
const VERSION: u32 = 1;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file does not start with the magic bytes or is cut short.
    #[error("not a warden injection model: {0}")]
    Malformed(&'static str),
    /// The JSON header does not parse.
    #[error("model header: {0}")]
    Header(#[from] serde_json::Error),
    /// The header describes features this build does not extract.
    #[error("model was trained with different features: {0}")]
    Mismatch(String),
    /// The signature rules did not compile.
    #[error("injection rules: {0}")]
    Rules(String),
}

/// The window settings recorded in the header.
#[derive(Debug, Clone, Deserialize)]
pub struct Windows {
    /// Window length in characters.
    pub chars: usize,
    /// Distance between window starts.
    pub step: usize,
}

/// Where the training data came from, as recorded in the header.
#[derive(Debug, Clone, Deserialize)]
pub struct Training {
    /// SHA-256 of the data file trained from.
    pub data_sha256: String,
    /// SHA-256 of the rows actually used.
    pub rows_sha256: String,
    /// Sources left out.
    pub excluded_sources: Vec<String>,
    /// Rows trained on, per class.
    pub rows: RowCounts,
}

/// Rows per class.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct RowCounts {
    /// Injection rows.
    pub injection: usize,
    /// Benign rows.
    pub benign: usize,
}

/// Cross-validation figures recorded in the header.
#[derive(Debug, Clone, Deserialize)]
pub struct CrossValidation {
    /// Out-of-fold ROC AUC of the classifier.
    pub auc: f64,
    /// Out-of-fold TPR at 1% FPR of the classifier alone.
    pub classifier_tpr_at_1pct_fpr: f64,
    /// Out-of-fold TPR of the shipped decision (threshold or rule).
    pub with_rules_tpr: f64,
    /// Out-of-fold FPR of the shipped decision.
    pub with_rules_fpr: f64,
}

/// The parts of the JSON header that are checked or reported.
#[derive(Debug, Clone, Deserialize)]
pub struct Header {
    /// Always `warden-injection-linear`.
    pub format: String,
    /// Format version.
    pub version: u32,
    /// Number of hash buckets.
    pub buckets: usize,
    /// Hashing scheme name.
    pub hashing: String,
    /// Word n-gram range.
    pub word_ngrams: [usize; 2],
    /// Character n-gram range.
    pub char_ngrams: [usize; 2],
    /// Window settings.
    pub windows: Windows,
    /// Default decision threshold on the probability.
    pub threshold: f32,
    /// Training provenance.
    pub training: Training,
    /// Cross-validation metrics.
    pub cv: CrossValidation,
}

/// A loaded model: the header and the weights, borrowed from the model bytes.
#[derive(Debug, Clone)]
pub struct Model {
    header: Header,
    linear: Linear<'static>,
}

impl Model {
    /// The model compiled into this binary.
    pub fn embedded() -> Result<Model, ModelError> {
        Model::parse(EMBEDDED)
    }

    /// Parses a model file (see the module documentation) and checks that
    /// it was trained with the features this build extracts.
    pub fn parse(bytes: &'static [u8]) -> Result<Model, ModelError> {
        let rest = bytes.strip_prefix(MAGIC).ok_or(ModelError::Malformed("bad magic"))?;
        let (len, rest) = rest
            .split_first_chunk::<4>()
            .ok_or(ModelError::Malformed("truncated"))?;
        let len = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| ModelError::Malformed("header length"))?;
        if rest.len() < len {
            return Err(ModelError::Malformed("truncated header"));
        }
        let (json, rest) = rest.split_at(len);
        let header: Header = serde_json::from_slice(json)?;
        let (scale, rest) = rest
            .split_first_chunk::<4>()
            .ok_or(ModelError::Malformed("truncated"))?;
        let (bias, weights) = rest
            .split_first_chunk::<4>()
            .ok_or(ModelError::Malformed("truncated"))?;
        if weights.len() != BUCKETS {
            return Err(ModelError::Malformed("weight count"));
        }
        let expected = (
            FORMAT,
            VERSION,
            BUCKETS,
            HASHING,
            [WORD_NGRAMS.0, WORD_NGRAMS.1],
            [CHAR_NGRAMS.0, CHAR_NGRAMS.1],
            (WINDOW_CHARS, WINDOW_STEP),
        );
        let found = (
            header.format.as_str(),
            header.version,
            header.buckets,
            header.hashing.as_str(),
            header.word_ngrams,
            header.char_ngrams,
            (header.windows.chars, header.windows.step),
        );
        if expected != found {
            return Err(ModelError::Mismatch(format!("expected {expected:?}, found {found:?}")));
        }
        if !(0.0..=1.0).contains(&header.threshold) {
            return Err(ModelError::Mismatch(format!(
                "threshold {} is not a probability",
                header.threshold
            )));
        }
        let linear = Linear {
            weights,
            scale: f32::from_le_bytes(*scale),
            bias: f32::from_le_bytes(*bias),
        };
        Ok(Model { header, linear })
    }

    /// The probability that one canonical view is an injection: the logistic
    /// of the highest logit over the view and its windows.
    pub fn probability(&self, view: &str, scratch: &mut Scratch) -> f32 {
        features::sigmoid(self.linear.logit(view, scratch))
    }

    /// The threshold chosen at training time.
    pub fn threshold(&self) -> f32 {
        self.header.threshold
    }

    /// The model's header.
    pub fn header(&self) -> &Header {
        &self.header
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_model_loads() {
        let model = Model::embedded().unwrap();
        let h = model.header();
        assert_eq!(h.buckets, BUCKETS);
        assert!(h.threshold > 0.0 && h.threshold < 1.0);
        assert_eq!(
            h.training.excluded_sources,
            vec!["prompt-armor-0.9.1:llmail-inject".to_owned()]
        );
        assert_eq!(h.training.data_sha256.len(), 64);
        assert!(h.cv.auc > 0.9);
    }

    #[test]
    fn malformed_models_are_refused() {
        assert!(matches!(Model::parse(b"nope"), Err(ModelError::Malformed(_))));
        assert!(matches!(
            Model::parse(b"WPIM\x05\x00\x00\x00{}"),
            Err(ModelError::Malformed(_))
        ));
        assert!(matches!(
            Model::parse(b"WPIM\x02\x00\x00\x00{}"),
            Err(ModelError::Header(_))
        ));
        // A correct header with the weights cut off.
        let cut: &'static [u8] = EMBEDDED[..EMBEDDED.len() - 1].to_vec().leak();
        assert!(matches!(Model::parse(cut), Err(ModelError::Malformed("weight count"))));
    }
}
