#!/usr/bin/env python3
"""PyTorch speed of the reference BEN2 (`BEN_Base` of scripts/BEN2.py in a TokenAR checkout),
for `tokenar bench --ben2 --torch`: the published shape with its default random
initialisation, one (1, 3, size, size) input, eval mode, no gradients, float32 on the CPU.
Prints one JSON line: {"forward_s": median seconds, "torch": version, ...}.

Needs: torch numpy pillow opencv-python-headless einops timm torchvision (BEN2.py imports them).
Usage: python3 bench/torch_ben2.py --tokenar PATH/TO/TokenAR [--size 1024] [--repeat 1]
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenar", required=True, help="root of a TokenAR checkout")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    path = os.path.join(args.tokenar, "scripts", "BEN2.py")
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found (pass the root of a TokenAR checkout)")
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location("BEN2", path)
    ben = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ben)
    torch.manual_seed(args.seed)
    model = ben.BEN_Base().eval()
    x = torch.randn(1, 3, args.size, args.size)
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.repeat):
            t = time.perf_counter()
            model.forward(x)
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"forward_s": statistics.median(times), "torch": torch.__version__, "threads": torch.get_num_threads(), "parameters": params}))


if __name__ == "__main__":
    main()
