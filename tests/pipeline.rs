//! End to end on a tiny synthetic set: synth -> tokenizer -> code cache -> train (with exact
//! resume) -> export -> generate, and the CLI's answers to bad input.

use candle_core::Device;
use std::path::{Path, PathBuf};
use std::process::Command;
use tokenar::pipeline::train_job::PROBE_LOG;
use tokenar::pipeline::{generate, probe, Bundle, GenerateRequest, TrainJob, TrainJobConfig};
use tokenar::sample::{ItdMode, SampleOptions};

mod common;
use common::fixture;

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tokenar-pipeline-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(tok: &Path, cache: &Path, out: &Path, steps: u64) -> TrainJobConfig {
    let steps = format!("steps={steps}");
    let sets = [steps.as_str(), "batch=8", "warmup=2", "ckpt_every=5", "keep_last=2", "grid_samples=2", "model.n_layer=2", "model.n_instruct=4"];
    common::train_config(cache, out, tok, &sets)
}

#[test]
fn train_resume_export_generate() {
    let root = tmp("e2e");
    let (ds_dir, tok, cache) = fixture(&root);

    // Uninterrupted: 40 steps.
    let run_a = root.join("run-a");
    let mut job = TrainJob::new(config(&tok, &cache, &run_a, 150), false, &Device::Cpu).unwrap();
    let a = job.run(false).unwrap();
    let first = a.losses[0].1;
    let last10: f32 = a.losses[140..].iter().map(|l| l.1).sum::<f32>() / 10.0;
    let uniform = (16f32).ln();
    assert!(first > 0.8 * uniform, "initial loss {first} should be near ln(16) = {uniform}");
    assert!(last10 < 0.75 * uniform, "loss must fall well below the uniform guess: {last10} vs {uniform}");
    assert!(run_a.join("loss.png").exists() && run_a.join("samples.png").exists());

    // The reference probe is logged at every checkpoint, and recomputing it from the trained
    // job gives the same figures; a probe of an earlier step drops the records after it.
    let log = run_a.join("checkpoints").join(PROBE_LOG);
    let logged = probe::read(&log).unwrap();
    let last = logged.last().unwrap().clone();
    assert_eq!(last.step, 150);
    assert_eq!(last.samples, job.parts.samples.len().min(probe::PROBE_SAMPLES));
    for v in [last.target, last.refs_swapped, last.refs_other, last.text_dropped, last.itd.unwrap()] {
        assert!(v.is_finite() && v > 0.0, "{last:?}");
    }
    assert_ne!(last.refs_other, last.target, "the references must reach the model");
    // The fixture's cache has owner grids: the first-subject-cell figures are there.
    for v in [last.decision, last.decision_swapped] {
        assert!(v.is_some_and(|v| v.is_finite() && v > 0.0), "{last:?}");
    }
    assert_eq!(probe::checkpoint_probe(&job.parts, 150).unwrap().unwrap(), last);
    probe::append(&log, &probe::Probe { step: 100, ..last.clone() }).unwrap();
    let steps: Vec<u64> = probe::read(&log).unwrap().iter().map(|p| p.step).collect();
    assert_eq!(steps.last(), Some(&100));
    assert!(steps.iter().all(|s| *s <= 100), "{steps:?}");

    // Interrupted at step 10 (a run of 10 steps), then resumed to 20: same losses as a
    // 20-step run.
    let run_b = root.join("run-b");
    let full = TrainJob::new(config(&tok, &cache, &root.join("run-c"), 20), false, &Device::Cpu).unwrap().run(false).unwrap();
    TrainJob::new(config(&tok, &cache, &run_b, 10), false, &Device::Cpu).unwrap().run(false).unwrap();
    let mut resumed = TrainJob::new(config(&tok, &cache, &run_b, 20), true, &Device::Cpu).unwrap();
    assert_eq!(resumed.state.step, 10);
    let rest = resumed.run(false).unwrap();
    assert_eq!(rest.losses, full.losses[10..].to_vec());

    // The exported bundle generates an image of the model's size with every ITD mode.
    let bundle = Bundle::load(&run_a.join("export"), &Default::default(), &Device::Cpu).unwrap();
    assert_eq!(bundle.image_size(), 4 * 4);

    // sampling.toml: the bundle's recommended settings; fields left out keep TokenAR's.
    assert_eq!(bundle.sampling, Default::default());
    let sampling = run_a.join("export").join("sampling.toml");
    std::fs::write(&sampling, "cfg_scale = 1.5\ntop_k = 10\n").unwrap();
    let b2 = Bundle::load(&run_a.join("export"), &Default::default(), &Device::Cpu).unwrap();
    assert_eq!((b2.sampling.cfg_scale, b2.sampling.top_k, b2.sampling.temperature), (1.5, 10, 1.0));
    let saved = root.join("saved-bundle");
    b2.save(&saved).unwrap();
    assert_eq!(Bundle::load(&saved, &Default::default(), &Device::Cpu).unwrap().sampling, b2.sampling);
    for bad in ["top_p = 1.5\n", "cfg = 2\n"] {
        std::fs::write(&sampling, bad).unwrap();
        let e = Bundle::load(&run_a.join("export"), &Default::default(), &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("sampling.toml"), "{e}");
    }
    std::fs::remove_file(&sampling).unwrap();
    let sample = root.join("synth").join("sample_0");
    let load = |p: &str| tokenar::imageio::load_rgb(sample.join(p), None).unwrap();
    let req = GenerateRequest {
        refs: vec![load("ref/0.png"), load("ref/1.png")],
        background: Some(load("real.png")),
        mask: Some(tokenar::imageio::load_mask(sample.join("mask.png"), None).unwrap()),
        prompt: std::fs::read_to_string(sample.join("description.txt")).unwrap(),
        options: SampleOptions { cfg_scale: 2.0, top_k: 8, seed: 1, ..Default::default() },
        itd: None,
        num_samples: 2,
        paste_back: true,
        decode_itd: false,
    };
    for itd in [None, Some(ItdMode::Naive), Some(ItdMode::Forced)] {
        let out = generate(&bundle, &GenerateRequest { itd, ..req.clone() }, None).unwrap();
        assert_eq!(out.images.len(), 2);
        assert_eq!(out.images[0].dimensions(), (16, 16));
        assert!(out.itd_refs.is_empty());
    }
    // Asked for, the ITD positions come back decoded: two references per sample.
    let out = generate(&bundle, &GenerateRequest { decode_itd: true, ..req.clone() }, None).unwrap();
    assert_eq!(out.itd_refs.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2]);
    assert_eq!(out.itd_refs[1][0].dimensions(), (16, 16));
    // ITD off is refused for a model trained with ITD; too many references are refused.
    let e = generate(&bundle, &GenerateRequest { itd: Some(ItdMode::Off), ..req.clone() }, None).err().unwrap();
    assert!(e.to_string().contains("ITD"), "{e}");
    let three = GenerateRequest { refs: vec![req.refs[0].clone(); 3], ..req.clone() };
    let e = generate(&bundle, &three, None).err().unwrap();
    assert!(e.to_string().contains("at most 2"), "{e}");

    // The command line writes the image file (and the ITD references) from the same bundle.
    let out_png = root.join("cli-out.png");
    let s = |p: &str| sample.join(p).to_str().unwrap().to_string();
    let export = run_a.join("export");
    let args = [
        "generate", "--weights", export.to_str().unwrap(), "--ref", &s("ref/0.png"), "--ref", &s("ref/1.png"),
        "--background", &s("real.png"), "--mask", &s("mask.png"), "--prompt", "a star left of a ring", "--out",
        out_png.to_str().unwrap(), "--top-k", "4", "--save-itd",
    ];
    let (code, err) = tokenar_cmd(&args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(image::open(&out_png).unwrap().to_rgb8().dimensions(), (16, 16));
    assert!(root.join("cli-out_itd0.png").exists() && root.join("cli-out_itd1.png").exists());
    let (code, info) = tokenar_cmd(&["info", "--weights", export.to_str().unwrap()]);
    assert_eq!(code, 0, "{info}");

    // A new run initialised from the exported model starts from its weights.
    let mut init_cfg = config(&tok, &cache, &root.join("run-init"), 1);
    init_cfg.init = Some(export.join("model.safetensors"));
    let init_job = TrainJob::new(init_cfg, false, &Device::Cpu).unwrap();
    let exported = tokenar::weights::TensorFile::load(export.join("model.safetensors"), &Device::Cpu).unwrap();
    let (_, vars) = &init_job.state.models[0];
    for (k, t) in tokenar::weights::varmap_tensors(vars) {
        let want = exported.tensors[&k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want, "{k}");
    }

    // `eval --model` generates every sample, saves it and scores it.
    let eval_out = root.join("eval");
    let (code, text) = tokenar_cmd(&[
        "eval", "--model", export.to_str().unwrap(), "--dataset", ds_dir.to_str().unwrap(), "--out",
        eval_out.to_str().unwrap(), "--metrics", "pixel,background,identity", "--top-k", "4",
    ]);
    assert_eq!(code, 0, "{text}");
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(eval_out.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["rows"].as_array().unwrap().len(), 24, "{results}");
    assert!(eval_out.join("pred").join("sample_0.png").exists() && eval_out.join("table.md").exists());
    std::fs::remove_dir_all(&root).unwrap();
}

