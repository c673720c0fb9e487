use super::train::{TrainConfig, CHECKPOINT};
use super::*;
use crate::nn::{named_vars, vars_without_grad};
use crate::weights::torch_zip;
use candle_core::{Device, Tensor};

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tokenar-tok-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn images(b: usize, size: usize, seed: u64) -> Tensor {
    Tensor::rand(-1f32, 1f32, (b, 3, size, size), &Device::Cpu)
        .unwrap()
        .affine(1.0, (seed as f64 * 1e-3).min(0.1))
        .unwrap()
        .clamp(-1f32, 1f32)
        .unwrap()
}

fn param_count(varmap: &VarMap) -> usize {
    named_vars(varmap).iter().map(|(_, v)| v.elem_count()).sum()
}

#[test]
fn presets_shapes_and_param_counts() {
    for name in ["vq-tiny", "vq-small", "vq-small-f4"] {
        let cfg = VqConfig::preset(name).unwrap();
        let (vq, vm) = build(&cfg, &Device::Cpu, 0).unwrap();
        assert_eq!(param_count(&vm), cfg.num_params(), "{name}");
        let s = cfg.image_size;
        let x = images(2, s, 0);
        let codes = vq.encode(&x).unwrap();
        let g = s / cfg.downsample();
        assert_eq!(codes.dims(), &[2, g, g], "{name}");
        assert_eq!(codes.dtype(), DType::U32);
        let y = vq.decode(&codes).unwrap();
        assert_eq!(y.dims(), &[2, 3, s, s], "{name}");
        // Non-square grids work too.
        let x = images(1, s, 1).narrow(3, 0, s / 2).unwrap();
        assert_eq!(vq.encode(&x).unwrap().dims(), &[1, g, g / 2]);
    }
    assert_eq!(VqConfig::preset("vq-small").unwrap().downsample(), 8);
    assert_eq!(VqConfig::preset("vq-small-f4").unwrap().downsample(), 4);
    let v16 = VqConfig::preset("vq-16").unwrap();
    assert_eq!(v16.downsample(), 16);
    assert_eq!(v16.image_size / v16.downsample(), 16);
    assert_eq!(VqConfig::preset("vq-8").unwrap().downsample(), 8);
    // LlamaGen reports 72M parameters for VQ-16.
    let n16 = v16.num_params();
    assert!((70_000_000..74_000_000).contains(&n16), "{n16}");
    assert!(VqConfig::preset("vq-8").unwrap().num_params() < n16);
    let e = VqConfig::preset("vq-99").unwrap_err().to_string();
    assert!(e.contains("vq-99") && e.contains("vq-small"), "{e}");
}

#[test]
fn bad_inputs_are_errors() {
    let cfg = VqConfig::preset("vq-tiny").unwrap();
    let (vq, _) = build(&cfg, &Device::Cpu, 0).unwrap();
    let e = vq.encode(&images(1, 15, 0)).unwrap_err().to_string();
    assert!(e.contains("multiples of 2"), "{e}");
    let out_of_range = Tensor::new(&[[[16u32, 0], [0, 0]]], &Device::Cpu).unwrap();
    let e = vq.decode(&out_of_range).unwrap_err().to_string();
    assert!(e.contains("16") && e.contains("out of range"), "{e}");
}

