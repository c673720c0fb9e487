//! The generic training loop: micro-steps with gradient accumulation, clipping, AdamW, the
//! learning-rate schedule, a progress bar, a metrics log, periodic checkpoints (keeping the
//! last few) with a hook, and a hard stop on a non-finite loss or gradient norm.
//!
//! Determinism: everything random in a step must be drawn from the `&mut Rng` handed to the
//! step function; the RNG state is saved with each checkpoint, so a resumed run continues
//! bit-identically.

use super::checkpoint::{group_key, Checkpointer, Restored};
use super::dist::{self, Collective, Single};
use super::metrics::{MetricsLog, MetricsRecord};
use super::optim::{clip_coef, grad_norm, AdamW, AdamWParams, LrSchedule};
use crate::error::{Error, Result};
use crate::util::Rng;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything a checkpoint restores: model groups, optimiser, RNG, completed steps.
pub struct TrainState {
    /// (group, VarMap); variables are keyed `<group>/<name>` in checkpoints and the optimiser.
    pub models: Vec<(String, VarMap)>,
    pub optim: AdamW,
    pub rng: Rng,
    /// Completed optimiser steps.
    pub step: u64,
}

impl TrainState {
    /// Build the optimiser over every variable of `models` (build the models first).
    pub fn new(models: Vec<(String, VarMap)>, params: AdamWParams, seed: u64) -> Result<Self> {
        Self::new_with_frozen(models, params, seed, &[])
    }

    /// As [`TrainState::new`], but variables whose key `<group>/<name>` equals or starts with
    /// one of `frozen` are left out of the optimiser (buffers such as an unconditional
    /// embedding, or parts kept fixed): they are never updated, take no part in the gradient
    /// norm, and are still saved and restored with the model.
    pub fn new_with_frozen(models: Vec<(String, VarMap)>, params: AdamWParams, seed: u64, frozen: &[String]) -> Result<Self> {
        let mut vars = Vec::new();
        for (group, vm) in &models {
            for (name, var) in crate::nn::named_vars(vm) {
                let key = group_key(group, &name);
                if !frozen.iter().any(|f| key == *f || key.starts_with(f.as_str())) {
                    vars.push((key, var));
                }
            }
        }
        if vars.is_empty() {
            return Err(Error::invalid("training state", "no trainable variables (all frozen, or models empty)"));
        }
        let optim = AdamW::new(vars, params)?;
        Ok(Self { models, optim, rng: crate::util::rng(seed), step: 0 })
    }

    pub fn save(&self, ckpt: &Checkpointer, extra: &BTreeMap<String, String>) -> Result<PathBuf> {
        ckpt.save(self.step, &self.models, &self.optim, &self.rng, extra)
    }

    /// Restore from one checkpoint file.
    pub fn restore(&mut self, path: impl AsRef<Path>) -> Result<Restored> {
        let r = Checkpointer::load(path, &self.models, &mut self.optim)?;
        self.rng = r.rng.clone();
        self.step = r.step;
        Ok(r)
    }

    /// `--resume`: restore from the newest complete checkpoint of `ckpt`, if any.
    pub fn resume_latest(&mut self, ckpt: &Checkpointer) -> Result<Option<Restored>> {
        match ckpt.latest()? {
            Some((_, path)) => self.restore(path).map(Some),
            None => Ok(None),
        }
    }
}

