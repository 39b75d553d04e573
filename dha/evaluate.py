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
first model; `print_report` prints the table. The `eval` verb prints the table, then one JSON line.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .bench import Runner, measure
from .data import TokenSplits, blocks as make_blocks
from .errors import UserError


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


# ---- perplexity -------------------------------------------------------------------------------

@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity over non-overlapping windows: `blocks` (n, W), each row one window.

    Inside a window, token t (t = 1..W-1) is predicted from tokens 0..t-1 of the same window only;
    the first token of each window is not predicted (it has no prefix). So n * (W - 1) tokens are
    scored; no context crosses window borders, which gives a somewhat higher perplexity than a
    sliding window would. nll is the mean negative log-likelihood per scored token (nats), computed
    in float32 whatever the model's dtype; ppl = exp(nll).
    """
    from tqdm.auto import tqdm

    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise UserError(f"perplexity needs windows of at least 2 tokens, got shape {tuple(blocks.shape)}")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    starts = range(0, blocks.shape[0], batch_size)
    for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress, file=sys.stderr):
        ids = blocks[start:start + batch_size].to(device)  # (B, W)
        logits = model(ids)[:, :-1]  # (B, W-1, V): position t predicts token t+1
        targets = ids[:, 1:]  # (B, W-1)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += targets.numel()
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
    ids = torch.randint(0, model.config.vocab_size, (1, prefill_tokens), generator=g).to(next(model.parameters()).device)
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
    return measure([Runner(m) for m in models], points, options.new_tokens, options.repeats, options.seed, options.progress)


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
    if cfg.position == "learned":  # absolute position tables end at max_position_embeddings
        longest = max(options.block_size, options.context + options.new_tokens)
        if longest > cfg.max_position_embeddings:
            raise UserError(f"the model has {cfg.max_position_embeddings} positions; block size / context + new tokens = {longest} is longer")


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
            raise UserError(f"{other.source} has a different tokenizer from {first.source}: their perplexities are not comparable")
    for loaded in models:
        _check_options(loaded.model, options)
    max_blocks = None if options.max_eval_tokens is None else options.max_eval_tokens // options.block_size
    windows = make_blocks(splits.heldout, options.block_size, max_blocks)  # (n, W)
    results = []
    for loaded in models:
        model = loaded.model.eval()
        ppl = perplexity(model, windows, options.eval_batch_size, options.progress)
        kv = kv_bytes(model)
        if kv["measured"] != kv["analytic"]:
            raise RuntimeError(f"{loaded.source}: KV cache holds {kv['measured']} bytes/token, the config says {kv['analytic']}")
        cfg = model.config
        results.append({
            "source": loaded.source,
            "parameters": model.num_parameters(),
            "dtype": kv["dtype"],
            "key_heads_total": sum(cfg.key_heads(l) for l in range(cfg.num_layers)),
            "value_heads_total": sum(cfg.value_heads(l) for l in range(cfg.num_layers)),
            "ppl": ppl["ppl"],
            "nll": ppl["nll"],
            "eval_tokens": ppl["tokens"],
            "kv_bytes_per_token": kv["analytic"],
            "kv_bytes_per_token_measured": kv["measured"],
        })
    if options.tasks:
        for loaded, r in zip(models, results):
            r["tasks"] = run_lm_eval_tasks(loaded, options.tasks, options.include_path, options.limit,
                                           batch_size=options.eval_batch_size, progress=options.progress)
    speeds = decode_speed([m.model.eval() for m in models], options)
    for r, speed in zip(results, speeds):
        r["speed"] = speed
        r["decode_tokens_per_s"] = speed[-1]["decode_tokens_per_s"]  # at the last (largest) batch size
        r["prefill_tokens_per_s"] = speed[-1]["prefill_tokens_per_s"]
        r["decode_batch_size"] = speed[-1]["batch_size"]
    base = results[0]
    for r in results:
        r["ratios"] = {
            "ppl": r["ppl"] / base["ppl"],
            "kv_bytes_per_token": r["kv_bytes_per_token"] / base["kv_bytes_per_token"],
            "decode_tokens_per_s": {str(s["batch_size"]): s["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                                    for s, b in zip(r["speed"], base["speed"])},
            "prefill_tokens_per_s": {str(s["batch_size"]): s["prefill_tokens_per_s"] / b["prefill_tokens_per_s"]
                                     for s, b in zip(r["speed"], base["speed"])},
        }
        if "tasks" in r:
            r["ratios"]["tasks"] = {t: {k: v / base["tasks"][t][k] for k, v in ms.items() if base["tasks"][t].get(k)}
                                    for t, ms in r["tasks"].items()}
    return {
        "data": splits.source,
        "heldout_tokens_available": int(splits.heldout.numel()),
        "heldout_documents": splits.heldout_documents,
        "perplexity_windows": {
            "windows": windows.shape[0],
            "window_tokens": options.block_size,
            "scored_tokens": windows.shape[0] * (options.block_size - 1),
            "max_eval_tokens": options.max_eval_tokens,
            "rule": "non-overlapping windows; each token but a window's first is predicted from that window's earlier tokens only",
        },
        "options": asdict(options),
        "device": str(next(first.model.parameters()).device),
        "threads": torch.get_num_threads(),
        "models": results,
    }


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


def print_report(report: dict, file=None) -> None:
    file = file or sys.stdout
    w = report["perplexity_windows"]
    models = report["models"]
    cap = f", capped at {w['max_eval_tokens']} tokens" if w["max_eval_tokens"] is not None else ""
    print(f"data: {report['data']}, held-out {report['heldout_tokens_available']} tokens"
          f" ({report['heldout_documents']} documents){cap}", file=file)
    print(f"perplexity: {w['windows']} non-overlapping windows of {w['window_tokens']} tokens, {w['scored_tokens']} tokens scored "
          f"(each token predicted from its own window's earlier tokens only; a window's first token is not scored)", file=file)
    print(f"speed: random token ids, prefill {report['options']['context']} then decode {report['options']['new_tokens']} tokens, "
          f"best of {report['options']['repeats']} interleaved runs, {report['device']}, {report['threads']} threads", file=file)
    print(file=file)
    name_w = max(12, *(len(os.path.basename(m["source"].rstrip("/")) or m["source"]) for m in models))
    head = f"{'model':<{name_w}} {'params':>11} {'K+V heads':>9} {'ppl':>9} {'KV B/token':>10}"
    for s in models[0]["speed"]:
        head += f" {'prefill b' + str(s['batch_size']):>11} {'decode b' + str(s['batch_size']):>10}"
    print(head + "   (tokens/s)", file=file)
    for m in models:
        name = os.path.basename(m["source"].rstrip("/")) or m["source"]
        row = (f"{name:<{name_w}} {m['parameters']:>11,} {m['key_heads_total'] + m['value_heads_total']:>9} "
               f"{m['ppl']:>9.3f} {m['kv_bytes_per_token']:>10,}")
        for s in m["speed"]:
            row += f" {s['prefill_tokens_per_s']:>11.1f} {s['decode_tokens_per_s']:>10.1f}"
        print(row, file=file)
    if len(models) > 1:
        print(file=file)
        print(f"ratios to {os.path.basename(models[0]['source'].rstrip('/')) or models[0]['source']}:", file=file)
        for m in models[1:]:
            r = m["ratios"]
            dec = ", ".join(f"b{b} {v:.2f}x" for b, v in r["decode_tokens_per_s"].items())
            print(f"  {os.path.basename(m['source'].rstrip('/')) or m['source']}: ppl {r['ppl']:.3f}x, "
                  f"KV bytes {r['kv_bytes_per_token']:.3f}x, decode speed {dec}", file=file)
    if "tasks" in models[0]:
        print(file=file)
        for m in models:
            name = os.path.basename(m["source"].rstrip("/")) or m["source"]
            for task, metrics in m["tasks"].items():
                shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                print(f"lm-eval {name} {task}: {shown}", file=file)
    print(file=file)
    for m in models:
        mem = ", ".join(f"b{s['batch_size']} {_mb(s['peak_memory_bytes'])} (KV cache {_mb(s['kv_cache_bytes'])})" for s in m["speed"])
        kind = m["speed"][0]["peak_memory_kind"]
        print(f"peak memory ({kind}) {os.path.basename(m['source'].rstrip('/')) or m['source']}: {mem}", file=file)


# ---- lm-evaluation-harness tasks --------------------------------------------------------------

def lm_eval_model(loaded, batch_size: int = 8, max_length: int = 2048, progress: bool = True):
    """An lm_eval LM (lm-evaluation-harness, EleutherAI) that scores text with our model.

    loglikelihood: each context + continuation is cut to its last max_length + 1 tokens and run as
    one causal sequence; the continuation's log-probabilities are summed (and "greedy" is whether
    argmax reproduces it), the same rule as lm_eval's own HFLM. loglikelihood_rolling uses
    lm_eval's rolling windows; generate_until decodes greedily from the KV cache."""
    try:
        from lm_eval.api.model import TemplateLM
        from lm_eval import utils as lm_utils
    except ImportError:
        raise UserError("--tasks needs lm-evaluation-harness: pip install lm-eval") from None
    from tqdm.auto import tqdm

    from .model import generate

    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    if tokenizer is None:
        raise UserError(f"{loaded.source} has no tokenizer, so lm-eval tasks cannot run on it")
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if eos is None:
        raise UserError(f"the tokenizer of {loaded.source} has no EOS token, which lm-eval needs")

    class DHALM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.tokenizer = tokenizer

        @property
        def eot_token_id(self) -> int:
            return eos

        @property
        def prefix_token_id(self) -> int:
            return prefix

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(tokenizer, "name_or_path", "dha")).replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

        @torch.no_grad()
        def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
            """(context ids, continuation ids) -> (sum log p(continuation | context), greedy?)."""
            seqs = [(context + cont)[-(max_length + 1):] for context, cont in pairs]
            order = sorted(range(len(pairs)), key=lambda i: -len(seqs[i]))  # similar lengths batch together
            out: list[tuple[float, bool]] = [None] * len(pairs)
            for start in tqdm(range(0, len(order), batch_size), desc="lm-eval", disable=disable_tqdm or not progress, file=sys.stderr):
                idx = order[start:start + batch_size]
                T = max(len(seqs[i]) - 1 for i in idx)
                # Right padding never changes a causal model's earlier positions.
                ids = torch.zeros(len(idx), T, dtype=torch.long)  # (B, T)
                for row, i in enumerate(idx):
                    ids[row, : len(seqs[i]) - 1] = torch.tensor(seqs[i][:-1])
                logprobs = torch.log_softmax(model(ids.to(device)).float(), dim=-1)  # (B, T, V)
                for row, i in enumerate(idx):
                    n, L = len(pairs[i][1]), len(seqs[i]) - 1
                    target = torch.tensor(seqs[i][-n:], device=device)
                    lp = logprobs[row, L - n: L]  # (n, V): positions that predict the continuation
                    out[i] = (lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
            return out

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            return self._score([(context, cont) for _, context, cont in requests], disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            totals = []
            for (string,) in [r.args for r in requests]:
                windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=prefix, max_seq_len=max_length, context_len=1))
                totals.append(sum(lp for lp, _ in self._score(list(windows), True)))
            return totals

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            results = []
            for context, gen_kwargs in tqdm([r.args for r in requests], desc="lm-eval generate", disable=disable_tqdm or not progress, file=sys.stderr):
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(gen_kwargs.get("max_gen_toks", 256))
                ids = self.tok_encode(context)[-(max_length - max_new):] or [prefix]
                new = generate(model, torch.tensor([ids], device=device), max_new)[0, len(ids):].tolist()
                if eos in new:
                    new = new[: new.index(eos)]
                text = tokenizer.decode(new, skip_special_tokens=True)
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                results.append(text)
            return results

    return DHALM()


def run_lm_eval_tasks(loaded, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                      num_fewshot: int | None = None, batch_size: int = 8, max_length: int = 2048,
                      progress: bool = True) -> dict:
    """Run lm-evaluation-harness tasks on one model; returns {task: {metric: value}}.

    Standard tasks download their datasets from a hub; offline, point `include_path` at a folder
    of task YAML files whose `dataset_path: json` reads a local JSONL (`dataset_kwargs.data_files`)."""
    lm = lm_eval_model(loaded, batch_size, max_length, progress)
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"--include-path {include_path} is not a directory")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {unknown}; with local tasks, give --include-path DIR")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False, bootstrap_iters=0)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"lm-eval could not run {tasks}: {str(e).splitlines()[0]}") from None
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
            for task, metrics in out["results"].items()}
