//! What a training run may do to its run folder, checked before anything is built or written:
//!
//! - a fresh run (no `--resume`) refuses a folder that already holds a run, unless `--force`,
//!   which deletes that run's files ([`RUN_FILES`]) first and says so; other files stay;
//! - `--resume` compares the config with the one stored in the newest checkpoint, and the
//!   tokenizer and cache with the ones recorded in `run.json`; a change is refused, unless
//!   `--force`, which records it in `checkpoints/changes.jsonl` (and on stderr);
//! - the cache must have been encoded with the run's tokenizer (by content);
//! - temporary files left by a killed write are deleted.

use super::train_config::TrainJobConfig;
use crate::data::cache::CacheReader;
use crate::data::provenance::file_fingerprint;
use crate::error::{Error, IoContext, Result};
use crate::train::checkpoint::{read_metadata, remove_stale_temps};
use crate::train::Checkpointer;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How a run starts: `resume` continues the newest checkpoint; `force` lets a fresh run replace
/// an old run's files, or a resumed run take a changed config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStart {
    pub resume: bool,
    pub force: bool,
}

/// The run folder's record of what the run trains on.
pub const RUN_RECORD: &str = "run.json";
/// Config changes accepted with `--resume --force`, one JSON object per line, in `checkpoints/`.
pub const CHANGES_LOG: &str = "changes.jsonl";
/// The metadata key of the training config in a checkpoint.
pub const CONFIG_KEY: &str = "tokenar.train_config";
/// The entries of a run folder that a run writes (and `--force` deletes).
pub const RUN_FILES: [&str; 6] = ["checkpoints", "export", "config.toml", "loss.png", "samples.png", RUN_RECORD];

/// Config fields that may change when resuming: how long to run and how often to log, save
/// and draw; where the run folder is; the initial weights (read by a fresh run only); and the
/// paths of the tokenizer and cache (their content is compared through `run.json`); and the
/// precision of the matrix products (the weights stay f32 either way).
const MAY_CHANGE: [&str; 11] = ["steps", "out", "log_every", "ckpt_every", "keep_last", "grid_samples", "init", "init_preset", "cache", "tokenizer", "autocast"];

/// What a run trains on, by content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub tokenizer_path: String,
    /// Fingerprint of the tokenizer file.
    pub tokenizer: String,
    pub cache_path: String,
    /// Fingerprint of the cache's `index.json` (its samples, shards and maker).
    pub cache: String,
}

impl RunRecord {
    pub fn of(cfg: &TrainJobConfig) -> Result<Self> {
        let index = cfg.cache.join(crate::data::cache::INDEX);
        Ok(Self {
            tokenizer_path: cfg.tokenizer.display().to_string(),
            tokenizer: file_fingerprint(&cfg.tokenizer)?,
            cache_path: cfg.cache.display().to_string(),
            cache: file_fingerprint(&index)?,
        })
    }

    fn changes(&self, now: &RunRecord) -> Vec<Change> {
        let mut out = Vec::new();
        if self.tokenizer != now.tokenizer {
            out.push(Change::new("tokenizer (content)", format!("{} ({})", self.tokenizer_path, self.tokenizer), format!("{} ({})", now.tokenizer_path, now.tokenizer)));
        }
        if self.cache != now.cache {
            out.push(Change::new("cache (content)", format!("{} ({})", self.cache_path, self.cache), format!("{} ({})", now.cache_path, now.cache)));
        }
        out
    }
}

/// One changed config field (values as TOML).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub key: String,
    pub was: String,
    pub now: String,
}

impl Change {
    fn new(key: &str, was: String, now: String) -> Self {
        Self { key: key.to_string(), was, now }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} -> {}", self.key, self.was, self.now)
    }
}

