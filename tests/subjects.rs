//! One to three subjects end to end on a tiny model: `data synth --subjects mix` gives every
//! count its share, a model with `max_refs = 3` trains on the mixed cache, generates from 1, 2
//! and 3 references (a fourth is refused naming the maximum), and `eval` reports per count.

use candle_core::Device;
use std::path::{Path, PathBuf};
use std::process::Command;
use tokenar::data;
use tokenar::pipeline::{generate, Bundle, GenerateRequest, TrainJob, TrainJobConfig};
use tokenar::sample::SampleOptions;

mod common;

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tokenar-subjects-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tokenar_cmd(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenar")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn config(tok: &Path, cache: &Path, out: &Path, steps: u64, max_refs: usize) -> TrainJobConfig {
    let (steps, max_refs) = (format!("steps={steps}"), format!("model.max_refs={max_refs}"));
    let sets = [
        steps.as_str(),
        "seed=2",
        "warmup=1",
        "ckpt_every=4",
        "grid_samples=1",
        // The recipe's binding options (configs/tokenar-builtin-f4.toml) with 1 to 3 references.
        "binding_loss=1.0",
        "binding_first=2",
        "binding_token_loss=0.25",
        "model.cell_embedding=true",
        "model.n_instruct=2",
        "model.index_embedding=true",
        "model.itd=true",
        &max_refs,
        "text.max_len=12",
    ];
    common::train_config(cache, out, tok, &sets)
}

