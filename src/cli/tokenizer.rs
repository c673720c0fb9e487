use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use tokenar::tokenizer::{self, dataset, train};

#[derive(Subcommand)]
pub enum TokenizerCmd {
    /// Train a tokenizer on a folder of images (resumes from the checkpoint in out_dir).
    Train {
        /// TOML training config (see configs/tokenizer-small.toml).
        #[arg(long)]
        config: PathBuf,
        /// Override a config field, e.g. --set steps=2000 --set codebook_size=512.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Use a GPU when built with CUDA support.
        #[arg(long)]
        gpu: bool,
    },
    /// Encode an image to codes and decode it back; writes the reconstruction.
    Roundtrip {
        /// Tokenizer weights (.safetensors from this project, or a LlamaGen .pt: shapes read from the file).
        #[arg(long)]
        weights: PathBuf,
        /// Architecture of a LlamaGen checkpoint (vq-16, vq-8, ...).
        #[arg(long)]
        preset: Option<String>,
        /// Resize the input to this side first (default: the model's image_size; 8 to 1024).
        #[arg(long)]
        size: Option<u32>,
        input: PathBuf,
        output: PathBuf,
    },
    /// Reconstruction PSNR and codebook usage on a folder of images.
    Eval {
        #[arg(long)]
        weights: PathBuf,
        #[arg(long)]
        preset: Option<String>,
        /// Folder of images (searched recursively; files named mask* are skipped).
        #[arg(long)]
        data: PathBuf,
        /// Evaluate at most this many images (a seeded random subset of the folder).
        #[arg(long)]
        limit: Option<usize>,
        /// Write originals over reconstructions of the first 8 images to this PNG.
        #[arg(long)]
        png: Option<PathBuf>,
    },
}

pub fn run(cmd: TokenizerCmd) -> anyhow::Result<()> {
    match cmd {
        TokenizerCmd::Train { config, set, gpu } => {
            let cfg = train::TrainConfig::load(&config, &set)?;
            let device = tokenar::util::device(gpu)?;
            let bar = ProgressBar::new(cfg.steps as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                    .context("progress bar template")?,
            );
            let summary = train::train(&cfg, &device, &mut |s| {
                bar.set_position(s.step as u64);
                bar.set_message(format!(
                    "loss {:.4} psnr {:.2} usage {:.0}% {:.1} img/s",
                    s.loss,
                    s.psnr,
                    s.usage * 100.0,
                    s.images_per_s
                ));
            })?;
            bar.finish();
            println!(
                "{} steps in {:.0} s ({:.2} images/s); checkpoint {}",
                summary.steps_done,
                summary.seconds,
                summary.images_per_s,
                summary.checkpoint.display()
            );
            if let Some(e) = summary.eval {
                println!(
                    "held-out: {} images, PSNR {:.2} dB, codebook usage {:.1}% ({} codes)",
                    e.images,
                    e.psnr,
                    e.usage * 100.0,
                    e.codes_used
                );
            }
            if let Some(p) = summary.comparison_png {
                println!("reconstructions: {}", p.display());
            }
            Ok(())
        }
        TokenizerCmd::Roundtrip { weights, preset, size, input, output } => {
            let device = tokenar::util::device(false)?;
            let (vq, _) = tokenizer::load(&weights, preset.as_deref(), &device)?;
            let size = size.unwrap_or(vq.config().image_size as u32);
            tokenar::util::check_coded_image_size("--size", size)?;
            tokenar::imageio::output_format(&output)?;
            let img = tokenar::imageio::load_rgb(&input, Some(size))?;
            let x = tokenar::imageio::rgb_to_tensor(&img, &device)?.unsqueeze(0)?;
            let codes = vq.encode(&x)?;
            let y = vq.decode(&codes)?;
            let psnr = tokenizer::psnr(&y, &x)?[0];
            tokenar::imageio::save_rgb(&output, &tokenar::imageio::tensor_to_rgb(&y.get(0)?)?)?;
            let (_, h, w) = codes.dims3()?;
            println!("{h}x{w} codes, PSNR {psnr:.2} dB -> {}", output.display());
            Ok(())
        }
        TokenizerCmd::Eval { weights, preset, data, limit, png } => {
            let device = tokenar::util::device(false)?;
            let (vq, _) = tokenizer::load(&weights, preset.as_deref(), &device)?;
            let paths = dataset::list_images(&data, &dataset::NOT_PICTURES.map(String::from))?;
            let imgs = dataset::load_images(&paths, vq.config().image_size as u32, limit)?;
            let r = dataset::evaluate(&vq, &imgs, 32, &device)?;
            println!(
                "{} images: PSNR {:.2} dB, codebook usage {:.1}% ({} of {} codes)",
                r.images,
                r.psnr,
                r.usage * 100.0,
                r.codes_used,
                vq.config().codebook_size
            );
            if let Some(p) = png {
                let n = imgs.len().min(8);
                tokenar::imageio::save_rgb(&p, &dataset::comparison(&vq, &imgs[..n], &device)?)?;
                println!("reconstructions: {}", p.display());
            }
            Ok(())
        }
    }
}
