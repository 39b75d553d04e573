"""What a model costs and how well it predicts: held-out perplexity, KV-cache bytes, decode speed.

- Perplexity: over non-overlapping windows of the held-out token stream (see `perplexity`).
- KV-cache bytes per token: analytic, from the config (sum over layers of (Hk + Hv) * hd *
  bytes per value), and measured from the tensors of a real KVCache after a prefill; they must
  agree (`kv_bytes`).
- Decode speed: prefill and decode timed apart, on random token ids, after a warm-up; peak memory
  (`decode_speed`, timed by dha.bench, the code of the `bench` verb). With several models, timing
  runs are interleaved (model A, model B, A, B, ...) so that a slow spell of the machine hits all
  of them alike, and the best of the repeats is kept.

`evaluate_models` runs all of it for one or more models on the same data and gives ratios to the
first model, and lm-evaluation-harness tasks when asked (`dha.lm_eval_adapter`); `print_report`
prints the table. The `eval` verb prints the table, then one JSON line.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass, field

import torch

from .bench import Runner, measure
from .data import TokenSplits
from .data import blocks as make_blocks
from .errors import UserError
from .layerwise import nll_sum
from .longctx import RetrievalOptions, position_ratios, position_report, retrieval
from .model import next_token_nll
from .summary import kv_summary


@dataclass
class EvalOptions:
    block_size: int = 512  # perplexity window length (tokens)
    max_eval_tokens: int | None = 16384  # cap on held-out tokens scored (None: all); keeps the default fast
    eval_batch_size: int = 8  # windows per forward pass
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])  # decode-speed batch sizes
    context: int = 512  # prompt tokens prefilled before decoding
    new_tokens: int = 32  # tokens decoded (timed) after the prefill
    repeats: int = 2  # timing runs per model and batch size; the fastest is kept
    seed: int = 0  # random token ids for the speed runs
    progress: bool = True  # tqdm bars on stderr
    tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness task names (optional)
    include_path: str | None = None  # folder of local lm-eval task YAML files
    limit: int | None = None  # lm-eval: at most this many examples per task
    task_metadata: str | None = None  # lm-eval task metadata (JSON text), e.g. RULER's max_seq_lengths
    long_context: int = 0  # window of the perplexity by position (dha.longctx; 0: none)
    long_windows: int = 4  # windows of `long_context` tokens scored
    retrieval: RetrievalOptions | None = None  # the passkey grid (None: none)


# ---- perplexity -------------------------------------------------------------------------------


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, progress: bool = True, device=None) -> dict:
    """Perplexity over non-overlapping windows: `blocks` (n, W), each row one window.

    Inside a window, token t (t = 1..W-1) is predicted from tokens 0..t-1 of the same window only;
    the first token of each window is not predicted (it has no prefix). So n * (W - 1) tokens are
    scored; no context crosses window borders, which gives a somewhat higher perplexity than a
    sliding window would. nll is the mean negative log-likelihood per scored token (nats), computed
    in float32 whatever the model's dtype; ppl = exp(nll).

    With `device` other than the model's own (a model kept in CPU memory, `--offload`), the windows
    go through the model one decoder layer at a time on `device`, in float32 (`dha.layerwise.nll_sum`).
    """
    from tqdm.auto import tqdm

    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise UserError(f"perplexity needs windows of at least 2 tokens, got shape {tuple(blocks.shape)}")
    here = next(model.parameters()).device
    total_tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    if device is not None and torch.device(device) != here:
        mean = nll_sum(model, blocks, batch_size, device) / total_tokens
        return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens}
    total_nll = 0.0
    starts = range(0, blocks.shape[0], batch_size)
    for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress, file=sys.stderr):
        total_nll += next_token_nll(model, blocks[start : start + batch_size].to(here)).double().sum().item()
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens}


# ---- KV-cache bytes ---------------------------------------------------------------------------


@torch.no_grad()
def kv_bytes(model, prefill_tokens: int = 8, max_len: int = 16) -> dict:
    """KV-cache bytes per token: from the config, and from a real cache's tensors after a prefill.

    The measured number is the bytes the cache allocated for all layers divided by the tokens it
    holds room for (batch 1), so it counts exactly the compact heads the model stores."""
    dtype = next(model.parameters()).dtype
    analytic = model.config.kv_bytes_per_token(dtype)
    cache = model.new_cache(1, max_len)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prefill_tokens), generator=g).to(
        next(model.parameters()).device
    )
    model(ids, cache)
    if cache.length != prefill_tokens:
        raise RuntimeError(f"cache holds {cache.length} tokens after a prefill of {prefill_tokens}")
    measured = cache.nbytes() / max_len
    return {"analytic": analytic, "measured": measured, "dtype": str(dtype).removeprefix("torch.")}


# ---- decode speed ------------------------------------------------------------------------------


def decode_speed(models: list, options: EvalOptions) -> list[list[dict]]:
    """For each model, for each batch size at `options.context`: prefill and decode tokens/s (the
    fastest of `repeats`), KV-cache bytes and peak memory, timed by dha.bench (the `bench` verb's
    code: warm-up, runs interleaved across models). Returns [model][batch size]."""
    points = [(b, options.context) for b in options.batch_sizes]
    return measure(
        [Runner(m) for m in models], points, options.new_tokens, options.repeats, options.seed, options.progress
    )


# ---- everything, for one or several models ----------------------------------------------------


def _check_options(model, options: EvalOptions) -> None:
    cfg = model.config
    if options.block_size < 2:
        raise UserError(f"--block-size must be at least 2, got {options.block_size}")
    if options.context < 1 or options.new_tokens < 1:
        raise UserError("--context and --new-tokens must be at least 1")
    if not options.batch_sizes or min(options.batch_sizes) < 1:
        raise UserError(f"--batch-sizes must be positive integers, got {options.batch_sizes}")
    if options.repeats < 1:
        raise UserError("--repeats must be at least 1")
    if options.max_eval_tokens is not None and options.max_eval_tokens < options.block_size:
        raise UserError(f"--max-eval-tokens {options.max_eval_tokens} is less than one block of {options.block_size}")
    if options.long_context < 0 or options.long_context == 1 or options.long_windows < 1:
        raise UserError("--long-context must be at least 2 tokens and --long-windows at least 1")
    if options.retrieval is not None:
        options.retrieval.validate()
    longest_read = max(options.long_context, max(options.retrieval.lengths) if options.retrieval else 0)
    if longest_read > cfg.max_position_embeddings:
        raise UserError(
            f"the model has {cfg.max_position_embeddings} positions; "
            f"--long-context / retrieval prompts read {longest_read}"
        )
    if cfg.position == "learned":  # absolute position tables end at max_position_embeddings
        longest = max(options.block_size, options.context + options.new_tokens)
        if longest > cfg.max_position_embeddings:
            raise UserError(
                f"the model has {cfg.max_position_embeddings} positions; "
                f"block size / context + new tokens = {longest} is longer"
            )


def _same_tokenizer(first, other) -> bool:
    if first.tokenizer is None or other.tokenizer is None:
        return first.model.config.vocab_size == other.model.config.vocab_size
    return first.tokenizer.get_vocab() == other.tokenizer.get_vocab()


def evaluate_models(models: list, splits: TokenSplits, options: EvalOptions) -> dict:
    """Evaluate Loaded models on the same held-out windows and speed settings; ratios to the first.

    Returns {"data", "perplexity_windows", "models": [per-model dict], ...} (see `evaluate`)."""
    first = models[0]
    for other in models[1:]:
        if not _same_tokenizer(first, other):
            raise UserError(
                f"{other.source} has a different tokenizer from {first.source}: their perplexities are not comparable"
            )
    for loaded in models:
        _check_options(loaded.model, options)
    max_blocks = None if options.max_eval_tokens is None else options.max_eval_tokens // options.block_size
    windows = make_blocks(splits.heldout, options.block_size, max_blocks)  # (n, W)
    results = [model_result(loaded, windows, options) for loaded in models]
    for loaded, r in zip(models, results):
        r.update(long_context_result(loaded, splits.heldout, options))
    if options.tasks:
        from .lm_eval_adapter import run_tasks  # lm_eval is optional (and slow to import): only when asked for

        for loaded, r in zip(models, results):
            r["tasks"] = run_tasks(
                loaded,
                options.tasks,
                options.include_path,
                options.limit,
                batch_size=options.eval_batch_size,
                progress=options.progress,
                task_metadata=options.task_metadata,
            )
    speeds = decode_speed([m.model.eval() for m in models], options)
    for r, speed in zip(results, speeds):
        r["speed"] = speed
        r["decode_tokens_per_s"] = speed[-1]["decode_tokens_per_s"]  # at the last (largest) batch size
        r["prefill_tokens_per_s"] = speed[-1]["prefill_tokens_per_s"]
        r["decode_batch_size"] = speed[-1]["batch_size"]
    for r in results:
        r["ratios"] = ratios(r, results[0])
    return {
        "data": splits.source,
        "heldout_tokens_available": int(splits.heldout.numel()),
        "heldout_documents": splits.heldout_documents,
        "perplexity_windows": {
            "windows": windows.shape[0],
            "window_tokens": options.block_size,
            "scored_tokens": windows.shape[0] * (options.block_size - 1),
            "max_eval_tokens": options.max_eval_tokens,
            "rule": (
                "non-overlapping windows; "
                "each token but a window's first is predicted from that window's earlier tokens only"
            ),
        },
        "options": asdict(options),
        "device": str(next(first.model.parameters()).device),
        "threads": torch.get_num_threads(),
        "models": results,
    }


def model_result(loaded, windows: torch.Tensor, options: EvalOptions) -> dict:
    """One model's size, heads, perplexity on `windows` and KV-cache bytes (measured == analytic, checked)."""
    model = loaded.model.eval()
    ppl = perplexity(model, windows, options.eval_batch_size, options.progress)
    kv = kv_bytes(model)
    if kv["measured"] != kv["analytic"]:
        raise RuntimeError(
            f"{loaded.source}: KV cache holds {kv['measured']} bytes/token, the config says {kv['analytic']}"
        )
    counts = kv_summary(model.config)
    return {
        "source": loaded.source,
        "parameters": model.num_parameters(),
        "dtype": kv["dtype"],
        "key_heads_total": counts["key_heads_total"],
        "value_heads_total": counts["value_heads_total"],
        "ppl": ppl["ppl"],
        "nll": ppl["nll"],
        "eval_tokens": ppl["tokens"],
        "kv_bytes_per_token": kv["analytic"],
        "kv_bytes_per_token_measured": kv["measured"],
    }


