"""Human-readable and JSON summaries of a model (the `inspect` verb)."""

from __future__ import annotations

import torch


def inspect_model(loaded) -> dict:
    model = loaded.model
    cfg = model.config
    dtype = next(model.parameters()).dtype
    layers = [
        {"layer": l, "query_heads": cfg.num_heads, "key_heads": cfg.key_heads(l), "value_heads": cfg.value_heads(l),
         "key_index": cfg.key_index[l], "value_index": cfg.value_index[l]}
        for l in range(cfg.num_layers)
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
        "key_heads_total": sum(l["key_heads"] for l in layers),
        "value_heads_total": sum(l["value_heads"] for l in layers),
        "parameters": model.num_parameters(),
        "dtype": str(dtype).removeprefix("torch."),
        "kv_bytes_per_token": cfg.kv_bytes_per_token(dtype),
        "kv_bytes_per_token_fp32": cfg.kv_bytes_per_token(torch.float32),
        "kv_bytes_per_token_bf16": cfg.kv_bytes_per_token(torch.bfloat16),
        "kv_fraction_of_source": (
            (sum(l["key_heads"] + l["value_heads"] for l in layers) / source_kv) if source_kv else None
        ),
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
    print(f"value heads       {_runs([l['value_heads'] for l in info['per_layer']])}  (total {info['value_heads_total']})")
    print(f"KV cache / token  {info['kv_bytes_per_token']:,} bytes in {info['dtype']} "
          f"({info['kv_bytes_per_token_fp32']:,} fp32, {info['kv_bytes_per_token_bf16']:,} bf16)")
    if info["kv_fraction_of_source"] is not None:
        print(f"vs source         {info['kv_fraction_of_source']:.1%} of the source's KV cache ({info['plan_method']})")
    print()
    print(f"{'layer':>5} {'Hq':>3} {'Hk':>3} {'Hv':>3}  key_index / value_index")
    for l in info["per_layer"]:
        print(f"{l['layer']:>5} {l['query_heads']:>3} {l['key_heads']:>3} {l['value_heads']:>3}  {l['key_index']} / {l['value_index']}")
