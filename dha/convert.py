"""Convert a model to fewer KV heads: by a named method at a KV budget, or by replaying a saved plan.

    METHODS[name](model, kv_budget, calib_blocks, options) -> (Plan, Transformer)

is the registry the `dha convert` verb reads. A method gets the source model (never modified),
the fraction of the KV cache to keep (dha.budget.heads_for_budget says how the uniform
baselines round it), calibration token blocks (n, T) from the TRAIN split (None when the caller has
no data; methods that need it raise UserError), and ConvertOptions; it returns the plan it chose
(method, kv_budget and notes set) and the initialised model. The baselines come from
dha.baselines; "dha" is the DHA pipeline's no-training path (dha.pipeline).

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
from .checkpoint import Loaded
from .errors import UserError
from .families import refuse_merge_of_qk_norm
from .model import Transformer
from .pipeline import DHAConfig, merge_without_fusion, plan_and_merges, resolved_search
from .plan import Plan
from .search import SearchOptions
from .transforms import merge_groups


def convert_dha(
    model: Transformer, kv_budget: float, calib_blocks, options: ConvertOptions
) -> tuple[Plan, Transformer]:
    """METHODS["dha"]: DHA without training: the pipeline's stage 1 (one calibration pass, the
    search, the aligned merge of every group: `dha.pipeline.plan_and_merges`) and its merge
    (`merge_without_fusion`), as `dha convert --method dha --tokens 0` runs them.

    The training stages need data and a token budget: `dha.pipeline.run_dha` (the CLI's
    `--method dha`) runs them. options.extra may hold "search" (a dict of SearchOptions fields)."""
    fields = {"seed": options.seed, "batch_size": options.batch_size, **dict(options.extra or {}).get("search", {})}
    search_options = resolved_search(model, SearchOptions(**fields), fusion=False)
    config = DHAConfig(kv_budget=kv_budget, search=search_options, device=options.device)
    plan, merges = plan_and_merges(model, calib_blocks, config, search_options, None, lambda message: None)
    return plan, merge_without_fusion(model, plan, merges, options.device)


Method = Callable[[Transformer, float, "torch.Tensor | None", ConvertOptions], "tuple[Plan, Transformer]"]

METHODS: dict[str, Method] = {
    "gqa": convert_gqa,
    "gqa-similar": convert_gqa_similar,
    "svd": convert_svd,
    "prune": convert_prune,
    "dha": convert_dha,  # dha.pipeline without training; `dha convert --method dha` runs all of it (run_dha)
}

# Methods that merge by the aligned merge (dha.merge), which a per-head qk-norm model needs once its
# norms have one weight per head; the others take group means or pick heads.
ALIGNED_METHODS = {"svd", "dha"}

# Methods that can run without calibration text.
NO_CALIBRATION = {"gqa"}

__all__ = ["METHODS", "ConvertOptions", "convert", "apply_plan", "check_method"]


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


def convert(
    loaded: Loaded,
    method: str,
    kv_budget: float,
    calib_blocks: torch.Tensor | None,
    options: ConvertOptions | None = None,
) -> Loaded:
    """Run METHODS[method] on loaded.model; the new Loaded carries tokenizer, hf_config, plan."""
    fn = check_method(method)
    refuse_merge_of_qk_norm(loaded.model, mean=method not in ALIGNED_METHODS)
    options = options or ConvertOptions()
    plan, model = fn(loaded.model, kv_budget, calib_blocks, options)
    plan.method, plan.kv_budget = method, kv_budget
    settings = {
        k: v for k, v in vars(options).items() if k not in ("extra", "device")
    }  # where it ran is not a setting of the result
    return _result(loaded, model, plan, {"options": settings | options.extra})


def apply_plan(loaded: Loaded, plan: Plan) -> Loaded:
    """Mean-pool the groups of a saved plan (PlanError, a UserError, if it does not fit the model)."""
    refuse_merge_of_qk_norm(loaded.model, mean=True)
    src_k, src_v = source_heads(loaded.model)
    plan.validate(src_k, src_v)
    model = merge_groups(loaded.model, plan)
    return _result(loaded, model, plan, {"applied_plan": True, "pooling": "mean"})