def long_context_result(loaded, heldout: torch.Tensor, options: EvalOptions) -> dict:
    """Perplexity by position and the passkey grid (dha.longctx), each when asked for."""
    out = {}
    if options.long_context:
        out["by_position"] = position_report(
            loaded.model.eval(), heldout, options.long_context, options.long_windows, options.progress
        )
    if options.retrieval is not None:
        if loaded.tokenizer is None:
            raise UserError(f"{loaded.source} has no tokenizer: passkey prompts cannot be built for it")
        out["retrieval"] = retrieval(
            loaded.model.eval(), loaded.tokenizer, options.retrieval, heldout, options.progress
        )
    return out


def ratios(r: dict, base: dict) -> dict:
    """A model's numbers over the first model's: perplexity, KV bytes, speeds per batch size, task metrics."""
    out = {
        "ppl": r["ppl"] / base["ppl"],
        "kv_bytes_per_token": r["kv_bytes_per_token"] / base["kv_bytes_per_token"],
        "decode_tokens_per_s": {
            str(s["batch_size"]): s["decode_tokens_per_s"] / b["decode_tokens_per_s"]
            for s, b in zip(r["speed"], base["speed"])
        },
        "prefill_tokens_per_s": {
            str(s["batch_size"]): s["prefill_tokens_per_s"] / b["prefill_tokens_per_s"]
            for s, b in zip(r["speed"], base["speed"])
        },
    }
    if "by_position" in r:
        out["by_position"] = position_ratios(r["by_position"], base["by_position"])
    if "tasks" in r:
        out["tasks"] = {
            t: {k: v / base["tasks"][t][k] for k, v in ms.items() if base["tasks"][t].get(k)}
            for t, ms in r["tasks"].items()
        }
    return out


