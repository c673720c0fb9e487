//! GPT throughput: prefill tokens/s and KV-cache decode tokens/s with batch 2 (cond + uncond),
//! plus one training step (forward + backward), for the `small` preset and for a 256-dim,
//! 4-layer LlamaGen t2i configuration (the PyTorch anchor in REFERENCE.md section 7).
//!
//! Tokens/s count sequence positions of one sample (each step processes both CFG rows).
//! Run: `cargo bench --bench gpt` (or `--profile dev` to reuse a debug build's dependencies).

use candle_core::{Device, Tensor};
use rand::Rng as _;
use std::time::Instant;
use tokenar::model::{build, Condition, Dropouts, Family, GptConfig};
use tokenar::sample::TokenModel;

fn anchor() -> GptConfig {
    GptConfig {
        family: Family::LlamaGen,
        n_layer: 4,
        n_head: 4,
        dim: 256,
        grid: (16, 16),
        ..GptConfig::preset("B").expect("preset")
    }
}

fn codes(rng: &mut tokenar::util::Rng, shape: &[usize], vocab: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("codes")
}

fn bench(name: &str, cfg: &GptConfig, n_refs: usize, decode_steps: usize) -> tokenar::Result<()> {
    let dev = Device::Cpu;
    let (model, _varmap) = build(cfg, &dev, 0)?;
    let mut rng = tokenar::util::rng(2);
    let hw = cfg.image_tokens();
    let refs = codes(&mut rng, &[1, n_refs, hw], cfg.vocab_size);
    let bg = codes(&mut rng, &[1, hw], cfg.vocab_size);
    let text = Tensor::randn(0f32, 1.0, (1, cfg.caption_len, cfg.caption_dim), &dev)?;
    let cond = Condition::new(refs, bg, text, None);
    let layout = model.layout_for(&cond)?;
    let steps = decode_steps.min(layout.generated_len() - 1);

    // Warm-up.
    let _ = model.start(&cond, true)?;
    let reps = 3;
    let t0 = Instant::now();
    for _ in 0..reps {
        let _ = model.start(&cond, true)?;
    }
    let prefill_s = t0.elapsed().as_secs_f64() / reps as f64;

    let (mut session, _) = model.start(&cond, true)?;
    let tok = Tensor::from_vec(vec![7u32, 7u32], (2, 1), &dev)?;
    let _ = session.feed(&tok)?;
    let t0 = Instant::now();
    for _ in 0..steps {
        let _ = session.feed(&tok)?;
    }
    let decode_s = t0.elapsed().as_secs_f64() / steps as f64;

    // Training step, batch 2, dropout on.
    let target = codes(&mut rng, &[2, hw], cfg.vocab_size);
    let cond2 = Condition::new(
        Tensor::cat(&[&cond.refs, &cond.refs], 0)?,
        Tensor::cat(&[&cond.background, &cond.background], 0)?,
        Tensor::cat(&[&cond.text, &cond.text], 0)?,
        None,
    );
    let mut train_s = 0.0;
    for i in 0..2 {
        let t0 = Instant::now();
        let (logits, targets) = model.forward_train(&cond2, &target, true, &mut rng)?;
        let (b, n, v) = logits.dims3()?;
        let loss = candle_nn::loss::cross_entropy(&logits.reshape((b * n, v))?, &targets.flatten_all()?)?;
        let _ = loss.backward()?;
        if i == 1 {
            train_s = t0.elapsed().as_secs_f64();
        }
    }
    println!(
        "{name}: {:.1}M params, prefix {} tokens, generated {}: prefill {:.0} tok/s ({:.1} ms), decode {:.1} tok/s ({:.2} ms/step over {steps} steps), train step (batch 2, {} positions) {:.0} ms",
        cfg.num_params() as f64 / 1e6,
        layout.prefix_len(),
        layout.generated_len(),
        layout.prefix_len() as f64 / prefill_s,
        prefill_s * 1e3,
        1.0 / decode_s,
        decode_s * 1e3,
        layout.input_len(),
        train_s * 1e3,
    );
    Ok(())
}

/// f32 matmul throughput right now (the machine may be shared: compare the rows above with
/// the anchors only after scaling by this figure against ~90-100 GFLOP/s for an idle machine).
fn calibrate() -> tokenar::Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (1024, 1024), &Device::Cpu)?;
    let _ = a.matmul(&a)?;
    let t0 = Instant::now();
    for _ in 0..3 {
        let _ = a.matmul(&a)?;
    }
    Ok(3.0 * 2.0 * 1024f64.powi(3) / t0.elapsed().as_secs_f64() / 1e9)
}

fn main() -> tokenar::Result<()> {
    println!("calibration: f32 matmul 1024^3 at {:.1} GFLOP/s", calibrate()?);
    let small = GptConfig { dropouts: Dropouts::default(), ..GptConfig::preset("small")? };
    bench("anchor 256-dim 4-layer t2i (PyTorch: 5602 prefill tok/s, 585 decode tok/s)", &anchor(), 0, 255)?;
    bench("small preset (2 refs, ITD)", &small, 2, 256)?;
    println!("calibration: f32 matmul 1024^3 at {:.1} GFLOP/s", calibrate()?);
    Ok(())
}
