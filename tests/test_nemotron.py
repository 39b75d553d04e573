"""`dha export --format nemotron-nas`: a DeciLMForCausalLM directory for vLLM.

Structure: config.json read back through its own configuration class (AutoConfig,
trust_remote_code) by the attribute paths vLLM's nemotron_nas.py reads (block_configs[i].attention
.no_op / .n_heads_in_group, .ffn.no_op / .ffn_mult), and the weight names and shapes its loader
expects. Numbers: a reference built from Hugging Face's own LlamaDecoderLayer, one per layer with
that layer's head count and MLP width as vLLM derives them, holding the exported weights; fp32,
atol 1e-4 (query heads are reordered: fp32 summation order, see dha.export.REORDER_RTOL)."""

from __future__ import annotations

import json
import os

import torch
from torch.testing import assert_close

from dha.cli import main
from tests.conftest import random_ids, tiny_llama_hf
from tests.test_export import last_json, native_checkpoint
from tests.test_serving import converted


def vllm_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """vLLM's _ffn_mult_to_intermediate_size, restated."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return -(-n // 256) * 256


def reference_logits(directory: str, ids: torch.Tensor) -> torch.Tensor:
    """Embed, one HF LlamaDecoderLayer per block config, norm, lm_head: the exported weights, fp32."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    sd = load_file(os.path.join(directory, "model.safetensors"))
    common = dict(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=config.rope_parameters,
        hidden_act=config.hidden_act,
    )
    x = torch.nn.functional.embedding(ids, sd["model.embed_tokens.weight"])
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        for i, block in enumerate(config.block_configs):
            assert not block.attention.no_op and not block.ffn.no_op
            layer_config = LlamaConfig(
                num_key_value_heads=config.num_attention_heads // block.attention.n_heads_in_group,
                intermediate_size=vllm_intermediate_size(block.ffn.ffn_mult, config.hidden_size),
                **common,
            )
            layer_config._attn_implementation = "sdpa"  # causal when no mask is given
            layer = LlamaDecoderLayer(layer_config, layer_idx=i)
            prefix = f"model.layers.{i}."
            layer.load_state_dict(
                {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}, strict=True
            )
            rope = LlamaRotaryEmbedding(layer_config)(x, positions)
            out = layer(x, attention_mask=None, position_ids=positions, position_embeddings=rope)
            x = out[0] if isinstance(out, tuple) else out
        norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norm.weight.copy_(sd["model.norm.weight"])
        head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
        return norm(x) @ head.T


def test_per_layer_counts_export_structure_and_numbers(tmp_path, capsys):
    hf = tiny_llama_hf(intermediate_size=256)  # 2 * ffn_mult * 48 / 3 = 256: ffn_mult 8
    groups = [[[0, 3], [1, 4], [2, 5]], [[1, 2, 5], [0, 3, 4]]]  # 3 and 2 key/value heads, non-contiguous
    model = converted(hf, groups, groups)
    src = native_checkpoint(tmp_path, model, hf)
    out = str(tmp_path / "nas")
    assert main(["export", src, "--format", "nemotron-nas", "--out", out]) == 0
    stdout = capsys.readouterr().out
    assert last_json(stdout)["kv_heads"] == [3, 2] and "SGLang refuses" in stdout

    with open(os.path.join(out, "config.json")) as f:
        raw = json.load(f)
    assert raw["architectures"] == ["DeciLMForCausalLM"] and raw["model_type"] == "nemotron-nas"
    assert raw["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    assert "num_key_value_heads" not in raw and "intermediate_size" not in raw
    assert [b["attention"]["n_heads_in_group"] for b in raw["block_configs"]] == [2, 3]

    from safetensors.torch import load_file

    sd = load_file(os.path.join(out, "model.safetensors"))
    for i, kv in enumerate([3, 2]):
        assert sd[f"model.layers.{i}.self_attn.k_proj.weight"].shape == (kv * 8, 48)
        assert sd[f"model.layers.{i}.self_attn.v_proj.weight"].shape == (kv * 8, 48)
        assert sd[f"model.layers.{i}.mlp.gate_proj.weight"].shape == (256, 48)
    ids = random_ids(2, 20, seed=3)
    with torch.no_grad():
        ours = model(ids)
    assert_close(reference_logits(out, ids), ours, atol=1e-4, rtol=0)


def test_decoupled_refused_unless_padded(tmp_path, capsys):
    hf = tiny_llama_hf(intermediate_size=256, tie=True)
    model = converted(hf, [[[0, 1], [2, 3], [4, 5]]] * 2, [[[0, 1, 2], [3, 4, 5]]] * 2)
    src = native_checkpoint(tmp_path, model, hf)
    assert main(["export", src, "--format", "nemotron-nas", "--out", str(tmp_path / "a")]) == 2
    assert "layer 0: key heads and value heads are grouped differently" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a")
    out = str(tmp_path / "b")
    assert main(["export", src, "--format", "nemotron-nas", "--pad", "--out", out]) == 0
    report = last_json(capsys.readouterr().out)
    # Pairs read: heads {0,1}: (0,0); {2}: (1,0); {3}: (1,1); {4,5}: (2,1) -> groups of 1: 6 heads.
    assert report["kv_heads"] == [6, 6] and report["padded_layers"] == 2
    assert report["kv_bytes_per_token_bf16"] - report["source_kv_bytes_per_token_bf16"] == 2 * (12 - 5) * 8 * 2
    ids = random_ids(2, 20, seed=3)
    with torch.no_grad():
        ours = model(ids)
    assert_close(reference_logits(out, ids), ours, atol=1e-4, rtol=0)


def test_mlp_width_the_engines_cannot_derive_is_refused(tmp_path, capsys):
    """DeciLM derives the MLP width from ffn_mult, rounded up to a multiple of 256: 64 has no ffn_mult."""
    hf = tiny_llama_hf()  # intermediate_size 64
    src = native_checkpoint(tmp_path, converted(hf, [[[0, 1, 2, 3, 4, 5]]] * 2, [[[0, 1, 2, 3, 4, 5]]] * 2), hf)
    out = str(tmp_path / "nas")
    assert main(["export", src, "--format", "nemotron-nas", "--out", out]) == 2
    assert "MLP width 64 cannot be written as a DeciLM ffn_mult" in capsys.readouterr().err
    assert not os.path.exists(out)