/// References encoded on a grid of their own (`data encode --ref-size`): the cache, the trained
/// model and its export keep the reference grid, and generation crops a request's references
/// the same way, decoding ITD copies at that grid.
#[test]
fn references_on_their_own_grid_train_and_generate() {
    let root = tmp("refgrid");
    let (ds_dir, tok, _) = fixture(&root);
    let cache = root.join("cache-refs");
    let (code, err) = tokenar_cmd(&[
        "data", "encode", ds_dir.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap(), "--out", cache.to_str().unwrap(),
        "--size", "16", "--ref-size", "8",
    ]);
    assert_eq!(code, 0, "{err}");
    let samples = tokenar::data::batch::load_training_samples(&cache).unwrap();
    assert_eq!((samples[0].grid, samples[0].ref_grid), ((4, 4), Some((2, 2))));
    let out = root.join("run");
    TrainJob::new(config(&tok, &cache, &out, 4), false, &Device::Cpu).unwrap().run(false).unwrap();
    let bundle = Bundle::load(&out.join("export"), &Default::default(), &Device::Cpu).unwrap();
    assert_eq!((bundle.config().ref_grid, bundle.image_size(), bundle.ref_image_size()), (Some((2, 2)), 16, 8));
    let (code, info) = tokenar_cmd(&["info", "--weights", out.join("export").to_str().unwrap()]);
    assert!(code == 0 && info.contains("grid 4x4 (references 2x2, cropped to their subject)"), "{info}");
    let sample = ds_dir.join("sample_1");
    let load = |p: &str| tokenar::imageio::load_rgb(sample.join(p), None).unwrap();
    let req = GenerateRequest {
        refs: vec![load("ref/0.png"), load("ref/1.png")],
        background: Some(load("real.png")),
        mask: Some(tokenar::imageio::load_mask(sample.join("mask.png"), None).unwrap()),
        prompt: "a star left of a ring".into(),
        options: SampleOptions { top_k: 4, seed: 2, ..Default::default() },
        itd: Some(ItdMode::Exact),
        num_samples: 1,
        paste_back: false,
        decode_itd: true,
    };
    let out = generate(&bundle, &req, None).unwrap();
    assert_eq!(out.images[0].dimensions(), (16, 16));
    assert_eq!(out.target_codes[0].len(), 16);
    assert_eq!(out.itd_refs[0].iter().map(|i| i.dimensions()).collect::<Vec<_>>(), [(8, 8), (8, 8)]);
    // The condition holds each reference's crop codes: those of `reference_view` at 8 px.
    let (refs, _) = tokenar::pipeline::generate::condition_codes(&bundle, &req).unwrap();
    let view = tokenar::imageio::reference_view(&tokenar::imageio::resize_rgb(&req.refs[0], 16, 16), 8);
    let x = tokenar::imageio::rgb_to_tensor(&view, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let want = bundle.vq.encode(&x).unwrap().flatten_all().unwrap().to_dtype(candle_core::DType::U32).unwrap().to_vec1::<u32>().unwrap();
    assert_eq!(refs[0], want);
    std::fs::remove_dir_all(&root).unwrap();
}

/// The binding loss: logged with its accuracy, trained (its head is checkpointed and resumes
/// exactly) but not exported; a cache without owner grids is refused by name.
#[test]
fn binding_loss_trains_resumes_and_stays_out_of_the_export() {
    let root = tmp("binding");
    let (_, tok, cache) = fixture(&root);
    let with_binding = |out: &Path, steps: u64| {
        let mut c = config(&tok, &cache, out, steps);
        c.binding_loss = 1.0;
        c.grid_samples = 0;
        c
    };
    let run = root.join("run");
    let full = TrainJob::new(with_binding(&run, 60), false, &Device::Cpu).unwrap().run(false).unwrap();
    let recs = tokenar::train::MetricsLog::read(run.join("checkpoints").join("metrics.jsonl")).unwrap();
    let acc: Vec<f64> = recs.iter().map(|r| r.extras["binding_acc"]).collect();
    let loss: Vec<f64> = recs.iter().map(|r| r.extras["binding_loss"]).collect();
    assert!(acc.iter().all(|a| (0.0..=1.0).contains(a)), "{acc:?}");
    // It starts at chance (two references: ln 2) and falls.
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!((mean(&loss[..5]) - 2f64.ln()).abs() < 0.02, "{loss:?}");
    assert!(mean(&loss[50..]) < mean(&loss[..10]) - 0.02, "binding loss {loss:?} must fall");
    // The step's loss is the token loss plus the binding loss (weight 1): the first step of a
    // run without it (same seed, same batch) differs by exactly the logged binding loss.
    let plain = TrainJob::new(config(&tok, &cache, &root.join("plain"), 1), false, &Device::Cpu).unwrap().run(false).unwrap();
    assert!(((full.losses[0].1 - plain.losses[0].1) as f64 - loss[0]).abs() < 1e-5, "{:?} {:?} {}", full.losses[0], plain.losses[0], loss[0]);

    // The token loss on each subject's first cells: logged, and part of the step's loss.
    let mut tc = with_binding(&root.join("tok"), 1);
    (tc.binding_first, tc.binding_token_loss) = (2, 0.5);
    let tok_run = TrainJob::new(tc, false, &Device::Cpu).unwrap().run(false).unwrap();
    let rec = &tokenar::train::MetricsLog::read(root.join("tok").join("checkpoints").join("metrics.jsonl")).unwrap()[0];
    let tl = rec.extras["binding_token_loss"];
    assert!(tl > 1.0 && rec.extras["binding_decision_acc"] <= 1.0, "{rec:?}");
    // Same batch as the plain run's first step: the difference is both binding terms.
    let plain_first = |out: &Path| TrainJob::new(config(&tok, &cache, out, 1), false, &Device::Cpu).unwrap().run(false).unwrap().losses[0].1;
    let want = plain_first(&root.join("plain-tok")) as f64 + rec.extras["binding_loss"] + 0.5 * tl;
    assert!((tok_run.losses[0].1 as f64 - want).abs() < 1e-4, "{} vs {want}", tok_run.losses[0].1);
    let mut bad = with_binding(&root.join("bad"), 1);
    (bad.binding_loss, bad.binding_token_loss) = (0.0, 1.0);
    assert!(bad.validate().unwrap_err().to_string().contains("binding_token_loss"));

    let part = root.join("part");
    TrainJob::new(with_binding(&part, 30), false, &Device::Cpu).unwrap().run(false).unwrap();
    let rest = TrainJob::new(with_binding(&part, 60), true, &Device::Cpu).unwrap().run(false).unwrap();
    assert_eq!(rest.losses, full.losses[30..].to_vec());

    let exported = tokenar::weights::TensorFile::load(run.join("export").join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(exported.tensors.keys().all(|k| !k.contains("binding")), "{:?}", exported.tensors.keys());

    // A cache without owner grids (as from a dataset without subject masks) is refused.
    let bare = root.join("bare-cache");
    std::fs::create_dir_all(&bare).unwrap();
    for f in std::fs::read_dir(&cache).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, bare.join(f.file_name().unwrap())).unwrap();
    }
    let index = std::fs::read_to_string(bare.join("index.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&index).unwrap();
    for s in v["samples"].as_array_mut().unwrap() {
        s["owners"] = serde_json::Value::Null;
    }
    std::fs::write(bare.join("index.json"), v.to_string()).unwrap();
    let mut c = with_binding(&root.join("run-bare"), 1);
    c.cache = bare.clone();
    let e = TrainJob::new(c, false, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("bare-cache") && e.contains("owner"), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}

fn tokenar_cmd(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenar")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn generate_reports_bad_input_with_status_2() {
    let root = tmp("cli");
    let good = root.join("a.png");
    tokenar::imageio::save_rgb(&good, &image::RgbImage::new(16, 16)).unwrap();
    let small_mask = root.join("m.png");
    // Another aspect ratio than the background's (a smaller mask of the same aspect is resized).
    tokenar::imageio::save_rgb(&small_mask, &image::RgbImage::new(8, 4)).unwrap();
    let junk = root.join("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    let g = good.to_str().unwrap();
    let out = root.join("out.png");
    let o = out.to_str().unwrap();
    let nowhere = root.join("nowhere");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--ref", junk.to_str().unwrap(), "--prompt", "x", "--out", o], "junk.png"),
        (vec!["--ref", "missing.png", "--prompt", "x", "--out", o], "missing.png"),
        (vec!["--ref", g, "--prompt", "x", "--out", o, "--weights", nowhere.to_str().unwrap()], "nowhere"),
        (vec!["--ref", g, "--prompt", "x", "--out", o, "--top-p", "1.5"], "top_p"),
        (vec!["--ref", g, "--background", g, "--mask", small_mask.to_str().unwrap(), "--prompt", "x", "--out", o, "--weights", root.to_str().unwrap()], "mask"),
        (vec!["--ref", g, "--prompt", "x", "--out", o, "--itd", "sometimes"], "sometimes"),
    ];
    for (args, needle) in cases {
        let mut full = vec!["generate"];
        full.extend(args.iter());
        let (code, err) = tokenar_cmd(&full);
        assert_eq!(code, 2, "{full:?}: {err}");
        assert!(err.contains(needle), "{full:?}: `{err}` should name `{needle}`");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!out.exists());
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn serve_and_curate_commands_answer_and_refuse_bad_input() {
    use std::io::{BufRead, Read, Write};
    // `serve` on a free port answers the API; it is stopped by the test.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenar"))
        .args(["serve", "--addr", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let addr = loop {
        let mut line = String::new();
        if lines.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("serve ended before listening: {seen}");
        }
        seen.push_str(&line);
        if let Some(rest) = line.trim().strip_prefix("serving on http://") {
            break rest.split('/').next().unwrap().to_string();
        }
    };
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /api/info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("\"image_size\":64"), "{answer}");

    let (code, err) = tokenar_cmd(&["serve", "--addr", "not-an-address"]);
    assert!(code == 2 && err.contains("--addr") && !err.contains("panicked"), "{err}");

    let root = tmp("curate-cli");
    let data = root.join("data");
    let (code, err) = tokenar_cmd(&["data", "synth", "--out", data.to_str().unwrap(), "--n", "2", "--seed", "1", "--size", "32"]);
    assert_eq!(code, 0, "{err}");
    let out = root.join("out");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["vlm", "--dataset", data.to_str().unwrap(), "--endpoint", "https://x:1", "--model", "m", "--out", out.to_str().unwrap()], "https"),
        (vec!["vlm", "--dataset", "nowhere", "--endpoint", "http://x:1", "--model", "m", "--out", out.to_str().unwrap()], "nowhere"),
        (vec!["identity", "--dataset", data.to_str().unwrap(), "--weights", "no-dino.pth", "--out", out.to_str().unwrap()], "no-dino.pth"),
        (vec!["matte", "--dataset", data.to_str().unwrap(), "--mattes", "no-mattes"], "no-mattes"),
    ];
    for (args, needle) in cases {
        let mut full = vec!["curate"];
        full.extend(args.iter());
        let (code, err) = tokenar_cmd(&full);
        assert_eq!(code, 2, "{full:?}: {err}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{full:?}: `{err}` should name `{needle}`");
    }
    std::fs::remove_dir_all(&root).unwrap();
}
