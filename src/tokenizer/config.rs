//! The VQ-VAE configuration and its presets.
//!
//! `vq-16` and `vq-8` are LlamaGen's tokenizers exactly (their checkpoints load into them);
//! `vq-small`, `vq-small-f4` and `vq-tiny` keep the same module tree with fewer channels and
//! codes, sized for 64 px images on a CPU.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Shape of a LlamaGen-style VQ-VAE. The field names are this project's; the module tree they
/// build is LlamaGen's (`encoder.conv_blocks.{l}.res.{j}...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqConfig {
    /// Base channel count; level `l` has `ch * ch_mult[l]` channels.
    pub ch: usize,
    /// Channel multiplier per resolution level; `len - 1` downsamplings by 2.
    pub ch_mult: Vec<usize>,
    /// Residual blocks per level in the encoder (LlamaGen: 2).
    pub enc_res_blocks: usize,
    /// Residual blocks per level in the decoder (LlamaGen: 3, i.e. its `num_res_blocks + 1`).
    pub dec_res_blocks: usize,
    /// Channels of the latent before `quant_conv` / after `post_quant_conv`.
    pub z_channels: usize,
    /// Number of codes.
    pub codebook_size: usize,
    /// Dimension of one code.
    pub codebook_dim: usize,
    /// GroupNorm groups (LlamaGen: 32); must divide every channel count.
    pub norm_groups: usize,
    /// GroupNorm epsilon (LlamaGen: 1e-6).
    pub norm_eps: f64,
    /// Commitment loss weight (LlamaGen: 0.25).
    pub commit_beta: f64,
    /// Image side the model is trained at by default (any multiple of `downsample()` works).
    pub image_size: usize,
}

/// Limits on a tokenizer config (far above LlamaGen's: 512 channels, 5 levels, 16384 codes), so
/// that a file's metadata cannot ask for impossible memory.
pub const MAX_VQ_CHANNELS: usize = 8192;
pub const MAX_VQ_LEVELS: usize = 8;
pub const MAX_VQ_RES_BLOCKS: usize = 16;
pub const MAX_VQ_CODEBOOK: usize = 1 << 20;

/// The names [`VqConfig::preset`] accepts.
pub const PRESETS: [&str; 5] = ["vq-16", "vq-8", "vq-small", "vq-small-f4", "vq-tiny"];

impl VqConfig {
    pub fn preset(name: &str) -> Result<Self> {
        let llamagen = |ch_mult: Vec<usize>| VqConfig {
            ch: 128,
            ch_mult,
            enc_res_blocks: 2,
            dec_res_blocks: 3,
            z_channels: 256,
            codebook_size: 16384,
            codebook_dim: 8,
            norm_groups: 32,
            norm_eps: 1e-6,
            commit_beta: 0.25,
            image_size: 256,
        };
        let cfg = match name {
            "vq-16" => llamagen(vec![1, 1, 2, 2, 4]),
            "vq-8" => llamagen(vec![1, 2, 2, 4]),
            // The built-in tokenizer: 64 px images -> 8x8 codes.
            // Channels are kept low at the two full-resolution levels, where a CPU spends its time.
            "vq-small" => VqConfig {
                ch: 16,
                ch_mult: vec![1, 2, 4, 4],
                enc_res_blocks: 1,
                dec_res_blocks: 2,
                z_channels: 64,
                codebook_size: 1024,
                codebook_dim: 8,
                norm_groups: 8,
                norm_eps: 1e-6,
                commit_beta: 0.25,
                image_size: 64,
            },
            // vq-small with one downsampling level fewer: 64 px -> 16x16 codes, four times the
            // code rate (26.4 dB on the synthetic test images against vq-small's 21.0), for a
            // GPT four times longer.
            "vq-small-f4" => VqConfig {
                ch_mult: vec![1, 2, 4],
                ..Self::preset("vq-small")?
            },
            // For tests: the smallest model with every kind of module.
            "vq-tiny" => VqConfig {
                ch: 8,
                ch_mult: vec![1, 2],
                enc_res_blocks: 1,
                dec_res_blocks: 2,
                z_channels: 8,
                codebook_size: 16,
                codebook_dim: 4,
                norm_groups: 4,
                norm_eps: 1e-6,
                commit_beta: 0.25,
                image_size: 16,
            },
            other => {
                return Err(Error::invalid(
                    "tokenizer preset",
                    format!("unknown preset `{other}` (known: {})", PRESETS.join(", ")),
                ))
            }
        };
        Ok(cfg)
    }

