//! `tokenar train`: the TokenAR training job.
//!
//! Reads a code cache (`tokenar data encode`), builds the GPT and the built-in text encoder
//! (or uses cached T5 features), and runs the shared training loop with the reference recipe:
//! AdamW (betas 0.9/0.95, weight decay on >= 2-D weights only), gradient clipping, optional
//! warm-up, gradient accumulation, EditAR-style CFG dropout (both / image only / text only),
//! and the ITD objective with the ablation switches of the model config. Checkpoints hold the
//! model, the optimiser, the step and the RNG, so `--resume` continues exactly.
//!
//! At every checkpoint the job also exports a bundle folder (`<out>/export`, usable with
//! `tokenar generate --weights`), a loss curve (`loss.png`), a sample grid (`samples.png`) and
//! a line of the reference probe (`checkpoints/probe.jsonl`, see [`super::probe`]).

use super::bundle::{save_builtin_text, MODEL_FILE, TEXT_FILE, TEXT_PREFIX, TOKENIZER_FILE};
use super::run_guard::RunStart;
use crate::data::cache::{CacheReader, CachedSample};
use crate::error::{Error, Result};
use crate::model::{self, Condition, GptConfig, TokenAr};
use crate::sample::{self, DecodePlan, ItdMode, SampleOptions};
use crate::text::{BuiltinConfig, BuiltinTextEncoder, TextEncoder, WordVocab};
use crate::tokenizer::{self, Vq};
use crate::train::dist::{Collective, Single};
use crate::train::shard::{EpochSampler, Split};
use crate::train::{self, AdamWParams, Checkpointer, Hooks, LoopConfig, LrSchedule, StepOutput, TrainState};
use crate::util::Rng;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The training configuration (TOML). See `configs/tokenar-builtin.toml` for every field with
/// its meaning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainJobConfig {
    pub cache: PathBuf,
    pub out: PathBuf,
    pub tokenizer: PathBuf,
    #[serde(default)]
    pub init: Option<PathBuf>,
    #[serde(default)]
    pub init_preset: Option<String>,
    pub seed: u64,
    pub steps: u64,
    pub batch: usize,
    /// Micro-steps per optimiser step (also spelt `accum_steps`): the global batch is
    /// `batch` x `accum` x the number of ranks.
    #[serde(default = "one", alias = "accum_steps")]
    pub accum: usize,
    pub lr: f64,
    #[serde(default)]
    pub warmup: u64,
    #[serde(default)]
    pub cosine: bool,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub grad_clip: f64,
    pub log_every: u64,
    pub ckpt_every: u64,
    pub keep_last: usize,
    /// CFG dropout (EditAR): both image and text / image only / text only.
    pub drop_both: f32,
    pub drop_image: f32,
    pub drop_text: f32,
    /// Samples drawn in the grid written at each checkpoint (0 = none).
    #[serde(default)]
    pub grid_samples: usize,
    /// Weight of the binding loss (0 = off): a linear head on the GPT's final features at
    /// each target position predicts which reference the token it is about to generate
    /// shows, trained with cross-entropy on the code cells a subject covers (the cache's
    /// owner grids). The head is used in training only and is not exported.
    #[serde(default)]
    pub binding_loss: f64,
    /// Cells of each subject the binding loss counts: 0 = all of them; k = only its first k
    /// in raster order (where generation decides which subject a region is; later cells can
    /// read the answer off the cells above them).
    #[serde(default)]
    pub binding_first: usize,
    /// Weight of an extra token cross-entropy on the target cells the binding loss counts
    /// (0 = off; needs `binding_loss` > 0): the token head is pushed to draw the subject the
    /// binding head names where generation decides it.
    #[serde(default)]
    pub binding_token_loss: f64,
    /// Weight of the EditAR/TokenAR distillation term (0 = off; the reference recipe: 0.5):
    /// the `alignment` head regresses the cache's target features (`tokenar data encode
    /// --distill-dinov2`), see [`crate::train::distill`]. Logged as `loss_distill`.
    #[serde(default)]
    pub distill_weight: f64,
    pub model: ModelSection,
    pub text: BuiltinConfig,
}

fn one() -> usize {
    1
}

/// The GPT: a preset plus the switches of the ablation study and size overrides.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub preset: String,
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub dim: Option<usize>,
    pub n_instruct: Option<usize>,
    pub index_embedding: Option<bool>,
    pub itd: Option<bool>,
    /// This project's cell embedding (see `model::cell_embedding`).
    #[serde(default)]
    pub cell_embedding: Option<bool>,
    pub max_refs: Option<usize>,
    /// One dropout rate for token, residual and FFN dropout.
    pub dropout: Option<f32>,
}

