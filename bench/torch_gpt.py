#!/usr/bin/env python3
"""PyTorch eager reference of the LlamaGen GPT, for comparing speeds with the Rust crate.

Its own small implementation following the LlamaGen architecture: RMSNorm (eps 1e-5, in
f32), fused wqkv, SwiGLU FFN (hidden = round_up(int(2*4*dim/3), 256)), 2D RoPE on interleaved
pairs (caption positions get cos = sin = 0, as in LlamaGen), caption projection
(fc1 -> GELU(tanh) -> fc2, no biases), final norm and output head, no biases anywhere.

Measured (f32, CPU unless --device says otherwise):
  - prefill: one forward over the condition (caption tokens + image condition tokens) with
    batch 2 = [cond; uncond] (CFG), filling a KV cache;
  - decode: one token per step with the KV cache, batch 2, including the CFG combine and a
    top-k multinomial draw per step;
  - train: one AdamW step (lr 1e-4, betas (0.9, 0.95), weight decay 0.05 on >= 2-D params,
    grad clip 1.0, dropouts 0.1) on a (batch, seq) sequence whose first 120 positions are the
    caption.
Token rates count every row: prefill and decode rates include both CFG rows.
Prints one JSON object on stdout.
"""

import argparse
import copy
import resource
import json
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def ffn_hidden(dim, multiple_of=256):
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def rope_2d_table(grid, head_dim, cls_len, base=10000.0):
    """(cls_len + grid*grid, head_dim/2, 2) cos/sin table; caption rows are zero."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.arange(grid, dtype=torch.float32)
    f = torch.outer(t, freqs)  # (grid, half/2)
    f_grid = torch.cat(
        [f[:, None, :].expand(-1, grid, -1), f[None, :, :].expand(grid, -1, -1)], dim=-1
    )  # (grid, grid, half): first half by row, second half by column
    cache = torch.stack([torch.cos(f_grid), torch.sin(f_grid)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_len, half, 2), cache])


def apply_rope(x, table):
    """x: (B, S, H, hd); table: (S, hd/2, 2). Rotates interleaved pairs (x[2k], x[2k+1])."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [
            xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
            xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1],
        ],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim, n_head, dropout):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.resid_dropout = nn.Dropout(dropout)
        self.cache = None  # (k, v) each (B, H, S_max, hd)

    def forward(self, x, table, start, causal):
        b, s, d = x.shape
        q, k, v = self.wqkv(x).split(d, dim=-1)
        q = apply_rope(q.view(b, s, self.n_head, self.head_dim), table)
        k = apply_rope(k.view(b, s, self.n_head, self.head_dim), table)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v.view(b, s, self.n_head, self.head_dim)))
        if self.cache is not None:
            ck, cv = self.cache
            ck[:, :, start : start + s] = k
            cv[:, :, start : start + s] = v
            k, v = ck[:, :, : start + s], cv[:, :, : start + s]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        y = y.transpose(1, 2).reshape(b, s, d)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    def __init__(self, dim, dropout):
        super().__init__()
        h = ffn_hidden(dim)
        self.w1 = nn.Linear(dim, h, bias=False)
        self.w3 = nn.Linear(dim, h, bias=False)
        self.w2 = nn.Linear(h, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, dim, n_head, dropout):
        super().__init__()
        self.attention = Attention(dim, n_head, dropout)
        self.feed_forward = FeedForward(dim, dropout)
        self.attention_norm = RMSNorm(dim)
        self.ffn_norm = RMSNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, table, start, causal):
        h = x + self.drop(self.attention(self.attention_norm(x), table, start, causal))
        return h + self.drop(self.feed_forward(self.ffn_norm(h)))


