//! The GPT configuration (serialised as JSON into this project's checkpoints) and its presets.

use crate::error::{Error, Result};
use crate::layout::{LayoutSpec, Scheme};
use serde::{Deserialize, Serialize};

/// Which published model family a configuration mirrors (informational; recorded in checkpoints).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    /// LlamaGen text-to-image: `[text, target]`.
    LlamaGen,
    /// EditAR: `[condition image, text, target]`.
    EditAr,
    /// TokenAR reference code: `[ref slots, background, text, instruct, (ITD), target]`.
    TokenAr,
    /// Models trained by this project.
    Native,
}

/// Dropout rates used only in training (LlamaGen: token 0.1, residual 0.1, FFN 0.1, attention 0).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dropouts {
    pub token: f32,
    pub resid: f32,
    pub ffn: f32,
    pub attn: f32,
}

impl Default for Dropouts {
    fn default() -> Self {
        Self { token: 0.1, resid: 0.1, ffn: 0.1, attn: 0.0 }
    }
}

/// Limits on what a GPT configuration may ask for (checked by [`GptConfig::validate`], so a
/// corrupt or hostile config in a checkpoint's metadata is an error, not an allocation of
/// terabytes). The largest published model (LlamaGen XXL, TokenAR XL) is far inside them.
pub const MAX_VOCAB: usize = 1 << 20;
pub const MAX_LAYERS: usize = 256;
pub const MAX_HEADS: usize = 256;
pub const MAX_DIM: usize = 16384;
/// Rows or columns of one image's token grid (128: a 2048 px image at 16x downsampling).
pub const MAX_GRID_SIDE: usize = 128;
pub const MAX_REFS: usize = 16;
pub const MAX_CAPTION_LEN: usize = 4096;
pub const MAX_INSTRUCT: usize = 4096;
/// Positions of the longest sequence a configuration may imply (see
/// [`GptConfig::max_seq_len`]).
pub const MAX_SEQ_LEN: usize = 65536;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub dim: usize,
    /// FFN hidden = round_up(int(2 * 4 * dim / 3), ffn_multiple_of).
    pub ffn_multiple_of: usize,
    pub rope_base: f64,
    pub norm_eps: f64,
    /// Width of the text features (T5-XL: 2048).
    pub caption_dim: usize,
    /// Caption positions (LlamaGen: 120).
    pub caption_len: usize,
    /// References the model supports; the index embedding has `max_refs + 1` rows.
    pub max_refs: usize,
    /// Whether the sequence holds a background / condition image.
    pub background: bool,
    /// Instruct tokens (0 = off).
    pub n_instruct: usize,
    /// Token Index Embedding on/off.
    pub index_embedding: bool,
    /// Identity-token disentanglement on/off.
    pub itd: bool,
    /// Cell embedding (a learned vector per grid row and column on every image token; see
    /// [`super::cell_embedding`]). Not in the reference models.
    #[serde(default)]
    pub cell_embedding: bool,
    pub scheme: Scheme,
    /// Token grid of one image (rows, cols).
    pub grid: (usize, usize),
    /// `img_uncond_embedding`: the null image used for image CFG dropout.
    pub img_uncond: bool,
    /// Output width of the `alignment` distillation head (EditAR/TokenAR: 768), if any.
    pub align_dim: Option<usize>,
    pub dropouts: Dropouts,
}

