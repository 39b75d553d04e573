"""Run a GGUF file in llama.cpp (the llama-cpp-python bindings, an optional dependency) and read
what llama.cpp itself reports: logits, the KV cache it allocates, the bytes it keeps per token.

Used by the tests and the serving benchmark to check exports against an implementation that
shares no code with dha. Notes on llama.cpp's KV cache (llama-cpp-python 0.3.36,
src/llama-kv-cache.cpp):
- the cache type is f16 unless type_k / type_v say otherwise;
- keys are stored per layer with that layer's own head count; values too when flash attention
  is on. With flash attention off (llama-cpp-python's default) values are stored transposed, and
  when layers differ in value width every layer's value cache is padded to the widest layer's
  ("padding V cache to ...", [TAG_V_CACHE_VARIABLE]). So a `deci` file saves its value cache
  only with flash attention on (Llama(flash_attn=True), llama-cli -fa on).
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
_SIZE_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells.*?K \((\w+)\): +([\d.]+) MiB, "
                        r"V \((\w+)\): +([\d.]+) MiB")


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


def open_model(path: str, n_ctx: int, f32_cache: bool = False, flash_attn: bool = False, threads: int = 1, **kwargs):
    """(llama_cpp.Llama, its load log). f32_cache keeps keys and values in float32 (default f16)."""
    import llama_cpp

    if f32_cache:
        kwargs.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    from llama_cpp._logger import set_verbose

    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log), _plain_weight_buffers():  # verbose: llama.cpp's log goes to sys.stderr
            llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                  flash_attn=flash_attn, verbose=True, **kwargs)
    finally:
        set_verbose(False)  # the log level is global in llama-cpp-python
    llm.verbose = False
    return llm, log.getvalue()


def kv_cache_allocation(log: str) -> dict:
    """The KV cache llama.cpp reports allocating (its log line; MiB with 2 decimals)."""
    m = _SIZE_LINE.search(log)
    if m is None:
        raise ValueError("llama.cpp's log has no `llama_kv_cache: size = ...` line")
    mib = 2 ** 20
    return {"bytes": round(float(m.group(1)) * mib), "cells": int(m.group(2)), "cache_type": m.group(3),
            "key_bytes": round(float(m.group(4)) * mib), "value_bytes": round(float(m.group(6)) * mib),
            "resolution_bytes": round(0.005 * mib), "padded_values": "padding V cache" in log}


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
