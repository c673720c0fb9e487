//! The GPT configuration (serialised as JSON into this project's checkpoints) and its presets.

use crate::error::{Error, Result};
use crate::layout::{LayoutSpec, Scheme};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

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
    /// Token grid of one image (rows, cols): the background's and the target's.
    pub grid: (usize, usize),
    /// Token grid of the references (and their ITD copies) when smaller than `grid` (`None`:
    /// `grid`, as in every public checkpoint). Tiles scheme only.
    #[serde(default)]
    pub ref_grid: Option<(usize, usize)>,
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

    /// The grid of the references and their ITD copies.
    pub fn ref_grid(&self) -> (usize, usize) {
        self.ref_grid.unwrap_or(self.grid)
    }

    /// Tokens of one reference.
    pub fn ref_tokens(&self) -> usize {
        let (h, w) = self.ref_grid();
        h * w
    }

    /// Rows of `img_uncond_embedding`: the null image of every reference slot (at the
    /// reference grid), then the background's (at the image grid).
    pub fn null_image_rows(&self) -> usize {
        self.null_image_offset(None) + self.background as usize * self.image_tokens()
    }

    /// First row of `img_uncond_embedding` that belongs to reference slot `Some(i)`, or to
    /// the background (`None`), in the order [`Self::null_image_rows`] gives.
    pub fn null_image_offset(&self, slot: Option<usize>) -> usize {
        let ref_slots = self.cond_slots() - self.background as usize;
        slot.unwrap_or(ref_slots) * self.ref_tokens()
    }

    /// The layout of a sample with `n_refs` references under this configuration.
    pub fn layout_spec(&self, n_refs: usize) -> LayoutSpec {
        LayoutSpec {
            n_refs,
            max_refs: self.max_refs,
            grid: self.grid,
            ref_grid: self.ref_grid,
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
        if let Some((rh, rw)) = self.ref_grid {
            if rh == 0 || rw == 0 || rh > self.grid.0 || rw > self.grid.1 || self.scheme != Scheme::Tiles {
                return bad(format!(
                    "ref_grid {rh}x{rw} must be positive, within the grid {:?}, and needs the Tiles scheme (this one: {:?})",
                    self.grid, self.scheme
                ));
            }
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
        let (ref_rows, ref_cols) = self.ref_grid();
        let fields: [(&str, usize, usize); 13] = [
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
            ("ref_grid rows", ref_rows, MAX_GRID_SIDE),
            ("ref_grid columns", ref_cols, MAX_GRID_SIDE),
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
        let ref_slots = self.cond_slots().max(self.max_refs + self.background as usize) - self.background as usize;
        let refs = ref_slots + if self.itd { self.max_refs } else { 0 };
        let images = self.background as usize + 1;
        self.caption_len + self.n_instruct + refs * self.ref_tokens() + images * self.image_tokens()
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
    /// `tokenar-xl`; built-in CPU models: `tiny`, `small`; `anchor`: the LlamaGen t2i GPT with
    /// dim 256, 4 layers, 8 heads and a 16x16 grid, the shapes of the PyTorch performance anchor
    /// the benchmark compares with. [`GptConfig::from_preset`] applies changes to one.
    pub fn preset(name: &str) -> Result<Self> {
        // LlamaGen's text-to-image GPT: every addition of [`ADDITIONS`] off.
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
            ref_grid: None,
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
            "anchor" => GptConfig { grid: (16, 16), ..llamagen(4, 8, 256) },
            other => {
                return Err(Error::invalid(
                    "preset",
                    format!("unknown preset `{other}` (known: {})", PRESETS.join(", ")),
                ))
            }
        })
    }

    /// The preset `name` with the changes `o`, validated: the one way a configuration is made
    /// from a name (the training config's `[model]` section with what the data and the text
    /// encoder fix, the benchmark's shape flags). A built-in preset reads text features as
    /// wide as the model, so a new `dim` without a `caption_dim` changes both.
    pub fn from_preset(name: &str, o: &Overrides) -> Result<Self> {
        let mut c = Self::preset(name)?;
        if let Some(d) = o.dim {
            c.dim = d;
            if c.family == Family::Native {
                c.caption_dim = d;
            }
        }
        c.vocab_size = o.vocab_size.unwrap_or(c.vocab_size);
        c.n_layer = o.n_layer.unwrap_or(c.n_layer);
        c.n_head = o.n_head.unwrap_or(c.n_head);
        c.grid = o.grid.unwrap_or(c.grid);
        c.ref_grid = o.ref_grid.or(c.ref_grid);
        c.caption_dim = o.caption_dim.unwrap_or(c.caption_dim);
        c.caption_len = o.caption_len.unwrap_or(c.caption_len);
        c.max_refs = o.max_refs.unwrap_or(c.max_refs);
        c.n_instruct = o.n_instruct.unwrap_or(c.n_instruct);
        c.index_embedding = o.index_embedding.unwrap_or(c.index_embedding);
        c.itd = o.itd.unwrap_or(c.itd);
        c.cell_embedding = o.cell_embedding.unwrap_or(c.cell_embedding);
        if let Some(p) = o.dropout {
            (c.dropouts.token, c.dropouts.resid, c.dropouts.ffn) = (p, p, p);
        }
        c.validate()?;
        Ok(c)
    }

    /// This configuration with every addition to LlamaGen's GPT off ([`ADDITIONS`]): the
    /// LlamaGen text-to-image model of the same backbone.
    pub fn without_additions(&self) -> Self {
        GptConfig {
            family: Family::LlamaGen,
            max_refs: 0,
            background: false,
            n_instruct: 0,
            index_embedding: false,
            itd: false,
            cell_embedding: false,
            scheme: Scheme::Reference { pad_to: None, quirk_index: false },
            img_uncond: false,
            align_dim: None,
            ..self.clone()
        }
    }
}

/// The names [`GptConfig::preset`] knows.
pub const PRESETS: [&str; 9] = ["B", "L", "XL", "XXL", "editar-xl", "tokenar-xl", "tiny", "small", "anchor"];

/// What EditAR, TokenAR and this project add to LlamaGen's GPT, as the checkpoint keys (or key
/// prefixes) of their parameters: the null image (`img_uncond_embedding`), the distillation
/// head (`alignment`), the index embedding, the instruct tokens and the cell embedding. A
/// LlamaGen (or EditAR) checkpoint lacks some of them: loading it into a model that has them
/// initialises them fresh. [`GptConfig::without_additions`] turns them all off.
pub const ADDITIONS: [&str; 5] = ["ref_index_embeddings.", "instruct_token_embeddings.", "alignment.", "img_uncond_embedding", "cell_embeddings."];

/// Changes to a preset's values ([`GptConfig::from_preset`]); `None` keeps the preset's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    pub vocab_size: Option<usize>,
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub dim: Option<usize>,
    /// Token grid of one image (rows, cols).
    pub grid: Option<(usize, usize)>,
    /// Token grid of the references, when smaller than `grid`.
    pub ref_grid: Option<(usize, usize)>,
    pub caption_dim: Option<usize>,
    pub caption_len: Option<usize>,
    pub max_refs: Option<usize>,
    pub n_instruct: Option<usize>,
    pub index_embedding: Option<bool>,
    pub itd: Option<bool>,
    pub cell_embedding: Option<bool>,
    /// One rate for token, residual and FFN dropout.
    pub dropout: Option<f32>,
}

