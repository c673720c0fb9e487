//! `tokenar eval`: score predictions against a dataset; `eval merge` joins shard results;
//! `eval table` lays several runs out as one markdown table; `eval metrics` lists the registry.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use tokenar::eval::{metric, registry, report, run, samples};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    cmd: Option<EvalCmd>,
    #[command(flatten)]
    score: ScoreArgs,
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Merge shard result JSONs of one run into one result (aggregates recomputed).
    Merge {
        /// Shard results (`results.shard-*.json`).
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        /// Output folder for results.json, table.md and best_worst.png.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        grid: GridArgs,
    },
    /// One markdown table from several results (rows = runs, columns = metrics).
    Table {
        #[arg(required = true)]
        results: Vec<PathBuf>,
        /// Columns to show, in order (e.g. psnr,ssim,f1,id_acc).
        #[arg(long, value_delimiter = ',')]
        columns: Option<Vec<String>>,
        /// Write the table here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
        /// One row per group and run instead of one per run: `subjects` (the number of
        /// references) or `relation` (from each sample's meta.json).
        #[arg(long)]
        by: Option<String>,
    },
    /// List the metrics in the registry.
    Metrics,
}

#[derive(Args)]
struct GridArgs {
    /// Column that ranks samples for the best/worst grid (default: first of psnr, id_acc, f1).
    #[arg(long)]
    rank_by: Option<String>,
    /// Number of best and of worst samples in the grid.
    #[arg(long, default_value_t = 4)]
    grid_k: usize,
}

#[derive(Args)]
struct ScoreArgs {
    /// Folder with one `<sample_id>.png` per sample.
    #[arg(long)]
    pred: Option<PathBuf>,
    /// Dataset folder (`sample_<int>/` with real.png, mask.png, ref/, meta.json).
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Output folder (default: `<pred>/eval`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run name shown in tables (default: the prediction folder's name).
    #[arg(long)]
    name: Option<String>,
    /// Evaluate shard i of n (0-based): samples with index % n == i.
    #[arg(long, value_parser = parse_shard)]
    shard: Option<(usize, usize)>,
    /// Metrics to run (default: all); see `tokenar eval metrics`.
    #[arg(long, value_delimiter = ',')]
    metrics: Option<Vec<String>>,
    /// Folder with network weight files (LPIPS, Inception, CLIP, DINO).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Evaluate at size x size (default: the target's size).
    #[arg(long)]
    size: Option<u32>,
    #[command(flatten)]
    grid: GridArgs,
    #[command(flatten)]
    model: ModelArgs,
}

/// Generate the predictions with a model instead of reading them (`--model`).
#[derive(Args)]
struct ModelArgs {
    /// Bundle folder to generate with, or `builtin`; predictions are written to `<out>/pred`.
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    sampling: super::SamplingArgs,
    /// Inference weights of the GPT's linear layers: f32, bf16, f16, q8_0 or q4_k (converted
    /// at load time).
    #[arg(long, default_value = "f32")]
    dtype: tokenar::nn::WeightDtype,
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (i, n) = s.split_once('/').ok_or_else(|| format!("`{s}`: expected i/n, e.g. 0/4"))?;
    let (i, n): (usize, usize) = (i.trim().parse().map_err(|_| format!("`{i}` is not a number"))?, n.trim().parse().map_err(|_| format!("`{n}` is not a number"))?);
    if n == 0 || i >= n {
        return Err(format!("`{s}`: need 0 <= i < n"));
    }
    Ok((i, n))
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    match args.cmd {
        Some(EvalCmd::Merge { parts, out, grid }) => merge(&parts, &out, &grid),
        Some(EvalCmd::Table { results, columns, out, by }) => {
            let runs = results.iter().map(report::read_json).collect::<Result<Vec<_>, _>>()?;
            let table = match by.as_deref() {
                None => report::markdown_table(&runs, columns.as_deref()),
                Some(key) => report::group_table(&runs, key, columns.as_deref()).with_context(|| {
                    format!("--by {key}: no sample of these results has that group (known: subjects, relation; results written before groups were recorded have none)")
                })?,
            };
            match out {
                Some(p) => tokenar::util::atomic_write(&p, table.as_bytes())?,
                None => println!("{table}"),
            }
            Ok(())
        }
        Some(EvalCmd::Metrics) => {
            for m in registry::builtin_metrics() {
                println!("{:<12} {}", m.name, m.about);
            }
            Ok(())
        }
        None => score(args.score),
    }
}

fn score(a: ScoreArgs) -> anyhow::Result<()> {
    if a.model.model.is_some() {
        return score_model(a);
    }
    let (Some(pred), Some(dataset)) = (a.pred, a.dataset) else {
        bail!("tokenar eval needs --dataset DIR and either --pred DIR or --model W (or a subcommand: merge, table, metrics)");
    };
    let (specs, built) = build_metrics(a.weights, a.metrics.as_deref())?;
    let name = a.name.unwrap_or_else(|| pred.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into()));
    if let Some(size) = a.size {
        tokenar::util::check_coded_image_size("--size", size)?;
    }
    let opts = run::EvalOptions { name, size: a.size, shard: a.shard.unwrap_or((0, 1)) };
    let bar = indicatif::ProgressBar::new(0);
    let result = run::evaluate_dir(&pred, &dataset, &built, &specs, &opts, Some(&progress_to(&bar)))?;
    bar.finish_and_clear();
    let out = a.out.unwrap_or_else(|| pred.join("eval"));
    write_outputs(&result, &out, &a.grid)
}

/// The registry's metrics that were asked for (all when `select` is `None`), built with the
/// weights folder; each one that cannot be built is reported, and none at all is an error.
fn build_metrics(weights: Option<PathBuf>, select: Option<&[String]>) -> anyhow::Result<(Vec<metric::MetricSpec>, metric::BuiltMetrics)> {
    let specs = registry::builtin_metrics();
    let ctx = metric::MetricContext { weights_dir: weights, device: candle_core::Device::Cpu };
    let built = metric::build_metrics(&specs, select, &ctx)?;
    for s in &built.skipped {
        eprintln!("skipping metric `{}`: {}", s.metric, s.reason);
    }
    if built.metrics.is_empty() {
        bail!("no metric could be built");
    }
    Ok((specs, built))
}

/// The evaluation's progress callback, drawing on `bar`.
fn progress_to(bar: &indicatif::ProgressBar) -> impl Fn(usize, usize) + '_ {
    move |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    }
}

