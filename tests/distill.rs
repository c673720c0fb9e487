//! The distillation term: DINOv2 (Hugging Face `Dinov2Model`) parity with transformers on the
//! fixture of parity/dinov2_parity.py, the gradient of the term (alignment head and GPT
//! backbone, with a finite-difference check), the code cache's features (round trip and
//! provenance), and training's refusal of a cache without them.

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng as _;
use std::path::{Path, PathBuf};
use tokenar::data::cache::{self, CacheMaker, CacheReader, EncodeOptions};
use tokenar::eval::nets::dinov2::{self, Dinov2Features, Dinov2Input};
use tokenar::model::{self, Condition, GptConfig};
use tokenar::pipeline::{TrainJob, TrainJobConfig};
use tokenar::train::distill;
use tokenar::weights::TensorFile;

mod common;

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tokenar-distill-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/dinov2_parity")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// The network input of the fixture: 1.5 sin(0.05 x + 0.07 y + c + 1.3 b).
fn net_input(b: usize) -> Tensor {
    let mut v = Vec::with_capacity(b * 3 * 224 * 224);
    for bi in 0..b {
        for c in 0..3 {
            for y in 0..224 {
                for x in 0..224 {
                    v.push(1.5 * (0.05f32 * x as f32 + 0.07 * y as f32 + c as f32 + 1.3 * bi as f32).sin());
                }
            }
        }
    }
    Tensor::from_vec(v, (b, 3, 224, 224), &Device::Cpu).unwrap()
}

#[test]
fn dinov2_matches_transformers() {
    let dev = Device::Cpu;
    let net = Dinov2Features::load(&fixture_dir().join("model.safetensors"), &dev).unwrap();
    let a = net.arch();
    assert_eq!((a.width, a.depth, a.heads, a.patch, a.pos_grid), (32, 2, 2, 14, 37));
    assert_eq!(net.grid(), 16);
    let fx = TensorFile::load(fixture_dir().join("fixture.safetensors"), &dev).unwrap();
    // The network (position embeddings resampled 37x37 -> 16x16) on a fixed input.
    let feats = net.forward_preprocessed(&net_input(2)).unwrap();
    let want = &fx.tensors["features"];
    assert_eq!(feats.dims(), &[2, 256, 32]);
    let d = max_abs_diff(&feats, want);
    assert!(d <= 1e-4, "features differ from transformers by {d}");
    // The processor (8-bit PIL bicubic resize to 256, centre crop 224, ImageNet mean/std):
    // PIL's fixed-point filter may round a level differently, nothing more.
    let pv = net.preprocess(&fx.tensors["images"]).unwrap();
    assert_eq!(pv.dims(), &[2, 3, 224, 224]);
    let idx = Tensor::arange_step(0u32, 224, 8, &dev).unwrap();
    let sub = pv.index_select(&idx, 2).unwrap().index_select(&idx, 3).unwrap();
    let want = &fx.tensors["pixels_sub"];
    let level = 1.0 / 255.0 / 0.224;
    let d = max_abs_diff(&sub, want);
    let mean = (&sub - want).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d <= 1.01 * level && mean < 0.05 * level, "pixel values differ by up to {d} (mean {mean}); one level is {level}");
}