/// What one micro-step returns.
pub struct StepOutput {
    /// Scalar loss (any float dtype) to back-propagate.
    pub loss: Tensor,
    /// Tokens processed (for tokens/s).
    pub tokens: usize,
    /// Further figures to log (e.g. an auxiliary loss), averaged like the loss over the
    /// micro-steps of a log window.
    pub extras: Vec<(&'static str, f64)>,
}

impl StepOutput {
    pub fn new(loss: Tensor, tokens: usize) -> Self {
        Self { loss, tokens, extras: Vec::new() }
    }
}

#[derive(Clone, Debug)]
pub struct LoopConfig {
    /// Run until this many optimiser steps are completed.
    pub total_steps: u64,
    /// Micro-steps per optimiser step; each micro-step's loss is divided by `accum`.
    pub accum: usize,
    /// Clip the global gradient norm to this value.
    pub max_grad_norm: Option<f64>,
    pub schedule: LrSchedule,
    /// Write a metrics record every this many steps (0 = never).
    pub log_every: u64,
    /// Checkpoint every this many steps (0 = never); the last step is always checkpointed
    /// when checkpointing is on.
    pub ckpt_every: u64,
    /// Checkpoints to keep (0 = all).
    pub keep_last: usize,
    /// Run folder for checkpoints and `metrics.jsonl`; `None` writes nothing.
    pub run_dir: Option<PathBuf>,
    /// Show an indicatif progress bar.
    pub progress: bool,
    /// Caller metadata stored in every checkpoint (config, vocabulary, ...).
    pub metadata: BTreeMap<String, String>,
}

impl LoopConfig {
    pub fn new(total_steps: u64, schedule: LrSchedule) -> Self {
        Self {
            total_steps,
            accum: 1,
            max_grad_norm: Some(1.0),
            schedule,
            log_every: 10,
            ckpt_every: 0,
            keep_last: 3,
            run_dir: None,
            progress: false,
            metadata: BTreeMap::new(),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.accum == 0 {
            return Err(Error::invalid("accum", "must be at least 1"));
        }
        if self.ckpt_every > 0 && self.run_dir.is_none() {
            return Err(Error::invalid("ckpt_every", "checkpoints need a run folder"));
        }
        if let Some(m) = self.max_grad_norm {
            if !(m > 0.0 && m.is_finite()) {
                return Err(Error::invalid("max_grad_norm", format!("{m} (must be positive)")));
            }
        }
        Ok(())
    }
}

/// Called by [`run_loop`] at log and checkpoint time (e.g. to write sample grids).
pub trait Hooks {
    fn on_log(&mut self, _rec: &MetricsRecord) -> Result<()> {
        Ok(())
    }
    fn on_checkpoint(&mut self, _step: u64, _path: &Path, _state: &TrainState) -> Result<()> {
        Ok(())
    }
}

/// Hooks that do nothing.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// What a finished loop reports.
#[derive(Debug, Default)]
pub struct LoopSummary {
    /// (step, mean micro-step loss) for every step run here.
    pub losses: Vec<(u64, f32)>,
    pub last_checkpoint: Option<PathBuf>,
}

const METRICS_FILE: &str = "metrics.jsonl";

/// Run optimiser steps `state.step + 1 ..= cfg.total_steps`. `step_fn(step, rng)` runs one
/// micro-step's forward pass (it is called `cfg.accum` times per step). A non-finite loss or
/// gradient norm stops the loop with [`Error::Numerical`] naming the step; nothing is saved
/// for that step, so the last checkpoint stays the last good one.
pub fn run_loop<F>(cfg: &LoopConfig, state: &mut TrainState, step_fn: F, hooks: &mut dyn Hooks) -> Result<LoopSummary>
where
    F: FnMut(u64, &mut Rng) -> Result<StepOutput>,
{
    run_loop_on(&Single, cfg, state, step_fn, hooks)
}

/// [`run_loop`] as one rank of data-parallel training: after the micro-steps of a step the
/// gradients (and the step's loss and token count) are summed over the ranks and the
/// gradients divided by their number ([`dist::average_grads`]), so every rank applies the same
/// update; the loss and tokens/s reported are those of the global batch. Only rank 0 writes
/// checkpoints and metrics, shows progress and calls the hooks. Every rank must start from the
/// same state (same seed, or the same checkpoint).
pub fn run_loop_on<F>(comm: &dyn Collective, cfg: &LoopConfig, state: &mut TrainState, mut step_fn: F, hooks: &mut dyn Hooks) -> Result<LoopSummary>
where
    F: FnMut(u64, &mut Rng) -> Result<StepOutput>,
{
    cfg.validate()?;
    let (root, world) = (comm.is_root(), comm.world());
    let ckpt = match (&cfg.run_dir, cfg.ckpt_every) {
        (Some(dir), n) if n > 0 && root => Some(Checkpointer::new(dir, cfg.keep_last)?),
        _ => None,
    };
    let mut log = match (&cfg.run_dir, cfg.log_every) {
        (Some(dir), n) if n > 0 && root => Some(MetricsLog::open(dir.join(METRICS_FILE))?),
        _ => None,
    };
    let vars = state.optim.vars();
    let bar = if root { progress_bar(cfg, state.step) } else { indicatif::ProgressBar::hidden() };
    let start = Instant::now();
    let mut summary = LoopSummary::default();
    // The checkpoint a failure falls back to: the newest one written so far.
    let mut last_good_path = match &ckpt {
        Some(c) => c.latest()?.map(|(_, p)| p),
        None => None,
    };
    let (mut win_loss, mut win_steps, mut win_tokens, mut win_start) = (0f64, 0u64, 0usize, Instant::now());
    // (sum, count) of every extra figure over the log window.
    let mut win_extras: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let last_good = |p: &Option<PathBuf>| match p {
        Some(p) => format!("last good checkpoint: {}", p.display()),
        None => "no checkpoint was written".to_string(),
    };

    while state.step < cfg.total_steps {
        let step = state.step + 1;
        let lr = cfg.schedule.lr_at(step);
        state.optim.set_lr(lr);
        let mut acc = GradStore::default();
        let mut loss_sum = 0f64;
        let mut step_tokens = 0usize;
        for micro in 0..cfg.accum {
            let out = step_fn(step, &mut state.rng)?;
            let loss = out.loss.to_dtype(DType::F32)?;
            let value = loss.to_scalar::<f32>().map_err(|e| Error::invalid("loss", format!("must be a scalar: {e}")))?;
            // With several ranks every rank must take part in the step's all-reduce: the
            // non-finite loss reaches all of them through it (below).
            if !value.is_finite() && world == 1 {
                bar.abandon();
                return Err(Error::Numerical(format!(
                    "loss is {value} at step {step} (micro-step {}); training stopped, {}",
                    micro + 1,
                    last_good(&last_good_path)
                )));
            }
            loss_sum += value as f64;
            step_tokens += out.tokens;
            for (k, v) in &out.extras {
                let e = win_extras.entry(k.to_string()).or_insert((0.0, 0));
                e.0 += v;
                e.1 += 1;
            }
            let scaled = if cfg.accum > 1 { (loss / cfg.accum as f64)? } else { loss };
            let grads = scaled.backward()?;
            for (_, v) in &vars {
                let t = v.as_tensor();
                if let Some(g) = grads.get(t) {
                    let sum = match acc.remove(t) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    acc.insert(t, sum);
                }
            }
        }
        if world > 1 {
            let reduce_start = Instant::now();
            let mut figures = [loss_sum, step_tokens as f64];
            comm.all_reduce_sum_f64(&mut figures)?;
            dist::average_grads(comm, &mut acc, &vars, comm.bucket_elems())?;
            // Logged as `allreduce_ms`: the exchange plus the wait for the slowest rank.
            let e = win_extras.entry("allreduce_ms".to_string()).or_insert((0.0, 0));
            e.0 += reduce_start.elapsed().as_secs_f64() * 1e3;
            e.1 += 1;
            loss_sum = figures[0] / world as f64;
            step_tokens = figures[1] as usize;
            if !loss_sum.is_finite() {
                bar.abandon();
                return Err(Error::Numerical(format!(
                    "loss is {loss_sum} at step {step} (mean over {world} ranks); training stopped, {}",
                    last_good(&last_good_path)
                )));
            }
        }
        win_tokens += step_tokens;
        let norm = grad_norm(&acc, &vars)?;
        if !norm.is_finite() {
            bar.abandon();
            return Err(Error::Numerical(format!(
                "gradient norm is {norm} at step {step}; training stopped, {}",
                last_good(&last_good_path)
            )));
        }
        // Global-norm clipping as a factor inside the update (no pass over the gradients).
        let scale = cfg.max_grad_norm.map_or(1.0, |m| clip_coef(norm, m));
        state.optim.step_scaled(&acc, scale)?;
        state.step = step;
        let loss = loss_sum / cfg.accum as f64;
        summary.losses.push((step, loss as f32));
        win_loss += loss;
        win_steps += 1;
        bar.set_position(step);
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e}"));

        if cfg.log_every > 0 && (step.is_multiple_of(cfg.log_every) || step == cfg.total_steps) {
            let secs = win_start.elapsed().as_secs_f64().max(1e-9);
            let rec = MetricsRecord {
                step,
                loss: win_loss / win_steps as f64,
                lr,
                tokens_per_s: win_tokens as f64 / secs,
                grad_norm: norm,
                elapsed_s: start.elapsed().as_secs_f64(),
                unix_time: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
                extras: std::mem::take(&mut win_extras).into_iter().map(|(k, (s, n))| (k, s / n.max(1) as f64)).collect(),
            };
            bar.set_message(format!("loss {:.4} lr {lr:.2e} {:.0} tok/s", rec.loss, rec.tokens_per_s));
            if let Some(log) = log.as_mut() {
                log.append(&rec)?;
            }
            if root {
                hooks.on_log(&rec)?;
            }
            (win_loss, win_steps, win_tokens, win_start) = (0.0, 0, 0, Instant::now());
        }
        if let Some(ckpt) = &ckpt {
            if step.is_multiple_of(cfg.ckpt_every) || step == cfg.total_steps {
                let path = state.save(ckpt, &cfg.metadata)?;
                hooks.on_checkpoint(step, &path, state)?;
                last_good_path = Some(path.clone());
                summary.last_checkpoint = Some(path);
            }
        }
    }
    bar.finish();
    Ok(summary)
}

fn progress_bar(cfg: &LoopConfig, done: u64) -> indicatif::ProgressBar {
    if !cfg.progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(cfg.total_steps);
    let style = indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_position(done);
    bar.reset_eta();
    bar
}
