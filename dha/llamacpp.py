"""Run a GGUF file in llama.cpp (the llama-cpp-python bindings, an optional dependency) and read
what llama.cpp itself reports: logits, the KV cache it allocates, the bytes it keeps per token.

A test-and-benchmark helper: nothing in dha imports it. The tests (test_gguf, test_longctx_llama_cpp)
and the llama.cpp benchmarks use it to check exports against an implementation that shares no code
with dha; it lives in dha/ so that both can import it. Notes on llama.cpp's KV cache (llama-cpp-python 0.3.36,
src/llama-kv-cache.cpp):
- the cache type is f16 unless type_k / type_v say otherwise;
- keys are stored per layer with that layer's own head count; values too when flash attention
  is on. With flash attention off (llama-cpp-python's default) values are stored transposed, and
  when layers differ in value width every layer's value cache is padded to the widest layer's
  ("padding V cache to ...", [TAG_V_CACHE_VARIABLE]). So a `deci` file saves its value cache
  only with flash attention on (Llama(flash_attn=True), llama-cli -fa on);
- a quantized cache (`cache_type="q8_0"`: keys and values in blocks of 32 with one f16 scale,
  34 bytes per 32 values) needs flash attention on for the values, and a head dimension that is a
  multiple of 32;
- with flash attention on, the CPU backend attends in f16 whatever the cache type: an f32 cache
  gives an f16 cache's logits bit for bit (tests/test_longctx_llama_cpp.py). Only flash attention
  off with an f32 cache matches an fp32 model to float32 rounding.

The long-context measures of dha.longctx, run in llama.cpp on the same token ids (`position_nll`,
`greedy_answers`; benchmarks/long_context_llama_cpp.py compares them with dha's).
"""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import torch

# Per cached token of a sequence, llama.cpp's state also writes its position, a count of sequence
# ids and the one id, int32 each (llama_kv_cache::state_write_meta).
CELL_META_BYTES = 12
_SIZE_LINE = re.compile(
    r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells.*?K \((\w+)\): +([\d.]+) MiB, "
    r"V \((\w+)\): +([\d.]+) MiB"
)


@contextlib.contextmanager
def _plain_weight_buffers():
    """Load weights without llama.cpp's extra (repacked) buffer types, as `llama-cli --no-repack`
    does: on CPUs with AMX the repacked matmul crashes (SIGSEGV in ggml_backend_amx_mul_mat, seen
    with llama-cpp-python 0.3.36 on hidden size 96). llama-cpp-python does not expose the field."""
    import llama_cpp.llama_cpp as bindings

    default = bindings.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    bindings.llama_model_default_params = params
    try:
        yield
    finally:
        bindings.llama_model_default_params = default


CACHE_TYPES = ("f16", "q8_0", "f32")  # llama.cpp KV cache types open_model takes


def cache_type_args(cache_type: str, flash_attn: bool) -> dict:
    """Llama's type_k / type_v for a KV cache type of CACHE_TYPES (f16: llama.cpp's default)."""
    import llama_cpp

    if cache_type not in CACHE_TYPES:
        raise ValueError(f"cache_type must be one of {', '.join(CACHE_TYPES)}, got {cache_type!r}")
    if cache_type == "q8_0" and not flash_attn:
        raise ValueError("llama.cpp quantizes the V cache only with flash attention on (flash_attn=True)")
    ggml = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "f32": llama_cpp.GGML_TYPE_F32}[
        cache_type
    ]
    return {"type_k": ggml, "type_v": ggml}


def open_model(
    path: str,
    n_ctx: int,
    f32_cache: bool = False,
    flash_attn: bool = False,
    threads: int = 1,
    cache_type: str = "f16",
    **kwargs,
):
    """(llama_cpp.Llama, its load log). The KV cache holds `cache_type` (CACHE_TYPES; q8_0 needs
    flash_attn=True); f32_cache=True is cache_type="f32"."""
    import llama_cpp

    if f32_cache:
        cache_type = "f32"
    kwargs.update(cache_type_args(cache_type, flash_attn))
    from llama_cpp._logger import set_verbose

    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log), _plain_weight_buffers():  # verbose: llama.cpp's log goes to sys.stderr
            llm = llama_cpp.Llama(
                model_path=path,
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                flash_attn=flash_attn,
                verbose=True,
                **kwargs,
            )
    finally:
        set_verbose(False)  # the log level is global in llama-cpp-python
    llm.verbose = False
    return llm, log.getvalue()