/// Token grid side assumed for a checkpoint that does not record it: 32 (512 px with the VQ-16
/// tokenizer), the resolution of LlamaGen's stage-2 t2i model, EditAR and TokenAR.
pub const DEFAULT_GRID: usize = 32;

/// Caption rows assumed when a checkpoint has no `cls_embedding.uncond_embedding` (LlamaGen's
/// 120 T5 tokens).
pub const DEFAULT_CAPTION_LEN: usize = 120;

/// Width of one attention head in every published LlamaGen / EditAR / TokenAR model.
pub const PUBLISHED_HEAD_DIM: usize = 64;

/// The FFN rounding that gives `hidden` for width `dim`: LlamaGen's 256 when that rule gives
/// it, else `hidden` itself (any hidden size from `int(8 * dim / 3)` up); `None` below that.
fn ffn_multiple_for(dim: usize, hidden: usize) -> Option<usize> {
    let base = 2 * 4 * dim / 3;
    if base.div_ceil(256) * 256 == hidden {
        Some(256)
    } else if hidden >= base && hidden > 0 {
        Some(hidden)
    } else {
        None
    }
}

impl GptConfig {
    /// The architecture that a reference checkpoint's tensor shapes (`name -> dims`, keys as
    /// in LlamaGen / EditAR / TokenAR) determine:
    ///
    /// - width and vocabulary from `tok_embeddings.weight`, layers from the `layers.N.` keys,
    ///   FFN hidden from `layers.0.feed_forward.w1.weight`, caption width from
    ///   `cls_embedding.cap_proj.fc1.weight`, caption rows from
    ///   `cls_embedding.uncond_embedding` (else [`DEFAULT_CAPTION_LEN`]);
    /// - condition slots: `ref_index_embeddings` rows (TokenAR's `max_ref_num`, references plus
    ///   background), else `img_uncond_embedding` rows / grid cells (1: EditAR); no
    ///   `img_uncond_embedding`: LlamaGen text-to-image;
    /// - instruct tokens from `instruct_token_embeddings.weight` (1, n * width) (the reference's
    ///   "casual" mode; its "special" mode, one row per slot, is not supported);
    /// - the alignment head's width from `alignment.weight`;
    /// - the grid: from `img_uncond_embedding` and the slot count when the index embedding
    ///   gives it, else from a saved LlamaGen `freqs_cis` table, else `grid` (the caller's
    ///   hint), else [`DEFAULT_GRID`]; a hint that contradicts the file is an error;
    /// - heads: the preset's when `preset` is named, else width / 64 (every published model
    ///   has 64-wide heads).
    ///
    /// What the tensors cannot show follows the published models: with several condition
    /// slots, ITD on (TokenAR trains with the target concatenated to the references), the
    /// reference RoPE scheme, the background on the last reference index (the reference
    /// code's quirk). With `preset`, the preset's configuration is returned after every value
    /// the file determines has been checked against it; a difference is an error naming both.
    pub fn infer_from_tensors(shapes: &BTreeMap<String, Vec<usize>>, origin: &Path, preset: Option<&str>, grid: Option<usize>) -> Result<Self> {
        let bad = |msg: String| Error::bad_file(origin, msg);
        let dims = |key: &str, rank: usize| -> Result<Option<&[usize]>> {
            match shapes.get(key) {
                None => Ok(None),
                Some(d) if d.len() == rank => Ok(Some(d.as_slice())),
                Some(d) => Err(bad(format!("`{key}` has shape {d:?}; a rank-{rank} tensor was expected"))),
            }
        };
        if shapes.contains_key("cls_embedding.embedding_table.weight") {
            return Err(bad("a class-conditional LlamaGen (c2i) checkpoint; only text-conditional models (t2i, EditAR, TokenAR) are supported".into()));
        }
        let Some(&[vocab, dim]) = dims("tok_embeddings.weight", 2)? else {
            return Err(bad("no `tok_embeddings.weight`: not a LlamaGen / EditAR / TokenAR GPT checkpoint".into()));
        };
        let Some(&[fc1_out, caption_dim]) = dims("cls_embedding.cap_proj.fc1.weight", 2)? else {
            return Err(bad("no `cls_embedding.cap_proj.fc1.weight`: not a text-conditional GPT checkpoint".into()));
        };
        if fc1_out != dim {
            return Err(bad(format!("`cls_embedding.cap_proj.fc1.weight` projects to {fc1_out}, but the token width is {dim}")));
        }
        let mut layer_ids: Vec<usize> = shapes
            .keys()
            .filter_map(|k| k.strip_prefix("layers.")?.split('.').next()?.parse().ok())
            .collect();
        layer_ids.sort_unstable();
        layer_ids.dedup();
        let n_layer = layer_ids.len();
        if n_layer == 0 {
            return Err(bad("no `layers.N.` keys: the checkpoint holds no transformer blocks".into()));
        }
        if let Some((i, _)) = layer_ids.iter().enumerate().find(|(i, id)| *i != **id) {
            return Err(bad(format!("transformer blocks are numbered {layer_ids:?}; block {i} is missing")));
        }
        let Some(&[hidden, w1_in]) = dims("layers.0.feed_forward.w1.weight", 2)? else {
            return Err(bad("no `layers.0.feed_forward.w1.weight`".into()));
        };
        if w1_in != dim {
            return Err(bad(format!("`layers.0.feed_forward.w1.weight` takes {w1_in} inputs, but the token width is {dim}")));
        }
        let ffn_multiple_of = ffn_multiple_for(dim, hidden).ok_or_else(|| {
            bad(format!("FFN hidden size {hidden} is below int(8 * {dim} / 3) = {}, which LlamaGen's rule cannot give", 2 * 4 * dim / 3))
        })?;
        let caption_len = match dims("cls_embedding.uncond_embedding", 2)? {
            Some(&[rows, width]) if width == caption_dim => rows,
            Some(d) => return Err(bad(format!("`cls_embedding.uncond_embedding` has shape {d:?}, but the captions are {caption_dim} wide"))),
            None => DEFAULT_CAPTION_LEN,
        };
        let index_rows = match dims("ref_index_embeddings.weight", 2)? {
            Some(&[rows, w]) if w == dim && rows > 0 => Some(rows),
            Some(d) => return Err(bad(format!("`ref_index_embeddings.weight` has shape {d:?}; ({{slots}}, {dim}) was expected"))),
            None => None,
        };
        let uncond_rows = match dims("img_uncond_embedding", 2)? {
            Some(&[rows, w]) if w == dim && rows > 0 => Some(rows),
            Some(d) => return Err(bad(format!("`img_uncond_embedding` has shape {d:?}; ({{slots x grid cells}}, {dim}) was expected"))),
            None => None,
        };
        let n_instruct = match dims("instruct_token_embeddings.weight", 2)? {
            Some(&[1, w]) if w % dim == 0 && w > 0 => w / dim,
            Some(&[rows, w]) if rows > 1 && w % dim == 0 => {
                return Err(bad(format!(
                    "`instruct_token_embeddings.weight` has {rows} rows: the reference's \"special\" instruct mode (one set per slot) is not supported, only \"casual\" (one row)"
                )))
            }
            Some(d) => return Err(bad(format!("`instruct_token_embeddings.weight` has shape {d:?}; (1, n x {dim}) was expected"))),
            None => 0,
        };
        let align_dim = match dims("alignment.weight", 4)? {
            Some(&[a, d, 2, 2]) if d == dim => Some(a),
            Some(d) => return Err(bad(format!("`alignment.weight` has shape {d:?}; (out, {dim}, 2, 2) was expected"))),
            None => None,
        };
        let side = |cells: usize, what: &str| -> Result<usize> {
            let g = (cells as f64).sqrt().round() as usize;
            if g * g == cells && g > 0 {
                Ok(g)
            } else {
                Err(bad(format!("{what} gives {cells} cells per image, which is not a square grid")))
            }
        };
        // Grid side and condition slots.
        let (file_grid, slots) = match (uncond_rows, index_rows) {
            (Some(rows), Some(slots)) => {
                if rows % slots != 0 {
                    return Err(bad(format!("`img_uncond_embedding` has {rows} rows, not a multiple of the {slots} index-embedding slots")));
                }
                (Some(side(rows / slots, "`img_uncond_embedding` / `ref_index_embeddings`")?), slots)
            }
            (Some(rows), None) => match grid {
                Some(g) if g > 0 && rows % (g * g) == 0 => (None, rows / (g * g)),
                Some(g) => return Err(bad(format!("`img_uncond_embedding` has {rows} rows, not a multiple of a {g}x{g} grid"))),
                // One condition image (EditAR).
                None => (Some(side(rows, "`img_uncond_embedding`")?), 1),
            },
            (None, Some(_)) => return Err(bad("`ref_index_embeddings.weight` without `img_uncond_embedding`: condition images need both".into())),
            (None, None) => {
                // A saved LlamaGen table: caption rows, then one row per grid cell.
                let g = match dims("freqs_cis", 3)? {
                    Some(&[rows, _, 2]) if rows > caption_len => Some(side(rows - caption_len, "`freqs_cis`")?),
                    _ => None,
                };
                (g, 0)
            }
        };
        let g = match (file_grid, grid) {
            (Some(f), Some(h)) if f != h => {
                return Err(bad(format!("the checkpoint's tensors give a {f}x{f} token grid, but {h}x{h} was asked for")))
            }
            (Some(f), _) => f,
            (None, Some(h)) if h > 0 => h,
            (None, Some(_)) => return Err(Error::invalid("grid", "0 (must be positive)")),
            (None, None) => DEFAULT_GRID,
        };
        let mut cfg = match slots {
            0 => Self::preset("XL")?,
            1 => Self::preset("editar-xl")?,
            _ => Self::preset("tokenar-xl")?,
        };
        let refs = slots.saturating_sub(1);
        cfg.vocab_size = vocab;
        cfg.n_layer = n_layer;
        cfg.dim = dim;
        cfg.ffn_multiple_of = ffn_multiple_of;
        cfg.caption_dim = caption_dim;
        cfg.caption_len = caption_len;
        cfg.max_refs = refs;
        cfg.n_instruct = n_instruct;
        cfg.index_embedding = index_rows.is_some();
        cfg.itd = refs > 0;
        cfg.scheme = Scheme::Reference { pad_to: (refs > 0).then_some(refs), quirk_index: refs > 0 };
        cfg.grid = (g, g);
        cfg.align_dim = align_dim;
        let Some(name) = preset else {
            if dim % PUBLISHED_HEAD_DIM != 0 {
                return Err(bad(format!(
                    "width {dim} is not a multiple of {PUBLISHED_HEAD_DIM}, so the head count cannot be taken as width / {PUBLISHED_HEAD_DIM}; name a preset"
                )));
            }
            cfg.n_head = dim / PUBLISHED_HEAD_DIM;
            cfg.validate()?;
            return Ok(cfg);
        };
        let mut p = Self::preset(name)?;
        if let Some(h) = grid {
            p.grid = (h, h);
        }
        let mut diffs = Vec::new();
        let mut check = |what: &str, file: String, preset: String| {
            if file != preset {
                diffs.push(format!("{what} {file} in the file, {preset} in the preset"));
            }
        };
        check("width", dim.to_string(), p.dim.to_string());
        check("layers", n_layer.to_string(), p.n_layer.to_string());
        check("vocabulary", vocab.to_string(), p.vocab_size.to_string());
        check("FFN hidden", hidden.to_string(), p.ffn_hidden().to_string());
        check("caption width", caption_dim.to_string(), p.caption_dim.to_string());
        if shapes.contains_key("cls_embedding.uncond_embedding") {
            check("caption length", caption_len.to_string(), p.caption_len.to_string());
        }
        // TokenAR's additions are checked where the file has them (a LlamaGen checkpoint may
        // initialise a TokenAR model: its additions are then fresh).
        if let Some(rows) = index_rows {
            check("index-embedding slots", rows.to_string(), if p.index_embedding { (p.max_refs + 1).to_string() } else { "none".into() });
        }
        if uncond_rows.is_some() {
            check("condition slots", slots.to_string(), if p.img_uncond { p.cond_slots().to_string() } else { "none".into() });
            check("token grid", format!("{g}x{g}"), format!("{}x{}", p.grid.0, p.grid.1));
        }
        if n_instruct > 0 {
            check("instruct tokens", n_instruct.to_string(), p.n_instruct.to_string());
        }
        if let Some(a) = align_dim {
            check("alignment width", a.to_string(), p.align_dim.map_or("none".into(), |x| x.to_string()));
        }
        if !diffs.is_empty() {
            return Err(bad(format!("does not match preset `{name}`: {}", diffs.join("; "))));
        }
        Ok(p)
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
        for n in ["tiny", "small", "editar-xl", "anchor"] {
            GptConfig::preset(n).unwrap().validate().unwrap();
        }
        let e = GptConfig::preset("nope").unwrap_err().to_string();
        assert!(PRESETS.iter().all(|p| e.contains(p)), "{e}");
    }

