//! Speed of the GPT: prefill, KV-cache decoding, one image per ITD mode, and a training step
//! (forward + backward + clipping + AdamW), with peak memory and the machine's load; plus the
//! PyTorch eager reference (`bench/torch_gpt.py`) run on the same shapes for a ratio.
//!
//! Everything goes through the real paths: [`TokenAr::start`] for the prefill,
//! [`sample::generate`] for decoding and the ITD modes, [`TokenAr::forward_train`] with
//! `crate::train::AdamW` for training. Token rates count every model row (both CFG rows for
//! prefill and decode), as the PyTorch script and the reference anchors do.

pub mod ben2;
mod machine;
mod report;
mod torch;

pub use machine::{isa, read_bandwidth, reset_peak, Bandwidth, Isa};

pub use report::{render_table, BenchReport, DecodeResult, ItdResult, PassResult, PrefillResult, TorchComparison, TrainResult};
pub use torch::{run_torch, TorchArgs};

use crate::error::{Error, Result};
use crate::model::{Condition, GptConfig, TokenAr};
use crate::nn::WeightDtype;
use crate::sample::{self, DecodePlan, ItdMode, SampleOptions};
use crate::train::{clip_coef, grad_norm, AdamW, AdamWParams};
use crate::util::Rng;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use rand::Rng as _;
use std::time::Instant;

/// Model shape overrides on top of a preset (`None` keeps the preset's value).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub dim: Option<usize>,
    pub layers: Option<usize>,
    pub heads: Option<usize>,
    pub vocab: Option<usize>,
    /// Token grid of one image (rows, cols).
    pub grid: Option<(usize, usize)>,
    pub caption_len: Option<usize>,
    pub caption_dim: Option<usize>,
}

/// The benchmark's model: a [`GptConfig::preset`] (`anchor` is the PyTorch performance
/// anchor of docs/reference.md) with the shape flags applied ([`GptConfig::from_preset`]).
pub fn bench_config(preset: &str, o: &Overrides) -> Result<GptConfig> {
    let changes = crate::model::Overrides {
        vocab_size: o.vocab,
        n_layer: o.layers,
        n_head: o.heads,
        dim: o.dim,
        grid: o.grid,
        caption_dim: o.caption_dim,
        caption_len: o.caption_len,
        ..Default::default()
    };
    GptConfig::from_preset(preset, &changes).map_err(|e| match e {
        Error::Invalid { what, msg } if what == "preset" => Error::invalid("--preset", msg),
        e => e,
    })
}

/// Bytes a benchmark of `cfg` needs, about: the weights, and with a training step of `batch`
/// samples their gradients and AdamW moments plus the activations kept for the backward pass
/// (about 16 floats per position, layer and model width, and the attention scores).
pub fn memory_estimate(cfg: &GptConfig, train_batch: usize) -> u64 {
    let params = cfg.num_params() as u64 * 4;
    if train_batch == 0 {
        return params;
    }
    let seq = cfg.max_seq_len() as u64;
    let per_layer = seq * (16 * cfg.dim as u64 + 3 * cfg.ffn_hidden() as u64) + cfg.n_head as u64 * seq * seq;
    params * 4 + (train_batch as u64) * cfg.n_layer as u64 * per_layer * 4
}

/// [`memory_estimate`] with the PyTorch reference (`torch`): after a training step this process
/// still holds its training state's memory (its allocator keeps freed pages) while the
/// reference builds one of the same size, so twice the estimate; inference alone is counted
/// once (the reference's model is the size of ours and both fit where one training state does).
pub fn memory_estimate_with(cfg: &GptConfig, train_batch: usize, torch: bool) -> u64 {
    let one = memory_estimate(cfg, train_batch);
    if torch && train_batch > 0 {
        2 * one
    } else {
        one
    }
}