/// Every leaf of a TOML table as `dotted.key` -> value.
fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// The config fields that differ between the checkpoint's config (TOML text) and `now`,
/// leaving out the fields that may change ([`MAY_CHANGE`]).
pub fn config_changes(stored: &str, now: &TrainJobConfig) -> Result<Vec<Change>> {
    let raw: toml::Value = toml::from_str(stored).map_err(|e| Error::invalid("stored training config", e.to_string()))?;
    // Read through the config type when it can, so that fields added since (with defaults)
    // compare as their defaults.
    let old = match raw.clone().try_into::<TrainJobConfig>() {
        Ok(c) => toml::Value::try_from(&c).map_err(|e| Error::invalid("stored training config", e.to_string()))?,
        Err(_) => raw,
    };
    let now = toml::Value::try_from(now).map_err(|e| Error::invalid("training config", e.to_string()))?;
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &old, &mut a);
    flatten("", &now, &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let absent = || "(unset)".to_string();
    Ok(keys
        .into_iter()
        .filter(|k| !MAY_CHANGE.contains(&k.as_str()))
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| Change::new(k, a.get(k).cloned().unwrap_or_else(absent), b.get(k).cloned().unwrap_or_else(absent)))
        .collect())
}

/// The run files present in `out` (an empty `checkpoints/` does not count).
pub fn run_files(out: &Path) -> Vec<&'static str> {
    RUN_FILES
        .iter()
        .copied()
        .filter(|name| {
            let p = out.join(name);
            if *name == "checkpoints" {
                p.is_dir() && std::fs::read_dir(&p).map(|mut d| d.next().is_some()).unwrap_or(true)
            } else {
                p.exists()
            }
        })
        .collect()
}

/// Delete the run files of `out` ([`RUN_FILES`]); returns the entries deleted.
pub fn clear_run(out: &Path) -> Result<Vec<&'static str>> {
    let mut gone = Vec::new();
    for name in run_files(out) {
        let p = out.join(name);
        let r = if p.is_dir() && !p.is_symlink() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        match r {
            Ok(()) => gone.push(name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&p, e)),
        }
    }
    Ok(gone)
}

/// Refuse a cache encoded with another tokenizer than `tokenizer` (compared by content). A
/// cache that records no maker (written by an older version) cannot be checked: a warning.
pub fn check_cache_tokenizer(cache: &Path, tokenizer: &Path) -> Result<()> {
    let reader = CacheReader::open(cache)?;
    let Some(maker) = reader.maker() else {
        eprintln!("warning: {} records no tokenizer (an older cache); cannot check that it was encoded with {}", cache.display(), tokenizer.display());
        return Ok(());
    };
    let fp = file_fingerprint(tokenizer)?;
    if fp != maker.tokenizer {
        return Err(Error::bad_file(
            cache,
            format!(
                "was encoded with the tokenizer {} (fingerprint {}), but the run's tokenizer {} has fingerprint {}: train with that tokenizer, or encode the dataset again with this one (`tokenar data encode ... --tokenizer {} --out <new folder>`)",
                maker.tokenizer_path,
                maker.tokenizer,
                tokenizer.display(),
                fp,
                tokenizer.display()
            ),
        ));
    }
    Ok(())
}

fn read_record(path: &Path) -> Option<RunRecord> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn write_record(out: &Path, rec: &RunRecord) -> Result<()> {
    let text = serde_json::to_string_pretty(rec).map_err(|e| Error::invalid("run record", e.to_string()))?;
    crate::util::atomic_write(out.join(RUN_RECORD), text.as_bytes())
}

/// Append the accepted changes to `checkpoints/changes.jsonl`.
fn log_changes(out: &Path, step: u64, changes: &[Change]) -> Result<PathBuf> {
    use std::io::Write;
    let dir = out.join("checkpoints");
    std::fs::create_dir_all(&dir).with_path(&dir)?;
    let path = dir.join(CHANGES_LOG);
    let unix_time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let line = serde_json::json!({ "step": step, "unix_time": unix_time, "changes": changes });
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).with_path(&path)?;
    writeln!(f, "{line}").with_path(&path)?;
    Ok(path)
}

