//! `tokenar info --weights` on folders of checkpoints: what it finds in each, and what a folder
//! lacks to generate.

use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tokenar::model::{Family, GptConfig};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tokenar-info-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn parity() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

/// Exit status and stdout + stderr of `tokenar info ARGS`.
fn info(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenar")).arg("info").args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn copy_t5(dir: &Path) {
    std::fs::create_dir_all(dir.join("t5")).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(parity().join("t5_parity").join(f), dir.join("t5").join(f)).unwrap();
    }
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn info_lists_a_tokenizer_only_folder_and_what_it_lacks() {
    let d = tmp("vq");
    std::fs::copy(parity().join("vq_parity.pt"), d.join("vq_parity.pt")).unwrap();
    std::fs::write(d.join("notes.txt"), "not a checkpoint").unwrap();
    let (code, out) = info(&["--weights", s(&d)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("vq_parity.pt: VQ tokenizer (LlamaGen layout, read from its tensors): ch 32 x [1, 2, 1], 1/2 res blocks"), "{out}");
    assert!(out.contains("codebook 64 x 8"), "{out}");
    assert!(!out.contains("notes.txt"), "{out}");
    assert!(out.contains("this folder lacks a GPT") && out.contains("a text encoder"), "{out}");
    assert!(!out.contains("lacks a VQ"), "{out}");

    // One file, with a tokenizer preset that does not fit: exit 2 naming both.
    let (code, out) = info(&["--weights", s(&d.join("vq_parity.pt")), "--tokenizer-preset", "vq-16"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("preset `vq-16`") && out.contains("ch 32 x [1, 2, 1]"), "{out}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn info_describes_a_reference_gpt_a_training_checkpoint_and_unknown_files() {
    let d = tmp("gpt");
    // A LlamaGen t2i GPT as its .pt holds it (2 layers, dim 8, vocab 16, caption width 12).
    let (emb, wqkv, w1, fc1) = (zeros(&[16, 8]), zeros(&[24, 8]), zeros(&[32, 8]), zeros(&[8, 12]));
    let list: Vec<(&str, &Tensor)> = vec![
        ("tok_embeddings.weight", &emb),
        ("layers.0.attention.wqkv.weight", &wqkv),
        ("layers.1.attention.wqkv.weight", &wqkv),
        ("layers.0.feed_forward.w1.weight", &w1),
        ("cls_embedding.cap_proj.fc1.weight", &fc1),
    ];
    tokenar::weights::torch_zip::write_checkpoint(d.join("t2i_custom.pt"), Some("model"), &list).unwrap();
    // This project's training checkpoint, in its run folder.
    std::fs::create_dir_all(d.join("checkpoints")).unwrap();
    let meta = BTreeMap::from([
        ("train.step".to_string(), "5".to_string()),
        ("train.groups".to_string(), "[\"model\",\"text\"]".to_string()),
    ]);
    let t = std::collections::HashMap::from([("model/tok_embeddings.weight".to_string(), emb.clone())]);
    tokenar::weights::save_safetensors(d.join("checkpoints/ckpt-5.safetensors"), &t, &meta).unwrap();
    // Tensors of no known model.
    let u = std::collections::HashMap::from([("whatever".to_string(), zeros(&[3]))]);
    tokenar::weights::save_safetensors(d.join("other.safetensors"), &u, &BTreeMap::new()).unwrap();

    let (code, out) = info(&["--weights", s(&d)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("t2i_custom.pt: GPT (LlamaGen t2i, read from its tensors): 2 layers, dim 8, vocab 16, FFN 32, caption width 12"), "{out}");
    assert!(out.contains("checkpoints/ckpt-5.safetensors: training checkpoint of this project: step 5"), "{out}");
    assert!(out.contains("other.safetensors: unknown"), "{out}");
    assert!(!out.contains("looks like: unknown"), "{out}");
    assert!(out.contains("this folder lacks a VQ tokenizer") && out.contains("a text encoder"), "{out}");
    assert!(!out.contains("lacks a GPT") && !out.contains(", a GPT"), "{out}");

    // The training checkpoint alone.
    let (code, out) = info(&["--weights", s(&d.join("checkpoints/ckpt-5.safetensors"))]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("training checkpoint of this project: step 5, model groups [\"model\",\"text\"]"), "{out}");

    // An empty folder lacks everything; a missing path is an error.
    let e = tmp("empty");
    let (code, out) = info(&["--weights", s(&e)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no checkpoints") && out.contains("lacks a VQ tokenizer") && out.contains("a GPT") && out.contains("a text encoder"), "{out}");
    let (code, out) = info(&["--weights", s(&e.join("nope.pt"))]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("nope.pt"), "{out}");
    std::fs::remove_dir_all(&d).unwrap();
    std::fs::remove_dir_all(&e).unwrap();
}

#[test]
fn info_loads_a_complete_folder_without_presets() {
    let d = tmp("full");
    std::fs::copy(parity().join("vq_parity.pt"), d.join("vq_parity.pt")).unwrap();
    copy_t5(&d);
    let cfg = GptConfig { family: Family::LlamaGen, vocab_size: 64, caption_dim: 32, caption_len: 120, n_layer: 1, dim: 64, ..GptConfig::preset("tiny").unwrap() };
    let (gpt, vars) = tokenar::model::build(&cfg, &Device::Cpu, 0).unwrap();
    tokenar::model::save(&d.join("model.safetensors"), &gpt, &vars).unwrap();
    let (code, out) = info(&["--weights", s(&d)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("t5/: T5 text encoder: d_model 32, 2 layers, 4 heads"), "{out}");
    assert!(out.contains("model.safetensors: GPT (this project's): family LlamaGen"), "{out}");
    assert!(out.contains("to generate, `--weights"), "{out}");
    assert!(out.contains("tokenizer: ch 32 x [1, 2, 1]") && out.contains("text encoder: T5 (32-d, 120 rows, Left padding"), "{out}");

    // The same folder one level down is found as a bundle.
    let parent = tmp("parent");
    std::fs::rename(&d, parent.join("export")).unwrap();
    let (code, out) = info(&["--weights", s(&parent)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("export/vq_parity.pt: VQ tokenizer") && out.contains("export/: holds a whole bundle"), "{out}");
    std::fs::remove_dir_all(&parent).unwrap();
}

#[test]
fn info_refuses_a_metadata_config_larger_than_its_file() {
    let d = tmp("claims");
    let cfg = GptConfig::preset("tiny").unwrap();
    let (gpt, vars) = tokenar::model::build(&cfg, &Device::Cpu, 0).unwrap();
    let path = d.join("model.safetensors");
    tokenar::model::save(&path, &gpt, &vars).unwrap();
    // Rewrite the config in the metadata to claim a vocabulary of 500,000 (within the limits), tensors unchanged.
    let mut file = tokenar::weights::TensorFile::load(&path, &Device::Cpu).unwrap();
    let key = tokenar::model::load::CONFIG_KEY;
    let mut claimed: serde_json::Value = serde_json::from_str(&file.metadata[key]).unwrap();
    claimed["vocab_size"] = serde_json::json!(500_000);
    file.metadata.insert(key.to_string(), claimed.to_string());
    tokenar::weights::save_safetensors(&path, &file.tensors, &file.metadata).unwrap();
    let (code, out) = info(&["--weights", s(&path)]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("model.safetensors") && out.contains("holds only"), "{out}");
    std::fs::remove_dir_all(&d).unwrap();
}
