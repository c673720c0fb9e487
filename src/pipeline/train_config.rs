//! The training job's configuration (TOML, `configs/*.toml`): the run's files, the recipe, the
//! CFG dropout, the binding loss switches, and the `[model]` and `[text]` sections.

use crate::error::{Error, Result};
use crate::model::{GptConfig, Overrides};
use crate::text::BuiltinConfig;
use crate::train;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The training configuration (TOML). See `configs/tokenar-builtin.toml` for every field with
/// its meaning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainJobConfig {
    pub cache: PathBuf,
    pub out: PathBuf,
    pub tokenizer: PathBuf,
    #[serde(default)]
    pub init: Option<PathBuf>,
    #[serde(default)]
    pub init_preset: Option<String>,
    pub seed: u64,
    pub steps: u64,
    pub batch: usize,
    /// Micro-steps per optimiser step (also spelt `accum_steps`): the global batch is
    /// `batch` x `accum` x the number of ranks.
    #[serde(default = "one", alias = "accum_steps")]
    pub accum: usize,
    pub lr: f64,
    #[serde(default)]
    pub warmup: u64,
    #[serde(default)]
    pub cosine: bool,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub grad_clip: f64,
    pub log_every: u64,
    pub ckpt_every: u64,
    pub keep_last: usize,
    /// CFG dropout (EditAR): both image and text / image only / text only.
    pub drop_both: f32,
    pub drop_image: f32,
    pub drop_text: f32,
    /// Samples drawn in the grid written at each checkpoint (0 = none).
    #[serde(default)]
    pub grid_samples: usize,
    /// Weight of the binding loss (0 = off): a linear head on the GPT's final features at
    /// each target position predicts which reference the token it is about to generate
    /// shows, trained with cross-entropy on the code cells a subject covers (the cache's
    /// owner grids). The head is used in training only and is not exported.
    #[serde(default)]
    pub binding_loss: f64,
    /// Cells of each subject the binding loss counts: 0 = all of them; k = only its first k
    /// in raster order (where generation decides which subject a region is; later cells can
    /// read the answer off the cells above them).
    #[serde(default)]
    pub binding_first: usize,
    /// Weight of an extra token cross-entropy on the target cells the binding loss counts
    /// (0 = off; needs `binding_loss` > 0): the token head is pushed to draw the subject the
    /// binding head names where generation decides it.
    #[serde(default)]
    pub binding_token_loss: f64,
    /// Weight of the EditAR/TokenAR distillation term (0 = off; the reference recipe: 0.5):
    /// the `alignment` head regresses the cache's target features (`tokenar data encode
    /// --distill-dinov2`), see [`crate::train::distill`]. Logged as `loss_distill`.
    #[serde(default)]
    pub distill_weight: f64,
    /// Mixed precision: "bf16" multiplies the GPT's linear layers in bf16 (f32 master weights,
    /// f32 optimiser; for GPUs), "off" (default) keeps everything in f32.
    #[serde(default, skip_serializing_if = "Autocast::is_off")]
    pub autocast: Autocast,
    pub model: ModelSection,
    pub text: BuiltinConfig,
}

/// The `autocast` setting of a training config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Autocast {
    #[default]
    Off,
    Bf16,
}

impl Autocast {
    pub fn is_off(&self) -> bool {
        *self == Autocast::Off
    }

    /// The dtype of the matrix products, `None` for f32.
    pub fn dtype(&self) -> Option<candle_core::DType> {
        match self {
            Autocast::Off => None,
            Autocast::Bf16 => Some(candle_core::DType::BF16),
        }
    }
}

fn one() -> usize {
    1
}

/// The GPT: a preset plus the switches of the ablation study and size overrides.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub preset: String,
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub dim: Option<usize>,
    pub n_instruct: Option<usize>,
    pub index_embedding: Option<bool>,
    pub itd: Option<bool>,
    /// This project's cell embedding (see `model::cell_embedding`).
    #[serde(default)]
    pub cell_embedding: Option<bool>,
    pub max_refs: Option<usize>,
    /// One dropout rate for token, residual and FFN dropout.
    pub dropout: Option<f32>,
}

impl ModelSection {
    /// The section's changes to its preset, with the code vocabulary and grids of the data
    /// (`ref_grid`: the references' when the cache holds them on a smaller grid) and the text
    /// encoder's width and length.
    pub fn overrides(&self, vocab: usize, grid: (usize, usize), ref_grid: Option<(usize, usize)>, text: &BuiltinConfig) -> Overrides {
        Overrides {
            vocab_size: Some(vocab),
            n_layer: self.n_layer,
            n_head: self.n_head,
            dim: self.dim,
            grid: Some(grid),
            ref_grid,
            caption_dim: Some(text.dim),
            caption_len: Some(text.max_len),
            max_refs: self.max_refs,
            n_instruct: self.n_instruct,
            index_embedding: self.index_embedding,
            itd: self.itd,
            cell_embedding: self.cell_embedding,
            dropout: self.dropout,
        }
    }
}

