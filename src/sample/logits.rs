//! Logit processing and seeded draws, with LlamaGen semantics: classifier-free guidance,
//! temperature, top-k then top-p (at least one token kept), softmax, multinomial.
//!
//! [`SampleOptions::probs`] is the single place where the processed distribution of one
//! position is computed; the plain draw and the speculative verification of the ITD draft both
//! read it, so they cannot drift apart.

use crate::error::{Error, Result};
use crate::util::Rng;
use candle_core::{DType, Device, Tensor};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

/// How a token is drawn from the model's logits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampleOptions {
    /// Guidance scale: `logits = uncond + (cond - uncond) * cfg_scale`. 1.0 turns guidance off
    /// (the model may still hold the doubled `[cond; uncond]` rows).
    pub cfg_scale: f32,
    /// Logits are divided by `max(temperature, 1e-5)`; 0 is therefore (nearly) greedy.
    pub temperature: f32,
    /// Keep only the `top_k` largest logits (ties with the k-th are kept); 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches `top_p`; 1.0 = off.
    pub top_p: f32,
    /// Seed of the draws (see [`SampleOptions::rng`]).
    pub seed: u64,
    /// LlamaGen's `cfg_interval`: guidance stops after this many decode steps, i.e. generated
    /// tokens `0 ..= interval + 1` are guided and later ones read the conditional logits
    /// alone. `None` (LlamaGen's -1): guided throughout.
    #[serde(default)]
    pub cfg_interval: Option<usize>,
}

impl Default for SampleOptions {
    /// The TokenAR inference settings: cfg 3, top-k 1000, top-p 1, temperature 1.
    fn default() -> Self {
        SampleOptions {
            cfg_scale: 3.0,
            temperature: 1.0,
            top_k: 1000,
            top_p: 1.0,
            seed: 0,
            cfg_interval: None,
        }
    }
}

/// Logits are divided by at least this (LlamaGen's `max(temperature, 1e-5)`).
const MIN_TEMPERATURE: f32 = 1e-5;

