//! Parity with the reference code (LlamaGen t2i, EditAR, TokenAR): the fixtures under
//! `tests/fixtures/parity/gpt_*` hold checkpoints saved by the reference models with small
//! random weights and non-preset shapes, their inputs, teacher-forced logits and greedy tokens
//! (written by `parity/gpt_parity.py`; see `parity/README.md`). Each checkpoint is loaded as a
//! user's `--weights` folder loads it: the `.pt` reader and the shape inference, no preset.

use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokenar::model::{Condition, TokenAr};
use tokenar::sample::{self, DecodePlan, ItdMode, SampleOptions, TokenModel};
use tokenar::weights::TensorFile;

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity").join(name)
}

/// A family's fixture: tensors and the JSON metadata.
struct Fixture {
    tensors: TensorFile,
    meta: BTreeMap<String, serde_json::Value>,
}

impl Fixture {
    fn open(stem: &str) -> Self {
        let tensors = TensorFile::load(fixture(&format!("{stem}.safetensors")), &Device::Cpu).unwrap();
        let meta = tensors.metadata.iter().map(|(k, v)| (k.clone(), serde_json::from_str(v).unwrap())).collect();
        Self { tensors, meta }
    }
    fn get(&self, key: &str) -> Tensor {
        self.tensors.tensors.get(key).unwrap_or_else(|| panic!("fixture has no `{key}`")).clone()
    }
    fn codes(&self, key: &str) -> Tensor {
        self.get(key).to_dtype(DType::U32).unwrap()
    }
    fn arg(&self, key: &str) -> usize {
        self.meta["model_args"][key].as_u64().unwrap_or_else(|| panic!("model_args.{key}")) as usize
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap()
}

/// Load the family's `.pt` as `generate --weights` does without `--preset` and check the
/// architecture read from its shapes against the reference's ModelArgs.
fn load_model(stem: &str, f: &Fixture, grid: Option<usize>) -> TokenAr {
    let (model, _, report) = tokenar::model::load_with_hints(&fixture(&format!("{stem}.pt")), None, grid, &Device::Cpu).unwrap();
    assert!(report.fresh.is_empty(), "{stem}: fresh {:?}", report.fresh);
    let c = model.config();
    let side = (f.arg("block_size") as f64).sqrt() as usize;
    assert_eq!(
        (c.dim, c.n_layer, c.n_head, c.vocab_size, c.caption_dim, c.caption_len, c.grid),
        (f.arg("dim"), f.arg("n_layer"), f.arg("n_head"), f.arg("vocab_size"), f.arg("caption_dim"), f.arg("cls_token_num"), (side, side)),
        "{stem}"
    );
    let mult = f.arg("multiple_of");
    assert_eq!(c.ffn_hidden(), (2 * 4 * c.dim / 3).div_ceil(mult) * mult, "{stem}");
    model
}

/// The fixture's condition (batch 2).
fn condition(f: &Fixture, model: &TokenAr) -> Condition {
    let text = f.get("caption");
    let b = text.dim(0).unwrap();
    let hw = model.config().image_tokens();
    let refs = match f.tensors.tensors.get("refs") {
        Some(r) => r.to_dtype(DType::U32).unwrap(),
        None => Tensor::zeros((b, 0, hw), DType::U32, &Device::Cpu).unwrap(),
    };
    let background = match f.tensors.tensors.get("background") {
        Some(bg) => bg.to_dtype(DType::U32).unwrap(),
        None => Tensor::zeros((b, hw), DType::U32, &Device::Cpu).unwrap(),
    };
    // LlamaGen masks the padded caption rows; EditAR / TokenAR attend to every row.
    let mask = f.tensors.tensors.get("caption_mask").cloned();
    Condition::new(refs, background, text, mask)
}

/// Teacher-forced logits through the training forward and through the KV-cache session,
/// against the reference's training forward. Returns the two largest differences.
fn check_logits(stem: &str, model: &TokenAr, cond: &Condition, f: &Fixture) -> (f32, f32) {
    let want = f.get("logits.train");
    let target = f.codes("target");
    let (train, targets) = model.forward_train(cond, &target, false, &mut tokenar::util::rng(0)).unwrap();
    let d_train = max_diff(&train, &want);

    let (mut session, first) = model.start(cond, false).unwrap();
    let n = targets.dim(1).unwrap();
    let rest = session.feed(&targets.narrow(1, 0, n - 1).unwrap()).unwrap();
    let kv = Tensor::cat(&[first.unsqueeze(1).unwrap(), rest], 1).unwrap();
    let d_kv = max_diff(&kv, &want);
    eprintln!("{stem}: max |logit difference| training path {d_train:.2e}, KV-cache path {d_kv:.2e} (logits up to {:.2})", want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap());
    assert!(d_train <= TOL && d_kv <= TOL, "{stem}: training {d_train}, KV cache {d_kv}");
    (d_train, d_kv)
}

/// The reference's training forward with its CFG dropout drawn: row 0 without the condition
/// images (img_uncond_embedding), row 1 without the caption (uncond_embedding).
fn check_dropped(stem: &str, model: &TokenAr, cond: &Condition, f: &Fixture) {
    let flags = |k: &str| f.meta["dropped"][k].as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect::<Vec<_>>();
    let mut cond = cond.clone();
    cond.drop_image = flags("drop_image");
    cond.drop_text = flags("drop_text");
    let (logits, _) = model.forward_train(&cond, &f.codes("target"), false, &mut tokenar::util::rng(0)).unwrap();
    let d = max_diff(&logits, &f.get("logits.train_dropped"));
    eprintln!("{stem}: CFG-dropout training forward, max |logit difference| {d:.2e}");
    assert!(d <= TOL, "{stem}: dropped rows differ by {d}");
}

/// Greedy decoding (top-k 1) at every fixture run (cfg 1, cfg > 1, cfg_interval) through the
/// sampler, token for token against the reference's `generate` (all generated tokens: with ITD
/// the references' copies, then the target).
fn check_greedy(stem: &str, model: &TokenAr, cond: &Condition, f: &Fixture, itd: ItdMode) -> usize {
    let b = cond.batch().unwrap();
    let hw = model.config().image_tokens();
    let known: Vec<Vec<u32>> = rows(&cond.refs.reshape((b, ())).unwrap());
    let mut checked = 0;
    for run in f.meta["runs"].as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let opts = SampleOptions {
            cfg_scale: run["cfg_scale"].as_f64().unwrap() as f32,
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            seed: 0,
            cfg_interval: run["cfg_interval"].as_u64().map(|i| i as usize),
        };
        let (mut session, first) = model.start(cond, opts.guides()).unwrap();
        let plan = DecodePlan { known: if itd == ItdMode::Off { vec![Vec::new(); b] } else { known.clone() }, n_target: hw, itd };
        let out = sample::generate(&mut session, &first, &plan, &opts, &mut opts.rng(), None).unwrap();
        let got: Vec<Vec<u32>> = out.prefix.iter().zip(&out.target).map(|(p, t)| [p.as_slice(), t.as_slice()].concat()).collect();
        let want = rows(&f.get(&format!("tokens.{name}")));
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            let first_diff = g.iter().zip(w).position(|(a, b)| a != b);
            assert_eq!(g.len(), w.len(), "{stem} {name} row {r}");
            assert!(first_diff.is_none(), "{stem} {name} ({itd:?}) row {r}: first difference at token {first_diff:?}\n got {g:?}\nwant {w:?}");
            checked += g.len();
        }
    }
    eprintln!("{stem}: greedy {itd:?}: {checked} of {checked} tokens agree");
    checked
}

