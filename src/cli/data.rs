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
        /// Subjects per sample: N or MIN-MAX (1 to 4).
        #[arg(long, default_value = "2")]
        subjects: String,
        /// Worker threads (0: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Do not write `contact.png` next to the dataset.
        #[arg(long)]
        no_contact: bool,
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

fn parse_subjects(s: &str) -> anyhow::Result<(usize, usize)> {
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
        DataCmd::Synth { out, n, seed, size, split, subjects, threads, no_contact } => {
            let opts = synth::SynthOptions { n, seed, size, subjects: parse_subjects(&subjects)?, split, threads };
            let bar = indicatif::ProgressBar::new(n as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} samples [{elapsed_precise}<{eta_precise}]")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
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
            println!("{} samples: {} good, {} bad", report.total, report.good, report.bad.len());
            if report.is_ok() {
                Ok(())
            } else {
                anyhow::bail!("{} bad sample(s) in {}", report.bad.len(), path.display())
            }
        }
        DataCmd::Sheet { path, out, rows, size } => {
            let ds = data::Dataset::open(&path, &OpenOptions::default())?;
            let sheet = data::sheet::contact_sheet(&ds, rows, size)?;
            tokenar::imageio::save_rgb(&out, &sheet)?;
            Ok(())
        }
    }
}