/// The memory budget check of a benchmark (see [`memory_estimate_with`]): an error saying what
/// the shapes need and what is available, before anything is allocated.
pub fn check_memory(cfg: &GptConfig, train_batch: usize, torch: bool) -> Result<()> {
    let with = if torch && train_batch > 0 { " and the PyTorch reference's at once (--torch; run bench/torch_gpt.py alone instead)" } else { "" };
    crate::util::check_memory(
        &format!("benchmark model (dim {}, {} layers, vocab {}, training batch {train_batch}){with}", cfg.dim, cfg.n_layer, cfg.vocab_size),
        memory_estimate_with(cfg, train_batch, torch),
    )
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Label of the model (preset name or weights folder).
    pub label: String,
    /// References in the condition (must fit the model's scheme).
    pub n_refs: usize,
    /// Decoding steps timed (capped by the layout's generated positions).
    pub decode_steps: usize,
    /// ITD modes to time one full image with (modes other than `off` need an ITD model and
    /// references; they are skipped otherwise).
    pub itd_modes: Vec<ItdMode>,
    /// Training batch; 0 skips the training step.
    pub train_batch: usize,
    /// Timed runs per measurement (the median is reported) after `warmup` untimed ones.
    pub repeat: usize,
    pub warmup: usize,
    /// Timed images per ITD mode.
    pub itd_repeat: usize,
    /// Sizes (generated positions) of single forward passes to time right after the prefill,
    /// with every position's logits on the host, as `--itd exact` verifies its draft; empty
    /// skips them.
    pub pass_sizes: Vec<usize>,
    pub sample: SampleOptions,
    pub seed: u64,
    /// Whether the weights are trained (a bundle); random weights make `exact`'s draft
    /// acceptance meaningless.
    pub trained: bool,
    /// Condition codes of a real sample (references, background), e.g. from
    /// [`crate::pipeline::generate::condition_codes`]; random codes when `None`. A trained
    /// model copies real references far better than random codes, so `exact`'s draft
    /// acceptance (and time) is representative only with them.
    pub codes: Option<ConditionCodes>,
    /// How the inference weights are stored (converted before the measurements; the training
    /// step needs f32).
    pub dtype: WeightDtype,
    /// MiB read by the memory-bandwidth probe (0 skips it).
    pub bandwidth_mib: usize,
}

/// The condition codes of one sample: one grid per reference, and the background's.
#[derive(Debug, Clone, PartialEq)]
pub struct ConditionCodes {
    pub refs: Vec<Vec<u32>>,
    pub background: Vec<u32>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            label: "anchor".into(),
            n_refs: 0,
            decode_steps: 64,
            itd_modes: ItdMode::ALL.to_vec(),
            train_batch: 4,
            repeat: 3,
            warmup: 1,
            itd_repeat: 1,
            pass_sizes: Vec::new(),
            sample: SampleOptions { cfg_scale: 3.0, top_k: 1000, ..SampleOptions::default() },
            seed: 0,
            trained: false,
            codes: None,
            dtype: WeightDtype::F32,
            bandwidth_mib: 256,
        }
    }
}

/// The conditions a run uses: random codes (seeded) and given or random text features.
pub struct BenchInputs {
    pub cond: Condition,
    /// The reference codes of sample 0, in slot order: the ITD draft.
    pub draft: Vec<u32>,
}

/// Condition codes for `batch` equal samples: `codes` when given (their reference count must be
/// `n_refs`, every grid the model's), else random; `text`: features (1, L, C) shared by every
/// row (random normal when `None`).
pub fn bench_inputs(model: &TokenAr, n_refs: usize, batch: usize, codes: Option<&ConditionCodes>, text: Option<&Tensor>, rng: &mut Rng) -> Result<BenchInputs> {
    let cfg = model.config();
    let dev = model.device();
    let hw = cfg.image_tokens();
    let v = cfg.vocab_size as u32;
    let (one_refs, one_bg): (Vec<u32>, Vec<u32>) = match codes {
        Some(c) => {
            if c.refs.len() != n_refs {
                return Err(Error::invalid("bench condition", format!("{} reference grids given, {n_refs} expected", c.refs.len())));
            }
            if let Some(bad) = c.refs.iter().chain(std::iter::once(&c.background)).find(|g| g.len() != hw || g.iter().any(|t| *t >= v)) {
                return Err(Error::invalid("bench condition", format!("a grid of {} codes; the model needs {hw} codes below {v}", bad.len())));
            }
            (c.refs.concat(), c.background.clone())
        }
        None => ((0..n_refs * hw).map(|_| rng.random_range(0..v)).collect(), (0..hw).map(|_| rng.random_range(0..v)).collect()),
    };
    let refs = Tensor::from_vec(repeat(&one_refs, batch), (batch, n_refs, hw), dev)?;
    let bg = Tensor::from_vec(repeat(&one_bg, batch), (batch, hw), dev)?;
    let text = match text {
        Some(t) => t.broadcast_as((batch, cfg.caption_len, cfg.caption_dim))?.contiguous()?,
        None => {
            let n = cfg.caption_len * cfg.caption_dim;
            let one: Vec<f32> = (0..n).map(|_| crate::weights::builders::normal(rng)).collect();
            Tensor::from_vec(repeat(&one, batch), (batch, cfg.caption_len, cfg.caption_dim), dev)?
        }
    };
    let mut cond = Condition::new(refs, bg, text, None);
    // A scheme with a fixed number of reference slots (tokenar-xl: 3) gets the missing ones
    // padded, as generation pads them with a grey image's codes (here one repeated code).
    if let crate::layout::Scheme::Reference { pad_to: Some(slots), .. } = cfg.scheme {
        if n_refs < slots {
            cond = cond.pad_refs(slots, &Tensor::zeros(hw, DType::U32, dev)?)?;
        }
    }
    model.layout_for(&cond)?;
    Ok(BenchInputs { cond, draft: one_refs })
}

