//! Tests of the training machinery on a tiny MLP regressing a fixed random linear map, with a
//! batch drawn from the loop's RNG each micro-step.

use super::*;
use crate::util::Rng;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng as _;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const IN: usize = 4;
const HID: usize = 8;
const BATCH: usize = 16;

fn rand_tensor(rng: &mut Rng, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

struct Mlp {
    vm: VarMap,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    target: Tensor,
}

impl Mlp {
    /// Deterministic weights from `seed` (candle's own initialisers are not seeded).
    fn new(seed: u64) -> Self {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let z = candle_nn::Init::Const(0.0);
        let w1 = vb.get_with_hints((IN, HID), "fc1.weight", z).unwrap();
        let b1 = vb.get_with_hints(HID, "fc1.bias", z).unwrap();
        let w2 = vb.get_with_hints((HID, 1), "fc2.weight", z).unwrap();
        let b2 = vb.get_with_hints(1, "fc2.bias", z).unwrap();
        let mut rng = crate::util::rng(seed);
        for (_, var) in crate::nn::named_vars(&vm) {
            var.set(&rand_tensor(&mut rng, var.dims(), 0.5)).unwrap();
        }
        let target = rand_tensor(&mut crate::util::rng(1000), &[IN, 1], 1.0);
        Self { vm, w1, b1, w2, b2, target }
    }

    /// One micro-step: draw a batch from `rng`, return the MSE loss.
    fn step(&self, rng: &mut Rng) -> crate::Result<StepOutput> {
        self.step_n(rng, BATCH)
    }

    fn step_n(&self, rng: &mut Rng, batch: usize) -> crate::Result<StepOutput> {
        let x = rand_tensor(rng, &[batch, IN], 1.0);
        let y = x.matmul(&self.target)?;
        let h = x.matmul(&self.w1)?.broadcast_add(&self.b1)?.tanh()?;
        let pred = h.matmul(&self.w2)?.broadcast_add(&self.b2)?;
        let loss = (pred - y)?.sqr()?.mean_all()?;
        Ok(StepOutput::new(loss, batch))
    }

    fn state(&self, lr: f64) -> TrainState {
        let params = AdamWParams { lr, ..AdamWParams::default() };
        TrainState::new(vec![("mlp".to_string(), self.vm.clone())], params, 42).unwrap()
    }

    fn values(&self) -> Vec<Vec<f32>> {
        crate::nn::named_vars(&self.vm)
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tokenar-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn loop_cfg(steps: u64, lr: f64, dir: Option<&Path>, ckpt_every: u64) -> LoopConfig {
    let mut cfg = LoopConfig::new(steps, LrSchedule::constant(lr));
    cfg.run_dir = dir.map(|d| d.to_path_buf());
    cfg.ckpt_every = ckpt_every;
    cfg.keep_last = 0;
    cfg
}

#[test]
fn loss_decreases() {
    let m = Mlp::new(1);
    let mut st = m.state(1e-2);
    let cfg = loop_cfg(150, 1e-2, None, 0);
    let out = run_loop(&cfg, &mut st, |_, rng| m.step(rng), &mut NoHooks).unwrap();
    let mean = |s: &[(u64, f32)]| s.iter().map(|x| x.1).sum::<f32>() / s.len() as f32;
    let (first, last) = (mean(&out.losses[..10]), mean(&out.losses[140..]));
    assert_eq!(st.step, 150);
    assert!(last < 0.2 * first, "first {first} last {last}");
}

#[test]
fn resume_continues_bit_identically() {
    let dir_a = temp_dir("resume-a");
    let dir_b = temp_dir("resume-b");
    let mut cfg = loop_cfg(12, 3e-2, Some(&dir_a), 4);
    cfg.accum = 2;
    cfg.max_grad_norm = Some(0.5);
    cfg.schedule = LrSchedule { base_lr: 3e-2, warmup_steps: 3, decay: Decay::Cosine { total_steps: 12, min_lr: 1e-3 } };
    let a = Mlp::new(1);
    let mut sa = a.state(3e-2);
    let full = run_loop(&cfg, &mut sa, |_, rng| a.step(rng), &mut NoHooks).unwrap();

    // A second process: different initial weights and RNG, resumed from step 4.
    std::fs::copy(dir_a.join("ckpt-4.safetensors"), dir_b.join("ckpt-4.safetensors")).unwrap();
    let b = Mlp::new(99);
    let mut sb = b.state(3e-2);
    sb.rng = crate::util::rng(7);
    let ck = Checkpointer::new(&dir_b, 0).unwrap();
    let restored = sb.resume_latest(&ck).unwrap().unwrap();
    assert_eq!((restored.step, sb.step, sb.optim.step_count()), (4, 4, 4));
    let mut cfg_b = cfg.clone();
    cfg_b.run_dir = Some(dir_b.clone());
    let rest = run_loop(&cfg_b, &mut sb, |_, rng| b.step(rng), &mut NoHooks).unwrap();
    assert_eq!(rest.losses.len(), 8);
    assert_eq!(rest.losses, full.losses[4..].to_vec());
    assert_eq!(a.values(), b.values());
    std::fs::remove_dir_all(&dir_a).unwrap();
    std::fs::remove_dir_all(&dir_b).unwrap();
}

#[test]
fn weight_decay_skips_1d_params_and_matches_adamw() {
    let m = Mlp::new(3);
    let mut st = m.state(0.1);
    assert_eq!(st.optim.decayed(), vec!["mlp/fc1.weight", "mlp/fc2.weight"]);
    let before = m.values();
    // Zero gradients: only weight decay moves the parameters.
    let mut grads = candle_core::backprop::GradStore::default();
    for (_, v) in st.optim.vars() {
        grads.insert(v.as_tensor(), v.as_tensor().zeros_like().unwrap());
    }
    st.optim.step(&grads).unwrap();
    let after = m.values();
    let names: Vec<String> = crate::nn::named_vars(&m.vm).into_iter().map(|(n, _)| n).collect();
    for ((n, b), a) in names.iter().zip(&before).zip(&after) {
        let factor = if n.ends_with("weight") { 1.0 - 0.1 * 0.05 } else { 1.0 };
        for (x, y) in b.iter().zip(a) {
            assert!((x * factor - y).abs() < 1e-7, "{n}: {x} -> {y}");
        }
    }
    // One step from a fresh optimiser equals the closed form: p(1 - lr wd) - lr g/(|g| + eps).
    let m = Mlp::new(3);
    let mut st = m.state(0.1);
    let out = m.step(&mut crate::util::rng(5)).unwrap();
    let grads = out.loss.backward().unwrap();
    let vars = st.optim.vars();
    let (_, w) = vars.iter().find(|(n, _)| n == "mlp/fc1.weight").unwrap();
    let w0 = w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let g = grads.get(w.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    st.optim.step(&grads).unwrap();
    let w1 = w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for i in 0..w0.len() {
        let expect = w0[i] as f64 * (1.0 - 0.1 * 0.05) - 0.1 * g[i] as f64 / (g[i].abs() as f64 + 1e-8);
        assert!((w1[i] as f64 - expect).abs() < 1e-6, "{i}: {} vs {expect}", w1[i]);
    }
}

#[test]
fn clipping_caps_the_global_norm() {
    let v1 = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    let v2 = Var::new(&[0f32, 0.0], &Device::Cpu).unwrap();
    let vars = vec![("a".to_string(), v1.clone()), ("b".to_string(), v2.clone())];
    let mut grads = candle_core::backprop::GradStore::default();
    grads.insert(v1.as_tensor(), Tensor::new(&[[3f32, 0.0], [0.0, 0.0]], &Device::Cpu).unwrap());
    grads.insert(v2.as_tensor(), Tensor::new(&[4f32, 0.0], &Device::Cpu).unwrap());
    let n = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
    assert!((n - 5.0).abs() < 1e-9);
    let after = grad_norm(&grads, &vars).unwrap();
    assert!((after - 1.0).abs() < 1e-5, "{after}");
    let g2 = grads.get(v2.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert!((g2[0] - 0.8).abs() < 1e-5);
    // Below the limit nothing changes.
    let n = clip_grad_norm(&mut grads, &vars, 10.0).unwrap();
    assert!((n - after).abs() < 1e-9);
    assert_eq!(grads.get(v2.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), g2);
}

#[test]
fn clipping_inside_the_update_equals_clipping_the_gradients() {
    let run = |fused: bool| {
        let v = Var::new(&[[1f32, -2.0, 0.5], [3.0, 4.0, -1.0]], &Device::Cpu).unwrap();
        let b = Var::new(&[0.1f32, -0.2], &Device::Cpu).unwrap();
        let vars = vec![("w".to_string(), v.clone()), ("b".to_string(), b.clone())];
        let mut opt = AdamW::new(vars.clone(), AdamWParams { lr: 0.1, ..Default::default() }).unwrap();
        for step in 0..3 {
            let mut grads = candle_core::backprop::GradStore::default();
            let k = step as f32 + 1.0;
            grads.insert(v.as_tensor(), Tensor::new(&[[3f32 * k, 0.0, -1.0], [0.5, 2.0 * k, 0.0]], &Device::Cpu).unwrap());
            grads.insert(b.as_tensor(), Tensor::new(&[4f32, -k], &Device::Cpu).unwrap());
            if fused {
                let norm = grad_norm(&grads, &vars).unwrap();
                opt.step_scaled(&grads, clip_coef(norm, 1.0)).unwrap();
            } else {
                clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
                opt.step(&grads).unwrap();
            }
        }
        let mut out = v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        out.extend(b.as_tensor().to_vec1::<f32>().unwrap());
        out
    };
    let (a, b) = (run(true), run(false));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
    }
    assert_eq!(clip_coef(0.5, 1.0), 1.0);
    assert_eq!(clip_coef(f64::NAN, 1.0), 1.0);
    assert!((clip_coef(4.0, 1.0) - 0.25).abs() < 1e-6);
}

#[test]
fn nan_loss_stops_and_keeps_last_good_checkpoint() {
    let dir = temp_dir("nan");
    let m = Mlp::new(2);
    let mut st = m.state(1e-2);
    let cfg = loop_cfg(20, 1e-2, Some(&dir), 5);
    let err = run_loop(
        &cfg,
        &mut st,
        |step, rng| {
            let out = m.step(rng)?;
            if step == 7 {
                return Ok(StepOutput::new((out.loss * f64::NAN)?, out.tokens));
            }
            Ok(out)
        },
        &mut NoHooks,
    )
    .unwrap_err();
    assert!(matches!(err, crate::Error::Numerical(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("step 7") && msg.contains("ckpt-5.safetensors"), "{msg}");
    assert_eq!(st.step, 6);
    let ck = Checkpointer::new(&dir, 0).unwrap();
    let (step, path) = ck.latest().unwrap().unwrap();
    assert_eq!(step, 5);
    let fresh = Mlp::new(2);
    let mut st2 = fresh.state(1e-2);
    assert_eq!(st2.restore(&path).unwrap().step, 5);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn keep_last_m_and_latest_skips_truncated_files() {
    let dir = temp_dir("keep");
    let m = Mlp::new(2);
    let mut st = m.state(1e-2);
    let mut cfg = loop_cfg(5, 1e-2, Some(&dir), 1);
    cfg.keep_last = 2;
    cfg.metadata.insert("config".into(), "{\"dim\": 3}".into());
    struct Count(Vec<u64>);
    impl Hooks for Count {
        fn on_checkpoint(&mut self, step: u64, path: &Path, state: &TrainState) -> crate::Result<()> {
            assert!(path.is_file());
            assert_eq!(state.step, step);
            self.0.push(step);
            Ok(())
        }
    }
    let mut hooks = Count(vec![]);
    run_loop(&cfg, &mut st, |_, rng| m.step(rng), &mut hooks).unwrap();
    assert_eq!(hooks.0, vec![1, 2, 3, 4, 5]);
    let ck = Checkpointer::new(&dir, 2).unwrap();
    let steps: Vec<u64> = ck.list().unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![4, 5]);
    // A truncated newest file is not "complete": latest falls back to the previous one.
    let bytes = std::fs::read(dir.join("ckpt-5.safetensors")).unwrap();
    std::fs::write(dir.join("ckpt-6.safetensors"), &bytes[..bytes.len() - 10]).unwrap();
    assert_eq!(ck.latest().unwrap().unwrap().0, 5);
    let r = st.restore(dir.join("ckpt-5.safetensors")).unwrap();
    assert_eq!(r.metadata.get("config").map(String::as_str), Some("{\"dim\": 3}"));
    // Saving step 5 again with keep_last 1 removes the later (broken) file and the older one.
    Checkpointer::new(&dir, 1).and_then(|c| st.save(&c, &BTreeMap::new())).unwrap();
    let steps: Vec<u64> = ck.list().unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![5]);
    // Reserved metadata prefixes are refused.
    let bad = BTreeMap::from([("train.step".to_string(), "1".to_string())]);
    assert!(st.save(&ck, &bad).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restore_rejects_a_checkpoint_of_another_model() {
    let dir = temp_dir("mismatch");
    let m = Mlp::new(2);
    let st = m.state(1e-2);
    let ck = Checkpointer::new(&dir, 0).unwrap();
    let path = st.save(&ck, &BTreeMap::new()).unwrap();
    // Same group and name, another shape.
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    vb.get_with_hints((IN, HID + 1), "fc1.weight", candle_nn::Init::Const(0.0)).unwrap();
    let mut other = TrainState::new(vec![("mlp".to_string(), vm)], AdamWParams::default(), 0).unwrap();
    let e = other.restore(&path).unwrap_err().to_string();
    assert!(e.contains("optim.m.mlp/fc1.weight") && e.contains("[4, 9]"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn schedule_warmup_constant_and_cosine() {
    let s = LrSchedule { base_lr: 1.0, warmup_steps: 4, decay: Decay::Constant };
    assert_eq!([1, 2, 4, 5, 100].map(|t| s.lr_at(t)), [0.25, 0.5, 1.0, 1.0, 1.0]);
    let c = LrSchedule { base_lr: 1.0, warmup_steps: 0, decay: Decay::Cosine { total_steps: 10, min_lr: 0.1 } };
    assert!((c.lr_at(5) - 0.55).abs() < 1e-12);
    assert!((c.lr_at(10) - 0.1).abs() < 1e-12 && (c.lr_at(20) - 0.1).abs() < 1e-12);
    assert!(c.lr_at(1) > c.lr_at(2));
}

#[test]
fn metrics_log_and_loss_plot() {
    let dir = temp_dir("metrics");
    let m = Mlp::new(4);
    let mut st = m.state(1e-2);
    let mut cfg = loop_cfg(7, 1e-2, Some(&dir), 0);
    cfg.log_every = 2;
    run_loop(&cfg, &mut st, |_, rng| m.step(rng), &mut NoHooks).unwrap();
    let recs = MetricsLog::read(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(recs.iter().map(|r| r.step).collect::<Vec<_>>(), vec![2, 4, 6, 7]);
    assert!(recs.iter().all(|r| r.loss > 0.0 && r.tokens_per_s > 0.0 && r.grad_norm > 0.0 && r.lr == 1e-2));
    let pts: Vec<(f64, f64)> = recs.iter().map(|r| (r.step as f64, r.loss)).collect();
    for log_y in [false, true] {
        let path = dir.join(format!("loss-{log_y}.png"));
        plot_losses(&pts, &path, &PlotOptions { width: 320, height: 200, log_y }).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (320, 200));
        let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
        assert!(blue > 100, "curve pixels: {blue}");
    }
    assert!(plot_losses(&[(1.0, f64::NAN)], dir.join("x.png"), &PlotOptions::default()).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rng_state_roundtrip() {
    let mut r = crate::util::rng(11);
    let _: u64 = r.random();
    let _: u32 = r.random();
    let s = RngState::capture(&r);
    let mut back = s.restore().unwrap();
    assert_eq!(r.random::<u64>(), back.random::<u64>());
    assert!(RngState { seed: "zz".into(), stream: 0, word_pos: "0".into() }.restore().is_err());
}

#[test]
fn frozen_variables_are_saved_but_not_trained() {
    let dir = temp_dir("frozen");
    let m = Mlp::new(5);
    let params = AdamWParams { lr: 1e-2, ..AdamWParams::default() };
    let frozen = vec!["mlp/fc2.".to_string()];
    let mut st = TrainState::new_with_frozen(vec![("mlp".to_string(), m.vm.clone())], params.clone(), 1, &frozen).unwrap();
    assert_eq!(st.optim.vars().len(), 2);
    let before = m.values();
    let cfg = loop_cfg(3, 1e-2, Some(&dir), 3);
    run_loop(&cfg, &mut st, |_, rng| m.step(rng), &mut NoHooks).unwrap();
    let after = m.values();
    // Sorted names: fc1.bias, fc1.weight, fc2.bias, fc2.weight.
    assert_ne!(before[0], after[0]);
    assert_ne!(before[1], after[1]);
    assert_eq!(before[2..], after[2..]);
    // The frozen variables are in the checkpoint and restored into a fresh model.
    let other = Mlp::new(6);
    let mut st2 = TrainState::new_with_frozen(vec![("mlp".to_string(), other.vm.clone())], params, 1, &frozen).unwrap();
    st2.restore(dir.join("ckpt-3.safetensors")).unwrap();
    assert_eq!(other.values(), after);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn accumulation_equals_one_large_batch() {
    struct Norms(Vec<f64>);
    impl Hooks for Norms {
        fn on_log(&mut self, rec: &MetricsRecord) -> crate::Result<()> {
            self.0.push(rec.grad_norm);
            Ok(())
        }
    }
    let run = |accum: usize| {
        let m = Mlp::new(8);
        let mut st = m.state(1e-2);
        let mut cfg = loop_cfg(3, 1e-2, None, 0);
        cfg.accum = accum;
        cfg.log_every = 1;
        cfg.max_grad_norm = None;
        let mut norms = Norms(vec![]);
        // The same rows either way: 2 x 8 rows drawn in sequence = 16 rows.
        let out = run_loop(&cfg, &mut st, |_, rng| m.step_n(rng, 16 / accum), &mut norms).unwrap();
        (out.losses, norms.0, m.values())
    };
    let (l1, n1, v1) = run(1);
    let (l2, n2, v2) = run(2);
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a.1 - b.1).abs() < 1e-5, "{a:?} vs {b:?}");
    }
    for (a, b) in n1.iter().zip(&n2) {
        assert!((a - b).abs() < 1e-5 * a.max(1.0), "grad norm {a} vs {b}");
    }
    for (a, b) in v1.iter().flatten().zip(v2.iter().flatten()) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn adamw_matches_pytorch() {
    // Expected values from torch.optim.AdamW(lr=0.1, betas=(0.9, 0.95), eps=1e-8) with two
    // parameter groups (weight_decay 0.05 for the matrix, 0 for the vector), three steps.
    let dev = Device::Cpu;
    let w = Var::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap();
    let b = Var::new(&[0.3f32, -0.7], &dev).unwrap();
    let params = AdamWParams { lr: 0.1, ..AdamWParams::default() };
    let mut opt = AdamW::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], params).unwrap();
    let gw = [[[0.1f32, -0.2], [0.0, 1.5]], [[-0.3, 0.2], [0.05, -1.0]], [[0.2, 0.2], [-0.1, 0.5]]];
    let gb = [[1.0f32, -0.01], [0.5, 0.02], [-2.0, 0.0]];
    for i in 0..3 {
        let mut g = candle_core::backprop::GradStore::default();
        g.insert(w.as_tensor(), Tensor::new(&gw[i], &dev).unwrap());
        g.insert(b.as_tensor(), Tensor::new(&gb[i], &dev).unwrap());
        opt.step(&g).unwrap();
    }
    let got_w = w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let got_b = b.as_tensor().to_vec1::<f32>().unwrap();
    let want_w = [0.440_350_77f32, -0.931_530_6, 1.927_834_2, 0.104_557_32];
    let want_b = [0.12641272f32, -0.66478956];
    for (g, w) in got_w.iter().chain(&got_b).zip(want_w.iter().chain(&want_b)) {
        assert!((g - w).abs() < 2e-6, "{g} vs {w}");
    }
}

#[test]
fn jsonl_logs_read_back_bit_exact() {
    // Logged figures are compared with recomputed ones (the probe), so a float must survive
    // its JSON round trip exactly; this value came back one ulp off without serde_json's
    // float_roundtrip parsing.
    let dir = std::env::temp_dir().join(format!("tokenar-jsonl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("log.jsonl");
    let values = [1.619_383_053_854_108_f64, 0.1 + 0.2, 2.047_372_695_524_245_5, 1e-300, 123_456.789_012_345_67];
    let text: String = values.iter().map(|v| format!("{}\n", serde_json::json!({ "v": v }))).collect();
    std::fs::write(&p, text).unwrap();
    let back: Vec<serde_json::Value> = crate::train::metrics::read_jsonl(&p).unwrap();
    for (v, b) in values.iter().zip(&back) {
        assert_eq!(b["v"].as_f64().unwrap().to_bits(), v.to_bits(), "{v}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
