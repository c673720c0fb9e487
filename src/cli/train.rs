//! `tokenar train`: train the TokenAR GPT (and the built-in text encoder) on a code cache.

use clap::Args;
use std::path::PathBuf;
use tokenar::pipeline::{RunStart, TrainJob, TrainJobConfig};

#[derive(Args)]
pub struct TrainArgs {
    /// Training config (TOML); see configs/tokenar-builtin.toml for every field.
    #[arg(long)]
    config: PathBuf,
    /// Override a config field: --set steps=100 --set model.itd=false
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue from the newest checkpoint in the run folder. A setting changed since that
    /// checkpoint (other than steps, logging, checkpoint and sample-grid intervals, paths) is
    /// refused, as is another tokenizer or cache content.
    #[arg(long)]
    resume: bool,
    /// Without --resume: the run folder holds an old run; delete its run files (checkpoints/,
    /// export/, config.toml, loss.png, samples.png, run.json; nothing else) and start afresh.
    /// With --resume: continue even though settings changed, recording the change in
    /// checkpoints/changes.jsonl. Without --force both cases are refused.
    #[arg(long)]
    force: bool,
    /// Use a CUDA GPU when built with the `cuda` feature.
    #[arg(long)]
    gpu: bool,
    /// Do not train: print the reference probe (does the model use its references and prompt,
    /// and bind each reference to its place?) of the newest checkpoint, as JSON with --json.
    #[arg(long)]
    probe: bool,
    #[arg(long, requires = "probe")]
    json: bool,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config).map_err(|e| tokenar::Error::io(&args.config, e))?;
    let cfg = TrainJobConfig::from_toml(&text, &args.sets, &args.config)?;
    let device = tokenar::util::device(args.gpu)?;
    if args.probe {
        let dir = cfg.out.join("checkpoints");
        if tokenar::train::Checkpointer::latest_in(&dir)?.is_none() {
            anyhow::bail!("{}: no checkpoint to probe (train first)", dir.display());
        }
        let job = TrainJob::open(cfg, RunStart { resume: true, force: args.force }, &device)?;
        let p = tokenar::pipeline::probe::checkpoint_probe(&job.parts, job.state.step)?
            .ok_or_else(|| anyhow::anyhow!("the probe needs training samples with two or more references"))?;
        if args.json {
            println!("{}", serde_json::to_string(&p)?);
        } else {
            print!("{}", p.render());
        }
        return Ok(());
    }
    let mut job = TrainJob::open(cfg, RunStart { resume: args.resume, force: args.force }, &device)?;
    let c = job.parts.gpt.config();
    eprintln!(
        "model: {} layers, dim {}, {} params; index embedding {}, instruct tokens {}, ITD {}; {} training samples",
        c.n_layer,
        c.dim,
        c.num_params(),
        if c.index_embedding { "on" } else { "off" },
        c.n_instruct,
        if c.itd { "on" } else { "off" },
        job.parts.samples.len()
    );
    let summary = job.run(true)?;
    let out = job.parts.cfg.out.clone();
    job.export(&out.join("export"))?;
    if let Some((step, loss)) = summary.losses.last() {
        eprintln!("done: step {step}, loss {loss:.4}; bundle in {}", out.join("export").display());
    }
    Ok(())
}