def evaluate(loaded, splits: TokenSplits, options: EvalOptions | None = None) -> dict:
    """One model: the first model's numbers at the top level (ppl, nll, kv_bytes_per_token,
    decode_tokens_per_s at the largest batch size, speed per batch size, ...) plus the run's
    settings; `models` lists every model evaluated (only this one here)."""
    return flatten(evaluate_models([loaded], splits, options or EvalOptions()))


def flatten(report: dict) -> dict:
    """The report with the first model's numbers copied to the top level (the JSON line's shape)."""
    first = {k: v for k, v in report["models"][0].items() if k != "ratios"}
    return {**first, **report}


# ---- printing ---------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _name(m: dict) -> str:
    return os.path.basename(m["source"].rstrip("/")) or m["source"]


def print_long_context(models: list[dict], file) -> None:
    """Perplexity by position (and its ratio to the first model) and passkey found per length."""
    if "by_position" in models[0]:
        first = models[0]["by_position"]
        print(
            f"\nperplexity by position ({first['windows']} windows of {first['window']} tokens; "
            "in brackets the ratio to the first model):",
            file=file,
        )
        print(
            f"  {'model':<24}" + "".join(f"{str(b['start']) + '-' + str(b['end']):>18}" for b in first["buckets"]),
            file=file,
        )
        for m in models:
            ratios = m.get("ratios", {}).get("by_position") or [1.0] * len(first["buckets"])
            cells = "".join(f"{b['ppl']:>9.2f} ({x:.3f}x)" for b, x in zip(m["by_position"]["buckets"], ratios))
            print(f"  {_name(m):<24}{cells}", file=file)
    if "retrieval" in models[0]:
        grid = models[0]["retrieval"]
        print(
            f"\npasskey retrieval ({grid['haystack']} haystack; "
            f"found of {grid['prompts_per_length']} prompts per length, "
            f"{len(grid['depths'])} depths from {grid['depths'][0]:.0%} to {grid['depths'][-1]:.0%}):",
            file=file,
        )
        print(f"  {'model':<24}" + "".join(f"{n:>8}" for n in grid["lengths"]), file=file)
        for m in models:
            print(
                f"  {_name(m):<24}" + "".join(f"{v:>8}" for v in m["retrieval"]["found_per_length"].values()), file=file
            )