class CapProj(nn.Module):
    def __init__(self, cap_dim, dim):
        super().__init__()
        self.fc1 = nn.Linear(cap_dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.cap_len = a.cap_len
        self.tok_embeddings = nn.Embedding(a.vocab, a.dim)
        self.cap_proj = CapProj(a.cap_dim, a.dim)
        self.tok_dropout = nn.Dropout(a.dropout)
        self.layers = nn.ModuleList(Block(a.dim, a.heads, a.dropout) for _ in range(a.layers))
        self.norm = RMSNorm(a.dim)
        self.output = nn.Linear(a.dim, a.vocab, bias=False)
        # Image positions (condition image tokens, then generated ones) on a square grid.
        img = max(a.prefix - a.cap_len, 0) + a.decode
        img = max(img, a.train_seq - a.cap_len)
        grid = math.ceil(math.sqrt(img))
        self.register_buffer("rope", rope_2d_table(grid, a.dim // a.heads, a.cap_len), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)

    def embed(self, caption, tokens):
        parts = []
        if caption is not None:
            parts.append(self.cap_proj(caption))
        if tokens is not None and tokens.size(1) > 0:
            parts.append(self.tok_embeddings(tokens))
        return self.tok_dropout(torch.cat(parts, dim=1))

    def forward(self, x, start, last_only=False):
        # Several positions at once only from the start (prefill, training): causal mask.
        # One position after a prefill attends to the whole cache: no mask.
        assert x.size(1) == 1 or start == 0
        causal = x.size(1) > 1
        table = self.rope[start : start + x.size(1)]
        for layer in self.layers:
            x = layer(x, table, start, causal)
        if last_only:
            # Prefill: only the last position's logits are needed (as the Rust model computes).
            x = x[:, -1:]
        return self.output(self.norm(x)).float()

    def setup_cache(self, batch, max_len):
        for layer in self.layers:
            att = layer.attention
            shape = (batch, att.n_head, max_len, att.head_dim)
            # In the dtype of the activations: bf16 / f16 for a converted model, f32 otherwise.
            dtype = self.tok_embeddings.weight.dtype
            att.cache = (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))

    def drop_cache(self):
        for layer in self.layers:
            layer.attention.cache = None


def sample_cfg(logits, cfg_scale, top_k, gen):
    n = logits.size(0) // 2
    cond, uncond = logits[:n], logits[n:]
    x = uncond + (cond - uncond) * cfg_scale
    v, _ = torch.topk(x, top_k, dim=-1)
    x = x.masked_fill(x < v[:, -1:], float("-inf"))
    tok = torch.multinomial(F.softmax(x, dim=-1), 1, generator=gen)
    return torch.cat([tok, tok])


def check_cache(model, a, caption, cond_img, gen, steps=8):
    """The KV-cache decode must give the logits of a full causal forward (output head
    re-initialised: the zero-initialised head would make every logit 0)."""
    nn.init.normal_(model.output.weight, std=0.02)
    model.eval()
    with torch.inference_mode():
        model.setup_cache(2, a.prefix + steps)
        logits = [model(model.embed(caption, cond_img), 0)[:, -1]]
        toks = torch.randint(0, a.vocab, (2, steps), generator=gen)
        for i in range(steps - 1):
            logits.append(model(model.embed(None, toks[:, i : i + 1]), a.prefix + i)[:, -1])
        model.drop_cache()
        full = model(model.embed(caption, torch.cat([cond_img, toks[:, :-1]], 1)), 0)
        ref = full[:, a.prefix - 1 :]
        err = (torch.stack(logits, 1) - ref).abs().max().item()
    nn.init.zeros_(model.output.weight)
    return err


def timed(fn, warmup, repeat):
    """Median wall time and median process CPU time (all threads) of `fn` over `repeat` runs.
    `fn` may return its own (wall, cpu) pair to time only part of its work."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        own = fn()
        wall, cpu = own if own is not None else (time.perf_counter() - w0, time.process_time() - c0)
        walls.append(wall)
        cpus.append(cpu)
    return statistics.median(walls), statistics.median(cpus)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--cap-len", type=int, default=120, help="caption tokens (first in the prefix)")
    p.add_argument("--cap-dim", type=int, default=2048, help="caption feature width (T5-XL: 2048)")
    p.add_argument("--prefix", type=int, default=120, help="prefilled positions: caption + image condition tokens")
    p.add_argument("--decode", type=int, default=256, help="tokens decoded per sample")
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--top-k", type=int, default=1000)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-seq", type=int, default=376, help="positions per training sequence, caption included")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument(
        "--dtype", choices=["f32", "bf16", "f16", "q8_0"], default="f32",
        help="inference weights: bf16 / f16 (the whole model and its KV cache converted), q8_0 "
        "(dynamic int8 quantization of every nn.Linear: torch.ao.quantization.quantize_dynamic, "
        "8-bit weights, activations quantized per product, f32 elsewhere); training stays f32",
    )
    p.add_argument("--check", action="store_true", help="first check KV-cache decode against a full forward")
    a = p.parse_args()
    if a.prefix < a.cap_len or a.train_seq <= a.cap_len or a.dim % a.heads or a.decode < 1:
        p.error("need prefix >= cap-len, train-seq > cap-len, decode >= 1, dim divisible by heads")

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = GPT(a)
    params = sum(t.numel() for t in model.parameters())
    top_k = min(a.top_k, a.vocab)
    gen = torch.Generator().manual_seed(a.seed)
    caption = torch.randn(2, a.cap_len, a.cap_dim)
    cond_img = torch.randint(0, a.vocab, (2, a.prefix - a.cap_len), generator=gen)
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # The vector instructions ATen's CPU kernels dispatch to (e.g. AVX2, AVX512).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dim": a.dim,
        "layers": a.layers,
        "heads": a.heads,
        "vocab": a.vocab,
        "params": params,
        "prefix": a.prefix,
        "decode": a.decode,
        "cfg_rows": 2,
        # Other processes on the machine distort the numbers: record the load around the run.
        "loadavg_1m_start": os.getloadavg()[0],
    }

    if a.check:
        err = check_cache(model, a, caption, cond_img, gen, steps=min(8, a.decode))
        result["cache_check_max_abs_err"] = err
        if not err < 1e-4:
            raise SystemExit(f"KV-cache decode differs from the full forward by {err}")

    model.eval()
    train_model = model
    if a.dtype in ("bf16", "f16"):
        half = torch.bfloat16 if a.dtype == "bf16" else torch.float16
        model = copy.deepcopy(model).to(half) if not a.skip_train else model.to(half)
        caption = caption.to(half)
    elif a.dtype == "q8_0":
        # The default "x86" engine ran this model 40x slower than fbgemm on an AVX-512 EPYC.
        torch.backends.quantized.engine = "fbgemm"
        model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=a.skip_train)
    result["dtype"] = a.dtype
    with torch.inference_mode():
        def prefill():
            model.setup_cache(2, a.prefix + a.decode)
            return model(model.embed(caption, cond_img), 0, last_only=True)[:, -1]

        def prefill_only():
            prefill()

        t_prefill, c_prefill = timed(prefill_only, a.warmup, a.repeat)

        def decode():
            logits = prefill()
            tok = sample_cfg(logits, a.cfg, top_k, gen)
            w0, c0 = time.perf_counter(), time.process_time()
            for i in range(a.decode - 1):
                logits = model(model.embed(None, tok), a.prefix + i)[:, -1]
                tok = sample_cfg(logits, a.cfg, top_k, gen)
            return time.perf_counter() - w0, time.process_time() - c0

        t_decode, c_decode = timed(decode, a.warmup, a.repeat)
        model.drop_cache()
    steps = max(a.decode - 1, 1)
    result.update(
        prefill_ms=1e3 * t_prefill,
        prefill_tokens_per_s=2 * a.prefix / t_prefill,
        decode_ms_per_step=1e3 * t_decode / steps,
        decode_tokens_per_s=2 * steps / t_decode,
        decode_steps_per_s=steps / t_decode,
        # CPU seconds per wall second: about `threads` on an otherwise idle machine.
        prefill_cpu_per_wall=c_prefill / t_prefill,
        decode_cpu_per_wall=c_decode / t_decode,
    )

    # Peak resident memory of the process so far (weights, KV cache, activations of inference).
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not a.skip_train:
        model = train_model
        caption = caption.float()
        model.train()
        decay = [t for t in model.parameters() if t.dim() >= 2]
        no_decay = [t for t in model.parameters() if t.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-4, betas=(0.9, 0.95), foreach=True,
        )
        b, n_img = a.train_batch, a.train_seq - a.cap_len
        cap = torch.randn(b, a.cap_len, a.cap_dim)
        img = torch.randint(0, a.vocab, (b, n_img + 1), generator=gen)

        def step():
            x = model.embed(cap, img[:, :-1])
            logits = model(x, 0)[:, a.cap_len - 1 :]
            loss = F.cross_entropy(logits.reshape(-1, a.vocab), img.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        t_train, c_train = timed(step, a.warmup, a.repeat)
        result.update(
            train_batch=b,
            train_seq=a.train_seq,
            train_step_ms=1e3 * t_train,
            train_tokens_per_s=b * a.train_seq / t_train,
            train_cpu_per_wall=c_train / t_train,
        )
    result["loadavg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
