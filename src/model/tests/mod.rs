use super::*;
use crate::layout::{Scheme, SegmentKind};
use crate::sample::TokenModel;
use crate::weights::{torch_zip, TensorFile};
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng as _;

mod dtype;

/// A small configuration with every addition switched on.
fn tiny(scheme: Scheme) -> GptConfig {
    GptConfig {
        family: Family::Native,
        vocab_size: 64,
        n_layer: 2,
        n_head: 2,
        dim: 32,
        ffn_multiple_of: 16,
        rope_base: 10000.0,
        norm_eps: 1e-5,
        caption_dim: 12,
        caption_len: 5,
        max_refs: 3,
        background: true,
        n_instruct: 3,
        index_embedding: true,
        itd: true,
        cell_embedding: true,
        scheme,
        grid: (2, 4),
        ref_grid: None,
        img_uncond: true,
        align_dim: Some(6),
        dropouts: Dropouts::default(),
    }
}

fn rand_codes(rng: &mut crate::util::Rng, shape: &[usize], vocab: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn condition(cfg: &GptConfig, b: usize, n_refs: usize, seed: u64) -> (Condition, Tensor) {
    let mut rng = crate::util::rng(seed);
    let hw = cfg.image_tokens();
    let refs = rand_codes(&mut rng, &[b, n_refs, cfg.ref_tokens()], cfg.vocab_size);
    let bg = rand_codes(&mut rng, &[b, hw], cfg.vocab_size);
    let target = rand_codes(&mut rng, &[b, hw], cfg.vocab_size);
    let text = Tensor::randn(0f32, 1.0, (b, cfg.caption_len, cfg.caption_dim), &Device::Cpu).unwrap();
    // Row 0: two padded (left) caption positions; other rows full.
    let mut mask = vec![1f32; b * cfg.caption_len];
    mask[0] = 0.0;
    mask[1] = 0.0;
    let mask = Tensor::from_vec(mask, (b, cfg.caption_len), &Device::Cpu).unwrap();
    (Condition::new(refs, bg, text, Some(mask)), target)
}

/// Build with a non-zero output head (LlamaGen initialises it to zero).
fn model(cfg: &GptConfig, seed: u64) -> (TokenAr, candle_nn::VarMap) {
    let (m, vm) = build(cfg, &Device::Cpu, seed).unwrap();
    let data = vm.data().lock().unwrap();
    let out = &data["output.weight"];
    out.set(&Tensor::randn(0f32, 0.5, out.dims(), &Device::Cpu).unwrap()).unwrap();
    drop(data);
    (m, vm)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Decoding with the KV cache gives the logits of one full (training-path) forward pass, with
/// the fused CPU attention and with the composed one.
fn check_cache_matches_full(cfg: &GptConfig, n_refs: usize) {
    let (m, _vm) = model(cfg, 1);
    let (cond, target) = condition(cfg, 2, n_refs, 2);
    let mut rng = crate::util::rng(0);
    let (full, gen) = m.forward_train(&cond, &target, false, &mut rng).unwrap();
    let g = gen.dim(1).unwrap();
    assert_eq!(full.dims(), &[2, g, cfg.vocab_size]);

    for (cfg_guidance, fused) in [(false, true), (true, true), (false, false), (true, false)] {
        let (mut s, first) = m.start_with(&cond, cfg_guidance, fused).unwrap();
        let rows = s.rows();
        assert_eq!(rows, if cfg_guidance { 4 } else { 2 });
        let feed_rows = |t: &Tensor| if cfg_guidance { Tensor::cat(&[t, t], 0).unwrap() } else { t.clone() };
        let mut steps = vec![first.unsqueeze(1).unwrap()];
        // One token at a time for the first half, then a chunk of several.
        let half = (g - 1) / 2;
        for t in 0..half {
            steps.push(s.feed(&feed_rows(&gen.narrow(1, t, 1).unwrap())).unwrap());
        }
        steps.push(s.feed(&feed_rows(&gen.narrow(1, half, g - 1 - half).unwrap())).unwrap());
        assert_eq!(s.generated_len(), g - 1);
        let dec = Tensor::cat(&steps, 1).unwrap().narrow(0, 0, 2).unwrap();
        let d = max_diff(&dec, &full);
        assert!(d <= 1e-4, "cache vs full: {d} (cfg {cfg_guidance}, fused attention {fused})");
        if cfg_guidance {
            // The unconditional rows really differ (uncond text embedding).
            let u = Tensor::cat(&steps, 1).unwrap().narrow(0, 2, 2).unwrap();
            assert!(max_diff(&u, &full) > 1e-3);
        }
        // Rollback: truncate and feed again gives the same logits.
        s.truncate(1).unwrap();
        let again = s.feed(&feed_rows(&gen.narrow(1, 1, 1).unwrap())).unwrap();
        let d = max_diff(&again.narrow(0, 0, 2).unwrap(), &full.narrow(1, 2, 1).unwrap());
        assert!(d <= 1e-4, "after truncate: {d} (fused attention {fused})");
        // Only the last position's logits (the last block skips the others' outputs).
        s.truncate(1).unwrap();
        let last = s.feed_last(&feed_rows(&gen.narrow(1, 1, 3).unwrap())).unwrap();
        assert_eq!(last.dims(), &[rows, 1, cfg.vocab_size]);
        let d = max_diff(&last.narrow(0, 0, 2).unwrap(), &full.narrow(1, 4, 1).unwrap());
        assert!(d <= 1e-4, "last position only: {d} (fused attention {fused})");
        assert_eq!(s.generated_len(), 4);
        assert!(s.feed(&feed_rows(&gen)).is_err(), "feeding past the layout must fail");
    }
}

/// One condition's prefix run once and repeated for three samples decodes exactly as the
/// condition repeated three times in the batch.
#[test]
fn repeated_samples_equal_a_repeated_condition() {
    let cfg = tiny(Scheme::Tiles);
    let (m, _vm) = model(&cfg, 1);
    let (cond, target) = condition(&cfg, 2, 2, 3);
    // Sample 0 of the batch (its caption has two padded positions, so the key mask is
    // repeated too).
    let one = Condition::new(cond.refs.narrow(0, 0, 1).unwrap(), cond.background.narrow(0, 0, 1).unwrap(), cond.text.narrow(0, 0, 1).unwrap(), cond.text_mask.as_ref().map(|t| t.narrow(0, 0, 1).unwrap()));
    let three = |t: &Tensor| Tensor::cat(&[t, t, t], 0).unwrap();
    let rep = Condition::new(three(&one.refs), three(&one.background), three(&one.text), one.text_mask.as_ref().map(three));
    let gen = m.generated_tokens(&one, &target.narrow(0, 0, 1).unwrap(), &m.layout_for(&one).unwrap()).unwrap();
    for (cfg_guidance, fused) in [(true, true), (false, true), (true, false)] {
        let (mut a, fa) = m.start_with(&rep, cfg_guidance, fused).unwrap();
        let (mut b, fb) = m.start_with(&one, cfg_guidance, fused).unwrap();
        let fb = b.repeat_samples(3, &fb).unwrap();
        assert_eq!(b.rows(), a.rows());
        assert!(max_diff(&fa, &fb) <= 1e-5, "first logits (cfg {cfg_guidance}, fused {fused})");
        let rows = a.rows();
        let tokens = gen.narrow(1, 0, 3).unwrap().broadcast_as((rows, 3)).unwrap().contiguous().unwrap();
        let (la, lb) = (a.feed(&tokens).unwrap(), b.feed(&tokens).unwrap());
        assert!(max_diff(&la, &lb) <= 1e-5, "after feeding (cfg {cfg_guidance}, fused {fused})");
        assert!(b.repeat_samples(2, &lb.narrow(1, 0, 1).unwrap().squeeze(1).unwrap()).is_err(), "repeating after feeding must fail");
    }
    let (s, _) = m.start_samples(&one, true, 4).unwrap();
    assert_eq!(s.rows(), 8);
    let e = m.start_samples(&rep, true, 2).err().unwrap().to_string();
    assert!(e.contains("batch of 3"), "{e}");
    let (mut s, first) = m.start(&one, true).unwrap();
    assert!(s.repeat_samples(0, &first).is_err());
}

#[test]
fn kv_cache_decoding_equals_full_forward_tiles() {
    check_cache_matches_full(&tiny(Scheme::Tiles), 2);
}

#[test]
fn kv_cache_decoding_equals_full_forward_reference_scheme() {
    let cfg = tiny(Scheme::Reference { pad_to: Some(3), quirk_index: true });
    check_cache_matches_full(&cfg, 3);
}

/// References on a 1x2 grid beside 2x4 images: the cache decodes as the full forward, the
/// sequence and the null image have the reference grid's sizes, and a dropped image row's
/// prefix does not depend on its references (their null rows replace them).
#[test]
fn a_smaller_reference_grid_decodes_like_the_full_forward_and_drops_its_references() {
    let base = tiny(Scheme::Tiles);
    assert_eq!(base.null_image_rows(), base.cond_slots() * base.image_tokens());
    let cfg = GptConfig { ref_grid: Some((1, 2)), ..base };
    check_cache_matches_full(&cfg, 2);
    let (m, vm) = model(&cfg, 3);
    assert_eq!(vm.data().lock().unwrap()["img_uncond_embedding"].dims(), &[3 * 2 + 8, cfg.dim]);
    // Slot i's null image starts at 2i, the background's after the three slots.
    assert_eq!([0, 1, 2].map(|i| cfg.null_image_offset(Some(i))), [0, 2, 4]);
    assert_eq!(cfg.null_image_offset(None), 6);
    let (mut cond, target) = condition(&cfg, 2, 2, 4);
    cond.drop_image = vec![false, true];
    let layout = m.layout_for(&cond).unwrap();
    assert_eq!(layout.generated_len(), 2 * 2 + 8);
    let run = |c: &Condition| m.forward_train_full(c, &target, false, &mut crate::util::rng(0)).unwrap();
    let a = run(&cond);
    assert_eq!(a.targets.dims(), &[2, 12]);
    let mut other = cond.clone();
    other.refs = condition(&cfg, 2, 2, 6).0.refs;
    let b = run(&other);
    // The first loss position is the prefix's last: row 1 (images dropped) is unchanged.
    let last_prefix = |o: &crate::model::gpt::TrainOutput, r: usize| o.hidden.get(r).unwrap().get(0).unwrap();
    assert!(max_diff(&last_prefix(&a, 1), &last_prefix(&b, 1)) == 0.0);
    assert!(max_diff(&last_prefix(&a, 0), &last_prefix(&b, 0)) > 1e-4);
    // Reference codes of the image grid's size are refused with both sizes named.
    let (wrong, _) = condition(&GptConfig { ref_grid: None, ..cfg.clone() }, 1, 2, 5);
    let e = m.layout_for(&wrong).unwrap_err().to_string();
    assert!(e.contains("8 tokens") && e.contains("(1, 2)"), "{e}");
}

#[test]
fn every_trainable_variable_gets_a_gradient() {
    let cfg = tiny(Scheme::Tiles);
    let (m, vm) = model(&cfg, 3);
    let (mut cond, target) = condition(&cfg, 3, 3, 4);
    // Row 1 drops its text, row 2 its images (CFG dropout); row 0 keeps both.
    cond.drop_text = vec![false, true, false];
    cond.drop_image = vec![false, false, true];
    let mut rng = crate::util::rng(5);
    let out = m.forward_train_full(&cond, &target, true, &mut rng).unwrap();
    let (b, n) = out.targets.dims2().unwrap();
    // ITD: loss over the 3 reference copies and the target.
    assert_eq!(n, 4 * cfg.image_tokens());
    let nll = m.token_nll(&out.hidden, &out.targets).unwrap();
    assert_eq!(nll.dims(), &[b, n]);
    let ce = nll.mean_all().unwrap();
    let align = m.align(&out.target_features).unwrap();
    assert_eq!(align.dims(), &[3, 2, 6]);
    let loss = (ce + align.sqr().unwrap().mean_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let vars: Vec<(String, Var)> = crate::nn::named_vars(&vm).into_iter().filter(|(k, _)| !TokenAr::is_buffer(k)).collect();
    assert!(vars.len() > 15);
    let missing = crate::nn::vars_without_grad(&vars, &grads).unwrap();
    assert!(missing.is_empty(), "no gradient: {missing:?}");
    // Buffers are detached.
    for name in BUFFERS {
        let data = vm.data().lock().unwrap();
        assert!(grads.get(data[name].as_tensor()).is_none(), "{name} got a gradient");
    }
}

#[test]
fn dropout_is_seeded_and_only_in_training() {
    let cfg = tiny(Scheme::Tiles);
    let (m, _vm) = model(&cfg, 3);
    let (cond, target) = condition(&cfg, 1, 1, 4);
    let run = |train, seed| m.forward_train(&cond, &target, train, &mut crate::util::rng(seed)).unwrap().0;
    assert_eq!(max_diff(&run(true, 7), &run(true, 7)), 0.0);
    assert!(max_diff(&run(true, 7), &run(true, 8)) > 0.0);
    assert_eq!(max_diff(&run(false, 7), &run(false, 8)), 0.0);
}

#[test]
fn cell_embedding_marks_each_image_cell_and_nothing_else() {
    let cfg = tiny(Scheme::Tiles);
    let (m, vm) = model(&cfg, 2);
    let layout = m.layout_for(&condition(&cfg, 1, 2, 1).0).unwrap();
    let (h, w) = cfg.grid;
    let cells = layout.image_cells();
    for seg in layout.segments() {
        for j in 0..seg.len {
            let want = (!matches!(seg.kind, SegmentKind::Text | SegmentKind::Instruct)).then_some((j / w, j % w));
            assert_eq!(cells[seg.start + j], want, "{:?} {j}", seg.kind);
        }
    }
    // Same token everywhere: what is added is row r's plus column c's vector, zero elsewhere.
    let table = vm.data().lock().unwrap()["cell_embeddings.weight"].as_tensor().clone();
    assert_eq!(table.dims(), &[h + w, cfg.dim]);
    let start = layout.prefix_len();
    let tokens = Tensor::zeros((1, layout.generated_len()), DType::U32, &Device::Cpu).unwrap();
    let plain = m.embed_tokens(&tokens).unwrap();
    let added = (m.embed_generated(&tokens, &layout, start).unwrap() - &plain).unwrap().squeeze(0).unwrap();
    for j in 0..layout.generated_len() {
        let (r, c) = cells[start + j].unwrap();
        let want = (table.get(r).unwrap() + table.get(h + c).unwrap()).unwrap();
        assert!(max_diff(&added.get(j).unwrap(), &want) < 1e-7, "position {j}");
    }
    let e = m.embed_generated(&tokens, &layout, start + 1).err().unwrap().to_string();
    assert!(e.contains("beyond"), "{e}");
    let mut no_cells = cfg.clone();
    no_cells.cell_embedding = false;
    let (m2, _) = model(&no_cells, 2);
    assert_eq!(max_diff(&m2.embed_generated(&tokens, &layout, start).unwrap(), &m2.embed_tokens(&tokens).unwrap()), 0.0);
}

#[test]
fn index_embedding_distinguishes_reference_order() {
    let base = tiny(Scheme::Tiles);
    let (m, _) = model(&base, 9);
    let (cond, target) = condition(&base, 1, 2, 10);
    let mut rng = crate::util::rng(0);
    let (l, _) = m.forward_train(&cond, &target, false, &mut rng).unwrap();
    // Swapping the two references changes the prediction only through the index embedding.
    let swapped = Tensor::cat(&[cond.refs.narrow(1, 1, 1).unwrap(), cond.refs.narrow(1, 0, 1).unwrap()], 1).unwrap();
    let cond2 = Condition { refs: swapped, ..cond.clone() };
    let mut cfg_off = base.clone();
    cfg_off.itd = false;
    let (m_off, _) = model(&cfg_off, 9);
    let (a, _) = m_off.forward_train(&cond, &target, false, &mut rng).unwrap();
    let (b, _) = m_off.forward_train(&cond2, &target, false, &mut rng).unwrap();
    assert!(max_diff(&a, &b) > 1e-4);
    assert_eq!(l.dim(1).unwrap(), 3 * base.image_tokens());
    assert_eq!(a.dim(1).unwrap(), base.image_tokens());
}

#[test]
fn padded_scheme_requires_its_slots() {
    let cfg = tiny(Scheme::Reference { pad_to: Some(3), quirk_index: true });
    let (m, _) = model(&cfg, 1);
    let (cond, _) = condition(&cfg, 1, 2, 2);
    let err = m.start(&cond, false).err().expect("2 refs for 3 slots must fail").to_string();
    assert!(err.contains("3 reference slots"), "{err}");
    let grey = Tensor::from_vec(vec![5u32; cfg.image_tokens()], cfg.image_tokens(), &Device::Cpu).unwrap();
    let padded = cond.pad_refs(3, &grey).unwrap();
    assert_eq!(padded.refs.dims(), &[1, 3, cfg.image_tokens()]);
    assert!(m.start(&padded, false).is_ok());
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tokenar-model-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn checkpoint_round_trips_reproduce_logits() {
    let cfg = tiny(Scheme::Reference { pad_to: Some(3), quirk_index: true });
    let (m, vm) = model(&cfg, 11);
    let (cond, target) = condition(&cfg, 1, 3, 12);
    let mut rng = crate::util::rng(0);
    let (want, _) = m.forward_train(&cond, &target, false, &mut rng).unwrap();

    // As a torch checkpoint under "model" with the reference key names.
    let tensors = crate::weights::varmap_tensors(&vm);
    let mut named: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    named.sort_by_key(|(k, _)| *k);
    for key in ["tok_embeddings.weight", "layers.1.attention.wqkv.weight", "ref_index_embeddings.weight", "instruct_token_embeddings.weight", "cls_embedding.cap_proj.fc1.weight", "alignment.weight"] {
        assert!(tensors.contains_key(key), "{key}");
    }
    assert_eq!(tensors["instruct_token_embeddings.weight"].dims(), &[1, 3 * 32]);
    let pt = tmp("ref.pt");
    torch_zip::write_checkpoint(&pt, Some("model"), &named).unwrap();
    let file = TensorFile::load(&pt, &Device::Cpu).unwrap();
    let (m2, vm2, report) = load::load_with_config(&mut file.clone(), &cfg, &Device::Cpu).unwrap();
    assert!(report.fresh.is_empty() && report.unused.is_empty(), "{report:?}");
    let (got, _) = m2.forward_train(&cond, &target, false, &mut rng).unwrap();
    assert!(max_diff(&got, &want) <= 1e-6);
    // A loaded model is for inference: its outputs record no backprop graph (which would keep
    // every activation alive), while the model it was saved from (built to train) does.
    assert!(!got.track_op() && want.track_op());

    // As this project's safetensors: the config travels in the metadata.
    let st = tmp("own.safetensors");
    save(&st, &m2, &vm2).unwrap();
    let (m3, _, report) = load(&st, None, &Device::Cpu).unwrap();
    assert!(report.fresh.is_empty());
    assert_eq!(m3.config(), &cfg);
    let (got, _) = m3.forward_train(&cond, &target, false, &mut rng).unwrap();
    assert!(max_diff(&got, &want) <= 1e-6);
    // And the decoding path agrees after loading.
    let (_, first) = m3.start(&cond, false).unwrap();
    assert!(max_diff(&first, &want.narrow(1, 0, 1).unwrap().squeeze(1).unwrap()) <= 1e-4);
}

#[test]
fn llamagen_checkpoint_into_tokenar_reports_fresh_keys() {
    let full = tiny(Scheme::Tiles);
    let plain = full.without_additions();
    let (_, vm) = model(&plain, 1);
    let tensors = crate::weights::varmap_tensors(&vm);
    assert!(tensors.keys().all(|k| k == "tok_embeddings.weight" || k.starts_with("layers.") || k.starts_with("cls_embedding.") || k == "norm.weight" || k == "output.weight"));
    assert!(tensors.keys().all(|k| !ADDITIONS.iter().any(|a| k.starts_with(a))));
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let pt = tmp("llamagen.pt");
    torch_zip::write_checkpoint(&pt, Some("model"), &named).unwrap();
    let file = TensorFile::load(&pt, &Device::Cpu).unwrap();
    let (m, vm2, report) = load::load_with_config(&mut file.clone(), &full, &Device::Cpu).unwrap();
    let mut fresh = report.fresh.clone();
    fresh.sort();
    assert_eq!(
        fresh,
        vec!["alignment.bias", "alignment.weight", "cell_embeddings.weight", "img_uncond_embedding", "instruct_token_embeddings.weight", "ref_index_embeddings.weight"]
    );
    // Each addition's parameters are fresh, and nothing else is.
    assert!(ADDITIONS.iter().all(|a| fresh.iter().any(|f| f.starts_with(a))));
    assert_eq!(report.loaded.len(), tensors.len());
    // The shared weights were loaded; the fresh ones follow LlamaGen's rules (biases 0,
    // weights N(0, 0.02)), not the zeros the model is built with before loading.
    let var = |n: &str| vm2.data().lock().unwrap()[n].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let a = vm2.data().lock().unwrap()["layers.0.attention.wqkv.weight"].as_tensor().clone();
    assert_eq!(max_diff(&a, &tensors["layers.0.attention.wqkv.weight"]), 0.0);
    assert!(var("alignment.bias").iter().all(|&x| x == 0.0));
    let w = var("instruct_token_embeddings.weight");
    let sd = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
    assert!(w.len() >= 64 && (0.012..0.03).contains(&sd), "{} values, sd {sd}", w.len());
    // Loading again gives the same fresh values (seeded).
    let (_, vm3, _) = load::load_with_config(&mut file.clone(), &full, &Device::Cpu).unwrap();
    assert_eq!(vm3.data().lock().unwrap()["instruct_token_embeddings.weight"].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), w);
    let (cond, target) = condition(&full, 1, 2, 3);
    assert!(m.forward_train(&cond, &target, false, &mut crate::util::rng(0)).is_ok());

    // Mismatches are errors that name the key.
    let mut bad = file.clone();
    bad.tensors.insert("norm.weight".into(), Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap());
    let e = load::load_with_config(&mut bad, &full, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("norm.weight") && e.contains("[7]"), "{e}");
    let mut extra = file.clone();
    extra.tensors.insert("mystery.weight".into(), Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap());
    let e = load::load_with_config(&mut extra, &full, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("mystery.weight"), "{e}");
    let mut missing = file.clone();
    missing.tensors.remove("layers.1.feed_forward.w2.weight");
    let e = load::load_with_config(&mut missing, &full, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("layers.1.feed_forward.w2.weight"), "{e}");
    // A file without config needs a preset.
    assert!(load(&pt, None, &Device::Cpu).is_err());
}

#[test]
fn kv_cache_decoding_equals_full_forward_llamagen_and_editar() {
    let reference = Scheme::Reference { pad_to: None, quirk_index: false };
    let t2i = tiny(reference).without_additions();
    check_cache_matches_full(&t2i, 0);
    let editar = GptConfig { family: Family::EditAr, background: true, img_uncond: true, ..t2i };
    check_cache_matches_full(&editar, 0);
}