def kv_cache_allocation(log: str) -> dict:
    """The KV cache llama.cpp reports allocating (its log line; MiB with 2 decimals)."""
    m = _SIZE_LINE.search(log)
    if m is None:
        raise ValueError("llama.cpp's log has no `llama_kv_cache: size = ...` line")
    mib = 2**20
    return {
        "bytes": round(float(m.group(1)) * mib),
        "cells": int(m.group(2)),
        "cache_type": m.group(3),
        "key_bytes": round(float(m.group(4)) * mib),
        "value_bytes": round(float(m.group(6)) * mib),
        "resolution_bytes": round(0.005 * mib),
        "padded_values": "padding V cache" in log,
    }


def logits(llm, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits (T, V) for one sequence from an empty cache (needs logits_all=True)."""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def kv_bytes_per_token(llm, ids: list[int], warmup: int = 8) -> float:
    """Keys and values llama.cpp keeps per token of one sequence: how much its state grows per token."""
    import llama_cpp

    llm.reset()
    llm.eval(ids[:warmup])
    before = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)
    llm.eval(ids[warmup:])
    after = llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0)
    return (after - before) / (len(ids) - warmup) - CELL_META_BYTES


# ---- the long-context measures (dha.longctx's, in llama.cpp) ------------------------------------

NLL_CHUNK_ROWS = 512  # logits rows log-softmaxed at once: 512 x vocab float32 (100 MB at 49,152)


def window_nll(llm, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1,) float64: the NLL (nats) of ids[t] from llama.cpp's logits at t - 1, one
    sequence from an empty cache (needs logits_all=True). llama-cpp-python keeps the logits of
    every position (n_ctx x vocab float32, its `scores`); they are read as a view, a chunk of
    rows at a time, so the only copy made is one chunk's log-softmax."""
    if not getattr(llm, "_logits_all", False):
        raise ValueError("position NLL needs every position's logits: open the model with logits_all=True")
    if len(ids) > llm.n_ctx():
        raise ValueError(f"a window of {len(ids)} tokens does not fit llama.cpp's context of {llm.n_ctx()}")
    llm.reset()
    llm.eval(ids)
    targets = torch.tensor(ids[1:])
    out = []
    for s in range(0, len(ids) - 1, NLL_CHUNK_ROWS):
        rows = torch.from_numpy(llm.scores[s : min(s + NLL_CHUNK_ROWS, len(ids) - 1)])  # no copy
        out.append(torch.nn.functional.cross_entropy(rows, targets[s : s + rows.shape[0]], reduction="none").double())
    return torch.cat(out)


def position_nll(llm, windows) -> torch.Tensor:
    """(W-1,) float64: the mean NLL at each window index t = 1..W-1 over `windows` ((n, W) tensor
    or lists of ids), as dha.longctx.position_nll, from llama.cpp's logits (logits_all=True)."""
    rows = windows.tolist() if isinstance(windows, torch.Tensor) else [list(w) for w in windows]
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError("position NLL needs one or more windows of the same length")
    total = torch.zeros(len(rows[0]) - 1, dtype=torch.float64)
    for row in rows:
        total += window_nll(llm, row)
    return total / len(rows)


def last_logits(llm) -> np.ndarray:
    """(vocab,) float32: llama.cpp's logits of the last token of the last llama_decode (a view)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def greedy_answers(llm, prompts_ids, new_tokens: int) -> list[list[int]]:
    """For each prompt (a list of token ids, or an object with `.ids`, e.g. dha.longctx.Prompt):
    the `new_tokens` ids llama.cpp decodes greedily (argmax, first on ties, as dha.model.generate):
    the prompt evaluated from an empty cache, then one token at a time through llama.cpp's own KV
    cache. llama.cpp's samplers are not used, so nothing (penalties, top-k) is applied to the logits."""
    out = []
    for prompt in prompts_ids:
        ids = list(getattr(prompt, "ids", prompt))
        if len(ids) + new_tokens > llm.n_ctx():
            raise ValueError(
                f"a prompt of {len(ids)} tokens and {new_tokens} new ones do not fit llama.cpp's context "
                f"of {llm.n_ctx()}"
            )
        llm.reset()
        llm.eval(ids)
        new = []
        for i in range(new_tokens):
            new.append(int(np.argmax(last_logits(llm))))
            if i + 1 < new_tokens:
                llm.eval(new[-1:])
        out.append(new)
    return out
