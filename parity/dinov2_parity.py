#!/usr/bin/env python3
"""DINOv2 parity fixtures for the distillation features, computed as EditAR/TokenAR compute them.

The reference (TokenAR `feature_encoders/build.py`, mode 'dinov2') hands `(x + 1) / 2` to
`AutoImageProcessor.from_pretrained("facebook/dinov2-base")` (transformers 4.54: the slow, PIL
`BitImageProcessor`: shorter side 256 bicubic, centre crop 224, ImageNet mean/std) and takes
`Dinov2Model(...).last_hidden_state[:, 1:]`. This script builds a tiny random `Dinov2Model`
(width 32, 2 layers, 2 heads, patch 14, trained size 518 px: a 37x37 position grid, resampled
to 16x16 at 224 px, as dinov2-base is) and writes under --out (default tests/fixtures/parity):

  dinov2_parity/model.safetensors, config.json   the model as `save_pretrained` writes it
  dinov2_parity/fixture.safetensors
      images        (2, 3, 40, 52) input images in [-1, 1] on 8-bit levels (v / 127.5 - 1)
      pixels_sub    the processor's pixel_values at every 8th row and column (2, 3, 28, 28)
      net_in        (2, 3, 224, 224) is not stored: the network input is the closed formula
                    1.5 * sin(0.05 x + 0.07 y + c + 1.3 b) (b, c, y, x), rebuilt by the test
      features      (2, 256, 32) the model's patch features (last_hidden_state[:, 1:]) of it

The processor is given the images as 8-bit arrays (exactly what the reference's float input
holds after the processor's own `* 255` and u8 conversion, up to the float rounding that the
Rust side absorbs with a margin; see src/eval/nets/dinov2.rs).

With --save-model DIR --width W --depth D --heads H it instead writes a randomly initialised
`Dinov2Model` of that size (Hugging Face's initialisation) to DIR, e.g. a DINOv2-S stand-in
(384, 12, 6) for exercising the distillation plumbing where the real weights are not at hand.

    pip install torch transformers safetensors pillow numpy
    python parity/dinov2_parity.py [--out tests/fixtures/parity]
"""

import argparse
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model

try:  # transformers >= 5: the PIL processor has its own class
    from transformers import BitImageProcessorPil as Processor
except ImportError:  # transformers 4.x: the slow processor is the PIL one
    from transformers import BitImageProcessor as Processor

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def config(width, depth, heads):
    return Dinov2Config(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        hidden_act="gelu",
    )


def processor():
    return Processor(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=MEAN,
        image_std=STD,
        do_convert_rgb=True,
    )


def net_input(b, size=224):
    y = torch.arange(size, dtype=torch.float32).view(1, 1, size, 1)
    x = torch.arange(size, dtype=torch.float32).view(1, 1, 1, size)
    c = torch.arange(3, dtype=torch.float32).view(1, 3, 1, 1)
    bb = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1)
    return 1.5 * torch.sin(0.05 * x + 0.07 * y + c + 1.3 * bb)


def randomize(model, seed):
    """Random weights with more spread than the default init, so that every part matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and "embeddings" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/parity")
    ap.add_argument("--save-model")
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    if args.save_model:
        model = Dinov2Model(config(args.width, args.depth, args.heads)).eval()
        model.save_pretrained(args.save_model, safe_serialization=True)
        print(f"wrote a random Dinov2Model ({args.width} wide, {args.depth} layers) to {args.save_model}")
        return

    out = os.path.join(args.out, "dinov2_parity")
    os.makedirs(out, exist_ok=True)
    model = Dinov2Model(config(32, 2, 2)).eval()
    randomize(model, 1)
    model.save_pretrained(out, safe_serialization=True)

    g = torch.Generator().manual_seed(2)
    levels = torch.randint(0, 256, (2, 40, 52, 3), generator=g, dtype=torch.uint8)
    images = (levels.permute(0, 3, 1, 2).float() / 127.5 - 1).contiguous()
    pv = processor()([im.numpy() for im in levels], return_tensors="pt")["pixel_values"]
    assert pv.shape == (2, 3, 224, 224), pv.shape

    with torch.no_grad():
        feats = model(pixel_values=net_input(2)).last_hidden_state[:, 1:]
    save_file(
        {
            "images": images,
            "pixels_sub": pv[:, :, ::8, ::8].contiguous().float(),
            "features": feats.contiguous().float(),
        },
        os.path.join(out, "fixture.safetensors"),
    )
    print(f"wrote {out}: features {tuple(feats.shape)}")


if __name__ == "__main__":
    main()
