//! The reference probe: does a model use its references and its prompt, and does it bind each
//! reference to its place?
//!
//! Teacher-forced mean negative log-likelihood (nats per token) of the target tokens of a fixed
//! set of training samples (the first samples with two or more references, no dropout), under
//! the sample's own conditions and under four edits of them:
//! - `refs_swapped`: the references in reverse order (same prompt). A model that binds each
//!   reference to its place (from the prompt's order and relation, or the holes' shapes) gets
//!   worse; one that only copies the references' colours somewhere does not.
//! - `refs_other`: another sample's references. The gap to `target` is how much the model
//!   takes from its references at all.
//! - `text_dropped`: the unconditional caption. The gap is how much it reads the prompt.
//! - `refs_dropped`: the unconditional image rows for the conditions (when the model has them).
//!
//! With owner grids in the cache, `decision` and `decision_swapped` are the same NLL at each
//! sample's first subject cell only (in raster order): the one place where generation must
//! choose which reference to draw (later cells can continue what is above them, which the
//! whole-target figures mostly measure). A model that binds has `decision_swapped` well above
//! `decision`.
//!
//! Identity accuracy needs `refs_swapped - target` to grow; it is written at every checkpoint
//! (`checkpoints/probe.jsonl`) so that a run shows whether binding is emerging long before
//! sampled images do. The ITD copies' NLL (`itd`) is reported separately (always on the
//! sample's own references).

use crate::data::cache::CachedSample;
use crate::error::{Error, Result};
use crate::model::{Condition, TokenAr};
use crate::text::TextEncoder;
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

/// One probe: mean NLL per target token under each condition; `None` where not applicable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub step: u64,
    /// Samples probed.
    pub samples: usize,
    /// ITD copies of the references (None without ITD).
    pub itd: Option<f64>,
    pub target: f64,
    pub refs_swapped: f64,
    pub refs_other: f64,
    pub text_dropped: f64,
    pub refs_dropped: Option<f64>,
    /// NLL at each sample's first subject cell, own conditions / references swapped (when
    /// the cache has owner grids).
    #[serde(default)]
    pub decision: Option<f64>,
    #[serde(default)]
    pub decision_swapped: Option<f64>,
}

impl Probe {
    /// One line per figure, with the gaps that matter.
    pub fn render(&self) -> String {
        let mut s = format!("reference probe at step {} ({} samples, NLL per target token):\n", self.step, self.samples);
        let mut line = |what: &str, v: f64, gap: Option<&str>| {
            s += &format!("  {what:<26} {v:.4}");
            if let Some(g) = gap {
                s += &format!("  ({:+.4}: {g})", v - self.target);
            }
            s += "\n";
        };
        line("own conditions", self.target, None);
        line("references swapped", self.refs_swapped, Some("binding"));
        line("another sample's refs", self.refs_other, Some("use of the references"));
        line("caption dropped", self.text_dropped, Some("use of the prompt"));
        if let Some(r) = self.refs_dropped {
            line("image conditions dropped", r, Some("use of the image conditions"));
        }
        if let Some(i) = self.itd {
            line("ITD copies", i, None);
        }
        if let (Some(d), Some(w)) = (self.decision, self.decision_swapped) {
            s += &format!("  {:<26} {d:.4}\n  {:<26} {w:.4}  ({:+.4}: binding where it is decided)\n", "first subject cell", "  with references swapped", w - d);
        }
        s
    }
}

/// What the probe reads: the model, the text encoder, and the training samples (a training
/// job's parts convert into it).
pub struct ProbeData<'a> {
    pub gpt: &'a TokenAr,
    pub text: &'a dyn TextEncoder,
    pub samples: &'a [CachedSample],
}

/// Per-position NLL (B, n_loss) of `target` under `cond`.
fn nll(parts: &ProbeData, cond: &Condition, target: &Tensor) -> Result<Vec<Vec<f32>>> {
    let mut rng = crate::util::rng(0);
    let (logits, targets) = parts.gpt.forward_train(cond, target, false, &mut rng)?;
    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    Ok(lp.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?.neg()?.to_vec2::<f32>()?)
}

