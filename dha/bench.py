"""Prefill and decode speed, KV-cache bytes and peak memory: the `bench` verb and `eval`'s speed columns.

Every point of a sweep (batch size x context) is timed the same way (`time_point`): random token
ids; a prefill of `context` tokens into a fresh KV cache, keeping the logits of the last position
only (as generation does); then `new_tokens` greedy decode steps, one token per row from the
cache. Prefill and decode are timed apart, after a short warm-up per model and point. Models are
interleaved (A, B, A, B, ... at each point) so that a slow spell of a shared machine hits them
alike, and the fastest of `repeats` runs is kept. prefill tokens/s = batch x context / prefill
seconds; decode tokens/s = batch x new_tokens / decode seconds. With `decode_only`, the cache is
filled with random numbers instead (untimed, prefill reported as None): decode costs the same
whatever the cache holds, and large points skip minutes of prefill.

Memory: `kv_cache_bytes` is what the cache holds after the run; `peak_memory_bytes` is, on CPU,
the process's peak resident set during the run (every loaded model included) and
`run_memory_bytes` its rise over the resident set at the run's start (cache and activations); on
CUDA, allocator numbers. Before anything runs, each point's memory is estimated and checked
against the device's free memory by dha.memory (`check_memory`: its Generation work, check_fit), and
a point that cannot fit is refused with a UserError, before anything is allocated.

A transformers model (`TransformersRunner`, e.g. the stock export of the same weights) is timed by
the same code, with its own default cache (DynamicCache) and `logits_to_keep=1` in the prefill.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from .device import synchronize
from .errors import UserError
from .export import export
from .memory import Generation, Work, check_fit, estimate
from .plots import pyplot, save
from .summary import kv_summary


@dataclass
class BenchOptions:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    contexts: list[int] = field(default_factory=lambda: [128, 512])  # prompt tokens prefilled before decoding
    new_tokens: int = 16  # decode steps timed after each prefill
    repeats: int = 2  # timed runs per model and point; the fastest is kept
    seed: int = 0  # random token ids
    progress: bool = True  # a tqdm bar on stderr
    # Decode after a cache filled with random numbers instead of a timed prefill: decode costs the
    # same whatever the cache holds (dense kernels), and large points skip minutes of prefill.
    decode_only: bool = False


# ---- runners: one interface over our model and a transformers model ------------------------------


class Runner:
    """Our Transformer: a preallocated KVCache of context + new_tokens, last-position logits."""

    kind = "dha"

    def __init__(self, model):
        self.model = model.eval()
        self.config = model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def prefill(self, ids: torch.Tensor, max_len: int):
        """ids (B, T) -> (cache, logits (B, V) of the last position)."""
        cache = self.model.new_cache(ids.shape[0], max_len)
        return cache, self.model(ids, cache, last_only=True)[:, -1]

    def step(self, cache, token: torch.Tensor):
        """token (B, 1) -> (cache, logits (B, V))."""
        return cache, self.model(token, cache)[:, -1]

    def random_cache(self, batch_size: int, context: int, max_len: int):
        """A cache holding `context` tokens of random numbers (decode_only)."""
        cache = self.model.new_cache(batch_size, max_len)
        for t in cache.keys + cache.values:
            t.normal_()
        cache.length = context
        return cache

    def cache_bytes(self, cache) -> int:
        return cache.nbytes()


class TransformersRunner(Runner):
    """A transformers causal LM as its users run it: DynamicCache, logits_to_keep=1 in prefill.

    `config` is our ModelConfig of the same weights (for the memory estimate and the table)."""

    kind = "transformers"

    def __init__(self, hf_model, config):
        import inspect

        self.model = hf_model.eval()
        self.config = config
        # transformers 5 renamed the forward's `past_key_values` to `cache` (the old name warns).
        self.cache_arg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"

    def prefill(self, ids, max_len):
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return _past(out), out.logits[:, -1]

    def step(self, cache, token):
        out = self.model(input_ids=token, use_cache=True, logits_to_keep=1, **{self.cache_arg: cache})
        return _past(out), out.logits[:, -1]

    def cache_bytes(self, cache) -> int:
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

    def random_cache(self, batch_size, context, max_len):
        from transformers.cache_utils import DynamicCache

        cfg, cache = self.config, DynamicCache()
        for l in range(cfg.num_layers):
            shape = (batch_size, cfg.key_heads(l), context, cfg.head_dim)  # stock classes: as many K as V heads
            cache.update(
                torch.randn(shape, dtype=self.dtype, device=self.device),
                torch.randn(shape, dtype=self.dtype, device=self.device),
                l,
            )
        return cache


def _past(out):
    """The cache of a transformers output (transformers 5 may name it `cache`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# ---- memory ---------------------------------------------------------------------------------------


def check_memory(runners: list[Runner], points: list[tuple[int, int]], new_tokens: int) -> None:
    """Refuse (dha.memory.check_fit), before allocating anything, a point whose cache and activations
    cannot fit in what the runner's device has free beside the loaded models."""
    for runner in runners:
        for b, c in points:
            est = estimate(runner.config, runner.dtype, Work(generation=Generation(b, c, new_tokens)))
            check_fit(
                runner.device,
                est,
                False,
                f"batch {b} x context {c} (+{new_tokens} new tokens)",
                loaded=True,
                advice="use a smaller batch or context",
            )


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Linux: writing 5 to clear_refs resets the process's peak resident set size (VmHWM),
        # so each run reports its own peak (proc(5), "/proc/[pid]/clear_refs", since Linux 4.0).
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def memory_now(device: torch.device) -> tuple[int, int, str]:
    """(current bytes, peak bytes, what): CUDA: tensor bytes allocated; CPU: resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    try:
        with open("/proc/self/status") as f:
            status = f.read()
        rss, hwm = (re.search(rf"{key}:\s+(\d+) kB", status) for key in ("VmRSS", "VmHWM"))
        if rss and hwm:
            return int(rss.group(1)) * 1024, int(hwm.group(1)) * 1024, "peak_rss"
    except OSError:
        pass
    # Elsewhere only the peak since the process started is available (kB on Linux, bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return peak, peak, "peak_rss_since_start"


# ---- timing ---------------------------------------------------------------------------------------


@torch.no_grad()
def time_point(
    runner: Runner, batch_size: int, context: int, new_tokens: int, seed: int = 0, decode_only: bool = False
) -> dict:
    """One timed run: prefill `context` random tokens for `batch_size` rows (decode_only: fill the
    cache with random numbers, untimed), then decode `new_tokens` greedy tokens one at a time from
    the cache. Seconds (prefill_s None when decode_only), cache bytes, peak memory."""
    device = runner.device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, runner.config.vocab_size, (batch_size, context), generator=g).to(device)  # (B, T)
    reset_peak_memory(device)
    start_bytes = memory_now(device)[0]
    synchronize(device)
    t0 = time.perf_counter()
    if decode_only:
        cache, logits = runner.random_cache(batch_size, context, context + new_tokens), ids[:, -1:].float()
        synchronize(device)
        t0 = time.perf_counter()
    else:
        cache, logits = runner.prefill(ids, context + new_tokens)  # logits (B, V)
    synchronize(device)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        cache, logits = runner.step(cache, logits.argmax(-1, keepdim=True))  # token (B, 1)
    synchronize(device)
    t2 = time.perf_counter()
    _, peak, what = memory_now(device)
    return {
        "prefill_s": None if decode_only else t1 - t0,
        "decode_s": t2 - t1,
        "kv_cache_bytes": runner.cache_bytes(cache),
        "peak_memory_bytes": peak,
        "run_memory_bytes": max(0, peak - start_bytes),
        "peak_memory_kind": what,
    }


def summarise(runs: list[dict], batch_size: int, context: int, new_tokens: int) -> dict:
    """The fastest of a point's runs, as tokens/s (prefill None when not timed); memory as the largest seen."""
    timed = [r["prefill_s"] for r in runs if r["prefill_s"] is not None]
    prefill_s, decode_s = min(timed) if timed else None, min(r["decode_s"] for r in runs)
    return {
        "batch_size": batch_size,
        "context": context,
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": batch_size * context / prefill_s if timed else None,
        "decode_tokens_per_s": batch_size * new_tokens / decode_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "kv_cache_bytes": runs[0]["kv_cache_bytes"],
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs),
        "run_memory_bytes": max(r["run_memory_bytes"] for r in runs),
        "peak_memory_kind": runs[0]["peak_memory_kind"],
    }