fn merge(parts: &[PathBuf], out: &Path, grid: &GridArgs) -> anyhow::Result<()> {
    let runs = parts.iter().map(report::read_json).collect::<Result<Vec<_>, _>>()?;
    let merged = run::merge(&runs, &registry::builtin_metrics())?;
    if merged.shard.is_some() {
        eprintln!("note: the shards cover {} of {} samples", merged.rows.len(), merged.dataset_samples);
    }
    write_outputs(&merged, out, grid)
}

fn write_outputs(r: &run::EvalResult, out: &Path, grid: &GridArgs) -> anyhow::Result<()> {
    let file = match r.shard {
        Some((i, n)) => format!("results.shard-{i}-of-{n}.json"),
        None => "results.json".to_string(),
    };
    report::write_json(out.join(&file), r)?;
    let table = report::markdown_table(std::slice::from_ref(r), None);
    println!("{table}");
    if r.failed() > 0 {
        eprintln!("{} samples failed (see `error` in {file}); first: {}", r.failed(),
            r.rows.iter().find_map(|row| row.error.as_deref()).unwrap_or(""));
    }
    // The result is written either way (its rows name each failure); a run that scored
    // nothing is an error.
    r.check_any_scored()?;
    if r.shard.is_some() {
        return Ok(());
    }
    tokenar::util::atomic_write(out.join("table.md"), table.as_bytes())?;
    // Per-group tables (by subject count, by relation) beside the whole run's.
    for key in ["subjects", "relation"] {
        if let Some(t) = report::group_table(std::slice::from_ref(r), key, None) {
            tokenar::util::atomic_write(out.join(format!("table_by_{key}.md")), t.as_bytes())?;
            if key == "subjects" {
                println!("{t}");
            }
        }
    }
    let rank = grid.rank_by.clone().or_else(|| {
        ["psnr", "id_acc", "f1"].iter().find(|c| r.aggregates.contains_key(**c)).map(|c| c.to_string())
    });
    if let (Some(rank), Some(pred_dir)) = (rank, &r.pred_dir) {
        let samples = samples::list_samples(Path::new(&r.dataset))?;
        let (best, worst) = report::best_and_worst(r, &rank, grid.grid_k)?;
        let size = r.size;
        let img = report::best_worst_grid(&best, &worst, &mut |row| {
            let s = samples.get(row.index).filter(|s| s.id == row.id).ok_or_else(|| {
                tokenar::Error::invalid("dataset", format!("sample {} is no longer at index {}", row.id, row.index))
            })?;
            run::sample_panels(s, Path::new(pred_dir), size)
        })
        .context("drawing the best/worst grid")?;
        tokenar::imageio::save_rgb(out.join("best_worst.png"), &img)?;
        // Contact sheet: the 9 best, 9 median and 9 worst samples, 3 a row (references,
        // target, prediction each).
        let blocks = report::best_median_worst(r, &rank, 9)?;
        let sheet = report::contact_sheet(&blocks, 3, &mut |row| {
            let s = samples.get(row.index).filter(|s| s.id == row.id).ok_or_else(|| {
                tokenar::Error::invalid("dataset", format!("sample {} is no longer at index {}", row.id, row.index))
            })?;
            run::sheet_panels(s, Path::new(pred_dir), size)
        })
        .context("drawing the contact sheet")?;
        tokenar::imageio::save_rgb(out.join("sheet.png"), &sheet)?;
    }
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// `--model`: generate each sample's prediction with a bundle, save it, and score it.
fn score_model(a: ScoreArgs) -> anyhow::Result<()> {
    use tokenar::pipeline::{generate, Bundle, GenerateRequest};
    let Some(dataset) = a.dataset else { bail!("--model needs --dataset DIR") };
    let m = &a.model;
    let model = m.model.clone().unwrap_or_default();
    let device = tokenar::util::best_device();
    let mut bundle = if model.as_os_str() == "builtin" {
        let mut b = Bundle::builtin(&device)?;
        b.gpt.convert_weights(m.dtype)?;
        b
    } else {
        Bundle::load(&model, &tokenar::pipeline::bundle::LoadHints { dtype: m.dtype, ..Default::default() }, &device)?
    };
    if m.dtype != tokenar::nn::WeightDtype::F32 {
        // The converted model holds the only copy of its weights.
        bundle.gpt_vars = candle_nn::VarMap::new();
    }
    let (specs, built) = build_metrics(a.weights, a.metrics.as_deref())?;
    let name = a.name.unwrap_or_else(|| model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()));
    let out = a.out.unwrap_or_else(|| PathBuf::from("eval").join(&name));
    let pred_dir = out.join("pred");
    if let Some(size) = a.size {
        tokenar::util::check_coded_image_size("--size", size)?;
    }
    let opts = run::EvalOptions { name, size: a.size, shard: a.shard.unwrap_or((0, 1)) };
    let samples = samples::list_samples(&dataset)?;
    let root = tokenar::data::format::canonical_root(&dataset)?;
    let mut produce = |s: &samples::EvalSample| -> tokenar::Result<image::RgbImage> {
        let dir = s
            .target
            .as_ref()
            .or(s.mask.as_ref())
            .and_then(|p| p.parent())
            .ok_or_else(|| tokenar::Error::invalid("dataset", format!("sample {} has no folder", s.id)))?;
        for f in ["background.png", "description.txt"] {
            tokenar::data::format::confine(&root, &dir.join(f)).map_err(|why| tokenar::Error::invalid("dataset", format!("sample {}: {why}", s.id)))?;
        }
        let refs = s.refs.iter().map(|p| tokenar::imageio::load_rgb(p, None)).collect::<tokenar::Result<Vec<_>>>()?;
        let background = Some(tokenar::imageio::load_rgb(dir.join("background.png"), None)?);
        let mask = s.mask.as_ref().map(|p| tokenar::imageio::load_mask(p, None)).transpose()?;
        let prompt_path = dir.join("description.txt");
        let prompt = std::fs::read_to_string(&prompt_path).map_err(|e| tokenar::Error::io(&prompt_path, e))?;
        let options = m.sampling.options(&bundle.sampling, s.index as u64);
        let req = GenerateRequest {
            refs,
            background,
            mask,
            prompt: prompt.trim().to_string(),
            options,
            itd: m.sampling.itd,
            num_samples: 1,
            paste_back: m.sampling.paste_back,
            decode_itd: false,
        };
        let img = generate(&bundle, &req, None)?.images.remove(0);
        tokenar::imageio::save_rgb(pred_dir.join(format!("{}.png", s.id)), &img)?;
        Ok(img)
    };
    let bar = indicatif::ProgressBar::new(0);
    let mut result = run::evaluate(&dataset, &samples, &built, &specs, &opts, &mut produce, Some(&progress_to(&bar)))?;
    bar.finish_and_clear();
    result.pred_dir = Some(pred_dir.display().to_string());
    write_outputs(&result, &out, &a.grid)
}