impl TrainJobConfig {
    pub fn from_toml(text: &str, sets: &[String], origin: &Path) -> Result<Self> {
        let value: toml::Value =
            toml::from_str(text).map_err(|e| Error::bad_file(origin, format!("not a valid training config: {e}")))?;
        let value = train::apply_overrides(value, sets)?;
        let cfg: Self = value
            .try_into()
            .map_err(|e: toml::de::Error| Error::bad_file(origin, format!("bad training config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, msg: String| Err(Error::invalid(what, msg));
        if self.batch == 0 || self.steps == 0 {
            return bad("batch/steps", "must be at least 1".into());
        }
        crate::util::check_batch("batch", self.batch)?;
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("{} (must be positive)", self.lr));
        }
        let p = self.drop_both + self.drop_image + self.drop_text;
        if !(0.0..=1.0).contains(&p) || self.drop_both < 0.0 || self.drop_image < 0.0 || self.drop_text < 0.0 {
            return bad("drop_*", format!("probabilities must be >= 0 and sum to at most 1 (sum {p})"));
        }
        if !(self.binding_loss >= 0.0 && self.binding_loss.is_finite()) {
            return bad("binding_loss", format!("{} (must be >= 0)", self.binding_loss));
        }
        if !(self.binding_token_loss >= 0.0 && self.binding_token_loss.is_finite()) || (self.binding_token_loss > 0.0 && self.binding_loss == 0.0) {
            return bad("binding_token_loss", format!("{} (must be >= 0, and needs binding_loss > 0)", self.binding_token_loss));
        }
        if !(self.distill_weight >= 0.0 && self.distill_weight.is_finite()) {
            return bad("distill_weight", format!("{} (must be >= 0)", self.distill_weight));
        }
        self.text.validate()
    }

    /// The GPT config: the preset, the overrides, and what the data and the text encoder fix.
    pub fn gpt_config(&self, vocab: usize, grid: (usize, usize)) -> Result<GptConfig> {
        let m = &self.model;
        let mut c = GptConfig::preset(&m.preset)?;
        c.vocab_size = vocab;
        c.grid = grid;
        c.caption_dim = self.text.dim;
        c.caption_len = self.text.max_len;
        if let Some(v) = m.n_layer {
            c.n_layer = v;
        }
        if let Some(v) = m.n_head {
            c.n_head = v;
        }
        if let Some(v) = m.dim {
            c.dim = v;
        }
        if let Some(v) = m.n_instruct {
            c.n_instruct = v;
        }
        if let Some(v) = m.index_embedding {
            c.index_embedding = v;
        }
        if let Some(v) = m.itd {
            c.itd = v;
        }
        if let Some(v) = m.cell_embedding {
            c.cell_embedding = v;
        }
        if let Some(v) = m.max_refs {
            c.max_refs = v;
        }
        if let Some(d) = m.dropout {
            c.dropouts.token = d;
            c.dropouts.resid = d;
            c.dropouts.ffn = d;
        }
        c.validate()?;
        Ok(c)
    }
}

/// Everything a training run holds: the models and data (read by every step) and the
/// optimisation state (changed by every step).
pub struct TrainJob {
    pub parts: JobParts,
    pub state: TrainState,
}

/// The models and data of a run.
pub struct JobParts {
    pub cfg: TrainJobConfig,
    pub gpt: TokenAr,
    pub text: BuiltinTextEncoder,
    pub vq: Vq,
    vq_vars: VarMap,
    pub samples: Vec<CachedSample>,
    /// Sample indices grouped by their number of references (a batch shares one count).
    buckets: Vec<Vec<usize>>,
    /// The binding head (weight (max_refs, dim), bias (max_refs)) when `binding_loss` > 0.
    binding: Option<(Tensor, Tensor)>,
}

const GPT_GROUP: &str = "model";
/// The reference probe's log in a run's `checkpoints/` (see [`super::probe`]).
pub const PROBE_LOG: &str = "probe.jsonl";
const TEXT_GROUP: &str = "text";
const BINDING_GROUP: &str = "binding";

fn load_cache(path: &Path) -> Result<Vec<CachedSample>> {
    let reader = CacheReader::open(path)?;
    if !reader.is_complete() {
        return Err(Error::bad_file(path, "the code cache is incomplete; finish `tokenar data encode` first"));
    }
    let mut out = Vec::with_capacity(reader.len());
    for i in 0..reader.len() {
        let s = reader.get(i)?;
        if !s.target.is_empty() {
            out.push(s);
        }
    }
    if out.is_empty() {
        return Err(Error::bad_file(path, "the code cache holds no sample with a target"));
    }
    Ok(out)
}

impl TrainJob {
    /// Build (or, with `resume`, restore) a run; an old run in `cfg.out` is refused (see
    /// [`TrainJob::open`]).
    pub fn new(cfg: TrainJobConfig, resume: bool, device: &Device) -> Result<Self> {
        Self::open(cfg, RunStart { resume, force: false }, device)
    }