#[test]
fn llamagen_t2i_matches_reference() {
    let f = Fixture::open("gpt_t2i");
    // A t2i checkpoint does not record its grid: the user names it (`--grid`).
    let model = load_model("gpt_t2i", &f, Some(4));
    assert_eq!(model.config().family, tokenar::model::Family::LlamaGen);
    let cond = condition(&f, &model);
    check_logits("gpt_t2i", &model, &cond, &f);
    check_greedy("gpt_t2i", &model, &cond, &f, ItdMode::Off);
}

#[test]
fn editar_matches_reference() {
    let f = Fixture::open("gpt_editar");
    let model = load_model("gpt_editar", &f, None);
    let c = model.config();
    assert_eq!((c.family, c.max_refs, c.background, c.n_instruct, c.index_embedding, c.itd), (tokenar::model::Family::EditAr, 0, true, 0, false, false));
    let cond = condition(&f, &model);
    check_logits("gpt_editar", &model, &cond, &f);
    check_dropped("gpt_editar", &model, &cond, &f);
    check_greedy("gpt_editar", &model, &cond, &f, ItdMode::Off);
}

#[test]
fn tokenar_itd_matches_reference_training_forward() {
    let f = Fixture::open("gpt_tokenar");
    let model = load_model("gpt_tokenar", &f, None);
    let c = model.config();
    assert_eq!((c.family, c.max_refs, c.cond_slots(), c.n_instruct, c.index_embedding, c.itd), (tokenar::model::Family::TokenAr, 3, 4, 4, true, true));
    let cond = condition(&f, &model);
    // The whole ITD sequence (3 references, then the target) teacher-forced, index embedding
    // included on both paths (the reference's inference leaves it out; see parity/README.md).
    check_logits("gpt_tokenar", &model, &cond, &f);
    check_dropped("gpt_tokenar", &model, &cond, &f);
    // Naive ITD decodes every position as the reference's generate does; exact ITD's draft
    // verification gives the same tokens when decoding is greedy.
    let n = check_greedy("gpt_tokenar", &model, &cond, &f, ItdMode::Naive);
    assert_eq!(n, 3 * 2 * 64);
    check_greedy("gpt_tokenar", &model, &cond, &f, ItdMode::Exact);
}

