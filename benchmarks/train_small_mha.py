"""Train the small MHA model of the mean-target benchmarks, once, and cache it (not committed).

No package we install ships a pretrained decoder with plain multi-head attention, and
SmolLM2's exact MHA expansion has heads that are copies by construction. This trains a 6-layer
LLaMA-style MHA model (hidden 384, 6 heads of 64, SwiGLU 1024, RoPE, tied embeddings; the
SmolLM2 tokenizer) from scratch on the built-in text (the train split of CPython's pydoc topics),
so its heads are learned, not copied. `--qk-norm` trains the same model with Qwen3's per-head
query and key norms (RMSNorm over each head's 64 dims, before RoPE; family qwen3), and
`--qk-norm full` with OLMo 2's norms over the whole query and key projections (its blocks kept
pre-norm, so that only the q/k norms differ; no transformers class has that layout, so it exports
with remote code), so that conversions of one model trained with and without qk-norm compare at
equal settings and tokens.
The result is a native dha checkpoint any verb reads:

    python benchmarks/train_small_mha.py                       # -> ~/.cache/dha/small-mha-pydoc
    python benchmarks/train_small_mha.py --qk-norm --out ~/.cache/dha/small-qknorm-pydoc
    python benchmarks/train_small_mha.py --qk-norm full --out ~/.cache/dha/small-qknorm-full
    dha eval ~/.cache/dha/small-mha-pydoc
    python benchmarks/dha_vs_baselines.py --setup ~/.cache/dha/small-mha-pydoc --kv-budget 0.5 ...

Prints the held-out perplexity before and after, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, Qwen3Config

from dha.checkpoint import Loaded, load, save
from dha.data import blocks, load_tokens
from dha.evaluate import perplexity
from dha.model import ModelConfig, Transformer
from dha.options import TrainConfig
from dha.train import train

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, for tests.helpers
from tests.helpers import scaled_init_  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.expanduser("~"), ".cache", "dha", "small-mha-pydoc")


def small_mha_config(
    vocab_size: int, layers: int = 6, hidden: int = 384, heads: int = 6, qk_norm: str | None = None
) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=1024,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        norm_eps=1e-5,
        tie_word_embeddings=True,
        family="qwen3" if qk_norm == "head" else "llama",
        qk_norm=qk_norm,
    )


def hf_config_of(cfg: ModelConfig) -> dict | None:
    """The Hugging Face LLaMA (or, with per-head qk-norm, Qwen3) config of the same model (dha export
    writes it); None for norms over the whole projections in pre-norm blocks, which no class has."""
    if cfg.qk_norm == "full":
        return None
    make = Qwen3Config if cfg.qk_norm == "head" else LlamaConfig
    return make(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
    ).to_dict()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--tokens", type=int, default=300_000, help="training tokens (the train split is ~100k: ~3 epochs)")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument(
        "--qk-norm",
        nargs="?",
        const="head",
        choices=["head", "full"],
        help="query and key norms: per head as Qwen3 (the default with the flag), or over the whole projections "
        "as OLMo 2 (full) (module doc)",
    )
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    tokenizer = load(None).tokenizer
    splits = load_tokens(None, tokenizer)
    torch.manual_seed(args.seed)
    model = scaled_init_(
        Transformer(small_mha_config(len(tokenizer), args.layers, qk_norm=args.qk_norm)), seed=args.seed
    )
    windows = blocks(splits.heldout, 512)
    before = perplexity(model.eval(), windows, batch_size=4, progress=False)["ppl"]
    cfg = TrainConfig(
        tokens=args.tokens,
        block_size=256,
        batch_tokens=args.batch_tokens,
        micro_batch=8,
        lr=args.lr,
        eval_every=25,
        eval_tokens=4096,
        seed=args.seed,
    )
    result = train(model.train(), splits.train, splits.heldout, cfg, progress=True)
    model = result.model.eval()
    after = perplexity(model, windows, batch_size=4, progress=False)["ppl"]
    provenance = {
        "trained_by": "benchmarks/train_small_mha.py",
        "data": splits.source,
        "tokens": args.tokens,
        "lr": args.lr,
        "batch_tokens": args.batch_tokens,
        "seed": args.seed,
        "qk_norm": args.qk_norm,
        "heldout_ppl": after,
    }
    save(
        args.out,
        Loaded(
            model,
            tokenizer,
            source=args.out,
            kind="native",
            hf_config=hf_config_of(model.config),
            provenance=provenance,
        ),
    )
    report = {
        "out": args.out,
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_tokens": int(windows.numel()),
        "ppl_init": before,
        "ppl": after,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(
        f"small MHA model: held-out ppl {before:.1f} at init -> {after:.2f} after {args.tokens:,} tokens; "
        f"saved {args.out}",
        file=sys.stderr,
    )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
