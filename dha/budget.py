"""The KV budget in heads: how many key and value heads a conversion at `kv_budget` keeps.

Every method shares this arithmetic (docs/method.md, "Budgets and the baselines"). The budget is a
ceiling on the fraction of the source's KV cache kept, counted in heads (head dim is unchanged).
The uniform baselines keep a count per layer and kind (`heads_for_budget`); DHA's search keeps a
total, distributed freely (`total_heads_for_budget`). Plain arithmetic on head counts: no torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from .model import Transformer


def source_heads(model: Transformer) -> tuple[list[int], list[int]]:
    """The source's key heads and value heads per layer."""
    cfg = model.config
    return [cfg.key_heads(l) for l in range(cfg.num_layers)], [cfg.value_heads(l) for l in range(cfg.num_layers)]


def min_budget(source_key_heads: list[int], source_value_heads: list[int]) -> float:
    """The smallest budget that keeps one key and one value head per layer."""
    return 2 * len(source_key_heads) / (sum(source_key_heads) + sum(source_value_heads))


def heads_for_budget(
    source_key_heads: list[int], source_value_heads: list[int], kv_budget: float
) -> tuple[list[int], list[int]]:
    """Key and value heads per layer for a uniform baseline at `kv_budget`.

    The budget is a ceiling on the fraction of the source's KV cache kept, counted in heads (head
    dim is unchanged): sum_l (Hk'(l) + Hv'(l)) <= kv_budget * sum_l (Hk(l) + Hv(l)), except that no
    layer keeps fewer than one K and one V head. Per layer and kind, n = floor(kv_budget * n_source)
    (plus 1e-9 against float error), at least 1. So SmolLM2 (3 KV heads) keeps 1 at 0.34, 2 at 0.67,
    3 at 1.0; a 6-head MHA keeps 3 at 0.5.

    Raises UserError when kv_budget is outside (0, 1] or below `min_budget` (one K and one V head
    per layer).
    """
    if not isinstance(kv_budget, (int, float)) or math.isnan(kv_budget) or not 0 < kv_budget <= 1:
        raise UserError(f"--kv-budget must be in (0, 1] (the fraction of the KV cache kept), got {kv_budget}")
    least = min_budget(source_key_heads, source_value_heads)
    if kv_budget < least - 1e-9:
        raise UserError(
            f"--kv-budget {kv_budget} is too small: keeping one key and one value head in each of the "
            f"{len(source_key_heads)} layers already keeps {least:.4f} of the KV cache"
        )

    def count(n: int) -> int:
        return max(1, min(n, math.floor(kv_budget * n + 1e-9)))

    return [count(n) for n in source_key_heads], [count(n) for n in source_value_heads]


def total_heads_for_budget(source_key_heads: list[int], source_value_heads: list[int], kv_budget: float) -> int:
    """Total K+V heads a searched plan at `kv_budget` keeps: floor(kv_budget * sum of source heads).

    Same convention as `heads_for_budget` (which also validates the budget), so a search never
    keeps fewer heads than the uniform baselines at the same budget."""
    heads_for_budget(source_key_heads, source_value_heads, kv_budget)  # raises UserError when unmeetable
    total = math.floor(kv_budget * (sum(source_key_heads) + sum(source_value_heads)) + 1e-9)
    if total < 2 * len(source_key_heads):  # a budget a hair above min_budget can still floor below it
        raise UserError(
            f"--kv-budget {kv_budget} keeps {total} heads, fewer than one key and one value head in each of "
            f"{len(source_key_heads)} layers"
        )
    return total


def largest_divisor_at_most(n: int, target: int) -> int:
    """The largest divisor of n not above target (at least 1): GQA's equal groups within a count."""
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(1, target))