/// Probe the first `n` training samples that have two or more references (in batches of
/// `batch`, at least 2 so that "another sample" exists). `None` when the data has fewer than
/// two such samples.
pub fn probe<'a>(parts: impl Into<ProbeData<'a>>, step: u64, n: usize, batch: usize) -> Result<Option<Probe>> {
    let parts = &parts.into();
    if batch < 2 {
        return Err(Error::invalid("probe batch", format!("{batch}: needs at least 2 samples per batch")));
    }
    let mut chosen: Vec<usize> = parts.samples.iter().enumerate().filter(|(_, s)| s.refs.len() >= 2).map(|(i, _)| i).collect();
    // A batch shares one reference count.
    let count = chosen.first().map(|&i| parts.samples[i].refs.len());
    chosen.retain(|&i| Some(parts.samples[i].refs.len()) == count);
    chosen.truncate(n);
    if chosen.len() < 2 {
        return Ok(None);
    }
    let device = parts.gpt.device().clone();
    let hw = parts.gpt.config().image_tokens();
    let can_drop_refs = parts.gpt.config().img_uncond;
    // Sums and counts: itd, target, swapped, other, text, refs dropped.
    let mut sum = [0f64; 6];
    let mut cnt = [0usize; 6];
    let mut add = |k: usize, rows: &[Vec<f32>], target_only: bool| {
        for row in rows {
            let split = row.len() - hw;
            let (itd, tgt) = row.split_at(split);
            if !target_only {
                sum[0] += itd.iter().map(|v| *v as f64).sum::<f64>();
                cnt[0] += itd.len();
            }
            sum[k] += tgt.iter().map(|v| *v as f64).sum::<f64>();
            cnt[k] += tgt.len();
        }
    };
    // Sums and count at the first subject cell: own conditions, references swapped.
    let mut decision = (0f64, 0f64, 0usize);
    for idx in chosen.chunks(batch) {
        if idx.len() < 2 {
            break;
        }
        let (cond, target) = crate::data::batch::batch(parts.samples, idx, parts.text, &device)?;
        let b = idx.len();
        let own = nll(parts, &cond, &target)?;
        add(1, &own, false);
        // Each sample's first subject cell, when its owner grid is known.
        let first: Vec<Option<usize>> =
            idx.iter().map(|&i| parts.samples[i].owners.as_ref().and_then(|o| o.iter().position(|&k| k > 0))).collect();
        let nr = cond.refs.dim(1)?;
        let reversed = Tensor::new((0..nr as u32).rev().collect::<Vec<_>>().as_slice(), &device)?;
        let rolled = Tensor::new((0..b as u32).map(|i| (i + 1) % b as u32).collect::<Vec<_>>().as_slice(), &device)?;
        let edits: [(usize, Condition); 3] = [
            (2, Condition { refs: cond.refs.index_select(&reversed, 1)?, ..cond.clone() }),
            (3, Condition { refs: cond.refs.index_select(&rolled, 0)?, ..cond.clone() }),
            (4, Condition { drop_text: vec![true; b], ..cond.clone() }),
        ];
        for (k, c) in edits {
            let rows = nll(parts, &c, &target)?;
            if k == 2 {
                for ((a, w), f) in own.iter().zip(&rows).zip(&first) {
                    if let Some(cell) = f {
                        let at = a.len() - hw + cell;
                        decision.0 += a[at] as f64;
                        decision.1 += w[at] as f64;
                        decision.2 += 1;
                    }
                }
            }
            add(k, &rows, true);
        }
        if can_drop_refs {
            add(5, &nll(parts, &Condition { drop_image: vec![true; b], ..cond.clone() }, &target)?, true);
        }
    }
    let mean = |k: usize| sum[k] / cnt[k].max(1) as f64;
    Ok(Some(Probe {
        step,
        samples: cnt[1] / hw,
        itd: (cnt[0] > 0).then(|| mean(0)),
        target: mean(1),
        refs_swapped: mean(2),
        refs_other: mean(3),
        text_dropped: mean(4),
        refs_dropped: (cnt[5] > 0).then(|| mean(5)),
        decision: (decision.2 > 0).then(|| decision.0 / decision.2 as f64),
        decision_swapped: (decision.2 > 0).then(|| decision.1 / decision.2 as f64),
    }))
}

/// Append `p` to the JSON-lines file at `path` (rewritten atomically).
pub fn append(path: &std::path::Path, p: &Probe) -> Result<()> {
    let mut text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(path, e)),
    };
    // Records of later steps belong to an abandoned run (a resume from an older checkpoint).
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<Probe>(l).map(|r| r.step < p.step).unwrap_or(false))
        .collect();
    let line = serde_json::to_string(p).map_err(|e| Error::invalid("probe", e.to_string()))?;
    text = kept.iter().map(|l| format!("{l}\n")).collect::<String>() + &line + "\n";
    crate::util::atomic_write(path, text.as_bytes())
}

/// Read a probe log; unreadable lines are an error naming the file and line.
pub fn read(path: &std::path::Path) -> Result<Vec<Probe>> {
    crate::train::metrics::read_jsonl(path)
}

/// The probe written at each checkpoint: [`PROBE_SAMPLES`] samples in batches of [`PROBE_BATCH`].
pub fn checkpoint_probe<'a>(parts: impl Into<ProbeData<'a>>, step: u64) -> Result<Option<Probe>> {
    probe(parts, step, PROBE_SAMPLES, PROBE_BATCH)
}

/// Samples probed at each checkpoint.
pub const PROBE_SAMPLES: usize = 64;
/// Batch of the probe's forward passes.
pub const PROBE_BATCH: usize = 16;
