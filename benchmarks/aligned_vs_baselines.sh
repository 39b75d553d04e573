#!/usr/bin/env bash
# DHA with the aligned merge, with distillation, against the baselines
# and the old mean-target DHA, at equal KV bytes and equal training tokens (the same loop and
# settings for every method: dha's default lr (1.5e-4 since the recipe sweep; the first
# result files of this script used 3e-4, as their train settings say), batches of 1,024 tokens in 256-token blocks, distillation
# from the source on for every method). Held-out perplexity on the built-in pydoc text and on a
# second text nothing trains or calibrates on (Linux man pages, section 1), both as ratios to the
# source. 2 CPU cores, fp32; the whole grid is many hours: run the parts you need.
#   bash benchmarks/aligned_vs_baselines.sh [notrain|train16k|seeds|long|free|rest|all]
# "free": the dha rows again since position-free key pairs became the default (the dha rows of the
# other parts' result files made before then are what dha+exactpairs is now: their "note" says so).
# The tie rule that came after (a key group that exact maps fit as well keeps them) changes only
# such groups: tie_groups.py counts them, none at 1/3, so the 1/3 rows were not run again.
set -euo pipefail
part=${1:-notrain}
cd "$(dirname "$0")/.."
second=${DHA_SECOND_TEXT:-$HOME/.cache/dha/man1.txt}
[[ -f $second ]] || python benchmarks/man_pages_text.py --out "$second"
bench="python benchmarks/dha_vs_baselines.py --batch-tokens 1024 --second-text $second"
res=benchmarks/results
if [[ $part == notrain || $part == all ]]; then
  # No training: the closed forms alone (TransMLA's training-free bar: 3.3x at 1/3, 2.2x at 1/2)
  $bench --kv-budget 0.5 --methods dha,dha+plain,dha+mean,dha+nosensitivity,svd,gqa,prune --tokens 0 --out $res/smollm2_half_0.json
  $bench --kv-budget 0.3334 --methods dha,dha+plain,dha+mean,svd,gqa,prune --tokens 0 --out $res/smollm2_third_0.json
  $bench --setup mha-permuted --kv-budget 0.2223 --methods dha,svd --tokens 0 --out $res/mha_permuted_2of9_0.json
  $bench --setup mha-permuted --kv-budget 0.4445 --methods dha,svd --tokens 0 --out $res/mha_permuted_4of9_0.json
fi
if [[ $part == train16k || $part == all ]]; then
  $bench --kv-budget 0.5 --methods dha,svd,source,gqa,prune,dha+mean --tokens 16384 --out $res/smollm2_half_16k.json
  $bench --kv-budget 0.3334 --methods dha,svd,gqa,source,prune,dha+mean --tokens 16384 --out $res/smollm2_third_16k.json
fi
if [[ $part == seeds || $part == all ]]; then
  for seed in 1 2; do
    $bench --kv-budget 0.3334 --methods dha,svd --tokens 16384 --seed $seed --out $res/smollm2_third_16k_seed$seed.json
  done
  # the learning rate before the recipe sweep, for the two closest methods
  $bench --kv-budget 0.3334 --methods dha,svd --tokens 16384 --lr 3e-4 --out $res/smollm2_third_16k_lr3e-4.json
  for m in dha svd; do  # and without distillation (the runs of mean_target_vs_baselines.sh had none)
    $bench --kv-budget 0.3334 --methods $m --tokens 16384 --no-distill --out $res/smollm2_third_16k_nodistill_$m.json
  done
fi
if [[ $part == long || $part == all ]]; then
  # the 200k cell first (dha's excess over the trained control against svd's), then 50k
  $bench --kv-budget 0.3334 --methods dha,svd,source --tokens 200000 --out $res/smollm2_third_200k.json
  $bench --kv-budget 0.3334 --methods dha,svd,source,gqa,prune --tokens 50000 --out $res/smollm2_third_50k.json
fi
if [[ $part == free || $part == all ]]; then
  python benchmarks/tie_groups.py --out $res/tie_groups.json
  $bench --kv-budget 0.3334 --methods dha --tokens 0 --out $res/smollm2_third_0_free.json
  $bench --kv-budget 0.5 --methods dha,dha+exactpairs --tokens 0 --out $res/smollm2_half_0_free.json
  $bench --setup mha-permuted --kv-budget 0.2223 --methods dha --tokens 0 --out $res/mha_permuted_2of9_0_free.json
  $bench --setup mha-permuted --kv-budget 0.4445 --methods dha --tokens 0 --out $res/mha_permuted_4of9_0_free.json
  $bench --kv-budget 0.3334 --methods dha --tokens 200000 --out $res/smollm2_third_200k_free.json
  for seed in 0 1 2; do
    $bench --kv-budget 0.3334 --methods dha --tokens 16384 --seed $seed --out $res/smollm2_third_16k_free_seed$seed.json
  done
fi
if [[ $part == rest || $part == all ]]; then
  # the seeds of the 1/2 cell at 16k, the MHA-expanded model with training, and 1/2 at 50k
  for seed in 1 2; do
    $bench --kv-budget 0.5 --methods dha,svd --tokens 16384 --seed $seed --out $res/smollm2_half_16k_seed$seed.json
  done
  $bench --setup mha-permuted --kv-budget 0.2223 --methods dha,svd --tokens 16384 --out $res/mha_permuted_2of9_16k.json
  $bench --setup mha-permuted --kv-budget 0.4445 --methods dha,svd --tokens 16384 --out $res/mha_permuted_4of9_16k.json
  $bench --kv-budget 0.5 --methods dha,svd,source --tokens 50000 --out $res/smollm2_half_50k.json
fi
