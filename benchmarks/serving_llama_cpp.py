"""Serving benchmark: models exported to GGUF and run by llama.cpp (llama-cpp-python 0.3.36).

For each model (the source and conversions) and weight type (f32, f16):
- perplexity in llama.cpp against ours (dha, fp32) on the same held-out windows of the built-in
  `pydoc` text (the same token ids fed to both; non-overlapping windows, as dha.evaluate does);
- the KV cache llama.cpp allocates at 2,048 context (its own log line, f16 cache) and the bytes
  one sequence's state grows by per token, against our analytic figure;
- llama.cpp decode tokens/s at batch 1 and with 8 parallel sequences (one llama_decode call per
  step for all 8), source and converted interleaved, best of --repeats.

    python benchmarks/serving_llama_cpp.py --svd /tmp/svd --out benchmarks/results/serving_llama_cpp.json

(/tmp/svd from `python -m dha convert --method svd --kv-budget 0.34 --out /tmp/svd`; --dha, optional,
a decoupled DHA conversion such as `python -m dha convert --method dha --kv-budget 0.5 --no-sensitivity
--merge pca --fusion-fraction 0 --tokens 0 --out /tmp/dha_half`, exported with --pad.) The
per-layer-count model (`deci`) is made here from the source and the svd model: even layers from
the svd model (1 key/value head), odd layers from the source (3), an exact mix of two real models.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

from dha import llamacpp
from dha.checkpoint import Loaded, load
from dha.data import blocks, load_tokens
from dha.evaluate import perplexity
from dha.gguf import export_gguf
from dha.transforms import build, state_dict_of, with_maps


def mixed_model(source, svd):
    """Even layers from `svd`, odd layers from `source`: per-layer key/value head counts 1, 3, 1, ..."""
    s_cfg, v_cfg = source.model.config, svd.model.config
    take = [svd if l % 2 == 0 else source for l in range(s_cfg.num_layers)]
    sd = state_dict_of(source.model)
    for l, m in enumerate(take):
        for k, v in state_dict_of(m.model).items():
            if k.startswith(f"layers.{l}."):
                sd[k] = v
    cfg = with_maps(
        s_cfg,
        [m.model.config.key_index[l] for l, m in enumerate(take)],
        [m.model.config.value_index[l] for l, m in enumerate(take)],
    )
    assert v_cfg.num_layers == s_cfg.num_layers
    return Loaded(build(cfg, sd).eval(), source.tokenizer, "mixed", "native", source.hf_config)


# ---- llama.cpp -----------------------------------------------------------------------------------


def kv_cache_report(path: str, n_ctx: int, threads: int) -> dict:
    """llama.cpp's own account of its KV cache at n_ctx, flash attention off and on: the allocation
    it logs, and the bytes one sequence's state grows by per token."""
    report = {}
    for flash in (False, True):
        llm, log = llamacpp.open_model(path, n_ctx, flash_attn=flash, threads=threads)
        report["flash_attn" if flash else "no_flash_attn"] = {
            **llamacpp.kv_cache_allocation(log),
            "state_bytes_per_token": llamacpp.kv_bytes_per_token(llm, list(range(100, 164))),
        }
        llm.close()
    return report


def llama_cpp_perplexity(path: str, windows: torch.Tensor, threads: int) -> dict:
    llm, _ = llamacpp.open_model(path, windows.shape[1], threads=threads, n_batch=windows.shape[1], logits_all=True)
    total, count = 0.0, 0
    for row in windows.tolist():
        logits = llamacpp.logits(llm, row)[:-1]  # (W-1, V): position t predicts token t+1
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(row[1:]), reduction="sum").item()
        count += len(row) - 1
    llm.close()
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count}


