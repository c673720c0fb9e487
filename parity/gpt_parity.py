#!/usr/bin/env python3
"""GPT parity fixtures: the reference models (LlamaGen t2i, EditAR, TokenAR) built from a
checkout of their public code with small random weights, and what they compute.

    pip install torch numpy safetensors
    python parity/gpt_parity.py --llamagen PATH --tokenar PATH --out tests/fixtures/parity

PATH is a checkout of FoundationVision/LlamaGen (autoregressive/models/gpt.py, generate.py)
or of lyrig/TokenAR (autoregressive/models/gpt_edit.py, generate_edit.py; EditAR is its
single-condition configuration). Nothing of the reference code is copied here: it is imported
from the checkout. See parity/README.md for what each fixture holds.
"""

import argparse
import contextlib
import functools
import importlib
import json
import os
import sys

import torch
from safetensors.torch import save_file

# Shared by every family: caption rows (the reference CaptionEmbedder always holds 120 rows of
# `uncond_embedding`, and CFG adds that buffer to the caption, so the caption is 120 rows long),
# caption width, vocabulary, token grid.
CAPTION_LEN = 120
CAPTION_DIM = 48
VOCAB = 160
GRID = 4
HW = GRID * GRID
BATCH = 2

# Greedy decoding runs: (name, cfg_scale, cfg_interval); cfg_interval -1 = guided throughout.
RUNS = [("cfg1", 1.0, -1), ("cfg4", 4.0, -1), ("cfg4_interval3", 4.0, 3)]


def import_reference(root, names):
    """Import `names` from the checkout at `root` (both repositories have an `autoregressive`
    and a `utils` package, so whatever an earlier checkout left in sys.modules is dropped)."""
    root = os.path.abspath(root)
    for m in list(sys.modules):
        if m.split(".")[0] in ("autoregressive", "utils", "language", "tokenizer", "dataset"):
            del sys.modules[m]
    sys.path.insert(0, root)
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        sys.path.remove(root)


@contextlib.contextmanager
def fixed_rand(values):
    """Replace torch.rand for the duration: the reference training forward draws its CFG dropout
    per sample with torch.rand(B); these values fix the draw (0.5 keeps text and image)."""
    original = torch.rand

    def rand(*shape, **kw):
        n = shape[0] if shape and not isinstance(shape[0], (tuple, list)) else shape[0][0]
        assert n == len(values), f"torch.rand({shape}) but {len(values)} values fixed"
        return torch.tensor(values, dtype=torch.float32, device=kw.get("device"))

    torch.rand = rand
    try:
        yield
    finally:
        torch.rand = original


def bf16(t):
    """Round to bfloat16 and back: the weights are stored in bf16 (small fixtures) and both
    sides compute in f32 on exactly these values."""
    return t.to(torch.bfloat16).float()


