//! Reduced-precision inference weights against f32: logits KL and top-1 agreement on a small
//! model, and the reduced paths loading, converting and generating.

use crate::layout::Scheme;
use crate::model::{build, load, Condition, Dropouts, Family, GptConfig, TokenAr};
use crate::nn::WeightDtype;
use crate::sample::{DecodePlan, ItdMode, SampleOptions, TokenModel};
use candle_core::{DType, Device, Tensor};
use rand::Rng as _;

/// A small config whose linear layers have input widths in multiples of Q8_0's 32.
fn small(scheme: Scheme) -> GptConfig {
    GptConfig {
        family: Family::Native,
        vocab_size: 256,
        n_layer: 2,
        n_head: 2,
        dim: 64,
        ffn_multiple_of: 32,
        rope_base: 10000.0,
        norm_eps: 1e-5,
        caption_dim: 32,
        caption_len: 5,
        max_refs: 2,
        background: true,
        n_instruct: 2,
        index_embedding: true,
        itd: true,
        cell_embedding: true,
        scheme,
        grid: (4, 4),
        ref_grid: None,
        img_uncond: true,
        align_dim: None,
        dropouts: Dropouts::default(),
    }
}

/// The model with weights of a trained model's scale: every matrix N(0, 1/in), the head
/// N(0, 16/in) so that the next-token distributions are peaked, not near-uniform (random
/// LlamaGen init, std 0.02 and a zero head, would make every comparison trivially pass).
fn spread_model(cfg: &GptConfig, seed: u64) -> candle_nn::VarMap {
    let (_, vm) = build(cfg, &Device::Cpu, seed).expect("build");
    let mut rng = crate::util::rng(seed ^ 0x5eed);
    let data = vm.data().lock().expect("varmap");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let v = &data[name];
        if v.rank() == 2 && name.ends_with(".weight") && !name.contains("embeddings") {
            let fan_in = v.dim(1).expect("dims") as f32;
            let std = if name == "output.weight" { 4.0 } else { 1.0 } / fan_in.sqrt();
            let vals: Vec<f32> = (0..v.elem_count()).map(|_| std * crate::weights::builders::normal(&mut rng)).collect();
            v.set(&Tensor::from_vec(vals, v.dims(), &Device::Cpu).expect("tensor")).expect("set");
        }
    }
    drop(data);
    vm
}

fn inference_model(cfg: &GptConfig, vm: &candle_nn::VarMap, dtype: WeightDtype) -> TokenAr {
    let mut m = TokenAr::new(cfg, crate::weights::builders::zeros_builder(vm, DType::F32, &Device::Cpu)).expect("model");
    m.convert_weights(dtype).expect("convert");
    m
}

fn condition(cfg: &GptConfig, n_refs: usize, seed: u64) -> Condition {
    let mut rng = crate::util::rng(seed);
    let hw = cfg.image_tokens();
    let v = cfg.vocab_size as u32;
    let codes = |n: usize, rng: &mut crate::util::Rng| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..v)).collect() };
    let rt = cfg.ref_tokens();
    let refs = Tensor::from_vec(codes(n_refs * rt, &mut rng), (1, n_refs, rt), &Device::Cpu).expect("refs");
    let bg = Tensor::from_vec(codes(hw, &mut rng), (1, hw), &Device::Cpu).expect("bg");
    let text: Vec<f32> = (0..cfg.caption_len * cfg.caption_dim).map(|_| crate::weights::builders::normal(&mut rng)).collect();
    let text = Tensor::from_vec(text, (1, cfg.caption_len, cfg.caption_dim), &Device::Cpu).expect("text");
    Condition::new(refs, bg, text, None)
}

