//! Trains warden's prompt-injection classifier: L2-regularised logistic
//! regression (AdaGrad SGD) over the hashed n-gram features of
//! `src/validate/injection/features.rs`, on the `train` split of the
//! prompt-injection development set, without the `llmail-inject` rows.
//!
//! ```sh
//! cargo run --release --manifest-path tools/train_injection/Cargo.toml \
//!     --target-dir target/train_injection -- \
//!     --data /work/shared/data/prompt-injection/dev.jsonl --out models/injection
//! ```
//!
//! Steps:
//! 1. every training row is turned into views exactly as the detector does
//!    (`normalize::views`), and every view into its scoring units (the view
//!    itself, or overlapping windows when it is longer than 400 characters;
//!    `features::windows`). A benign row's units are all benign instances;
//!    an injection row is a bag of all its units, of which the
//!    highest-scoring one is trained on (multiple-instance learning, as the
//!    detector takes the highest score). 1,000 long synthetic benign
//!    documents (benign training rows joined) are added so that long text
//!    does not look like injection by itself;
//! 2. rows are grouped (rows sharing a word 8-gram, e.g. an attack and its
//!    mechanical rewrites, or template documents, form one group) and the
//!    hyperparameters (L2 strength, epochs, benign weight) are chosen by
//!    5-fold grouped cross-validation on the mean out-of-fold TPR at 0.5%,
//!    1% and 2% FPR;
//! 3. the decision threshold is chosen on the out-of-fold scores of the
//!    chosen configuration so that (score >= threshold OR a rule matched)
//!    flags at most 1% of benign training rows;
//! 4. the final model is trained on all training rows (AdaGrad SGD,
//!    weights averaged over the second half of the epochs), quantised to i8
//!    and written to `model.bin` with a JSON header; `sample.jsonl` holds a
//!    fixed sample of training rows with the scores this program computed
//!    for them, which warden's tests check the embedded model reproduces;
//!    `training-report.json` repeats the header with the model's SHA-256.
//!
//! Other flags: `--quick` (one configuration, from the environment:
//! LAMBDA, EPOCHS, BENIGN_WEIGHT, SYNTHETIC, SYNTHETIC_WEIGHT, AVERAGE,
//! SATML_WEIGHT), `--dump-oof PATH` (out-of-fold scores per row, JSON
//! lines), `--time FILE` (time the detector's parts on a text),
//! `--check-rules` (prove the rules' literal groups sound and check that
//! the literal scan changes no rule hit on any row of `--data`).
//!
//! Deterministic: the same data gives the same bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../src/validate/injection/features.rs"]
#[allow(dead_code)]
mod features;
#[path = "../../src/validate/injection/normalize.rs"]
#[allow(dead_code)]
mod normalize;
#[path = "../../src/validate/injection/rules.rs"]
#[allow(dead_code)]
mod rules;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use features::{BUCKETS, Linear, Scratch};

/// Rows from this source are never used (licence not confirmed).
const EXCLUDED_SOURCES: &[&str] = &["prompt-armor-0.9.1:llmail-inject"];
const FOLDS: usize = 5;
const TARGET_FPR: f64 = 0.01;
const LEARNING_RATE: f32 = 0.2;
const SAMPLE_PER_CLASS: usize = 20;

struct Row {
    id: String,
    text: String,
    injection: bool,
    source: String,
    /// Per view, the feature vectors of its scoring units (the view, or its
    /// windows when it is long): L2-normalised, sparse.
    views: Vec<Vec<Vec<(u32, f32)>>>,
    /// Rule ids matched on any view or by the signals.
    rules: Vec<&'static str>,
    group: usize,
}

#[derive(Clone, Copy, Debug)]
struct Params {
    lambda: f32,
    epochs: usize,
    benign_weight: f32,
    /// Synthetic long benign documents (see `synthetic_benign`).
    synthetic: usize,
    /// Their total weight, relative to one benign row each.
    synthetic_weight: f32,
    /// Average the weights over the second half of the epochs.
    average: bool,
    /// Weight of the noisy SaTML CTF rows, relative to other injections.
    satml_weight: f32,
}

struct Model {
    weights: Vec<f32>,
    bias: f32,
}

struct Quantised {
    weights: Vec<u8>,
    scale: f32,
    bias: f32,
}

impl Quantised {
    fn linear(&self) -> Linear<'_> {
        Linear {
            weights: &self.weights,
            scale: self.scale,
            bias: self.bias,
        }
    }
}

/// xorshift64*: a small deterministic generator for shuffling.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

fn sigmoid(z: f32) -> f32 {
    features::sigmoid(z)
}

/// One training example: one or more candidate vectors (a row's views and
/// their windows). Benign examples push every candidate down; injection
/// examples push up the candidate that scores highest (multiple-instance
/// learning with max pooling, as the detector takes the highest score), so
/// that the benign parts of a long document with one injected sentence are
/// not learned as injection.
struct Example<'a> {
    candidates: Vec<&'a [(u32, f32)]>,
    injection: bool,
    weight: f32,
}