def print_report(report: dict, file=None) -> None:
    """The report as text (stdout by default): how it was measured, the table, ratios to the first
    model, long context, lm-eval tasks, peak memory."""
    file = file or sys.stdout
    models = report["models"]
    print_measurement(report, file)
    print(file=file)
    print_table(models, file)
    if len(models) > 1:
        print(file=file)
        print_ratios(models, file)
    print_long_context(models, file)
    if "tasks" in models[0]:
        print(file=file)
        print_tasks(models, file)
    print(file=file)
    print_memory(models, file)


def print_measurement(report: dict, file) -> None:
    """What was measured and how: the data and its held-out windows for perplexity, the speed runs."""
    w = report["perplexity_windows"]
    cap = f", capped at {w['max_eval_tokens']} tokens" if w["max_eval_tokens"] is not None else ""
    print(
        f"data: {report['data']}, held-out {report['heldout_tokens_available']} tokens"
        f" ({report['heldout_documents']} documents){cap}",
        file=file,
    )
    print(
        f"perplexity: {w['windows']} non-overlapping windows of {w['window_tokens']} tokens, "
        f"{w['scored_tokens']} tokens scored "
        f"(each token predicted from its own window's earlier tokens only; a window's first token is not scored)",
        file=file,
    )
    print(
        f"speed: random token ids, prefill {report['options']['context']} "
        f"then decode {report['options']['new_tokens']} tokens, "
        f"best of {report['options']['repeats']} interleaved runs, {report['device']}, {report['threads']} threads",
        file=file,
    )


def print_table(models: list[dict], file) -> None:
    """One row per model: parameters, K+V heads, perplexity, KV bytes per token, prefill and decode speed."""
    name_w = max(12, *(len(_name(m)) for m in models))
    head = f"{'model':<{name_w}} {'params':>11} {'K+V heads':>9} {'ppl':>9} {'KV B/token':>10}"
    for s in models[0]["speed"]:
        head += f" {'prefill b' + str(s['batch_size']):>11} {'decode b' + str(s['batch_size']):>10}"
    print(head + "   (tokens/s)", file=file)
    for m in models:
        row = (
            f"{_name(m):<{name_w}} {m['parameters']:>11,} {m['key_heads_total'] + m['value_heads_total']:>9} "
            f"{m['ppl']:>9.3f} {m['kv_bytes_per_token']:>10,}"
        )
        for s in m["speed"]:
            row += f" {s['prefill_tokens_per_s']:>11.1f} {s['decode_tokens_per_s']:>10.1f}"
        print(row, file=file)


def print_ratios(models: list[dict], file) -> None:
    """Perplexity, KV bytes and decode speed of every model after the first, as ratios to the first."""
    print(f"ratios to {_name(models[0])}:", file=file)
    for m in models[1:]:
        r = m["ratios"]
        dec = ", ".join(f"b{b} {v:.2f}x" for b, v in r["decode_tokens_per_s"].items())
        print(
            f"  {_name(m)}: ppl {r['ppl']:.3f}x, KV bytes {r['kv_bytes_per_token']:.3f}x, decode speed {dec}",
            file=file,
        )


def print_tasks(models: list[dict], file) -> None:
    """The lm-eval tasks' metrics, one line per model and task."""
    for m in models:
        for task, metrics in m["tasks"].items():
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"lm-eval {_name(m)} {task}: {shown}", file=file)


def print_memory(models: list[dict], file) -> None:
    """Each model's peak memory per batch size, with its KV cache's share."""
    for m in models:
        mem = ", ".join(
            f"b{s['batch_size']} {_mb(s['peak_memory_bytes'])} (KV cache {_mb(s['kv_cache_bytes'])})"
            for s in m["speed"]
        )
        kind = m["speed"][0]["peak_memory_kind"]
        print(f"peak memory ({kind}) {_name(m)}: {mem}", file=file)