def measure(
    runners: list[Runner],
    points: list[tuple[int, int]],
    new_tokens: int,
    repeats: int,
    seed: int = 0,
    progress: bool = True,
    decode_only: bool = False,
) -> list[list[dict]]:
    """Time every runner at every (batch size, context) point, interleaved; returns [runner][point].

    Per point: a warm-up of every runner (16-token prompt, 2 steps: first calls allocate and pick
    kernels), then `repeats` rounds of one run per runner. Memory is checked first (check_memory)."""
    from tqdm.auto import tqdm

    if new_tokens < 1 or repeats < 1 or not points or min(min(p) for p in points) < 1:
        raise UserError("batch sizes, contexts, new tokens and repeats must all be at least 1")
    check_memory(runners, points, new_tokens)
    out = [[] for _ in runners]
    bar = tqdm(
        total=len(points) * len(runners) * (repeats + 1),
        desc="speed",
        unit="run",
        disable=not progress,
        file=sys.stderr,
    )
    for b, c in points:
        runs = [[] for _ in runners]
        for runner in runners:
            time_point(runner, b, min(c, 16), min(new_tokens, 2), seed, decode_only)
            bar.update()
        for r in range(repeats):
            for i, runner in enumerate(runners):
                runs[i].append(time_point(runner, b, c, new_tokens, seed + r, decode_only))
                bar.update()
        for i in range(len(runners)):
            out[i].append(summarise(runs[i], b, c, new_tokens))
    bar.close()
    return out