    #[test]
    fn from_preset_applies_overrides() {
        assert_eq!(GptConfig::from_preset("XL", &Overrides::default()).unwrap(), GptConfig::preset("XL").unwrap());
        let o = Overrides { n_layer: Some(2), dim: Some(64), n_head: Some(4), itd: Some(false), dropout: Some(0.25), ..Default::default() };
        let c = GptConfig::from_preset("tiny", &o).unwrap();
        let tiny = GptConfig::preset("tiny").unwrap();
        assert_eq!((c.n_layer, c.dim, c.n_head, c.itd, c.caption_dim), (2, 64, 4, false, 64));
        assert_eq!((c.dropouts.token, c.dropouts.resid, c.dropouts.ffn, c.dropouts.attn), (0.25, 0.25, 0.25, tiny.dropouts.attn));
        assert_eq!((c.vocab_size, c.grid, c.max_refs, c.n_instruct), (tiny.vocab_size, tiny.grid, tiny.max_refs, tiny.n_instruct));
        // A given caption width wins; a LlamaGen preset keeps its T5 width under a new dim.
        assert_eq!(GptConfig::from_preset("tiny", &Overrides { dim: Some(64), n_head: Some(4), caption_dim: Some(24), ..Default::default() }).unwrap().caption_dim, 24);
        assert_eq!(GptConfig::from_preset("anchor", &Overrides { dim: Some(128), ..Default::default() }).unwrap().caption_dim, 2048);
        // The result is validated.
        let e = GptConfig::from_preset("tiny", &Overrides { n_head: Some(3), ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("n_head 3"), "{e}");
    }

    #[test]
    fn without_additions_is_the_llamagen_preset() {
        assert_eq!(GptConfig::preset("tokenar-xl").unwrap().without_additions(), GptConfig::preset("XL").unwrap());
        assert_eq!(GptConfig::preset("editar-xl").unwrap().without_additions(), GptConfig::preset("XL").unwrap());
        for n in PRESETS {
            let c = GptConfig::preset(n).unwrap().without_additions();
            assert_eq!(c.num_params(), c.backbone_params() + c.caption_dim * c.dim + c.dim * c.dim, "{n}");
        }
    }

    /// The key shapes a reference checkpoint of `c` holds.
    fn reference_shapes(c: &GptConfig) -> BTreeMap<String, Vec<usize>> {
        let (d, f) = (c.dim, c.ffn_hidden());
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: Vec<usize>| {
            m.insert(k.to_string(), v);
        };
        put("tok_embeddings.weight", vec![c.vocab_size, d]);
        put("output.weight", vec![c.vocab_size, d]);
        put("norm.weight", vec![d]);
        put("cls_embedding.cap_proj.fc1.weight", vec![d, c.caption_dim]);
        put("cls_embedding.cap_proj.fc2.weight", vec![d, d]);
        put("cls_embedding.uncond_embedding", vec![c.caption_len, c.caption_dim]);
        for i in 0..c.n_layer {
            put(&format!("layers.{i}.attention.wqkv.weight"), vec![3 * d, d]);
            put(&format!("layers.{i}.feed_forward.w1.weight"), vec![f, d]);
        }
        if c.img_uncond {
            put("img_uncond_embedding", vec![c.cond_slots() * c.image_tokens(), d]);
        }
        if c.index_embedding {
            put("ref_index_embeddings.weight", vec![c.max_refs + 1, d]);
        }
        if c.n_instruct > 0 {
            put("instruct_token_embeddings.weight", vec![1, c.n_instruct * d]);
        }
        if let Some(a) = c.align_dim {
            put("alignment.weight", vec![a, d, 2, 2]);
            put("alignment.bias", vec![a]);
        }
        m
    }

    #[test]
    fn published_shapes_give_the_published_configs() {
        let p = Path::new("x.pt");
        for name in ["B", "L", "XL", "XXL", "editar-xl", "tokenar-xl"] {
            let c = GptConfig::preset(name).unwrap();
            let got = GptConfig::infer_from_tensors(&reference_shapes(&c), p, None, None).unwrap();
            assert_eq!(got, c, "{name}");
            // Named, the preset is checked and returned.
            assert_eq!(GptConfig::infer_from_tensors(&reference_shapes(&c), p, Some(name), None).unwrap(), c);
        }
        // The stage-1 t2i model at 256 px: the grid comes from the hint.
        let xl = GptConfig::infer_from_tensors(&reference_shapes(&GptConfig::preset("XL").unwrap()), p, None, Some(16)).unwrap();
        assert_eq!(xl.grid, (16, 16));
        // A LlamaGen file may initialise a TokenAR model (its additions are then fresh).
        let t2i = reference_shapes(&GptConfig::preset("XL").unwrap());
        assert_eq!(GptConfig::infer_from_tensors(&t2i, p, Some("tokenar-xl"), None).unwrap(), GptConfig::preset("tokenar-xl").unwrap());
        // A saved LlamaGen RoPE table gives the grid.
        let mut with_table = t2i.clone();
        with_table.insert("freqs_cis".into(), vec![120 + 256, 32, 2]);
        assert_eq!(GptConfig::infer_from_tensors(&with_table, p, None, None).unwrap().grid, (16, 16));
    }

    #[test]
    fn non_preset_shapes() {
        let mut c = GptConfig::preset("tokenar-xl").unwrap();
        (c.dim, c.n_head, c.n_layer, c.vocab_size, c.caption_dim, c.caption_len, c.grid) = (192, 3, 3, 300, 40, 7, (6, 6));
        (c.n_instruct, c.align_dim, c.ffn_multiple_of) = (5, Some(24), 520);
        let got = GptConfig::infer_from_tensors(&reference_shapes(&c), Path::new("x.pt"), None, None).unwrap();
        assert_eq!(got, c);
        assert_eq!(got.ffn_hidden(), 520);
    }

    #[test]
    fn shapes_that_say_no_are_clear_errors() {
        let p = Path::new("ckpt/x.pt");
        let xl = GptConfig::preset("XL").unwrap();
        let err = |m: &BTreeMap<String, Vec<usize>>, preset: Option<&str>, grid: Option<usize>| {
            GptConfig::infer_from_tensors(m, p, preset, grid).unwrap_err().to_string()
        };
        let e = err(&reference_shapes(&xl), Some("L"), None);
        assert!(e.contains("ckpt/x.pt") && e.contains("`L`") && e.contains("width 1280 in the file, 1024 in the preset") && e.contains("layers 36 in the file, 24"), "{e}");
        let mut narrow = xl.clone();
        narrow.dim = 96;
        narrow.n_head = 1;
        let e = err(&reference_shapes(&narrow), None, None);
        assert!(e.contains("width 96") && e.contains("name a preset"), "{e}");
        let mut gap = reference_shapes(&xl);
        gap.retain(|k, _| !k.starts_with("layers.7."));
        assert!(err(&gap, None, None).contains("block 7 is missing"));
        let mut special = reference_shapes(&GptConfig::preset("tokenar-xl").unwrap());
        special.insert("instruct_token_embeddings.weight".into(), vec![4, 120 * 1280]);
        assert!(err(&special, None, None).contains("\"special\""));
        let tokenar = reference_shapes(&GptConfig::preset("tokenar-xl").unwrap());
        let e = err(&tokenar, None, Some(16));
        assert!(e.contains("32x32") && e.contains("16x16"), "{e}");
        let mut c2i = reference_shapes(&xl);
        c2i.insert("cls_embedding.embedding_table.weight".into(), vec![1001, 1280]);
        assert!(err(&c2i, None, None).contains("c2i"));
        let mut none = reference_shapes(&xl);
        none.remove("tok_embeddings.weight");
        assert!(err(&none, None, None).contains("tok_embeddings.weight"));
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
        for n in PRESETS {
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
