"""Long-context quality and KV cache in llama.cpp: the measures of dha.longctx, run where the model is served.

For the source (the built-in SmolLM2-135M) and each converted checkpoint named on the command line:
- the model is exported to GGUF (dha.gguf.export_gguf, --outtype f32 weights by default, so that
  only the KV cache differs from dha's fp32 model; --pad on, which changes only layouts llama.cpp
  cannot hold as they are);
- llama.cpp (llama-cpp-python, flash attention on) runs it with each KV cache type of --cache-types
  (f16, q8_0): the KV cache it allocates (its own log line), the perplexity by position over
  --windows windows of --window tokens of the held-out text, and the passkey grid answered greedily
  through its own KV cache (dha.llamacpp.position_nll, greedy_answers);
- dha (fp32, PyTorch) measures the same on the same token ids (dha.longctx.position_report, answers).
Reported per model and cache type: KV bytes (and per token), the perplexity ratio llama.cpp / dha
per position bucket, passkeys found by each, and for converted models the KV bytes and llama.cpp
perplexity against the source's with the same cache type.

    python benchmarks/long_context_llama_cpp.py /tmp/dha_half --out benchmarks/results/long_context_llama_cpp.json

(/tmp/dha_half from
`python -m dha convert --method dha --kv-budget 0.5 --tokens 0 --layout serving --out /tmp/dha_half`.)
Prints a table; the JSON document (with the command line) is written atomically to --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict

import torch

from dha import llamacpp, longctx
from dha.atomic import write_json
from dha.checkpoint import Loaded, load
from dha.data import load_tokens
from dha.gguf import export_gguf


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="*", help="converted dha checkpoints (directories); the source always runs")
    p.add_argument("--source", default="smollm2-135m", help="the source model (default: the built-in SmolLM2-135M)")
    p.add_argument("--data", default=None, help="text whose held-out split is read (default: the built-in pydoc)")
    p.add_argument("--window", type=int, default=8192, help="tokens per perplexity-by-position window")
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--lengths", type=ints, default=[2048, 4096, 8192], help="passkey prompt lengths in tokens")
    p.add_argument("--depths", type=int, default=5)
    p.add_argument("--per-depth", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--haystack", choices=longctx.HAYSTACKS, default="synthetic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-types", type=lambda s: s.split(","), default=["f16", "q8_0"])
    p.add_argument("--outtype", choices=["f32", "f16"], default="f32", help="GGUF weight type")
    p.add_argument("--n-batch", type=int, default=512, help="llama.cpp's batch (tokens per llama_decode)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/long_context_llama_cpp.json")
    args = p.parse_args(argv)
    bad = [c for c in args.cache_types if c not in llamacpp.CACHE_TYPES]
    if bad:
        p.error(f"--cache-types: unknown {bad}; choose from {', '.join(llamacpp.CACHE_TYPES)}")
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- llama.cpp -----------------------------------------------------------------------------------


def llama_cpp_position(path: str, windows: torch.Tensor, cache_type: str, args) -> tuple[dict, dict]:
    """(perplexity by position in llama.cpp, the KV cache allocation of that context)."""
    llm, load_log = llamacpp.open_model(
        path,
        windows.shape[1],
        threads=args.threads,
        cache_type=cache_type,
        flash_attn=True,
        logits_all=True,
        n_batch=args.n_batch,
    )
    try:
        nll = llamacpp.position_nll(llm, windows)
    finally:
        llm.close()
    report = {
        "window": windows.shape[1],
        "windows": windows.shape[0],
        "buckets": longctx.by_position(nll, windows.shape[0]),
        "nll_by_index": [round(v, 5) for v in nll.tolist()],
    }
    return report, llamacpp.kv_cache_allocation(load_log)


def llama_cpp_retrieval(path: str, tokenizer, prompts, options, cache_type: str, args) -> tuple[list[str], dict]:
    """(the greedy replies to the passkey prompts in llama.cpp, the KV cache allocation of that context)."""
    n_ctx = max(options.lengths) + options.new_tokens
    llm, load_log = llamacpp.open_model(
        path, n_ctx, threads=args.threads, cache_type=cache_type, flash_attn=True, n_batch=args.n_batch
    )
    try:
        new = llamacpp.greedy_answers(llm, prompts, options.new_tokens)
    finally:
        llm.close()
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new], llamacpp.kv_cache_allocation(load_log)


def with_per_token(allocation: dict) -> dict:
    return {**allocation, "bytes_per_token": allocation["bytes"] / allocation["cells"]}


def larger_allocation(run: dict) -> dict:
    """The allocation of the context with more cells: its MiB (2 decimals) resolve bytes per token best."""
    return max(run["kv_cache"], run["kv_cache_perplexity_context"], key=lambda a: a["cells"])


def llama_cpp_measures(
    path: str, tokenizer, windows, prompts, options, dha_result: dict, cache_type: str, args
) -> dict:
    t0 = time.perf_counter()
    position, kv_position = llama_cpp_position(path, windows, cache_type, args)
    log(f"  llama.cpp {cache_type}: perplexity by position {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    replies, kv_retrieval = llama_cpp_retrieval(path, tokenizer, prompts, options, cache_type, args)
    log(f"  llama.cpp {cache_type}: passkey retrieval {time.perf_counter() - t0:.0f} s")
    retrieval = longctx.score(prompts, replies, options)
    ours = torch.tensor(dha_result["position"]["nll_by_index"], dtype=torch.float64)
    theirs = torch.tensor(position["nll_by_index"], dtype=torch.float64)
    return {
        "cache_type": cache_type,
        "kv_cache": with_per_token(kv_retrieval),
        "kv_cache_perplexity_context": with_per_token(kv_position),
        "position": position,
        "ppl_ratio_to_dha": longctx.position_ratios(position, dha_result["position"]),
        "max_abs_nll_diff_to_dha": (theirs - ours).abs().max().item(),
        "retrieval": retrieval,
        "found": sum(retrieval["found_per_length"].values()),
        "same_replies_as_dha": sum(a == b for a, b in zip(replies, dha_result["replies"])),
    }


# ---- dha and the models --------------------------------------------------------------------------


def dha_measures(loaded, stream, prompts, options, args) -> dict:
    """dha's fp32 measures on the same ids: perplexity by position and the passkey replies."""
    t0 = time.perf_counter()
    position = longctx.position_report(loaded.model, stream, args.window, args.windows)
    log(f"  dha fp32: perplexity by position {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    replies = longctx.answers(loaded.model, loaded.tokenizer, prompts, options)
    log(f"  dha fp32: passkey retrieval {time.perf_counter() - t0:.0f} s")
    retrieval = longctx.score(prompts, replies, options)
    return {
        "position": position,
        "retrieval": retrieval,
        "replies": replies,
        "found": sum(retrieval["found_per_length"].values()),
    }


def evaluate_model(name: str, loaded, stream, prompts, options, workdir: str, args) -> dict:
    log(f"{name}: export to GGUF ({args.outtype} weights)")
    path = os.path.join(workdir, f"{name}-{args.outtype}.gguf")
    exported = export_gguf(loaded, path, args.outtype, pad=True)
    ours = dha_measures(loaded, stream, prompts, options, args)
    windows = longctx.long_windows(stream, args.window, args.windows)
    runs = {
        c: llama_cpp_measures(path, loaded.tokenizer, windows, prompts, options, ours, c, args)
        for c in args.cache_types
    }
    os.unlink(path)
    gguf = {k: v for k, v in exported.to_dict().items() if k != "out"}
    return {"model": name, "source": str(loaded.source), "gguf": gguf, "dha_fp32": ours, "llama_cpp": runs}


def add_source_ratios(results: list[dict]) -> None:
    """Each model's KV bytes and llama.cpp perplexity by bucket against the source's, cache type by cache type."""
    source = results[0]["llama_cpp"]
    for r in results:
        for cache_type, run in r["llama_cpp"].items():
            base = source[cache_type]
            run["kv_ratio_to_source"] = (
                larger_allocation(run)["bytes_per_token"] / larger_allocation(base)["bytes_per_token"]
            )
            run["ppl_ratio_to_source"] = longctx.position_ratios(run["position"], base["position"])


def load_models(args) -> dict:
    source = load(args.source, torch.float32)
    models = {"source": source}
    for path in args.checkpoints:
        converted = load(path, torch.float32, tokenizer=False)
        name = os.path.basename(os.path.normpath(path))
        models[name if name not in models else path] = Loaded(
            converted.model, source.tokenizer, path, "native", source.hf_config
        )
    return models


def print_table(results: list[dict]) -> None:
    spans = [f"{b['start']}-{b['end']}" for b in results[0]["dha_fp32"]["position"]["buckets"]]
    print(
        f"{'model':<14} {'KV cache':<9} {'B/token':>8} {'MiB':>7} {'vs src':>6} {'found':>11}  "
        f"perplexity by position ({' '.join(f'{s:>10}' for s in spans)})"
    )
    for r in results:
        ours = r["dha_fp32"]
        total = ours["retrieval"]["prompts_per_length"] * len(ours["retrieval"]["lengths"])
        ppl = " ".join(f"{b['ppl']:>10.4f}" for b in ours["position"]["buckets"])
        print(
            f"{r['model']:<14} {'dha fp32':<9} {'':>8} {'':>7} {'':>6} {ours['found']:>5} of {total:<3}  "
            f"dha ppl:         {ppl}"
        )
        for cache_type, run in r["llama_cpp"].items():
            kv = larger_allocation(run)
            ratios = " ".join(f"{x:>10.5f}" for x in run["ppl_ratio_to_dha"])
            print(
                f"{r['model']:<14} {cache_type:<9} {kv['bytes_per_token']:>8,.0f} {kv['bytes'] / 2**20:>7.2f} "
                f"{run['kv_ratio_to_source']:>6.3f} {run['found']:>5} of {total:<3}  llama.cpp / dha: {ratios}"
            )


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    options = longctx.RetrievalOptions(
        lengths=args.lengths,
        depths=args.depths,
        per_depth=args.per_depth,
        haystack=args.haystack,
        new_tokens=args.new_tokens,
        seed=args.seed,
    )
    options.validate()
    models = load_models(args)
    tokenizer = models["source"].tokenizer
    stream = load_tokens(args.data, tokenizer).heldout
    prompts = longctx.passkey_prompts(tokenizer, options, stream)
    with tempfile.TemporaryDirectory() as workdir:
        results = [evaluate_model(name, m, stream, prompts, options, workdir, args) for name, m in models.items()]
    add_source_ratios(results)
    for r in results:
        r["dha_fp32"].pop("replies")  # kept in retrieval.examples
    print_table(results)
    doc = {
        "benchmark": "long_context_llama_cpp",
        "command": " ".join(["python", *sys.argv]),
        "llama_cpp_python": __import__("llama_cpp").__version__,
        "data": f"{args.data or 'pydoc'} held-out",
        "heldout_tokens": stream.numel(),
        "gguf_weights": args.outtype,
        "flash_attn": True,
        "threads": args.threads,
        "n_batch": args.n_batch,
        "window": args.window,
        "windows": args.windows,
        "retrieval": asdict(options),
        "models": results,
    }
    write_json(args.out, doc)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