fn examples<'a>(
    rows: &'a [Row],
    use_row: &[bool],
    synthetic: &'a [Vec<Vec<(u32, f32)>>],
    p: Params,
) -> Vec<Example<'a>> {
    let pos = rows.iter().zip(use_row).filter(|(r, u)| **u && r.injection).count() as f32;
    let neg = rows.iter().zip(use_row).filter(|(r, u)| **u && !r.injection).count() as f32;
    let total = pos + neg;
    let w_pos = total / (2.0 * pos);
    let w_neg = total / (2.0 * neg) * p.benign_weight;
    let mut out = Vec::new();
    for (r, &used) in rows.iter().zip(use_row) {
        if !used {
            continue;
        }
        if r.injection {
            let candidates = r.views.iter().flatten().map(Vec::as_slice).collect();
            // The SaTML CTF rows are attacker chat turns, often with no cue.
            let w = if r.source.contains("satml") {
                w_pos * p.satml_weight
            } else {
                w_pos
            };
            out.push(Example {
                candidates,
                injection: true,
                weight: w,
            });
        } else {
            for units in &r.views {
                // A long view's windows share twice a short view's weight.
                let w = if units.len() > 1 {
                    2.0 * w_neg / units.len() as f32
                } else {
                    w_neg
                };
                for v in units {
                    out.push(Example {
                        candidates: vec![v],
                        injection: false,
                        weight: w,
                    });
                }
            }
        }
    }
    for doc in synthetic {
        let n = doc.len() as f32;
        for v in doc {
            out.push(Example {
                candidates: vec![v],
                injection: false,
                weight: w_neg * p.synthetic_weight / n,
            });
        }
    }
    out
}

/// Long benign documents built by joining benign training rows (of the
/// rows in use only), so that the model sees long benign text: the data's
/// benign rows are mostly short and its injections mostly long. Each
/// document is its vector and its windows' vectors.
fn synthetic_benign(rows: &[Row], use_row: &[bool], count: usize, scratch: &mut Scratch) -> Vec<Vec<Vec<(u32, f32)>>> {
    let mut benign: Vec<&str> = rows
        .iter()
        .zip(use_row)
        .filter(|(r, u)| **u && !r.injection)
        .map(|(r, _)| r.text.as_str())
        .collect();
    let mut rng = Rng(0x5eed_0fbe_919e);
    rng.shuffle(&mut benign);
    let mut out = Vec::with_capacity(count);
    let mut at = 0;
    for _ in 0..count {
        let target = 200 + (rng.next() % 1800) as usize;
        let mut doc = String::new();
        while doc.len() < target && !benign.is_empty() {
            if !doc.is_empty() {
                doc.push_str(if rng.next().is_multiple_of(2) { " " } else { "\n\n" });
            }
            doc.push_str(benign[at % benign.len()]);
            at += 1;
        }
        let canon = normalize::canonical(&doc);
        let mut vectors = Vec::new();
        features::for_each_window_features(&canon, scratch, |_, v| vectors.push(v.to_vec()));
        out.push(vectors);
    }
    out
}

fn train(rows: &[Row], use_row: &[bool], p: Params, scratch: &mut Scratch) -> Model {
    let synthetic = synthetic_benign(rows, use_row, p.synthetic, scratch);
    let inst = examples(rows, use_row, &synthetic, p);
    let mut w = vec![0.0f32; BUCKETS];
    let mut g2 = vec![0.0f32; BUCKETS];
    let mut b = 0.0f32;
    let mut gb2 = 0.0f32;
    let mut order: Vec<usize> = (0..inst.len()).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Polyak averaging: the model is the mean of the weights at the end of
    // each epoch of the second half, which smooths out SGD's noise.
    let mut avg = vec![0.0f32; BUCKETS];
    let mut avg_b = 0.0f32;
    let mut averaged = 0usize;
    for epoch in 0..p.epochs {
        rng.shuffle(&mut order);
        for &i in &order {
            let e = &inst[i];
            let dot = |x: &[(u32, f32)]| x.iter().map(|&(j, v)| w[j as usize] * v).sum::<f32>();
            let (x, z) = e
                .candidates
                .iter()
                .map(|x| (*x, b + dot(x)))
                .max_by(|a, c| a.1.total_cmp(&c.1))
                .expect("an example has a candidate");
            let y = if e.injection { 1.0 } else { 0.0 };
            let err = (sigmoid(z) - y) * e.weight;
            for &(j, v) in x {
                let j = j as usize;
                let g = err * v + p.lambda * w[j];
                g2[j] += g * g;
                w[j] -= LEARNING_RATE * g / (g2[j].sqrt() + 1e-8);
            }
            gb2 += err * err;
            b -= LEARNING_RATE * err / (gb2.sqrt() + 1e-8);
        }
        if p.average && epoch >= p.epochs / 2 {
            for (a, x) in avg.iter_mut().zip(&w) {
                *a += x;
            }
            avg_b += b;
            averaged += 1;
        }
    }
    if averaged > 0 {
        let n = averaged as f32;
        return Model {
            weights: avg.into_iter().map(|a| a / n).collect(),
            bias: avg_b / n,
        };
    }
    Model { weights: w, bias: b }
}