def randomize(model, seed):
    """Every parameter and buffer of the state dict drawn afresh (the reference zero-initialises
    `output`, which would make every logit 0): norms 1 + N(0, 0.1), embeddings and buffers
    N(0, 0.5), linear weights N(0, 0.1); all rounded to bf16."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted(model.state_dict(keep_vars=True).items()):
            r = torch.randn(t.shape, generator=g)
            if name.endswith("norm.weight"):
                v = 1.0 + 0.1 * r
            elif "embedding" in name:
                v = 0.5 * r
            else:
                v = 0.1 * r
            t.copy_(bf16(v))


def save_checkpoint(model, path, train_args):
    """As the reference train scripts save: {"model", "optimizer", "steps", "args"} (args an
    argparse.Namespace), the state dict in bf16 (see `bf16`)."""
    sd = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    ckpt = {"model": sd, "optimizer": opt.state_dict(), "steps": 1, "args": argparse.Namespace(**train_args)}
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def save_fixture(tensors, meta, path):
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)


def greedy(generate_fn, **kw):
    """Greedy tokens of the reference `generate` (sample_logits=False: the top-1 token)."""
    out = {}
    for name, cfg, interval in RUNS:
        with torch.no_grad():
            seq = generate_fn(cfg_scale=cfg, cfg_interval=interval, temperature=1.0, top_k=0, top_p=1.0, sample_logits=False, **kw)
        out[f"tokens.{name}"] = seq.to(torch.int64)
    return out


def runs_meta():
    return [{"name": n, "cfg_scale": c, "cfg_interval": (None if i < 0 else i)} for n, c, i in RUNS]


def llamagen_t2i(root, out, seed):
    """LlamaGen text-to-image: [caption (120, left-padded), image tokens]."""
    gpt, gen = import_reference(root, ["autoregressive.models.gpt", "autoregressive.models.generate"])
    dim, n_layer, n_head, multiple_of = 128, 1, 2, 32
    args = gpt.ModelArgs(
        dim=dim, n_layer=n_layer, n_head=n_head, multiple_of=multiple_of, vocab_size=VOCAB,
        caption_dim=CAPTION_DIM, cls_token_num=CAPTION_LEN, block_size=HW, model_type="t2i",
        token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, attn_dropout_p=0.0,
    )
    torch.manual_seed(seed)
    model = gpt.Transformer(args)
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    # Left padding as LlamaGen's T5 extraction: the valid rows at the end, padded rows zero.
    valid = [5, 9]
    mask = torch.zeros(BATCH, CAPTION_LEN)
    for b, n in enumerate(valid):
        mask[b, CAPTION_LEN - n:] = 1.0
    caption = bf16(torch.randn(BATCH, CAPTION_LEN, CAPTION_DIM, generator=g)) * mask[:, :, None]
    target = torch.randint(0, VOCAB, (BATCH, HW), generator=g)

    # Training forward as train_t2i.py: the dataset's attention mask (causal, padded caption
    # columns off, the diagonal on), logits from the last caption position on.
    s = CAPTION_LEN + HW
    attn = torch.tril(torch.ones(s, s)).repeat(BATCH, 1, 1)
    attn[:, :, :CAPTION_LEN] = attn[:, :, :CAPTION_LEN] * mask[:, None, :]
    eye = torch.eye(s)
    attn = (attn * (1 - eye) + eye).to(torch.bool)[:, None]
    model.train()
    with torch.no_grad(), fixed_rand([0.5] * BATCH):
        logits, _ = model(idx=target[:, :-1], cond_idx=caption, targets=target, mask=attn[:, :, :-1, :-1])
    assert logits.shape == (BATCH, HW, VOCAB), logits.shape

    # Saved before decoding, which adds KV-cache buffers to the module tree.
    save_checkpoint(model, os.path.join(out, "gpt_t2i.pt"), {"gpt_model": "custom", "gpt_type": "t2i", "image_size": GRID * 16, "cls_token_num": CAPTION_LEN})
    model.eval()
    toks = greedy(lambda **kw: gen.generate(model, caption, HW, emb_masks=mask, **kw))
    tensors = {"caption": caption, "caption_mask": mask, "target": target.to(torch.int64), "logits.train": logits.float(), **toks}
    meta = {
        "family": "llamagen-t2i",
        "model_args": {"dim": dim, "n_layer": n_layer, "n_head": n_head, "multiple_of": multiple_of, "vocab_size": VOCAB,
                       "caption_dim": CAPTION_DIM, "cls_token_num": CAPTION_LEN, "block_size": HW},
        "runs": runs_meta(),
    }
    save_fixture(tensors, meta, os.path.join(out, "gpt_t2i.safetensors"))
    return logits


def edit_family(root, out, seed, tokenar):
    """EditAR (one condition image) or TokenAR (3 references + background, index embedding,
    casual instruct tokens, ITD), both from TokenAR's gpt_edit.py."""
    gpt, gen = import_reference(root, ["autoregressive.models.gpt_edit", "autoregressive.models.generate_edit"])
    dim, n_layer, n_head, multiple_of = 64, 2, 1, 16
    n_refs, n_instruct = 3, 4
    extra = dict(multi_cond=True, max_ref_num=n_refs + 1, max_edited_num=n_refs + 1, ref_index_embed=True,
                 instruct_token_mode="casual", instruct_token_num=n_instruct) if tokenar else dict(multi_cond=False)
    args = gpt.ModelArgs(
        dim=dim, n_layer=n_layer, n_head=n_head, multiple_of=multiple_of, vocab_size=VOCAB,
        caption_dim=CAPTION_DIM, cls_token_num=CAPTION_LEN, block_size=HW, model_type="edit",
        model_mode="joint_cls_emb", distill_mode=None,
        token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, attn_dropout_p=0.0, **extra,
    )
    torch.manual_seed(seed)
    model = gpt.Transformer(args)
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    # TokenAR / EditAR feed T5's right-padded output unmasked: every caption row is attended.
    caption = bf16(torch.randn(BATCH, CAPTION_LEN, CAPTION_DIM, generator=g))
    refs = torch.randint(0, VOCAB, (BATCH, n_refs if tokenar else 0, HW), generator=g)
    background = torch.randint(0, VOCAB, (BATCH, HW), generator=g)
    target = torch.randint(0, VOCAB, (BATCH, HW), generator=g)
    images = torch.cat([refs.reshape(BATCH, -1), background], 1)
    mode = torch.ones(BATCH, dtype=torch.long)
    if tokenar:
        # The index of every condition token as the train script builds it: reference i gets i,
        # the background the last loop index again (n_refs - 1).
        ids = [i for i in range(n_refs) for _ in range(HW)] + [n_refs - 1] * HW
        img_mask = torch.tensor(ids).repeat(BATCH, 1)
        # ITD: the references then the target (train script's concat_target).
        edited = torch.cat([refs.reshape(BATCH, -1), target], 1)
    else:
        img_mask = None
        edited = target
    n_gen = edited.shape[1]

    def train_forward(draws):
        model.train()
        with torch.no_grad(), fixed_rand(draws):
            logits, _, _ = model(input_txt_embs=caption, input_img_indices=images, edited_img_indices=edited,
                                 input_mode=mode, input_img_mask=img_mask)
        assert logits.shape == (BATCH, n_gen, VOCAB), logits.shape
        return logits.float()

    # No dropout draw (0.5), then the reference's CFG dropout: 0.07 drops the condition
    # images only (img_uncond_embedding), 0.97 the caption only (uncond_embedding).
    logits = train_forward([0.5] * BATCH)
    logits_drop = train_forward([0.07, 0.97])

    name = "gpt_tokenar" if tokenar else "gpt_editar"
    # Saved before decoding, which adds KV-cache buffers to the module tree.
    save_checkpoint(model, os.path.join(out, name + ".pt"), {"gpt_model": "custom", "gpt_type": "edit", "gpt_mode": "joint_cls_emb",
                                                             "image_size": GRID * 16, "max_ref_num": args.max_ref_num,
                                                             "concat_target": bool(tokenar), "instruct_token_mode": args.instruct_token_mode,
                                                             "instruct_token_num": args.instruct_token_num})
    model.eval()
    if tokenar:
        # generate_edit.prefill does not pass input_img_mask, so the reference's inference
        # leaves out the index embedding it was trained with. Its own KV-cache path is run
        # with the mask handed to the prefill (the training forward's input).
        plain = model.forward

        def forward_with_index(**kw):
            if kw.get("input_img_indices") is not None:
                rows = kw["input_img_indices"].shape[0]
                kw["input_img_mask"] = img_mask.repeat(rows // BATCH, 1)
            return plain(**kw)

        model.forward = forward_with_index
        kw = dict(instruct_token_mode="casual", instruct_token_num=n_instruct)
    else:
        kw = {}
    toks = greedy(lambda **k: gen.generate(model, caption, images, mode, n_gen, **k, **kw))
    if tokenar:
        model.forward = plain
    tensors = {"caption": caption, "refs": refs.to(torch.int64), "background": background.to(torch.int64),
               "target": target.to(torch.int64), "logits.train": logits, "logits.train_dropped": logits_drop, **toks}
    meta = {
        "family": "tokenar" if tokenar else "editar",
        "model_args": {"dim": dim, "n_layer": n_layer, "n_head": n_head, "multiple_of": multiple_of, "vocab_size": VOCAB,
                       "caption_dim": CAPTION_DIM, "cls_token_num": CAPTION_LEN, "block_size": HW, **extra},
        "dropped": {"drop_image": [True, False], "drop_text": [False, True]},
        "runs": runs_meta(),
    }
    save_fixture(tensors, meta, os.path.join(out, name + ".safetensors"))


def editplus_cells(root, grid=32, slots=4, caption=120, instruct=120, head_dim=64, base=10000):
    """The (row, col) cell of every position of the reference's precompute_freqs_cis_2d_editplus
    table (TokenAR XL: 4 condition images of 32x32 tokens, ITD so max_edited_num = max_ref_num),
    recovered by matching each row against the cos/sin of every cell of the full square grid;
    None for the zero rows (text, instruct). For comparing with this project's Layout."""
    (gpt,) = import_reference(root, ["autoregressive.models.gpt_edit"])
    table = gpt.precompute_freqs_cis_2d_editplus(grid, head_dim, base, caption, slots, slots, instruct)
    side = grid * (int(slots ** 0.5) * 2)
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    f = torch.outer(torch.arange(side).float(), freqs)
    g = torch.cat([f[:, None, :].expand(-1, side, -1), f[None, :, :].expand(side, -1, -1)], -1)
    cells = torch.stack([g.cos(), g.sin()], -1).reshape(side * side, -1)
    out = []
    for r in table.reshape(table.shape[0], -1):
        if r.abs().max() == 0:
            out.append(None)
            continue
        i = (cells - r).abs().max(1).values.argmin().item()
        out.append((i // side, i % side))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llamagen", required=True, help="checkout of FoundationVision/LlamaGen")
    p.add_argument("--tokenar", required=True, help="checkout of lyrig/TokenAR")
    p.add_argument("--out", default="tests/fixtures/parity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--editplus-cells", type=int, metavar="N", help="only print the reference's RoPE cells of the first N generated positions of TokenAR XL with ITD")
    a = p.parse_args()
    for what, path, f in [("--llamagen", a.llamagen, "autoregressive/models/gpt.py"), ("--tokenar", a.tokenar, "autoregressive/models/gpt_edit.py")]:
        if not os.path.isfile(os.path.join(path, f)):
            sys.exit(f"{what} {path}: no {f} there (expected a checkout of the reference code)")
    if a.editplus_cells:
        cells = editplus_cells(a.tokenar)
        prefix = 4 * 32 * 32 + 120 + 120
        for k in range(a.editplus_cells):
            print(f"generated {k}: position {prefix + k}: cell {cells[prefix + k]}")
        return
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(1)
    llamagen_t2i(a.llamagen, a.out, a.seed)
    edit_family(a.tokenar, a.out, a.seed + 10, tokenar=False)
    edit_family(a.tokenar, a.out, a.seed + 20, tokenar=True)
    for f in sorted(os.listdir(a.out)):
        if f.startswith("gpt_"):
            print(f"{os.path.join(a.out, f)}: {os.path.getsize(os.path.join(a.out, f)) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