/// Check (and, with `force`, prepare) the run folder `cfg.out` for a run started as `start`;
/// see the module documentation. Nothing is deleted or recorded unless every check passes.
pub fn prepare(cfg: &TrainJobConfig, start: RunStart) -> Result<()> {
    let out = &cfg.out;
    if out.exists() && !out.is_dir() {
        return Err(Error::bad_file(out, "the run folder (`out`) exists and is not a folder"));
    }
    check_cache_tokenizer(&cfg.cache, &cfg.tokenizer)?;
    for dir in [out.clone(), out.join("checkpoints"), out.join("export")] {
        let gone = remove_stale_temps(&dir)?;
        if !gone.is_empty() {
            eprintln!("removed {} temporary file(s) left by an interrupted write in {}", gone.len(), dir.display());
        }
    }
    let present = run_files(out);
    let latest = Checkpointer::latest_in(out.join("checkpoints"))?;
    if !start.resume {
        if present.is_empty() {
            return Ok(());
        }
        let what = match &latest {
            Some((step, _)) => format!("a training run (newest checkpoint: step {step})"),
            None => format!("a training run's files ({})", present.join(", ")),
        };
        if !start.force {
            return Err(Error::bad_file(
                out,
                format!(
                    "already holds {what}; pass --resume to continue it, or --force to delete its run files ({}) and start afresh, or choose another `out`",
                    RUN_FILES.join(", ")
                ),
            ));
        }
        let gone = clear_run(out)?;
        eprintln!("--force: deleted the old run's {} in {}", gone.join(", "), out.display());
        return Ok(());
    }
    let Some((step, path)) = latest else {
        return Ok(());
    };
    let meta = read_metadata(&path)?;
    let mut changes = match meta.get(CONFIG_KEY) {
        Some(text) => config_changes(text, cfg).map_err(|e| Error::bad_file(&path, e.to_string()))?,
        None => Vec::new(),
    };
    let record_path = out.join(RUN_RECORD);
    let stored = read_record(&record_path);
    if let Some(old) = &stored {
        changes.extend(old.changes(&RunRecord::of(cfg)?));
    }
    if !changes.is_empty() {
        let list = changes.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("; ");
        if !start.force {
            return Err(Error::bad_file(
                &path,
                format!("--resume: the run was trained with another setting: {list}; resume with the checkpoint's settings, or add --force to continue with the new ones (the change is recorded in checkpoints/{CHANGES_LOG})"),
            ));
        }
        let log = log_changes(out, step, &changes)?;
        eprintln!("--force: resuming step {step} with changed settings ({list}); recorded in {}", log.display());
    }
    Ok(())
}

/// Record what the run trains on (`run.json`) when it starts, after [`prepare`] let it.
pub fn record_start(cfg: &TrainJobConfig) -> Result<()> {
    std::fs::create_dir_all(&cfg.out).with_path(&cfg.out)?;
    write_record(&cfg.out, &RunRecord::of(cfg)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(sets: &[&str]) -> TrainJobConfig {
        let text = include_str!("../../configs/tokenar-builtin.toml");
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        TrainJobConfig::from_toml(text, &sets, Path::new("c.toml")).unwrap()
    }

    #[test]
    fn config_changes_name_hyper_parameters_but_not_run_length() {
        let base = cfg(&[]);
        let stored = toml::to_string_pretty(&base).unwrap();
        assert!(config_changes(&stored, &base).unwrap().is_empty());
        // Run length, logging, paths: allowed.
        let more = cfg(&["steps=99999", "log_every=3", "keep_last=9", "out=\"elsewhere\""]);
        assert!(config_changes(&stored, &more).unwrap().is_empty());
        for (set, key) in [("lr=1.0", "lr"), ("model.itd=false", "model.itd"), ("batch=3", "batch"), ("drop_both=0.2", "drop_both")] {
            let c = config_changes(&stored, &cfg(&[set])).unwrap();
            assert_eq!(c.len(), 1, "{set}: {c:?}");
            assert_eq!(c[0].key, key);
            assert_ne!(c[0].was, c[0].now);
        }
    }

    #[test]
    fn run_files_and_clear_touch_only_run_entries() {
        let d = std::env::temp_dir().join(format!("tokenar-guard-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("checkpoints")).unwrap();
        assert!(run_files(&d).is_empty(), "an empty checkpoints/ is no run");
        std::fs::write(d.join("checkpoints/metrics.jsonl"), "").unwrap();
        std::fs::create_dir_all(d.join("export")).unwrap();
        std::fs::write(d.join("notes.txt"), "mine").unwrap();
        assert_eq!(run_files(&d), ["checkpoints", "export"]);
        assert_eq!(clear_run(&d).unwrap(), ["checkpoints", "export"]);
        assert!(run_files(&d).is_empty() && d.join("notes.txt").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
