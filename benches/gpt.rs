//! GPT throughput through the library's benchmark (the same code as `tokenar bench`): prefill,
//! KV-cache decoding with CFG, one image per ITD mode, and a training step, for the 256-dim
//! 4-layer LlamaGen configuration (the PyTorch anchor in docs/reference.md) and for the
//! built-in `small` preset with two references.
//!
//! Run: `cargo bench --bench gpt` (or `--profile dev` to reuse a debug build's dependencies).
//! For a comparison with PyTorch on the same machine use `tokenar bench --torch`.

use candle_core::Device;

// The allocator the command line uses (see src/main.rs).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tokenar::bench::{self, BenchOptions, Overrides};
use tokenar::sample::ItdMode;

fn one(preset: &str, n_refs: usize, itd: Vec<ItdMode>) -> tokenar::Result<()> {
    let cfg = bench::bench_config(preset, &Overrides::default())?;
    let (model, varmap) = tokenar::model::build(&cfg, &Device::Cpu, 0)?;
    let o = BenchOptions { label: preset.into(), n_refs, decode_steps: 64, itd_modes: itd, train_batch: 2, ..Default::default() };
    let r = bench::run(&model, &varmap, None, &o)?;
    print!("{}", bench::render_table(&r));
    println!("{}", serde_json::to_string(&r).map_err(|e| tokenar::Error::invalid("report", e.to_string()))?);
    Ok(())
}

fn main() -> tokenar::Result<()> {
    tokenar::util::tune_allocator();
    bench::pin_threads();
    // As the command line does: inside candle's thread pool.
    tokenar::util::in_pool(|| {
        one("anchor", 0, vec![ItdMode::Off])?;
        one("small", 2, ItdMode::ALL.to_vec())
    })
}
