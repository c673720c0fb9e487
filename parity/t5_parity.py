#!/usr/bin/env python3
"""T5 text encoder parity fixtures, computed as LlamaGen, EditAR and TokenAR compute them.

The reference code (LlamaGen `language/t5.py`, the same file in TokenAR) tokenizes captions
with `padding='max_length', max_length=120, truncation=True` (right-padded ids and an
attention mask) and takes the Hugging Face `T5EncoderModel`'s `last_hidden_state`. Then:

  - LlamaGen (`autoregressive/sample/sample_t2i.py`, and `dataset/t2i.py` in training) moves
    the valid rows to the end and zeroes the rest: left padding, padded rows zero and masked;
  - EditAR / TokenAR feed the 120 rows as they come out: valid rows first, then the encoder's
    outputs at the `<pad>` tokens (not zero), and their GPT attends to every row.

This script builds a tiny random flan-t5-style encoder (gated-gelu) and a tiny word-level
tokenizer, and writes (under --out, default tests/fixtures/parity):

  t5_parity/               the model folder as the project's T5 loader reads it
                           (config.json, model.safetensors, tokenizer.json)
  t5_parity_io.safetensors ids and attention_mask (B, 120) int64 as the reference tokenizes,
                           hidden (B, 120, D) = last_hidden_state (the EditAR / TokenAR rows),
                           llamagen (B, 120, D) and llamagen_mask (B, 120) (LlamaGen's rows);
                           metadata `prompts`: the captions as a JSON list

The LlamaGen checkout given with --llamagen is read to check that its T5 preprocessing and
padding are the ones reproduced here (the `T5Embedder` itself needs the hub and is not run).

Usage: python3 parity/t5_parity.py --llamagen PATH/TO/LlamaGen --out tests/fixtures/parity
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

MAX_LEN = 120  # LlamaGen's / TokenAR's t5_feature_max_len
WORDS = (
    "a an the dog cat mug cup man woman child toy car bike ball hat chair table sofa bed lamp "
    "on in under above behind beside near left right of with and holding wearing sitting "
    "standing red blue green yellow small big"
).split()
PROMPTS = [
    "A dog on the left of a cat",
    "mug",
    "the red ball under a small wooden table",  # `wooden` is not in the vocabulary: <unk>
    # Longer than 120 tokens: truncated to 119 words and </s>, as the reference tokenizer does.
    " ".join(["a big dog sitting beside the blue car"] * 18),
]


def check_reference(root):
    """The reference files this script reproduces, with the lines it relies on."""
    wants = {
        os.path.join("language", "t5.py"): ["padding='max_length'", "truncation=True", "['last_hidden_state']"],
        os.path.join("autoregressive", "sample", "sample_t2i.py"): [
            "torch.cat([caption_emb[valid_num:], caption_emb[:valid_num]])",
            "torch.flip(emb_masks, dims=[-1])",
        ],
    }
    for rel, needles in wants.items():
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            sys.exit(f"error: {path} not found (pass the root of a LlamaGen checkout)")
        text = open(path).read()
        for n in needles:
            if n not in text:
                sys.exit(f"error: {path} no longer contains {n!r}; check the padding reproduced here")


def build_tokenizer():
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.model_max_length = MAX_LEN
    return fast, len(vocab)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llamagen", required=True, help="root of a LlamaGen checkout")
    ap.add_argument("--out", required=True, help="fixture folder (tests/fixtures/parity)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    check_reference(a.llamagen)
    torch.manual_seed(a.seed)

    tokenizer, vocab_size = build_tokenizer()
    # flan-t5's shape of model (gated-gelu, relative buckets 32 / distance 128), tiny widths.
    config = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.1,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Random weights of a size that keeps activations O(1); norms away from 1.
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
            elif name.endswith("shared.weight") or "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)

    # As language/t5.py: right-padded to 120 with a mask, truncated, end-of-sequence added.
    batch = tokenizer(PROMPTS, max_length=MAX_LEN, padding="max_length", truncation=True,
                      return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask)["last_hidden_state"].float()

    # As sample_t2i.py (left padding): valid rows moved last, then multiplied by the flipped mask.
    llamagen_mask = torch.flip(mask, dims=[-1])
    rows = []
    for emb, m in zip(hidden, mask):
        n = int(m.sum())
        rows.append(torch.cat([emb[n:], emb[:n]]))
    llamagen = torch.stack(rows) * llamagen_mask[:, :, None]

    folder = os.path.join(a.out, "t5_parity")
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.backend_tokenizer.save(os.path.join(folder, "tokenizer.json"))
    save_file(
        {
            "ids": ids.to(torch.int64).contiguous(),
            "attention_mask": mask.to(torch.int64).contiguous(),
            "hidden": hidden.contiguous(),
            "llamagen": llamagen.float().contiguous(),
            "llamagen_mask": llamagen_mask.to(torch.int64).contiguous(),
        },
        os.path.join(a.out, "t5_parity_io.safetensors"),
        metadata={"prompts": json.dumps(PROMPTS), "max_len": str(MAX_LEN), "torch": torch.__version__},
    )
    lens = mask.sum(1).tolist()
    pad = hidden[0, lens[0]:].abs().max().item()
    print(f"wrote {folder} and t5_parity_io.safetensors: token counts {lens}, "
          f"|hidden| max {hidden.abs().max():.3f}, largest padded-row value {pad:.3f}")


if __name__ == "__main__":
    main()