# ---- the bench verb: several models, a sweep, ratios, a table, a plot -------------------------------


def transformers_runner(loaded) -> tuple[TransformersRunner | None, str]:
    """transformers' own stock class on the same weights (dha.export, reload-checked), or None
    and the reason when the layout needs remote code. The export goes to a temporary directory."""
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="dha-bench-") as tmp:
        result = export(loaded, tmp + "/hf")
        if result.kind != "stock":
            return None, result.reason or "no stock class"
        hf_model = AutoModelForCausalLM.from_pretrained(tmp + "/hf", dtype=next(loaded.model.parameters()).dtype)
        hf_model = hf_model.to(next(loaded.model.parameters()).device)
    return TransformersRunner(hf_model, loaded.model.config), result.hf_class


def _name(source: str) -> str:
    return source.rstrip("/").split("/")[-1] or source


def describe(runner: Runner, name: str, source: str) -> dict:
    """A model's entry in the report: what it is and what its cache costs per token."""
    kv = kv_summary(runner.config, runner.dtype)
    paths = [getattr(b.attn, "path", None) for b in getattr(runner.model, "layers", [])]
    return {
        "name": name,
        "source": source,
        "kind": runner.kind,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in runner.model.parameters()),
        "key_heads_total": kv["key_heads_total"],
        "value_heads_total": kv["value_heads_total"],
        "kv_bytes_per_token": kv["kv_bytes_per_token"],
        "attention_paths": {p: paths.count(p) for p in sorted(set(paths)) if p} if runner.kind == "dha" else {},
    }


