//! `tokenar data ...`: validate a dataset, generate the synthetic benchmark, draw contact sheets.

use anyhow::Context;
use clap::Subcommand;
use std::path::PathBuf;
use tokenar::data::{self, synth, OpenOptions};

#[derive(Subcommand)]
pub enum DataCmd {
    /// Generate the procedural multi-subject benchmark in the InstructAR layout.
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1000)]
        n: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Image side in pixels.
        #[arg(long, default_value_t = 64)]
        size: u32,
        /// train or test (disjoint seed streams).
        #[arg(long, default_value = "train")]
        split: synth::Split,
        /// Subjects per sample: N, MIN-MAX (each sample's count drawn from its seed, 1 to 4),
        /// or `mix` (1, 2 and 3 subjects in turn by sample index: equal shares in any prefix).
        #[arg(long, default_value = "2")]
        subjects: String,
        /// Worker threads (0: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Do not write `contact.png` next to the dataset.
        #[arg(long)]
        no_contact: bool,
        /// The output folder holds a dataset made with other options (or more samples than
        /// --n): delete its samples (`sample_<i>/`), `dataset.json` and `contact.png` first.
        /// Without it such a folder is refused; one made with the same options is completed.
        #[arg(long)]
        force: bool,
    },
    /// Validate a dataset (folder or .jsonl) and report every bad sample with its reason.
    Check {
        path: PathBuf,
        /// Maximum number of reference images per sample.
        #[arg(long, default_value_t = data::format::DEFAULT_MAX_REFS)]
        max_refs: usize,
        /// Accept samples without a target image.
        #[arg(long)]
        allow_missing_target: bool,
    },
    /// Encode a dataset once with the tokenizer (and a T5 folder, if given) into a code cache
    /// that training reads; resumable (rerun the same command after an interruption).
    Encode {
        /// Dataset folder or .jsonl manifest.
        dataset: PathBuf,
        /// Tokenizer checkpoint (this project's .safetensors, or a LlamaGen .pt: shapes read from the file, --tokenizer-preset checks them).
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        tokenizer_preset: Option<String>,
        /// Output folder of the cache.
        #[arg(long)]
        out: PathBuf,
        /// Image side the tokenizer sees (default: the tokenizer's training size).
        #[arg(long)]
        size: Option<u32>,
        /// Optional flan-t5 folder: store its 120-row features too (right padding).
        #[arg(long)]
        t5: Option<PathBuf>,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = data::format::DEFAULT_MAX_REFS)]
        max_refs: usize,
        /// Encode only the first N samples (in the dataset's order); the cache is complete
        /// when those are done.
        #[arg(long)]
        max_samples: Option<usize>,
        /// The output folder holds a cache made with another tokenizer, dataset, text encoder
        /// or size: delete it (`index.json` and its shards) and encode afresh. Without it such
        /// a cache is refused; one made the same way is resumed.
        #[arg(long)]
        force: bool,
        /// A Hugging Face Dinov2Model .safetensors (facebook/dinov2-base in the reference
        /// recipe; its config.json beside it gives the head count): store each target image's
        /// patch features in the cache, for training with `distill_weight` > 0. The features
        /// are pooled to half the code grid (the alignment head's output grid) and the
        /// encoder is recorded in the cache's provenance.
        #[arg(long, value_name = "WEIGHTS")]
        distill_dinov2: Option<PathBuf>,
        /// Encode each reference cropped to its subject (the square around its non-white
        /// pixels) at this side instead of whole at --size: references on a code grid of their
        /// own (e.g. 32 px: 8x8 codes with a 4x tokenizer), which a model trained on the cache
        /// keeps (`generate` crops a request's references the same way).
        #[arg(long, value_name = "PX")]
        ref_size: Option<u32>,
    },
    // ---- data import-subjects200k ----
    /// Import the single-subject benchmark from Subjects200K / SubjectSpatial200K parquet
    /// shards: scene panel = target, subject panel = the reference, bbox = the mask, the scene
    /// with the box blacked out = the background, description_0 = the prompt.
    #[command(name = "import-subjects200k")]
    ImportSubjects200k {
        /// Parquet shards as published (read in the order given).
        #[arg(required = true)]
        shards: Vec<PathBuf>,
        /// Output dataset folder (written as a whole, then renamed into place).
        #[arg(long)]
        out: PathBuf,
        /// Samples to draw among the eligible rows (all of them when fewer).
        #[arg(long, default_value_t = 200)]
        count: usize,
        /// Seed of the draw.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Image side in pixels.
        #[arg(long, default_value_t = 512)]
        size: u32,
        /// Eligible rows by quality scores: test (object consistency and image quality 5,
        /// composite structure 3 or 4: the SubjectSpatial200K evaluation split), train (all 5)
        /// or all.
        #[arg(long, default_value = "test")]
        partition: data::subjects200k::Partition,
        /// Pixels cut from every side of each panel before resizing (Subjects200K's 512-pixel
        /// panels have an 8-pixel margin); 0 splits the image in two halves as they are.
        #[arg(long, default_value_t = 0)]
        padding: u32,
        /// The shards have no `bbox` column (Subjects200K): mask the whole scene.
        #[arg(long)]
        no_box: bool,
        /// Replace an earlier import in --out.
        #[arg(long)]
        force: bool,
    },
    // ---- end data import-subjects200k ----
    /// Write a contact sheet (references, background, mask, target per row).
    Sheet {
        path: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 8)]
        rows: usize,
        #[arg(long, default_value_t = 64)]
        size: u32,
    },
}

