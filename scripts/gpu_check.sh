#!/usr/bin/env bash
# The checks that need a GPU, for a machine with one (under 5 minutes on one GPU):
#   1. the tests marked `cuda` (tests/test_cuda.py: every verb with --device cuda, conversions,
#      evaluation and generation on CUDA against the CPU);
#   2. one small end-to-end run on the built-in SmolLM2-135M: `dha convert --method dha` at half
#      its KV cache with 8,192 training tokens (attention distillation on), then `dha eval` of the source beside the result,
#      both with --device cuda;
#   3. the same conversion without training, with --offload: the model in CPU memory, one layer at
#      a time on the GPU (its peak GPU memory is printed); a summary line at the end.
# Usage: scripts/gpu_check.sh [DEVICE]   (DEVICE: cuda (default) or cuda:N). Exit status 0 = all passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${1:-cuda}
BUDGET_S=300
start=$SECONDS

"$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA GPU here')"
"$PYTHON" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"

echo "gpu_check: [1/4] pytest -m cuda"
"$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/
tests_s=$((SECONDS - start))

work=$(mktemp -d "${TMPDIR:-/tmp}/dha-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "gpu_check: [2/4] dha convert --method dha --device $DEVICE"
t0=$SECONDS
"$PYTHON" -m dha convert --device "$DEVICE" --method dha --kv-budget 0.5 --tokens 8192 --batch-tokens 1024 \
    --calib-tokens 2048 --attention-distill 1 --no-progress --json --out "$work/dha" > "$work/convert.json"
convert_s=$((SECONDS - t0))

echo "gpu_check: [3/4] dha eval --device $DEVICE (source beside the converted model)"
t0=$SECONDS
"$PYTHON" -m dha eval smollm2-135m --compare "$work/dha" --device "$DEVICE" --max-eval-tokens 8192 \
    --batch-sizes 1,8 --context 256 --new-tokens 32 --json > "$work/eval.json"
eval_s=$((SECONDS - t0))

echo "gpu_check: [4/4] dha convert --method dha --tokens 0 --offload --device $DEVICE (one layer at a time on the GPU)"
t0=$SECONDS
"$PYTHON" - "$DEVICE" "$work/offload" > "$work/offload.json" <<'PY'
import sys, torch
from dha.cli import main
device, out = sys.argv[1:]
torch.cuda.reset_peak_memory_stats(device)
code = main(["convert", "--device", device, "--offload", "--method", "dha", "--kv-budget", "0.5", "--tokens", "0",
             "--calib-tokens", "2048", "--out", out, "--json"])
print(f"gpu_check: --offload peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB", file=sys.stderr)
sys.exit(code)
PY
offload_s=$((SECONDS - t0))
total_s=$((SECONDS - start))

"$PYTHON" - "$work/convert.json" "$work/eval.json" "$work/offload.json" "$tests_s" "$convert_s" "$eval_s" "$offload_s" "$total_s" "$BUDGET_S" <<'PY'
import json, math, sys

convert_path, eval_path, offload_path, tests_s, convert_s, eval_s, offload_s, total_s, budget_s = sys.argv[1:]
convert = json.loads(open(convert_path).read().strip().splitlines()[-1])
report = json.loads(open(eval_path).read().strip().splitlines()[-1])
offload = json.loads(open(offload_path).read().strip().splitlines()[-1])
source, converted = report["models"]
def number(key, spec):
    value = convert.get(key)
    return "n/a" if value is None else format(value, spec)


print(f"gpu_check: device {report['device']}, {source['dtype']} | convert: KV {number('kv_bytes_per_token_bf16_before', ',')} -> "
      f"{number('kv_bytes_per_token_bf16_after', ',')} B/token bf16, ppl (pipeline table) {number('source_ppl', '.2f')} -> {number('ppl', '.2f')}")
for m in (source, converted):
    print(f"gpu_check: eval {m['source']}: ppl {m['ppl']:.2f}, KV {m['kv_bytes_per_token']:,} B/token, "
          f"decode {m['decode_tokens_per_s']:,.0f} tok/s at batch {m['decode_batch_size']}")
print(f"gpu_check: --offload convert, no training: KV {offload['kv_bytes_per_token_bf16_before']:,} -> "
      f"{offload['kv_bytes_per_token_bf16_after']:,} B/token bf16, ppl (pipeline table) {offload['source_ppl']:.2f} -> {offload['ppl']:.2f}")
print(f"gpu_check: seconds: tests {tests_s}, convert {convert_s}, eval {eval_s}, offload convert {offload_s}, total {total_s} "
      f"(budget {budget_s})")
problems = []
if not report["device"].startswith("cuda"):
    problems.append(f"eval ran on {report['device']}, not CUDA")
if not all(math.isfinite(m["ppl"]) for m in (source, converted)):
    problems.append("a perplexity is not finite")
if converted["kv_bytes_per_token"] * 2 > source["kv_bytes_per_token"]:
    problems.append("the converted model's KV cache is not at most half the source's")
if not (math.isfinite(offload["ppl"]) and offload["kv_bytes_per_token_bf16_after"] * 2 <= offload["kv_bytes_per_token_bf16_before"]):
    problems.append("the --offload conversion's perplexity is not finite or its KV cache not at most half the source's")
if int(total_s) > int(budget_s):
    problems.append(f"took {total_s} s, over the {budget_s} s budget")
for p in problems:
    print(f"gpu_check: FAILED: {p}")
print("gpu_check: " + ("FAILED" if problems else "all passed"))
sys.exit(1 if problems else 0)
PY