impl TrainJobConfig {
    pub fn from_toml(text: &str, sets: &[String], origin: &Path) -> Result<Self> {
        let value: toml::Value =
            toml::from_str(text).map_err(|e| Error::bad_file(origin, format!("not a valid training config: {e}")))?;
        let value = train::apply_overrides(value, sets)?;
        let cfg: Self = value
            .try_into()
            .map_err(|e: toml::de::Error| Error::bad_file(origin, format!("bad training config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, msg: String| Err(Error::invalid(what, msg));
        if self.batch == 0 || self.steps == 0 {
            return bad("batch/steps", "must be at least 1".into());
        }
        crate::util::check_batch("batch", self.batch)?;
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("{} (must be positive)", self.lr));
        }
        let p = self.drop_both + self.drop_image + self.drop_text;
        if !(0.0..=1.0).contains(&p) || self.drop_both < 0.0 || self.drop_image < 0.0 || self.drop_text < 0.0 {
            return bad("drop_*", format!("probabilities must be >= 0 and sum to at most 1 (sum {p})"));
        }
        if !(self.binding_loss >= 0.0 && self.binding_loss.is_finite()) {
            return bad("binding_loss", format!("{} (must be >= 0)", self.binding_loss));
        }
        if !(self.binding_token_loss >= 0.0 && self.binding_token_loss.is_finite()) || (self.binding_token_loss > 0.0 && self.binding_loss == 0.0) {
            return bad("binding_token_loss", format!("{} (must be >= 0, and needs binding_loss > 0)", self.binding_token_loss));
        }
        if !(self.distill_weight >= 0.0 && self.distill_weight.is_finite()) {
            return bad("distill_weight", format!("{} (must be >= 0)", self.distill_weight));
        }
        self.text.validate()
    }

    /// The GPT config: the preset, the overrides, and what the data (code vocabulary, image
    /// grid, reference grid) and the text encoder fix.
    pub fn gpt_config(&self, vocab: usize, grid: (usize, usize), ref_grid: Option<(usize, usize)>) -> Result<GptConfig> {
        GptConfig::from_preset(&self.model.preset, &self.model.overrides(vocab, grid, ref_grid, &self.text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_parses_and_overrides_apply() {
        let text = include_str!("../../configs/tokenar-builtin.toml");
        let cfg = TrainJobConfig::from_toml(text, &[], Path::new("configs/tokenar-builtin.toml")).unwrap();
        let g = cfg.gpt_config(1024, (8, 8), None).unwrap();
        assert!(g.itd && g.index_embedding && g.n_instruct > 0);
        assert_eq!((g.caption_dim, g.caption_len), (cfg.text.dim, cfg.text.max_len));
        let sets = vec!["model.itd=false".to_string(), "model.n_instruct=0".to_string(), "steps=7".to_string()];
        let ab = TrainJobConfig::from_toml(text, &sets, Path::new("x.toml")).unwrap();
        let g = ab.gpt_config(1024, (8, 8), None).unwrap();
        assert!(!g.itd && g.n_instruct == 0 && ab.steps == 7);
        let binding = include_str!("../../configs/tokenar-binding.toml");
        let bc = TrainJobConfig::from_toml(binding, &[], Path::new("configs/tokenar-binding.toml")).unwrap();
        assert!(bc.binding_loss > 0.0 && bc.binding_first > 0 && bc.binding_token_loss > 0.0);
        assert!(bc.gpt_config(1024, (8, 8), None).unwrap().cell_embedding && !g.cell_embedding);
        let e = TrainJobConfig::from_toml(text, &["model.colour=3".to_string()], Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = TrainJobConfig::from_toml(text, &["drop_text=0.99".to_string()], Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("drop"), "{e}");
    }

    #[test]
    fn autocast_is_off_unless_asked_and_bad_values_are_named() {
        let text = include_str!("../../configs/tokenar-builtin.toml");
        let cfg = TrainJobConfig::from_toml(text, &[], Path::new("c.toml")).unwrap();
        assert_eq!((cfg.autocast, cfg.autocast.dtype()), (Autocast::Off, None));
        // Off is not written out: configs saved before the field existed compare equal.
        assert!(!toml::to_string(&cfg).unwrap().contains("autocast"));
        let cfg = TrainJobConfig::from_toml(text, &["autocast=\"bf16\"".to_string()], Path::new("c.toml")).unwrap();
        assert_eq!(cfg.autocast.dtype(), Some(candle_core::DType::BF16));
        assert!(toml::to_string(&cfg).unwrap().contains("autocast = \"bf16\""));
        let e = TrainJobConfig::from_toml(text, &["autocast=\"fp8\"".to_string()], Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("fp8") && e.contains("bf16"), "{e}");
    }
}
