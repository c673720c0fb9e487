//! `tokenar info`: what a checkpoint, or a folder of checkpoints, is, and whether a folder holds
//! what `generate` needs.
//!
//! Files are described from their headers (tensor names and shapes, safetensors metadata), so
//! a folder of multi-gigabyte checkpoints is described without reading their weights; a folder
//! that holds a whole bundle is then loaded once to check that its parts fit together.

use clap::Args;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tokenar::model::GptConfig;
use tokenar::pipeline::bundle::{BundlePaths, LoadHints};
use tokenar::pipeline::Bundle;
use tokenar::tokenizer::{self, VqConfig};
use tokenar::{Error, Result};

#[derive(Args)]
pub struct InfoArgs {
    /// A bundle folder, any folder of checkpoints, a single checkpoint file, or nothing for the
    /// built-in model.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Preset for a .pt GPT checkpoint.
    #[arg(long)]
    preset: Option<String>,
    /// Tokenizer preset: checked against the tokenizer file's shapes.
    #[arg(long)]
    tokenizer_preset: Option<String>,
}

fn describe_gpt(c: &GptConfig) -> String {
    let refs = match c.ref_grid {
        Some((h, w)) => format!(" (references {h}x{w}, cropped to their subject)"),
        None => String::new(),
    };
    format!(
        "family {:?}, {} layers x {} heads x dim {}, vocab {}, grid {}x{}{refs}, {} params ({} backbone); additions: index embedding {}, instruct tokens {}, ITD {}; max refs {}; layout {:?}",
        c.family,
        c.n_layer,
        c.n_head,
        c.dim,
        c.vocab_size,
        c.grid.0,
        c.grid.1,
        c.num_params(),
        c.backbone_params(),
        if c.index_embedding { "on" } else { "off" },
        c.n_instruct,
        if c.itd { "on" } else { "off" },
        c.max_refs,
        c.scheme
    )
}

/// Tensor shapes and string metadata of a checkpoint, read from its header only.
struct Header {
    shapes: HashMap<String, Vec<usize>>,
    metadata: BTreeMap<String, String>,
}

impl Header {
    fn read(path: &Path) -> Result<Self> {
        let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        match ext.as_str() {
            "safetensors" => Self::safetensors(path),
            "pt" | "pth" | "bin" | "ckpt" => Self::torch(path),
            other => Err(Error::bad_file(path, format!("unknown checkpoint extension `{other}`"))),
        }
    }

    fn safetensors(path: &Path) -> Result<Self> {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(|_| Error::bad_file(path, "not a valid safetensors file: shorter than its header"))?;
        let n = u64::from_le_bytes(len);
        let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
        if n > size.saturating_sub(8) || n > 100 << 20 {
            return Err(Error::bad_file(path, format!("not a valid safetensors file: header of {n} bytes in a file of {size}")));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| Error::bad_file(path, format!("not a valid safetensors header: {e}")))?;
        let obj = json.as_object().ok_or_else(|| Error::bad_file(path, "not a valid safetensors header: not a JSON object"))?;
        let mut shapes = HashMap::new();
        let mut metadata = BTreeMap::new();
        for (k, v) in obj {
            if k == "__metadata__" {
                for (mk, mv) in v.as_object().into_iter().flatten() {
                    metadata.insert(mk.clone(), mv.as_str().unwrap_or_default().to_string());
                }
                continue;
            }
            let shape = v
                .get("shape")
                .and_then(|s| s.as_array())
                .and_then(|s| s.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| Error::bad_file(path, format!("not a valid safetensors header: tensor `{k}` has no shape")))?;
            shapes.insert(k.clone(), shape);
        }
        Ok(Self { shapes, metadata })
    }

    /// As the loader reads `.pt` files (the project's checked reader, which never runs pickle
    /// code and checks every tensor against the bytes the file holds): the state dict under the
    /// usual keys, else the top level.
    fn torch(path: &Path) -> Result<Self> {
        let file = tokenar::weights::TensorFile::load(path, &candle_core::Device::Cpu)?;
        let shapes = file.tensors.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
        Ok(Self { shapes, metadata: BTreeMap::new() })
    }

    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.shapes.get(key).cloned()
    }

    fn values(&self) -> usize {
        self.shapes.values().map(|s| s.iter().fold(1usize, |a, &b| a.saturating_mul(b))).fold(0usize, usize::saturating_add)
    }
}

