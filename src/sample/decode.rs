//! Decoding strategies: plain KV-cache decoding and the three ways of treating the ITD
//! positions (the reference tokens that an ITD model was trained to reproduce before the
//! target).
//!
//! - `Off`: the target only.
//! - `Naive`: sample every ITD position one by one, as the reference code does (4.6x slower).
//! - `Forced`: write the known reference tokens in one pass, then sample the target. Faster
//!   still, but the target is then conditioned on the draft rather than on a sample of the
//!   model, so its distribution is not Naive's.
//! - `Exact`: speculative decoding with the reference tokens as a deterministic draft. The
//!   output has exactly Naive's distribution at a fraction of the forward passes when the
//!   model reproduces its references well.

use super::logits::{accept, draw, guided, residual, SampleOptions};
use super::TokenModel;
use crate::error::{Error, Result};
use crate::util::Rng;
use candle_core::{IndexOp, Tensor};
use std::fmt;
use std::str::FromStr;

/// Draft tokens the first verification pass of `--itd exact` checks (see `exact_run`).
const FIRST_WINDOW: usize = 8;
/// The most draft tokens one verification pass checks. Longer windows save passes when all is
/// accepted but waste what follows a rejection; on the built-in model (demo sample, six seeds,
/// 4-20 of 128 draft tokens rejected) 16 fed about 15% fewer positions than unbounded windows
/// and made `exact` 4-6% faster at one thread.
const MAX_WINDOW: usize = 16;

/// What is done at the ITD positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItdMode {
    #[default]
    Off,
    Naive,
    Forced,
    Exact,
}

impl ItdMode {
    pub const ALL: [ItdMode; 4] = [
        ItdMode::Off,
        ItdMode::Naive,
        ItdMode::Forced,
        ItdMode::Exact,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ItdMode::Off => "off",
            ItdMode::Naive => "naive",
            ItdMode::Forced => "forced",
            ItdMode::Exact => "exact",
        }
    }
}

impl fmt::Display for ItdMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ItdMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        ItdMode::ALL
            .into_iter()
            .find(|m| m.as_str() == t)
            .ok_or_else(|| {
                Error::invalid(
                    "ITD mode",
                    format!("`{s}` (expected one of: off, naive, forced, exact)"),
                )
            })
    }
}

/// What to decode for a batch of samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodePlan {
    /// Per sample: the ITD draft = all reference tokens concatenated in order. One entry per
    /// sample in every mode (the number of entries is the number of samples); the content is
    /// ignored when `itd` is `Off`, and must have the same length for every sample otherwise.
    pub known: Vec<Vec<u32>>,
    /// Target tokens to sample per sample.
    pub n_target: usize,
    pub itd: ItdMode,
}

impl DecodePlan {
    /// A plan without ITD positions for `samples` samples.
    pub fn off(samples: usize, n_target: usize) -> Self {
        DecodePlan {
            known: vec![Vec::new(); samples],
            n_target,
            itd: ItdMode::Off,
        }
    }

    pub fn samples(&self) -> usize {
        self.known.len()
    }

    /// Number of ITD positions decoded before the target (0 when ITD is off).
    pub fn known_len(&self) -> usize {
        match self.itd {
            ItdMode::Off => 0,
            _ => self.known.first().map_or(0, Vec::len),
        }
    }

    /// Check the plan against a vocabulary size.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        if self.known.is_empty() {
            return Err(Error::invalid(
                "decode plan",
                "no samples (`known` needs one entry per sample, empty when ITD is off)",
            ));
        }
        if self.itd == ItdMode::Off {
            return Ok(());
        }
        let len = self.known[0].len();
        for (s, k) in self.known.iter().enumerate() {
            if k.len() != len {
                return Err(Error::invalid(
                    "decode plan",
                    format!(
                        "ITD mode `{}` needs the same number of known tokens for every sample: \
                         sample 0 has {len}, sample {s} has {}",
                        self.itd,
                        k.len()
                    ),
                ));
            }
            if let Some((i, &tok)) = k.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
                return Err(Error::invalid(
                    "decode plan",
                    format!("known token {tok} (sample {s}, position {i}) is outside the vocabulary of {vocab}"),
                ));
            }
        }
        Ok(())
    }
}