/// `x` repeated `batch` times, one after the other (the rows of a batch of equal samples).
fn repeat<T: Copy>(x: &[T], batch: usize) -> Vec<T> {
    (0..batch).flat_map(|_| x.iter().copied()).collect()
}

/// Median of `repeat` timings of `f` (seconds) after `warmup` untimed calls; `f` returns the
/// seconds it wants counted.
fn timed(warmup: usize, repeat: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut t: Vec<f64> = (0..repeat.max(1)).map(|_| f()).collect::<Result<_>>()?;
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// 1-, 5- and 15-minute load averages (Linux; zeros elsewhere).
pub fn loadavg() -> [f64; 3] {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = s.split_whitespace().map(|x| x.parse::<f64>().unwrap_or(0.0));
    [it.next().unwrap_or(0.0), it.next().unwrap_or(0.0), it.next().unwrap_or(0.0)]
}

/// Peak resident memory of this process in MiB (VmHWM; 0 where /proc is absent).
pub fn peak_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Threads candle's CPU kernels use (`RAYON_NUM_THREADS`, else the detected core count).
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Fix `RAYON_NUM_THREADS` to the detected count when it is unset, and return the count.
/// candle 0.11 asks for its thread count on every matmul; unset, that re-detects the cores
/// (on Linux by parsing /proc/cpuinfo), a few percent of a small model's decoding step.
/// Call it at program start, before other threads exist (it sets an environment variable).
pub fn pin_threads() -> usize {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    threads()
}

/// Prefill of the CFG batch (2 rows) through [`TokenAr::start`].
pub fn bench_prefill(model: &TokenAr, inputs: &BenchInputs, o: &BenchOptions) -> Result<PrefillResult> {
    let guided = o.sample.guides();
    let mut positions = (0, 0);
    let s = timed(o.warmup, o.repeat, || {
        let t0 = Instant::now();
        let (session, _) = model.start(&inputs.cond, guided)?;
        let dt = t0.elapsed().as_secs_f64();
        positions = (crate::sample::TokenModel::rows(&session), session.layout().prefix_len());
        Ok(dt)
    })?;
    let (rows, prefix) = positions;
    Ok(PrefillResult { rows, positions: prefix, ms: s * 1e3, tokens_per_s: (rows * prefix) as f64 / s })
}

/// KV-cache decoding of `decode_steps` tokens (one at a time, with guidance and top-k draws)
/// through [`sample::generate`]; the prefill is not timed.
pub fn bench_decode(model: &TokenAr, inputs: &BenchInputs, o: &BenchOptions) -> Result<DecodeResult> {
    let layout = model.layout_for(&inputs.cond)?;
    let steps = o.decode_steps.min(layout.generated_len().saturating_sub(1));
    if steps == 0 {
        return Err(Error::invalid("--decode", "no decoding steps (the layout generates at most one token)"));
    }
    let guided = o.sample.guides();
    let mut rows = 0;
    let s = timed(o.warmup, o.repeat, || {
        let (mut session, first) = model.start(&inputs.cond, guided)?;
        rows = crate::sample::TokenModel::rows(&session);
        let mut rng = o.sample.rng();
        let plan = DecodePlan::off(1, steps + 1);
        let t0 = Instant::now();
        let out = sample::generate(&mut session, &first, &plan, &o.sample, &mut rng, None)?;
        let dt = t0.elapsed().as_secs_f64();
        debug_assert_eq!(out.stats.forward_passes, steps);
        Ok(dt)
    })?;
    Ok(DecodeResult {
        steps,
        rows,
        ms_per_step: s * 1e3 / steps as f64,
        tokens_per_s: (rows * steps) as f64 / s,
        steps_per_s: steps as f64 / s,
    })
}

/// One full image (prefill + every generated position) per ITD mode.
pub fn bench_itd(model: &TokenAr, inputs: &BenchInputs, o: &BenchOptions) -> Result<Vec<ItdResult>> {
    let cfg = model.config();
    let hw = cfg.image_tokens();
    let guided = o.sample.guides();
    let mut out = Vec::new();
    for &mode in &o.itd_modes {
        if mode != ItdMode::Off && (!cfg.itd || inputs.draft.is_empty()) {
            out.push(ItdResult::skipped(mode, "needs an ITD model and at least one reference"));
            continue;
        }
        let plan = DecodePlan {
            known: vec![if mode == ItdMode::Off { Vec::new() } else { inputs.draft.clone() }],
            n_target: hw,
            itd: mode,
        };
        let mut stats = Default::default();
        let s = timed(0, o.itd_repeat, || {
            let t0 = Instant::now();
            let (mut session, first) = model.start(&inputs.cond, guided)?;
            let mut rng = o.sample.rng();
            let g = sample::generate(&mut session, &first, &plan, &o.sample, &mut rng, None)?;
            stats = g.stats;
            Ok(t0.elapsed().as_secs_f64())
        })?;
        out.push(ItdResult {
            mode: mode.as_str().into(),
            seconds_per_image: Some(s),
            forward_passes: stats.forward_passes,
            positions_fed: stats.positions_fed,
            draft_accepted: stats.draft_accepted,
            draft_rejected: stats.draft_rejected,
            skipped: None,
        });
    }
    Ok(out)
}

/// One forward pass of `n` generated positions right after the prefill (not timed), for each
/// `n` of `pass_sizes`: the guided logits of every position copied to the host, as a
/// verification pass of `--itd exact` sees them. The positions are fed the ITD draft, then
/// seeded random codes. Its cost per position against the prefill's and a decoding step's is
/// what decides how long `exact`'s verification windows should be.
pub fn bench_passes(model: &TokenAr, inputs: &BenchInputs, o: &BenchOptions) -> Result<Vec<PassResult>> {
    let layout = model.layout_for(&inputs.cond)?;
    let max = layout.generated_len();
    let guided = o.sample.guides();
    let v = model.config().vocab_size as u32;
    let mut rng = crate::util::rng(o.seed ^ 0x9a55);
    let tokens: Vec<u32> = inputs.draft.iter().copied().chain(std::iter::repeat_with(|| rng.random_range(0..v))).take(max).collect();
    let mut out = Vec::with_capacity(o.pass_sizes.len());
    check_pass_sizes(&o.pass_sizes, max)?;
    for &n in &o.pass_sizes {
        let s = timed(o.warmup, o.repeat, || {
            let (mut session, _) = model.start(&inputs.cond, guided)?;
            let rows = crate::sample::TokenModel::rows(&session);
            let fed: Vec<u32> = (0..rows).flat_map(|_| tokens[..n].iter().copied()).collect();
            let x = Tensor::from_vec(fed, (rows, n), model.device())?;
            let t0 = Instant::now();
            let logits = crate::sample::TokenModel::feed(&mut session, &x)?;
            let g = sample::guided(&logits, 1, &o.sample, 1)?.to_vec3::<f32>()?;
            let dt = t0.elapsed().as_secs_f64();
            if g.first().map(Vec::len) != Some(n) {
                return Err(Error::invalid("model logits", format!("{} positions back from a pass of {n}", g.first().map_or(0, Vec::len))));
            }
            Ok(dt)
        })?;
        out.push(PassResult { positions: n, ms: s * 1e3, ms_per_position: s * 1e3 / n as f64 });
    }
    Ok(out)
}

/// Every pass size must feed 1 to `max` (the layout's generated positions).
fn check_pass_sizes(sizes: &[usize], max: usize) -> Result<()> {
    match sizes.iter().find(|&&n| n == 0 || n > max) {
        Some(n) => Err(Error::invalid("--pass-sizes", format!("{n} positions (a pass feeds 1 to {max}, the generated positions of this layout)"))),
        None => Ok(()),
    }
}

/// Trainable variables of a model's `VarMap` (buffers left out, as the trainer does).
fn trainable(varmap: &VarMap) -> Vec<(String, Var)> {
    crate::nn::named_vars(varmap).into_iter().filter(|(n, _)| !TokenAr::is_buffer(n)).collect()
}

/// One training step at `batch`: teacher-forced forward with dropout, cross-entropy over the
/// loss positions, backward, global-norm clipping (1.0) and AdamW (LlamaGen recipe). The
/// variables of `varmap` are updated.
pub fn bench_train(model: &TokenAr, varmap: &VarMap, n_refs: usize, text: Option<&Tensor>, o: &BenchOptions) -> Result<TrainResult> {
    let mut rng = crate::util::rng(o.seed ^ 0x7a11);
    let batch = o.train_batch;
    let inputs = bench_inputs(model, n_refs, batch, None, text, &mut rng)?;
    let hw = model.config().image_tokens();
    let v = model.config().vocab_size as u32;
    let tg: Vec<u32> = (0..batch * hw).map(|_| rng.random_range(0..v)).collect();
    let target = Tensor::from_vec(tg, (batch, hw), model.device())?;
    let vars = trainable(varmap);
    let mut optim = AdamW::new(vars.clone(), AdamWParams::default())?;
    let layout = model.layout_for(&inputs.cond)?;
    let mut phases = [0f64; 3];
    let s = timed(o.warmup, o.repeat, || {
        let t0 = Instant::now();
        let out = model.forward_train_full(&inputs.cond, &target, true, &mut rng)?;
        let loss = model.token_nll(&out.hidden, &out.targets)?.mean_all()?;
        let _ = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        let norm = grad_norm(&grads, &vars)?;
        optim.step_scaled(&grads, clip_coef(norm, 1.0))?;
        let t3 = Instant::now();
        phases = [(t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), (t3 - t2).as_secs_f64()];
        Ok((t3 - t0).as_secs_f64())
    })?;
    let seq = layout.input_len();
    Ok(TrainResult {
        batch,
        positions: seq,
        loss_positions: layout.loss_range().len(),
        step_ms: s * 1e3,
        tokens_per_s: (batch * seq) as f64 / s,
        forward_ms: phases[0] * 1e3,
        backward_ms: phases[1] * 1e3,
        optimizer_ms: phases[2] * 1e3,
    })
}

/// The model's two views: inference as `generate` runs it (detached, recording no backprop
/// graph; weights in `o.dtype`), and the variables themselves for the training step.
struct Views {
    inference: TokenAr,
    trainable: Option<(TokenAr, VarMap)>,
}

impl Views {
    fn build(cfg: &GptConfig, device: &candle_core::Device, varmap: &VarMap, o: &BenchOptions) -> Result<Self> {
        if o.dtype != WeightDtype::F32 && o.train_batch > 0 {
            return Err(Error::invalid("--dtype", format!("{}: the training step needs f32 weights (pass --train-batch 0 to time inference in {})", o.dtype, o.dtype)));
        }
        let trainable = if o.train_batch > 0 { Some((TokenAr::new(cfg, candle_nn::VarBuilder::from_varmap(varmap, DType::F32, device))?, varmap.clone())) } else { None };
        let mut inference = TokenAr::new(cfg, crate::weights::builders::zeros_builder(varmap, DType::F32, device))?;
        inference.convert_weights(o.dtype)?;
        Ok(Self { inference, trainable })
    }
}

/// Run every measurement on the model of `varmap` (`model` gives its config and device).
/// `text`: features (1, L, C) to condition on (random when `None`). With a reduced
/// `o.dtype`, the f32 weights stay alive beside the converted ones (see [`run_owned`]).
pub fn run(model: &TokenAr, varmap: &VarMap, text: Option<&Tensor>, o: &BenchOptions) -> Result<BenchReport> {
    let views = Views::build(model.config(), model.device(), varmap, o)?;
    measure(views, text, o)
}

/// [`run`] taking the model and its variables: with a reduced `o.dtype` the f32 weights are
/// freed once converted, so that the peak memory is that of inference in that dtype.
pub fn run_owned(model: TokenAr, varmap: VarMap, text: Option<&Tensor>, o: &BenchOptions) -> Result<BenchReport> {
    let (cfg, device) = (model.config().clone(), model.device().clone());
    drop(model);
    let views = Views::build(&cfg, &device, &varmap, o)?;
    drop(varmap);
    measure(views, text, o)
}

/// Every inference measurement on `model` as it is (its weights already in `o.dtype`, e.g.
/// from [`crate::weights::convert::build_seeded`]); no training step.
pub fn run_inference(model: TokenAr, text: Option<&Tensor>, o: &BenchOptions) -> Result<BenchReport> {
    if o.train_batch > 0 {
        return Err(Error::invalid("--train-batch", "a model built for inference cannot time a training step"));
    }
    measure(Views { inference: model, trainable: None }, text, o)
}

fn measure(views: Views, text: Option<&Tensor>, o: &BenchOptions) -> Result<BenchReport> {
    let load_start = loadavg();
    let model = &views.inference;
    let cfg = model.config().clone();
    let isa = isa();
    // The peak from here on: inference (model construction and conversion left out).
    let peak_reset = reset_peak();
    let mut rng = crate::util::rng(o.seed);
    let inputs = bench_inputs(model, o.n_refs, 1, o.codes.as_ref(), text, &mut rng)?;
    let layout = model.layout_for(&inputs.cond)?;
    check_pass_sizes(&o.pass_sizes, layout.generated_len())?;
    let prefill = bench_prefill(model, &inputs, o)?;
    let decode = bench_decode(model, &inputs, o)?;
    let itd = bench_itd(model, &inputs, o)?;
    let passes = bench_passes(model, &inputs, o)?;
    let peak_inference = peak_mib();
    let train = match &views.trainable {
        Some((trainable, varmap)) if o.train_batch > 0 => Some(bench_train(trainable, varmap, o.n_refs, text, o)?),
        _ => None,
    };
    // After the peak of inference was read: the probe's buffer is not the model's memory.
    let bandwidth = if o.bandwidth_mib > 0 && model.device().is_cpu() { Some(read_bandwidth(o.bandwidth_mib, 5)) } else { None };
    let weight_bytes = model.step_weight_bytes();
    let decode_gb_s = weight_bytes as f64 / (decode.ms_per_step / 1e3) / 1e9;
    let time_of = |m: &str| itd.iter().find(|r| r.mode == m).and_then(|r| r.seconds_per_image);
    let exact_over_off = match (time_of("exact"), time_of("off")) {
        (Some(e), Some(f)) if f > 0.0 => Some(e / f),
        _ => None,
    };
    let mut notes = Vec::new();
    if !o.trained {
        notes.push(
            "random weights: the draft acceptance of `exact` (and so its time) is not representative; \
             pass --weights DIR to time the ITD modes on a trained model"
                .to_string(),
        );
    } else if o.codes.is_none() && cfg.itd {
        notes.push(
            "random condition codes: a trained model reproduces real references far better than these, so \
             the draft acceptance of `exact` is not representative; pass --ref/--background/--mask"
                .to_string(),
        );
    }
    Ok(BenchReport {
        model: o.label.clone(),
        device: if model.device().is_cpu() { "cpu".into() } else { format!("{:?}", model.device().location()) },
        threads: threads(),
        params: cfg.num_params(),
        dim: cfg.dim,
        layers: cfg.n_layer,
        heads: cfg.n_head,
        vocab: cfg.vocab_size,
        grid: cfg.grid,
        refs: o.n_refs,
        itd_model: cfg.itd,
        prefix_len: layout.prefix_len(),
        generated_len: layout.generated_len(),
        cfg_scale: o.sample.cfg_scale,
        top_k: o.sample.top_k,
        weights: if o.trained { "trained".into() } else { "random".into() },
        acceptance_representative: o.trained && o.codes.is_some(),
        prefill,
        decode,
        itd,
        passes,
        exact_over_off,
        train,
        dtype: o.dtype.to_string(),
        weights_mib: weight_bytes as f64 / (1u64 << 20) as f64,
        isa,
        bandwidth_gb_s: bandwidth.as_ref().map(|b| b.read_gb_s),
        decode_weight_gb_s: decode_gb_s,
        decode_bandwidth_fraction: bandwidth.as_ref().map(|b| decode_gb_s / b.read_gb_s),
        peak_mib_inference: peak_inference,
        peak_reset,
        peak_mib: peak_mib(),
        loadavg_start: load_start,
        loadavg_end: loadavg(),
        torch: None,
        notes,
    })
}

#[cfg(test)]
mod tests;