    /// Build or restore a run after the run folder's checks ([`super::run_guard::prepare`]):
    /// an old run is replaced only with `force`, a resumed run's config changes are refused
    /// unless `force` (then recorded), and the cache must come from the run's tokenizer.
    pub fn open(cfg: TrainJobConfig, start: RunStart, device: &Device) -> Result<Self> {
        super::run_guard::prepare(&cfg, start)?;
        let resume = start.resume;
        let samples = load_cache(&cfg.cache)?;
        let grid = samples[0].grid;
        let (vq, vq_vars) = tokenizer::load(&cfg.tokenizer, None, device)?;
        let vocab = vq.config().codebook_size;
        let mut gcfg = cfg.gpt_config(vocab, grid)?;
        if cfg.distill_weight > 0.0 {
            // The alignment head's width is the cached features' width.
            gcfg.align_dim = Some(train::distill::feature_width(&cfg.cache, &samples, grid)?);
        }
        let max_refs = samples.iter().map(|s| s.refs.len()).max().unwrap_or(0);
        if max_refs > gcfg.max_refs {
            return Err(Error::invalid("model.max_refs", format!("the data has samples with {max_refs} references but the model supports {}", gcfg.max_refs)));
        }
        let mut buckets = vec![Vec::new(); gcfg.max_refs + 1];
        for (i, s) in samples.iter().enumerate() {
            if s.grid != grid {
                return Err(Error::invalid("cache", format!("sample {} has grid {:?}, others {:?}", s.id, s.grid, grid)));
            }
            buckets[s.refs.len()].push(i);
        }

        let (gpt, gpt_vars) = model::build(&gcfg, device, cfg.seed)?;
        let prompts: Vec<&str> = samples.iter().map(|s| s.prompt.as_str()).collect();
        let vocab_words = WordVocab::build(&prompts, 1, 4096);
        let text_vars = VarMap::new();
        let text = BuiltinTextEncoder::new(
            cfg.text.clone(),
            vocab_words,
            VarBuilder::from_varmap(&text_vars, DType::F32, device).pp(TEXT_PREFIX),
        )?;
        init_text_encoder(&text_vars, cfg.seed ^ 0x7e47)?;

        if let (Some(init), false) = (&cfg.init, resume) {
            let mut file = crate::weights::TensorFile::load(init, device)?;
            let opts = crate::weights::LoadOptions {
                allow_missing: model::ADDITIONS.iter().map(|s| s.to_string()).collect(),
                ignore: vec!["alignment.".into()],
                strict_unexpected: false,
            };
            let report = crate::weights::load_into_varmap(&gpt_vars, &mut file, &opts)?;
            eprintln!(
                "initialised from {}: {} tensors loaded, fresh: [{}], unused: [{}]",
                init.display(),
                report.loaded.len(),
                report.fresh.join(", "),
                report.unused.join(", ")
            );
        }

        let mut groups = vec![(GPT_GROUP.to_string(), gpt_vars), (TEXT_GROUP.to_string(), text_vars)];
        let binding = if cfg.binding_loss > 0.0 {
            if let Some(s) = samples.iter().find(|s| s.owners.is_none()) {
                return Err(Error::bad_file(
                    &cfg.cache,
                    format!(
                        "binding_loss needs every sample's owner grid, and {} has none: encode a dataset whose meta.json lists each subject's mask (a cache written before owner grids existed must be deleted and encoded again)",
                        s.id
                    ),
                ));
            }
            let vars = VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, DType::F32, device).pp("head");
            let w = vb.get_with_hints((gcfg.max_refs, gcfg.dim), "weight", candle_nn::Init::Const(0.0))?;
            let b = vb.get_with_hints(gcfg.max_refs, "bias", candle_nn::Init::Const(0.0))?;
            // The GPT's rules: weight N(0, 0.02), bias 0.
            model::init_weights(&vars, cfg.seed ^ 0xb1d)?;
            groups.push((BINDING_GROUP.to_string(), vars));
            Some((w, b))
        } else {
            None
        };
        let frozen: Vec<String> = model::BUFFERS.iter().map(|b| format!("{GPT_GROUP}/{b}")).collect();
        let params = AdamWParams {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            weight_decay: cfg.weight_decay,
            ..AdamWParams::default()
        };
        let mut state = TrainState::new_with_frozen(
            groups,
            params,
            cfg.seed,
            &frozen,
        )?;
        if resume {
            let ckpt = Checkpointer::new(cfg.out.join("checkpoints"), cfg.keep_last)?;
            match state.resume_latest(&ckpt)? {
                Some(r) => eprintln!("resuming from {} (step {})", r.path.display(), r.step),
                None => eprintln!("--resume: no checkpoint in {}, starting fresh", ckpt.dir().display()),
            }
        }
        Ok(Self { parts: JobParts { cfg, gpt, text, vq, vq_vars, samples, buckets, binding }, state })
    }

