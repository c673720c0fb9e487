//! The code cache: a dataset run once through the image tokenizer (and the text encoder when
//! there is one), stored as safetensors shards plus `index.json`, so training reads codes
//! instead of decoding images. Writing is resumable: shards are written whole and atomically,
//! and the index lists only finished shards, so a rerun skips the samples already stored.
//!
//! Shard `shard_<k>.safetensors` holds `codes` (images x h*w, u32; when the references were
//! encoded on a grid of their own, see [`EncodeOptions::ref_size`], they are in `ref_codes`,
//! references x rh*rw, instead), with text `text`
//! (samples x L x D, f32) and `text_mask` (samples x L, u8), and, for samples whose meta gives
//! every subject's mask, `owners` (samples x h*w, u8: which subject each target code cell shows,
//! see [`owner_grid`]), and, when the cache was encoded with a distillation encoder, `distill`
//! (targets x n x D, f16: the frozen encoder's features of each target image, see
//! [`encode_with_features`]). The index maps each sample to its rows.

use super::format::Dataset;
use crate::error::{Error, IoContext, Result};
use crate::imageio::rgb_to_tensor;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const INDEX: &str = "index.json";
/// Samples per shard unless the writer is told otherwise.
pub const DEFAULT_SHARD_SAMPLES: usize = 1024;

/// One sample as codes: every image a row-major (h, w) grid of token ids.
#[derive(Debug, Clone)]
pub struct CachedSample {
    pub id: String,
    pub refs: Vec<Vec<u32>>,
    pub background: Vec<u32>,
    /// Empty when the sample has no target.
    pub target: Vec<u32>,
    /// (h, w) of the background's and the target's code grids (and of the references' unless
    /// `ref_grid` says otherwise).
    pub grid: (usize, usize),
    /// (h, w) of the references' code grids when they were encoded on a grid of their own
    /// (cropped to their subject at [`EncodeOptions::ref_size`] px).
    pub ref_grid: Option<(usize, usize)>,
    pub prompt: String,
    /// Text features (L x D) and the mask of valid positions (L, 1 = token, 0 = padding).
    pub text: Option<(Tensor, Vec<u8>)>,
    /// Which subject each target code cell shows (h*w, row-major; 0 = none, k + 1 = subject k),
    /// when the sample's meta gives every subject's mask. See [`owner_grid`].
    pub owners: Option<Vec<u8>>,
    /// The distillation target: the frozen image encoder's features of the target image
    /// (n x D), when the cache holds them; read back as stored (f16: half the memory of a
    /// training run that holds every sample's features).
    pub distill: Option<Tensor>,
}