    /// The architecture a LlamaGen-style checkpoint's tensors describe, given the shape of each
    /// key (`None` when absent): `ch` from `encoder.conv_in`, the channel multipliers from the
    /// output width of each encoder level's first residual block, the residual blocks per level
    /// from `encoder.conv_blocks.0.res.*` / `decoder.conv_blocks.0.res.*`, `z_channels` from
    /// `encoder.conv_out` and the codebook from `quantize.embedding.weight`. What the tensors
    /// cannot say is LlamaGen's: 32 GroupNorm groups, eps 1e-6, commitment 0.25, 256 px (the
    /// result is not checked against the groups: see [`VqConfig::validate`]).
    ///
    /// `Ok(None)` when the keys of a VQ tokenizer are not there at all (another kind of file);
    /// an error message when they are there but do not describe one consistent model.
    pub fn infer_from_shapes(shape: &dyn Fn(&str) -> Option<Vec<usize>>) -> std::result::Result<Option<Self>, String> {
        let (Some(conv_in), Some(codebook)) = (shape("encoder.conv_in.weight"), shape("quantize.embedding.weight")) else {
            return Ok(None);
        };
        let dims = |key: &str, rank: usize| -> std::result::Result<Vec<usize>, String> {
            match shape(key) {
                Some(d) if d.len() == rank => Ok(d),
                Some(d) => Err(format!("`{key}` has shape {d:?}, expected {rank} dimensions")),
                None => Err(format!("`{key}` is missing")),
            }
        };
        if conv_in.len() != 4 || conv_in[1] != 3 {
            return Err(format!("`encoder.conv_in.weight` has shape {conv_in:?}, expected (ch, 3, 3, 3)"));
        }
        if codebook.len() != 2 {
            return Err(format!("`quantize.embedding.weight` has shape {codebook:?}, expected (codebook_size, codebook_dim)"));
        }
        let ch = conv_in[0];
        // Consecutive indices `{prefix}{i}.{suffix}` present from 0.
        let count = |prefix: &str, suffix: &str| (0..).take_while(|i| shape(&format!("{prefix}{i}.{suffix}")).is_some()).count();
        let levels = count("encoder.conv_blocks.", "res.0.conv1.weight");
        if levels == 0 {
            return Err("`encoder.conv_blocks.0.res.0.conv1.weight` is missing".into());
        }
        if levels > 16 {
            return Err(format!("the encoder has {levels} levels (at most 16 are supported)"));
        }
        let mut ch_mult = Vec::with_capacity(levels);
        for l in 0..levels {
            let out = dims(&format!("encoder.conv_blocks.{l}.res.0.conv1.weight"), 4)?[0];
            if ch == 0 || out % ch != 0 {
                return Err(format!("encoder level {l} has {out} channels, not a multiple of ch {ch}"));
            }
            ch_mult.push(out / ch);
        }
        let enc_res_blocks = count("encoder.conv_blocks.0.res.", "conv1.weight");
        for l in 1..levels {
            let n = count(&format!("encoder.conv_blocks.{l}.res."), "conv1.weight");
            if n != enc_res_blocks {
                return Err(format!("encoder level {l} has {n} residual blocks, level 0 has {enc_res_blocks}"));
            }
        }
        let dec_res_blocks = count("decoder.conv_blocks.0.res.", "conv1.weight");
        let dec_levels = count("decoder.conv_blocks.", "res.0.conv1.weight");
        if dec_levels != levels {
            return Err(format!("the decoder has {dec_levels} levels, the encoder {levels}"));
        }
        let z_channels = dims("encoder.conv_out.weight", 4)?[0];
        let downsample = 1usize << (levels - 1);
        let cfg = VqConfig {
            ch,
            ch_mult,
            enc_res_blocks,
            dec_res_blocks,
            z_channels,
            codebook_size: codebook[0],
            codebook_dim: codebook[1],
            norm_groups: 32,
            norm_eps: 1e-6,
            commit_beta: 0.25,
            image_size: if 256 % downsample == 0 { 256 } else { 16 * downsample },
        };
        // The structure must build a model; whether 32 groups divide the channel counts is
        // checked where the config is used (a preset may supply other groups).
        VqConfig { norm_groups: 1, ..cfg.clone() }.validate().map_err(|e| e.to_string())?;
        Ok(Some(cfg))
    }

