//! `tokenar train`: train the TokenAR GPT (and the built-in text encoder) on a code cache.

use clap::Args;
use std::path::PathBuf;
use tokenar::pipeline::{RunStart, TrainJob, TrainJobConfig};
use tokenar::train::dist::Collective;

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
    /// Data-parallel runs (`mpirun -n N tokenar train ...` with the `mpi` feature, or one
    /// process per GPU under torchrun/mpirun with `--gpu` and the `nccl` feature): how long a
    /// rank waits for the others before the job is stopped (a rank died or hangs).
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    collective_timeout: f64,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config).map_err(|e| tokenar::Error::io(&args.config, e))?;
    let cfg = TrainJobConfig::from_toml(&text, &args.sets, &args.config)?;
    if args.probe {
        let device = tokenar::util::device(args.gpu)?;
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
    // One rank of a data-parallel job (MPI, or NCCL with --gpu under mpirun or torchrun),
    // else the only one.
    let (comm, device) = tokenar::train::world::for_device(args.gpu, args.collective_timeout)?;
    let start = RunStart { resume: args.resume, force: args.force };
    if comm.world() == 1 {
        return train(cfg, start, &device, &*comm);
    }
    let rank = comm.rank();
    match train(cfg, start, &device, &*comm) {
        Ok(()) => Ok(()),
        Err(e) => {
            // The other ranks would wait for this one: stop the whole job.
            eprintln!("error: rank {rank}: {e:#}");
            comm.abort(2)
        }
    }
}

fn train(cfg: TrainJobConfig, start: RunStart, device: &candle_core::Device, comm: &dyn Collective) -> anyhow::Result<()> {
    let root = comm.is_root();
    // Rank 0 checks (and with --force clears) the run folder before the other ranks read it.
    let mut job = if root {
        let job = TrainJob::open(cfg, start, device)?;
        comm.barrier()?;
        job
    } else {
        comm.barrier()?;
        // No second clearing of what rank 0 has prepared; a resumed run's forced change stands.
        TrainJob::open(cfg, RunStart { force: start.force && start.resume, ..start }, device)?
    };
    // Every rank has read the run folder before rank 0 writes to it.
    comm.barrier()?;
    let c = job.parts.gpt.config();
    if root {
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
        if comm.world() > 1 {
            let (b, a, n) = (job.parts.cfg.batch, job.parts.cfg.accum, comm.world());
            eprintln!("data parallel: {n} ranks; global batch {b} x {a} x {n} = {}", b * a * n);
        }
    }
    let summary = job.run_on(comm, true)?;
    if !root {
        return Ok(());
    }
    let out = job.parts.cfg.out.clone();
    job.export(&out.join("export"))?;
    if let Some((step, loss)) = summary.losses.last() {
        eprintln!("done: step {step}, loss {loss:.4}; bundle in {}", out.join("export").display());
    }
    Ok(())
}