/// Which subject each code cell of a `grid` shows, from the subjects' own masks (all the same
/// size, a multiple of the grid): subject k (stored as k + 1) when it covers the most pixels of
/// the cell among the subjects (ties to the lower index) and at least a quarter of the cell,
/// otherwise 0.
pub fn owner_grid(masks: &[image::GrayImage], grid: (usize, usize)) -> Result<Vec<u8>> {
    let (h, w) = grid;
    let Some(first) = masks.first() else {
        return Ok(vec![0; h * w]);
    };
    let (mw, mh) = first.dimensions();
    if masks.len() > 254 || masks.iter().any(|m| m.dimensions() != (mw, mh)) || h == 0 || w == 0 || mh as usize % h != 0 || mw as usize % w != 0 {
        return Err(Error::invalid(
            "subject masks",
            format!("{} masks of {mw}x{mh} px do not tile a {h}x{w} code grid (same size, a multiple of the grid)", masks.len()),
        ));
    }
    let (ch, cw) = (mh as usize / h, mw as usize / w);
    let mut out = vec![0u8; h * w];
    for (cell, o) in out.iter_mut().enumerate() {
        let (r, c) = (cell / w, cell % w);
        let count = |m: &image::GrayImage| {
            (0..ch)
                .flat_map(|dy| (0..cw).map(move |dx| (dx, dy)))
                .filter(|&(dx, dy)| m.get_pixel((c * cw + dx) as u32, (r * ch + dy) as u32)[0] > 127)
                .count()
        };
        let (best, n) = masks.iter().map(count).enumerate().fold((0, 0), |acc, (k, n)| if n > acc.1 { (k, n) } else { acc });
        if n > 0 && n * 4 >= ch * cw {
            *o = best as u8 + 1;
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Entry {
    id: String,
    shard: usize,
    refs: Vec<usize>,
    background: usize,
    target: Option<usize>,
    prompt: String,
    text: Option<usize>,
    #[serde(default)]
    owners: Option<usize>,
    #[serde(default)]
    distill: Option<usize>,
}

/// What made a cache: the tokenizer (by content), the dataset (by path and content) and the
/// text encoder. A cache refuses to be resumed by another maker (see
/// [`CacheWriter::create_or_resume_for`]), and training refuses a tokenizer other than the
/// cache's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheMaker {
    /// The tokenizer file as given, and its content fingerprint
    /// ([`super::provenance::file_fingerprint`]).
    pub tokenizer_path: String,
    pub tokenizer: String,
    #[serde(default)]
    pub tokenizer_preset: Option<String>,
    /// The dataset's canonical path and content identity
    /// ([`super::provenance::dataset_identity`]).
    pub dataset_path: String,
    pub dataset: String,
    /// The text-feature encoder folder (T5), if features were stored.
    #[serde(default)]
    pub text: Option<String>,
    /// The encoder of the distillation features (file, fingerprint, architecture), if
    /// features were stored.
    #[serde(default)]
    pub distill: Option<String>,
    /// The side the references were cropped to their subject and encoded at, when not the
    /// image size ([`EncodeOptions::ref_size`]).
    #[serde(default)]
    pub ref_size: Option<u32>,
}

impl CacheMaker {
    /// The maker of a cache encoded from `ds` with the tokenizer file `tokenizer` (and its
    /// preset) and, when given, the text encoder folder `text`.
    pub fn new(ds: &Dataset, tokenizer: &Path, preset: Option<&str>, text: Option<&Path>) -> Result<Self> {
        let root = ds.root.canonicalize().unwrap_or_else(|_| ds.root.clone());
        Ok(Self {
            tokenizer_path: tokenizer.display().to_string(),
            tokenizer: super::provenance::file_fingerprint(tokenizer)?,
            tokenizer_preset: preset.map(str::to_string),
            dataset_path: root.display().to_string(),
            dataset: super::provenance::dataset_identity(ds),
            text: text.map(|t| t.canonicalize().unwrap_or_else(|_| t.to_path_buf()).display().to_string()),
            distill: None,
            ref_size: None,
        })
    }

    /// This maker with distillation features from the encoder `description`.
    pub fn with_distill(mut self, description: &str) -> Self {
        self.distill = Some(description.to_string());
        self
    }

    /// How `other` differs from this maker, one phrase per difference (empty when equal).
    pub fn differences(&self, other: &CacheMaker) -> Vec<String> {
        let mut out = Vec::new();
        if self.tokenizer != other.tokenizer || self.tokenizer_preset != other.tokenizer_preset {
            out.push(format!(
                "tokenizer {} (fingerprint {}) vs {} (fingerprint {})",
                self.tokenizer_path, self.tokenizer, other.tokenizer_path, other.tokenizer
            ));
        }
        if self.dataset_path != other.dataset_path {
            out.push(format!("dataset {} vs {}", self.dataset_path, other.dataset_path));
        } else if self.dataset != other.dataset {
            out.push(format!("dataset {} has changed (content identity {} vs {})", self.dataset_path, self.dataset, other.dataset));
        }
        if self.text != other.text {
            let t = |t: &Option<String>| t.clone().unwrap_or_else(|| "none".into());
            out.push(format!("text features {} vs {}", t(&self.text), t(&other.text)));
        }
        if self.distill != other.distill {
            let t = |t: &Option<String>| t.clone().unwrap_or_else(|| "none".into());
            out.push(format!("distillation features {} vs {}", t(&self.distill), t(&other.distill)));
        }
        if self.ref_size != other.ref_size {
            let t = |t: Option<u32>| t.map_or("the image size".to_string(), |v| format!("{v} px cropped to the subject"));
            out.push(format!("references encoded at {} vs {}", t(self.ref_size), t(other.ref_size)));
        }
        out
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Index {
    version: u32,
    /// What made the cache (absent in caches written before it was recorded, or by a caller
    /// that gave none).
    #[serde(default)]
    maker: Option<CacheMaker>,
    /// Image size the codes were computed at.
    size: u32,
    grid: Option<(usize, usize)>,
    /// The references' code grid when they are stored apart (`ref_codes`).
    #[serde(default)]
    ref_grid: Option<(usize, usize)>,
    /// (tokens, width) of the distillation features, when stored.
    #[serde(default)]
    distill: Option<(usize, usize)>,
    shards: Vec<String>,
    samples: Vec<Entry>,
    /// Samples that could not be loaded, with the reason.
    skipped: Vec<(String, String)>,
    complete: bool,
}

fn shard_name(k: usize) -> String {
    format!("shard_{k:05}.safetensors")
}

/// Appends samples and writes a shard every `shard_samples` samples.
pub struct CacheWriter {
    dir: PathBuf,
    index: Index,
    shard_samples: usize,
    pending: Vec<CachedSample>,
}

impl CacheWriter {
    /// Create a cache at `dir`, or resume the one there (its image size must match).
    pub fn create_or_resume(dir: &Path, size: u32, shard_samples: usize) -> Result<Self> {
        Self::create_or_resume_for(dir, size, shard_samples, None, false)
    }

    /// As [`CacheWriter::create_or_resume`], recording `maker`. A cache already at `dir` is
    /// resumed only when it was made by the same maker at the same size; otherwise this is an
    /// error naming the folder and the difference, unless `force`, which deletes the old
    /// cache's files (`index.json`, the shards) and starts a new one. A folder holding other
    /// files but no `index.json` is refused (with or without `force`) unless it is empty.
    pub fn create_or_resume_for(dir: &Path, size: u32, shard_samples: usize, maker: Option<&CacheMaker>, force: bool) -> Result<Self> {
        if size == 0 {
            return Err(Error::invalid("image size", "0 px (must be at least 1)"));
        }
        std::fs::create_dir_all(dir).with_path(dir)?;
        let index_path = dir.join(INDEX);
        let fresh = || Index { version: 1, maker: maker.cloned(), size, grid: None, ref_grid: None, distill: None, shards: vec![], samples: vec![], skipped: vec![], complete: false };
        let index = if index_path.is_file() {
            let old = read_index(&index_path);
            let mut why = match &old {
                Err(e) => vec![e.to_string()],
                Ok(idx) if idx.size != size => vec![format!("cache was written at {} px, asked to resume at {size} px", idx.size)],
                Ok(idx) => match (&idx.maker, maker) {
                    (Some(a), Some(b)) => a.differences(b),
                    (None, Some(_)) => vec!["the cache records no tokenizer and dataset (written by an older version), so it cannot be resumed safely".into()],
                    _ => Vec::new(),
                },
            };
            if why.is_empty() {
                old?
            } else if force {
                remove_cache_files(dir)?;
                why.clear();
                eprintln!("--force: deleted the old cache in {} (index.json and its shards)", dir.display());
                fresh()
            } else {
                return Err(Error::bad_file(
                    dir,
                    format!(
                        "holds a code cache made otherwise: {}; use another --out folder, or --force to delete this cache and encode afresh",
                        why.join("; ")
                    ),
                ));
            }
        } else {
            let foreign: Vec<String> = std::fs::read_dir(dir)
                .with_path(dir)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !is_cache_file(n))
                .collect();
            if !foreign.is_empty() {
                return Err(Error::bad_file(
                    dir,
                    format!("is not empty and holds no code cache ({} other entries, e.g. {}); choose an empty or new --out folder", foreign.len(), foreign[0]),
                ));
            }
            // Shards without an index (an interrupted first shard) are not part of any cache.
            remove_cache_files(dir)?;
            fresh()
        };
        Ok(Self { dir: dir.to_path_buf(), index, shard_samples: shard_samples.max(1), pending: Vec::new() })
    }

    /// The references' code grid when they are stored apart (known once a sample is stored).
    pub fn ref_grid(&self) -> Option<(usize, usize)> {
        self.index.ref_grid
    }

    /// Samples stored so far (finished shards and pending).
    pub fn stored(&self) -> usize {
        self.index.samples.len() + self.pending.len()
    }

    /// Ids already stored (or recorded as skipped) by an earlier run.
    pub fn done_ids(&self) -> HashSet<String> {
        self.index
            .samples
            .iter()
            .map(|e| e.id.clone())
            .chain(self.index.skipped.iter().map(|s| s.0.clone()))
            .collect()
    }

    pub fn skip(&mut self, id: &str, reason: &str) {
        self.index.skipped.push((id.to_string(), reason.to_string()));
    }

    pub fn push(&mut self, s: CachedSample) -> Result<()> {
        match self.index.grid {
            Some(g) if g != s.grid => {
                return Err(Error::invalid("code grid", format!("sample {} has {:?}, the cache {:?}", s.id, s.grid, g)))
            }
            _ => self.index.grid = Some(s.grid),
        }
        if self.index.samples.is_empty() && self.pending.is_empty() {
            self.index.ref_grid = s.ref_grid;
        } else if self.index.ref_grid != s.ref_grid {
            return Err(Error::invalid("reference code grid", format!("sample {} has {:?}, the cache {:?}", s.id, s.ref_grid, self.index.ref_grid)));
        }
        let n = s.grid.0 * s.grid.1;
        let rn = s.ref_grid.map_or(n, |(h, w)| h * w);
        if s.refs.iter().any(|c| c.len() != rn) || s.background.len() != n || !(s.target.is_empty() || s.target.len() == n) {
            return Err(Error::invalid("codes", format!("sample {}: a code list is not {n} long ({rn} for a reference)", s.id)));
        }
        if s.owners.as_ref().is_some_and(|o| o.len() != n) {
            return Err(Error::invalid("owners", format!("sample {}: the owner grid is not {n} long", s.id)));
        }
        if let Some(f) = &s.distill {
            let shape = f.dims2().map_err(|_| Error::invalid("distillation features", format!("sample {}: shape {:?}, (tokens, width) expected", s.id, f.dims())))?;
            if s.target.is_empty() {
                return Err(Error::invalid("distillation features", format!("sample {} has features but no target", s.id)));
            }
            match self.index.distill {
                Some(want) if want != shape => {
                    return Err(Error::invalid("distillation features", format!("sample {} has {shape:?}, the cache {want:?}", s.id)))
                }
                _ => self.index.distill = Some(shape),
            }
        }
        self.pending.push(s);
        if self.pending.len() >= self.shard_samples {
            self.flush()?;
        }
        Ok(())
    }

    /// Write the pending samples as one shard and record it in the index.
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return self.write_index();
        }
        let k = self.index.shards.len();
        let n = self.index.grid.map_or(0, |g| g.0 * g.1);
        let apart = self.index.ref_grid;
        let mut codes = CodeRows::default();
        // References stored apart (`ref_codes`), or among the other codes.
        let mut ref_codes = CodeRows::default();
        let mut texts = Vec::new();
        let mut masks: Vec<u8> = Vec::new();
        let mut owners: Vec<u8> = Vec::new();
        let mut feats = Vec::new();
        let mut entries = Vec::new();
        for s in self.pending.drain(..) {
            let ref_dst = if apart.is_some() { &mut ref_codes } else { &mut codes };
            let refs = s.refs.iter().map(|c| ref_dst.push(c)).collect();
            let background = codes.push(&s.background);
            let target = (!s.target.is_empty()).then(|| codes.push(&s.target));
            let text = match &s.text {
                Some((t, m)) => {
                    texts.push(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.unsqueeze(0)?);
                    masks.extend_from_slice(m);
                    Some(texts.len() - 1)
                }
                None => None,
            };
            let owner_row = s.owners.map(|o| {
                owners.extend_from_slice(&o);
                owners.len() / n.max(1) - 1
            });
            let distill = match &s.distill {
                Some(f) => {
                    feats.push(f.to_device(&Device::Cpu)?.to_dtype(DType::F16)?.unsqueeze(0)?);
                    Some(feats.len() - 1)
                }
                None => None,
            };
            entries.push(Entry { id: s.id, shard: k, refs, background, target, prompt: s.prompt, text, owners: owner_row, distill });
        }
        let mut tensors = HashMap::new();
        tensors.insert("codes".to_string(), Tensor::from_vec(codes.values, (codes.rows, n), &Device::Cpu)?);
        if let Some((rh, rw)) = apart {
            tensors.insert("ref_codes".to_string(), Tensor::from_vec(ref_codes.values, (ref_codes.rows, rh * rw), &Device::Cpu)?);
        }
        if !owners.is_empty() {
            let r = owners.len() / n.max(1);
            tensors.insert("owners".to_string(), Tensor::from_vec(owners, (r, n), &Device::Cpu)?);
        }
        if !texts.is_empty() {
            let text = Tensor::cat(&texts, 0)?;
            let (b, l, _) = text.dims3()?;
            if masks.len() != b * l {
                return Err(Error::invalid("text mask", format!("{} values for {b} x {l} text positions", masks.len())));
            }
            tensors.insert("text_mask".to_string(), Tensor::from_vec(masks, (b, l), &Device::Cpu)?);
            tensors.insert("text".to_string(), text);
        }
        if !feats.is_empty() {
            tensors.insert("distill".to_string(), Tensor::cat(&feats, 0)?);
        }
        crate::weights::save_safetensors(self.dir.join(shard_name(k)), &tensors, &BTreeMap::new())?;
        self.index.shards.push(shard_name(k));
        self.index.samples.extend(entries);
        self.write_index()
    }

    fn write_index(&self) -> Result<()> {
        let text = serde_json::to_string(&self.index).map_err(|e| Error::invalid("cache index", e.to_string()))?;
        crate::util::atomic_write(self.dir.join(INDEX), text.as_bytes())
    }

    /// Flush and mark the cache complete.
    pub fn finish(mut self) -> Result<()> {
        self.flush()?;
        self.index.complete = true;
        self.write_index()
    }
}

/// The code lists of one shard tensor, a row each.
#[derive(Default)]
struct CodeRows {
    values: Vec<u32>,
    rows: usize,
}

impl CodeRows {
    /// Append `codes` as the next row; its index.
    fn push(&mut self, codes: &[u32]) -> usize {
        self.values.extend_from_slice(codes);
        self.rows += 1;
        self.rows - 1
    }
}

/// A file a cache writes: the index, a shard, or a temporary file of either.
fn is_cache_file(name: &str) -> bool {
    let base = name.strip_prefix('.').map(|n| n.rsplit_once('.').map_or(n, |(b, _)| b)).map(|n| n.rsplit_once('.').map_or(n, |(b, _)| b));
    let plain = |n: &str| n == INDEX || (n.starts_with("shard_") && n.ends_with(".safetensors"));
    plain(name) || (name.ends_with(".tmp") && base.is_some_and(|b| plain(b) || b.starts_with("index") || b.starts_with("shard_")))
}

/// Delete the files of a cache (index, shards, temporary files) in `dir`, nothing else.
fn remove_cache_files(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_path(dir)? {
        let e = e.with_path(dir)?;
        let name = e.file_name().to_string_lossy().into_owned();
        if is_cache_file(&name) && e.path().is_file() {
            match std::fs::remove_file(e.path()) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(e.path(), err)),
                _ => {}
            }
        }
    }
    Ok(())
}