    /// The preset this architecture is, if any.
    pub fn preset_name(&self) -> Option<&'static str> {
        PRESETS.iter().copied().find(|p| Self::preset(p).map(|c| c.same_architecture(self)).unwrap_or(false))
    }

    /// Configs describing the same tensors (fields the tensors do not show may differ).
    pub fn same_architecture(&self, other: &VqConfig) -> bool {
        self.ch == other.ch
            && self.ch_mult == other.ch_mult
            && self.enc_res_blocks == other.enc_res_blocks
            && self.dec_res_blocks == other.dec_res_blocks
            && self.z_channels == other.z_channels
            && self.codebook_size == other.codebook_size
            && self.codebook_dim == other.codebook_dim
    }

    /// One line: `ch 128 x [1, 1, 2, 2, 4], 2/3 res blocks, z 256, codebook 16384 x 8, ...`.
    pub fn describe(&self) -> String {
        format!(
            "ch {} x {:?}, {}/{} res blocks (encoder/decoder), z {}, codebook {} x {}, downsample {}, {} params",
            self.ch,
            self.ch_mult,
            self.enc_res_blocks,
            self.dec_res_blocks,
            self.z_channels,
            self.codebook_size,
            self.codebook_dim,
            self.downsample(),
            self.num_params()
        )
    }

    /// Spatial reduction factor: `2^(len(ch_mult) - 1)`.
    pub fn downsample(&self) -> usize {
        1usize << self.ch_mult.len().saturating_sub(1)
    }

    /// Every size within its limit (`MAX_VQ_*` above), run first by [`Self::validate`], so that
    /// a config from a file's metadata cannot make the counts overflow or ask for impossible
    /// memory.
    pub fn check_limits(&self) -> Result<()> {
        let fields: [(&str, usize, usize); 8] = [
            ("ch", self.ch, MAX_VQ_CHANNELS),
            ("ch_mult length", self.ch_mult.len(), MAX_VQ_LEVELS),
            ("enc_res_blocks", self.enc_res_blocks, MAX_VQ_RES_BLOCKS),
            ("dec_res_blocks", self.dec_res_blocks, MAX_VQ_RES_BLOCKS),
            ("z_channels", self.z_channels, MAX_VQ_CHANNELS),
            ("codebook_size", self.codebook_size, MAX_VQ_CODEBOOK),
            ("codebook_dim", self.codebook_dim, MAX_VQ_CHANNELS),
            ("image_size", self.image_size, crate::util::MAX_IMAGE_SIZE as usize),
        ];
        for (name, value, max) in fields {
            if value > max {
                return Err(Error::invalid("tokenizer config", format!("{name} {value} is larger than the limit of {max}")));
            }
        }
        for m in &self.ch_mult {
            if self.ch * m > MAX_VQ_CHANNELS {
                return Err(Error::invalid(
                    "tokenizer config",
                    format!("ch {} x ch_mult {m} is larger than the limit of {MAX_VQ_CHANNELS} channels", self.ch),
                ));
            }
        }
        if self.norm_groups > MAX_VQ_CHANNELS || !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return Err(Error::invalid(
                "tokenizer config",
                format!("norm_groups {} must be at most {MAX_VQ_CHANNELS} and norm_eps {} finite and non-negative", self.norm_groups, self.norm_eps),
            ));
        }
        Ok(())
    }

    /// A configuration read from a file's metadata must describe the tensors beside it: the
    /// parameters it implies cannot exceed the `values` the file holds. Checked before the
    /// model is built, so an edited config is an error naming both numbers, not an allocation.
    pub fn check_fits_values(&self, values: usize) -> Result<()> {
        self.check_limits()?;
        let implied = self.num_params();
        if implied > values {
            return Err(Error::invalid(
                "tokenizer config",
                format!("it implies {implied} parameters ({}) but the file holds only {values} values", self.describe()),
            ));
        }
        Ok(())
    }

    /// Check that the config builds a model.
    pub fn validate(&self) -> Result<()> {
        self.check_limits()?;
        let bad = |msg: String| Err(Error::invalid("tokenizer config", msg));
        if self.ch == 0 || self.ch_mult.is_empty() || self.ch_mult.contains(&0) {
            return bad(format!("ch {} and ch_mult {:?} must be non-empty and positive", self.ch, self.ch_mult));
        }
        if self.enc_res_blocks == 0 || self.dec_res_blocks == 0 {
            return bad("enc_res_blocks and dec_res_blocks must be at least 1".into());
        }
        if self.z_channels == 0 || self.codebook_size < 2 || self.codebook_dim == 0 {
            return bad("z_channels, codebook_size (>= 2) and codebook_dim must be positive".into());
        }
        if self.codebook_size > u32::MAX as usize {
            return bad(format!("codebook_size {} does not fit u32 codes", self.codebook_size));
        }
        if self.norm_groups == 0 {
            return bad("norm_groups must be positive".into());
        }
        for m in &self.ch_mult {
            let c = self.ch * m;
            if c % self.norm_groups != 0 {
                return bad(format!("norm_groups {} does not divide channel count {c}", self.norm_groups));
            }
        }
        if self.image_size % self.downsample() != 0 {
            return bad(format!("image_size {} is not a multiple of the downsampling {}", self.image_size, self.downsample()));
        }
        Ok(())
    }

    /// Parameter count of the model this config builds, computed without allocating.
    /// (`quantize.codebook_used` is a buffer of LlamaGen's, not a parameter, and not counted.)
    pub fn num_params(&self) -> usize {
        let conv = |i: usize, o: usize, k: usize| o * i * k * k + o;
        let norm = |c: usize| 2 * c;
        let res = |i: usize, o: usize| {
            norm(i) + conv(i, o, 3) + norm(o) + conv(o, o, 3) + if i != o { conv(i, o, 1) } else { 0 }
        };
        let attn = |c: usize| norm(c) + 4 * conv(c, c, 1);
        let levels = self.ch_mult.len();
        let top = self.ch * self.ch_mult[levels - 1];
        let mid = 2 * res(top, top) + attn(top);

        // Encoder.
        let mut n = conv(3, self.ch, 3);
        let mut c_in = self.ch;
        for (l, m) in self.ch_mult.iter().enumerate() {
            let c_out = self.ch * m;
            for _ in 0..self.enc_res_blocks {
                n += res(c_in, c_out);
                c_in = c_out;
                if l == levels - 1 {
                    n += attn(c_in);
                }
            }
            if l != levels - 1 {
                n += conv(c_in, c_in, 3);
            }
        }
        n += mid + norm(c_in) + conv(c_in, self.z_channels, 3);

        // Decoder.
        n += conv(self.z_channels, top, 3) + mid;
        let mut c_in = top;
        for l in 0..levels {
            let c_out = self.ch * self.ch_mult[levels - 1 - l];
            for _ in 0..self.dec_res_blocks {
                n += res(c_in, c_out);
                c_in = c_out;
                if l == 0 {
                    n += attn(c_in);
                }
            }
            if l != levels - 1 {
                n += conv(c_in, c_in, 3);
            }
        }
        n += norm(c_in) + conv(c_in, 3, 3);

        // Quantiser and the 1x1 convs around it.
        n + conv(self.z_channels, self.codebook_dim, 1)
            + conv(self.codebook_dim, self.z_channels, 1)
            + self.codebook_size * self.codebook_dim
    }
}