#[test]
fn dinov2_refuses_bad_files_and_inputs() {
    let dev = Device::Cpu;
    let dir = tmp("bad-dino");
    let e = Dinov2Features::load(&dir.join("none.safetensors"), &dev).err().unwrap().to_string();
    assert!(e.contains("none.safetensors") && e.contains("Dinov2Model"), "{e}");
    // Not a DINOv2: the missing key is named.
    let mut t = dinov2::random_weights(8, 1, 2, 4, 0).unwrap().into_iter().collect::<std::collections::HashMap<_, _>>();
    t.remove("embeddings.cls_token");
    let p = dir.join("w.safetensors");
    tokenar::weights::save_safetensors(&p, &t, &Default::default()).unwrap();
    let e = Dinov2Features::load(&p, &dev).err().unwrap().to_string();
    assert!(e.contains("embeddings.cls_token") && e.contains("w.safetensors"), "{e}");
    // A crop that is not a multiple of the patch.
    let t = dinov2::random_weights(8, 1, 2, 4, 0).unwrap().into_iter().collect::<std::collections::HashMap<_, _>>();
    tokenar::weights::save_safetensors(&p, &t, &Default::default()).unwrap();
    assert!(Dinov2Features::load_with(&p, Dinov2Input { resize: 12, crop: 9 }, &dev).is_err());
    // A giant (SwiGLU) config is refused by name.
    std::fs::write(dir.join("config.json"), r#"{"num_attention_heads": 2, "use_swiglu_ffn": true}"#).unwrap();
    let e = Dinov2Features::load(&p, &dev).err().unwrap().to_string();
    assert!(e.contains("SwiGLU"), "{e}");
    std::fs::write(dir.join("config.json"), r#"{"num_attention_heads": 2}"#).unwrap();
    let net = Dinov2Features::load_with(&p, Dinov2Input { resize: 10, crop: 8 }, &dev).unwrap();
    assert_eq!((net.arch().heads, net.grid()), (2, 4));
    assert!(net.features(&Tensor::zeros((1, 1, 8, 8), DType::F32, &dev).unwrap()).is_err());
    let f = net.features(&Tensor::zeros((2, 3, 12, 16), DType::F32, &dev).unwrap()).unwrap();
    assert_eq!(f.dims(), &[2, 16, 8]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn pooling_the_patch_grid_averages_areas() {
    let dev = Device::Cpu;
    // 4x4 grid, 1 channel holding the cell index; pooled to 2x2: means of 2x2 blocks.
    let f = Tensor::arange(0f32, 16.0, &dev).unwrap().reshape((1, 16, 1)).unwrap();
    let p = dinov2::pool_grid(&f, (4, 4), (2, 2)).unwrap();
    assert_eq!(p.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![2.5, 4.5, 10.5, 12.5]);
    // 4 -> 3 rows (adaptive pooling: overlapping windows [0,2), [1,3), [2,4)).
    let p = dinov2::pool_grid(&f, (4, 4), (3, 1)).unwrap();
    assert_eq!(p.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![3.5, 7.5, 11.5]);
    assert!(dinov2::pool_grid(&f, (3, 4), (2, 2)).is_err());
}

/// A tiny GPT with every addition and an alignment head (width 6) on a 2x4 grid.
fn tiny() -> GptConfig {
    let mut c = GptConfig::preset("tiny").unwrap();
    (c.vocab_size, c.n_layer, c.n_head, c.dim, c.ffn_multiple_of) = (64, 2, 2, 32, 16);
    (c.caption_dim, c.caption_len, c.max_refs, c.n_instruct) = (12, 5, 2, 2);
    (c.grid, c.align_dim, c.index_embedding, c.itd) = ((2, 4), Some(6), true, true);
    c.dropouts = model::Dropouts::default();
    c
}

fn var(vm: &candle_nn::VarMap, name: &str) -> Var {
    vm.data().lock().unwrap()[name].clone()
}

#[test]
fn distillation_gradient_reaches_the_head_and_the_backbone() {
    let dev = Device::Cpu;
    let cfg = tiny();
    let (m, vm) = model::build(&cfg, &dev, 3).unwrap();
    let mut rng = tokenar::util::rng(4);
    let (b, hw) = (2, 8);
    let mut codes = |n: usize| Tensor::from_vec((0..n).map(|_| rng.random_range(0..64u32)).collect::<Vec<_>>(), n, &dev).unwrap();
    let refs = codes(b * 2 * hw).reshape((b, 2, hw)).unwrap();
    let bg = codes(b * hw).reshape((b, hw)).unwrap();
    let target = codes(b * hw).reshape((b, hw)).unwrap();
    let text = Tensor::randn(0f32, 1.0, (b, 5, 12), &dev).unwrap();
    let cond = Condition::new(refs, bg, text, None);
    let feats = Tensor::randn(0f32, 1.0, (b, 2, 6), &dev).unwrap();
    let loss = || {
        let out = m.forward_train_full(&cond, &target, false, &mut tokenar::util::rng(0)).unwrap();
        distill::distill_loss(&m, &out.target_features, &feats).unwrap()
    };
    let l = loss();
    let grads = l.backward().unwrap();
    let norm = |name: &str| grads.get(var(&vm, name).as_tensor()).map(|g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).unwrap_or(0.0);
    for name in ["alignment.weight", "alignment.bias", "norm.weight", "layers.1.feed_forward.w2.weight", "layers.0.attention.wqkv.weight", "tok_embeddings.weight"] {
        assert!(norm(name) > 0.0, "no gradient of the distillation term on {name}");
    }
    // The token head is not on the path.
    assert_eq!(norm("output.weight"), 0.0);

    // Finite differences on the largest-gradient entry of a backbone weight and of the head.
    for name in ["layers.1.feed_forward.w2.weight", "alignment.weight"] {
        let v = var(&vm, name);
        let g = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (k, gk) = g.iter().copied().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap();
        let orig = v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let at = |delta: f32| {
            let mut w = orig.clone();
            w[k] += delta;
            v.set(&Tensor::from_vec(w, v.dims(), &dev).unwrap()).unwrap();
            loss().to_scalar::<f32>().unwrap() as f64
        };
        let eps = 1e-2;
        let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        at(0.0);
        assert!((fd - gk as f64).abs() <= 0.02 * gk.abs() as f64 + 1e-5, "{name}[{k}]: backprop {gk}, finite difference {fd}");
    }
}

/// The fixture's tiny DINOv2 as the distillation encoder of `ds` at 16 px (4x4 codes): the
/// features pooled to 2x2.
fn encode_with_dino(ds_dir: &Path, tok: &Path, out: &Path, dino: bool) -> (tokenar::Result<cache::EncodeSummary>, Dinov2Features) {
    let dev = Device::Cpu;
    let net = Dinov2Features::load(&fixture_dir().join("model.safetensors"), &dev).unwrap();
    let ds = tokenar::data::Dataset::open_quiet(ds_dir, &tokenar::data::OpenOptions::default()).unwrap();
    let (vq, _) = tokenar::tokenizer::load(tok, None, &dev).unwrap();
    let maker = CacheMaker::new(&ds, tok, None, None).unwrap();
    let maker = if dino { maker.with_distill(net.description()) } else { maker };
    let opts = EncodeOptions { maker: Some(maker), ..EncodeOptions::new(16, 8) };
    let mut enc = |x: &Tensor| vq.encode(x);
    let mut feat = |x: &Tensor, (h, w): (usize, usize)| net.features_for_grid(x, (h / 2, w / 2));
    let feats: Option<cache::FeatureEncoder> = if dino { Some(&mut feat) } else { None };
    let r = cache::encode_with_features(&ds, out, &opts, &mut enc, None, feats, None);
    (r, net)
}

fn train_config(tok: &Path, cache: &Path, out: &Path, steps: u64, distill_weight: f64) -> TrainJobConfig {
    let (steps, weight) = (format!("steps={steps}"), format!("distill_weight={distill_weight:?}"));
    let sets = [steps.as_str(), &weight, "drop_both=0.0", "drop_image=0.0", "drop_text=0.0"];
    common::train_config(cache, out, tok, &sets)
}

#[test]
fn cache_keeps_features_and_training_needs_them() {
    let root = tmp("cache");
    let (ds_dir, tok, plain_cache) = common::fixture(&root);
    let dev = Device::Cpu;

    // Training with distill_weight > 0 refuses a cache without features, naming it.
    let e = TrainJob::new(train_config(&tok, &plain_cache, &root.join("run-plain"), 1, 0.5), false, &dev).err().unwrap().to_string();
    assert!(e.contains(&plain_cache.display().to_string()) && e.contains("--distill-dinov2"), "{e}");
    // Round trip: the stored features are the encoder's (f16 storage), the maker names it.
    let with = root.join("cache-dino");
    let (r, net) = encode_with_dino(&ds_dir, &tok, &with, true);
    assert_eq!(r.unwrap().in_cache, 24);
    let reader = CacheReader::open(&with).unwrap();
    assert_eq!(reader.distill_shape(), Some((4, 32)));
    assert_eq!(reader.maker().unwrap().distill.as_deref(), Some(net.description()));
    assert!(net.description().contains("Dinov2Model") && net.description().contains("width 32"));
    let ds = tokenar::data::Dataset::open_quiet(&ds_dir, &tokenar::data::OpenOptions::default()).unwrap();
    for i in [0, 13, 23] {
        let s = reader.get(i).unwrap();
        let sample = ds.samples.iter().find(|d| d.id == s.id).unwrap().load(16).unwrap();
        let img = tokenar::imageio::rgb_to_tensor(sample.target.as_ref().unwrap(), &dev).unwrap().unsqueeze(0).unwrap();
        let want = net.features_for_grid(&img, (2, 2)).unwrap().squeeze(0).unwrap();
        let got = s.distill.expect("features stored");
        assert_eq!(got.dtype(), DType::F16);
        let got = got.to_dtype(DType::F32).unwrap();
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(max_abs_diff(&got, &want) <= 1e-3 * scale.max(1.0), "{}", s.id);
    }
    // A rerun with the same encoder resumes (nothing to do); one without features is refused
    // (the cache was made otherwise).
    let (r, _) = encode_with_dino(&ds_dir, &tok, &with, true);
    assert_eq!(r.unwrap().stored, 0);
    let (r, _) = encode_with_dino(&ds_dir, &tok, &with, false);
    let e = r.err().unwrap().to_string();
    assert!(e.contains("distillation features") && e.contains("vs none"), "{e}");

    // Training reads them: the head's width is theirs, `loss_distill` is logged, and the
    // step's loss is the token loss plus 0.5 x that term.
    let run = root.join("run");
    let job = TrainJob::new(train_config(&tok, &with, &run, 2, 0.5), false, &dev).unwrap();
    assert_eq!(job.parts.gpt.config().align_dim, Some(32));
    let mut job = job;
    let s = job.run(false).unwrap();
    let recs = tokenar::train::MetricsLog::read(run.join("checkpoints").join("metrics.jsonl")).unwrap();
    let dl = recs[0].extras["loss_distill"];
    assert!(dl > 0.0 && dl.is_finite());
    let plain = TrainJob::new(train_config(&tok, &with, &root.join("run-0"), 1, 0.0), false, &dev).unwrap().run(false).unwrap();
    let want = plain.losses[0].1 as f64 + 0.5 * dl;
    assert!((s.losses[0].1 as f64 - want).abs() < 1e-4, "{} vs {want}", s.losses[0].1);
    assert!(run.join("loss.png").is_file());
    // The exported model keeps the head (`alignment.*`) and loads.
    let exported = TensorFile::load(run.join("export").join("model.safetensors"), &dev).unwrap();
    assert_eq!(exported.tensors["alignment.weight"].dims(), &[32, 32, 2, 2]);
    let export = run.join("export").join("model.safetensors");
    model::load(&export, None, &dev).unwrap();

    // A run initialised from it with distillation starts from its head; one whose features
    // are of another width (here: the head's width edited in the file) starts a fresh head.
    let head = |job: &TrainJob| -> Vec<f32> {
        let vars = tokenar::weights::varmap_tensors(&job.state.models[0].1);
        vars.into_iter().find(|(k, _)| k == "alignment.weight").unwrap().1.flatten_all().unwrap().to_vec1().unwrap()
    };
    let mut cfg = train_config(&tok, &with, &root.join("run-init"), 1, 0.5);
    cfg.init = Some(export.clone());
    let want: Vec<f32> = exported.tensors["alignment.weight"].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(head(&TrainJob::new(cfg, false, &dev).unwrap()), want);
    let mut other = exported.tensors.clone();
    other.insert("alignment.weight".into(), Tensor::ones((8, 32, 2, 2), DType::F32, &dev).unwrap());
    other.insert("alignment.bias".into(), Tensor::zeros(8, DType::F32, &dev).unwrap());
    let other_file = root.join("other-head.safetensors");
    candle_core::safetensors::save(&other, &other_file).unwrap();
    let mut cfg = train_config(&tok, &with, &root.join("run-init-other"), 1, 0.5);
    cfg.init = Some(other_file);
    let fresh = head(&TrainJob::new(cfg, false, &dev).unwrap());
    assert_eq!(fresh.len(), want.len());
    assert_ne!(fresh, want);
    std::fs::remove_dir_all(&root).unwrap();
}
