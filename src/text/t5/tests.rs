//! End-to-end tests of [`T5Encoder`] on a tiny random-weight T5 written with the Hugging Face
//! key names, a tiny WordLevel tokenizer and both padding conventions.

use super::*;
use candle_core::IndexOp;
use rand::Rng as _;
use std::collections::{BTreeMap, HashMap};

const D_MODEL: usize = 8;
const D_KV: usize = 4;
const HEADS: usize = 2;
const D_FF: usize = 12;
const LAYERS: usize = 2;
const BUCKETS: usize = 8;

fn words() -> Vec<String> {
    let mut w: Vec<String> = ["<pad>", "</s>", "<unk>"].iter().map(|s| s.to_string()).collect();
    w.extend(["a", "dog", "cat", "on", "the", "left", "of", "right", "mug"].iter().map(|s| s.to_string()));
    w
}

fn tokenizer_json() -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> =
        words().iter().enumerate().map(|(i, w)| (w.clone(), serde_json::json!(i))).collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<pad>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

fn config_json() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["T5ForConditionalGeneration"],
        "d_ff": D_FF, "d_kv": D_KV, "d_model": D_MODEL,
        "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
        "is_encoder_decoder": true, "layer_norm_epsilon": 1e-6, "model_type": "t5",
        "num_decoder_layers": LAYERS, "num_heads": HEADS, "num_layers": LAYERS,
        "pad_token_id": 0, "relative_attention_max_distance": 16,
        "relative_attention_num_buckets": BUCKETS, "tie_word_embeddings": false,
        "vocab_size": words().len()
    })
}