#[test]
fn a_named_preset_is_checked_against_the_file() {
    let pt = fixture("gpt_tokenar.pt");
    let e = tokenar::model::load(&pt, Some("tokenar-xl"), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("gpt_tokenar.pt") && e.contains("tokenar-xl") && e.contains("width 64 in the file, 1280 in the preset"), "{e}");
    // A grid that contradicts the file's tensors.
    let e = tokenar::model::load_with_hints(&pt, None, Some(8), &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("4x4") && e.contains("8x8"), "{e}");
}

/// A bundle folder holding the t2i fixture checkpoint, a random tokenizer with its vocabulary
/// (4x downsampling: 16 px images) and a built-in text encoder of its caption width.
fn t2i_bundle(dir: &Path) {
    use candle_nn::{VarBuilder, VarMap};
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(fixture("gpt_t2i.pt"), dir.join("t2i_custom.pt")).unwrap();
    let mut vq = tokenar::tokenizer::VqConfig::preset("vq-tiny").unwrap();
    vq.ch_mult = vec![1, 2, 2];
    vq.codebook_size = 160;
    let (_, vars) = tokenar::tokenizer::build(&vq, &Device::Cpu, 0).unwrap();
    tokenar::tokenizer::save(&dir.join("tokenizer.safetensors"), &vq, &vars).unwrap();
    let vm = VarMap::new();
    let words = tokenar::text::WordVocab::build(&["a red cube left of a blue ball"], 1, 100);
    let cfg = tokenar::text::BuiltinConfig { dim: 48, n_layer: 1, n_head: 2, max_len: 8, mlp_ratio: 2, norm_eps: 1e-5 };
    let enc = tokenar::text::BuiltinTextEncoder::new(cfg, words, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu).pp(tokenar::pipeline::bundle::TEXT_PREFIX)).unwrap();
    tokenar::pipeline::bundle::save_builtin_text(&dir.join("text.safetensors"), &enc, &vm).unwrap();
}

#[test]
fn text_to_image_from_a_llamagen_checkpoint_without_references() {
    let dir = std::env::temp_dir().join(format!("tokenar-parity-t2i-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    t2i_bundle(&dir);
    let prompt = "a red cube left of a blue ball";

    // The library: generate's image is the tokenizer's decoding of the tokens the sampler
    // draws from the GPT on the prompt's features, with no condition image.
    let hints = tokenar::pipeline::bundle::LoadHints::default();
    let bundle = tokenar::pipeline::Bundle::load_with_grid(&dir, &hints, Some(4), &Device::Cpu).unwrap();
    assert_eq!(bundle.image_size(), 16);
    let opts = SampleOptions { cfg_scale: 4.0, top_k: 1, cfg_interval: Some(3), ..SampleOptions::default() };
    let req = tokenar::pipeline::GenerateRequest {
        refs: Vec::new(),
        background: None,
        mask: None,
        prompt: prompt.into(),
        options: opts,
        itd: None,
        num_samples: 1,
        paste_back: false,
        decode_itd: false,
    };
    let out = tokenar::pipeline::generate(&bundle, &req, None).unwrap();
    assert_eq!(out.images.len(), 1);
    let (text, mask) = bundle.text.encode(&[prompt.to_string()], 120).unwrap();
    let hw = 16;
    let cond = Condition::new(Tensor::zeros((1, 0, hw), DType::U32, &Device::Cpu).unwrap(), Tensor::zeros((1, hw), DType::U32, &Device::Cpu).unwrap(), text, Some(mask));
    let (mut session, first) = bundle.gpt.start(&cond, true).unwrap();
    let direct = sample::generate(&mut session, &first, &DecodePlan::off(1, hw), &opts, &mut opts.rng(), None).unwrap();
    let codes = Tensor::from_vec(direct.target[0].clone(), (1, 4, 4), &Device::Cpu).unwrap();
    let img = tokenar::imageio::tensor_to_rgb(&bundle.vq.decode(&codes).unwrap().get(0).unwrap()).unwrap();
    assert_eq!(out.images[0], img);
    // A text-to-image model takes no condition image.
    let with_bg = tokenar::pipeline::GenerateRequest { background: Some(image::RgbImage::new(16, 16)), ..req.clone() };
    let e = tokenar::pipeline::generate(&bundle, &with_bg, None).err().unwrap().to_string();
    assert!(e.contains("--background"), "{e}");

    // The command line.
    let png = dir.join("out.png");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tokenar"))
        .args(["generate", "--weights"])
        .arg(&dir)
        .args(["--grid", "4", "--prompt", prompt, "--cfg-scale", "4", "--top-k", "1", "--out"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let written = image::open(&png).unwrap().to_rgb8();
    assert_eq!(written.dimensions(), (16, 16));
    // A grid the checkpoint cannot hold is refused with exit status 2.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tokenar"))
        .args(["generate", "--weights"])
        .arg(&dir)
        .args(["--grid", "0", "--prompt", prompt, "--out"])
        .arg(dir.join("bad.png"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
