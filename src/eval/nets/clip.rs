//! CLIP-I: CLIP ViT-B/32 image embeddings (vision tower + visual projection) through
//! candle-transformers `models::clip`, with the Hugging Face key names of
//! `openai/clip-vit-base-patch32` (`vision_model.*`, `visual_projection.weight`).
//! Preprocessing as CLIP's: resize the shorter side to 224 (bicubic, antialiased), centre
//! crop 224, CLIP mean/std.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};

use super::preprocess::{center_crop, check_images, normalize_from_signed, resize_shorter, Resample, CLIP_MEAN, CLIP_STD};
use super::{open_weights, var_builder, ImageEmbedder};
use crate::{Error, Result};

const CLIP_NEEDS: &str = "CLIP-I needs the CLIP ViT-B/32 weights in the Hugging Face layout: model.safetensors \
(or pytorch_model.bin) from huggingface.co/openai/clip-vit-base-patch32";

/// The parts of the vision config that are not fixed by the architecture family.
#[derive(Clone, Debug)]
pub struct ClipVisionSettings {
    pub embed_dim: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub projection_dim: usize,
    pub image_size: usize,
    pub patch_size: usize,
}

impl ClipVisionSettings {
    pub fn vit_b32() -> Self {
        let c = ClipVisionConfig::vit_base_patch32();
        Self {
            embed_dim: c.embed_dim,
            intermediate_size: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            projection_dim: c.projection_dim,
            image_size: c.image_size,
            patch_size: c.patch_size,
        }
    }

    fn candle(&self) -> ClipVisionConfig {
        let mut c = ClipVisionConfig::vit_base_patch32();
        c.embed_dim = self.embed_dim;
        c.intermediate_size = self.intermediate_size;
        c.num_hidden_layers = self.layers;
        c.num_attention_heads = self.heads;
        c.projection_dim = self.projection_dim;
        c.image_size = self.image_size;
        c.patch_size = self.patch_size;
        c
    }
}

pub struct ClipImageEncoder {
    settings: ClipVisionSettings,
    vision: ClipVisionTransformer,
    projection: candle_nn::Linear,
}

impl ClipImageEncoder {
    pub fn load(settings: ClipVisionSettings, path: &Path, device: &Device) -> Result<Self> {
        let f = open_weights(path, CLIP_NEEDS, device)?;
        let s = &settings;
        // check the shapes that decide the architecture, so a wrong file is named clearly
        f.get("vision_model.embeddings.patch_embedding.weight", &[s.embed_dim, 3, s.patch_size, s.patch_size])?;
        let npos = (s.image_size / s.patch_size).pow(2) + 1;
        f.get("vision_model.embeddings.position_embedding.weight", &[npos, s.embed_dim])?;
        f.get("vision_model.embeddings.class_embedding", &[s.embed_dim])?;
        let w = f.get("visual_projection.weight", &[s.projection_dim, s.embed_dim])?.to_dtype(DType::F32)?;
        let last = format!("vision_model.encoder.layers.{}.mlp.fc2.weight", s.layers.saturating_sub(1));
        f.get(&last, &[s.embed_dim, s.intermediate_size])?;
        let path_buf = f.path.clone();
        let vb = var_builder(f.tensors, device)?;
        let vision = ClipVisionTransformer::new(vb.pp("vision_model"), &settings.candle())
            .map_err(|e| Error::bad_file(&path_buf, format!("not a CLIP vision model with {settings:?}: {e}")))?;
        Ok(Self { settings, vision, projection: candle_nn::Linear::new(w, None) })
    }

    /// Projected embeddings of already preprocessed (B, 3, S, S) inputs.
    pub fn forward_preprocessed(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.vision.forward(x)?.apply(&self.projection)?)
    }
}

impl ImageEmbedder for ClipImageEncoder {
    fn name(&self) -> &'static str {
        "CLIP-I"
    }
    fn embed(&self, images: &Tensor) -> Result<Tensor> {
        check_images("CLIP input", images)?;
        let s = self.settings.image_size;
        let x = resize_shorter(&images.to_dtype(DType::F32)?, s, Resample::BicubicAntialias)?;
        let x = normalize_from_signed(&center_crop(&x, s)?, CLIP_MEAN, CLIP_STD)?;
        self.forward_preprocessed(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::nets::fixtures::{assert_close, input, path};

    fn tiny() -> ClipVisionSettings {
        ClipVisionSettings { embed_dim: 32, intermediate_size: 64, layers: 2, heads: 2, projection_dim: 16, image_size: 16, patch_size: 4 }
    }

    #[test]
    fn clip_matches_pytorch_reference() -> Result<()> {
        let m = ClipImageEncoder::load(tiny(), &path("clip_vision.safetensors"), &Device::Cpu)?;
        assert_close(&m.embed(&input("clip_in")?)?, "clip_embed", 1e-4);
        Ok(())
    }

    #[test]
    fn clip_missing_or_wrong_file_is_named() {
        let err = ClipImageEncoder::load(ClipVisionSettings::vit_b32(), Path::new("w/clip.safetensors"), &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("openai/clip-vit-base-patch32") && err.contains("w/clip.safetensors"), "{err}");
        let err = ClipImageEncoder::load(ClipVisionSettings::vit_b32(), &path("clip_vision.safetensors"), &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("patch_embedding.weight"), "{err}");
    }
}