    /// Run to `cfg.steps`.
    pub fn run(&mut self, progress: bool) -> Result<train::LoopSummary> {
        self.parts.run(&mut self.state, progress, &Single)
    }

    /// Run to `cfg.steps` as one rank of data-parallel training (see [`train::dist`]).
    pub fn run_on(&mut self, comm: &dyn Collective, progress: bool) -> Result<train::LoopSummary> {
        self.parts.run(&mut self.state, progress, comm)
    }

    /// Write the bundle folder (tokenizer, model, text encoder) into `dir`.
    pub fn export(&self, dir: &Path) -> Result<()> {
        self.parts.export(&self.state, dir)
    }
}

fn group<'a>(state: &'a TrainState, name: &str) -> Result<&'a VarMap> {
    state
        .models
        .iter()
        .find(|(g, _)| g == name)
        .map(|(_, v)| v)
        .ok_or_else(|| Error::invalid("training state", format!("no `{name}` model group")))
}

impl JobParts {
    /// The order of the samples over the epochs: batches share a number of references.
    pub fn sampler(&self) -> Result<EpochSampler> {
        EpochSampler::new(self.buckets.clone(), self.cfg.seed)
    }

    /// Condition and target tensors for the given samples.
    pub fn batch_tensors(&self, idx: &[usize], device: &Device) -> Result<(Condition, Tensor)> {
        let b = idx.len();
        let nr = self.samples[idx[0]].refs.len();
        let hw = self.samples[idx[0]].background.len();
        let refs: Vec<u32> = idx.iter().flat_map(|&i| self.samples[i].refs.iter().flatten().copied()).collect();
        let bg: Vec<u32> = idx.iter().flat_map(|&i| self.samples[i].background.iter().copied()).collect();
        let tg: Vec<u32> = idx.iter().flat_map(|&i| self.samples[i].target.iter().copied()).collect();
        let prompts: Vec<String> = idx.iter().map(|&i| self.samples[i].prompt.clone()).collect();
        // `caption_len` is the encoder's `max_len` (see `gpt_config`), so the rows fit as they are.
        let (text, mask) = self.text.encode(&prompts)?;
        let cond = Condition::new(
            Tensor::from_vec(refs, (b, nr, hw), device)?,
            Tensor::from_vec(bg, (b, hw), device)?,
            text,
            Some(mask),
        );
        Ok((cond, Tensor::from_vec(tg, (b, hw), device)?))
    }

    /// One training micro-step's loss on the samples `idx`; `draws[i]` makes sample i's CFG
    /// dropout draw.
    fn loss(&self, idx: &[usize], draws: &mut [Rng], rng: &mut Rng) -> Result<StepOutput> {
        let device = self.gpt.device().clone();
        let (mut cond, target) = self.batch_tensors(idx, &device)?;
        let (db, di, dt) = (self.cfg.drop_both, self.cfg.drop_image, self.cfg.drop_text);
        let mut drop_text = Vec::with_capacity(idx.len());
        let mut drop_image = Vec::with_capacity(idx.len());
        for d in draws.iter_mut() {
            let r: f32 = d.random();
            drop_text.push(r < db || r > 1.0 - dt);
            drop_image.push(r < db + di);
        }
        cond.drop_text = drop_text;
        cond.drop_image = drop_image;
        let out = self.gpt.forward_train_full(&cond, &target, true, rng)?;
        let (b, n) = out.targets.dims2()?;
        let nll = self.gpt.token_nll(&out.hidden, &out.targets)?;
        let loss = nll.mean_all()?;
        let (terms, mut extras) = self.binding_terms(idx, &cond, &out, &nll)?.unwrap_or_default();
        let mut loss = terms.into_iter().try_fold(loss, |acc, t| acc + t)?;
        if self.cfg.distill_weight > 0.0 {
            let feats = train::distill::batch_targets(&self.samples, idx, &device)?;
            let dl = train::distill::distill_loss(&self.gpt, &out.target_features, &feats)?;
            extras.push(("loss_distill", dl.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64));
            loss = (loss + (dl * self.cfg.distill_weight)?)?;
        }
        Ok(StepOutput { loss, tokens: b * n, extras })
    }