/// Logits (positions, vocab) of the prefill's last position and of every generated position
/// fed `tokens` one at a time (the decoding path), guided rows included.
fn decoded_logits(m: &TokenAr, cond: &Condition, tokens: &[u32]) -> Vec<Vec<f32>> {
    let (mut s, first) = m.start(cond, true).expect("start");
    let mut out: Vec<Vec<f32>> = first.to_vec2::<f32>().expect("logits");
    for &t in tokens {
        let x = Tensor::from_vec(vec![t; s.rows()], (s.rows(), 1), &Device::Cpu).expect("tokens");
        let l = s.feed(&x).expect("feed").squeeze(1).expect("squeeze");
        out.extend(l.to_vec2::<f32>().expect("logits"));
    }
    out
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// Mean and max KL(f32 || reduced) over the rows, and the fraction of rows whose most likely
/// token agrees.
fn compare(want: &[Vec<f32>], got: &[Vec<f32>]) -> (f64, f64, f64) {
    let argmax = |r: &[f32]| r.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
    let (mut sum, mut max, mut agree) = (0f64, 0f64, 0usize);
    for (a, b) in want.iter().zip(got) {
        let (la, lb) = (log_softmax(a), log_softmax(b));
        let kl: f64 = la.iter().zip(&lb).map(|(p, q)| p.exp() * (p - q)).sum();
        sum += kl;
        max = max.max(kl);
        agree += usize::from(argmax(a) == argmax(b));
    }
    (sum / want.len() as f64, max, agree as f64 / want.len() as f64)
}

/// bf16, f16 and Q8_0 weights against f32 over a prefill and 40 decoding steps of a TokenAR
/// model with two references (both CFG rows): 82 next-token distributions each. Thresholds:
/// mean KL below 2e-3 (bf16, Q8_0) and 1e-4 (f16, three more mantissa bits), top-1 agreement
/// at least 95% (bf16, Q8_0) and 98% (f16).
#[test]
fn reduced_weights_keep_the_f32_distributions() {
    let cfg = small(Scheme::Tiles);
    let vm = spread_model(&cfg, 3);
    let cond = condition(&cfg, 2, 4);
    let mut rng = crate::util::rng(5);
    let tokens: Vec<u32> = (0..40).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect();
    let want = decoded_logits(&inference_model(&cfg, &vm, WeightDtype::F32), &cond, &tokens);
    assert_eq!(want.len(), 82);
    // The distributions are peaked enough for the comparison to mean something.
    let top: f64 = want.iter().map(|r| log_softmax(r).into_iter().fold(f64::NEG_INFINITY, f64::max).exp()).sum::<f64>() / want.len() as f64;
    assert!(top > 0.3, "mean top-1 probability {top}: near-uniform distributions");
    for (dtype, max_mean_kl, min_agree) in [(WeightDtype::Bf16, 2e-3, 0.95), (WeightDtype::F16, 1e-4, 0.98), (WeightDtype::Q8_0, 2e-3, 0.95)] {
        let m = inference_model(&cfg, &vm, dtype);
        assert_eq!(m.weight_dtype(), dtype);
        let got = decoded_logits(&m, &cond, &tokens);
        let (mean, max, agree) = compare(&want, &got);
        eprintln!("{dtype}: mean KL {mean:.2e}, max KL {max:.2e}, top-1 agreement {:.1}% (mean top-1 probability {top:.2})", agree * 100.0);
        assert!(mean < max_mean_kl, "{dtype}: mean KL {mean:.2e} >= {max_mean_kl:.0e}");
        assert!(agree >= min_agree, "{dtype}: top-1 agreement {agree:.3} < {min_agree}");
    }
    // Q4_K: every linear weight of this config is 64 wide, so it falls back to Q8_0 (the same
    // logits); its own quality is measured on widths of 256 below.
    let q4 = inference_model(&cfg, &vm, WeightDtype::Q4K);
    assert_eq!(decoded_logits(&q4, &cond, &tokens), decoded_logits(&inference_model(&cfg, &vm, WeightDtype::Q8_0), &cond, &tokens));
    // The weights really changed: Q8_0 is not f32 in disguise.
    let q = inference_model(&cfg, &vm, WeightDtype::Q8_0);
    assert!(q.step_weight_bytes() * 3 < inference_model(&cfg, &vm, WeightDtype::F32).step_weight_bytes());
    assert!(compare(&want, &decoded_logits(&q, &cond, &tokens)).0 > 0.0);
}

/// Reduced weights keep the fused attention's KV cache in f16 (half the bytes of the f32
/// model's): decoding through it (prefill, 40 single steps, then a chunk of 4 positions)
/// against the composed attention over an f32 cache with the same weights. Dense bf16 / f16
/// weights: logits within 0.05 (largest logit about 12), mean KL below 1e-5, top-1 at least
/// 98% (when written: 2.6e-3, 1.3e-7, 100%). Where the CPU multiplies many rows of bf16
/// weights in bf16 (AVX-512 BF16: the prefill's and the chunk's activations rounded to bf16,
/// relative 2^-9, as PyTorch's bf16 does), that rounding amplifies the cache's: bf16 within
/// 0.1 and mean KL below 5e-5 (measured 5.6e-2, 1.0e-5, top-1 100%). Q8_0 re-quantizes every product's activations
/// to 8 bits, which turns the f16 rounding of the keys into whole quantization steps: bounds
/// as for Q8_0 against f32 (mean KL below 2e-3, top-1 at least 95%; when written 8e-4 and
/// 97.8%; the same weights with an f32 cache agree within 0.05).
#[test]
fn f16_kv_cache_decodes_like_the_f32_cache() {
    let cfg = small(Scheme::Tiles);
    let vm = spread_model(&cfg, 7);
    let cond = condition(&cfg, 2, 8);
    let mut rng = crate::util::rng(9);
    let tokens: Vec<u32> = (0..44).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect();
    let f32_bytes = inference_model(&cfg, &vm, WeightDtype::F32).start(&cond, true).expect("start").0.cache_bytes();
    let (bf16_diff, bf16_kl) = if crate::nn::bf16_products_available() { (0.1, 5e-5) } else { (0.05, 1e-5) };
    for (dtype, max_diff, max_mean_kl, min_agree) in [(WeightDtype::Bf16, bf16_diff, bf16_kl, 0.98), (WeightDtype::F16, 0.05, 1e-5, 0.98), (WeightDtype::Q8_0, f32::INFINITY, 2e-3, 0.95)] {
        let m = inference_model(&cfg, &vm, dtype);
        let run = |fused: bool| {
            let (mut s, first) = m.start_with(&cond, true, fused).expect("start");
            let mut out: Vec<Vec<f32>> = first.to_vec2::<f32>().expect("logits");
            let rows = s.rows();
            for &t in &tokens[..40] {
                let x = Tensor::from_vec(vec![t; rows], (rows, 1), &Device::Cpu).expect("tokens");
                out.extend(s.feed(&x).expect("feed").squeeze(1).expect("squeeze").to_vec2::<f32>().expect("logits"));
            }
            let chunk: Vec<u32> = (0..rows).flat_map(|_| tokens[40..].iter().copied()).collect();
            let l = s.feed(&Tensor::from_vec(chunk, (rows, 4), &Device::Cpu).expect("tokens")).expect("feed");
            out.extend(l.flatten_to(1).expect("flatten").to_vec2::<f32>().expect("logits"));
            (out, s.cache_bytes())
        };
        let (fused, fused_bytes) = run(true);
        let (composed, composed_bytes) = run(false);
        assert_eq!(fused_bytes * 2, f32_bytes, "{dtype}: the fused cache is not f16");
        assert_eq!(composed_bytes, f32_bytes);
        let diff = fused.iter().flatten().zip(composed.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = composed.iter().flatten().map(|x| x.abs()).fold(0f32, f32::max);
        let (mean, max, agree) = compare(&composed, &fused);
        eprintln!("{dtype}, f16 cache: max logit difference {diff:.2e} (largest logit {scale:.1}), mean KL {mean:.2e}, max KL {max:.2e}, top-1 {:.1}%", agree * 100.0);
        assert!(diff < max_diff, "{dtype}: logits differ by {diff}");
        assert!(diff > 0.0, "{dtype}: the f16 cache changed nothing");
        assert!(mean < max_mean_kl && agree >= min_agree, "{dtype}: mean KL {mean:.2e}, top-1 {agree:.3}");
    }
}

/// Q4_K (and Q8_0 beside it) on a config whose linear layers are 256 wide or a multiple of
/// it, as GPT-XL's (1280, 3584): every weight really in 4-bit blocks. Over 82 distributions
/// Q4_K is much the coarser: mean KL 0.15 nats and 89% top-1 agreement when this was written,
/// against Q8_0's 1.4e-3 and 99%. Bounds: Q4_K mean KL below 0.3 and top-1 at least 85%
/// (a broken Q4_K product gives KL of several nats), Q8_0 as above.
#[test]
fn q4_k_keeps_most_of_the_f32_distributions() {
    let cfg = GptConfig { dim: 256, n_head: 4, ffn_multiple_of: 256, caption_dim: 256, ..small(Scheme::Tiles) };
    assert_eq!(cfg.ffn_hidden() % 256, 0);
    let vm = spread_model(&cfg, 31);
    let cond = condition(&cfg, 2, 32);
    let mut rng = crate::util::rng(33);
    let tokens: Vec<u32> = (0..40).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect();
    let want = decoded_logits(&inference_model(&cfg, &vm, WeightDtype::F32), &cond, &tokens);
    let top: f64 = want.iter().map(|r| log_softmax(r).into_iter().fold(f64::NEG_INFINITY, f64::max).exp()).sum::<f64>() / want.len() as f64;
    assert!(top > 0.3, "mean top-1 probability {top}: near-uniform distributions");
    let mut kl = Vec::new();
    for (dtype, max_mean_kl, min_agree) in [(WeightDtype::Q8_0, 2e-3, 0.95), (WeightDtype::Q4K, 0.3, 0.85)] {
        let m = inference_model(&cfg, &vm, dtype);
        assert_eq!(m.weight_dtype(), dtype);
        let (mean, max, agree) = compare(&want, &decoded_logits(&m, &cond, &tokens));
        eprintln!("width 256, {dtype}: mean KL {mean:.2e}, max KL {max:.2e}, top-1 agreement {:.1}% (mean top-1 probability {top:.2})", agree * 100.0);
        assert!(mean < max_mean_kl, "{dtype}: mean KL {mean:.2e} >= {max_mean_kl:.0e}");
        assert!(agree >= min_agree, "{dtype}: top-1 agreement {agree:.3} < {min_agree}");
        kl.push(mean);
    }
    assert!(kl[1] > kl[0], "Q4_K ({:.2e}) is not coarser than Q8_0 ({:.2e})", kl[1], kl[0]);
    let q4 = inference_model(&cfg, &vm, WeightDtype::Q4K);
    assert!(q4.step_weight_bytes() * 6 < inference_model(&cfg, &vm, WeightDtype::F32).step_weight_bytes());
}

/// The public-format fixture (a TokenAR checkpoint written by the reference code, read by the
/// `.pt` reader) loaded in every dtype through the converting loader: logits KL and top-1
/// agreement against its f32 load over a prefill and 24 decoding steps. Its weights are the
/// reference's small random ones (near-uniform distributions), so the bounds are loose; the
/// numbers are printed. Its FFN is 176 wide: the 8- and 4-bit block formats refuse it.
#[test]
fn public_format_fixture_in_every_dtype() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/gpt_tokenar.pt");
    let (f32_model, _, _) = load::load(&path, None, &Device::Cpu).expect("load");
    let cfg = f32_model.config().clone();
    let cond = condition(&cfg, cfg.max_refs, 41);
    let mut rng = crate::util::rng(42);
    let tokens: Vec<u32> = (0..24).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect();
    let want = decoded_logits(&f32_model, &cond, &tokens);
    for dtype in WeightDtype::ALL {
        let loaded = crate::weights::convert::load_converted(&path, None, None, dtype, &Device::Cpu);
        if cfg.ffn_hidden() % 32 != 0 && matches!(dtype, WeightDtype::Q8_0 | WeightDtype::Q4K) {
            // The fixture's FFN width (176) is no multiple of Q8_0's block: a clear refusal.
            let e = loaded.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("not a multiple of 32"), "{dtype}: {e}");
            eprintln!("fixture (dim {}), {dtype}: refused ({e})", cfg.dim);
            continue;
        }
        let (m, _, _) = loaded.expect("converted load");
        let (mean, max, agree) = compare(&want, &decoded_logits(&m, &cond, &tokens));
        eprintln!("fixture (dim {}), {dtype}: mean KL {mean:.2e}, max KL {max:.2e}, top-1 agreement {:.1}%", cfg.dim, agree * 100.0);
        assert!(mean < 1e-2 && agree >= 0.8, "{dtype}: mean KL {mean:.2e}, top-1 {agree:.3}");
        if dtype == WeightDtype::F32 {
            assert_eq!(mean, 0.0);
        }
    }
}

