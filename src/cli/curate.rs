//! `tokenar curate ...`: build a dataset from generated targets: split them by their alpha
//! mattes (from files, or made here by BEN2), filter the samples with a vision-language model
//! and by DINO identity.

use clap::Subcommand;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokenar::curate::{identity, matte, vlm, IdentityOptions, Summary, VlmOptions};
use tokenar::data::{self, Dataset, OpenOptions};

#[derive(Subcommand)]
pub enum CurateCmd {
    /// Split each sample's target (`real.png`) by an alpha matte into `background.png`
    /// (subjects blacked out), `mask.png` and `foreground.png` (RGBA). The matte is either a
    /// file `MATTES/<sample folder>.png` (--mattes) or made by the BEN2 matting network
    /// (--model ben2 --weights BEN2_Base.pth), whose foreground colours are then refined as the
    /// reference's `refine_foreground=True`. Samples already split are kept (a rerun resumes).
    Matte {
        /// InstructAR folder tree (one folder per sample holding `real.png`).
        #[arg(long)]
        dataset: PathBuf,
        /// Folder of alpha mattes named after the sample folders (grayscale, or the alpha of a cut-out).
        #[arg(long, conflicts_with = "model", required_unless_present = "model")]
        mattes: Option<PathBuf>,
        /// Make the mattes with this network (`ben2`).
        #[arg(long, value_enum, requires = "weights")]
        model: Option<MatteModel>,
        /// BEN2 weights: `BEN2_Base.pth` or `model.safetensors` (PramaLLC/BEN2 on Hugging Face).
        #[arg(long)]
        weights: Option<PathBuf>,
        /// A pixel is subject when its matte is above T (0 <= T < 1; T = 0, the reference's
        /// rule, takes every pixel with a non-zero 8-bit alpha). Equivalently a logit threshold
        /// of ln(T / (1 - T)).
        #[arg(long, default_value_t = 0.0)]
        threshold: f64,
        /// BEN2's input side (the reference resizes every image to 1024 x 1024).
        #[arg(long, default_value_t = tokenar::curate::ben2::INPUT_SIZE)]
        size: usize,
        /// Run BEN2 on the GPU (a build with the `cuda` feature).
        #[arg(long)]
        gpu: bool,
        /// Rewrite samples that already hold all three files (a hand-refined mask is lost).
        #[arg(long)]
        overwrite: bool,
    },
    /// Ask a vision-language model behind an OpenAI-compatible endpoint whether each target
    /// shows its references and fits its description; keep the samples it answers Yes to.
    /// Writes `OUT/vlm.jsonl` (one line per sample; a rerun resumes) and `OUT/vlm_kept.jsonl`.
    Vlm {
        /// Dataset folder or .jsonl manifest.
        #[arg(long)]
        dataset: PathBuf,
        /// http://HOST:PORT of the server (`/v1/chat/completions` is added).
        #[arg(long)]
        endpoint: String,
        /// Model name sent with each request.
        #[arg(long)]
        model: String,
        /// Seconds one request may take before the sample is dropped.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
        #[arg(long)]
        out: PathBuf,
        /// Ask again about the samples an earlier run dropped because a request failed.
        #[arg(long)]
        retry_errors: bool,
        /// Requests in flight at once (servers such as vLLM batch concurrent requests).
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = data::format::DEFAULT_MAX_REFS)]
        max_refs: usize,
    },
    /// Keep the samples whose every reference resembles the target: 100 x cosine of DINO v1
    /// ViT-S/16 CLS embeddings, lowest over the references above --min. Writes
    /// `OUT/identity.jsonl` (one line per sample; a rerun resumes) and `OUT/identity_kept.jsonl`.
    Identity {
        /// Dataset folder or .jsonl manifest.
        #[arg(long)]
        dataset: PathBuf,
        /// `dino_deitsmall16_pretrain.pth` (or timm's `dino_vits16.safetensors`), or a folder holding it.
        #[arg(long)]
        weights: PathBuf,
        /// Keep a sample when its lowest score is above this.
        #[arg(long, default_value_t = identity::DEFAULT_MIN_SCORE)]
        min: f64,
        #[arg(long)]
        out: PathBuf,
        /// Images per network call.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Score again the samples an earlier run dropped because an image could not be read.
        #[arg(long)]
        retry_errors: bool,
        #[arg(long, default_value_t = data::format::DEFAULT_MAX_REFS)]
        max_refs: usize,
    },
}

/// The matting networks `curate matte --model` knows.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum MatteModel {
    /// BEN2 (BEN_Base: Swin-B backbone, multi-view decoder and refiner).
    Ben2,
}