def bench(models: list, options: BenchOptions, with_transformers: bool = False) -> dict:
    """Time Loaded `models` (and, with_transformers, transformers' stock model of each one that has
    one, right after it) over the sweep; ratios are to the first row's model at the same point."""
    runners, entries, notes = [], [], []
    for loaded in models:
        name = _name(loaded.source)
        runners.append(Runner(loaded.model))
        entries.append(describe(runners[-1], name, loaded.source))
        if with_transformers:
            hf, what = transformers_runner(loaded)
            if hf is None:
                notes.append(f"{name}: no transformers row ({what})")
                continue
            runners.append(hf)
            entries.append({**describe(hf, f"transformers:{name}", loaded.source), "hf_class": what})
    for i, e in enumerate(entries):  # names must tell rows apart
        if [x["name"] for x in entries].count(e["name"]) > 1:
            e["name"] = f"{e['name']}#{i}"
    points = [(b, c) for b in options.batch_sizes for c in options.contexts]
    speeds = measure(
        runners, points, options.new_tokens, options.repeats, options.seed, options.progress, options.decode_only
    )
    results = []
    for entry, per_point in zip(entries, speeds):
        for s, base in zip(per_point, speeds[0]):
            results.append(
                {
                    "model": entry["name"],
                    **s,
                    "ratios": {
                        k: None if s[k] is None else s[k] / base[k]
                        for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "kv_cache_bytes")
                    },
                }
            )
    return {
        "models": entries,
        "results": results,
        "notes": notes,
        "options": {
            "batch_sizes": options.batch_sizes,
            "contexts": options.contexts,
            "new_tokens": options.new_tokens,
            "repeats": options.repeats,
            "seed": options.seed,
            "decode_only": options.decode_only,
        },
        "device": str(runners[0].device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def print_bench(report: dict, file=None) -> None:
    """A table: one row per model and point, ratios to the first model at the same point."""
    file = file or sys.stdout
    o = report["options"]
    first = "a cache of random numbers (prefill not timed)" if o["decode_only"] else "prefill"
    print(
        f"random token ids; {first}, then {o['new_tokens']} greedy decode steps; "
        f"best of {o['repeats']} interleaved runs; "
        f"{report['device']}, {report['threads']} threads, torch {report['torch']}",
        file=file,
    )
    for m in report["models"]:
        paths = ", ".join(f"{k} {v}" for k, v in m["attention_paths"].items())
        print(
            f"  {m['name']}: {m['kind']}, {m['dtype']}, K+V heads {m['key_heads_total']}+{m['value_heads_total']}, "
            f"KV {m['kv_bytes_per_token']:,} B/token" + (f", layers: {paths}" if paths else ""),
            file=file,
        )
    for note in report["notes"]:
        print(f"  {note}", file=file)
    w = max(10, *(len(m["name"]) for m in report["models"]))
    print(
        f"\n{'model':<{w}} {'batch':>5} {'context':>7} {'prefill tok/s':>13} {'x':>6} {'decode tok/s':>12} {'x':>6} "
        f"{'KV MiB':>8} {'x':>6} {'run MiB':>8} {'peak MiB':>9}",
        file=file,
    )
    for r in sorted(report["results"], key=lambda r: (r["batch_size"], r["context"])):
        x = r["ratios"]
        prefill = "-" if r["prefill_tokens_per_s"] is None else f"{r['prefill_tokens_per_s']:,.1f}"
        prefill_x = "-" if x["prefill_tokens_per_s"] is None else f"{x['prefill_tokens_per_s']:.2f}x"
        print(
            f"{r['model']:<{w}} {r['batch_size']:>5} {r['context']:>7} {prefill:>13} "
            f"{prefill_x:>6} {r['decode_tokens_per_s']:>12,.1f} {x['decode_tokens_per_s']:>5.2f}x "
            f"{_mib(r['kv_cache_bytes']):>8} {x['kv_cache_bytes']:>5.2f}x {_mib(r['run_memory_bytes']):>8} "
            f"{_mib(r['peak_memory_bytes']):>9}",
            file=file,
        )
    print(
        f"(x: ratio to {report['models'][0]['name']} at the same batch and context; run MiB: rise of "
        f"{report['results'][0]['peak_memory_kind']} over the run's start, peak MiB: the whole process)",
        file=file,
    )


def write_plot(report: dict, path: str) -> None:
    """Decode tokens/s against context, one line per model and batch size; written atomically."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":", "-."]
    for i, m in enumerate(report["models"]):
        for j, b in enumerate(report["options"]["batch_sizes"]):
            rows = sorted(
                (r for r in report["results"] if r["model"] == m["name"] and r["batch_size"] == b),
                key=lambda r: r["context"],
            )
            ax.plot(
                [r["context"] for r in rows],
                [r["decode_tokens_per_s"] for r in rows],
                marker="o",
                linestyle=styles[j % len(styles)],
                color=f"C{i}",
                label=f"{m['name']}, batch {b}",
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens in the cache)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"decode speed, {report['device']}, {report['threads']} threads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path, dpi=120)
