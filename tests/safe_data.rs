//! Nothing lost, no wrong success: the command line refuses to overwrite or mix a training run,
//! a code cache or a synthetic dataset made otherwise (unless `--force` or `--resume`), refuses
//! changed settings on resume, reports every-sample failures with a non-zero status, keeps
//! dataset paths inside the dataset root and removes stale temporary files.

use candle_core::Device;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tokenar-safe-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tokenar(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenar")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// As [`tokenar`], run in the folder `dir` (for relative paths).
fn tokenar_in(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenar")).current_dir(dir).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn ok(args: &[&str]) -> String {
    let (code, text) = tokenar(args);
    assert_eq!(code, 0, "tokenar {args:?}: {text}");
    text
}

fn refused(args: &[&str]) -> String {
    let (code, text) = tokenar(args);
    assert_eq!(code, 2, "tokenar {args:?} must fail with status 2: {text}");
    text
}

/// A random tokenizer for 16 px images (4 x 4 codes of 16); `seed` makes another one.
fn tokenizer(path: &Path, seed: u64) {
    let mut cfg = tokenar::tokenizer::VqConfig::preset("vq-tiny").unwrap();
    cfg.ch_mult = vec![1, 2, 2];
    let (_, vars) = tokenar::tokenizer::build(&cfg, &Device::Cpu, seed).unwrap();
    tokenar::tokenizer::save(path, &cfg, &vars).unwrap();
}

/// A 12-sample synthetic set at 16 px, two tokenizers and the cache of the first.
struct Fixture {
    root: PathBuf,
    data: PathBuf,
    tok: PathBuf,
    tok2: PathBuf,
    cache: PathBuf,
}

fn fixture(tag: &str) -> Fixture {
    let root = tmp(tag);
    let data = root.join("synth");
    ok(&["data", "synth", "--out", s(&data), "--n", "12", "--size", "16", "--seed", "3", "--threads", "1", "--no-contact"]);
    let (tok, tok2) = (root.join("vq.safetensors"), root.join("vq2.safetensors"));
    tokenizer(&tok, 0);
    tokenizer(&tok2, 1);
    let cache = root.join("cache");
    ok(&["data", "encode", s(&data), "--tokenizer", s(&tok), "--out", s(&cache)]);
    Fixture { root, data, tok, tok2, cache }
}

impl Fixture {
    /// A training config of a tiny model, `steps` steps, checkpoints every 3.
    fn config(&self, name: &str, out: &Path, steps: u64) -> PathBuf {
        let steps = format!("steps={steps}");
        let sets = [steps.as_str(), "ckpt_every=3", "keep_last=0", "model.dim=16", "model.n_instruct=2", "model.max_refs=2", "text.dim=16"];
        let p = self.root.join(name);
        std::fs::write(&p, common::train_toml(&self.cache, out, &self.tok, &sets)).unwrap();
        p
    }
}

fn metrics_steps(run: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(run.join("checkpoints/metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect()
}

fn checkpoints(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ckpt-"))
        .collect();
    v.sort();
    v
}

/// Items 1, 6, 9 and 10: a run folder is neither overwritten nor spliced; resume refuses
/// changed settings; stale temporaries go; the probe of a fresh folder creates nothing.
#[test]
fn train_keeps_runs_apart_and_resume_keeps_its_settings() {
    let f = fixture("train");
    let run = f.root.join("run");
    let c9 = f.config("c9.toml", &run, 9);
    let c9 = s(&c9);

    // The probe of a fresh folder says there is nothing to probe and writes nothing.
    let e = refused(&["train", "--config", c9, "--probe"]);
    assert!(e.contains("no checkpoint to probe") && !e.contains("starting fresh"), "{e}");
    assert!(!run.exists(), "the probe created {}", run.display());

    ok(&["train", "--config", c9]);
    assert_eq!(checkpoints(&run), ["ckpt-3.safetensors", "ckpt-6.safetensors", "ckpt-9.safetensors"]);
    assert_eq!(metrics_steps(&run), (1..=9).collect::<Vec<_>>());
    let model = std::fs::read(run.join("export/model.safetensors")).unwrap();

    // A shorter run into the same folder without --resume: refused, nothing touched.
    let c4 = f.config("c4.toml", &run, 4);
    let e = refused(&["train", "--config", s(&c4)]);
    assert!(e.contains(s(&run)) && e.contains("--resume") && e.contains("--force"), "{e}");
    assert_eq!(checkpoints(&run).len(), 3);
    assert_eq!(metrics_steps(&run).len(), 9);
    assert_eq!(std::fs::read(run.join("export/model.safetensors")).unwrap(), model);

    // Resuming with changed hyper-parameters is refused, naming the setting.
    let c12 = f.config("c12.toml", &run, 12);
    let c12 = s(&c12);
    for (set, key) in [("lr=1.0", "lr"), ("model.itd=false", "model.itd"), ("batch=2", "batch"), ("drop_both=0.3", "drop_both")] {
        let e = refused(&["train", "--config", c12, "--resume", "--set", set]);
        assert!(e.contains(key) && e.contains("--force"), "{set}: {e}");
    }
    assert_eq!(checkpoints(&run).len(), 3);

    // A kill during a checkpoint write left a temporary file: the next run removes it.
    let stale = run.join("checkpoints/.ckpt-12.safetensors.4000000000.tmp");
    std::fs::write(&stale, vec![0u8; 1000]).unwrap();
    // More steps are no change; the resumed run continues the same log.
    ok(&["train", "--config", c12, "--resume"]);
    assert!(!stale.exists(), "the stale temporary file is still there");
    assert_eq!(metrics_steps(&run), (1..=12).collect::<Vec<_>>());

    // With --force a changed setting is accepted and recorded.
    let c15 = f.config("c15.toml", &run, 15);
    let text = ok(&["train", "--config", s(&c15), "--resume", "--force", "--set", "lr=1e-3"]);
    assert!(text.contains("lr"), "{text}");
    let changes = std::fs::read_to_string(run.join("checkpoints/changes.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(changes.lines().next().unwrap()).unwrap();
    assert_eq!(line["step"], 12);
    assert_eq!(line["changes"][0]["key"], "lr");

    // --force without --resume starts afresh: the old run's files are gone, nothing spliced.
    std::fs::write(run.join("notes.txt"), "kept").unwrap();
    let text = ok(&["train", "--config", s(&c4), "--force"]);
    assert!(text.contains("deleted"), "{text}");
    assert_eq!(checkpoints(&run), ["ckpt-3.safetensors", "ckpt-4.safetensors"]);
    assert_eq!(metrics_steps(&run), [1, 2, 3, 4]);
    assert!(!run.join("checkpoints/changes.jsonl").exists() && run.join("notes.txt").exists());

    // Resuming with another tokenizer file than the run's is refused (its content is
    // compared, and the cache was not made with it either).
    let e = refused(&["train", "--config", c12, "--resume", "--set", &format!("tokenizer=\"{}\"", f.tok2.display())]);
    assert!(e.contains("tokenizer") && e.contains(s(&f.cache)), "{e}");
    std::fs::remove_dir_all(&f.root).unwrap();
}

/// Item 2: a cache records its tokenizer and dataset; encode and train refuse another one.
#[test]
fn caches_and_synthetic_sets_refuse_another_maker() {
    let f = fixture("cache");
    let index = std::fs::read(f.cache.join("index.json")).unwrap();

    // Another tokenizer into the same cache: refused, the cache untouched.
    let e = refused(&["data", "encode", s(&f.data), "--tokenizer", s(&f.tok2), "--out", s(&f.cache)]);
    assert!(e.contains(s(&f.cache)) && e.contains("tokenizer") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(f.cache.join("index.json")).unwrap(), index);
    // Another dataset: refused.
    let other = f.root.join("other");
    ok(&["data", "synth", "--out", s(&other), "--n", "4", "--size", "16", "--seed", "9", "--threads", "1", "--no-contact"]);
    let e = refused(&["data", "encode", s(&other), "--tokenizer", s(&f.tok), "--out", s(&f.cache)]);
    assert!(e.contains("dataset"), "{e}");
    // The same maker resumes (nothing to do); the count is true.
    let text = ok(&["data", "encode", s(&f.data), "--tokenizer", s(&f.tok), "--out", s(&f.cache)]);
    assert!(text.contains("encoded 0 samples") && text.contains("12 in the cache"), "{text}");

    // Training with a tokenizer other than the cache's is refused.
    let run = f.root.join("run");
    let cfg = f.config("c.toml", &run, 2);
    let e = refused(&["train", "--config", s(&cfg), "--set", &format!("tokenizer=\"{}\"", f.tok2.display())]);
    assert!(e.contains(s(&f.cache)) && e.contains("encoded with the tokenizer"), "{e}");
    assert!(!run.join("checkpoints").exists());

    // With --force the cache is made again with the new tokenizer; then training with it works.
    let text = ok(&["data", "encode", s(&f.data), "--tokenizer", s(&f.tok2), "--out", s(&f.cache), "--force"]);
    assert!(text.contains("encoded 12 samples"), "{text}");
    assert_ne!(std::fs::read(f.cache.join("index.json")).unwrap(), index);
    ok(&["train", "--config", s(&cfg), "--set", &format!("tokenizer=\"{}\"", f.tok2.display())]);

    // A synthetic set into a folder holding one made with other options: refused, unchanged.
    let sample0 = std::fs::read(f.data.join("sample_0/real.png")).unwrap();
    let e = refused(&["data", "synth", "--out", s(&f.data), "--n", "12", "--size", "32", "--seed", "3", "--threads", "1", "--no-contact", "--split", "test"]);
    assert!(e.contains(s(&f.data)) && e.contains("size") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(f.data.join("sample_0/real.png")).unwrap(), sample0);
    // Fewer samples than the folder holds would leave the others behind: refused too.
    refused(&["data", "synth", "--out", s(&f.data), "--n", "5", "--size", "16", "--seed", "3", "--threads", "1", "--no-contact"]);
    // The same options complete an interrupted set.
    std::fs::remove_dir_all(f.data.join("sample_11")).unwrap();
    ok(&["data", "synth", "--out", s(&f.data), "--n", "12", "--size", "16", "--seed", "3", "--threads", "1", "--no-contact"]);
    assert!(f.data.join("sample_11/real.png").exists());
    // --force replaces every sample.
    ok(&["data", "synth", "--out", s(&f.data), "--n", "3", "--size", "32", "--seed", "3", "--threads", "1", "--no-contact", "--force"]);
    let names: Vec<String> = std::fs::read_dir(&f.data).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.iter().filter(|n| n.starts_with("sample_")).count(), 3, "{names:?}");
    assert_eq!(image::open(f.data.join("sample_2/real.png")).unwrap().width(), 32);
    // A folder with other files is not a synthetic set: refused.
    let foreign = f.root.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("thesis.tex"), "x").unwrap();
    refused(&["data", "synth", "--out", s(&foreign), "--n", "2", "--size", "16", "--no-contact"]);
    std::fs::remove_dir_all(&f.root).unwrap();
}

/// Items 5 and 7: nothing scored or encoded is an error; counts are true; paths outside the
/// dataset root are refused by name.
#[test]
fn failures_are_errors_and_paths_stay_in_the_dataset() {
    let f = fixture("exit");
    // eval with an empty prediction folder: every sample fails.
    let empty = f.root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = refused(&["eval", "--pred", s(&empty), "--dataset", s(&f.data), "--metrics", "pixel"]);
    assert!(e.contains("all 12 samples failed"), "{e}");
    // --size 0, for eval and encode.
    let pred = f.root.join("pred");
    std::fs::create_dir_all(&pred).unwrap();
    for i in 0..12 {
        std::fs::copy(f.data.join(format!("sample_{i}/real.png")), pred.join(format!("sample_{i}.png"))).unwrap();
    }
    ok(&["eval", "--pred", s(&pred), "--dataset", s(&f.data), "--metrics", "pixel"]);
    refused(&["eval", "--pred", s(&pred), "--dataset", s(&f.data), "--metrics", "pixel", "--size", "0"]);
    refused(&["data", "encode", s(&f.data), "--tokenizer", s(&f.tok), "--out", s(&f.root.join("c0")), "--size", "0"]);

    // Two samples whose background cannot be decoded: 10 stored, and the message says so.
    let bad = f.root.join("bad");
    ok(&["data", "synth", "--out", s(&bad), "--n", "12", "--size", "16", "--seed", "3", "--threads", "1", "--no-contact"]);
    for i in [2, 5] {
        std::fs::write(bad.join(format!("sample_{i}/background.png")), b"not a png").unwrap();
    }
    let text = ok(&["data", "encode", s(&bad), "--tokenizer", s(&f.tok), "--out", s(&f.root.join("c-bad"))]);
    assert!(text.contains("encoded 10 samples") && text.contains("2 skipped"), "{text}");
    // All of them broken: nothing stored is an error.
    for i in 0..12 {
        std::fs::write(bad.join(format!("sample_{i}/background.png")), b"not a png").unwrap();
    }
    let e = refused(&["data", "encode", s(&bad), "--tokenizer", s(&f.tok), "--out", s(&f.root.join("c-none"))]);
    assert!(e.contains("no sample could be encoded"), "{e}");

    // Paths leaving the dataset root: a meta.json subject mask up the tree, an absolute one,
    // and a symlinked ref/ folder.
    let secret = f.root.join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::copy(f.data.join("sample_0/ref/0.png"), secret.join("0.png")).unwrap();
    std::fs::copy(f.data.join("sample_0/ref/1.png"), secret.join("1.png")).unwrap();
    let edit_meta = |i: usize, mask: &str| {
        let p = f.data.join(format!("sample_{i}/meta.json"));
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["subjects"][0]["mask"] = mask.into();
        std::fs::write(&p, v.to_string()).unwrap();
    };
    edit_meta(1, "../../../../../../../../etc/passwd");
    edit_meta(2, s(&secret.join("0.png")));
    let ref3 = f.data.join("sample_3/ref");
    std::fs::remove_dir_all(&ref3).unwrap();
    std::os::unix::fs::symlink(&secret, &ref3).unwrap();
    let (code, report) = tokenar(&["data", "check", s(&f.data)]);
    assert_ne!(code, 0, "{report}");
    for id in ["sample_1", "sample_2", "sample_3"] {
        let line = report.lines().find(|l| l.starts_with(&format!("BAD {id}:"))).unwrap_or_else(|| panic!("{id} not reported: {report}"));
        assert!(line.contains("outside the dataset root"), "{line}");
    }
    assert!(report.contains("9 good, 3 bad"), "{report}");
    // The same with the dataset given relative to the working folder.
    let (code, rel) = tokenar_in(&f.root, &["data", "check", "synth"]);
    assert_ne!(code, 0, "{rel}");
    assert!(rel.contains("9 good, 3 bad") && rel.matches("outside the dataset root").count() == 3, "{rel}");
    let (code, rel) = tokenar_in(&f.root, &["eval", "--pred", "pred", "--dataset", "synth", "--metrics", "pixel"]);
    assert_eq!(code, 2, "{rel}");
    assert!(rel.contains("sample_1") && rel.contains("outside the dataset root"), "{rel}");
    // encode leaves them out (with the reason), eval refuses the dataset naming the sample.
    let text = ok(&["data", "encode", s(&f.data), "--tokenizer", s(&f.tok), "--out", s(&f.root.join("c-conf"))]);
    assert!(text.contains("encoded 9 samples") && text.contains("outside the dataset root"), "{text}");
    let e = refused(&["eval", "--pred", s(&pred), "--dataset", s(&f.data), "--metrics", "pixel"]);
    assert!(e.contains("sample_") && e.contains("outside the dataset root"), "{e}");
    std::fs::remove_dir_all(&f.root).unwrap();
}
