#!/usr/bin/env bash
# Decode speed: does a smaller KV cache decode faster? SmolLM2-135M against its
# conversions at 1/2 of the KV cache (dha: decoupled, uneven) and at 1/3 (gqa and svd: one K and
# one V head per layer; the dha search has nothing to choose at 1/3, so it gives the same layout),
# no training (speed does not depend on it), timed by `dha bench` in one process, models
# interleaved, ratios to the unconverted model; transformers' LlamaForCausalLM on the same
# weights where a stock class fits.
#
#   bash benchmarks/decode_speed.sh [RUN_DIR]      (THREADS=2 by default; 12-40 minutes on 2 shared cores)
#
# On a machine other jobs share, 2 torch threads can stall each other (OpenMP threads wait for a
# core): then THREADS=1 gives the steadier ratios; the thread count is in each file's name.
#
# Decode points use --decode-only (a cache of random numbers, decode costs the same whatever it
# holds): batch 32 x 2,048 would otherwise spend minutes in prefill per model. Prefill is timed
# on its own at batch 1 and 8. Result files: benchmarks/results/speed_*_t<THREADS>.json (the
# `dha bench` JSON, its command in "command"), plots beside them.
set -euo pipefail
run=${1:-runs/bench-speed}
threads=${THREADS:-2}
res=benchmarks/results
mkdir -p "$run"
convert() {  # method budget name
  [ -e "$run/$3/dha_config.json" ] || python -m dha convert --method "$1" --kv-budget "$2" --tokens 0 --out "$run/$3" --json
}
convert dha 0.5 dha-half
convert gqa 0.34 gqa-third
convert svd 0.34 svd-third
bench() {  # name, then dha bench arguments
  local name=$1; shift
  rm -rf "$run/$name"
  python -m dha bench "$@" --threads "$threads" --out "$run/$name" | head -n -1  # the table, not the JSON line
  python - "$run/$name/bench.json" "$res/speed_${name}_t$threads.json" "python -m dha bench $* --threads $threads" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
report["command"] = sys.argv[3]
json.dump(report, open(sys.argv[2], "w"), indent=1)
PY
  cp "$run/$name/decode_vs_context.png" "$res/speed_${name}_t$threads.png"
}
m="smollm2-135m $run/dha-half $run/gqa-third $run/svd-third"
# The headline point: batch 8, a 1,024-token context, fp32.
bench b8_1k_fp32 $m --transformers --batch-sizes 8 --contexts 1024 --new-tokens 8 --repeats 3 --decode-only
# The grid, fp32 and bf16 (the CPU has avx512_bf16 here).
bench grid_fp32 smollm2-135m $run/dha-half $run/gqa-third --transformers --batch-sizes 1,8,32 --contexts 512,2048 \
  --new-tokens 8 --repeats 2 --decode-only
bench grid_bf16 smollm2-135m $run/dha-half $run/gqa-third --dtype bfloat16 --batch-sizes 8,32 --contexts 512,2048 \
  --new-tokens 8 --repeats 2 --decode-only
# Prefill, timed (real prompts), at batch 1 and 8.
bench prefill_fp32 smollm2-135m $run/dha-half $run/gqa-third --transformers --batch-sizes 1,8 --contexts 512 \
  --new-tokens 4 --repeats 2