#[test]
fn one_to_three_subjects_from_synth_mix_to_per_count_eval() {
    let root = tmp("mix");
    // The CLI's `--subjects mix`: 1, 2, 3 subjects in turn.
    let ds_dir = root.join("synth");
    let (code, err) = tokenar_cmd(&[
        "data", "synth", "--out", ds_dir.to_str().unwrap(), "--n", "9", "--seed", "8", "--size", "16", "--subjects", "mix",
        "--threads", "1", "--no-contact",
    ]);
    assert_eq!(code, 0, "{err}");
    let ds = data::Dataset::open_quiet(&ds_dir, &data::OpenOptions::default()).unwrap();
    let mut per_count = [0usize; 4];
    for s in &ds.samples {
        per_count[s.refs.len()] += 1;
    }
    assert_eq!(per_count, [0, 3, 3, 3]);
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(ds_dir.join("dataset.json")).unwrap()).unwrap();
    assert_eq!((info["options"]["mix"].as_bool(), &info["options"]["subjects"]), (Some(true), &serde_json::json!([1, 3])));
    let (code, err) = tokenar_cmd(&["data", "synth", "--out", root.join("x").to_str().unwrap(), "--subjects", "mixed"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--subjects") && err.contains("mixed"), "{err}");

    // Tokenizer (random, 4x4 codes of 16) and the code cache of all counts.
    let mut cfg = tokenar::tokenizer::VqConfig::preset("vq-tiny").unwrap();
    cfg.ch_mult = vec![1, 2, 2];
    let (vq, vars) = tokenar::tokenizer::build(&cfg, &Device::Cpu, 0).unwrap();
    let tok = root.join("vq.safetensors");
    tokenar::tokenizer::save(&tok, &cfg, &vars).unwrap();
    let cache = root.join("cache");
    let mut enc = |x: &candle_core::Tensor| vq.encode(x);
    data::cache::encode_dataset(&ds, &cache, 16, &mut enc, None, 8, None).unwrap();

    // A model of two references cannot take this cache; one of three trains on it.
    let e = TrainJob::new(config(&tok, &cache, &root.join("run2"), 4, 2), false, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("3 references") && e.contains("max_refs"), "{e}");
    let run = root.join("run3");
    let out = TrainJob::new(config(&tok, &cache, &run, 4, 3), false, &Device::Cpu).unwrap().run(false).unwrap();
    assert!(out.losses.iter().all(|l| l.1.is_finite()));

    let bundle = Bundle::load(&run.join("export"), &Default::default(), &Device::Cpu).unwrap();
    assert_eq!(bundle.config().max_refs, 3);
    let sample = ds.samples.iter().find(|s| s.refs.len() == 3).unwrap();
    let l = sample.load(16).unwrap();
    let req = GenerateRequest {
        refs: l.refs.clone(),
        background: Some(l.background.clone()),
        mask: None,
        prompt: sample.prompt.clone(),
        options: SampleOptions { top_k: 4, seed: 1, ..Default::default() },
        itd: None,
        num_samples: 1,
        paste_back: false,
        decode_itd: true,
    };
    for n in 1..=3 {
        let r = GenerateRequest { refs: l.refs[..n].to_vec(), ..req.clone() };
        let out = generate(&bundle, &r, None).unwrap();
        assert_eq!(out.images[0].dimensions(), (16, 16));
        // ITD writes exactly the references given (absent slots are left out, not padded).
        assert_eq!(out.itd_refs[0].len(), n, "{n} references");
    }
    let four = GenerateRequest { refs: vec![l.refs[0].clone(); 4], ..req.clone() };
    let e = generate(&bundle, &four, None).err().unwrap().to_string();
    assert!(e.contains("4 references") && e.contains("at most 3"), "{e}");

    // `tokenar attention` on the 3-reference request: the figures and the shares per group.
    let att = root.join("attention");
    let paths: Vec<PathBuf> = (0..3).map(|i| sample.dir.as_ref().unwrap().join(format!("ref/{i}.png"))).collect();
    let bg = sample.dir.as_ref().unwrap().join("background.png");
    let mut args = vec!["attention".to_string()];
    for p in &paths {
        args.extend(["--ref".into(), p.display().to_string()]);
    }
    args.extend(
        ["--background", bg.to_str().unwrap(), "--prompt", &sample.prompt, "--out", att.to_str().unwrap(), "--weights"]
            .iter()
            .map(|s| s.to_string()),
    );
    args.extend([run.join("export").display().to_string(), "--cell".into(), "1,2".into(), "--panel".into(), "32".into(), "--top-k".into(), "4".into()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, err) = tokenar_cmd(&argv);
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(att.join("attention.json")).unwrap()).unwrap();
    let groups: Vec<&str> = j["groups"].as_array().unwrap().iter().map(|g| g.as_str().unwrap()).collect();
    assert_eq!(groups, ["ref1", "ref2", "ref3", "background", "text", "instruct", "itd", "target"]);
    let mean: Vec<f64> = j["mean"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!((mean.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{mean:?}");
    assert_eq!(j["layers"].as_array().unwrap().len(), 1);
    assert_eq!(j["layers"][0]["heads"].as_array().unwrap().len(), 2);
    // shares.png: header + one layer + the mean, 9 columns of 32 px panels (2 px apart).
    let fig = image::open(att.join("shares.png")).unwrap();
    assert_eq!((fig.width(), fig.height()), (9 * 34 + 2, 3 * 34 + 2));
    let cell = image::open(att.join("cell_1_2.png")).unwrap();
    assert_eq!(cell.width(), 5 * 34 + 2, "generated + three references + background");
    assert_eq!(image::open(att.join("generated.png")).unwrap().width(), 16);
    let (code, err) = tokenar_cmd(&[&argv[..argv.len() - 6], &["--cell", "4,0"]].concat());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--cell 4,0") && err.contains("4 x 4"), "{err}");

    // eval --model reports per subject count (and per relation) beside the whole run.
    let ev = root.join("eval");
    let (code, err) = tokenar_cmd(&[
        "eval", "--model", run.join("export").to_str().unwrap(), "--dataset", ds_dir.to_str().unwrap(), "--metrics",
        "pixel,subject", "--out", ev.to_str().unwrap(), "--top-k", "4",
    ]);
    assert_eq!(code, 0, "{err}");
    let by = std::fs::read_to_string(ev.join("table_by_subjects.md")).unwrap();
    for n in 1..=3 {
        assert!(by.lines().any(|l| l.starts_with(&format!("| {n} | ")) && l.contains(" | 3 |")), "{by}");
    }
    assert!(ev.join("table_by_relation.md").exists() && ev.join("sheet.png").exists());
    let (code, t) = tokenar_cmd(&["eval", "table", ev.join("results.json").to_str().unwrap(), "--by", "subjects", "--columns", "psnr"]);
    assert_eq!(code, 0, "{t}");
    assert!(t.contains("| subjects | Method | n | PSNR↑ |"), "{t}");
    let (code, t) = tokenar_cmd(&["eval", "table", ev.join("results.json").to_str().unwrap(), "--by", "colour"]);
    assert_eq!(code, 2, "{t}");
    assert!(t.contains("--by colour"), "{t}");
    std::fs::remove_dir_all(&root).unwrap();
}