    /// The binding terms to add to a step's loss, in order (the weighted binding loss and, when
    /// configured, the weighted token loss on the same cells), and the figures to log; `None`
    /// without a binding head or without a counted cell in the batch.
    /// `nll`: the per-token losses (B, n_loss) of the step.
    fn binding_terms(&self, idx: &[usize], cond: &Condition, out: &model::TrainOutput, nll: &Tensor) -> Result<Option<(Vec<Tensor>, Vec<(&'static str, f64)>)>> {
        let Some((w, bias)) = &self.binding else {
            return Ok(None);
        };
        let owners: Vec<&[u8]> = idx.iter().map(|&i| self.samples[i].owners.as_deref().unwrap_or(&[])).collect();
        let hw = out.target_features.dim(1)?;
        let cells = BindingCells::select(&owners, &cond.drop_image, hw, self.cfg.binding_first)?;
        let Some(bl) = binding_loss(&out.target_features, w, bias, &cells)? else {
            return Ok(None);
        };
        let mut extras = vec![
            ("binding_loss", bl.loss.to_scalar::<f32>()? as f64),
            ("binding_acc", bl.acc),
            ("binding_first_acc", bl.first_acc),
            ("binding_decision_acc", bl.decision_acc),
        ];
        let mut terms = vec![(bl.loss * self.cfg.binding_loss)?];
        if self.cfg.binding_token_loss > 0.0 {
            // Loss rows of those cells: the target is the last h*w of the n loss positions.
            let (b, n) = nll.dims2()?;
            let rows: Vec<u32> = cells.rows.iter().map(|&r| ((r as usize / hw) * n + n - hw + r as usize % hw) as u32).collect();
            let rows = Tensor::from_vec(rows, cells.rows.len(), nll.device())?;
            let tl = nll.reshape(b * n)?.index_select(&rows, 0)?.mean_all()?;
            extras.push(("binding_token_loss", tl.to_scalar::<f32>()? as f64));
            terms.push((tl * self.cfg.binding_token_loss)?);
        }
        Ok(Some((terms, extras)))
    }

    fn run(&self, state: &mut TrainState, progress: bool, comm: &dyn Collective) -> Result<train::LoopSummary> {
        let cfg = self.cfg.clone();
        std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
        let toml_text = toml::to_string_pretty(&cfg).map_err(|e| Error::invalid("config", e.to_string()))?;
        if comm.is_root() {
            crate::util::atomic_write(cfg.out.join("config.toml"), toml_text.as_bytes())?;
            super::run_guard::record_start(&cfg)?;
        }
        let schedule = LrSchedule {
            base_lr: cfg.lr,
            warmup_steps: cfg.warmup,
            decay: if cfg.cosine {
                train::Decay::Cosine { total_steps: cfg.steps, min_lr: cfg.lr * 0.1 }
            } else {
                train::Decay::Constant
            },
        };
        let mut lc = LoopConfig::new(cfg.steps, schedule);
        lc.accum = cfg.accum;
        lc.max_grad_norm = if cfg.grad_clip > 0.0 { Some(cfg.grad_clip) } else { None };
        lc.log_every = cfg.log_every;
        lc.ckpt_every = cfg.ckpt_every;
        lc.keep_last = cfg.keep_last;
        lc.run_dir = Some(cfg.out.join("checkpoints"));
        lc.progress = progress;
        lc.metadata.insert(super::run_guard::CONFIG_KEY.into(), toml_text);
        // The models share their variables with `state` (candle `Var`s are shared handles),
        // so the step reads the models while the loop updates the variables through `state`.
        let mut hooks = JobHooks { parts: self };
        // Each micro-step reads its part of the step's global batch (see `train::shard`).
        let sampler = self.sampler()?;
        let split = Split { batch: cfg.batch, accum: cfg.accum, rank: comm.rank(), world: comm.world() };
        let mut at = (0u64, 0usize);
        let step_fn = |step: u64, rng: &mut Rng| {
            if at.0 != step {
                at = (step, 0);
            }
            let (idx, start) = sampler.micro_batch(step, &split, at.1)?;
            at.1 += 1;
            let mut draws: Vec<Rng> = (0..idx.len()).map(|k| sampler.sample_rng(step, start + k)).collect();
            self.loss(&idx, &mut draws, rng)
        };
        train::run_loop_on(comm, &lc, state, step_fn, &mut hooks)
    }

    /// Write the bundle folder (tokenizer, model, text encoder) into `dir`.
    pub fn export(&self, state: &TrainState, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        tokenizer::save(&dir.join(TOKENIZER_FILE), self.vq.config(), &self.vq_vars)?;
        model::save(&dir.join(MODEL_FILE), &self.gpt, group(state, GPT_GROUP)?)?;
        save_builtin_text(&dir.join(TEXT_FILE), &self.text, group(state, TEXT_GROUP)?)
    }

    /// A grid of `n` samples: references, background, generated target, real target.
    pub fn sample_grid(&self, n: usize, seed: u64) -> Result<image::RgbImage> {
        let device = self.gpt.device().clone();
        let mut rows = Vec::new();
        let mut rng = crate::util::rng(seed);
        let bucket = self.buckets.iter().max_by_key(|b| b.len()).expect("non-empty");
        let idx: Vec<usize> = (0..n.min(bucket.len())).map(|_| bucket[rng.random_range(0..bucket.len())]).collect();
        let (cond, target) = self.batch_tensors(&idx, &device)?;
        let cfg = self.gpt.config();
        let itd = if cfg.itd { ItdMode::Exact } else { ItdMode::Off };
        let opts = SampleOptions { cfg_scale: 1.0, temperature: 1.0, top_k: 0, top_p: 1.0, seed, cfg_interval: None };
        let known: Vec<Vec<u32>> = if cfg.itd {
            (0..idx.len()).map(|i| Ok(cond.refs.get(i)?.flatten_all()?.to_vec1::<u32>()?)).collect::<Result<_>>()?
        } else {
            vec![Vec::new(); idx.len()]
        };
        let (mut session, first) = self.gpt.start(&cond, false)?;
        let plan = DecodePlan { known, n_target: cfg.image_tokens(), itd };
        let out = sample::generate(&mut session, &first, &plan, &opts, &mut rng, None)?;
        let (h, w) = cfg.grid;
        let decode = |codes: &Tensor| -> Result<Vec<image::RgbImage>> {
            let imgs = self.vq.decode(&codes.reshape(((), h, w))?)?;
            (0..imgs.dim(0)?).map(|i| crate::imageio::tensor_to_rgb(&imgs.get(i)?)).collect()
        };
        let gen_flat: Vec<u32> = out.target.iter().flatten().copied().collect();
        let generated = decode(&Tensor::from_vec(gen_flat, (idx.len(), h * w), &device)?)?;
        let real = decode(&target)?;
        let bg = decode(&cond.background)?;
        for (i, _) in idx.iter().enumerate() {
            let refs = decode(&cond.refs.get(i)?)?;
            rows.extend(refs);
            rows.push(bg[i].clone());
            rows.push(generated[i].clone());
            rows.push(real[i].clone());
        }
        let cols = cond.refs.dim(1)? + 3;
        Ok(crate::imageio::grid(&rows, cols, 2))
    }

}

/// The target cells the binding loss counts, gathered over a batch.
pub struct BindingCells {
    /// Row `b * h*w + cell` of each counted cell in the batch's (B * h*w) target positions.
    pub rows: Vec<u32>,
    /// Its subject (reference index).
    pub labels: Vec<u32>,
    /// Whether it is its subject's first cell in raster order.
    pub first: Vec<bool>,
    /// Whether it is its sample's first subject cell: the one decision generation makes
    /// unaided (a later subject can be told by elimination from the cells already drawn).
    pub decision: Vec<bool>,
}

impl BindingCells {
    /// The cells a subject covers (`owners[b][cell]` = k + 1 for subject k): all of them
    /// (`first` = 0) or each subject's first `first` cells in raster order; samples whose
    /// images were dropped are left out.
    pub fn select(owners: &[&[u8]], dropped: &[bool], hw: usize, first: usize) -> Result<Self> {
        let mut c = Self { rows: Vec::new(), labels: Vec::new(), first: Vec::new(), decision: Vec::new() };
        for (i, o) in owners.iter().enumerate() {
            if dropped.get(i).copied().unwrap_or(false) {
                continue;
            }
            if o.len() != hw {
                return Err(Error::invalid("owner grid", format!("sample {i} has {} cells, the target {hw}", o.len())));
            }
            // Cells seen so far of each subject, and of any subject.
            let mut seen = [0usize; 256];
            let mut any = 0;
            for (cell, &k) in o.iter().enumerate() {
                if k > 0 {
                    seen[k as usize] += 1;
                    any += 1;
                    if first == 0 || seen[k as usize] <= first {
                        c.rows.push((i * hw + cell) as u32);
                        c.labels.push(k as u32 - 1);
                        c.first.push(seen[k as usize] == 1);
                        c.decision.push(any == 1);
                    }
                }
            }
        }
        Ok(c)
    }
}

/// What [`binding_loss`] returns.
pub struct Binding {
    /// Mean cross-entropy over the counted cells (a scalar).
    pub loss: Tensor,
    /// Accuracy over the counted cells.
    pub acc: f64,
    /// Accuracy over each subject's first cell in raster order.
    pub first_acc: f64,
    /// Accuracy over each sample's first subject cell (see [`BindingCells::decision`]).
    pub decision_acc: f64,
}

/// The binding loss: mean cross-entropy of the binding head's prediction (which reference)
/// at the `cells`; `None` when there are none. `features`: (B, h*w, dim), the GPT's
/// normalised features where it predicts each target token.
pub fn binding_loss(features: &Tensor, w: &Tensor, bias: &Tensor, cells: &BindingCells) -> Result<Option<Binding>> {
    let (b, hw, d) = features.dims3()?;
    let n = cells.rows.len();
    if n == 0 {
        return Ok(None);
    }
    if let Some(r) = cells.rows.iter().find(|&&r| r as usize >= b * hw) {
        return Err(Error::invalid("binding cells", format!("row {r} outside the {b} x {hw} target positions")));
    }
    let classes = w.dim(0)?;
    if let Some(bad) = cells.labels.iter().find(|&&k| k as usize >= classes) {
        return Err(Error::invalid("owner grid", format!("subject {bad} but the binding head has {classes} references")));
    }
    let dev = features.device();
    let x = features.reshape((b * hw, d))?.index_select(&Tensor::from_vec(cells.rows.clone(), n, dev)?, 0)?;
    let logits = x.matmul(&w.t()?)?.broadcast_add(bias)?;
    let pred = logits.argmax(1)?.to_vec1::<u32>()?;
    let right: Vec<bool> = pred.iter().zip(&cells.labels).map(|(p, l)| p == l).collect();
    let acc_over = |sel: &[bool]| {
        let k = sel.iter().filter(|f| **f).count();
        right.iter().zip(sel).filter(|(r, f)| **r && **f).count() as f64 / k.max(1) as f64
    };
    let acc = acc_over(&vec![true; n]);
    let (first_acc, decision_acc) = (acc_over(&cells.first), acc_over(&cells.decision));
    let loss = model::loss::cross_entropy(&logits, &Tensor::from_vec(cells.labels.clone(), n, dev)?)?;
    Ok(Some(Binding { loss, acc, first_acc, decision_acc }))
}

/// Seeded initialisation of the built-in text encoder (so a run depends on its seed only):
/// LayerNorm weights 1, biases 0, every matrix N(0, 0.02).
fn init_text_encoder(vars: &VarMap, seed: u64) -> Result<()> {
    model::load::init_vars(vars, seed, |name, dims, rng| {
        let n: usize = dims.iter().product();
        if name.ends_with(".bias") {
            vec![0.0; n]
        } else if dims.len() == 1 {
            vec![1.0; n]
        } else {
            (0..n).map(|_| model::load::normal(rng) * 0.02).collect()
        }
    })
}

struct JobHooks<'a> {
    parts: &'a JobParts,
}

