#!/usr/bin/env bash
# The baselines without training: SmolLM2-135M (3 KV heads per layer) against every baseline at one KV head
# per layer (--kv-budget 0.34 keeps 1 of 3 heads: 33.3% of the KV cache), no training.
# Held-out perplexity on the built-in pydoc text, KV bytes per token, decode tokens/s at batch 8
# after a 1,024-token context, and peak memory, all in one `dha eval --compare` run, as ratios
# to the original. Usage: bash benchmarks/baselines.sh [OUT_DIR]   (about 15 minutes on 2 cores)
set -euo pipefail
out=${1:-runs/bench-baselines}
mkdir -p "$out"
for method in gqa gqa-similar svd prune; do
  [ -e "$out/$method/dha_config.json" ] || dha convert --method "$method" --kv-budget 0.34 --out "$out/$method" --json
done
dha eval --compare "$out/gqa" "$out/gqa-similar" "$out/svd" "$out/prune" \
  --batch-sizes 8 --context 1024 --new-tokens 32 --repeats 2 | tee "$out/eval.txt"
tail -n 1 "$out/eval.txt" > benchmarks/results/baselines.json