/// Sample one image (guided, top-k, every generated position) from `m`.
fn sample_image(m: &TokenAr, cond: &Condition, itd: ItdMode, draft: Vec<u32>) -> crate::sample::Generated {
    let opts = SampleOptions { cfg_scale: 2.0, top_k: 20, seed: 7, ..SampleOptions::default() };
    let (mut s, first) = m.start(cond, true).expect("start");
    let plan = DecodePlan { known: vec![draft], n_target: m.config().image_tokens(), itd };
    crate::sample::generate(&mut s, &first, &plan, &opts, &mut opts.rng(), None).expect("generate")
}

/// A Reference-scheme model saved, loaded, converted to each dtype and sampled (ITD exact and
/// off): valid tokens, and the same tokens as the f32 model wherever sampling agrees on most.
/// A checkpoint with bf16 linear weights (what `tokenar convert` writes) loads and gives
/// exactly the logits of the model converted to bf16 in memory.
#[test]
fn reduced_weights_load_and_generate_reference_scheme() {
    let cfg = GptConfig { max_refs: 3, ..small(Scheme::Reference { pad_to: None, quirk_index: false }) };
    let vm = spread_model(&cfg, 11);
    let dir = std::env::temp_dir().join(format!("tokenar-dtype-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("model.safetensors");
    load::save(&path, &inference_model(&cfg, &vm, WeightDtype::F32), &vm).expect("save");
    // Three references and the background: ITD on the reference tables needs 4, 9, ... images.
    let cond = condition(&cfg, 3, 12);
    let draft: Vec<u32> = cond.refs.flatten_all().expect("refs").to_vec1::<u32>().expect("refs");
    let hw = cfg.image_tokens();
    let reference = {
        let (m, _, _) = load::load(&path, None, &Device::Cpu).expect("load");
        sample_image(&m, &cond, ItdMode::Off, Vec::new())
    };
    for dtype in WeightDtype::ALL {
        let (mut m, vars, _) = load::load(&path, None, &Device::Cpu).expect("load");
        m.convert_weights(dtype).expect("convert");
        drop(vars);
        for itd in [ItdMode::Off, ItdMode::Exact] {
            let g = sample_image(&m, &cond, itd, if itd == ItdMode::Off { Vec::new() } else { draft.clone() });
            assert_eq!(g.target.len(), 1);
            assert_eq!(g.target[0].len(), hw, "{dtype} {itd:?}");
            assert!(g.target[0].iter().all(|&t| (t as usize) < cfg.vocab_size), "{dtype} {itd:?}");
        }
        let g = sample_image(&m, &cond, ItdMode::Off, Vec::new());
        let same = g.target[0].iter().zip(&reference.target[0]).filter(|(a, b)| a == b).count();
        eprintln!("{dtype}: {same} of {hw} sampled tokens as f32");
        if dtype == WeightDtype::F32 {
            assert_eq!(g, reference);
        }
        // Training needs the f32 variables.
        if dtype != WeightDtype::F32 {
            let mut rng = crate::util::rng(0);
            let target = Tensor::zeros((1, hw), DType::U32, &Device::Cpu).expect("target");
            let e = m.forward_train(&cond, &target, false, &mut rng).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("inference only"), "{dtype}: {e}");
        }
    }
    // A bf16 checkpoint (linear weights in bf16, the rest f32) loads into the same model.
    let mut tensors = crate::weights::varmap_tensors(&vm);
    for (name, t) in tensors.iter_mut() {
        if TokenAr::is_linear_weight(name) {
            *t = t.to_dtype(DType::BF16).expect("bf16");
        }
    }
    let converted = tensors.keys().filter(|n| TokenAr::is_linear_weight(n)).count();
    assert_eq!(converted, 5 * cfg.n_layer + 1);
    let mut meta = std::collections::BTreeMap::new();
    meta.insert(load::CONFIG_KEY.to_string(), serde_json::to_string(&cfg).expect("json"));
    let half_path = dir.join("model-bf16.safetensors");
    crate::weights::save_safetensors(&half_path, &tensors, &meta).expect("save bf16");
    assert!(std::fs::metadata(&half_path).expect("size").len() < std::fs::metadata(&path).expect("size").len() * 2 / 3);
    let (mut loaded, _, _) = load::load(&half_path, None, &Device::Cpu).expect("load bf16");
    loaded.convert_weights(WeightDtype::Bf16).expect("convert");
    let tokens = [1u32, 2, 3];
    let a = decoded_logits(&loaded, &cond, &tokens);
    let b = decoded_logits(&inference_model(&cfg, &vm, WeightDtype::Bf16), &cond, &tokens);
    assert_eq!(a, b);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The built-in model in every dtype: a guided image of valid tokens.
#[test]
fn builtin_model_generates_in_every_dtype() {
    let Ok(bundle) = crate::pipeline::Bundle::builtin(&Device::Cpu) else {
        eprintln!("no built-in model in this build");
        return;
    };
    let cfg = bundle.gpt.config().clone();
    let cond = condition(&cfg, 2, 21);
    for dtype in WeightDtype::ALL {
        let mut m = inference_model(&cfg, &bundle.gpt_vars, WeightDtype::F32);
        m.convert_weights(dtype).expect("convert");
        // Q4_K needs widths of 256 (the built-in model's are not: Q8_0 stands in).
        if dtype != WeightDtype::Q4K || cfg.dim % 256 == 0 {
            assert_eq!(m.weight_dtype(), dtype);
        }
        let g = sample_image(&m, &cond, ItdMode::Off, Vec::new());
        assert_eq!(g.target[0].len(), cfg.image_tokens());
        assert!(g.target[0].iter().all(|&t| (t as usize) < cfg.vocab_size), "{dtype}");
    }
}