fn read_index(path: &Path) -> Result<Index> {
    let text = std::fs::read_to_string(path).with_path(path)?;
    serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("invalid cache index: {e}")))
}

/// Reads a cache; shards are loaded on demand, one kept in memory at a time.
pub struct CacheReader {
    dir: PathBuf,
    index: Index,
    loaded: Mutex<Option<(usize, HashMap<String, Tensor>)>>,
}

impl CacheReader {
    pub fn open(dir: &Path) -> Result<Self> {
        let index = read_index(&dir.join(INDEX))?;
        Ok(Self { dir: dir.to_path_buf(), index, loaded: Mutex::new(None) })
    }

    pub fn len(&self) -> usize {
        self.index.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.samples.is_empty()
    }

    /// Whether the writer finished (false after an interrupted run).
    pub fn is_complete(&self) -> bool {
        self.index.complete
    }

    pub fn size(&self) -> u32 {
        self.index.size
    }

    pub fn skipped(&self) -> &[(String, String)] {
        &self.index.skipped
    }

    /// What made the cache, when recorded.
    pub fn maker(&self) -> Option<&CacheMaker> {
        self.index.maker.as_ref()
    }

    /// (tokens, width) of the distillation features, when the cache holds them.
    pub fn distill_shape(&self) -> Option<(usize, usize)> {
        self.index.distill
    }

