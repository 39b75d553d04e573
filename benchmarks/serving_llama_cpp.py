"""Serving benchmark: models exported to GGUF and run by llama.cpp (llama-cpp-python 0.3.36).

For each model (the source and conversions) and weight type (f32, f16):
- perplexity in llama.cpp against ours (dha, fp32) on the same held-out windows of the built-in
  `pydoc` text (the same token ids fed to both; non-overlapping windows, as dha.evaluate does);
- the KV cache llama.cpp allocates at 2,048 context (its own log line, f16 cache) and the bytes
  one sequence's state grows by per token, against our analytic figure;
- llama.cpp decode tokens/s at batch 1 and with 8 parallel sequences (one llama_decode call per
  step for all 8), source and converted interleaved, best of --repeats.

    python benchmarks/serving_llama_cpp.py --svd /tmp/svd --out benchmarks/results/serving_llama_cpp.json

(/tmp/svd from `python -m dha convert --method svd --kv-budget 0.34 --out /tmp/svd`.) The
per-layer-count model (`deci`) is made here from the source and the svd model: even layers from
the svd model (1 key/value head), odd layers from the source (3), an exact mix of two real models.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import math
import os
import re
import sys
import tempfile
import time

import numpy as np
import torch

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
    cfg = with_maps(s_cfg, [m.model.config.key_index[l] for l, m in enumerate(take)],
                    [m.model.config.value_index[l] for l, m in enumerate(take)])
    assert v_cfg.num_layers == s_cfg.num_layers
    return Loaded(build(cfg, sd).eval(), source.tokenizer, "mixed", "native", source.hf_config)


# ---- llama.cpp -----------------------------------------------------------------------------------

@contextlib.contextmanager
def captured_llama_log():
    """Collect llama.cpp's log lines (its KV cache size report) while a model loads."""
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(llama_cpp.llama_log_callback(lambda *a: None), ctypes.c_void_p(0))


def kv_cache_report(path: str, n_ctx: int, threads: int) -> dict:
    """llama.cpp's own account of its KV cache at n_ctx: the log line, and the state growth per token."""
    import llama_cpp

    with captured_llama_log() as lines:
        llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, verbose=True)
    text = "".join(lines)
    m = re.search(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells.*?K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB", text)
    ids = list(range(100, 164))
    llm.eval(ids[:8])
    before = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)
    llm.eval(ids[8:])
    after = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)
    report = {"state_bytes_per_token": (after - before) / (len(ids) - 8) - 12}  # 12: per-cell pos and seq id
    if m:
        report.update(log_mib=float(m.group(1)), cells=int(m.group(2)), cache_type=m.group(3),
                      log_bytes=round(float(m.group(1)) * 2 ** 20))
    del llm
    return report


def llama_cpp_perplexity(path: str, windows: torch.Tensor, threads: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=windows.shape[1], n_batch=windows.shape[1], logits_all=True,
                          n_threads=threads, verbose=False)
    total, count = 0.0, 0
    for row in windows.tolist():
        llm.reset()
        llm.eval(row)
        logits = torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32))[:-1]  # (W-1, V)
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(row[1:]), reduction="sum").item()
        count += len(row) - 1
    del llm
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count}


