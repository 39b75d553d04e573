#!/usr/bin/env bash
# qk-norm against none: one small model (6 layers, 6 heads of 64, the SmolLM2 tokenizer) trained three
# times from the same seed on the same 300,000 tokens of the built-in pydoc text (146 steps of 2,048):
# with Qwen3's per-head query and key norms, with OLMo 2's norms over the whole projections, and
# without (benchmarks/train_small_mha.py). Each is converted at 1/2 and
# 1/3 of its KV cache by dha and svd, with no training and with 16,384 tokens (distilled from its
# source), beside the control (the source trained the same way). Held-out pydoc and Linux man pages
# (a text nothing trains or calibrates on), as ratios to each model's own source. One thread per
# job; about an hour and a half on 2 cores.
#   bash benchmarks/qk_norm.sh [train|convert|seeds|table|all]
set -euo pipefail
part=${1:-all}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cache=$HOME/.cache/dha
second=${DHA_SECOND_TEXT:-$cache/man1_400.txt}
res=benchmarks/results
[[ -f $second ]] || python benchmarks/man_pages_text.py --pages 400 --out "$second"
if [[ $part == train || $part == all ]]; then
  [[ -d $cache/small-qknorm ]] || python benchmarks/train_small_mha.py --qk-norm --tokens 300000 --batch-tokens 2048 --out $cache/small-qknorm
  [[ -d $cache/small-fullnorm ]] || python benchmarks/train_small_mha.py --qk-norm full --tokens 300000 --batch-tokens 2048 \
    --out $cache/small-fullnorm
  [[ -d $cache/small-plain ]] || python benchmarks/train_small_mha.py --tokens 300000 --batch-tokens 2048 --out $cache/small-plain
fi
if [[ $part == convert || $part == all ]]; then
  for model in qknorm fullnorm plain; do
    for budget in 0.5 0.3334; do
      python benchmarks/dha_vs_baselines.py --setup $cache/small-$model --kv-budget $budget --methods dha,svd,source \
        --tokens 0,16384 --batch-tokens 1024 --second-text "$second" --out $res/qk_norm_${model}_${budget}.json
      # gqa: the group mean of the projections, under the source's shared norm (what ignoring the norm gives)
      python benchmarks/dha_vs_baselines.py --setup $cache/small-$model --kv-budget $budget --methods gqa --tokens 0 \
        --batch-tokens 1024 --second-text "$second" --out $res/qk_norm_gqa_${model}_${budget}.json
    done
  done
fi
if [[ $part == seeds || $part == all ]]; then
  # the close cell (1/2, 16,384 tokens) again with two more seeds, dha and svd
  for seed in 1 2; do
    for model in fullnorm plain; do
      python benchmarks/dha_vs_baselines.py --setup $cache/small-$model --kv-budget 0.5 --methods dha,svd --tokens 16384 \
        --batch-tokens 1024 --second-text "$second" --seed $seed --out $res/qk_norm_seed${seed}_${model}_0.5.json
    done
  done
fi
if [[ $part == table || $part == all ]]; then
  python benchmarks/qk_norm_table.py $res/qk_norm_{,gqa_}{qknorm,plain}_{0.5,0.3334}.json
  python benchmarks/qk_norm_table.py --qk fullnorm $res/qk_norm_{,gqa_}{fullnorm,plain}_{0.5,0.3334}.json
fi
