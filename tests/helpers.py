"""Helpers the tests and the benchmarks share that dha itself never uses; importable without pytest
and without tests/conftest.py's side effects (it sets torch to one thread)."""

from __future__ import annotations

from dha.plan import LayerPlan, Plan


def identity_plan(source_key_heads: list[int], source_value_heads: list[int]) -> Plan:
    """Every head stays on its own: applying it changes nothing."""
    layers = [
        LayerPlan([[h] for h in range(k)], [[h] for h in range(v)])
        for k, v in zip(source_key_heads, source_value_heads)
    ]
    return Plan(layers, list(source_key_heads), list(source_value_heads), method="identity", kv_budget=1.0)