#[test]
fn quantizer_picks_nearest_normalised_code() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let q = quantize::Quantizer::new(3, 2, 0.25, vb.pp("quantize")).unwrap();
    // Codes before normalisation: (10, 0) -> (1, 0); (0, 0.1) -> (0, 1); (-3, -3) -> (-.71, -.71).
    let table = Tensor::new(&[[10f32, 0.0], [0.0, 0.1], [-3.0, -3.0]], &Device::Cpu).unwrap();
    named_vars(&vm)[0].1.set(&table).unwrap();
    // Latents (B=1, dim=2, h=1, w=4): (0.2, 0.9), (5, 0.1), (-0.01, -0.02), (0.1, -5).
    // Normalised, their nearest codes are 1, 0, 2, 2. In raw L2, (-0.01, -0.02) would be
    // nearest the raw code (0, 0.1): only the normalised search gives 2 there.
    let z = Tensor::new(&[0.2f32, 5.0, -0.01, 0.1, 0.9, 0.1, -0.02, -5.0], &Device::Cpu)
        .unwrap()
        .reshape((1, 2, 1, 4))
        .unwrap();
    let codes = q.encode(&z).unwrap();
    assert_eq!(codes.flatten_all().unwrap().to_vec1::<u32>().unwrap(), vec![1, 0, 2, 2]);
    let v = q.lookup(&codes).unwrap();
    let got = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let r = std::f32::consts::FRAC_1_SQRT_2;
    let want = [0.0, 1.0, -r, -r, 1.0, 0.0, -r, -r];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{got:?}");
    }
    // The straight-through forward gives the same codes and code values.
    let out = q.forward_train(&z).unwrap();
    assert_eq!(out.codes.flatten_all().unwrap().to_vec1::<u32>().unwrap(), vec![1, 0, 2, 2]);
    let st = out.z_q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (g, w) in st.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{st:?}");
    }
}

/// Keys LlamaGen's module tree has for the tiny preset (two levels, attention at level 1 of
/// the encoder and level 0 of the decoder).
const LLAMAGEN_KEYS: [&str; 14] = [
    "encoder.conv_in.weight",
    "encoder.conv_blocks.0.res.0.norm1.weight",
    "encoder.conv_blocks.0.downsample.conv.weight",
    "encoder.conv_blocks.1.res.0.nin_shortcut.weight",
    "encoder.conv_blocks.1.attn.0.q.weight",
    "encoder.mid.1.proj_out.bias",
    "encoder.norm_out.bias",
    "decoder.conv_blocks.0.attn.1.norm.weight",
    "decoder.conv_blocks.0.upsample.conv.weight",
    "decoder.conv_blocks.1.res.0.nin_shortcut.bias",
    "decoder.mid.2.conv2.weight",
    "quant_conv.weight",
    "post_quant_conv.bias",
    "quantize.embedding.weight",
];

