#!/usr/bin/env python3
"""BEN2 matting parity fixtures from the public TokenAR code.

Builds BEN2 (`BEN_Base` of `scripts/BEN2.py` in a TokenAR checkout: a Swin backbone, the
multi-view decoder MCLM/MCRM and its refinement head) with reduced widths and depths, gives it
random weights, and runs the reference preprocessing, network and post-processing
(`refine_foreground=True`, as `scripts/background_segment.py` calls it) on a small image.

The reference modules are used as they are (SwinTransformer, MCLM, MCRM, make_cbr and
BEN_Base.forward); only the constructor's numbers are smaller, and the network input is
512 x 512 instead of 1024 x 1024 (the reference resizes to a fixed 1024; here the same
Lanczos resize to 512). Writes:

  ben2_parity.pth            {"model_state_dict": state_dict}, as the published BEN2_Base.pth
                             (float16 values; the network runs in float32 on them)
  ben2_parity_io.safetensors image (H, W, 3) u8, the original small image;
                             resized (512, 512, 3) u8, PIL's Lanczos resize of it;
                             matte (1, 1, 512, 512) f32, the network output (sigmoid);
                             alpha (H, W) u8, the matte as 8 bits resized back (bicubic);
                             foreground (H, W, 3) u8, the refined foreground colours;
                             background (H, W, 3) u8, the image with alpha > 0 set to black;
                             metadata: the architecture

Usage: python3 parity/ben2_parity.py --tokenar PATH/TO/TokenAR --out tests/fixtures/parity
Needs: torch numpy safetensors pillow opencv-python-headless einops timm torchvision
"""

import argparse
import importlib.util
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

# Published BEN_Base: embed 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32), window 12,
# decoder width 128, refinement head 384, input 1024. Reduced here:
EMBED = 12
DEPTHS = [2, 2, 2, 2]
HEADS = [2, 2, 4, 4]
WINDOW = 12  # as published: the 64/32/16/8 token grids of a 512 input all need padding
DEC = 16
HEAD_HIDDEN = 24
SIZE = 512
IMAGE_HW = (90, 120)  # the small input image (H, W)