fn quantise(m: &Model) -> Quantised {
    let max = m.weights.iter().fold(0.0f32, |a, w| a.max(w.abs()));
    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
    let weights = m
        .weights
        .iter()
        .map(|w| ((w / scale).round().clamp(-127.0, 127.0) as i8) as u8)
        .collect();
    Quantised {
        weights,
        scale,
        bias: m.bias,
    }
}

/// A row's score exactly as the detector computes it: the highest
/// probability over the row's views, each view scored whole and in windows.
fn row_score(q: &Quantised, text: &str, scratch: &mut Scratch) -> f32 {
    let linear = q.linear();
    normalize::views(text)
        .views
        .iter()
        .map(|v| features::sigmoid(linear.logit(&v.text, scratch)))
        .fold(0.0f32, f32::max)
}

fn row_rules(text: &str) -> Vec<&'static str> {
    let v = normalize::views(text);
    let mut out = Vec::new();
    for view in &v.views {
        rules::match_text(&view.text, &mut out);
    }
    rules::match_signals(&v.signals, &mut out);
    out
}

struct Union(Vec<usize>);

impl Union {
    fn find(&mut self, x: usize) -> usize {
        let mut r = x;
        while self.0[r] != r {
            r = self.0[r];
        }
        let mut x = x;
        while self.0[x] != r {
            let next = self.0[x];
            self.0[x] = r;
            x = next;
        }
        r
    }
    fn join(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.0[a.max(b)] = a.min(b);
        }
    }
}

/// Groups rows that share a word 8-gram of their canonical text.
fn groups(texts: &[String]) -> Vec<usize> {
    let mut u = Union((0..texts.len()).collect());
    let mut first: HashMap<Vec<&str>, usize> = HashMap::new();
    for (i, t) in texts.iter().enumerate() {
        let words: Vec<&str> = t
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        if words.len() < 8 {
            // Short texts: the whole word sequence is the key.
            match first.get(&words) {
                Some(&j) => u.join(i, j),
                None => {
                    first.insert(words, i);
                }
            }
            continue;
        }
        for g in words.windows(8) {
            match first.get(g) {
                Some(&j) => u.join(i, j),
                None => {
                    first.insert(g.to_vec(), i);
                }
            }
        }
    }
    (0..texts.len()).map(|i| u.find(i)).collect()
}