    /// The directory of the cache.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.index.samples.iter().map(|e| e.id.as_str())
    }

    pub fn get(&self, i: usize) -> Result<CachedSample> {
        let e = self.index.samples.get(i).ok_or_else(|| {
            Error::invalid("cache sample index", format!("{i} (the cache holds {})", self.len()))
        })?;
        let grid = self.index.grid.unwrap_or((0, 0));
        let shard_file = self.index.shards.get(e.shard).ok_or_else(|| {
            Error::bad_file(self.dir.join(INDEX), format!("sample {} refers to missing shard {}", e.id, e.shard))
        })?;
        let shard = self.dir.join(shard_file);
        let mut guard = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().map(|(k, _)| *k) != Some(e.shard) {
            let path = shard.clone();
            let bytes = std::fs::read(&path).with_path(&path)?;
            let t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
                .map_err(|err| Error::bad_file(&path, format!("cannot read shard: {err}")))?;
            *guard = Some((e.shard, t));
        }
        let (_, t) = guard.as_ref().ok_or_else(|| Error::invalid("cache", "shard not loaded"))?;
        let get = |k: &str| t.get(k).ok_or_else(|| Error::bad_file(&shard, format!("missing tensor `{k}`")));
        let codes = get("codes")?;
        let row = |r: usize| -> Result<Vec<u32>> { Ok(codes.get(r)?.to_vec1::<u32>()?) };
        let ref_codes = match self.index.ref_grid {
            Some(_) if !e.refs.is_empty() => Some(get("ref_codes")?),
            _ => None,
        };
        let ref_row = |r: usize| -> Result<Vec<u32>> {
            match ref_codes {
                Some(t) => Ok(t.get(r)?.to_vec1::<u32>()?),
                None => row(r),
            }
        };
        let text = match e.text {
            Some(r) => {
                let mask = get("text_mask")?.get(r)?.to_vec1::<u8>()?;
                Some((get("text")?.get(r)?, mask))
            }
            None => None,
        };
        Ok(CachedSample {
            id: e.id.clone(),
            refs: e.refs.iter().map(|&r| ref_row(r)).collect::<Result<_>>()?,
            background: row(e.background)?,
            target: e.target.map(row).transpose()?.unwrap_or_default(),
            grid,
            ref_grid: self.index.ref_grid,
            prompt: e.prompt.clone(),
            text,
            owners: e.owners.map(|r| get("owners")?.get(r)?.to_vec1::<u8>().map_err(Error::from)).transpose()?,
            distill: e.distill.map(|r| get("distill")?.get(r).map_err(Error::from)).transpose()?,
        })
    }
}