impl SampleOptions {
    /// Reject option values that have no meaning.
    pub fn validate(&self) -> Result<()> {
        if !self.cfg_scale.is_finite() {
            return Err(Error::invalid(
                "cfg_scale",
                format!("{} is not a finite number", self.cfg_scale),
            ));
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::invalid(
                "temperature",
                format!("{} (must be a finite number >= 0)", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(
                "top_p",
                format!("{} (must lie in (0, 1])", self.top_p),
            ));
        }
        Ok(())
    }

    /// Whether sampling runs the `[cond; uncond]` guidance rows at all. As LlamaGen's
    /// `generate`: only for `cfg_scale > 1` (a scale of 1 or less means no guidance).
    pub fn guides(&self) -> bool {
        self.cfg_scale > 1.0
    }

    /// Whether the generated token at index `k` (0 = the one predicted by the prefill) is
    /// drawn from guided logits: LlamaGen's `decode_n_tokens` turns guidance off for decode
    /// step `i > cfg_interval`, and step `i` predicts token `i + 1`.
    pub fn guides_at(&self, k: usize) -> bool {
        self.guides() && self.cfg_interval.map_or(true, |i| k <= i + 1)
    }

    /// A fresh RNG seeded with `self.seed`.
    pub fn rng(&self) -> Rng {
        crate::util::rng(self.seed)
    }

    /// The processed distribution of one position, from its (already guided) logits:
    /// temperature, top-k, top-p, softmax. The result sums to 1 unless no logit is finite or
    /// `+inf` (then it is all zeros, and [`draw`] reports the failure). NaN logits count as
    /// `-inf`.
    pub fn probs(&self, logits: &[f32]) -> Vec<f32> {
        let t = self.temperature.max(MIN_TEMPERATURE);
        let mut x: Vec<f32> = logits
            .iter()
            .map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l / t })
            .collect();
        let v = x.len();
        if self.top_k > 0 && self.top_k < v {
            // LlamaGen removes `logits < topk(logits, k)[-1]`: ties with the k-th value stay.
            let kth = kth_largest(&x, self.top_k);
            for l in x.iter_mut() {
                if *l < kth {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let mut p = softmax(x);
        if self.top_p < 1.0 {
            // Walk the tokens from the most likely down and keep a token while the mass before
            // it is still below top_p: the smallest set whose mass reaches top_p (the first
            // token is always kept). LlamaGen removes a token when the mass before it is
            // strictly above top_p, which differs only when a cumulative sum equals top_p
            // exactly.
            let mut order: Vec<usize> = (0..v).filter(|&i| p[i] > 0.0).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let mut before = 0.0f64;
            for (rank, &i) in order.iter().enumerate() {
                if rank > 0 && before >= self.top_p as f64 {
                    p[i] = 0.0;
                } else {
                    before += p[i] as f64;
                }
            }
            normalise(&mut p);
        }
        p
    }
}

/// Up to this `k`, [`kth_largest`] keeps the `k` largest so far in one pass instead of
/// partitioning a copy of the row.
const SMALL_K: usize = 32;

/// The `k`-th largest value of `x` (1 <= k <= len, no NaN): the top-k threshold.
fn kth_largest(x: &[f32], k: usize) -> f32 {
    if k > SMALL_K {
        let mut sorted = x.to_vec();
        let (_, &mut kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        return kth;
    }
    let mut top = x[..k].to_vec();
    top.sort_unstable_by(|a, b| b.total_cmp(a));
    let mut kth = top[k - 1];
    // Blocks with nothing above the current k-th are passed over after one branch-free scan.
    for block in x[k..].chunks(16) {
        if !block.iter().fold(false, |above, &v| above | (v > kth)) {
            continue;
        }
        for &v in block {
            if v > kth {
                let at = top.partition_point(|&t| t >= v);
                top.copy_within(at..k - 1, at + 1);
                top[at] = v;
                kth = top[k - 1];
            }
        }
    }
    kth
}

/// Softmax of one row, in place; `-inf` entries get 0, `+inf` entries share the whole mass.
fn softmax(mut x: Vec<f32>) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return vec![0.0; x.len()];
    }
    if m == f32::INFINITY {
        let mut p: Vec<f32> = x.iter().map(|&l| if l == m { 1.0 } else { 0.0 }).collect();
        normalise(&mut p);
        return p;
    }
    crate::vmath::softmax_in_place(&mut x);
    x
}

fn normalise(p: &mut [f32]) {
    let total: f64 = p.iter().map(|&q| q as f64).sum();
    if total > 0.0 {
        let inv = 1.0 / total;
        for q in p.iter_mut() {
            *q = (*q as f64 * inv) as f32;
        }
    }
}

/// One multinomial draw from `probs` (need not be normalised; zero entries are never drawn).
/// Consumes exactly one `f64` from `rng`.
pub fn draw(probs: &[f32], rng: &mut Rng) -> Result<u32> {
    let total: f64 = probs
        .iter()
        .filter(|q| q.is_finite() && **q > 0.0)
        .map(|&q| q as f64)
        .sum();
    if !(total > 0.0) {
        return Err(Error::Numerical(
            "no token has a positive probability (the model's logits are all NaN or -inf)"
                .to_string(),
        ));
    }
    let target = rng.random::<f64>() * total;
    let mut cum = 0.0f64;
    let mut last = 0usize;
    for (i, &q) in probs.iter().enumerate() {
        if q.is_finite() && q > 0.0 {
            cum += q as f64;
            last = i;
            if cum > target {
                return Ok(i as u32);
            }
        }
    }
    Ok(last as u32)
}

/// Accept the draft token `x` with probability `probs[x]` (one `f64` from `rng`).
pub fn accept(probs: &[f32], x: u32, rng: &mut Rng) -> bool {
    let px = probs.get(x as usize).copied().unwrap_or(0.0) as f64;
    rng.random::<f64>() < px
}

/// The residual distribution after rejecting a deterministic draft `x`:
/// `max(p - delta_x, 0)` normalised, i.e. `p` with `x` removed (normalised by [`draw`]).
pub fn residual(probs: &[f32], x: u32) -> Vec<f32> {
    let mut r = probs.to_vec();
    if let Some(q) = r.get_mut(x as usize) {
        *q = 0.0;
    }
    r
}

/// Classifier-free guidance over the batch dimension: `logits` has `2n` rows laid out
/// `[cond; uncond]`; returns the `n` guided rows `uncond + (cond - uncond) * scale`. A scale of
/// exactly 1 returns the conditional rows unchanged.
pub fn cfg_combine(logits: &Tensor, scale: f32) -> Result<Tensor> {
    let rows = logits.dim(0)?;
    if rows % 2 != 0 {
        return Err(Error::invalid(
            "guidance logits",
            format!("{rows} rows; [cond; uncond] needs an even number"),
        ));
    }
    let n = rows / 2;
    let cond = logits.narrow(0, 0, n)?;
    if scale == 1.0 {
        return Ok(cond);
    }
    let uncond = logits.narrow(0, n, n)?;
    Ok((&uncond + (&cond - &uncond)?.affine(scale as f64, 0.0)?)?)
}

/// Guided logits of `samples` samples as an f32 CPU tensor `(samples, T, vocab)`, from a model
/// output `(rows, T, vocab)` with `rows` = `samples` (no guidance) or `2 * samples`. Position
/// `t` of the output predicts generated token `first + t`; positions past the options'
/// `cfg_interval` (and every position when `cfg_scale <= 1`) read the conditional rows alone.
pub(crate) fn guided(logits: &Tensor, samples: usize, opts: &SampleOptions, first: usize) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    if logits.dim(0)? != 2 * samples {
        return Ok(logits.to_device(&Device::Cpu)?);
    }
    let t = logits.dim(1)?;
    let on = (0..t).filter(|&j| opts.guides_at(first + j)).count();
    let g = if on == t {
        cfg_combine(&logits, opts.cfg_scale)?
    } else if on == 0 {
        logits.narrow(0, 0, samples)?
    } else {
        // Guided positions come first (the interval ends inside this run of positions).
        let head = cfg_combine(&logits.narrow(1, 0, on)?, opts.cfg_scale)?;
        let tail = logits.narrow(0, 0, samples)?.narrow(1, on, t - on)?;
        Tensor::cat(&[&head, &tail], 1)?
    };
    Ok(g.to_device(&Device::Cpu)?)
}
