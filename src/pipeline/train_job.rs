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
use super::probe::ProbeData;
use super::run_guard::RunStart;
use crate::data::batch::{self, buckets_by_refs, load_training_samples};
use crate::data::cache::CachedSample;
use crate::error::{Error, Result};
use crate::model::{self, Condition, TokenAr};
use crate::sample::{self, DecodePlan, ItdMode, SampleOptions};
use crate::text::{BuiltinTextEncoder, WordVocab};
use crate::tokenizer::{self, Vq};
use crate::train::dist::{Collective, Single};
use crate::train::shard::{EpochSampler, Split};
use crate::train::{self, AdamWParams, Checkpointer, Hooks, LoopConfig, LrSchedule, StepOutput, TrainState};
use crate::util::Rng;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng as _;
use std::path::Path;

// The configuration and the binding loss under their former path.
pub use super::binding::{binding_loss, Binding, BindingCells};
pub use super::train_config::{ModelSection, TrainJobConfig};

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
        let samples = load_training_samples(&cfg.cache)?;
        let grid = samples[0].grid;
        let (vq, vq_vars) = tokenizer::load(&cfg.tokenizer, None, device)?;
        let vocab = vq.config().codebook_size;
        let mut gcfg = cfg.gpt_config(vocab, grid, samples[0].ref_grid)?;
        if cfg.distill_weight > 0.0 {
            // The alignment head's width is the cached features' width.
            gcfg.align_dim = Some(train::distill::feature_width(&cfg.cache, &samples, grid)?);
        }
        let buckets = buckets_by_refs(&samples, gcfg.max_refs)?;

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
            // The reference's multi-encoder head names (`alignment.0.*`) as `alignment.*`.
            model::alignment::normalize_keys(&mut file.tensors);
            if !alignment_carries_over(&gpt_vars, &file, init)? {
                file.tensors.retain(|k, _| !k.starts_with("alignment."));
            }
            let opts = crate::weights::LoadOptions {
                allow_missing: model::ADDITIONS.iter().map(|s| s.to_string()).collect(),
                ignore: Vec::new(),
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

impl<'a> From<&'a JobParts> for ProbeData<'a> {
    fn from(parts: &'a JobParts) -> Self {
        ProbeData { gpt: &parts.gpt, text: &parts.text, samples: &parts.samples }
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

    /// Condition and target tensors for the given samples ([`batch::batch`]).
    pub fn batch_tensors(&self, idx: &[usize], device: &Device) -> Result<(Condition, Tensor)> {
        // `caption_len` is the encoder's `max_len` (see `gpt_config`), so the rows fit as they are.
        batch::batch(&self.samples, idx, &self.text, device)
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
            // The forward pass records the products in the autocast dtype; backward follows it.
            let _autocast = crate::nn::autocast(cfg.autocast.dtype());
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
        let decode = |codes: &Tensor, (h, w): (usize, usize)| -> Result<Vec<image::RgbImage>> {
            let imgs = self.vq.decode(&codes.reshape(((), h, w))?)?;
            (0..imgs.dim(0)?).map(|i| crate::imageio::tensor_to_rgb(&imgs.get(i)?)).collect()
        };
        let gen_flat: Vec<u32> = out.target.iter().flatten().copied().collect();
        let generated = decode(&Tensor::from_vec(gen_flat, (idx.len(), h * w), &device)?, (h, w))?;
        let real = decode(&target, (h, w))?;
        let bg = decode(&cond.background, (h, w))?;
        for (i, _) in idx.iter().enumerate() {
            // References on a smaller grid are shown at the image size.
            let refs = decode(&cond.refs.get(i)?, cfg.ref_grid())?;
            rows.extend(refs.iter().map(|r| crate::imageio::resize_rgb(r, bg[i].width(), bg[i].height())));
            rows.push(bg[i].clone());
            rows.push(generated[i].clone());
            rows.push(real[i].clone());
        }
        let cols = cond.refs.dim(1)? + 3;
        Ok(crate::imageio::grid(&rows, cols, 2))
    }

}

/// Seeded initialisation of the built-in text encoder (so a run depends on its seed only):
/// LayerNorm weights 1, biases 0, every matrix N(0, 0.02).
fn init_text_encoder(vars: &VarMap, seed: u64) -> Result<()> {
    crate::weights::builders::init_vars(vars, seed, |name, dims, rng| {
        let n: usize = dims.iter().product();
        if name.ends_with(".bias") {
            vec![0.0; n]
        } else if dims.len() == 1 {
            vec![1.0; n]
        } else {
            (0..n).map(|_| crate::weights::builders::normal(rng) * 0.02).collect()
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

/// Whether `init`'s distillation head (`alignment.*`) starts this run's: when the run trains a
/// head (`distill_weight > 0`) of the file's shape. A file head of another width (features of
/// another encoder) is left behind, said on stderr; so is any head when the run trains none.
fn alignment_carries_over(gpt_vars: &VarMap, file: &crate::weights::TensorFile, init: &std::path::Path) -> Result<bool> {
    let Some(in_file) = file.tensors.get("alignment.weight") else { return Ok(false) };
    let ours = gpt_vars.data().lock().map_err(|_| Error::invalid("model variables", "lock poisoned"))?.get("alignment.weight").map(|v| v.dims().to_vec());
    match ours {
        Some(dims) if dims == in_file.dims() => Ok(true),
        Some(dims) => {
            eprintln!(
                "{}: its alignment head {:?} does not fit this run's {dims:?} (features of another width): the head starts fresh",
                init.display(),
                in_file.dims()
            );
            Ok(false)
        }
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::BuiltinConfig;

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
}