fn fnv(s: &[u8]) -> u64 {
    s.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Area under the ROC curve (ties count half).
fn auc(scores: &[(f32, bool)]) -> f64 {
    let mut s: Vec<(f32, bool)> = scores.to_vec();
    s.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut i) = (0.0f64, 0usize);
    while i < s.len() {
        let mut j = i;
        while j < s.len() && s[j].0 == s[i].0 {
            j += 1;
        }
        let avg = (i + j + 1) as f64 / 2.0; // ranks are 1-based
        rank_sum += avg * s[i..j].iter().filter(|x| x.1).count() as f64;
        i = j;
    }
    let pos = s.iter().filter(|x| x.1).count() as f64;
    let neg = s.len() as f64 - pos;
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// The best operating point with FPR <= `target`: rows flagged by a rule are
/// always positive; others are positive when score >= threshold. Returns
/// (threshold, tpr, fpr).
fn operating_point(rows: &[(f32, bool, bool)], target: f64) -> (f32, f64, f64) {
    let benign: Vec<&(f32, bool, bool)> = rows.iter().filter(|r| !r.1).collect();
    let injections = rows.len() - benign.len();
    let allowed = (target * benign.len() as f64).floor() as usize;
    let ruled = benign.iter().filter(|r| r.2).count();
    let mut free: Vec<f32> = benign.iter().filter(|r| !r.2).map(|r| r.0).collect();
    free.sort_by(|a, b| b.total_cmp(a));
    let threshold = if ruled > allowed {
        f32::INFINITY
    } else {
        let k = allowed - ruled;
        match (k.checked_sub(1).and_then(|i| free.get(i)), free.get(k)) {
            (_, None) => 0.0,
            (None, Some(&next)) => next_up(next),
            (Some(&last_allowed), Some(&next)) => {
                if last_allowed > next {
                    // Midway between the last allowed and the first excluded.
                    let mid = next + (last_allowed - next) / 2.0;
                    if mid > next { mid } else { next_up(next) }
                } else {
                    next_up(next)
                }
            }
        }
    };
    let tp = rows.iter().filter(|r| r.1 && (r.2 || r.0 >= threshold)).count();
    let fp = benign.iter().filter(|r| r.2 || r.0 >= threshold).count();
    (
        threshold,
        tp as f64 / injections as f64,
        fp as f64 / benign.len() as f64,
    )
}

fn next_up(x: f32) -> f32 {
    if x >= 1.0 {
        f32::INFINITY
    } else {
        f32::from_bits(x.to_bits() + 1)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn main() {
    let mut data = PathBuf::from("/work/shared/data/prompt-injection/dev.jsonl");
    let mut out = PathBuf::from("models/injection");
    let mut quick = false;
    let mut dump: Option<PathBuf> = None;
    let mut time: Option<String> = None;
    let mut check = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--data" => data = args.next().expect("--data PATH").into(),
            "--out" => out = args.next().expect("--out DIR").into(),
            "--quick" => quick = true,
            "--dump-oof" => dump = Some(args.next().expect("--dump-oof PATH").into()),
            "--time" => time = Some(args.next().expect("--time FILE")),
            "--check-rules" => check = true,
            other => panic!(
                "unknown argument {other} (expected --data PATH, --out DIR, --quick, --dump-oof PATH, --time FILE, --check-rules)"
            ),
        }
    }
    if let Some(file) = time {
        time_components(&file, &data);
        return;
    }
    if check {
        check_rules(&data);
        return;
    }
    let raw = std::fs::read(&data).unwrap_or_else(|e| panic!("reading {}: {e}", data.display()));
    let data_sha = hex(&Sha256::digest(&raw));
    let text = std::str::from_utf8(&raw).expect("UTF-8");
    let mut used_lines = Sha256::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut excluded = 0usize;
    let mut scratch = Scratch::default();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).expect("JSON line");
        if v["split"] != "train" {
            continue;
        }
        let source = v["source"].as_str().expect("source").to_owned();
        if EXCLUDED_SOURCES.contains(&source.as_str()) {
            excluded += 1;
            continue;
        }
        used_lines.update(line.as_bytes());
        used_lines.update(b"\n");
        let text = v["text"].as_str().expect("text").to_owned();
        let injection = match v["label"].as_str() {
            Some("injection") => true,
            Some("benign") => false,
            other => panic!("label {other:?}"),
        };
        let views = normalize::views(&text);
        let mut vectors = Vec::new();
        for w in &views.views {
            let mut units = Vec::new();
            features::for_each_window_features(&w.text, &mut scratch, |_, v| units.push(v.to_vec()));
            vectors.push(units);
        }
        let rules = row_rules(&text);
        rows.push(Row {
            id: v["id"].as_str().expect("id").to_owned(),
            text,
            injection,
            source,
            views: vectors,
            rules,
            group: 0,
        });
    }
    let rows_sha = hex(&used_lines.finalize());
    let canon: Vec<String> = rows.iter().map(|r| normalize::canonical(&r.text)).collect();
    for (r, g) in rows.iter_mut().zip(groups(&canon)) {
        r.group = g;
    }
    let n_inj = rows.iter().filter(|r| r.injection).count();
    let n_ben = rows.len() - n_inj;
    let mut group_sizes: BTreeMap<usize, usize> = BTreeMap::new();
    for r in &rows {
        *group_sizes.entry(r.group).or_default() += 1;
    }
    let largest = group_sizes.values().copied().max().unwrap_or(0);
    eprintln!(
        "training rows: {} ({n_inj} injection, {n_ben} benign; {excluded} excluded rows); {} groups, largest {largest}",
        rows.len(),
        group_sizes.len()
    );

    // Rule precision on the training rows.
    let ruled_benign: Vec<&Row> = rows.iter().filter(|r| !r.injection && !r.rules.is_empty()).collect();
    let ruled_inj = rows.iter().filter(|r| r.injection && !r.rules.is_empty()).count();
    eprintln!(
        "rules: {ruled_inj}/{n_inj} injection rows, {}/{n_ben} benign rows",
        ruled_benign.len()
    );
    for r in &ruled_benign {
        eprintln!(
            "  benign rule hit {:?}: {:?}",
            r.rules,
            r.text.chars().take(160).collect::<String>()
        );
    }

    // Folds by group.
    let fold_of: Vec<usize> = rows
        .iter()
        .map(|r| (fnv(rows[r.group].id.as_bytes()) % FOLDS as u64) as usize)
        .collect();

    let grid: Vec<Params> = if quick {
        let env = |k: &str, d: f32| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
        vec![Params {
            lambda: env("LAMBDA", 1e-5),
            epochs: env("EPOCHS", 15.0) as usize,
            benign_weight: env("BENIGN_WEIGHT", 1.0),
            synthetic: env("SYNTHETIC", 400.0) as usize,
            synthetic_weight: env("SYNTHETIC_WEIGHT", 1.0),
            average: env("AVERAGE", 1.0) > 0.0,
            satml_weight: env("SATML_WEIGHT", 1.0),
        }]
    } else {
        let mut g = Vec::new();
        for &lambda in &[5e-5f32, 1e-4, 2e-4] {
            for &epochs in &[15usize, 30] {
                for &benign_weight in &[2.0f32, 4.0] {
                    g.push(Params {
                        lambda,
                        epochs,
                        benign_weight,
                        synthetic: 1000,
                        synthetic_weight: 3.0,
                        average: true,
                        satml_weight: 1.0,
                    });
                }
            }
        }
        g
    };

    let mut best: Option<(f64, f64, Params, Vec<f32>)> = None;
    for &p in &grid {
        let mut oof = vec![0.0f32; rows.len()];
        for fold in 0..FOLDS {
            let use_row: Vec<bool> = fold_of.iter().map(|&f| f != fold).collect();
            let q = quantise(&train(&rows, &use_row, p, &mut scratch));
            for (i, r) in rows.iter().enumerate() {
                if fold_of[i] == fold {
                    oof[i] = row_score(&q, &r.text, &mut scratch);
                }
            }
        }
        let pairs: Vec<(f32, bool)> = rows.iter().zip(&oof).map(|(r, &s)| (s, r.injection)).collect();
        let a = auc(&pairs);
        let plain: Vec<(f32, bool, bool)> = rows.iter().zip(&oof).map(|(r, &s)| (s, r.injection, false)).collect();
        let (_, tpr, _) = operating_point(&plain, TARGET_FPR);
        // Selection: mean TPR at 0.5%, 1% and 2% FPR (1% alone rests on
        // 16 benign rows and is noisy).
        let crit = [0.005, TARGET_FPR, 0.02]
            .iter()
            .map(|&f| operating_point(&plain, f).1)
            .sum::<f64>()
            / 3.0;
        eprintln!("cv {p:?}: auc {a:.4}, tpr@1%fpr {tpr:.4}, mean tpr@0.5/1/2% {crit:.4}");
        if best.as_ref().is_none_or(|b| (crit, a) > (b.0, b.1)) {
            best = Some((crit, a, p, oof));
        }
    }
    let (_, cv_auc, params, oof) = best.expect("a configuration");
    let plain: Vec<(f32, bool, bool)> = rows.iter().zip(&oof).map(|(r, &s)| (s, r.injection, false)).collect();
    let cv_tpr = operating_point(&plain, TARGET_FPR).1;
    let combined: Vec<(f32, bool, bool)> = rows
        .iter()
        .zip(&oof)
        .map(|(r, &s)| (s, r.injection, !r.rules.is_empty()))
        .collect();
    let (threshold, cv_comb_tpr, cv_comb_fpr) = operating_point(&combined, TARGET_FPR);
    eprintln!(
        "chosen {params:?}: cv auc {cv_auc:.4}, classifier tpr@1%fpr {cv_tpr:.4}; \
         with rules: threshold {threshold}, tpr {cv_comb_tpr:.4}, fpr {cv_comb_fpr:.4}"
    );
    assert!(threshold.is_finite(), "rules alone exceed the FPR target");

    if let Some(path) = &dump {
        let mut s = String::new();
        for ((r, &score), fold) in rows.iter().zip(&oof).zip(&fold_of) {
            let line = json!({"id": r.id, "fold": fold, "source": r.source, "injection": r.injection, "score": score, "rules": r.rules, "text": r.text});
            s.push_str(&line.to_string());
            s.push('\n');
        }
        std::fs::write(path, s).expect("writing the out-of-fold dump");
    }

    // Per-source out-of-fold recall at the chosen threshold.
    let mut per_source: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (r, &s) in rows.iter().zip(&oof) {
        let e = per_source.entry(r.source.clone()).or_default();
        e.0 += 1;
        if s >= threshold || !r.rules.is_empty() {
            e.1 += 1;
        }
    }

    let all = vec![true; rows.len()];
    let q = quantise(&train(&rows, &all, params, &mut scratch));
    let nonzero = q.weights.iter().filter(|&&w| w != 0).count();

    let mut sources: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for r in &rows {
        let e = sources.entry(r.source.as_str()).or_default();
        if r.injection {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    let header = json!({
        "format": "warden-injection-linear",
        "version": 1,
        "buckets": BUCKETS,
        "hashing": features::HASHING,
        "word_ngrams": [features::WORD_NGRAMS.0, features::WORD_NGRAMS.1],
        "char_ngrams": [features::CHAR_NGRAMS.0, features::CHAR_NGRAMS.1],
        "tf": "l2",
        "windows": { "chars": features::WINDOW_CHARS, "step": features::WINDOW_STEP },
        "quantization": "i8",
        "scale": q.scale,
        "bias": q.bias,
        "threshold": threshold,
        "nonzero_weights": nonzero,
        "training": {
            "data_file": "dev.jsonl",
            "data_sha256": data_sha,
            "rows_sha256": rows_sha,
            "rows_sha256_of": "the used lines of data_file, each followed by \\n, in file order",
            "split": "train",
            "excluded_sources": EXCLUDED_SOURCES,
            "rows": { "injection": n_inj, "benign": n_ben },
            "sources": sources.iter().map(|(k, v)| (k.to_string(), json!({"injection": v.0, "benign": v.1}))).collect::<serde_json::Map<_, _>>(),
            "optimizer": "adagrad sgd, logistic loss, balanced class weights",
            "learning_rate": LEARNING_RATE,
            "lambda": params.lambda,
            "epochs": params.epochs,
            "benign_weight": params.benign_weight,
        },
        "cv": {
            "folds": FOLDS,
            "grouping": "rows sharing a word 8-gram",
            "auc": cv_auc,
            "classifier_tpr_at_1pct_fpr": cv_tpr,
            "threshold_target_fpr": TARGET_FPR,
            "with_rules_tpr": cv_comb_tpr,
            "with_rules_fpr": cv_comb_fpr,
            "rule_hits_benign": ruled_benign.len(),
            "rule_hits_injection": ruled_inj,
            "recall_by_source": per_source.iter().map(|(k, v)| (k.clone(), json!(format!("{}/{}", v.1, v.0)))).collect::<serde_json::Map<_, _>>(),
        },
    });
    let header_bytes = serde_json::to_vec_pretty(&header).expect("header");
    let mut file = Vec::with_capacity(16 + header_bytes.len() + BUCKETS);
    file.extend_from_slice(b"WPIM");
    file.extend_from_slice(&u32::try_from(header_bytes.len()).expect("header size").to_le_bytes());
    file.extend_from_slice(&header_bytes);
    file.extend_from_slice(&q.scale.to_le_bytes());
    file.extend_from_slice(&q.bias.to_le_bytes());
    file.extend_from_slice(&q.weights);
    std::fs::create_dir_all(&out).expect("output directory");
    std::fs::write(out.join("model.bin"), &file).expect("writing model.bin");

    // The fixed sample: the first rows of each class by id.
    let mut by_id: Vec<&Row> = rows.iter().collect();
    by_id.sort_by(|a, b| a.id.cmp(&b.id));
    let mut sample = String::new();
    let mut correct = 0usize;
    let mut taken = 0usize;
    for injection in [false, true] {
        for r in by_id.iter().filter(|r| r.injection == injection).take(SAMPLE_PER_CLASS) {
            let score = row_score(&q, &r.text, &mut scratch);
            let flagged = score >= threshold || !r.rules.is_empty();
            correct += usize::from(flagged == r.injection);
            taken += 1;
            let line = json!({
                "id": r.id, "source": r.source, "label": if r.injection { "injection" } else { "benign" },
                "score": score, "rules": r.rules, "injection": flagged, "text": r.text,
            });
            sample.push_str(&serde_json::to_string(&line).expect("sample line"));
            sample.push('\n');
        }
    }
    std::fs::write(out.join("sample.jsonl"), sample).expect("writing sample.jsonl");

    let report = json!({
        "model_bytes": file.len(),
        "model_sha256": hex(&Sha256::digest(&file)),
        "sample_rows": taken,
        "sample_correct": correct,
        "header": header,
    });
    std::fs::write(
        out.join("training-report.json"),
        serde_json::to_string_pretty(&report).expect("report") + "\n",
    )
    .expect("writing training-report.json");
    println!("{}", serde_json::to_string_pretty(&report).expect("report"));
}

/// Times the detector's parts on the text in `path` and over every row of
/// `data` (a development aid: `--time FILE`).
fn time_components(path: &str, data: &std::path::Path) {
    let text = std::fs::read_to_string(path).expect("text file");
    let weights = vec![0u8; BUCKETS];
    let q = Quantised {
        weights,
        scale: 1.0,
        bias: 0.0,
    };
    let mut scratch = Scratch::default();
    let n = 300;
    // The best of 7 rounds: the machine is shared.
    let time = |name: &str, f: &mut dyn FnMut()| {
        let mut best = f64::INFINITY;
        for _ in 0..7 {
            let start = std::time::Instant::now();
            for _ in 0..n {
                f();
            }
            best = best.min(start.elapsed().as_secs_f64() * 1e6 / f64::from(n));
        }
        eprintln!("{name}: {best:.1} us");
    };
    let views = normalize::views(&text);
    let main = views.views[0].text.clone();
    eprintln!("{} bytes, {} views", text.len(), views.views.len());

    time("views", &mut || {
        std::hint::black_box(normalize::views(&text));
    });
    time("canonical", &mut || {
        std::hint::black_box(normalize::canonical(&text));
    });
    time("rules", &mut || {
        let mut out = Vec::new();
        rules::match_text(&main, &mut out);
        std::hint::black_box(out);
    });
    time("logit whole", &mut || {
        std::hint::black_box(q.linear().logit_whole(&main, &mut scratch));
    });
    if let Ok(compiled) = rules::compiled() {
        for (rule, regex) in rules::RULES.iter().zip(compiled) {
            let start = std::time::Instant::now();
            for _ in 0..n {
                std::hint::black_box(regex.is_match(main.as_bytes()));
            }
            eprintln!(
                "  rule {}: {:.2} us",
                rule.id,
                start.elapsed().as_secs_f64() * 1e6 / f64::from(n)
            );
        }
    }
    let rows: Vec<String> = std::fs::read_to_string(data)
        .expect("data")
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("json")["text"]
                .as_str()
                .expect("text")
                .to_owned()
        })
        .collect();
    let canon: Vec<String> = rows.iter().map(|t| normalize::views(t).views[0].text.clone()).collect();
    for (name, part) in [("views", 0), ("rules", 1), ("logit", 2)] {
        let start = std::time::Instant::now();
        for (t, c) in rows.iter().zip(&canon) {
            match part {
                0 => {
                    std::hint::black_box(normalize::views(t));
                }
                1 => {
                    let mut out = Vec::new();
                    rules::match_text(c, &mut out);
                    std::hint::black_box(out);
                }
                _ => {
                    std::hint::black_box(q.linear().logit(c, &mut scratch));
                }
            }
        }
        eprintln!(
            "all rows, {name}: {:.1} us/row",
            start.elapsed().as_secs_f64() * 1e6 / rows.len() as f64
        );
    }
    time("logit windows", &mut || {
        std::hint::black_box(q.linear().logit(&main, &mut scratch));
    });
}

