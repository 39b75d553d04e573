"""dha.longctx's measures run in llama.cpp (dha.llamacpp.position_nll, greedy_answers) against dha's own.

A tiny converted model (per-layer key/value head counts 3 and 2, so a `deci` file; head dim 32, as
a q8_0 cache needs) exported to GGUF with f32 weights, as tests/test_gguf.py does. Tolerances are
measured here (max |NLL difference| per window index, 2 windows of 200 tokens):
- f32 cache, flash attention off: 7.2e-7 nats (mean NLL about 5.8);
- f16 cache, flash attention on (the benchmark's setting): 9.2e-5. An f32 cache with flash attention
  on gives the same numbers bit for bit: llama.cpp's CPU flash attention works in f16 whatever the cache;
- q8_0 cache, flash attention on: 3.6e-3.
"""

from __future__ import annotations

import pytest
import torch

from dha import llamacpp, longctx
from dha.model import generate
from tests.test_gguf import exported, requires_llama_cpp, sharp_per_layer_model, token_ids

# (cache type, flash attention) -> max |llama.cpp - dha| NLL per index, nats (measured values in the module doc)
NLL_ATOL = {("f32", False): 1e-5, ("f16", True): 1e-3, ("q8_0", True): 2e-2}


def tiny_converted(tmp_path, capsys):
    """(GGUF path, our model): 6 query heads of 32 dims, 2 layers with 3 and 2 key/value heads."""
    hf, model = sharp_per_layer_model(hidden_size=192, head_dim=32, max_position_embeddings=512)
    path, report, _ = exported(tmp_path, capsys, model, hf)
    assert report["arch"] == "deci" and report["kv_heads"] == [3, 2]
    return path, model


@requires_llama_cpp
def test_position_nll_and_greedy_answers_equal_dha(tmp_path, capsys):
    path, model = tiny_converted(tmp_path, capsys)
    windows = torch.tensor([token_ids(200, seed=1), token_ids(200, seed=2)])
    ours = longctx.position_nll(model, windows, progress=False)
    for (cache_type, flash), atol in NLL_ATOL.items():
        llm, log = llamacpp.open_model(path, 256, cache_type=cache_type, flash_attn=flash, logits_all=True)
        assert llamacpp.kv_cache_allocation(log)["cache_type"] == cache_type
        theirs = llamacpp.position_nll(llm, windows)
        assert theirs.shape == (199,) and theirs.dtype == torch.float64
        diff = (theirs - ours).abs().max().item()
        assert diff <= atol, (cache_type, flash, diff)
        llm.close()

    # Greedy decoding through llama.cpp's KV cache (f32) gives dha.model.generate's tokens; prompts
    # as lists of ids or as objects with .ids (dha.longctx.Prompt).
    prompts = [token_ids(30, seed=3), token_ids(120, seed=4)]
    ours = [generate(model, torch.tensor([p]), 12)[0, len(p) :].tolist() for p in prompts]
    llm, _ = llamacpp.open_model(path, 256, f32_cache=True)
    assert llamacpp.greedy_answers(llm, prompts, 12) == ours
    as_prompts = [longctx.Prompt(p, key="00000", length=len(p), depth=0.5) for p in prompts]
    assert llamacpp.greedy_answers(llm, as_prompts, 12) == ours
    llm.close()


@requires_llama_cpp
def test_cache_type_checks(tmp_path, capsys):
    """q8_0 needs flash attention (llama.cpp: "quantized V cache requires flash_attn to be enabled");
    position NLL needs every position's logits and a context the window fits."""
    with pytest.raises(ValueError, match="flash attention"):
        llamacpp.cache_type_args("q8_0", flash_attn=False)
    with pytest.raises(ValueError, match="cache_type"):
        llamacpp.cache_type_args("q4_0", flash_attn=True)
    path, _ = tiny_converted(tmp_path, capsys)
    llm, _ = llamacpp.open_model(path, 64)
    with pytest.raises(ValueError, match="logits_all"):
        llamacpp.position_nll(llm, [token_ids(20)])
    llm.close()
    llm, _ = llamacpp.open_model(path, 64, logits_all=True)  # llama.cpp rounds the context up to 256
    with pytest.raises(ValueError, match="does not fit"):
        llamacpp.position_nll(llm, [token_ids(300)])
    llm.close()