impl GptConfig {
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_head
    }

    pub fn ffn_hidden(&self) -> usize {
        let h = 2 * 4 * self.dim / 3;
        let m = self.ffn_multiple_of.max(1);
        h.div_ceil(m) * m
    }

    /// Rows of `img_uncond_embedding`: one image per condition slot.
    pub fn cond_slots(&self) -> usize {
        let refs = match self.scheme {
            Scheme::Reference { pad_to: Some(p), .. } => p,
            _ => self.max_refs,
        };
        refs + self.background as usize
    }

    pub fn image_tokens(&self) -> usize {
        self.grid.0 * self.grid.1
    }

    /// The layout of a sample with `n_refs` references under this configuration.
    pub fn layout_spec(&self, n_refs: usize) -> LayoutSpec {
        LayoutSpec {
            n_refs,
            max_refs: self.max_refs,
            grid: self.grid,
            text_len: self.caption_len,
            n_instruct: self.n_instruct,
            itd: self.itd,
            background: self.background,
            scheme: self.scheme,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.check_limits()?;
        let bad = |msg: String| Err(Error::invalid("GPT config", msg));
        if self.n_head == 0 || self.dim % self.n_head != 0 {
            return bad(format!("dim {} is not a multiple of n_head {}", self.dim, self.n_head));
        }
        if self.head_dim() % 4 != 0 {
            return bad(format!("head_dim {} must be a multiple of 4 for 2D RoPE", self.head_dim()));
        }
        if self.vocab_size == 0 || self.n_layer == 0 || self.caption_dim == 0 {
            return bad("vocab_size, n_layer and caption_dim must be positive".into());
        }
        if self.grid.0 == 0 || self.grid.1 == 0 {
            return bad(format!("grid {:?} must be positive", self.grid));
        }
        if let Some(a) = self.align_dim {
            if a == 0 || self.grid.0 % 2 != 0 || self.grid.1 % 2 != 0 {
                return bad(format!("alignment head needs align_dim > 0 and an even grid, got {a} and {:?}", self.grid));
            }
        }
        if self.index_embedding && !self.background && self.max_refs == 0 {
            return bad("index embedding needs condition images".into());
        }
        Ok(())
    }

    /// Every size field within its limit (`MAX_*` above), and the sequence it implies within
    /// [`MAX_SEQ_LEN`]; run first by [`Self::validate`], so that nothing derived from the sizes
    /// (parameter counts, tables) can overflow or ask for impossible memory.
    pub fn check_limits(&self) -> Result<()> {
        let fields: [(&str, usize, usize); 11] = [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("ffn_multiple_of", self.ffn_multiple_of, MAX_DIM),
            ("n_layer", self.n_layer, MAX_LAYERS),
            ("n_head", self.n_head, MAX_HEADS),
            ("dim", self.dim, MAX_DIM),
            ("caption_dim", self.caption_dim, MAX_DIM),
            ("caption_len", self.caption_len, MAX_CAPTION_LEN),
            ("max_refs", self.max_refs, MAX_REFS),
            ("n_instruct", self.n_instruct, MAX_INSTRUCT),
            ("grid rows", self.grid.0, MAX_GRID_SIDE),
            ("grid columns", self.grid.1, MAX_GRID_SIDE),
        ];
        for (name, value, max) in fields {
            if value > max {
                return Err(Error::invalid("GPT config", format!("{name} {value} is larger than the limit of {max}")));
            }
        }
        if !(self.rope_base.is_finite() && self.rope_base > 0.0) || !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return Err(Error::invalid(
                "GPT config",
                format!("rope_base {} must be positive and norm_eps {} non-negative (both finite)", self.rope_base, self.norm_eps),
            ));
        }
        if let Scheme::Reference { pad_to: Some(p), .. } = self.scheme {
            if p > MAX_REFS {
                return Err(Error::invalid("GPT config", format!("pad_to {p} is larger than the limit of {MAX_REFS}")));
            }
        }
        if let Some(a) = self.align_dim {
            if a > MAX_DIM {
                return Err(Error::invalid("GPT config", format!("align_dim {a} is larger than the limit of {MAX_DIM}")));
            }
        }
        let seq = self.max_seq_len();
        if seq > MAX_SEQ_LEN {
            return Err(Error::invalid(
                "GPT config",
                format!("its sequences reach {seq} positions, more than the limit of {MAX_SEQ_LEN} (grid {:?}, {} references)", self.grid, self.max_refs),
            ));
        }
        Ok(())
    }

    /// An upper bound of the sequence length a sample can have under this configuration:
    /// caption, instruct tokens, every condition slot, the ITD copies and the target. Only
    /// meaningful once the fields are within their limits.
    pub fn max_seq_len(&self) -> usize {
        let slots = self.cond_slots().max(self.max_refs + self.background as usize);
        let images = slots + if self.itd { self.max_refs } else { 0 } + 1;
        self.caption_len + self.n_instruct + images * self.image_tokens()
    }

    /// A configuration read from a checkpoint must describe the tensors beside it: the
    /// parameters it implies for its backbone (embeddings, blocks, head: never left out of a
    /// checkpoint) cannot exceed the `values` the file holds. Checked before the model is
    /// built, so that a config edited to claim a larger model is an error naming both numbers
    /// instead of an allocation the file could never fill.
    pub fn check_fits_values(&self, values: usize) -> Result<()> {
        self.check_limits()?;
        let implied = self.backbone_params();
        if implied > values {
            return Err(Error::invalid(
                "GPT config",
                format!(
                    "it implies {implied} backbone parameters ({} layers, dim {}, vocab {}) but the file holds only {values} values",
                    self.n_layer, self.dim, self.vocab_size
                ),
            ));
        }
        Ok(())
    }

    /// Parameters of everything the model holds, buffers (`uncond_embedding`,
    /// `img_uncond_embedding`) excluded.
    pub fn num_params(&self) -> usize {
        let d = self.dim;
        let cap = self.caption_dim * d + d * d;
        let index = if self.index_embedding { (self.max_refs + 1) * d } else { 0 };
        let instruct = self.n_instruct * d;
        let cells = if self.cell_embedding { (self.grid.0 + self.grid.1) * d } else { 0 };
        let align = self.align_dim.map_or(0, |a| a * d * 4 + a);
        self.backbone_params() + cap + index + instruct + cells + align
    }

    /// LlamaGen's GPT proper: token embedding, blocks, final norm, output head (the published
    /// sizes 111M/343M/775M/1.4B count these plus a small class embedder).
    pub fn backbone_params(&self) -> usize {
        let d = self.dim;
        let f = self.ffn_hidden();
        let block = d * 3 * d + d * d + 3 * d * f + 2 * d;
        self.vocab_size * d * 2 + self.n_layer * block + d
    }

    /// Named presets. LlamaGen t2i: `B`, `L`, `XL`, `XXL`; public checkpoints: `editar-xl`,
    /// `tokenar-xl`; built-in CPU models: `tiny`, `small`.
    pub fn preset(name: &str) -> Result<Self> {
        let llamagen = |n_layer, n_head, dim| GptConfig {
            family: Family::LlamaGen,
            vocab_size: 16384,
            n_layer,
            n_head,
            dim,
            ffn_multiple_of: 256,
            rope_base: 10000.0,
            norm_eps: 1e-5,
            caption_dim: 2048,
            caption_len: 120,
            max_refs: 0,
            background: false,
            n_instruct: 0,
            index_embedding: false,
            itd: false,
            cell_embedding: false,
            scheme: Scheme::Reference { pad_to: None, quirk_index: false },
            grid: (32, 32),
            img_uncond: false,
            align_dim: None,
            dropouts: Dropouts::default(),
        };
        let native = |vocab, n_layer, n_head, dim, grid, caption_len, n_instruct| GptConfig {
            family: Family::Native,
            vocab_size: vocab,
            caption_dim: dim,
            caption_len,
            max_refs: 2,
            background: true,
            n_instruct,
            index_embedding: true,
            itd: true,
            scheme: Scheme::Tiles,
            grid,
            img_uncond: true,
            ..llamagen(n_layer, n_head, dim)
        };
        Ok(match name {
            "B" => llamagen(12, 12, 768),
            "L" => llamagen(24, 16, 1024),
            "XL" => llamagen(36, 20, 1280),
            "XXL" => llamagen(48, 24, 1536),
            "editar-xl" => GptConfig {
                family: Family::EditAr,
                background: true,
                img_uncond: true,
                align_dim: Some(768),
                ..llamagen(36, 20, 1280)
            },
            "tokenar-xl" => GptConfig {
                family: Family::TokenAr,
                max_refs: 3,
                background: true,
                n_instruct: 120,
                index_embedding: true,
                itd: true,
                scheme: Scheme::Reference { pad_to: Some(3), quirk_index: true },
                img_uncond: true,
                align_dim: Some(768),
                ..llamagen(36, 20, 1280)
            },
            "tiny" => native(1024, 4, 2, 128, (8, 8), 16, 8),
            "small" => native(4096, 8, 6, 384, (16, 16), 32, 32),
            other => {
                return Err(Error::invalid(
                    "preset",
                    format!("unknown preset `{other}` (known: B, L, XL, XXL, editar-xl, tokenar-xl, tiny, small)"),
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_parameter_counts() {
        // LlamaGen's published sizes; within 1%.
        for (name, want) in [("B", 111e6), ("L", 343e6), ("XL", 775e6), ("XXL", 1.4e9)] {
            let c = GptConfig::preset(name).unwrap();
            c.validate().unwrap();
            let got = c.backbone_params() as f64;
            assert!((got / want - 1.0).abs() < 0.01, "{name}: {got} vs {want}");
        }
        let b = GptConfig::preset("B").unwrap();
        assert_eq!(b.ffn_hidden(), 2048);
        assert_eq!(GptConfig::preset("L").unwrap().ffn_hidden(), 2816);
        assert_eq!(GptConfig::preset("XL").unwrap().ffn_hidden(), 3584);
        assert_eq!(GptConfig::preset("XXL").unwrap().ffn_hidden(), 4096);
        // The caption projection adds 2048*768 + 768*768 to B.
        assert_eq!(b.num_params() - b.backbone_params(), 2048 * 768 + 768 * 768);
        let t = GptConfig::preset("tokenar-xl").unwrap();
        assert_eq!(t.cond_slots(), 4);
        assert_eq!(t.num_params() - t.backbone_params(), 2048 * 1280 + 1280 * 1280 + 4 * 1280 + 120 * 1280 + 768 * 1280 * 4 + 768);
        assert!(GptConfig::preset("nope").is_err());
        for n in ["tiny", "small", "editar-xl"] {
            GptConfig::preset(n).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn config_json_round_trip() {
        let c = GptConfig::preset("tokenar-xl").unwrap();
        let s = serde_json::to_string(&c).unwrap();
        let back: GptConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn limits_refuse_oversized_configs() {
        let base = GptConfig::preset("tiny").unwrap();
        let cases: Vec<(&str, Box<dyn Fn(&mut GptConfig)>)> = vec![
            ("vocab_size", Box::new(|c| c.vocab_size = 2_000_000_000)),
            ("grid rows", Box::new(|c| c.grid = (100_000, 100_000))),
            ("max_refs", Box::new(|c| c.max_refs = 1_000_000)),
            ("n_layer", Box::new(|c| c.n_layer = 100_000_000)),
            ("dim", Box::new(|c| {
                c.dim = usize::MAX / 2;
                c.n_head = 1;
            })),
            ("positions", Box::new(|c| c.grid = (128, 128))),
            ("ffn_multiple_of", Box::new(|c| c.ffn_multiple_of = usize::MAX)),
            ("rope_base", Box::new(|c| c.rope_base = f64::NAN)),
        ];
        for (what, edit) in cases {
            let mut c = base.clone();
            edit(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(what) && (e.contains("limit") || e.contains("finite")), "{what}: {e}");
        }
        for n in ["B", "L", "XL", "XXL", "editar-xl", "tokenar-xl", "tiny", "small"] {
            GptConfig::preset(n).unwrap().check_limits().unwrap();
        }
    }

    #[test]
    fn config_must_fit_the_file() {
        let c = GptConfig::preset("tiny").unwrap();
        c.check_fits_values(c.num_params()).unwrap();
        let mut big = c.clone();
        big.n_layer = 200;
        let e = big.check_fits_values(c.num_params()).unwrap_err().to_string();
        assert!(e.contains("200 layers") && e.contains(&c.num_params().to_string()), "{e}");
    }
}