/// The strings a sub-pattern can match in a canonical view, when they are
/// few and short: `None` otherwise. Canonical views hold no whitespace but
/// single spaces (`normalize::canonical`), so a whitespace class matches
/// only " " and a repetition of it at most one; every other class keeps
/// its bytes. The result over-approximates what can match, which is the
/// safe direction for [`covered`].
fn language(h: &regex_syntax::hir::Hir) -> Option<Vec<Vec<u8>>> {
    use regex_syntax::hir::{Class, HirKind};
    const MAX_STRINGS: usize = 4096;
    const MAX_LEN: usize = 256;
    fn product(a: &[Vec<u8>], b: &[Vec<u8>]) -> Option<Vec<Vec<u8>>> {
        if a.len() * b.len() > MAX_STRINGS {
            return None;
        }
        let mut out = Vec::with_capacity(a.len() * b.len());
        for x in a {
            for y in b {
                if x.len() + y.len() > MAX_LEN {
                    return None;
                }
                out.push([x.as_slice(), y.as_slice()].concat());
            }
        }
        out.sort();
        out.dedup();
        Some(out)
    }
    let whitespace = |b: u8| matches!(b, b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ');
    match h.kind() {
        HirKind::Empty | HirKind::Look(_) => Some(vec![Vec::new()]),
        HirKind::Literal(l) => Some(vec![l.0.to_vec()]),
        HirKind::Class(Class::Bytes(c)) => {
            let mut bytes: Vec<u8> = c.ranges().iter().flat_map(|r| r.start()..=r.end()).collect();
            // Whitespace other than a space never occurs in a canonical view.
            bytes.retain(|&b| b == b' ' || !whitespace(b));
            (bytes.len() <= 16).then(|| bytes.into_iter().map(|b| vec![b]).collect())
        }
        HirKind::Class(Class::Unicode(_)) => None,
        HirKind::Capture(c) => language(&c.sub),
        HirKind::Repetition(r) => {
            let sub = language(&r.sub)?;
            if sub == [b" ".to_vec()] {
                // No two spaces in a row in a canonical view.
                return Some(if r.min == 0 {
                    vec![Vec::new(), b" ".to_vec()]
                } else {
                    vec![b" ".to_vec()]
                });
            }
            let max = r.max?;
            let mut out = Vec::new();
            let mut power = vec![Vec::new()];
            for n in 0..=max {
                if n >= r.min {
                    out.extend(power.iter().cloned());
                }
                if n < max {
                    power = product(&power, &sub)?;
                }
                if out.len() > MAX_STRINGS {
                    return None;
                }
            }
            out.sort();
            out.dedup();
            Some(out)
        }
        HirKind::Concat(xs) => xs
            .iter()
            .try_fold(vec![Vec::new()], |acc, x| product(&acc, &language(x)?)),
        HirKind::Alternation(xs) => {
            let mut out = Vec::new();
            for x in xs {
                out.extend(language(x)?);
                if out.len() > MAX_STRINGS {
                    return None;
                }
            }
            out.sort();
            out.dedup();
            Some(out)
        }
    }
}

/// Whether every string `h` can match in a canonical view contains one of
/// `literals`: proven structurally (a concatenation is covered when one of
/// its parts, or the joined strings of a run of its parts, is; an
/// alternation when each branch is; a repetition of at least one when its
/// body is). `false` means "not proven".
fn covered(h: &regex_syntax::hir::Hir, literals: &[&str]) -> bool {
    use regex_syntax::hir::HirKind;
    let all_contain = |lang: &[Vec<u8>]| {
        !lang.is_empty()
            && lang
                .iter()
                .all(|s| literals.iter().any(|k| s.windows(k.len()).any(|w| w == k.as_bytes())))
    };
    if language(h).is_some_and(|lang| all_contain(&lang)) {
        return true;
    }
    match h.kind() {
        HirKind::Capture(c) => covered(&c.sub, literals),
        // A match of `x{m,}` starts with m matches of `x`.
        HirKind::Repetition(r) => {
            r.min >= 1
                && (covered(&r.sub, literals)
                    || language(&r.sub).is_some_and(|sub| {
                        (1..r.min)
                            .try_fold(sub.clone(), |acc, _| {
                                (acc.len() * sub.len() <= 4096).then(|| {
                                    acc.iter()
                                        .flat_map(|a| sub.iter().map(move |b| [a.as_slice(), b.as_slice()].concat()))
                                        .collect::<Vec<_>>()
                                })
                            })
                            .is_some_and(|lang| all_contain(&lang))
                    }))
        }
        HirKind::Alternation(xs) => xs.iter().all(|x| covered(x, literals)),
        HirKind::Concat(xs) => {
            xs.iter().any(|x| covered(x, literals))
                || (0..xs.len()).any(|i| {
                    (i + 2..=xs.len()).any(|j| {
                        xs[i..j]
                            .iter()
                            .try_fold(vec![Vec::new()], |acc: Vec<Vec<u8>>, x| {
                                let l = language(x)?;
                                (acc.len() * l.len() <= 4096).then(|| {
                                    acc.iter()
                                        .flat_map(|a| l.iter().map(move |b| [a.as_slice(), b.as_slice()].concat()))
                                        .collect()
                                })
                            })
                            .is_some_and(|lang| all_contain(&lang))
                    })
                })
        }
        _ => false,
    }
}

/// `--check-rules`: (1) proves from each rule's syntax tree that every
/// match in a canonical view contains a literal of each of its groups
/// (`rules::Rule::requires`), and (2) checks on every view of every row of
/// `data` (all splits, all sources) that the rule hits with the literal
/// scan are exactly those of running every regex. Exits non-zero on any
/// failure.
fn check_rules(data: &std::path::Path) {
    let mut failures = 0usize;
    for rule in rules::RULES {
        let hir = regex_syntax::ParserBuilder::new()
            .utf8(false)
            .build()
            .parse(&format!("(?-u){}", rule.pattern))
            .expect("rule pattern parses");
        for group in rule.requires {
            if !covered(&hir, group) {
                eprintln!(
                    "rule {}: not proven that every match contains one of {group:?}",
                    rule.id
                );
                failures += 1;
            }
        }
    }
    eprintln!(
        "literal groups: {} rules, {} groups proven, {failures} not proven",
        rules::RULES.len(),
        rules::RULES.iter().map(|r| r.requires.len()).sum::<usize>()
    );
    let text = std::fs::read_to_string(data).expect("data");
    let (mut rows, mut views, mut hits, mut ran) = (0usize, 0usize, 0usize, 0usize);
    let compiled = rules::compiled().expect("rules compile");
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).expect("JSON line");
        let t = v["text"].as_str().expect("text");
        rows += 1;
        for view in normalize::views(t).views {
            views += 1;
            let mut filtered = Vec::new();
            rules::match_text(&view.text, &mut filtered);
            let mut all = Vec::new();
            rules::match_text_unfiltered(&view.text, &mut all);
            if filtered != all {
                eprintln!("row {}: filtered {filtered:?} != unfiltered {all:?}", v["id"]);
                failures += 1;
            }
            hits += all.len();
            // How many regexes the scan lets through (for the report).
            ran += rules::RULES
                .iter()
                .zip(compiled)
                .filter(|(r, _)| r.requires.iter().all(|g| g.iter().any(|k| view.text.contains(k))))
                .count();
        }
    }
    eprintln!(
        "rows {rows}, views {views}: rule hits {hits}, identical with and without the scan: {}; regexes run per view {:.2} of {}",
        if failures == 0 { "yes" } else { "NO" },
        ran as f64 / views.max(1) as f64,
        rules::RULES.len()
    );
    if failures > 0 {
        std::process::exit(1);
    }
}