/// Each image's codes, flattened row by row, and the grid they lie on.
type EncodedImages = (Vec<Vec<u32>>, (usize, usize));

/// Codes of `images` (all one size) through `encode_images`: one row-major list per image,
/// and their grid.
fn encode_codes(images: &[image::RgbImage], encode_images: ImageEncoder) -> Result<EncodedImages> {
    let ts = images.iter().map(|i| rgb_to_tensor(i, &Device::Cpu)).collect::<Result<Vec<_>>>()?;
    let codes = encode_images(&Tensor::stack(&ts, 0)?)?;
    let (b, h, w) = codes.dims3()?;
    if b != images.len() {
        return Err(Error::invalid("image encoder output", format!("{b} code grids for {} images", images.len())));
    }
    Ok((codes.to_dtype(DType::U32)?.flatten_from(1)?.to_vec2::<u32>()?, (h, w)))
}

/// The image encoder: (B, 3, H, W) in [-1, 1] -> (B, h, w) u32 codes.
pub type ImageEncoder<'a> = &'a mut dyn FnMut(&Tensor) -> Result<Tensor>;
/// The text encoder: prompts -> ((B, L, D) features, (B, L) mask of valid positions).
pub type TextEncoder<'a> = &'a mut dyn FnMut(&[String]) -> Result<(Tensor, Tensor)>;

/// The distillation encoder: target images (B, 3, H, W) in [-1, 1] and the code grid (h, w)
/// -> features (B, n, D) (see [`crate::eval::nets::dinov2::Dinov2Features::features_for_grid`]).
pub type FeatureEncoder<'a> = &'a mut dyn FnMut(&Tensor, (usize, usize)) -> Result<Tensor>;

/// What an encoding run did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EncodeSummary {
    /// Samples of the dataset.
    pub total: usize,
    /// Samples this run encoded and stored.
    pub stored: usize,
    /// Samples already stored by an earlier run (resumed).
    pub already: usize,
    /// Samples this run could not load (recorded in the index with the reason).
    pub skipped: usize,
    /// The first of those (id, reason).
    pub first_skipped: Option<(String, String)>,
    /// Samples in the cache now.
    pub in_cache: usize,
}

/// How [`encode`] writes a cache.
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    /// Image side the tokenizer sees.
    pub size: u32,
    /// Samples per call of the encoders.
    pub batch: usize,
    /// Samples per shard (the unit of resumption).
    pub shard_samples: usize,
    /// What makes the cache (recorded; a cache made otherwise is not resumed).
    pub maker: Option<CacheMaker>,
    /// Delete a cache made otherwise instead of refusing it.
    pub force: bool,
    /// Encode each reference cropped to its subject at this side
    /// ([`crate::imageio::reference_view`]), on a code grid of its own, instead of whole at
    /// `size` (`None`). Recorded in the maker.
    pub ref_size: Option<u32>,
}

impl EncodeOptions {
    pub fn new(size: u32, batch: usize) -> Self {
        Self { size, batch, shard_samples: DEFAULT_SHARD_SAMPLES, maker: None, force: false, ref_size: None }
    }
}

/// Encode every sample of `ds` at `size` px into a cache at `out`, `batch` samples per call of
/// the encoders. Resumes a cache already at `out`. Samples whose images cannot be loaded are
/// recorded as skipped (with a warning). `progress` gets (samples done, total).
pub fn encode_dataset(
    ds: &Dataset,
    out: &Path,
    size: u32,
    encode_images: ImageEncoder,
    encode_text: Option<TextEncoder>,
    batch: usize,
    progress: Option<&dyn Fn(usize, usize)>,
) -> Result<EncodeSummary> {
    encode_dataset_sharded(ds, out, size, encode_images, encode_text, batch, DEFAULT_SHARD_SAMPLES, progress)
}

