//! Training checkpoints: one safetensors file per saved step, `ckpt-<step>.safetensors` in a
//! run folder, written atomically. A file holds the model variables of every group
//! (`<group>/<name>`), the optimiser state (`optim.m.*`, `optim.v.*`), and in its metadata the
//! step, the RNG state and the caller's entries (config, vocabulary, ...).

use super::optim::AdamW;
use crate::error::{Error, IoContext, Result};
use crate::util::Rng;
use candle_core::Device;
use candle_nn::VarMap;
use rand::SeedableRng;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Metadata keys written by the checkpointer (caller entries must not use these prefixes).
pub const STEP_KEY: &str = "train.step";
pub const RNG_KEY: &str = "train.rng";
pub const GROUPS_KEY: &str = "train.groups";
const RESERVED: [&str; 2] = ["train.", "optim."];

/// The key of variable `name` of model group `group` inside a checkpoint.
pub fn group_key(group: &str, name: &str) -> String {
    format!("{group}/{name}")
}

/// The exact state of a ChaCha8 generator: seed, stream and word position.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    pub seed: String,
    pub stream: u64,
    /// u128 as a decimal string (JSON numbers cannot hold it).
    pub word_pos: String,
}

impl RngState {
    pub fn capture(rng: &Rng) -> Self {
        let seed = rng.get_seed().iter().map(|b| format!("{b:02x}")).collect();
        Self { seed, stream: rng.get_stream(), word_pos: rng.get_word_pos().to_string() }
    }

    pub fn restore(&self) -> Result<Rng> {
        let bad = || Error::invalid("RNG state", format!("{self:?}"));
        if self.seed.len() != 64 || !self.seed.is_ascii() {
            return Err(bad());
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        let pos: u128 = self.word_pos.parse().map_err(|_| bad())?;
        let mut rng = Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(pos);
        Ok(rng)
    }
}

/// What [`Checkpointer::load`] restored besides the variables and the optimiser.
#[derive(Debug)]
pub struct Restored {
    pub path: PathBuf,
    pub step: u64,
    pub rng: Rng,
    /// All metadata of the file (the caller's entries included).
    pub metadata: BTreeMap<String, String>,
}

/// A run folder holding the last `keep_last` checkpoints.
#[derive(Clone, Debug)]
pub struct Checkpointer {
    dir: PathBuf,
    keep_last: usize,
}

impl Checkpointer {
    /// `keep_last` = 0 keeps every checkpoint.
    /// Temporary files left by a killed writer (see [`remove_stale_temps`]) are deleted.
    pub fn new(dir: impl AsRef<Path>, keep_last: usize) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).with_path(&dir)?;
        remove_stale_temps(&dir)?;
        Ok(Self { dir, keep_last })
    }

    /// The newest complete checkpoint in `dir` without creating the folder (`None` when the
    /// folder or a checkpoint is absent).
    pub fn latest_in(dir: impl AsRef<Path>) -> Result<Option<(u64, PathBuf)>> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Ok(None);
        }
        Self { dir: dir.to_path_buf(), keep_last: 0 }.latest()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_for(&self, step: u64) -> PathBuf {
        self.dir.join(format!("ckpt-{step}.safetensors"))
    }

    /// Write `ckpt-<step>.safetensors` atomically, then delete all but the newest `keep_last`
    /// (and any of a later step, see `prune`).
    pub fn save(
        &self,
        step: u64,
        models: &[(String, VarMap)],
        optim: &AdamW,
        rng: &Rng,
        extra: &BTreeMap<String, String>,
    ) -> Result<PathBuf> {
        let mut tensors: HashMap<String, candle_core::Tensor> = HashMap::new();
        for (group, vm) in models {
            for (name, t) in crate::weights::varmap_tensors(vm) {
                tensors.insert(group_key(group, &name), t);
            }
        }
        let (opt_tensors, opt_meta) = optim.state();
        tensors.extend(opt_tensors);
        let mut meta = BTreeMap::new();
        for (k, v) in extra {
            if RESERVED.iter().any(|p| k.starts_with(p)) {
                return Err(Error::invalid("checkpoint metadata", format!("key `{k}` uses a reserved prefix (train., optim.)")));
            }
            meta.insert(k.clone(), v.clone());
        }
        meta.extend(opt_meta);
        meta.insert(STEP_KEY.to_string(), step.to_string());
        let rng_json = serde_json::to_string(&RngState::capture(rng)).map_err(|e| Error::invalid("RNG state", e.to_string()))?;
        meta.insert(RNG_KEY.to_string(), rng_json);
        let groups: Vec<&str> = models.iter().map(|(g, _)| g.as_str()).collect();
        meta.insert(GROUPS_KEY.to_string(), serde_json::Value::from(groups).to_string());
        let path = self.path_for(step);
        crate::weights::save_safetensors(&path, &tensors, &meta)?;
        self.prune(step)?;
        Ok(path)
    }

    /// Checkpoints in the folder as (step, path), oldest first (by step).
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).with_path(&self.dir)? {
            let p = e.with_path(&self.dir)?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if let Some(step) = name
                .strip_prefix("ckpt-")
                .and_then(|s| s.strip_suffix(".safetensors"))
                .and_then(|s| s.parse::<u64>().ok())
            {
                out.push((step, p));
            }
        }
        out.sort();
        Ok(out)
    }

    /// After saving `step`: files of later steps belong to an abandoned run (or are
    /// incomplete) and are deleted, so that `latest()` follows this run; of the rest, all but
    /// the newest `keep_last` are deleted.
    fn prune(&self, step: u64) -> Result<()> {
        let all = self.list()?;
        let (older, newer): (Vec<_>, Vec<_>) = all.into_iter().partition(|(s, _)| *s <= step);
        let n = if self.keep_last == 0 { 0 } else { older.len().saturating_sub(self.keep_last) };
        for (_, p) in older[..n].iter().chain(&newer) {
            std::fs::remove_file(p).with_path(p)?;
        }
        Ok(())
    }

    /// The newest checkpoint whose header is complete and whose data fits in the file.
    pub fn latest(&self) -> Result<Option<(u64, PathBuf)>> {
        for (step, p) in self.list()?.into_iter().rev() {
            if header_is_complete(&p) {
                return Ok(Some((step, p)));
            }
        }
        Ok(None)
    }

    /// Restore model groups and optimiser from `path`; returns step, RNG and metadata.
    /// Every variable of every group must be in the file with its shape, and nothing else
    /// under those groups.
    pub fn load(path: impl AsRef<Path>, models: &[(String, VarMap)], optim: &mut AdamW) -> Result<Restored> {
        let path = path.as_ref();
        let file = crate::weights::TensorFile::load(path, &Device::Cpu)?;
        let meta = &file.metadata;
        let step = meta
            .get(STEP_KEY)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| Error::bad_file(path, format!("no valid `{STEP_KEY}`: not a training checkpoint")))?;
        let rng_state: RngState = meta
            .get(RNG_KEY)
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| Error::bad_file(path, format!("no valid `{RNG_KEY}` entry")))?;
        let rng = rng_state.restore().map_err(|e| Error::bad_file(path, e.to_string()))?;
        // Validate the optimiser state before touching any variable.
        optim.load_state(&file.tensors, meta, path)?;
        let opts = crate::weights::LoadOptions { strict_unexpected: true, ..Default::default() };
        for (group, vm) in models {
            let mut part = file.strip_prefix(&format!("{group}/"));
            if part.tensors.is_empty() {
                return Err(Error::bad_file(path, format!("no variables of model group `{group}`")));
            }
            crate::weights::load_into_varmap(vm, &mut part, &opts)?;
        }
        Ok(Restored { path: path.to_path_buf(), step, rng, metadata: meta.clone() })
    }
}