def decode_speed(path: str, batch: int, context: int, new_tokens: int, threads: int) -> float:
    """Tokens/s of llama_decode for `batch` sequences, one token each per step, after `context` tokens."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=batch * (context + new_tokens + 8), n_batch=batch * context,
                          n_seq_max=batch, n_threads=threads, n_threads_batch=threads, verbose=False)
    ctx = llm._ctx.ctx
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
    del llm
    return batch * new_tokens / seconds


# ---- the benchmark -------------------------------------------------------------------------------

def evaluate_model(name: str, loaded, windows, outtypes, workdir: str, args) -> list[dict]:
    ours = perplexity(loaded.model.float(), windows, progress=False)
    rows = []
    for outtype in outtypes:
        path = os.path.join(workdir, f"{name}-{outtype}.gguf")
        result = export_gguf(loaded, path, outtype)
        theirs = llama_cpp_perplexity(path, windows, args.threads)
        kv = kv_cache_report(path, args.n_ctx, args.threads)
        rows.append({"model": name, "outtype": outtype, "arch": result.arch, "kv_heads": result.kv_heads,
                     "file_bytes": result.file_bytes, "ppl_dha_fp32": ours["ppl"], "ppl_llama_cpp": theirs["ppl"],
                     "ppl_ratio": theirs["ppl"] / ours["ppl"], "tokens": theirs["tokens"],
                     "kv_bytes_per_token_analytic_f16": result.kv_bytes_per_token,
                     "kv_bytes_at_ctx_analytic": result.kv_bytes_per_token * args.n_ctx, "llama_cpp_kv": kv,
                     "path": path})
        print(f"{name} {outtype}: ppl dha {ours['ppl']:.4f} llama.cpp {theirs['ppl']:.4f}; kv {kv}", file=sys.stderr)
    return rows


def speed_rows(paths: dict[str, str], args) -> dict:
    """Decode tokens/s per model and batch size, models interleaved, best of args.repeats."""
    best = {name: {b: 0.0 for b in args.batch_sizes} for name in paths}
    for _ in range(args.repeats):
        for b in args.batch_sizes:
            for name, path in paths.items():
                best[name][b] = max(best[name][b], decode_speed(path, b, args.context, args.new_tokens, args.threads))
    return best


def print_table(rows: list[dict], speed: dict) -> None:
    print(f"{'model':<10} {'type':<5} {'arch':<6} {'ppl dha':>9} {'ppl llama.cpp':>13} {'ratio':>8} "
          f"{'KV B/tok ours':>13} {'llama.cpp @ctx':>15} {'ours @ctx':>11}")
    for r in rows:
        kv = r["llama_cpp_kv"]
        print(f"{r['model']:<10} {r['outtype']:<5} {r['arch']:<6} {r['ppl_dha_fp32']:>9.4f} {r['ppl_llama_cpp']:>13.4f} "
              f"{r['ppl_ratio']:>8.5f} {r['kv_bytes_per_token_analytic_f16']:>13,} {kv.get('log_bytes', 0):>15,} "
              f"{r['kv_bytes_at_ctx_analytic']:>11,}")
    for name, by_batch in speed.items():
        print(f"decode tok/s {name}: " + ", ".join(f"batch {b}: {v:.1f}" for b, v in by_batch.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=None, help="source model (default: the built-in SmolLM2-135M)")
    p.add_argument("--svd", required=True, help="the svd conversion at 1/3 (dha convert --method svd --kv-budget 0.34)")
    p.add_argument("--windows", type=int, default=8, help="held-out windows of --window tokens")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--context", type=int, default=128, help="tokens per sequence before decode is timed")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the JSON document here too")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    source, svd = load(args.source, torch.float32), load(args.svd, torch.float32, tokenizer=False)
    models = {"source": source, "svd-1/3": Loaded(svd.model, source.tokenizer, args.svd, "native", source.hf_config),
              "mixed": mixed_model(source, svd)}
    windows = blocks(load_tokens("pydoc", source.tokenizer).heldout, args.window, max_blocks=args.windows)
    with tempfile.TemporaryDirectory() as workdir:
        rows = [r for name, m in models.items() for r in evaluate_model(name, m, windows, ("f32", "f16"), workdir, args)]
        speed = speed_rows({r["model"]: r["path"] for r in rows if r["outtype"] == "f16"}, args)
    print_table(rows, speed)
    doc = {"benchmark": "serving_llama_cpp", "command": " ".join(["python", *sys.argv]),
           "llama_cpp_python": __import__("llama_cpp").__version__, "data": "pydoc held-out",
           "threads": args.threads, "rows": rows, "decode_tokens_per_s_f16": speed,
           "decode": {"context": args.context, "new_tokens": args.new_tokens, "repeats": args.repeats}}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
