//! Fuzzing of every parser of untrusted bytes, inside `cargo test`: a seeded random-mutation
//! loop per target (valid seed inputs, mutated by bit flips, byte and integer overwrites with
//! boundary values, deletions, duplications, insertions and truncation; structured targets
//! also replace JSON values). Each case must return: an `Ok` or an error with a message, never
//! a panic (caught and reported with the input saved to a file) and never an abort.
//!
//! Targets: PyTorch `.pt` files (the zip archive, and the pickle inside it re-zipped), the
//! safetensors file and the model config in its metadata, images, the dataset's `meta.json`
//! and `.jsonl` manifest, the server's generation request body.
//!
//! Each target runs for `TOKENAR_FUZZ_SECS` seconds (default 2) from the seed
//! `TOKENAR_FUZZ_SEED` (default 1); a longer run: `TOKENAR_FUZZ_SECS=120 cargo test --release
//! --test fuzz`.

use candle_core::{DType, Device, Tensor};
use rand::Rng as _;
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokenar::util::Rng;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tokenar-fuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const INTERESTING: [u64; 12] = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 40, u64::MAX];

/// One to four random mutations of `seed`.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let len = b.len();
        let at = if len == 0 { 0 } else { rng.random_range(0..len) };
        match rng.random_range(0..8) {
            0 if len > 0 => b[at] ^= 1 << rng.random_range(0..8),
            1 if len > 0 => b[at] = rng.random(),
            2 if len > 0 => b[at] = [0u8, 0xFF, 0x7F, 0x80][rng.random_range(0..4)],
            3 => {
                let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let w = [1usize, 2, 4, 8][rng.random_range(0..4)];
                let bytes = if rng.random() { v.to_le_bytes() } else { v.to_be_bytes() };
                for (i, x) in bytes.iter().take(w).enumerate() {
                    if at + i < b.len() {
                        b[at + i] = *x;
                    }
                }
            }
            4 if len > 0 => {
                let n = rng.random_range(1..=(len - at).min(64));
                b.drain(at..at + n);
            }
            5 if len > 0 => {
                let n = rng.random_range(1..=(len - at).min(64));
                let piece = b[at..at + n].to_vec();
                let to = rng.random_range(0..=b.len());
                b.splice(to..to, piece);
            }
            6 => {
                let n = rng.random_range(1..=16);
                let piece: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                b.splice(at..at, piece);
            }
            _ => b.truncate(at),
        }
    }
    b
}

/// Run `f` on byte mutations of `seeds` for the time budget (see [`fuzz_with`]).
fn fuzz(name: &str, seeds: &[Vec<u8>], f: impl FnMut(&[u8]) -> Result<(), String>) {
    fuzz_with(name, seeds, |seed, rng| mutate(seed, rng), f)
}

/// Run `f` on inputs made by `make` from `seeds` for the time budget. The seeds themselves
/// must pass (so the target is really exercised); a panic fails the test with the input saved.
fn fuzz_with(name: &str, seeds: &[Vec<u8>], mut make: impl FnMut(&[u8], &mut Rng) -> Vec<u8>, mut f: impl FnMut(&[u8]) -> Result<(), String>) {
    let secs = env_u64("TOKENAR_FUZZ_SECS", 2);
    let seed = env_u64("TOKENAR_FUZZ_SEED", 1);
    let mut rng = tokenar::util::rng(seed ^ name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)));
    for (i, s) in seeds.iter().enumerate() {
        if let Err(e) = f(s) {
            panic!("{name}: seed {i} is refused: {e}");
        }
    }
    let t0 = Instant::now();
    let (mut cases, mut errors) = (0u64, 0u64);
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    while t0.elapsed() < Duration::from_secs(secs) || cases < 50 {
        let input = make(&seeds[rng.random_range(0..seeds.len())], &mut rng);
        let r = catch_unwind(AssertUnwindSafe(|| f(&input)));
        cases += 1;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                assert!(!e.trim().is_empty(), "{name}: an error without a message");
                errors += 1;
                // The first words of the message after the source: a rough class of error.
                let class: String = e.rsplit(": ").next().unwrap_or(&e).split_whitespace().take(3).collect::<Vec<_>>().join(" ");
                *kinds.entry(class).or_default() += 1;
            }
            Err(p) => {
                let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                let dir = std::env::temp_dir().join("tokenar-fuzz-crashes");
                std::fs::create_dir_all(&dir).unwrap();
                let file = dir.join(format!("{name}-{seed}-{cases}.bin"));
                std::fs::write(&file, &input).unwrap();
                panic!("{name}: case {cases} panicked: {msg}; input saved to {}", file.display());
            }
        }
    }
    let mut top: Vec<_> = kinds.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1));
    top.truncate(5);
    eprintln!("fuzz {name}: {cases} cases in {:.1} s, {errors} errors, 0 panics; most frequent errors: {top:?}", t0.elapsed().as_secs_f64());
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