/// `--subjects`: the count range and whether counts are cycled by index (`mix`).
fn parse_subjects(s: &str) -> anyhow::Result<((usize, usize), bool)> {
    if s.trim() == "mix" {
        return Ok(((1, 3), true));
    }
    Ok((parse_range(s)?, false))
}

fn parse_range(s: &str) -> anyhow::Result<(usize, usize)> {
    let parse = |t: &str| t.trim().parse::<usize>().with_context(|| format!("invalid --subjects `{s}`"));
    match s.split_once('-') {
        Some((a, b)) => Ok((parse(a)?, parse(b)?)),
        None => {
            let n = parse(s)?;
            Ok((n, n))
        }
    }
}

pub fn run(cmd: DataCmd) -> anyhow::Result<()> {
    match cmd {
        DataCmd::Encode { dataset, tokenizer, tokenizer_preset, out, size, t5, batch, max_refs, max_samples, force, distill_dinov2, ref_size } => {
            let sel = EncodeSelect { max_refs, max_samples, force, distill: distill_dinov2, ref_size };
            encode(&dataset, &tokenizer, tokenizer_preset.as_deref(), &out, size, t5.as_deref(), batch, &sel)
        }
        DataCmd::Synth { out, n, seed, size, split, subjects, threads, no_contact, force } => {
            tokenar::util::check_image_size("--size", size)?;
            let (subjects, mix) = parse_subjects(&subjects)?;
            let opts = synth::SynthOptions { n, seed, size, subjects, mix, split, threads };
            if force {
                let removed = synth::clear_output(&out)?;
                if removed > 0 {
                    eprintln!("--force: deleted {removed} entries of the old dataset in {}", out.display());
                }
            }
            let bar = super::progress_bar(n as u64, "{bar:40} {pos}/{len} samples [{elapsed_precise}<{eta_precise}]");
            let t0 = std::time::Instant::now();
            synth::generate(&out, &opts, Some(&|k| bar.set_position(k as u64)))?;
            bar.finish_and_clear();
            eprintln!("wrote {n} samples to {} in {:.1} s", out.display(), t0.elapsed().as_secs_f64());
            if !no_contact {
                let max_refs = opts.subjects.1.max(data::format::DEFAULT_MAX_REFS);
                let ds = data::Dataset::open(&out, &OpenOptions { max_refs, ..OpenOptions::default() })?;
                let sheet = data::sheet::contact_sheet(&ds, 8, size)?;
                tokenar::imageio::save_rgb(out.join("contact.png"), &sheet)?;
            }
            Ok(())
        }
        DataCmd::Check { path, max_refs, allow_missing_target } => {
            let opts = OpenOptions { max_refs, allow_missing_target, decode: true };
            let report = data::check(&path, &opts)?;
            for (id, reason) in &report.bad {
                println!("BAD {id}: {reason}");
            }
            println!("{} samples: {} good, {} bad (files confined to {})", report.total, report.good, report.bad.len(), report.root.display());
            if report.is_ok() {
                Ok(())
            } else {
                anyhow::bail!("{} bad sample(s) in {}", report.bad.len(), path.display())
            }
        }
        // ---- data import-subjects200k ----
        DataCmd::ImportSubjects200k { shards, out, count, seed, size, partition, padding, no_box, force } => {
            let opts = data::subjects200k::ImportOptions { count, seed, size, partition, padding, no_box };
            let bar = super::progress_bar(0, "{msg} {bar:40} {pos}/{len} [{elapsed_precise}]");
            let progress = |stage: &str, done: usize, total: usize| {
                bar.set_message(stage.to_string());
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            };
            let r = data::subjects200k::import(&shards, &out, &opts, force, Some(&progress));
            bar.finish_and_clear();
            let r = r?;
            eprintln!(
                "wrote {} samples to {} ({} of {} rows eligible; left out: {:?})",
                r.samples.len(),
                out.display(),
                r.eligible,
                r.rows,
                r.excluded
            );
            if r.samples.len() < count {
                eprintln!("note: only {} eligible rows, fewer than --count {count}", r.eligible);
            }
            Ok(())
        }
        // ---- end data import-subjects200k ----
        DataCmd::Sheet { path, out, rows, size } => {
            tokenar::util::check_image_size("--size", size)?;
            tokenar::util::check_samples("--rows", rows)?;
            let ds = data::Dataset::open(&path, &OpenOptions::default())?;
            let sheet = data::sheet::contact_sheet(&ds, rows, size)?;
            tokenar::imageio::save_rgb(&out, &sheet)?;
            Ok(())
        }
    }
}

