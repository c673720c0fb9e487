//! Parity with the reference code for the image tokenizer and the text encoder, on the
//! fixtures of `parity/vq_parity.py` (LlamaGen's VQ-VAE at a shape no preset has) and
//! `parity/t5_parity.py` (Hugging Face's T5 encoder, padded as LlamaGen and as EditAR /
//! TokenAR pad). Everything is loaded the way `--weights DIR` loads it: a bundle folder,
//! no preset.

use candle_core::{DType, Device, IndexOp, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenar::model::{Family, GptConfig};
use tokenar::pipeline::bundle::{LoadHints, TextModel};
use tokenar::pipeline::Bundle;
use tokenar::weights::TensorFile;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn io(name: &str) -> TensorFile {
    TensorFile::load(fixtures().join(name), &Device::Cpu).unwrap()
}

fn tensor<'a>(f: &'a TensorFile, key: &str) -> &'a Tensor {
    f.tensors.get(key).unwrap_or_else(|| panic!("{} has no `{key}`", f.path.display()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// A bundle folder as a user has it: the LlamaGen VQ `.pt`, the T5 folder as `t5/`, and a small
/// GPT of `family` (built here: its vocabulary is the codebook, its caption width T5's).
fn bundle_dir(tag: &str, family: Family) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tokenar-parity-vq-t5-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("t5")).unwrap();
    std::fs::copy(fixtures().join("vq_parity.pt"), dir.join("vq_parity.pt")).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixtures().join("t5_parity").join(f), dir.join("t5").join(f)).unwrap();
    }
    let cfg = GptConfig { family, vocab_size: 64, caption_dim: 32, caption_len: 120, n_layer: 1, dim: 64, ..GptConfig::preset("tiny").unwrap() };
    let (gpt, vars) = tokenar::model::build(&cfg, &Device::Cpu, 0).unwrap();
    tokenar::model::save(&dir.join("model.safetensors"), &gpt, &vars).unwrap();
    dir
}

#[test]
fn vq_codes_and_pixels_match_llamagen() {
    let dir = bundle_dir("vq", Family::LlamaGen);
    let bundle = Bundle::load(&dir, &LoadHints::default(), &Device::Cpu).unwrap();
    let f = io("vq_parity_io.safetensors");
    let meta = |k: &str| f.metadata.get(k).unwrap_or_else(|| panic!("metadata `{k}`")).clone();
    // The architecture, read from the checkpoint's tensors.
    let cfg = bundle.vq.config();
    assert_eq!(cfg.ch.to_string(), meta("ch"));
    assert_eq!(serde_json::to_string(&cfg.ch_mult).unwrap().replace(',', ", "), meta("ch_mult"));
    assert_eq!(cfg.enc_res_blocks.to_string(), meta("enc_res_blocks"));
    assert_eq!(cfg.dec_res_blocks.to_string(), meta("dec_res_blocks"));
    assert_eq!(cfg.z_channels.to_string(), meta("z_channels"));
    assert_eq!((cfg.codebook_size.to_string(), cfg.codebook_dim.to_string()), (meta("codebook_size"), meta("codebook_dim")));
    assert_eq!(cfg.preset_name(), None);

    // Codes: exactly the reference's (its nearest codes are at least `min_code_gap` apart).
    let images = tensor(&f, "images");
    let codes = bundle.vq.encode(images).unwrap();
    let want = tensor(&f, "codes").to_dtype(DType::U32).unwrap();
    assert_eq!(codes.to_vec3::<u32>().unwrap(), want.to_vec3::<u32>().unwrap());

    // Pixels decoded from the reference's codes.
    let pixels = bundle.vq.decode(&want).unwrap();
    let diff = max_abs_diff(&pixels, tensor(&f, "pixels"));
    eprintln!("VQ parity: {} codes equal, decoded pixels max |diff| {diff:.3e}", want.elem_count());
    assert!(diff <= 1e-4, "decoded pixels differ by {diff}");

    // A tokenizer preset is a check of the file's shapes.
    let hints = LoadHints { tokenizer_preset: Some("vq-16".into()), ..Default::default() };
    let e = Bundle::load(&dir, &hints, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("vq_parity.pt") && e.contains("preset `vq-16`") && e.contains("ch 32 x [1, 2, 1]"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn prompts(f: &TensorFile) -> Vec<String> {
    serde_json::from_str(&f.metadata["prompts"]).unwrap()
}

fn t5_of(b: &Bundle) -> &tokenar::text::T5Encoder {
    match &b.text {
        TextModel::T5(t) => t,
        TextModel::Builtin(_) => panic!("the bundle did not load the t5/ folder"),
    }
}

#[test]
fn t5_ids_and_llamagen_rows_match_the_reference() {
    let f = io("t5_parity_io.safetensors");
    let dir = bundle_dir("t5-llamagen", Family::LlamaGen);
    let bundle = Bundle::load(&dir, &LoadHints::default(), &Device::Cpu).unwrap();
    let prompts = prompts(&f);
    // Token ids: the reference tokenizer's valid ids (end-of-sequence included, truncated).
    let ids = tensor(&f, "ids").to_vec2::<i64>().unwrap();
    let mask = tensor(&f, "attention_mask").to_vec2::<i64>().unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let n = mask[i].iter().sum::<i64>() as usize;
        let want: Vec<u32> = ids[i][..n].iter().map(|&v| v as u32).collect();
        assert_eq!(t5_of(&bundle).token_ids(p).unwrap(), want, "prompt {i}");
    }
    // LlamaGen: valid rows last, the rest zero and masked.
    let (feat, m) = bundle.text.encode(&prompts, 120).unwrap();
    let want_mask = tensor(&f, "llamagen_mask").to_dtype(DType::F32).unwrap();
    assert_eq!(m.to_vec2::<f32>().unwrap(), want_mask.to_vec2::<f32>().unwrap());
    let diff = max_abs_diff(&feat, tensor(&f, "llamagen"));
    eprintln!("T5 parity (LlamaGen, left padding): max |diff| {diff:.3e}");
    assert!(diff <= 1e-4, "LlamaGen rows differ by {diff}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn t5_tokenar_rows_match_the_reference_padded_rows_included() {
    let f = io("t5_parity_io.safetensors");
    let prompts = prompts(&f);
    let hidden = tensor(&f, "hidden");
    let mut diffs = HashMap::new();
    for (tag, family) in [("editar", Family::EditAr), ("tokenar", Family::TokenAr)] {
        let dir = bundle_dir(&format!("t5-{tag}"), family);
        let bundle = Bundle::load(&dir, &LoadHints::default(), &Device::Cpu).unwrap();
        let (feat, m) = bundle.text.encode(&prompts, 120).unwrap();
        // Every row is read by the model, as in the reference.
        assert_eq!(m.to_vec2::<f32>().unwrap(), vec![vec![1f32; 120]; prompts.len()]);
        let diff = max_abs_diff(&feat, hidden);
        assert!(diff <= 1e-4, "{tag}: rows differ by {diff}");
        // The padded rows are the encoder's outputs at `<pad>`, not zero.
        let pad = feat.i((1, 2..120)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(pad > 0.1, "{tag}: padded rows are {pad}");
        diffs.insert(tag, diff);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("T5 parity (EditAR / TokenAR, right padding, padded rows encoded): max |diff| {diffs:?}");
}