def decode_speed(path: str, batch: int, context: int, new_tokens: int, threads: int, flash: bool) -> float:
    """Tokens/s of llama_decode for `batch` sequences, one token each per step, after `context` tokens
    (a context of its own with n_seq_max = batch, on the model loaded once by llama_cpp.Llama)."""
    import llama_cpp

    llm, _ = llamacpp.open_model(path, 64, threads=threads)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = batch * (context + new_tokens + 8), batch * context, batch * context
    params.n_seq_max, params.n_threads, params.n_threads_batch = batch, threads, threads
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    b = llama_cpp.llama_batch_init(batch * context, 0, batch)
    rng = np.random.default_rng(0)

    def submit(tokens_per_seq: int, start: int) -> None:
        b.n_tokens = 0
        for s in range(batch):
            for p in range(tokens_per_seq):
                i = b.n_tokens
                b.token[i], b.pos[i], b.n_seq_id[i] = int(rng.integers(100, 40000)), start + p, 1
                b.seq_id[i][0] = s
                b.logits[i] = p == tokens_per_seq - 1
                b.n_tokens += 1
        if llama_cpp.llama_decode(ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    submit(context, 0)
    t0 = time.perf_counter()
    for step in range(new_tokens):
        submit(1, context + step)
    seconds = time.perf_counter() - t0
    llama_cpp.llama_batch_free(b)
    llama_cpp.llama_free(ctx)
    llm.close()
    return batch * new_tokens / seconds


# ---- the benchmark -------------------------------------------------------------------------------


def evaluate_model(name: str, loaded, windows, outtypes, workdir: str, args) -> list[dict]:
    ours = perplexity(loaded.model.float(), windows, progress=False)
    rows = []
    for outtype in outtypes:
        path = os.path.join(workdir, f"{name}-{outtype}.gguf")
        result = export_gguf(loaded, path, outtype, pad=True)  # --pad changes only layouts that need it
        theirs = llama_cpp_perplexity(path, windows, args.threads)
        kv = kv_cache_report(path, args.n_ctx, args.threads)
        rows.append(
            {
                "model": name,
                "outtype": outtype,
                "arch": result.arch,
                "kv_heads": result.kv_heads,
                "file_bytes": result.file_bytes,
                "ppl_dha_fp32": ours["ppl"],
                "ppl_llama_cpp": theirs["ppl"],
                "ppl_ratio": theirs["ppl"] / ours["ppl"],
                "tokens": theirs["tokens"],
                "kv_bytes_per_token_analytic_f16": result.kv_bytes_per_token,
                "padded_layers": result.padded_layers,
                "kv_bytes_per_token_unpadded_f16": result.source_kv_bytes_per_token,
                "kv_bytes_at_ctx_analytic": result.kv_bytes_per_token * args.n_ctx,
                "llama_cpp_kv": kv,
                "path": path,
            }
        )
        print(f"{name} {outtype}: ppl dha {ours['ppl']:.4f} llama.cpp {theirs['ppl']:.4f}; kv {kv}", file=sys.stderr)
    return rows


def speed_rows(paths: dict[str, str], args) -> dict:
    """Decode tokens/s per model and batch size, models interleaved, best of args.repeats."""
    configs = [
        (f"batch {b}" + (", flash attn" if flash else ""), b, flash)
        for flash in (False, True)
        for b in args.batch_sizes
    ]
    best = {name: {label: 0.0 for label, _, _ in configs} for name in paths}
    for _ in range(args.repeats):
        for label, b, flash in configs:
            for name, path in paths.items():
                speed = decode_speed(path, b, args.context, args.new_tokens, args.threads, flash)
                best[name][label] = max(best[name][label], speed)
    return best


def print_table(rows: list[dict], speed: dict) -> None:
    print(
        f"{'model':<8} {'type':<4} {'arch':<5} {'ppl dha':>8} {'llama.cpp':>9} {'ratio':>7} | KV @ctx: "
        f"{'ours':>11} {'llama.cpp':>11} {'(no FA)':>11}"
    )
    for r in rows:
        kv = r["llama_cpp_kv"]
        print(
            f"{r['model']:<8} {r['outtype']:<4} {r['arch']:<5} {r['ppl_dha_fp32']:>8.4f} {r['ppl_llama_cpp']:>9.4f} "
            f"{r['ppl_ratio']:>7.5f} |          {r['kv_bytes_at_ctx_analytic']:>11,} {kv['flash_attn']['bytes']:>11,} "
            f"{kv['no_flash_attn']['bytes']:>11,}"
        )
    for name, by_config in speed.items():
        print(f"decode tok/s {name}: " + "; ".join(f"{label}: {v:.1f}" for label, v in by_config.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=None, help="source model (default: the built-in SmolLM2-135M)")
    p.add_argument("--svd", required=True, help="the svd conversion at 1/3 (dha convert --method svd --kv-budget 0.34)")
    p.add_argument(
        "--dha", default=None, help="optional: a decoupled DHA conversion, exported with --pad (model `dha-pad`)"
    )
    p.add_argument("--windows", type=int, default=8, help="held-out windows of --window tokens")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--context", type=int, default=128, help="tokens per sequence before decode is timed")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", type=lambda s: s.split(","), default=["source", "svd", "mixed", "dha-pad"])
    p.add_argument("--outtypes", type=lambda s: s.split(","), default=["f32", "f16"])
    p.add_argument("--out", default=None, help="write the JSON document here too")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    source, svd = load(args.source, torch.float32), load(args.svd, torch.float32, tokenizer=False)
    models = {
        "source": source,
        "svd": Loaded(svd.model, source.tokenizer, args.svd, "native", source.hf_config),
        "mixed": mixed_model(source, svd),
    }
    windows = blocks(load_tokens("pydoc", source.tokenizer).heldout, args.window, max_blocks=args.windows)
    if args.dha:
        dha = load(args.dha, torch.float32, tokenizer=False)
        models["dha-pad"] = Loaded(dha.model, source.tokenizer, args.dha, "native", source.hf_config)
    models = {name: m for name, m in models.items() if name in args.models}
    with tempfile.TemporaryDirectory() as workdir:
        rows = [r for name, m in models.items() for r in evaluate_model(name, m, windows, args.outtypes, workdir, args)]
        speed = speed_rows({r["model"]: r["path"] for r in rows if r["outtype"] == "f16"}, args) if args.repeats else {}
    for r in rows:
        r.pop("path")  # a temp file, gone now
    print_table(rows, speed)
    doc = {
        "benchmark": "serving_llama_cpp",
        "command": " ".join(["python", *sys.argv]),
        "prerequisite": "python -m dha convert --method svd --kv-budget 0.34 --out /tmp/svd",
        "llama_cpp_python": __import__("llama_cpp").__version__,
        "data": "pydoc held-out",
        "threads": args.threads,
        "rows": rows,
        "decode_tokens_per_s_f16": speed,
        "decode": {"context": args.context, "new_tokens": args.new_tokens, "repeats": args.repeats},
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