/// Which samples `data encode` takes, and whether it may replace an old cache.
struct EncodeSelect {
    max_refs: usize,
    max_samples: Option<usize>,
    force: bool,
    /// Distillation encoder weights (`--distill-dinov2`).
    distill: Option<PathBuf>,
    /// `--ref-size`.
    ref_size: Option<u32>,
}

#[allow(clippy::too_many_arguments)]
fn encode(
    dataset: &std::path::Path,
    tokenizer: &std::path::Path,
    preset: Option<&str>,
    out: &std::path::Path,
    size: Option<u32>,
    t5: Option<&std::path::Path>,
    batch: usize,
    sel: &EncodeSelect,
) -> anyhow::Result<()> {
    use tokenar::text::TextEncoder;
    if size == Some(0) {
        anyhow::bail!("invalid --size: 0 px (must be at least 1)");
    }
    if batch == 0 {
        anyhow::bail!("invalid --batch: 0 (must be at least 1)");
    }
    let device = tokenar::util::best_device();
    let (vq, _) = tokenar::tokenizer::load(tokenizer, preset, &device)?;
    let size = size.unwrap_or(vq.config().image_size as u32);
    tokenar::util::check_coded_image_size("--size", size)?;
    if let Some(r) = sel.ref_size {
        tokenar::util::check_coded_image_size("--ref-size", r)?;
        if r > size {
            anyhow::bail!("invalid --ref-size: {r} px is larger than the image size {size} px");
        }
    }
    tokenar::util::check_batch("--batch", batch)?;
    let opts = data::OpenOptions { max_refs: sel.max_refs, ..Default::default() };
    let mut ds = data::Dataset::open(dataset, &opts)?;
    // The dataset's identity covers all of it, so that --max-samples can grow a cache.
    let maker = data::cache::CacheMaker::new(&ds, tokenizer, preset, t5)?;
    let dino = match &sel.distill {
        Some(p) => Some(tokenar::eval::nets::dinov2::Dinov2Features::load(p, &device)?),
        None => None,
    };
    let maker = match &dino {
        Some(d) => maker.with_distill(d.description()),
        None => maker,
    };
    if let Some(n) = sel.max_samples {
        if n == 0 {
            anyhow::bail!("--max-samples must be positive");
        }
        ds.samples.truncate(n);
    }
    let t5 = match t5 {
        Some(p) => Some(tokenar::text::T5Encoder::load(p, tokenar::text::T5Options::new(tokenar::text::Padding::Right), &device)?),
        None => None,
    };
    let mut enc_img = |x: &candle_core::Tensor| vq.encode(x);
    let mut enc_txt = t5.as_ref().map(|t| move |p: &[String]| t.encode(p));
    let bar = super::progress_bar(ds.len() as u64, "{bar:40} {pos}/{len} samples {per_sec} [{elapsed_precise}<{eta_precise}]");
    let text = enc_txt
        .as_mut()
        .map(|f| f as &mut dyn FnMut(&[String]) -> tokenar::Result<(candle_core::Tensor, candle_core::Tensor)>);
    let eopts = data::cache::EncodeOptions { maker: Some(maker), force: sel.force, ref_size: sel.ref_size, ..data::cache::EncodeOptions::new(size, batch) };
    let mut enc_feat = dino.as_ref().map(|d| move |x: &candle_core::Tensor, (h, w): (usize, usize)| d.features_for_grid(x, (h / 2, w / 2)));
    let feats = enc_feat
        .as_mut()
        .map(|f| f as &mut dyn FnMut(&candle_core::Tensor, (usize, usize)) -> tokenar::Result<candle_core::Tensor>);
    let r = data::cache::encode_with_features(&ds, out, &eopts, &mut enc_img, text, feats, Some(&|k, _| bar.set_position(k as u64)));
    bar.finish_and_clear();
    let s = r?;
    let mut msg = format!("encoded {} samples into {} ({} in the cache", s.stored, out.display(), s.in_cache);
    if s.already > 0 {
        msg += &format!(", {} from an earlier run", s.already);
    }
    if s.skipped > 0 {
        msg += &format!("; {} skipped", s.skipped);
    }
    eprintln!("{msg})");
    Ok(())
}