/// Counters of one decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecodeStats {
    /// Calls of [`TokenModel::feed`] (the prefill is not counted).
    pub forward_passes: usize,
    /// Positions fed per row, summed over those calls (the work they did).
    pub positions_fed: usize,
    /// Draft tokens accepted, summed over samples (`Exact` only).
    pub draft_accepted: usize,
    /// Draft tokens rejected and resampled, summed over samples (`Exact` only).
    pub draft_rejected: usize,
}

/// The result of [`generate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// Per sample: the `n_target` target tokens.
    pub target: Vec<Vec<u32>>,
    /// Per sample: what was produced at the ITD positions (empty when ITD is off).
    pub prefix: Vec<Vec<u32>>,
    pub stats: DecodeStats,
}

/// Decode a batch. `model` has prefilled its condition; `first_logits` are the logits that
/// predict the first generated token, `(rows, vocab)` or `(rows, T, vocab)` of which the last
/// position is used. With `model.rows() == 2 * samples` the rows are `[cond; uncond]` and
/// guidance is applied; with `rows == samples` there is no guidance (then `cfg_scale` must
/// be 1). The last decided token is never fed (nothing would read its logits). `progress`
/// is called with (positions decided, positions in total).
pub fn generate(
    model: &mut dyn TokenModel,
    first_logits: &Tensor,
    plan: &DecodePlan,
    opts: &SampleOptions,
    rng: &mut Rng,
    progress: Option<&dyn Fn(usize, usize)>,
) -> Result<Generated> {
    opts.validate()?;
    let vocab = model.vocab_size();
    plan.validate(vocab)?;
    let n = plan.samples();
    let rows = model.rows();
    if rows != n && rows != 2 * n {
        return Err(Error::invalid(
            "decode plan",
            format!(
                "{n} samples but the model holds {rows} rows (expected {n}, or {} with guidance)",
                2 * n
            ),
        ));
    }
    if rows == n && opts.guides() {
        return Err(Error::invalid(
            "cfg_scale",
            format!(
                "{} needs [cond; uncond] rows, but the model holds one row per sample (use 1.0)",
                opts.cfg_scale
            ),
        ));
    }
    let first = match first_logits.rank() {
        2 => first_logits.unsqueeze(1)?,
        3 => {
            let t = first_logits.dim(1)?;
            if t == 0 {
                return Err(Error::invalid("first logits", "no positions"));
            }
            first_logits.narrow(1, t - 1, 1)?
        }
        r => {
            return Err(Error::invalid(
                "first logits",
                format!("rank {r}, expected (rows, vocab) or (rows, T, vocab)"),
            ))
        }
    };
    let mut dec = Decoder {
        model,
        opts,
        rng,
        samples: n,
        rows,
        vocab,
        device: first_logits.device().clone(),
        stats: DecodeStats::default(),
        progress,
        done: 0,
        total: plan.known_len() + plan.n_target,
    };
    dec.check_logits(&first, 1)?;
    let g = guided(&first, n, opts, 0)?;
    let mut pending = dec.position(&g, 0)?;

    let need_tail = plan.n_target > 0;
    let mut prefix = vec![Vec::new(); n];
    match plan.itd {
        ItdMode::Off => {}
        ItdMode::Naive => {
            pending = dec.sample_run(pending, plan.known_len(), need_tail, &mut prefix)?;
        }
        ItdMode::Forced => {
            let l = plan.known_len();
            if l > 0 && need_tail {
                // Only the last known token's logits are read (they predict the target's first).
                let out = dec.feed(&plan.known, true)?;
                pending = dec.position(&out, 0)?;
            }
            prefix = plan.known.clone();
            dec.advance(l);
        }
        ItdMode::Exact => {
            pending = dec.exact_run(pending, &plan.known, need_tail, &mut prefix)?;
        }
    }
    let mut target = vec![Vec::new(); n];
    dec.sample_run(pending, plan.n_target, false, &mut target)?;
    Ok(Generated {
        target,
        prefix,
        stats: dec.stats,
    })
}

/// Per sample, the guided logits row of one position.
type Rows = Vec<Vec<f32>>;

struct Decoder<'a> {
    model: &'a mut dyn TokenModel,
    opts: &'a SampleOptions,
    rng: &'a mut Rng,
    samples: usize,
    rows: usize,
    vocab: usize,
    /// Where the model's inputs live (the device of the first logits).
    device: candle_core::Device,
    stats: DecodeStats,
    progress: Option<&'a dyn Fn(usize, usize)>,
    done: usize,
    total: usize,
}