def load_ben2(root):
    path = os.path.join(root, "scripts", "BEN2.py")
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found (pass the root of a TokenAR checkout)")
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location("BEN2", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["BEN2"] = mod
    spec.loader.exec_module(mod)
    return mod


def build(ben):
    """BEN_Base.__init__ with smaller numbers (same module names, so the same keys)."""
    m = ben.BEN_Base.__new__(ben.BEN_Base)
    nn.Module.__init__(m)
    m.backbone = ben.SwinTransformer(embed_dim=EMBED, depths=DEPTHS, num_heads=HEADS, window_size=WINDOW)
    e = DEC
    for i in range(1, 6):
        setattr(m, f"sideout{i}", nn.Sequential(nn.Conv2d(e, 1, kernel_size=3, padding=1)))
    m.output5 = ben.make_cbr(EMBED * 8, e)
    m.output4 = ben.make_cbr(EMBED * 4, e)
    m.output3 = ben.make_cbr(EMBED * 2, e)
    m.output2 = ben.make_cbr(EMBED, e)
    m.output1 = ben.make_cbr(EMBED, e)
    m.multifieldcrossatt = ben.MCLM(e, 1, [1, 4, 8])
    m.conv1 = ben.make_cbr(e, e)
    m.conv2 = ben.make_cbr(e, e)
    m.conv3 = ben.make_cbr(e, e)
    m.conv4 = ben.make_cbr(e, e)
    m.dec_blk1 = ben.MCRM(e, 1, [2, 4, 8])
    m.dec_blk2 = ben.MCRM(e, 1, [2, 4, 8])
    m.dec_blk3 = ben.MCRM(e, 1, [2, 4, 8])
    m.dec_blk4 = ben.MCRM(e, 1, [2, 4, 8])
    m.insmask_head = nn.Sequential(
        nn.Conv2d(e, HEAD_HIDDEN, kernel_size=3, padding=1),
        nn.InstanceNorm2d(HEAD_HIDDEN),
        nn.GELU(),
        nn.Conv2d(HEAD_HIDDEN, HEAD_HIDDEN, kernel_size=3, padding=1),
        nn.InstanceNorm2d(HEAD_HIDDEN),
        nn.GELU(),
        nn.Conv2d(HEAD_HIDDEN, e, kernel_size=3, padding=1),
    )
    m.shallow = nn.Sequential(nn.Conv2d(3, e, kernel_size=3, padding=1))
    m.upsample1 = ben.make_cbg(e, e)
    m.upsample2 = ben.make_cbg(e, e)
    m.output = nn.Sequential(nn.Conv2d(e, 1, kernel_size=3, padding=1))
    return m


def randomize(model, gen):
    """Fresh values for every parameter (norm scales around 1, biases and the relative
    position tables large enough to matter), rounded to float16."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                v = torch.randn(p.shape, generator=gen) * 0.5
            elif p.dim() == 1 and ("norm" in name):
                v = (1.0 if name.endswith("weight") else 0.0) + torch.randn(p.shape, generator=gen) * 0.2
            elif p.dim() == 1:
                v = torch.randn(p.shape, generator=gen) * 0.1
            else:
                fan_in = p[0].numel()
                v = torch.randn(p.shape, generator=gen) / fan_in ** 0.5
            if name == "output.0.weight":
                v = v * 4  # logits well past +-5.5, so the 8-bit matte has zeros and 255s
            p.copy_(v.half().float())


def small_image(gen):
    h, w = IMAGE_HW
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    disc = ((xx - 0.2) ** 2 + (yy + 0.1) ** 2 < 0.35).float()
    base = torch.stack([0.3 + 0.5 * disc, 0.6 - 0.3 * disc + 0.2 * xx, 0.5 + 0.3 * yy], -1)
    noise = torch.rand((h, w, 3), generator=gen) * 0.25
    img = ((base + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return img.numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenar", required=True, help="root of a TokenAR checkout")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ben = load_ben2(args.tokenar)
    gen = torch.Generator().manual_seed(27)
    model = build(ben)
    randomize(model, gen)
    model.eval()

    img_np = small_image(gen)
    original = Image.fromarray(img_np, "RGB")
    # rgb_loader_refiner, with 512 for its fixed 1024
    resized = original.convert("RGB").resize((SIZE, SIZE), resample=Image.LANCZOS)
    x = ben.img_transform32(resized).unsqueeze(0)
    with torch.no_grad():
        res = model.forward(x)
    # BEN_Base.inference(refine_foreground=True)
    pred_pil = ben.transforms.ToPILImage()(res.squeeze())
    fg = ben.refine_foreground_process(original, pred_pil)
    fg.putalpha(pred_pil.resize(original.size))
    fg_np = np.array(fg)
    # background_segment.py: pixels with alpha > 0 set to black
    bg_np = np.array(original)
    bg_np[fg_np[:, :, 3] > 0] = 0

    os.makedirs(args.out, exist_ok=True)
    sd = {k: v.half() for k, v in model.state_dict().items() if v.is_floating_point()}
    sd.update({k: v for k, v in model.state_dict().items() if not v.is_floating_point()})
    torch.save({"model_state_dict": sd}, os.path.join(args.out, "ben2_parity.pth"))
    arch = dict(embed=EMBED, depths=DEPTHS, heads=HEADS, window=WINDOW, decoder=DEC, head_hidden=HEAD_HIDDEN, size=SIZE)
    save_file(
        {
            "image": torch.from_numpy(img_np.copy()),
            "resized": torch.from_numpy(np.array(resized)),
            "matte": res.float().contiguous(),
            "alpha": torch.from_numpy(fg_np[:, :, 3].copy()),
            "foreground": torch.from_numpy(fg_np[:, :, :3].copy()),
            "background": torch.from_numpy(bg_np),
        },
        os.path.join(args.out, "ben2_parity_io.safetensors"),
        metadata={"arch": json.dumps(arch)},
    )
    r = res.flatten()
    print(f"matte: min {r.min():.4f} max {r.max():.4f} mean {r.mean():.4f}; alpha>0: {(fg_np[:, :, 3] > 0).mean():.3f}")


if __name__ == "__main__":
    main()
