"""Helpers the tests and the benchmarks share that dha itself never uses; importable without pytest
and without tests/conftest.py's side effects (it sets torch to one thread)."""

from __future__ import annotations

import math

import torch
from torch import nn

from dha.model import Transformer
from dha.plan import LayerPlan, Plan


def identity_plan(source_key_heads: list[int], source_value_heads: list[int]) -> Plan:
    """Every head stays on its own: applying it changes nothing."""
    layers = [
        LayerPlan([[h] for h in range(k)], [[h] for h in range(v)])
        for k, v in zip(source_key_heads, source_value_heads)
    ]
    return Plan(layers, list(source_key_heads), list(source_value_heads), method="identity", kv_budget=1.0)


def scaled_init_(model: Transformer, std: float = 0.02, seed: int | None = None) -> Transformer:
    """GPT-2 style initialisation for models trained from scratch (benchmarks, tests)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            s = (
                std / math.sqrt(2 * model.config.num_layers)
                if name.endswith(("o_proj.weight", "down_proj.weight"))
                else std
            )
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * s)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
    return model
