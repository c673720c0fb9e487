//! The `tokenar` command line: parses flags, calls the library, draws progress.

mod cli;

// mimalloc keeps freed blocks for reuse: candle allocates a fresh (often zero-filled) buffer
// for every op, and glibc returned the large ones to the system and faulted them back in on
// the next op (built-in model: decode 0.43 -> 0.32 ms/step, train step 1,018 -> 770 ms;
// bench/README.md). `util::tune_allocator` keeps it from returning memory.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "tokenar", version, about = "TokenAR: multi-subject image generation with an autoregressive token model")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The VQ image tokenizer: train it, or round-trip an image through it.
    #[command(subcommand)]
    Tokenizer(cli::tokenizer::TokenizerCmd),
    /// Datasets: validate, generate the synthetic benchmark, encode to a code cache.
    #[command(subcommand)]
    Data(cli::data::DataCmd),
    /// Build a dataset: split targets by their mattes, filter samples with a VLM or by DINO identity.
    #[command(subcommand)]
    Curate(cli::curate::CurateCmd),
    /// Train the TokenAR GPT on a code cache.
    Train(cli::train::TrainArgs),
    /// Generate an image from reference subjects, a background, a mask and a prompt.
    Generate(cli::generate::GenerateArgs),
    /// Describe a checkpoint or bundle (family, preset, parameters, additions).
    Info(cli::info::InfoArgs),
    /// Where the generated cells look: PNG heat maps of each layer's and head's attention over
    /// the references, the background and the text, for one request.
    Attention(cli::attention::AttentionArgs),
    /// Score generated images against a dataset (PSNR, SSIM, LPIPS, FID, CLIP-I, DINO, ...).
    Eval(cli::eval::EvalArgs),
    /// Speed: prefill, decode, ITD modes, train step (optionally against PyTorch).
    Bench(cli::bench::BenchArgs),
    /// The web page: generate from the browser (and its JSON API) on a local port.
    Serve(cli::serve::ServeArgs),
    /// Rewrite a GPT checkpoint with its linear layers' weights in bf16 or f16.
    Convert(cli::convert::ConvertArgs),
}

fn main() -> ExitCode {
    tokenar::util::tune_allocator();
    let cli = Cli::parse();
    // Fix the worker-thread count once (candle otherwise re-reads it on every matmul).
    tokenar::bench::pin_threads();
    // Everything runs inside candle's thread pool (see `in_pool`).
    let result = tokenar::util::in_pool(move || match cli.command {
        Command::Tokenizer(c) => cli::tokenizer::run(c),
        Command::Data(c) => cli::data::run(c),
        Command::Curate(c) => cli::curate::run(c),
        Command::Eval(a) => cli::eval::run(a),
        Command::Train(a) => cli::train::run(a),
        Command::Generate(a) => cli::generate::run(a),
        Command::Attention(a) => cli::attention::run(a),
        Command::Info(a) => cli::info::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Serve(a) => cli::serve::run(a),
        Command::Convert(a) => cli::convert::run(a),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