/// As [`encode_dataset`] with `shard_samples` samples per shard (the unit of resumption).
#[allow(clippy::too_many_arguments)]
pub fn encode_dataset_sharded(
    ds: &Dataset,
    out: &Path,
    size: u32,
    encode_images: ImageEncoder,
    encode_text: Option<TextEncoder>,
    batch: usize,
    shard_samples: usize,
    progress: Option<&dyn Fn(usize, usize)>,
) -> Result<EncodeSummary> {
    let opts = EncodeOptions { shard_samples, ..EncodeOptions::new(size, batch) };
    encode(ds, out, &opts, encode_images, encode_text, progress)
}

/// Encode `ds` into a cache at `out` as `opts` says (see [`encode_dataset`]). When no sample is
/// in the cache at the end (every one skipped), this is an error naming the first reason.
pub fn encode(
    ds: &Dataset,
    out: &Path,
    opts: &EncodeOptions,
    encode_images: ImageEncoder,
    encode_text: Option<TextEncoder>,
    progress: Option<&dyn Fn(usize, usize)>,
) -> Result<EncodeSummary> {
    encode_with_features(ds, out, opts, encode_images, encode_text, None, progress)
}

/// [`encode`], also storing each target image's distillation features from `encode_features`
/// (record the encoder in `opts.maker` with [`CacheMaker::with_distill`], so that a cache
/// made with other features is not resumed).
pub fn encode_with_features(
    ds: &Dataset,
    out: &Path,
    opts: &EncodeOptions,
    encode_images: ImageEncoder,
    mut encode_text: Option<TextEncoder>,
    mut encode_features: Option<FeatureEncoder>,
    progress: Option<&dyn Fn(usize, usize)>,
) -> Result<EncodeSummary> {
    let (size, batch) = (opts.size, opts.batch);
    if opts.ref_size == Some(0) {
        return Err(Error::invalid("reference size", "0 px (must be at least 1)"));
    }
    let maker = opts.maker.clone().map(|m| CacheMaker { ref_size: opts.ref_size, ..m });
    let mut w = CacheWriter::create_or_resume_for(out, size, opts.shard_samples, maker.as_ref(), opts.force)?;
    let done = w.done_ids();
    let todo: Vec<_> = ds.samples.iter().filter(|s| !done.contains(&s.id)).collect();
    let total = ds.samples.len();
    let mut finished = total - todo.len();
    let already = w.stored();
    let mut skipped = 0;
    let mut first_skipped = None;
    for chunk in todo.chunks(batch.max(1)) {
        let mut loaded = Vec::new();
        for s in chunk {
            match s.load(size) {
                Ok(l) => loaded.push((s, l)),
                Err(e) => {
                    skipped += 1;
                    first_skipped.get_or_insert_with(|| (s.id.clone(), e.to_string()));
                    w.skip(&s.id, &e.to_string());
                }
            }
        }
        if !loaded.is_empty() {
            let mut images = Vec::new();
            let mut ref_images = Vec::new();
            for (_, l) in &loaded {
                match opts.ref_size {
                    None => images.extend(l.refs.iter().cloned()),
                    Some(side) => ref_images.extend(l.refs.iter().map(|r| crate::imageio::reference_view(r, side))),
                }
                images.push(l.background.clone());
                images.extend(l.target.iter().cloned());
            }
            let (codes, (h, gw)) = encode_codes(&images, encode_images)?;
            let (ref_codes, ref_grid) = match opts.ref_size {
                Some(_) if !ref_images.is_empty() => {
                    let (c, g) = encode_codes(&ref_images, encode_images)?;
                    (c, Some(g))
                }
                // No reference in this chunk: the grid its references would have, so that
                // the cache's reference grid stays one.
                Some(side) => (Vec::new(), Some(w.ref_grid().unwrap_or((side as usize * h / size as usize, side as usize * gw / size as usize)))),
                None => (Vec::new(), None),
            };
            let mut ref_rows = ref_codes.into_iter();
            let text = match encode_text.as_mut() {
                Some(f) => {
                    let prompts: Vec<String> = loaded.iter().map(|(_, l)| l.prompt.clone()).collect();
                    let (t, m) = f(&prompts)?;
                    Some((t, m.to_dtype(DType::U8)?))
                }
                None => None,
            };
            let feats = match encode_features.as_mut() {
                Some(f) => {
                    let targets: Vec<Tensor> = loaded.iter().filter_map(|(_, l)| l.target.as_ref()).map(|t| rgb_to_tensor(t, &Device::Cpu)).collect::<Result<_>>()?;
                    if targets.is_empty() {
                        None
                    } else {
                        let fs = f(&Tensor::stack(&targets, 0)?, (h, gw))?;
                        if fs.rank() != 3 || fs.dim(0)? != targets.len() {
                            return Err(Error::invalid("distillation encoder output", format!("shape {:?} for {} target images", fs.dims(), targets.len())));
                        }
                        Some(fs)
                    }
                }
                None => None,
            };
            let mut feat_row = 0usize;
            let mut rows = codes.into_iter();
            for (k, (s, l)) in loaded.iter().enumerate() {
                let refs = match ref_grid {
                    None => (0..l.refs.len()).map(|_| rows.next().unwrap_or_default()).collect(),
                    Some(_) => (0..l.refs.len()).map(|_| ref_rows.next().unwrap_or_default()).collect(),
                };
                let mut next = || rows.next().unwrap_or_default();
                let background = next();
                let target = if l.target.is_some() { next() } else { Vec::new() };
                let text = match &text {
                    Some((t, m)) => Some((t.get(k)?, m.get(k)?.to_vec1::<u8>()?)),
                    None => None,
                };
                let owners = match (&l.subject_masks, &l.target) {
                    (Some(m), Some(_)) => Some(owner_grid(m, (h, gw))?),
                    _ => None,
                };
                let distill = match (&feats, &l.target) {
                    (Some(fs), Some(_)) => {
                        feat_row += 1;
                        Some(fs.get(feat_row - 1)?)
                    }
                    _ => None,
                };
                w.push(CachedSample { id: s.id.clone(), refs, background, target, grid: (h, gw), ref_grid, prompt: l.prompt.clone(), text, owners, distill })?;
            }
        }
        finished += chunk.len();
        if let Some(p) = progress {
            p(finished, total);
        }
    }
    if skipped > 0 {
        eprintln!("warning: skipped {skipped} sample(s) whose images could not be loaded (listed in {INDEX})");
    }
    let in_cache = w.stored();
    let summary = EncodeSummary { total, stored: in_cache - already, already, skipped, first_skipped, in_cache };
    if in_cache == 0 {
        let why = match &summary.first_skipped {
            Some((id, reason)) => format!("all {skipped} skipped (first: {id}: {reason})"),
            None => "the dataset has no sample".to_string(),
        };
        return Err(Error::bad_file(out, format!("no sample could be encoded: {why}")));
    }
    w.finish()?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synth::{generate, SynthOptions};
    use crate::data::OpenOptions;

    /// A stand-in tokenizer: the mean colour of each 8x8 block, 4 levels per channel.
    fn block_codes(x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let m = x.reshape((b, c, h / 8, 8, w / 8, 8))?.mean(5)?.mean(3)?; // (b, c, h/8, w/8)
        let q = ((m + 1.0)? * 1.999)?.floor()?.clamp(0.0, 3.0)?;
        let code = ((q.narrow(1, 0, 1)? * 16.0)? + (q.narrow(1, 1, 1)? * 4.0)? + q.narrow(1, 2, 1)?)?;
        Ok(code.squeeze(1)?.to_dtype(DType::U32)?)
    }

    /// A stand-in text encoder: L = 4 positions of D = 2 features from the words' lengths.
    fn words(prompts: &[String]) -> Result<(Tensor, Tensor)> {
        let mut f = Vec::new();
        let mut m = Vec::new();
        for p in prompts {
            let w: Vec<&str> = p.split(' ').collect();
            for i in 0..4 {
                let len = w.get(i).map_or(0.0, |s| s.len() as f32);
                f.extend([len, i as f32]);
                m.push(u8::from(i < w.len()));
            }
        }
        let b = prompts.len();
        Ok((Tensor::from_vec(f, (b, 4, 2), &Device::Cpu)?, Tensor::from_vec(m, (b, 4), &Device::Cpu)?))
    }

    fn expected(ds: &Dataset, i: usize) -> (Vec<Vec<u32>>, Vec<u32>, Vec<u32>) {
        let l = ds.samples[i].load(32).unwrap();
        let enc = |img: &RgbImage| {
            let t = rgb_to_tensor(img, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            block_codes(&t).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap()
        };
        (l.refs.iter().map(enc).collect(), enc(&l.background), enc(l.target.as_ref().unwrap()))
    }
    use image::RgbImage;

    #[test]
    fn owner_grid_takes_the_largest_subject_covering_a_quarter() {
        use image::{GrayImage, Luma};
        // 8x8 px masks on a 2x2 grid of 4x4 px cells.
        let mask = |f: &dyn Fn(u32, u32) -> bool| GrayImage::from_fn(8, 8, |x, y| Luma([if f(x, y) { 255 } else { 0 }]));
        // Subject 0: the whole top-left cell, and 3 px of the top-right cell (under a quarter).
        let a = mask(&|x, y| (x < 4 && y < 4) || (x >= 4 && y == 0 && x < 7));
        // Subject 1: 6 px of the bottom-left cell, 8 px of the bottom-right cell.
        let b = mask(&|x, y| (x < 4 && y >= 4 && (x + 4 * (y - 4)) < 6) || (x >= 4 && y >= 6));
        // Subject 2: 4 px of the bottom-left cell (a quarter, but fewer than subject 1), and 8
        // px of the bottom-right cell (a tie with subject 1: the lower index wins).
        let c = mask(&|x, y| (x < 4 && y == 7) || (x >= 4 && y >= 6));
        assert_eq!(owner_grid(&[a.clone(), b.clone(), c.clone()], (2, 2)).unwrap(), vec![1, 0, 2, 2]);
        assert_eq!(owner_grid(&[c, a.clone()], (2, 2)).unwrap(), vec![2, 0, 1, 1]);
        assert_eq!(owner_grid(&[], (2, 2)).unwrap(), vec![0; 4]);
        // Masks that do not tile the grid, or differ in size, are refused.
        assert!(owner_grid(std::slice::from_ref(&a), (3, 3)).is_err());
        assert!(owner_grid(&[a, GrayImage::new(4, 4)], (2, 2)).is_err());
    }

    #[test]
    fn cache_round_trips_and_resumes() {
        let root = std::env::temp_dir().join(format!("tokenar-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let data = root.join("data");
        generate(&data, &SynthOptions { n: 7, seed: 2, size: 32, subjects: (1, 3), ..Default::default() }, None).unwrap();
        let ds = Dataset::open(&data, &OpenOptions::default()).unwrap();
        // A sample broken after opening is recorded as skipped, not fatal.
        std::fs::write(data.join("sample_5/background.png"), b"broken").unwrap();

        // First run fails at the fourth batch: two shards of two samples were written.
        let out = root.join("cache");
        let mut calls = 0;
        let mut failing = |x: &Tensor| {
            calls += 1;
            if calls == 4 {
                return Err(Error::invalid("test", "interrupted"));
            }
            block_codes(x)
        };
        let mut text = words;
        let r = encode_dataset_sharded(&ds, &out, 32, &mut failing, Some(&mut text), 1, 2, None);
        assert!(r.is_err());
        let partial = CacheReader::open(&out).unwrap();
        assert_eq!((partial.len(), partial.is_complete()), (2, false));

        // The rerun encodes only what is missing.
        let mut encoded = 0;
        let mut counting = |x: &Tensor| {
            encoded += x.dim(0)?;
            block_codes(x)
        };
        let last = std::cell::Cell::new((0, 0));
        encode_dataset_sharded(&ds, &out, 32, &mut counting, Some(&mut text), 2, 2, Some(&|d, t| last.set((d, t)))).unwrap();
        assert_eq!(last.get(), (7, 7));
        let rest: usize = ds.samples[2..].iter().filter(|s| s.id != "sample_5").map(|s| s.refs.len() + 2).sum();
        assert_eq!(encoded, rest);

        let cache = CacheReader::open(&out).unwrap();
        assert!(cache.is_complete());
        assert_eq!(cache.len(), 6);
        assert_eq!(cache.skipped().len(), 1);
        assert!(cache.skipped()[0].0 == "sample_5" && cache.skipped()[0].1.contains("background.png"));
        let by_id: HashMap<String, usize> = ds.samples.iter().enumerate().map(|(i, s)| (s.id.clone(), i)).collect();
        // Read in an order that jumps between shards.
        for i in [5, 0, 3, 1, 4, 2] {
            let c = cache.get(i).unwrap();
            let k = by_id[&c.id];
            let (refs, bg, target) = expected(&ds, k);
            assert_eq!((c.refs, c.background, c.target), (refs, bg, target), "{}", c.id);
            assert_eq!(c.grid, (4, 4));
            assert_eq!(c.prompt, ds.samples[k].prompt);
            let (t, m) = c.text.unwrap();
            let (want_t, want_m) = words(std::slice::from_ref(&c.prompt)).unwrap();
            assert_eq!(t.to_vec2::<f32>().unwrap(), want_t.get(0).unwrap().to_vec2::<f32>().unwrap());
            assert_eq!(m, want_m.get(0).unwrap().to_vec1::<u8>().unwrap());
            let masks = ds.samples[k].subject_masks(Some(32)).unwrap().unwrap();
            let owners = c.owners.expect("synthetic samples give subject masks");
            assert_eq!(owners, owner_grid(&masks, (4, 4)).unwrap(), "{}", c.id);
            assert!(owners.iter().all(|&o| (o as usize) <= masks.len()));
            assert!(owners.iter().any(|&o| o > 0), "{}: every subject is at least 40% visible", c.id);
        }
        assert!(cache.get(6).is_err());
        // Resuming at another image size is refused.
        let mut enc = block_codes;
        assert!(encode_dataset(&ds, &out, 64, &mut enc, None, 2, None).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// `ref_size`: each reference cropped to its subject and encoded at 16 px (a 2x2 grid)
    /// beside 4x4 backgrounds and targets, stored apart and read back; a resume with another
    /// reference size is refused by name.
    #[test]
    fn references_on_their_own_grid_round_trip() {
        let root = std::env::temp_dir().join(format!("tokenar-cache-refs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let data = root.join("data");
        generate(&data, &SynthOptions { n: 5, seed: 3, size: 32, subjects: (1, 3), ..Default::default() }, None).unwrap();
        let ds = Dataset::open(&data, &OpenOptions::default()).unwrap();
        let out = root.join("cache");
        // The maker fingerprints a tokenizer file; the codes here come from `block_codes`.
        std::fs::write(root.join("vq.safetensors"), b"tokenizer").unwrap();
        let maker = CacheMaker::new(&ds, &root.join("vq.safetensors"), None, None).unwrap();
        let opts = EncodeOptions { ref_size: Some(16), maker: Some(maker.clone()), shard_samples: 2, ..EncodeOptions::new(32, 2) };
        let mut enc = block_codes;
        encode(&ds, &out, &opts, &mut enc, None, None).unwrap();
        let cache = CacheReader::open(&out).unwrap();
        assert_eq!(cache.len(), 5);
        let enc_one = |img: &RgbImage| {
            let t = rgb_to_tensor(img, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            block_codes(&t).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap()
        };
        for i in [4, 0, 2] {
            let c = cache.get(i).unwrap();
            let l = ds.samples[i].load(32).unwrap();
            let (_, bg, target) = expected(&ds, i);
            let refs: Vec<Vec<u32>> = l.refs.iter().map(|r| enc_one(&crate::imageio::reference_view(r, 16))).collect();
            assert_eq!((c.grid, c.ref_grid), ((4, 4), Some((2, 2))));
            assert_eq!((&c.refs, &c.background, &c.target), (&refs, &bg, &target), "{}", c.id);
            assert!(c.refs.iter().all(|r| r.len() == 4));
        }
        let whole = EncodeOptions { ref_size: None, ..opts };
        let e = encode(&ds, &out, &whole, &mut enc, None, None).unwrap_err().to_string();
        assert!(e.contains("references encoded at") && e.contains("16 px"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