impl Hooks for JobHooks<'_> {
    fn on_checkpoint(&mut self, step: u64, _path: &Path, state: &TrainState) -> Result<()> {
        let job = self.parts;
        let out = &job.cfg.out;
        job.export(state, &out.join("export"))?;
        let recs = train::MetricsLog::read(out.join("checkpoints").join("metrics.jsonl")).unwrap_or_default();
        let pts: Vec<(f64, f64)> = recs.iter().map(|r| (r.step as f64, r.loss)).collect();
        if pts.len() >= 2 {
            let extra = train::metrics::extra_series(&recs, "loss_distill");
            train::metrics::plot_loss_series(&pts, &[("distill", &extra)], out.join("loss.png"), &train::PlotOptions { log_y: true, ..Default::default() })?;
        }
        if job.cfg.grid_samples > 0 {
            let g = job.sample_grid(job.cfg.grid_samples, step)?;
            crate::imageio::save_rgb(out.join("samples.png"), &g)?;
        }
        if let Some(p) = super::probe::checkpoint_probe(job, step)? {
            super::probe::append(&out.join("checkpoints").join(PROBE_LOG), &p)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_encoder_init_is_seeded_with_unit_norms() {
        let build = |seed| {
            let vm = VarMap::new();
            let vocab = WordVocab::build(&["a star left of a ring"], 1, 100);
            let cfg = BuiltinConfig { dim: 8, n_layer: 1, n_head: 2, max_len: 4, mlp_ratio: 2, norm_eps: 1e-5 };
            BuiltinTextEncoder::new(cfg, vocab, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu).pp(TEXT_PREFIX)).unwrap();
            init_text_encoder(&vm, seed).unwrap();
            crate::weights::varmap_tensors(&vm)
        };
        let (a, b) = (build(1), build(1));
        for (k, t) in &a {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(v, b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{k} differs for one seed");
            if k.contains("norm") && k.ends_with(".weight") {
                assert!(v.iter().all(|&x| x == 1.0), "{k}");
            }
        }
        assert_ne!(build(2)["text_encoder.pos_embeddings"].to_vec2::<f32>().unwrap(), a["text_encoder.pos_embeddings"].to_vec2::<f32>().unwrap());
    }

    #[test]
    fn binding_loss_counts_subject_cells_of_kept_samples() {
        let dev = Device::Cpu;
        // Two samples of 3 cells, dim 2; the head reads feature 0 as reference 0, feature 1
        // as reference 1.
        let f = Tensor::new(&[[[2f32, 0.], [0., 1.], [5., 5.]], [[0., 3.], [1., 0.], [1., 0.]]], &dev).unwrap();
        let w = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev).unwrap();
        let bias = Tensor::new(&[0f32, 0.], &dev).unwrap();
        let ce = |l: [f32; 2], k: usize| {
            let m = l[0].max(l[1]);
            (m + ((l[0] - m).exp() + (l[1] - m).exp()).ln() - l[k]) as f64
        };
        // Sample 0: cells owned by subject 0, subject 0 (wrongly predicted), none.
        let owners: [&[u8]; 2] = [&[1, 1, 0], &[2, 0, 2]];
        let value = |b: &Binding| b.loss.to_scalar::<f32>().unwrap() as f64;
        let bl = binding_loss(&f, &w, &bias, &BindingCells::select(&owners, &[false, false], 3, 0).unwrap()).unwrap().unwrap();
        let want = (ce([2., 0.], 0) + ce([0., 1.], 0) + ce([0., 3.], 1) + ce([1., 0.], 1)) / 4.0;
        assert!((value(&bl) - want).abs() < 1e-6);
        // Right: cells 0 of both samples (each its subject's first); wrong: sample 0 cell 1
        // and sample 1 cell 2.
        assert_eq!((bl.acc, bl.first_acc, bl.decision_acc), (0.5, 1.0, 1.0));
        // Only each subject's first cell.
        let bl = binding_loss(&f, &w, &bias, &BindingCells::select(&owners, &[false, false], 3, 1).unwrap()).unwrap().unwrap();
        assert!((value(&bl) - (ce([2., 0.], 0) + ce([0., 3.], 1)) / 2.0).abs() < 1e-6);
        assert_eq!((bl.acc, bl.first_acc), (1.0, 1.0));
        // A sample whose images were dropped does not count.
        let bl = binding_loss(&f, &w, &bias, &BindingCells::select(&owners, &[false, true], 3, 0).unwrap()).unwrap().unwrap();
        assert!((value(&bl) - (ce([2., 0.], 0) + ce([0., 1.], 0)) / 2.0).abs() < 1e-6);
        assert_eq!(bl.acc, 0.5);
        // The decision is each sample's first subject cell: sample 1's (cell 0, right) and,
        // with its first cell swapped to subject 0 (then predicted wrongly), none right.
        let bl = binding_loss(&f, &w, &bias, &BindingCells::select(&[&[0, 0, 0], &[1, 0, 2]], &[false, false], 3, 0).unwrap()).unwrap().unwrap();
        assert_eq!((bl.acc, bl.first_acc, bl.decision_acc), (0.0, 0.0, 0.0));
        let bl = binding_loss(&f, &w, &bias, &BindingCells::select(&[&[0, 0, 0], &[2, 0, 1]], &[false, false], 3, 0).unwrap()).unwrap().unwrap();
        assert_eq!((bl.acc, bl.first_acc, bl.decision_acc), (1.0, 1.0, 1.0));
        assert!(binding_loss(&f, &w, &bias, &BindingCells::select(&[&[0, 0, 0], &[0, 0, 0]], &[false, false], 3, 0).unwrap()).unwrap().is_none());
        // Bad owner grids are reported.
        let e = BindingCells::select(&[&[1, 1], &[0, 0, 0]], &[false, false], 3, 0).err().unwrap();
        assert!(e.to_string().contains("2 cells"), "{e}");
        let e = binding_loss(&f, &w, &bias, &BindingCells::select(&[&[3, 0, 0], &[0, 0, 0]], &[false, false], 3, 0).unwrap()).err().unwrap();
        assert!(e.to_string().contains("subject 2"), "{e}");
    }

    #[test]
    fn shipped_config_parses_and_overrides_apply() {
        let text = include_str!("../../configs/tokenar-builtin.toml");
        let cfg = TrainJobConfig::from_toml(text, &[], Path::new("configs/tokenar-builtin.toml")).unwrap();
        let g = cfg.gpt_config(1024, (8, 8)).unwrap();
        assert!(g.itd && g.index_embedding && g.n_instruct > 0);
        assert_eq!((g.caption_dim, g.caption_len), (cfg.text.dim, cfg.text.max_len));
        let sets = vec!["model.itd=false".to_string(), "model.n_instruct=0".to_string(), "steps=7".to_string()];
        let ab = TrainJobConfig::from_toml(text, &sets, Path::new("x.toml")).unwrap();
        let g = ab.gpt_config(1024, (8, 8)).unwrap();
        assert!(!g.itd && g.n_instruct == 0 && ab.steps == 7);
        let binding = include_str!("../../configs/tokenar-binding.toml");
        let bc = TrainJobConfig::from_toml(binding, &[], Path::new("configs/tokenar-binding.toml")).unwrap();
        assert!(bc.binding_loss > 0.0 && bc.binding_first > 0 && bc.binding_token_loss > 0.0);
        assert!(bc.gpt_config(1024, (8, 8)).unwrap().cell_embedding && !g.cell_embedding);
        let e = TrainJobConfig::from_toml(text, &["model.colour=3".to_string()], Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = TrainJobConfig::from_toml(text, &["drop_text=0.99".to_string()], Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("drop"), "{e}");
    }
}