/// The process id in a temporary file name written by an atomic write
/// (`.<name>.<pid>.tmp`), when it is one.
fn temp_pid(name: &str) -> Option<u32> {
    let inner = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (base, pid) = inner.rsplit_once('.')?;
    if base.is_empty() {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` is running (on Linux, from `/proc`; elsewhere only this process is
/// known to run).
fn pid_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    proc.is_dir() && proc.join(pid.to_string()).exists()
}

/// Delete the temporary files of atomic writes in `dir` (`.<name>.<pid>.tmp`, as a checkpoint
/// write leaves when killed) whose process no longer runs; returns the files deleted.
pub fn remove_stale_temps(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for e in std::fs::read_dir(dir).with_path(dir)? {
        let e = e.with_path(dir)?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = temp_pid(&name) else { continue };
        let p = e.path();
        if pid_alive(pid) || !p.is_file() {
            continue;
        }
        match std::fs::remove_file(&p) {
            Ok(()) => out.push(p),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(Error::io(&p, err)),
        }
    }
    Ok(out)
}

/// The metadata of a checkpoint (or any safetensors file) from its header alone.
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let mut f = std::fs::File::open(path).with_path(path)?;
    let size = f.metadata().with_path(path)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| Error::bad_file(path, "too short for a safetensors header"))?;
    let n = u64::from_le_bytes(n);
    if n > size.saturating_sub(8) || n > 100_000_000 {
        return Err(Error::bad_file(path, format!("header length {n} does not fit the file ({size} bytes)")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).with_path(path)?;
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(|e| Error::bad_file(path, format!("bad safetensors header: {e}")))?;
    let mut out = BTreeMap::new();
    if let Some(m) = json.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, v) in m {
            if let Some(v) = v.as_str() {
                out.insert(k.clone(), v.to_string());
            }
        }
    }
    Ok(out)
}

/// True when the safetensors header parses, carries a training step, and every tensor's data
/// ends within the file (a truncated copy fails).
fn header_is_complete(path: &Path) -> bool {
    let check = || -> Option<bool> {
        let mut f = std::fs::File::open(path).ok()?;
        let size = f.metadata().ok()?.len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n).ok()?;
        let n = u64::from_le_bytes(n);
        if n > size.saturating_sub(8) || n > 100_000_000 {
            return Some(false);
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).ok()?;
        let json: serde_json::Value = serde_json::from_slice(&header).ok()?;
        let obj = json.as_object()?;
        let has_step = obj.get("__metadata__")?.get(STEP_KEY).is_some();
        let mut end = 0u64;
        for (k, v) in obj {
            if k == "__metadata__" {
                continue;
            }
            let off = v.get("data_offsets")?.as_array()?;
            end = end.max(off.get(1)?.as_u64()?);
        }
        Some(has_step && 8 + n + end <= size)
    };
    check().unwrap_or(false)
}
