#!/usr/bin/env python3
"""VQ tokenizer parity fixtures from the public LlamaGen code.

Builds LlamaGen's VQ-VAE (tokenizer/tokenizer_image/vq_model.py of a LlamaGen checkout) with
small dimensions that match no preset, gives it random weights, and writes:

  vq_parity.pt             the checkpoint as LlamaGen's scripts read it: torch.save({"model":
                           state_dict}) (the loaders call vq_model.load_state_dict(ckpt["model"])),
                           the `quantize.codebook_used` buffer included; tensors stored as float16
                           to keep the fixture small (the model runs in float32 on the values
                           the file holds, here and in the Rust test)
  vq_parity_io.safetensors images (B, 3, H, W) in [-1, 1], the pre-quantisation latent
                           (B, codebook_dim, h, w), the codes (B, h, w) int64 and the pixels
                           decoded from those codes (B, 3, H, W); metadata: the architecture
                           and the smallest gap between the nearest and second-nearest code

Usage: python3 parity/vq_parity.py --llamagen PATH/TO/LlamaGen --out tests/fixtures/parity
"""

import argparse
import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

# The architecture: no LlamaGen preset has it (VQ-16 is ch 128, ch_mult (1,1,2,2,4), 2 res
# blocks, z 256, 16384 x 8 codes). GroupNorm is LlamaGen's fixed 32 groups, so every channel
# count is a multiple of 32.
CH = 32
CH_MULT = [1, 2, 1]  # not monotonic: the multipliers are read level by level
NUM_RES_BLOCKS = 1  # encoder: 1 per level; decoder: num_res_blocks + 1 = 2 per level
Z_CHANNELS = 8
CODEBOOK_SIZE = 64
CODEBOOK_DIM = 8
IMAGE = 16
BATCH = 2


def load_vq_module(root):
    path = os.path.join(root, "tokenizer", "tokenizer_image", "vq_model.py")
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found (pass the root of a LlamaGen checkout)")
    spec = importlib.util.spec_from_file_location("llamagen_vq_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(vq, seed):
    torch.manual_seed(seed)
    args = vq.ModelArgs(
        codebook_size=CODEBOOK_SIZE,
        codebook_embed_dim=CODEBOOK_DIM,
        encoder_ch_mult=CH_MULT,
        decoder_ch_mult=CH_MULT,
        z_channels=Z_CHANNELS,
    )
    model = vq.VQModel(args)
    # VQModel passes neither `ch` nor `num_res_blocks` on; build its encoder and decoder with them.
    model.encoder = vq.Encoder(ch=CH, ch_mult=CH_MULT, num_res_blocks=NUM_RES_BLOCKS, z_channels=Z_CHANNELS)
    model.decoder = vq.Decoder(ch=CH, ch_mult=CH_MULT, num_res_blocks=NUM_RES_BLOCKS, z_channels=Z_CHANNELS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm affines away from (1, 0) so that loading them is tested; codes as LlamaGen
            # initialises them (uniform, L2-normalised) but spread enough to be distinct.
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif name == "quantize.embedding.weight":
                p.copy_(F.normalize(torch.randn_like(p), dim=-1))
        # Half precision storage: round the weights now so that the float32 model computes on
        # exactly the values the file holds.
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


@torch.no_grad()
def nearest_gap(model, latent):
    """Smallest gap between the nearest and second-nearest code distance over all positions."""
    z = F.normalize(latent.permute(0, 2, 3, 1).reshape(-1, CODEBOOK_DIM), dim=-1)
    e = F.normalize(model.quantize.embedding.weight, dim=-1)
    d = (z ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * z @ e.t()
    two = d.topk(2, dim=1, largest=False).values
    return float((two[:, 1] - two[:, 0]).min())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llamagen", required=True, help="root of a LlamaGen checkout")
    ap.add_argument("--out", required=True, help="fixture folder (tests/fixtures/parity)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    vq = load_vq_module(a.llamagen)
    model = build(vq, a.seed)

    g = torch.Generator().manual_seed(a.seed + 1)
    # A smooth image (a colour ramp) and a noisy one, both in [-1, 1].
    ramp = torch.linspace(-1, 1, IMAGE)
    smooth = torch.stack([ramp[None, :].expand(IMAGE, IMAGE), ramp[:, None].expand(IMAGE, IMAGE), -ramp[None, :].expand(IMAGE, IMAGE) * 0.5])
    noisy = torch.rand(3, IMAGE, IMAGE, generator=g) * 2 - 1
    images = torch.stack([smooth, noisy]).contiguous()

    with torch.no_grad():
        latent = model.quant_conv(model.encoder(images))
        _, _, (_, _, idx) = model.encode(images)
        h = IMAGE // 2 ** (len(CH_MULT) - 1)
        codes = idx.reshape(BATCH, h, h)
        pixels = model.decode_code(idx, shape=(BATCH, CODEBOOK_DIM, h, h))
    gap = nearest_gap(model, latent)
    if gap < 1e-4:
        sys.exit(f"error: a latent is within {gap:.2e} of two codes; pick another --seed")

    os.makedirs(a.out, exist_ok=True)
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save({"model": state}, os.path.join(a.out, "vq_parity.pt"))
    meta = {
        "ch": str(CH),
        "ch_mult": json.dumps(CH_MULT),
        "enc_res_blocks": str(NUM_RES_BLOCKS),
        "dec_res_blocks": str(NUM_RES_BLOCKS + 1),
        "z_channels": str(Z_CHANNELS),
        "codebook_size": str(CODEBOOK_SIZE),
        "codebook_dim": str(CODEBOOK_DIM),
        "min_code_gap": repr(gap),
        "torch": torch.__version__,
    }
    save_file(
        {"images": images, "latent": latent.contiguous(), "codes": codes.to(torch.int64).contiguous(), "pixels": pixels.contiguous()},
        os.path.join(a.out, "vq_parity_io.safetensors"),
        metadata=meta,
    )
    print(f"wrote vq_parity.pt and vq_parity_io.safetensors to {a.out}: codes {codes.flatten().tolist()}, "
          f"pixels in [{pixels.min():.3f}, {pixels.max():.3f}], smallest code gap {gap:.3e}")


if __name__ == "__main__":
    main()