// ---- PyTorch .pt files -------------------------------------------------------------------

fn pt_seeds(dir: &Path) -> Vec<Vec<u8>> {
    let a = Tensor::arange(0f32, 6., &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
    let b = Tensor::new(&[1i64, 2, 3, 4], &Device::Cpu).unwrap();
    let c = Tensor::new(&[0.5f32], &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
    let mut seeds = Vec::new();
    for (i, key) in [Some("model"), None, Some("ema")].into_iter().enumerate() {
        let p = dir.join(format!("seed{i}.pt"));
        tokenar::weights::torch_zip::write_checkpoint(&p, key, &[("a.weight", &a), ("b", &b), ("c", &c)]).unwrap();
        seeds.push(std::fs::read(&p).unwrap());
    }
    seeds
}

fn read_pt(bytes: &[u8]) -> Result<(), String> {
    let f = tokenar::weights::TensorFile::from_torch_bytes("fuzz.pt", bytes, &Device::Cpu).map_err(err)?;
    // What was read is what the file holds: no tensor larger than the archive.
    let held: usize = f.tensors.values().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum();
    assert!(held <= bytes.len(), "{held} bytes of tensors from a file of {}", bytes.len());
    Ok(())
}

#[test]
fn fuzz_torch_zip_files() {
    let dir = tmp("pt");
    fuzz("pt-zip", &pt_seeds(&dir), read_pt);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The entries of a zip archive, in order.
fn unzip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut v = Vec::new();
            f.read_to_end(&mut v).unwrap();
            (f.name().unwrap().into_owned(), v)
        })
        .collect()
}