/// `--threshold` as a level of the 8-bit matte: alpha > floor(T * 255).
fn threshold_level(t: f64) -> anyhow::Result<u8> {
    if !(0.0..1.0).contains(&t) {
        anyhow::bail!("--threshold {t}: must be at least 0 and below 1 (a level of the matte)");
    }
    Ok((t * 255.0).floor() as u8)
}

const BAR: &str = "{bar:40} {pos}/{len} samples {per_sec} [{elapsed_precise}<{eta_precise}]";

fn open(dataset: &Path, max_refs: usize) -> anyhow::Result<Dataset> {
    let ds = Dataset::open(dataset, &OpenOptions { max_refs, ..OpenOptions::default() })?;
    if ds.is_empty() {
        anyhow::bail!("{}: no usable samples (run `tokenar data check` for the reasons)", dataset.display());
    }
    Ok(ds)
}

/// Print the counts; an error when every sample decided now failed (a server that is down,
/// weights that do not fit): the report holds the reasons and `--retry-errors` redoes them.
fn finish(what: &str, sum: &Summary, out: &Path, report: &str, kept: &str) -> anyhow::Result<()> {
    eprintln!(
        "{what}: {} samples ({} decided now, {} from an earlier run): kept {}, dropped {} ({} because something failed)",
        sum.total, sum.decided, sum.resumed, sum.kept, sum.dropped, sum.errors
    );
    eprintln!("report {}, kept samples {}", out.join(report).display(), out.join(kept).display());
    if let Some((id, reason)) = &sum.first_error {
        if sum.errors_now == sum.decided {
            anyhow::bail!("all {} samples decided now failed (first: {id}: {reason}); fix the cause and rerun with --retry-errors", sum.decided);
        }
        eprintln!("warning: {} samples failed now (first: {id}: {reason}); rerun with --retry-errors to decide them again", sum.errors_now);
    }
    Ok(())
}

pub fn run(cmd: CurateCmd) -> anyhow::Result<()> {
    match cmd {
        CurateCmd::Matte { dataset, mattes, model, weights, threshold, size, gpu, overwrite } => {
            let level = threshold_level(threshold)?;
            let net = match (model, &weights) {
                (Some(MatteModel::Ben2), Some(w)) => {
                    tokenar::curate::ben2::Ben2::check_size(size)?;
                    let device = tokenar::util::device(gpu)?;
                    Some(tokenar::curate::ben2::Ben2::load(w, &device)?)
                }
                (None, Some(_)) => anyhow::bail!("--weights needs --model ben2"),
                _ => None,
            };
            let source = match (&net, &mattes) {
                (Some(net), _) => matte::MatteSource::Ben2 { net, size },
                (None, Some(m)) => matte::MatteSource::Files(m),
                (None, None) => anyhow::bail!("give --mattes FOLDER or --model ben2 --weights FILE"),
            };
            let bar = super::progress_bar(0, BAR);
            let run = matte::run_matte_with(&dataset, &source, level, overwrite, Some(&super::bar_progress(&bar)))?;
            bar.finish_and_clear();
            for (id, reason) in &run.failed {
                println!("FAIL {id}: {reason}");
            }
            println!(
                "{}: split {}, already split {} (kept as they are; --overwrite to redo), failed {}",
                dataset.display(),
                run.written.len(),
                run.existing.len(),
                run.failed.len()
            );
            if run.failed.is_empty() {
                Ok(())
            } else {
                anyhow::bail!("{} sample(s) of {} could not be split", run.failed.len(), dataset.display())
            }
        }
        CurateCmd::Vlm { dataset, endpoint, model, timeout_s, out, retry_errors, concurrency, max_refs } => {
            let ds = open(&dataset, max_refs)?;
            let opts = VlmOptions { timeout: Duration::from_secs(timeout_s), retry_errors, concurrency, ..VlmOptions::new(endpoint, model) };
            let bar = super::progress_bar(ds.len() as u64, BAR);
            let sum = vlm::run_vlm(&ds, &opts, &out, Some(&super::bar_progress(&bar)))?;
            bar.finish_and_clear();
            finish("vlm", &sum, &out, vlm::REPORT, vlm::KEPT)
        }
        CurateCmd::Identity { dataset, weights, min, out, batch, retry_errors, max_refs } => {
            if batch == 0 {
                anyhow::bail!("--batch must be at least 1");
            }
            let ds = open(&dataset, max_refs)?;
            let device = tokenar::util::best_device();
            let net = identity::load_dino(&weights, tokenar::eval::nets::DinoConfig::vit_s16(), &device)?;
            let opts = IdentityOptions { min_score: min, batch, retry_errors };
            let bar = super::progress_bar(ds.len() as u64, BAR);
            let sum = identity::run_identity(&ds, &net, &device, &opts, &out, Some(&super::bar_progress(&bar)))?;
            bar.finish_and_clear();
            finish("identity", &sum, &out, identity::REPORT, identity::KEPT)
        }
    }
}
