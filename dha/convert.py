"""Convert a model to fewer KV heads: by a named method at a KV budget, or by replaying a saved plan.

    METHODS[name](model, kv_budget, calib_blocks, options) -> (Plan, Transformer)

is the registry the `dha convert` verb reads. A method gets the source model (never modified),
the fraction of the KV cache to keep (dha.budget.heads_for_budget says how the uniform
baselines round it), calibration token blocks (n, T) from the TRAIN split (None when the caller has
no data; methods that need it raise UserError), and ConvertOptions; it returns the plan it chose
(method, kv_budget and notes set) and the initialised model. Other modules add their method to
METHODS (the DHA search/fusion registers "dha").

`convert` wraps a method for a loaded checkpoint: the result carries the tokenizer, the source's
HF config (for export) and provenance, plus the plan. `apply_plan` replays a plan with mean pooling.
"""

from __future__ import annotations

from typing import Callable

import torch

from .baselines import (
    ConvertOptions,
    convert_gqa,
    convert_gqa_similar,
    convert_prune,
    convert_svd,
)
from .budget import source_heads
from .calibration import calibrate
from .checkpoint import Loaded
from .errors import UserError
from .merge import aligned_merge, closed_form_merges
from .model import Transformer
from .plan import Plan
from .search import SearchOptions, search
from .transforms import merge_groups


def convert_dha(model: Transformer, kv_budget: float, calib_blocks, options: ConvertOptions) -> tuple[Plan, Transformer]:
    """METHODS["dha"]: DHA without training: search, then the aligned merge of every group.

    The training stages need data and a token budget: `dha.pipeline.run_dha` (the CLI's
    `--method dha`) runs them. options.extra may hold "search" (a dict of SearchOptions fields)."""
    fields = {"seed": options.seed, "batch_size": options.batch_size, **dict(options.extra or {}).get("search", {})}
    search_options = SearchOptions(**fields)
    calibration = calibrate(model, calib_blocks, search_options.batch_size, search_options.metric,
                            gradients=search_options.sensitivity and search_options.search == "cost", device=options.device,
                            free_pairs=search_options.free_pairs)
    plan = search(model, kv_budget, calib_blocks, search_options, calibration=calibration)
    return plan, aligned_merge(model, plan.layers, closed_form_merges(calibration.stats, plan.layers), device=options.device)

Method = Callable[[Transformer, float, "torch.Tensor | None", ConvertOptions], "tuple[Plan, Transformer]"]

METHODS: dict[str, Method] = {
    "gqa": convert_gqa,
    "gqa-similar": convert_gqa_similar,
    "svd": convert_svd,
    "prune": convert_prune,
    "dha": convert_dha,  # search + aligned merge; `dha convert --method dha` runs the full pipeline (dha.pipeline.run_dha)
}

# Methods that can run without calibration text.
NO_CALIBRATION = {"gqa"}

__all__ = ["METHODS", "ConvertOptions", "convert", "apply_plan", "check_method", "kv_summary"]


def check_method(method: str) -> Method:
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return METHODS[method]


def _result(loaded: Loaded, model: Transformer, plan: Plan, extra: dict) -> Loaded:
    provenance = {
        "converted_from": loaded.source,
        "source_provenance": loaded.provenance,
        "method": plan.method,
        "kv_budget": plan.kv_budget,
        "kv_fraction": plan.kv_fraction(),
        **extra,
    }
    # The source's own plan (when it was itself converted) is superseded: the new plan is relative
    # to the heads of `loaded.model`, and its provenance keeps the chain.
    return Loaded(model.eval(), loaded.tokenizer, loaded.source, "native", loaded.hf_config, plan, provenance)


def convert(loaded: Loaded, method: str, kv_budget: float, calib_blocks: torch.Tensor | None,
            options: ConvertOptions | None = None) -> Loaded:
    """Run METHODS[method] on loaded.model; the new Loaded carries tokenizer, hf_config, plan."""
    fn = check_method(method)
    options = options or ConvertOptions()
    plan, model = fn(loaded.model, kv_budget, calib_blocks, options)
    plan.method, plan.kv_budget = method, kv_budget
    settings = {k: v for k, v in vars(options).items() if k not in ("extra", "device")}  # where it ran is not a setting of the result
    return _result(loaded, model, plan, {"options": settings | options.extra})


def apply_plan(loaded: Loaded, plan: Plan) -> Loaded:
    """Mean-pool the groups of a saved plan (PlanError, a UserError, if it does not fit the model)."""
    src_k, src_v = source_heads(loaded.model)
    plan.validate(src_k, src_v)
    model = merge_groups(loaded.model, plan)
    return _result(loaded, model, plan, {"applied_plan": True, "pooling": "mean"})


def kv_summary(model: Transformer) -> dict:
    """Heads per layer and KV-cache bytes per token (fp32 and bf16) of a model."""
    cfg = model.config
    return {
        "key_heads": [cfg.key_heads(l) for l in range(cfg.num_layers)],
        "value_heads": [cfg.value_heads(l) for l in range(cfg.num_layers)],
        "kv_bytes_per_token_fp32": cfg.kv_bytes_per_token(torch.float32),
        "kv_bytes_per_token_bf16": cfg.kv_bytes_per_token(torch.bfloat16),
    }