fn rezip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    use std::io::Write;
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, data) in entries {
            z.start_file(name.as_str(), opts).unwrap();
            z.write_all(data).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

#[test]
fn fuzz_torch_pickles() {
    // The pickle mutated inside a well-formed archive (a mutated archive mostly fails its CRC).
    let dir = tmp("pkl");
    let archives: Vec<Vec<(String, Vec<u8>)>> = pt_seeds(&dir).iter().map(|b| unzip(b)).collect();
    let pkl_of = |a: &Vec<(String, Vec<u8>)>| a.iter().find(|(n, _)| n.ends_with("data.pkl")).unwrap().1.clone();
    let seeds: Vec<Vec<u8>> = archives.iter().map(pkl_of).collect();
    let rest = archives[0].clone();
    fuzz("pt-pickle", &seeds, |pkl| {
        let entries: Vec<(String, Vec<u8>)> = rest.iter().map(|(n, d)| if n.ends_with("data.pkl") { (n.clone(), pkl.to_vec()) } else { (n.clone(), d.clone()) }).collect();
        read_pt(&rezip(&entries))
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- safetensors and the model config in its metadata --------------------------------------

fn safetensors_with(config_json: &str, tensors: &HashMap<String, Tensor>) -> Vec<u8> {
    let meta = HashMap::from([(tokenar::model::load::CONFIG_KEY.to_string(), config_json.to_string())]);
    let mut sorted: Vec<_> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    safetensors::tensor::serialize(sorted.into_iter().map(|(k, t)| (k.as_str(), t)), Some(meta)).unwrap()
}

fn load_model_file(bytes: &[u8]) -> Result<(), String> {
    let mut f = tokenar::weights::TensorFile::from_safetensors_bytes("fuzz.safetensors", bytes, &Device::Cpu).map_err(err)?;
    let cfg = tokenar::model::config_from_metadata(&f).map_err(err)?;
    tokenar::model::load::load_with_config(&mut f, &cfg, &Device::Cpu).map_err(err)?;
    Ok(())
}

/// A JSON value to put in place of another: boundary numbers, wrong types.
fn random_json(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.random_range(0..10) {
        0 => json!(INTERESTING[rng.random_range(0..INTERESTING.len())]),
        1 => json!(-(rng.random_range(1..1_000_000_000i64))),
        2 => json!(rng.random_range(0..100_000)),
        3 => json!(1e300),
        4 => json!(null),
        5 => json!("x"),
        6 => json!([1, 2, 3]),
        7 => json!({"a": 1}),
        8 => json!(true),
        _ => json!(2_000_000_000u64),
    }
}

/// Replace one random value (at any depth) of `v` by [`random_json`].
fn replace_random(v: &mut serde_json::Value, rng: &mut Rng) {
    let mut cur = v;
    loop {
        let n = match cur {
            serde_json::Value::Object(m) => m.len(),
            serde_json::Value::Array(a) => a.len(),
            _ => 0,
        };
        if n == 0 || rng.random_range(0..3) == 0 {
            *cur = random_json(rng);
            return;
        }
        let i = rng.random_range(0..n);
        cur = match cur {
            serde_json::Value::Object(m) => m.values_mut().nth(i).unwrap(),
            serde_json::Value::Array(a) => &mut a[i],
            _ => unreachable!("containers only"),
        };
    }
}

/// `v` with one to three values replaced, as JSON text.
fn edit_json(v: &serde_json::Value, rng: &mut Rng) -> Vec<u8> {
    let mut v = v.clone();
    for _ in 0..rng.random_range(1..=3) {
        replace_random(&mut v, rng);
    }
    v.to_string().into_bytes()
}

#[test]
fn fuzz_model_config_metadata() {
    // A tiny model's real tensors with its config; the config text is mutated (bytes or one
    // value), and so is the whole file.
    let mut cfg = tokenar::model::GptConfig::preset("tiny").unwrap();
    cfg.vocab_size = 16;
    cfg.dim = 16;
    cfg.n_head = 2;
    cfg.caption_dim = 16;
    cfg.n_layer = 1;
    cfg.grid = (2, 2);
    cfg.caption_len = 4;
    cfg.n_instruct = 2;
    let (_, vm) = tokenar::model::build(&cfg, &Device::Cpu, 0).unwrap();
    let tensors = tokenar::weights::varmap_tensors(&vm);
    let json = serde_json::to_string(&cfg).unwrap();
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    fuzz("config-text", &[json.clone().into_bytes()], |b| load_model_file(&safetensors_with(&String::from_utf8_lossy(b), &tensors)));
    fuzz_with("config-value", &[json.clone().into_bytes()], |_, rng| edit_json(&value, rng), |b| load_model_file(&safetensors_with(&String::from_utf8_lossy(b), &tensors)));
    fuzz("safetensors-file", &[safetensors_with(&json, &tensors)], load_model_file);
}

// ---- images ------------------------------------------------------------------------------

#[test]
fn fuzz_images() {
    let rgb = image::RgbImage::from_fn(12, 8, |x, y| image::Rgb([(x * 20) as u8, (y * 30) as u8, 99]));
    let rgba = image::DynamicImage::ImageRgba8(image::RgbaImage::from_fn(6, 6, |x, y| image::Rgba([x as u8 * 40, y as u8 * 40, 7, (x * y) as u8 * 7])));
    let mut seeds = Vec::new();
    for (img, fmt) in [
        (image::DynamicImage::ImageRgb8(rgb.clone()), image::ImageFormat::Png),
        (image::DynamicImage::ImageRgb8(rgb.clone()), image::ImageFormat::Jpeg),
        (image::DynamicImage::ImageRgb8(rgb), image::ImageFormat::WebP),
        (rgba, image::ImageFormat::Png),
    ] {
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, fmt).unwrap();
        seeds.push(buf.into_inner());
    }
    fuzz("image", &seeds, |b| {
        let img = tokenar::imageio::decode(b)?;
        assert!(img.width() <= tokenar::imageio::MAX_DECODE_SIDE && img.height() <= tokenar::imageio::MAX_DECODE_SIDE);
        Ok(())
    });
}

// ---- the dataset's JSON ------------------------------------------------------------------

#[test]
fn fuzz_dataset_json() {
    use tokenar::data::{Dataset, OpenOptions};
    let root = tmp("data");
    let opts = tokenar::data::synth::SynthOptions { n: 1, size: 16, threads: 1, ..Default::default() };
    tokenar::data::synth::generate(&root.join("ds"), &opts, None).unwrap();
    let sample = root.join("ds").join(tokenar::data::synth::sample_name(0));
    let meta_path = sample.join("meta.json");
    let meta = std::fs::read(&meta_path).unwrap();
    let open = |path: &Path| -> Result<(), String> {
        let ds = Dataset::open_quiet(path, &OpenOptions::default()).map_err(err)?;
        let mut errors = Vec::new();
        for s in &ds.samples {
            if let Err(e) = s.load(8) {
                errors.push(e.to_string());
            }
        }
        if let Some((id, reason)) = ds.skipped.first() {
            errors.push(format!("{id}: {reason}"));
        }
        match errors.first() {
            Some(e) => Err(e.clone()),
            None if ds.samples.is_empty() => Err("no samples".into()),
            None => Ok(()),
        }
    };
    let ds_dir = root.join("ds");
    fuzz("meta-json", std::slice::from_ref(&meta), |b| {
        std::fs::write(&meta_path, b).unwrap();
        open(&ds_dir)
    });
    let meta_value: serde_json::Value = serde_json::from_slice(&meta).unwrap();
    fuzz_with("meta-json-value", std::slice::from_ref(&meta), |_, rng| edit_json(&meta_value, rng), |b| {
        std::fs::write(&meta_path, b).unwrap();
        open(&ds_dir)
    });
    std::fs::write(&meta_path, &meta).unwrap();
    // The same sample through a manifest line.
    let rel = |f: &str| format!("ds/{}/{f}", tokenar::data::synth::sample_name(0));
    let refs: Vec<String> = std::fs::read_dir(sample.join("ref")).unwrap().map(|e| format!("ds/{}/ref/{}", tokenar::data::synth::sample_name(0), e.unwrap().file_name().to_string_lossy())).collect();
    let line = serde_json::json!({"id": "one", "refs": refs, "background": rel("background.png"), "target": rel("real.png"), "prompt": "a thing", "meta": meta_value});
    let manifest = root.join("set.jsonl");
    fuzz("manifest-jsonl", &[format!("{line}\n").into_bytes()], |b| {
        std::fs::write(&manifest, b).unwrap();
        open(&manifest)
    });
    std::fs::remove_dir_all(&root).unwrap();
}

// ---- the server's request body -------------------------------------------------------------

#[test]
fn fuzz_api_request_body() {
    if !tokenar::pipeline::bundle::has_builtin() {
        return;
    }
    let app = tokenar::serve::App::new(tokenar::pipeline::Bundle::builtin(&Device::Cpu).unwrap());
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/demo");
    // Small images keep each case fast; the server's own fixtures are 64 px.
    let url = |name: &str| {
        let img = tokenar::imageio::load_rgb(demo.join(name), Some(16)).unwrap();
        let mut buf = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img).write_to(&mut buf, image::ImageFormat::Png).unwrap();
        tokenar::imageio::png_data_url(buf.get_ref())
    };
    let body = serde_json::json!({
        "refs": [url("ref0.png"), url("ref1.png")],
        "background": url("background.png"),
        "mask": url("mask.png"),
        "prompt": "a heart above a square",
        "seed": 3,
        "num_samples": 2,
        "cfg_scale": 3.0,
        "top_k": 100,
        "top_p": 0.9,
        "temperature": 1.0,
    });
    let text = body.to_string();
    fuzz("api-body-bytes", &[text.clone().into_bytes()], |b| app.request(b).map(|_| ()).map_err(err));
    fuzz_with("api-body-value", &[text.clone().into_bytes()], |_, rng| edit_json(&body, rng), |b| app.request(b).map(|_| ()).map_err(err));
}

// ---- the reproductions of the aborts, through the command line ------------------------------

fn tokenar_cmd(args: &[&str]) -> (i32, String, f64) {
    let t0 = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenar")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text, t0.elapsed().as_secs_f64())
}

/// Exit status 2, a message holding every one of `needles`, no panic, within `secs`.
fn refused(args: &[&str], needles: &[&str], secs: f64) {
    let (code, text, t) = tokenar_cmd(args);
    assert_eq!(code, 2, "{args:?}: {text}");
    for n in needles {
        assert!(text.contains(n), "{args:?}: `{text}` should say `{n}`");
    }
    assert!(!text.contains("panicked"), "{args:?}: {text}");
    assert!(t < secs, "{args:?} took {t:.1} s");
}

fn builtin_file(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/builtin").join(name)).unwrap()
}

/// `bytes` (a safetensors file) with its model config edited by `edit`; the tensors stay.
fn edit_config(bytes: &[u8], edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let key = tokenar::model::CONFIG_KEY;
    let mut cfg: serde_json::Value = serde_json::from_str(header["__metadata__"][key].as_str().unwrap()).unwrap();
    edit(&mut cfg);
    header["__metadata__"][key] = cfg.to_string().into();
    let mut h = header.to_string().into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

/// A torch checkpoint of a few hundred bytes whose pickle declares one tensor `w` of 2^20 x
/// 2^20 floats (4 TiB) over a storage of 16 bytes.
fn bomb_pt() -> Vec<u8> {
    fn s(p: &mut Vec<u8>, x: &str) {
        p.push(b'X');
        p.extend_from_slice(&(x.len() as u32).to_le_bytes());
        p.extend_from_slice(x.as_bytes());
    }
    fn long(p: &mut Vec<u8>, v: u64) {
        p.extend_from_slice(&[0x8a, 8]);
        p.extend_from_slice(&v.to_le_bytes());
    }
    let mut p = vec![0x80, 2, b'}'];
    s(&mut p, "model");
    p.extend_from_slice(b"ccollections\nOrderedDict\n)R(");
    s(&mut p, "tok_embeddings.weight");
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    s(&mut p, "storage");
    p.extend_from_slice(b"ctorch\nFloatStorage\n");
    s(&mut p, "0");
    s(&mut p, "cpu");
    long(&mut p, 1 << 40);
    p.extend_from_slice(b"tQK\x00(");
    long(&mut p, 1 << 20);
    long(&mut p, 1 << 20);
    p.extend_from_slice(b"t(");
    long(&mut p, 1 << 20);
    long(&mut p, 1);
    p.extend_from_slice(b"t\x89ccollections\nOrderedDict\n)RtRus.");
    rezip(&[("archive/data.pkl".into(), p), ("archive/data/0".into(), vec![0u8; 16]), ("archive/version".into(), b"3\n".to_vec())])
}

/// A PNG whose header declares 20000 x 20000 pixels (what a 389 KB PNG of one colour decodes
/// to: 1.6 GB), with a one-pixel body.
fn bomb_png() -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageLuma8(image::GrayImage::new(1, 1)).write_to(&mut buf, image::ImageFormat::Png).unwrap();
    let mut png = buf.into_inner();
    png[16..20].copy_from_slice(&20000u32.to_be_bytes());
    png[20..24].copy_from_slice(&20000u32.to_be_bytes());
    let mut c = 0xFFFF_FFFFu32;
    for &b in &png[12..29] {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    png[29..33].copy_from_slice(&(!c).to_be_bytes());
    png
}

#[test]
fn oversized_requests_are_refused_with_status_2() {
    if !tokenar::pipeline::bundle::has_builtin() {
        return;
    }
    let root = tmp("cli");
    let img = root.join("a.png");
    tokenar::imageio::save_rgb(&img, &image::RgbImage::new(16, 16)).unwrap();
    let (i, o) = (img.to_str().unwrap(), root.join("out.png"));
    let o = o.to_str().unwrap();
    let gen = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["generate", "--ref", i, "--prompt", "a star", "--out", o].iter().map(|s| s.to_string()).collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |args: Vec<String>, needles: &[&str]| refused(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>(), needles, 60.0);
    run(gen(&["--num-samples", "100000"]), &["--num-samples", "1 to 64"]);
    run(gen(&["--num-samples", "9223372036854775807"]), &["--num-samples", "1 to 64"]);

    // The built-in bundle with its config edited to claim a far larger model.
    let bundle = root.join("edited");
    std::fs::create_dir_all(&bundle).unwrap();
    for f in ["tokenizer.safetensors", "text.safetensors"] {
        std::fs::write(bundle.join(f), builtin_file(f)).unwrap();
    }
    let model = builtin_file("model.safetensors");
    let edits: Vec<(&str, Box<dyn Fn(&mut serde_json::Value)>)> = vec![
        ("vocab_size", Box::new(|c| c["vocab_size"] = 2_000_000_000u64.into())),
        ("grid rows", Box::new(|c| c["grid"] = serde_json::json!([100000, 100000]))),
        ("max_refs", Box::new(|c| c["max_refs"] = 1_000_000.into())),
        ("n_layer", Box::new(|c| c["n_layer"] = 100_000_000.into())),
        ("backbone parameters", Box::new(|c| c["n_layer"] = 64.into())),
    ];
    let b = bundle.to_str().unwrap();
    for (needle, edit) in edits {
        let m = bundle.join("model.safetensors");
        std::fs::write(&m, edit_config(&model, edit)).unwrap();
        run(gen(&["--weights", b]), &[needle, "model.safetensors"]);
        // `info` on the file refuses the config (naming the file and the field) instead of
        // reporting its imagined size.
        let (code, text, _) = tokenar_cmd(&["info", "--weights", m.to_str().unwrap()]);
        assert_eq!(code, 2, "{text}");
        assert!(text.contains(needle) && text.contains("model.safetensors") && !text.contains("TokenAR GPT:"), "{text}");
    }

    // A .pt of a few hundred bytes declaring 4 TiB.
    let pt_dir = root.join("pt");
    std::fs::create_dir_all(&pt_dir).unwrap();
    for f in ["tokenizer.safetensors", "text.safetensors"] {
        std::fs::write(pt_dir.join(f), builtin_file(f)).unwrap();
    }
    let pt = pt_dir.join("gpt.pt");
    std::fs::write(&pt, bomb_pt()).unwrap();
    run(gen(&["--weights", pt_dir.to_str().unwrap(), "--preset", "tiny"]), &["gpt.pt", "tok_embeddings.weight", "the file holds 16 bytes"]);
    refused(&["info", "--weights", pt.to_str().unwrap()], &["gpt.pt", "the file holds 16 bytes"], 60.0);

    // A decompression bomb is refused from its header.
    let bomb = root.join("bomb.png");
    std::fs::write(&bomb, bomb_png()).unwrap();
    run(gen(&["--background", bomb.to_str().unwrap()]), &["bomb.png", "20000x20000", "before decoding"]);

    // Misleading messages: a file given as the weights folder; an unknown output format.
    run(gen(&["--weights", i]), &["a.png", "is a file", "bundle folder"]);
    let gif = root.join("x.gif");
    refused(&["generate", "--ref", i, "--prompt", "a star", "--out", gif.to_str().unwrap()], &["x.gif", ".jpg"], 60.0);
    assert!(!gif.exists());

    // Sizes of other commands.
    refused(&["bench", "--dim", "1000000"], &["dim 1000000", "limit"], 60.0);
    refused(&["bench", "--train-batch", "100000"], &["--train-batch", "1 to 256"], 60.0);
    let tok = root.join("tok.safetensors");
    std::fs::write(&tok, builtin_file("tokenizer.safetensors")).unwrap();
    refused(&["tokenizer", "roundtrip", "--weights", tok.to_str().unwrap(), "--size", "2048", i, o], &["--size", "2048", "1024"], 60.0);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn generate_writes_the_format_its_extension_names_and_warns_newcomers() {
    if !tokenar::pipeline::bundle::has_builtin() {
        return;
    }
    let root = tmp("jpg");
    let big = root.join("big.png");
    tokenar::imageio::save_rgb(&big, &image::RgbImage::from_pixel(400, 300, image::Rgb([200, 10, 10]))).unwrap();
    let mask = root.join("mask.png");
    // The background's aspect at half its size: accepted, resized with the background.
    tokenar::imageio::save_rgb(&mask, &image::RgbImage::from_pixel(200, 150, image::Rgb([255, 255, 255]))).unwrap();
    let out = root.join("x.jpg");
    let (b, m, o) = (big.to_str().unwrap(), mask.to_str().unwrap(), out.to_str().unwrap());
    let (code, text, _) = tokenar_cmd(&["generate", "--ref", b, "--background", b, "--mask", m, "--prompt", "a dog next to a cat", "--out", o, "--num-samples", "2"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("warning: the built-in text encoder does not know") && text.contains("dog"), "{text}");
    assert!(text.contains("400x300") && text.contains("64x64"), "{text}");
    for i in 0..2 {
        let p = root.join(format!("x_{i}.jpg"));
        let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}\n{text}", p.display()));
        assert_eq!(&bytes[..2], &[0xFF, 0xD8], "{} is not a JPEG", p.display());
    }
    std::fs::remove_dir_all(&root).unwrap();
}