#[test]
fn llamagen_checkpoint_loads_and_wrong_shape_fails() {
    let d = tmpdir("pt");
    let cfg = VqConfig::preset("vq-tiny").unwrap();
    let (vq, vm) = build(&cfg, &Device::Cpu, 0).unwrap();
    let tensors = crate::weights::varmap_tensors(&vm);
    for k in LLAMAGEN_KEYS {
        assert!(tensors.contains_key(k), "missing {k}");
    }
    let used = Tensor::zeros(65536, DType::I64, &Device::Cpu).unwrap();
    let mut list: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    list.push(("quantize.codebook_used", &used));
    let pt = d.join("vq_tiny.pt");
    torch_zip::write_checkpoint(&pt, Some("model"), &list).unwrap();
    let (loaded, _) = load(&pt, Some("vq-tiny"), &Device::Cpu).unwrap();
    let x = images(1, 16, 3);
    let a = vq.decode(&vq.encode(&x).unwrap()).unwrap();
    let b = loaded.decode(&loaded.encode(&x).unwrap()).unwrap();
    // The loaded tokenizer records no backprop graph (its decoder's activations are freed as
    // it goes); the one built to train does.
    assert!(!b.track_op() && a.track_op());
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-6, "{diff}");

    // Without a preset, this file's shapes are read, but LlamaGen's 32 GroupNorm groups do not
    // divide vq-tiny's 8 channels: the error says so and asks for the preset.
    let e = load(&pt, None, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("32 GroupNorm groups") && e.contains("preset") && e.contains("vq_tiny.pt"), "{e}");
    // A preset of another architecture is a mismatch naming both.
    let e = load(&pt, Some("vq-16"), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("vq-16") && e.contains("ch 8 x [1, 2]") && e.contains("ch 128 x [1, 1, 2, 2, 4]"), "{e}");

    // A wrong shape names the key and both shapes.
    let bad = Tensor::zeros((8, 3, 1, 1), DType::F32, &Device::Cpu).unwrap();
    let list2: Vec<(&str, &Tensor)> = list
        .iter()
        .map(|(k, t)| if *k == "encoder.conv_in.weight" { (*k, &bad) } else { (*k, *t) })
        .collect();
    let pt2 = d.join("bad.pt");
    torch_zip::write_checkpoint(&pt2, Some("model"), &list2).unwrap();
    let e = load(&pt2, Some("vq-tiny"), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("encoder.conv_in.weight") && e.contains("[8, 3, 1, 1]") && e.contains("[8, 3, 3, 3]"), "{e}");

    // A missing key is named too.
    let list3: Vec<(&str, &Tensor)> = list.iter().filter(|(k, _)| *k != "quant_conv.bias").cloned().collect();
    let pt3 = d.join("missing.pt");
    torch_zip::write_checkpoint(&pt3, Some("model"), &list3).unwrap();
    let e = load(&pt3, Some("vq-tiny"), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("quant_conv.bias"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// `tensors` as a LlamaGen checkpoint (`{"model": state_dict}` with the usage buffer).
fn write_llamagen_pt(path: &std::path::Path, vm: &VarMap) {
    let tensors = crate::weights::varmap_tensors(vm);
    let used = Tensor::zeros(65536, DType::F32, &Device::Cpu).unwrap();
    let mut list: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    list.push(("quantize.codebook_used", &used));
    torch_zip::write_checkpoint(path, Some("model"), &list).unwrap();
}

#[test]
fn architecture_is_read_from_the_tensors() {
    let d = tmpdir("infer");
    // No preset has these shapes; LlamaGen's 32 groups divide every channel count.
    let cfg = VqConfig {
        ch: 32,
        ch_mult: vec![1, 2, 2],
        enc_res_blocks: 2,
        dec_res_blocks: 1,
        z_channels: 4,
        codebook_size: 24,
        codebook_dim: 3,
        norm_groups: 32,
        norm_eps: 1e-6,
        commit_beta: 0.25,
        image_size: 256,
    };
    let (vq, vm) = build(&cfg, &Device::Cpu, 1).unwrap();
    let tensors = crate::weights::varmap_tensors(&vm);
    let shape = |k: &str| tensors.get(k).map(|t| t.dims().to_vec());
    assert_eq!(VqConfig::infer_from_shapes(&shape).unwrap(), Some(cfg.clone()));
    assert_eq!(cfg.preset_name(), None);
    assert_eq!(VqConfig { ch_mult: vec![1, 2, 2, 4], ch: 128, enc_res_blocks: 2, dec_res_blocks: 3, z_channels: 256, codebook_size: 16384, codebook_dim: 8, ..cfg.clone() }.preset_name(), Some("vq-8"));
    // Not a tokenizer: nothing to infer; inconsistent keys: an error naming the level.
    assert_eq!(VqConfig::infer_from_shapes(&|_: &str| None).unwrap(), None);
    let e = VqConfig::infer_from_shapes(&|k: &str| {
        if k == "encoder.conv_blocks.1.res.1.conv1.weight" {
            None
        } else {
            shape(k)
        }
    })
    .unwrap_err();
    assert!(e.contains("encoder level 1 has 1 residual blocks"), "{e}");

    // A LlamaGen .pt loads without a preset, and with a matching one.
    let pt = d.join("vq_custom.pt");
    write_llamagen_pt(&pt, &vm);
    let x = images(1, 16, 2);
    let want = vq.decode(&vq.encode(&x).unwrap()).unwrap();
    let (loaded, _) = load(&pt, None, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), &cfg);
    let got = loaded.decode(&loaded.encode(&x).unwrap()).unwrap();
    // The model built to train computes through the patch matrix, the loaded one through the
    // inference convolution: rounding differs (32 channels, three levels).
    let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "{diff}");
    let e = load(&pt, Some("vq-8"), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("vq_custom.pt") && e.contains("preset `vq-8`") && e.contains("ch 32 x [1, 2, 2]"), "{e}");
    // A file without tokenizer keys needs a preset, and says so.
    let other = d.join("other.pt");
    let w = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    torch_zip::write_checkpoint(&other, Some("model"), &[("tok_embeddings.weight", &w)]).unwrap();
    let e = load(&other, None, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("other.pt") && e.contains("holds no VQ tokenizer"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn own_safetensors_round_trip_with_config() {
    let d = tmpdir("st");
    let cfg = VqConfig::preset("vq-tiny").unwrap();
    let (vq, vm) = build(&cfg, &Device::Cpu, 0).unwrap();
    let p = d.join("vq.safetensors");
    save(&p, &cfg, &vm).unwrap();
    let (back, _) = load(&p, None, &Device::Cpu).unwrap();
    assert_eq!(back.config(), &cfg);
    let x = images(2, 16, 4);
    let a = vq.encode(&x).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap();
    let b = back.encode(&x).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(a, b);
    let e = load(&p, Some("vq-small"), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("vq-small"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn every_trainable_variable_gets_a_gradient() {
    let cfg = VqConfig::preset("vq-tiny").unwrap();
    let (vq, vm) = build(&cfg, &Device::Cpu, 0).unwrap();
    let x = images(2, 16, 5);
    let out = vq.forward_train(&x).unwrap();
    let loss = ((&out.recon - &x).unwrap().sqr().unwrap().mean_all().unwrap()
        + (&out.quant.codebook_loss + &out.quant.commit_loss).unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let vars = named_vars(&vm);
    assert!(vars.len() > 50);
    // Only used codes can receive a gradient; check the used rows are non-zero.
    let missing: Vec<String> = vars_without_grad(&vars, &grads).unwrap();
    assert!(missing.is_empty(), "no gradient: {missing:?}");
    let emb = vars.iter().find(|(n, _)| n == "quantize.embedding.weight").unwrap();
    let g = grads.get(emb.1.as_tensor()).unwrap().abs().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
    let used = out.quant.codes.flatten_all().unwrap().to_vec1::<u32>().unwrap();
    for c in used {
        assert!(g[c as usize] > 0.0, "code {c} used but no gradient");
    }
}

/// `n` colour-gradient images of `size` px in `root/data/sample_0/`; returns that folder.
fn write_gradients(root: &std::path::Path, n: u8, size: u32) -> std::path::PathBuf {
    let data = root.join("data/sample_0");
    std::fs::create_dir_all(&data).unwrap();
    let step = (240 / size) as u8;
    for i in 0..n {
        let img = image::RgbImage::from_fn(size, size, |x, y| image::Rgb([x as u8 * step, y as u8 * step, i * 40]));
        crate::imageio::save_rgb(data.join(format!("img{i}.png")), &img).unwrap();
    }
    data
}

#[test]
fn training_writes_checkpoint_log_png_and_resumes() {
    let d = tmpdir("train");
    let data = write_gradients(&d, 6, 20);
    crate::imageio::save_rgb(data.join("mask.png"), &image::RgbImage::new(4, 4)).unwrap();
    let toml_text = format!(
        "data_dir = {:?}\neval_dir = {:?}\nout_dir = {:?}\npreset = \"vq-tiny\"\nbatch_size = 4\nsteps = 3\nlog_every = 1\nckpt_every = 2\ncrop_size = 8\ndead_code_every = 2\nwarmup_steps = 1\n",
        d.join("data"),
        d.join("data"),
        d.join("out")
    );
    let cfgp = d.join("t.toml");
    std::fs::write(&cfgp, toml_text).unwrap();
    let cfg = TrainConfig::load(&cfgp, &[]).unwrap();
    let mut seen = Vec::new();
    let s = train::train(&cfg, &Device::Cpu, &mut |i| seen.push(i.step)).unwrap();
    assert_eq!(seen, vec![1, 2, 3]);
    assert_eq!(s.steps_done, 3);
    let e = s.eval.unwrap();
    assert_eq!(e.images, 6);
    assert!(e.psnr.is_finite() && e.usage > 0.0);
    assert!(d.join("out").join(CHECKPOINT).exists());
    let state = crate::weights::TensorFile::load(&d.join("out").join(train::OPTIM_STATE), &Device::Cpu).unwrap();
    assert_eq!(state.metadata.get(train::META_STEP).map(String::as_str), Some("3"));
    assert!(state.tensors.keys().any(|k| k.ends_with("quantize.embedding.weight")));
    assert!(d.join("out/recon-000002.png").exists() && d.join("out/recon-000003.png").exists());
    let log = std::fs::read_to_string(d.join("out/metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4, "{log}");

    // Resume: continues from step 3 up to 5.
    let cfg2 = TrainConfig::load(&cfgp, &["steps=5".into()]).unwrap();
    let mut seen = Vec::new();
    train::train(&cfg2, &Device::Cpu, &mut |i| seen.push(i.step)).unwrap();
    assert_eq!(seen, vec![4, 5]);
    let (vq, _) = load(&d.join("out").join(CHECKPOINT), None, &Device::Cpu).unwrap();
    assert_eq!(vq.config().codebook_size, 16);

    // Overrides reach nested keys and unknown keys are rejected.
    let c3 = TrainConfig::load(&cfgp, &["codebook_size=8".into(), "lr=0.01".into()]).unwrap();
    assert_eq!(c3.model_config().unwrap().codebook_size, 8);
    assert_eq!(c3.lr, 0.01);
    let e = TrainConfig::load(&cfgp, &["nope=1".into()]).unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn decoder_only_training_keeps_codes_and_changes_the_decoder() {
    let d = tmpdir("dec-only");
    write_gradients(&d, 4, 16);
    let cfg_t = VqConfig::preset("vq-tiny").unwrap();
    let (_, vm0) = build(&cfg_t, &Device::Cpu, 0).unwrap();
    let init = d.join("init.safetensors");
    save(&init, &cfg_t, &vm0).unwrap();
    let toml_text = format!(
        "data_dir = {:?}\nout_dir = {:?}\npreset = \"vq-tiny\"\nimage_size = 16\nbatch_size = 4\nsteps = 2\nwarmup_steps = 1\nlr = 0.01\ndead_code_every = 1\ninit = {:?}\ndecoder_only = true\n",
        d.join("data"),
        d.join("out"),
        init
    );
    let cfgp = d.join("t.toml");
    std::fs::write(&cfgp, toml_text).unwrap();
    let cfg = TrainConfig::load(&cfgp, &[]).unwrap();
    train::train(&cfg, &Device::Cpu, &mut |_| {}).unwrap();
    let before = crate::weights::TensorFile::load(&init, &Device::Cpu).unwrap();
    let after = crate::weights::TensorFile::load(&d.join("out").join(CHECKPOINT), &Device::Cpu).unwrap();
    let mut changed = 0;
    for (name, t0) in &before.tensors {
        let t1 = &after.tensors[name];
        let diff = (t0 - t1).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        if name.starts_with("decoder.") || name.starts_with("post_quant_conv.") {
            changed += (diff > 0.0) as usize;
        } else {
            assert_eq!(diff, 0.0, "{name} changed in a decoder-only run");
        }
    }
    assert!(changed > 10, "only {changed} decoder tensors moved");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn im2col_conv_matches_candle_conv2d() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 9, 8), &dev).unwrap();
    for (k, stride, pad) in [(3usize, 1usize, [1usize; 4]), (3, 2, [0, 1, 0, 1]), (1, 1, [0; 4])] {
        let vm = VarMap::new();
        let conv = blocks::Conv::new(3, 5, k, stride, pad, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        let t = crate::weights::varmap_tensors(&vm);
        let xp = x.pad_with_zeros(2, pad[0], pad[1]).unwrap().pad_with_zeros(3, pad[2], pad[3]).unwrap();
        let want = xp
            .conv2d(&t["weight"], 0, stride, 1, 1)
            .unwrap()
            .broadcast_add(&t["bias"].reshape((1, 5, 1, 1)).unwrap())
            .unwrap();
        let got = conv.forward(&x).unwrap();
        assert_eq!(got.dims(), want.dims(), "k {k} stride {stride}");
        let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "k {k} stride {stride}: {d}");
    }
}

#[test]
fn dead_codes_restart_at_batch_latents_only() {
    let cfg = VqConfig::preset("vq-tiny").unwrap();
    let (_, vm) = build(&cfg, &Device::Cpu, 0).unwrap();
    let before = crate::weights::varmap_tensors(&vm)["quantize.embedding.weight"].to_vec2::<f32>().unwrap();
    let mut counts = vec![1u32; 16];
    counts[3] = 0;
    counts[7] = 0;
    let z = Tensor::new(&[[1f32, 0., 0., 0.]], &Device::Cpu).unwrap();
    let n = train::restart_dead_codes(&vm, &counts, &z, &mut crate::util::rng(0)).unwrap();
    assert_eq!(n, 2);
    let after = crate::weights::varmap_tensors(&vm)["quantize.embedding.weight"].to_vec2::<f32>().unwrap();
    for i in 0..16 {
        if i == 3 || i == 7 {
            assert!((after[i][0] - 1.0).abs() < 0.01 && after[i][1].abs() < 0.01, "{:?}", after[i]);
        } else {
            assert_eq!(after[i], before[i]);
        }
    }
}

#[test]
fn im2col_conv_gradients_match_candle_conv2d() {
    let dev = Device::Cpu;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &dev).unwrap()).unwrap();
    for (k, stride, pad) in [(3usize, 1usize, [1usize; 4]), (3, 2, [0, 1, 0, 1]), (1, 1, [0; 4])] {
        let vm = VarMap::new();
        let conv = blocks::Conv::new(3, 4, k, stride, pad, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
        let w = named_vars(&vm).into_iter().find(|(n, _)| n == "weight").unwrap().1;
        let y = conv.forward(x.as_tensor()).unwrap();
        let r = Tensor::randn(0f32, 1.0, y.dims(), &dev).unwrap();
        let g1 = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let xp = x.as_tensor().pad_with_zeros(2, pad[0], pad[1]).unwrap().pad_with_zeros(3, pad[2], pad[3]).unwrap();
        let y2 = xp.conv2d(w.as_tensor(), 0, stride, 1, 1).unwrap();
        let g2 = (&y2 * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for t in [x.as_tensor(), w.as_tensor()] {
            let d = (g1.get(t).unwrap() - g2.get(t).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-3, "k {k} stride {stride}: gradient differs by {d}");
        }
    }
}

#[test]
fn image_listing_skips_masks_and_the_contact_sheet() {
    let dir = tmpdir("list-images");
    let sample = dir.join("sample_0");
    std::fs::create_dir_all(sample.join("ref")).unwrap();
    for f in ["contact.png", "sample_0/real.png", "sample_0/mask.png", "sample_0/mask_0.png", "sample_0/ref/0.png", "sample_0/meta.json"] {
        std::fs::write(dir.join(f), b"x").unwrap();
    }
    let names = |ex: &[String]| -> Vec<String> {
        dataset::list_images(&dir, ex).unwrap().iter().map(|p| p.strip_prefix(&dir).unwrap().to_string_lossy().replace('\\', "/")).collect()
    };
    assert_eq!(names(&dataset::NOT_PICTURES.map(String::from)), ["sample_0/real.png", "sample_0/ref/0.png"]);
    assert_eq!(names(&[]).len(), 5);
    assert!(dataset::list_images(&dir.join("missing"), &[]).unwrap_err().to_string().contains("missing"));
}

#[test]
fn image_subsets_mix_the_kinds_of_a_dataset_folder() {
    // A listing of 100 samples x (background, real, ref/0, ref/1): a limit of 100 must not fall
    // on one kind (a stride of 4 took only backgrounds).
    let all = dataset::subset(400, None);
    assert_eq!(all, (0..400).collect::<Vec<_>>());
    assert_eq!(dataset::subset(400, Some(1000)).len(), 400);
    let s = dataset::subset(400, Some(100));
    assert_eq!(s.len(), 100);
    assert!(s.windows(2).all(|w| w[0] < w[1]), "ascending and distinct");
    assert_eq!(s, dataset::subset(400, Some(100)), "seeded");
    for kind in 0..4 {
        let k = s.iter().filter(|&&i| i % 4 == kind).count();
        assert!((10..=40).contains(&k), "kind {kind}: {k} of 100");
    }
}

#[test]
fn fresh_tokenizers_depend_on_the_seed_only() {
    let cfg = VqConfig::preset("vq-tiny").unwrap();
    let weights = |seed| {
        let (_, vm) = build(&cfg, &Device::Cpu, seed).unwrap();
        let mut t: Vec<(String, Vec<f32>)> = named_vars(&vm)
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    let (a, b, c) = (weights(7), weights(7), weights(8));
    assert_eq!(a, b);
    assert_ne!(a, c);
    // The hints are followed: norms start at 1, a conv weight has Kaiming-normal spread
    // (gain sqrt(2), fan-in = c_in * k * k) and its bias stays within PyTorch's bound.
    let get = |n: &str| &a.iter().find(|(k, _)| k == n).unwrap().1;
    assert!(get("encoder.norm_out.weight").iter().all(|v| *v == 1.0));
    let w = get("encoder.conv_in.weight");
    let fan_in = (3 * 3 * 3) as f32;
    let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
    let want = (2.0 / fan_in).sqrt();
    assert!((std / want - 1.0).abs() < 0.25, "std {std}, Kaiming {want}");
    assert!(get("encoder.conv_in.bias").iter().all(|v| v.abs() <= 1.0 / fan_in.sqrt()));
}

#[test]
fn batches_are_coded_as_their_images_one_by_one() {
    // A loaded (inference) tokenizer; 11 images go through it in chunks of 8 and 3.
    let cfg = VqConfig::preset("vq-tiny").unwrap();
    let (_, vm) = build(&cfg, &Device::Cpu, 3).unwrap();
    let d = tmpdir("chunks");
    let p = d.join("vq.safetensors");
    save(&p, &cfg, &vm).unwrap();
    let (vq, _) = load(&p, None, &Device::Cpu).unwrap();
    let x = images(11, 16, 4);
    let codes = vq.encode(&x).unwrap();
    let recon = vq.decode(&codes).unwrap();
    assert_eq!(codes.dims()[0], 11);
    for i in [0, 7, 8, 10] {
        let one = vq.encode(&x.narrow(0, i, 1).unwrap()).unwrap();
        assert_eq!(one.flatten_all().unwrap().to_vec1::<u32>().unwrap(), codes.get(i).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap());
        let r = vq.decode(&one).unwrap().squeeze(0).unwrap();
        let diff = (r - recon.get(i).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "image {i}");
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn metadata_configs_beyond_limits_or_the_file_are_refused() {
    let d = tmpdir("meta_limits");
    let cfg = VqConfig::preset("vq-tiny").unwrap();
    let (_, vm) = build(&cfg, &Device::Cpu, 0).unwrap();
    let p = d.join("vq.safetensors");
    // A config claiming a model larger than the tensors beside it: an error naming both counts,
    // before anything of that size is allocated.
    save(&p, &VqConfig::preset("vq-16").unwrap(), &vm).unwrap();
    let e = load(&p, None, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("vq.safetensors") && e.contains("holds only"), "{e}");
    // Sizes beyond the limits: refused where the metadata is read (load and `info` alike).
    for (field, big) in [("ch", 1usize << 40), ("codebook_size", usize::MAX / 2), ("image_size", 1 << 20)] {
        let mut c = cfg.clone();
        match field {
            "ch" => c.ch = big,
            "codebook_size" => c.codebook_size = big,
            _ => c.image_size = big,
        }
        save(&p, &c, &vm).unwrap();
        let e = load(&p, None, &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("vq.safetensors") && e.contains(field) && e.contains("limit"), "{field}: {e}");
    }
    std::fs::remove_dir_all(&d).unwrap();
}