impl Decoder<'_> {
    fn advance(&mut self, positions: usize) {
        self.done += positions;
        if let Some(p) = self.progress {
            p(self.done, self.total);
        }
    }

    fn check_logits(&self, logits: &Tensor, t: usize) -> Result<()> {
        let dims = logits.dims();
        if dims != [self.rows, t, self.vocab] {
            return Err(Error::invalid(
                "model logits",
                format!(
                    "shape {dims:?} after {t} token(s), expected [{}, {t}, {}]",
                    self.rows, self.vocab
                ),
            ));
        }
        Ok(())
    }

    /// Rows of position `t` of guided logits `(samples, T, vocab)`.
    fn position(&self, g: &Tensor, t: usize) -> Result<Rows> {
        Ok(g.i((.., t))?.to_vec2::<f32>()?)
    }

    /// Every position of guided logits `(samples, T, vocab)`: `[sample][t]` rows, read from the
    /// tensor once (a pass verifying many draft tokens reads them all).
    fn positions(&self, g: &Tensor) -> Result<Vec<Rows>> {
        Ok(g.to_vec3::<f32>()?)
    }

    /// Per-sample token columns as the model's input `(rows, T)`: both guidance rows of a
    /// sample get its tokens.
    fn columns(&self, tokens: &[Vec<u32>]) -> Result<Tensor> {
        let t = tokens[0].len();
        let mut flat = Vec::with_capacity(self.rows * t);
        for r in 0..self.rows {
            flat.extend_from_slice(&tokens[r % self.samples]);
        }
        Ok(Tensor::from_vec(flat, (self.rows, t), &self.device)?)
    }

    /// Feed per-sample token columns `(samples, T)` (both guidance rows of a sample get the
    /// same tokens); returns the guided logits `(samples, T, vocab)` on the CPU, or with
    /// `last_only` those of the last position, `(samples, 1, vocab)`.
    fn feed(&mut self, tokens: &[Vec<u32>], last_only: bool) -> Result<Tensor> {
        let t = tokens[0].len();
        let input = self.columns(tokens)?;
        // Row j of the output predicts the generated token after the j-th one fed.
        let first = self.model.generated_len() + 1;
        let logits = if last_only { self.model.feed_last(&input)? } else { self.model.feed(&input)? };
        self.stats.forward_passes += 1;
        self.stats.positions_fed += t;
        self.check_logits(&logits, if last_only { 1 } else { t })?;
        guided(&logits, self.samples, self.opts, first)
    }

    /// Sample `count` positions one at a time from `pending` (the logits of the first of them).
    /// Returns the logits of the position after them when `feed_last`, else `pending` is
    /// consumed and an empty placeholder comes back.
    fn sample_run(
        &mut self,
        mut pending: Rows,
        count: usize,
        feed_last: bool,
        out: &mut [Vec<u32>],
    ) -> Result<Rows> {
        for i in 0..count {
            let mut col = Vec::with_capacity(self.samples);
            for (s, row) in pending.iter().enumerate() {
                let tok = draw(&self.opts.probs(row), self.rng)?;
                out[s].push(tok);
                col.push(vec![tok]);
            }
            self.advance(1);
            if i + 1 < count || feed_last {
                let g = self.feed(&col, false)?;
                pending = self.position(&g, 0)?;
            }
        }
        Ok(pending)
    }

    /// Speculative decoding of the ITD positions with `draft` as a deterministic proposal
    /// q = delta(draft). At each position the draft token x is accepted with probability p(x)
    /// (p = [`SampleOptions::probs`] of the model at that position); on rejection the token is
    /// drawn from the residual max(p - q, 0) / Z = p without x, renormalised. Then
    /// P(x) = p(x) and P(y != x) = (1 - p(x)) p(y) / (1 - p(x)) = p(y): every position has
    /// exactly the model's distribution given the tokens before it, as in Naive decoding.
    ///
    /// Batches: all samples' draft tokens are verified in one pass. At the earliest position
    /// r where any sample rejects, every sample keeps its tokens up to and including r (its
    /// accepted draft tokens, or its resampled token at r), the model is truncated to r, and
    /// the rest is verified again from a new pass. This stays exact because each kept token was
    /// decided by a fresh uniform that is independent of the decision to stop at r: r depends
    /// only on the uniforms of positions <= r (samples are processed position by position, and
    /// no uniform is drawn for positions after r), so conditioning on r does not bias any kept
    /// token, and the positions after r are decided afresh later with new uniforms. Rows of the
    /// model are independent, so one sample's tokens never change another sample's logits.
    fn exact_run(
        &mut self,
        mut pending: Rows,
        draft: &[Vec<u32>],
        need_tail: bool,
        out: &mut [Vec<u32>],
    ) -> Result<Rows> {
        let l = draft[0].len();
        let base = self.model.generated_len();
        // Positions < pos are decided. `head` is the decided token of position pos - 1 when it
        // has not been fed yet; otherwise every decided token is fed and `pending` holds the
        // logits of position pos.
        let mut pos = 0usize;
        let mut head: Option<Vec<u32>> = None;
        // Draft tokens fed (for verification) after the head in one pass: a few at first,
        // doubled after an acceptance (up to MAX_WINDOW), halved after a rejection down to 0.
        // At 0 a pass feeds the decided token alone and the next draft token is checked
        // against its logits before anything is fed, so a poorly matching draft costs what
        // naive decoding costs (one token per position), and a well matching one is verified
        // MAX_WINDOW tokens per pass. The window only decides how many positions one pass
        // verifies, never how a position is decided, so the output distribution is unchanged.
        let max_window = l.min(MAX_WINDOW);
        let mut window = l.min(FIRST_WINDOW);
        loop {
            if head.is_none() {
                if pos == l {
                    return Ok(pending);
                }
                // Decide position pos from the logits at hand, before feeding anything.
                let at_hand = std::mem::take(&mut pending);
                let rows: Vec<&[f32]> = at_hand.iter().map(Vec::as_slice).collect();
                let (col, rejected) = self.decide(&rows, draft, pos, out)?;
                window = if rejected { window / 2 } else { (window * 2).clamp(1, max_window) };
                head = Some(col);
                pos += 1;
            }
            if pos == l && !need_tail {
                // The last draft position is decided; nothing needs its logits.
                return Ok(pending);
            }
            let Some(decided) = head.take() else {
                return Err(Error::invalid("decoder", "no decided token to feed (internal)"));
            };
            let end = (pos + window).min(l);
            let seq: Vec<Vec<u32>> = (0..self.samples)
                .map(|s| {
                    let mut v = vec![decided[s]];
                    v.extend_from_slice(&draft[s][pos..end]);
                    if end == l && end > pos && !need_tail {
                        v.pop();
                    }
                    v
                })
                .collect();
            let t = seq[0].len();
            // Row j of the logits predicts position pos + j.
            let g = self.feed(&seq, false)?;
            let mut per_sample = self.positions(&g)?;
            let mut rejected_at = None;
            for q in pos..end {
                let rows: Vec<&[f32]> = per_sample.iter().map(|p| p[q - pos].as_slice()).collect();
                let (col, rejected) = self.decide(&rows, draft, q, out)?;
                if rejected {
                    rejected_at = Some((q, col));
                    break;
                }
            }
            match rejected_at {
                Some((q, col)) => {
                    // Keep the fed tokens of positions < q (they equal the decided ones).
                    self.model.truncate(base + q)?;
                    head = Some(col);
                    pos = q + 1;
                    window /= 2;
                }
                None if t > end - pos => {
                    // Everything fed was accepted: the last row predicts position `end`.
                    pending = per_sample.iter_mut().map(|p| std::mem::take(&mut p[t - 1])).collect();
                    if end > pos {
                        window = (window * 2).min(max_window);
                    }
                    pos = end;
                }
                None => {
                    // The window reached the end and its last token was not fed (no tail).
                    return Ok(pending);
                }
            }
        }
    }

    /// Decide position `q` of every sample from its logits `rows`: keep the draft token with
    /// probability p(token), else draw from the residual. Returns the decided tokens and
    /// whether any sample rejected.
    fn decide(&mut self, rows: &[&[f32]], draft: &[Vec<u32>], q: usize, out: &mut [Vec<u32>]) -> Result<(Vec<u32>, bool)> {
        let mut col = Vec::with_capacity(self.samples);
        let mut any_rejected = false;
        for (s, row) in rows.iter().enumerate() {
            let p = self.opts.probs(row);
            let x = draft[s][q];
            if accept(&p, x, self.rng) {
                self.stats.draft_accepted += 1;
                col.push(x);
            } else {
                self.stats.draft_rejected += 1;
                any_rejected = true;
                col.push(draw(&residual(&p, x), self.rng)?);
            }
        }
        for (s, &tok) in col.iter().enumerate() {
            out[s].push(tok);
        }
        self.advance(1);
        Ok((col, any_rejected))
    }
}