/// Random weights under the Hugging Face T5 encoder key names.
fn weights(seed: u64) -> HashMap<String, Tensor> {
    let mut rng = crate::util::rng(seed);
    let dev = Device::Cpu;
    let mut rand = |shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let inner = HEADS * D_KV;
    let mut w = HashMap::new();
    w.insert("shared.weight".to_string(), rand(&[words().len(), D_MODEL], 1.0));
    for i in 0..LAYERS {
        let p = format!("encoder.block.{i}.layer");
        for n in ["q", "k", "v"] {
            w.insert(format!("{p}.0.SelfAttention.{n}.weight"), rand(&[inner, D_MODEL], 0.5));
        }
        w.insert(format!("{p}.0.SelfAttention.o.weight"), rand(&[D_MODEL, inner], 0.5));
        if i == 0 {
            w.insert(format!("{p}.0.SelfAttention.relative_attention_bias.weight"), rand(&[BUCKETS, HEADS], 1.0));
        }
        w.insert(format!("{p}.0.layer_norm.weight"), (rand(&[D_MODEL], 0.1) + 1.0).unwrap());
        w.insert(format!("{p}.1.DenseReluDense.wi_0.weight"), rand(&[D_FF, D_MODEL], 0.5));
        w.insert(format!("{p}.1.DenseReluDense.wi_1.weight"), rand(&[D_FF, D_MODEL], 0.5));
        w.insert(format!("{p}.1.DenseReluDense.wo.weight"), rand(&[D_MODEL, D_FF], 0.5));
        w.insert(format!("{p}.1.layer_norm.weight"), (rand(&[D_MODEL], 0.1) + 1.0).unwrap());
    }
    w.insert("encoder.final_layer_norm.weight".to_string(), (rand(&[D_MODEL], 0.1) + 1.0).unwrap());
    w
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tokenar-t5-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Write a tiny T5 folder; `shards` > 1 splits the weights with an index file.
fn write_model(dir: &Path, shards: usize) {
    std::fs::write(dir.join("config.json"), config_json().to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    let w = weights(7);
    if shards == 1 {
        crate::weights::save_safetensors(dir.join("model.safetensors"), &w, &BTreeMap::new()).unwrap();
        return;
    }
    let mut keys: Vec<&String> = w.keys().collect();
    keys.sort();
    let mut weight_map = serde_json::Map::new();
    for s in 0..shards {
        let name = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let part: HashMap<String, Tensor> = keys
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == s)
            .map(|(_, k)| {
                weight_map.insert((*k).clone(), serde_json::json!(name));
                ((*k).clone(), w[*k].clone())
            })
            .collect();
        crate::weights::save_safetensors(dir.join(&name), &part, &BTreeMap::new()).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn prompts() -> Vec<String> {
    vec!["A dog on the left of a cat".to_string(), "mug".to_string(), "the zebra".to_string()]
}

#[test]
fn t5_left_and_right_padding_agree_after_shift() {
    let dir = temp_dir("pad");
    write_model(&dir, 1);
    let dev = Device::Cpu;
    let mut opts = T5Options::new(Padding::Left);
    opts.max_len = 10;
    let left = T5Encoder::load(&dir, opts.clone(), &dev).unwrap();
    opts.padding = Padding::Right;
    let right = T5Encoder::load(&dir, opts, &dev).unwrap();
    assert_eq!(left.dim(), D_MODEL);
    assert_eq!(left.max_len(), 10);
    // Lower-cased words, end-of-sequence appended, unknown words mapped to <unk>.
    assert_eq!(left.token_ids("A dog").unwrap(), vec![3, 4, 1]);
    assert_eq!(left.token_ids("the zebra").unwrap(), vec![7, 2, 1]);

    let (fl, ml) = left.encode(&prompts()).unwrap();
    let (fr, mr) = right.encode(&prompts()).unwrap();
    assert_eq!(fl.dims(), &[3, 10, D_MODEL]);
    assert_eq!(ml.dims(), &[3, 10]);
    let lens = [9usize, 2, 3];
    for (b, &n) in lens.iter().enumerate() {
        let ml_b = ml.i(b).unwrap().to_vec1::<f32>().unwrap();
        let mr_b = mr.i(b).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(ml_b.iter().sum::<f32>() as usize, n);
        assert!(ml_b[10 - n..].iter().all(|&m| m == 1.0) && mr_b[..n].iter().all(|&m| m == 1.0));
        // Padded rows are exactly zero.
        let pad_l = fl.i((b, 0..10 - n)).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let pad_r = fr.i((b, n..10)).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!((pad_l, pad_r), (0.0, 0.0));
        // Valid rows are non-zero and equal after shifting.
        let vl = fl.i((b, 10 - n..10)).unwrap();
        let vr = fr.i((b, 0..n)).unwrap();
        assert!(vl.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
        assert_eq!(vl.to_vec2::<f32>().unwrap(), vr.to_vec2::<f32>().unwrap());
    }
    // A prompt's features do not depend on the other prompts of the batch.
    let (alone, _) = right.encode(&prompts()[1..2]).unwrap();
    assert_eq!(alone.i(0).unwrap().to_vec2::<f32>().unwrap(), fr.i(1).unwrap().to_vec2::<f32>().unwrap());
    // Prompts of equal length share a forward pass; each still gets its own features.
    let same = vec!["a dog".to_string(), "the cat".to_string(), "left mug".to_string()];
    let (together, _) = right.encode(&same).unwrap();
    for (b, p) in same.iter().enumerate() {
        let alone = right.encode_one(p).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let t = together.i((b, 0..3)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(alone.iter().zip(&t).all(|(x, y)| (x - y).abs() < 1e-5), "{p}");
    }
    assert_ne!(together.i(0).unwrap().to_vec2::<f32>().unwrap(), together.i(1).unwrap().to_vec2::<f32>().unwrap());
    // The two tokens of "mug </s>" see each other: features differ from a lone "</s>".
    let mug = fr.i((1, 1)).unwrap().to_vec1::<f32>().unwrap();
    let eos = right.encode_one("").unwrap().i(0).unwrap().to_vec1::<f32>().unwrap();
    assert_ne!(mug, eos);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn t5_truncates_and_reads_shards() {
    let dir = temp_dir("shard");
    write_model(&dir, 2);
    let dev = Device::Cpu;
    let mut opts = T5Options::new(Padding::Right);
    opts.max_len = 6;
    let enc = T5Encoder::load(&dir, opts, &dev).unwrap();
    let long = vec!["a dog on the left of the right mug".to_string()];
    let ids = enc.token_ids(&long[0]).unwrap();
    // Truncated to 6 tokens with the end-of-sequence token kept last, as Hugging Face does.
    assert_eq!(ids, vec![3, 4, 6, 7, 8, 1]);
    let (f, m) = enc.encode(&long).unwrap();
    assert_eq!(f.dims(), &[1, 6, D_MODEL]);
    assert_eq!(m.to_vec2::<f32>().unwrap(), vec![vec![1.0; 6]]);

    // The sharded folder gives the same features as a single file.
    let single = temp_dir("single");
    write_model(&single, 1);
    let mut opts = T5Options::new(Padding::Right);
    opts.max_len = 6;
    let enc1 = T5Encoder::load(&single, opts, &dev).unwrap();
    let (f1, _) = enc1.encode(&long).unwrap();
    assert_eq!(f.to_vec3::<f32>().unwrap(), f1.to_vec3::<f32>().unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&single).unwrap();
}

#[test]
fn t5_errors_name_the_file() {
    let dir = temp_dir("err");
    let dev = Device::Cpu;
    let e = T5Encoder::load(&dir, T5Options::new(Padding::Left), &dev).err().unwrap().to_string();
    assert!(e.contains("config.json"), "{e}");
    write_model(&dir, 1);
    std::fs::write(dir.join("config.json"), "{\"d_model\": 3}").unwrap();
    let e = T5Encoder::load(&dir, T5Options::new(Padding::Left), &dev).err().unwrap().to_string();
    assert!(e.contains("config.json") && e.contains("not a T5 config"), "{e}");
    // A weight with the wrong shape is reported.
    write_model(&dir, 1);
    let mut cfg = config_json();
    cfg["d_ff"] = serde_json::json!(D_FF + 1);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let e = T5Encoder::load(&dir, T5Options::new(Padding::Left), &dev).err().unwrap().to_string();
    assert!(e.contains("do not match config.json"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn t5_matches_a_masked_batch_reference() {
    // Expected rows from an independent PyTorch re-implementation of the Hugging Face T5
    // encoder (relative buckets, T5 layer norm, gated-gelu, additive attention-mask bias), run
    // on these weights as one right-padded batch of length 10 with an attention mask.
    let dir = temp_dir("ref");
    write_model(&dir, 1);
    let mut opts = T5Options::new(Padding::Right);
    opts.max_len = 10;
    let enc = T5Encoder::load(&dir, opts, &Device::Cpu).unwrap();
    let (f, _) = enc.encode(&prompts()).unwrap();
    let cases: [((usize, usize), [f32; 8]); 4] = [
        ((0, 0), [0.696353, 0.034786, 0.818271, -1.2269, -0.250481, -2.122663, -0.095982, 0.895322]),
        ((0, 8), [-0.982839, -0.886014, 0.314994, -0.726074, -0.582473, -1.986842, -0.341556, 1.197087]),
        ((1, 1), [-1.451707, -1.418877, 0.516168, -0.200828, 0.61023, -0.331651, 0.945362, 1.592485]),
        ((2, 0), [-1.276813, -1.947293, 0.090224, 0.951547, -0.97939, 0.696221, -0.300558, 0.342392]),
    ];
    for ((b, r), want) in cases {
        let got = f.i((b, r)).unwrap().to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 2e-5, "prompt {b} row {r}: {got:?} vs {want:?}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn t5_encoded_pad_rows_follow_the_reference_batch() {
    let dir = temp_dir("enc");
    write_model(&dir, 1);
    let dev = Device::Cpu;
    let mut opts = T5Options::new(Padding::Right);
    opts.max_len = 10;
    let zero = T5Encoder::load(&dir, opts.clone(), &dev).unwrap();
    opts.pad_rows = PadRows::Encoded;
    let enc = T5Encoder::load(&dir, opts.clone(), &dev).unwrap();
    let (fz, _) = zero.encode(&prompts()).unwrap();
    let (fe, me) = enc.encode(&prompts()).unwrap();
    // Every row is read; the valid rows are what the prompt gets alone (the mask hides the
    // padding from them); the padded rows hold the encoder's outputs at `<pad>`.
    assert_eq!(me.to_vec2::<f32>().unwrap(), vec![vec![1f32; 10]; 3]);
    for (b, n) in [9usize, 2, 3].into_iter().enumerate() {
        let d = (fz.i((b, 0..n)).unwrap() - fe.i((b, 0..n)).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "prompt {b}: {d}");
        // The smallest |row| sum over the padded rows.
        let rows = fe.i((b, n..10)).unwrap().abs().unwrap().sum(1).unwrap().min_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(rows > 1e-3, "prompt {b}: a padded row is zero");
    }
    // Padded rows at different distances from the caption (other position buckets) differ.
    assert_ne!(fe.i((1, 2)).unwrap().to_vec1::<f32>().unwrap(), fe.i((1, 9)).unwrap().to_vec1::<f32>().unwrap());
    // Encoded padded rows belong to right padding only.
    opts.padding = Padding::Left;
    let e = T5Encoder::load(&dir, opts, &dev).err().unwrap().to_string();
    assert!(e.contains("right padding"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
