"""Human-readable and JSON summaries of a model: its heads and KV cache (`kv_summary`, which every
report uses), and the `inspect` verb's table."""

from __future__ import annotations

import torch


def kv_summary(cfg, dtype: torch.dtype | None = None) -> dict:
    """Key and value heads of a model config (a dha.model.ModelConfig) per layer and in all, and its
    KV-cache bytes per token in fp32 and bf16, and in `dtype` when given (`kv_bytes_per_token`)."""
    key_heads = [cfg.key_heads(l) for l in range(cfg.num_layers)]
    value_heads = [cfg.value_heads(l) for l in range(cfg.num_layers)]
    out = {
        "key_heads": key_heads,
        "value_heads": value_heads,
        "key_heads_total": sum(key_heads),
        "value_heads_total": sum(value_heads),
        "kv_bytes_per_token_fp32": cfg.kv_bytes_per_token(torch.float32),
        "kv_bytes_per_token_bf16": cfg.kv_bytes_per_token(torch.bfloat16),
    }
    if dtype is not None:
        out["kv_bytes_per_token"] = cfg.kv_bytes_per_token(dtype)
    return out


def heads_text(counts: list[int]) -> str:
    """Per-layer head counts in a summary line: '3' when every layer has 3, else '2-3 (per layer [3, 2])'."""
    return str(counts[0]) if len(set(counts)) == 1 else f"{min(counts)}-{max(counts)} (per layer {counts})"


def inspect_model(loaded) -> dict:
    model = loaded.model
    cfg = model.config
    dtype = next(model.parameters()).dtype
    kv = kv_summary(cfg, dtype)
    layers = [
        {
            "layer": l,
            "query_heads": cfg.num_heads,
            "key_heads": k,
            "value_heads": v,
            "key_index": cfg.key_index[l],
            "value_index": cfg.value_index[l],
        }
        for l, (k, v) in enumerate(zip(kv["key_heads"], kv["value_heads"]))
    ]
    source_kv = None
    if loaded.plan is not None:
        p = loaded.plan
        source_kv = sum(p.source_key_heads) + sum(p.source_value_heads)
    return {
        "source": loaded.source,
        "kind": loaded.kind,
        "family": cfg.family,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "head_dim": cfg.head_dim,
        "query_heads": cfg.num_heads,
        "key_heads_total": kv["key_heads_total"],
        "value_heads_total": kv["value_heads_total"],
        "parameters": model.num_parameters(),
        "dtype": str(dtype).removeprefix("torch."),
        "kv_bytes_per_token": kv["kv_bytes_per_token"],
        "kv_bytes_per_token_fp32": kv["kv_bytes_per_token_fp32"],
        "kv_bytes_per_token_bf16": kv["kv_bytes_per_token_bf16"],
        "kv_fraction_of_source": ((kv["key_heads_total"] + kv["value_heads_total"]) / source_kv if source_kv else None),
        "plan_method": loaded.plan.method if loaded.plan is not None else None,
        "per_layer": layers,
    }


def _runs(values: list[int]) -> str:
    """[3, 3, 3, 1, 1] -> '3 (layers 0-2), 1 (layers 3-4)': runs of equal counts, for the table."""
    out, i = [], 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        out.append(f"{values[i]}" + (f" (layers {i}-{j - 1})" if j - i > 1 else f" (layer {i})"))
        i = j
    return ", ".join(out)


def print_inspect(info: dict) -> None:
    print(f"source            {info['source']} ({info['kind']})")
    print(f"family            {info['family']}")
    print(f"layers            {info['layers']}")
    print(f"hidden / head dim {info['hidden_size']} / {info['head_dim']}")
    print(f"parameters        {info['parameters']:,}")
    print(f"dtype             {info['dtype']}")
    print(f"query heads       {info['query_heads']} per layer")
    print(f"key heads         {_runs([l['key_heads'] for l in info['per_layer']])}  (total {info['key_heads_total']})")
    print(
        f"value heads       {_runs([l['value_heads'] for l in info['per_layer']])}  (total {info['value_heads_total']})"
    )
    print(
        f"KV cache / token  {info['kv_bytes_per_token']:,} bytes in {info['dtype']} "
        f"({info['kv_bytes_per_token_fp32']:,} fp32, {info['kv_bytes_per_token_bf16']:,} bf16)"
    )
    if info["kv_fraction_of_source"] is not None:
        print(f"vs source         {info['kv_fraction_of_source']:.1%} of the source's KV cache ({info['plan_method']})")
    print()
    print(f"{'layer':>5} {'Hq':>3} {'Hk':>3} {'Hv':>3}  key_index / value_index")
    for l in info["per_layer"]:
        print(
            f"{l['layer']:>5} {l['query_heads']:>3} {l['key_heads']:>3} {l['value_heads']:>3}  "
            f"{l['key_index']} / {l['value_index']}"
        )