/// What one file is.
enum Kind {
    /// This project's GPT (config in the metadata).
    Gpt(Box<GptConfig>),
    /// A reference GPT (LlamaGen / EditAR / TokenAR), described from its tensors.
    ReferenceGpt(String),
    Vq(VqConfig, &'static str),
    BuiltinText(String),
    /// This project's training checkpoint: step, model groups.
    Training(String),
    /// The optimiser state of a tokenizer training run.
    TokenizerOptim(String),
    Unknown,
}

impl Kind {
    fn line(&self) -> String {
        match self {
            Kind::Gpt(c) => format!("GPT (this project's): {}", describe_gpt(c)),
            Kind::ReferenceGpt(s) => format!("GPT ({s})"),
            Kind::Vq(c, from) => {
                let preset = c.preset_name().map(|p| format!(" = preset {p}")).unwrap_or_default();
                format!("VQ tokenizer ({from}): {}{preset}", c.describe())
            }
            Kind::BuiltinText(s) => format!("text encoder (built-in): {s}"),
            Kind::Training(s) => format!("training checkpoint of this project: {s}"),
            Kind::TokenizerOptim(s) => format!("tokenizer training state (optimiser): {s}"),
            Kind::Unknown => "unknown: neither a GPT, a VQ tokenizer nor a text encoder of a known family".to_string(),
        }
    }
}

/// Count of consecutive `{prefix}{i}{suffix}` keys from 0.
fn count(h: &Header, prefix: &str, suffix: &str) -> usize {
    (0..).take_while(|i| h.shapes.contains_key(&format!("{prefix}{i}{suffix}"))).count()
}

/// A LlamaGen-family GPT described from its tensor shapes.
fn reference_gpt(h: &Header) -> Option<String> {
    let emb = h.shape("tok_embeddings.weight")?;
    let (vocab, dim) = (*emb.first()?, *emb.get(1)?);
    let layers = count(h, "layers.", ".attention.wqkv.weight");
    let family = if h.shapes.contains_key("ref_index_embeddings.weight") || h.shapes.contains_key("instruct_token_embeddings.weight") {
        "TokenAR"
    } else if h.shapes.contains_key("img_uncond_embedding") || h.shapes.contains_key("alignment.weight") {
        "EditAR"
    } else if h.shapes.contains_key("cls_embedding.embedding_table.weight") {
        "LlamaGen class-conditional (c2i, not supported: no caption projection)"
    } else {
        "LlamaGen t2i"
    };
    let mut s = format!("{family}, read from its tensors): {layers} layers, dim {dim}, vocab {vocab}");
    if let Some(w1) = h.shape("layers.0.feed_forward.w1.weight") {
        s += &format!(", FFN {}", w1[0]);
    }
    if let Some(fc1) = h.shape("cls_embedding.cap_proj.fc1.weight") {
        s += &format!(", caption width {}", fc1.get(1).copied().unwrap_or(0));
    }
    if let Some(r) = h.shape("ref_index_embeddings.weight") {
        s += &format!(", {} condition slots", r[0]);
    }
    if let Some(i) = h.shape("instruct_token_embeddings.weight") {
        if dim > 0 {
            s += &format!(", {} instruct tokens", i.last().copied().unwrap_or(0) / dim);
        }
    }
    if h.shapes.contains_key("alignment.weight") {
        s += ", alignment head";
    }
    if let Some(p) = ["B", "L", "XL", "XXL"].into_iter().find(|p| GptConfig::preset(p).map(|c| c.n_layer == layers && c.dim == dim).unwrap_or(false)) {
        s += &format!(" (the size of preset {p})");
    }
    Some(s)
}

fn classify(path: &Path, h: &Header) -> Result<Kind> {
    use tokenar::train::checkpoint::{GROUPS_KEY, STEP_KEY};
    if let Some(step) = h.metadata.get(STEP_KEY) {
        let groups = h.metadata.get(GROUPS_KEY).cloned().unwrap_or_else(|| "?".into());
        return Ok(Kind::Training(format!(
            "step {step}, model groups {groups}, {} tensors (weights and optimiser state); resume it with `tokenar train --config CONFIG --resume`, whose run writes the bundle to `export/` when it ends",
            h.shapes.len()
        )));
    }
    if h.metadata.contains_key(tokenar::model::load::CONFIG_KEY) {
        let c: GptConfig = serde_json::from_str(&h.metadata[tokenar::model::load::CONFIG_KEY])
            .map_err(|e| Error::bad_file(path, format!("bad model config in metadata: {e}")))?;
        // A config edited to claim more than the file holds is reported, not described.
        c.check_fits_values(h.values()).map_err(|e| Error::bad_file(path, format!("model config in metadata: {e}")))?;
        return Ok(Kind::Gpt(Box::new(c)));
    }
    if h.metadata.contains_key(tokenar::text::builtin::CONFIG_KEY) {
        let cfg: serde_json::Value = serde_json::from_str(&h.metadata[tokenar::text::builtin::CONFIG_KEY]).unwrap_or_default();
        let words = h.metadata.get(tokenar::text::builtin::VOCAB_KEY).and_then(|v| tokenar::text::WordVocab::from_json(v).ok()).map(|v| v.len());
        return Ok(Kind::BuiltinText(format!(
            "{} words, {}-d, {} layers",
            words.map(|w| w.to_string()).unwrap_or_else(|| "?".into()),
            cfg.get("dim").unwrap_or(&serde_json::Value::Null),
            cfg.get("n_layer").unwrap_or(&serde_json::Value::Null)
        )));
    }
    if h.metadata.contains_key(tokenar::tokenizer::train::META_STEP) && !h.metadata.contains_key(tokenizer::META_CONFIG) {
        return Ok(Kind::TokenizerOptim(format!("step {}", h.metadata[tokenar::tokenizer::train::META_STEP])));
    }
    let from = if h.metadata.contains_key(tokenizer::META_CONFIG) { "this project's" } else { "LlamaGen layout, read from its tensors" };
    match tokenizer::config_of(path, &h.metadata, &|k| h.shape(k))? {
        tokenizer::Found::Metadata(c) | tokenizer::Found::Shapes(c) => return Ok(Kind::Vq(c, from)),
        tokenizer::Found::Nothing => {}
    }
    Ok(match reference_gpt(h) {
        Some(s) => Kind::ReferenceGpt(s),
        None => Kind::Unknown,
    })
}

fn is_checkpoint(p: &Path) -> bool {
    let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    p.is_file() && matches!(ext.as_str(), "safetensors" | "pt" | "pth" | "bin" | "ckpt")
}

/// A flan-t5 style folder: its one-line description, or `None` when `dir` is not one.
fn t5_folder(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    if json.get("model_type").and_then(|v| v.as_str()) != Some("t5") {
        return None;
    }
    let field = |k: &str| json.get(k).and_then(|v| v.as_u64()).map(|v| v.to_string()).unwrap_or_else(|| "?".into());
    let mut s = format!("T5 text encoder: d_model {}, {} layers, {} heads, vocab {}", field("d_model"), field("num_layers"), field("num_heads"), field("vocab_size"));
    if !dir.join("tokenizer.json").is_file() {
        s += "; no tokenizer.json (needed)";
    }
    if tokenar::text::t5::weight_files(dir).is_err() {
        s += "; no model.safetensors or shards (needed)";
    }
    Some(s)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

/// What a folder's files are, one level deep.
struct Listing {
    /// (path shown, description) in order.
    lines: Vec<(String, String)>,
    has_vq: bool,
    has_gpt: bool,
    has_text: bool,
}

fn list(dir: &Path, depth: usize) -> Result<Listing> {
    let mut out = Listing { lines: Vec::new(), has_vq: false, has_gpt: false, has_text: false };
    for p in sorted_entries(dir)? {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if p.is_dir() {
            if let Some(s) = t5_folder(&p) {
                out.has_text = true;
                out.lines.push((format!("{name}/"), s));
            } else if depth == 0 {
                let sub = list(&p, 1)?;
                out.lines.extend(sub.lines.into_iter().map(|(n, s)| (format!("{name}/{n}"), s)));
                if sub.has_vq && sub.has_gpt && sub.has_text {
                    out.lines.push((format!("{name}/"), format!("holds a whole bundle: pass --weights {}", p.display())));
                }
            }
            continue;
        }
        if !is_checkpoint(&p) {
            continue;
        }
        let line = match Header::read(&p).and_then(|h| classify(&p, &h).map(|k| (k, h))) {
            Ok((k, h)) => {
                match k {
                    Kind::Gpt(_) | Kind::ReferenceGpt(_) => out.has_gpt = true,
                    Kind::Vq(..) => out.has_vq = true,
                    Kind::BuiltinText(_) => out.has_text = true,
                    _ => {}
                }
                format!("{} [{} tensors, {} values]", k.line(), h.shapes.len(), h.values())
            }
            Err(e) => format!("unreadable: {e}"),
        };
        out.lines.push((name, line));
    }
    Ok(out)
}

pub fn run(a: InfoArgs) -> anyhow::Result<()> {
    let device = candle_core::Device::Cpu;
    let hints = LoadHints { preset: a.preset.clone(), tokenizer_preset: a.tokenizer_preset.clone(), ..Default::default() };
    let bundle = match &a.weights {
        None => Bundle::builtin(&device)?,
        Some(p) if p.is_dir() => {
            let listing = list(p, 0)?;
            println!("folder {}", p.display());
            if listing.lines.is_empty() {
                println!("  (no checkpoints: no .safetensors, .pt, .pth, .bin or .ckpt files, no T5 folder)");
            }
            for (name, line) in &listing.lines {
                println!("  {name}: {line}");
            }
            let mut missing = Vec::new();
            if !listing.has_vq {
                missing.push("a VQ tokenizer (`tokenizer.safetensors` or a LlamaGen `vq*.pt`)");
            }
            if !listing.has_gpt {
                missing.push("a GPT (`model.safetensors` or a LlamaGen / EditAR / TokenAR `.pt`)");
            }
            if !listing.has_text {
                missing.push("a text encoder (`text.safetensors` or a flan-t5 folder `t5/`)");
            }
            if !missing.is_empty() {
                println!("to generate, this folder lacks {}", missing.join(", "));
                return Ok(());
            }
            let paths = match BundlePaths::find(p) {
                Ok(paths) => paths,
                Err(e) => {
                    println!("to generate: the parts are here but the bundle loader cannot pick them: {e}");
                    return Ok(());
                }
            };
            println!("to generate, `--weights {}` loads:\n  tokenizer: {}\n  model: {}", p.display(), paths.tokenizer.display(), paths.model.display());
            match Bundle::load(p, &hints, &device) {
                Ok(b) => b,
                Err(e) => {
                    println!("but loading fails: {e}");
                    return Ok(());
                }
            }
        }
        Some(p) => {
            let h = Header::read(p)?;
            let kind = classify(p, &h)?;
            println!("{}: {} tensors, {} values", p.display(), h.shapes.len(), h.values());
            println!("{}", kind.line());
            if let (Kind::Vq(c, _), Some(tp)) = (&kind, &a.tokenizer_preset) {
                let pc = VqConfig::preset(tp)?;
                if !pc.same_architecture(c) {
                    anyhow::bail!("{}: holds a tokenizer of {} but preset `{tp}` is {}", p.display(), c.describe(), pc.describe());
                }
                println!("matches preset `{tp}`");
            }
            if let Kind::ReferenceGpt(_) = kind {
                if a.preset.is_none() {
                    println!("(no config in the file: its architecture is read from its tensors; --preset checks it)");
                }
            }
            return Ok(());
        }
    };
    println!("source: {}", bundle.source);
    println!("tokenizer: {}", bundle.vq.config().describe());
    println!("text encoder: {}", bundle.text.describe());
    println!("GPT: {}", describe_gpt(bundle.config()));
    println!("image size: {} px", bundle.image_size());
    let sp = &bundle.sampling;
    println!("sampling: cfg {} top-k {} top-p {} temperature {}", sp.cfg_scale, sp.top_k, sp.top_p, sp.temperature);
    Ok(())
}
