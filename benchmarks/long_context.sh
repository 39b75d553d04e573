#!/usr/bin/env bash
# Long context: SmolLM2-135M (8,192 positions) at half its KV cache, converted without training and
# with the demo's 24,576 tokens, short rows against long ones; each model scored on Linux man pages
# (a text nothing trains or calibrates on) by position over 8,192-token windows, and by passkey
# retrieval through its KV cache at 2,048, 4,096 and 8,192 tokens (synthetic haystack, 5 depths
# from 8% to 92%). One thread per job (OMP_NUM_THREADS=1), so that two jobs share the 2 cores
# without oversubscribing them. Many hours on 2 cores: run the parts you need.
#   bash benchmarks/long_context.sh [convert|eval|heads|llama|all]
set -euo pipefail
part=${1:-convert}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
runs=${RUNS:-runs/long}
man=${DHA_SECOND_TEXT:-$HOME/.cache/dha/man1_400.txt}
res=benchmarks/results
[[ -f $man ]] || python benchmarks/man_pages_text.py --pages 400 --out "$man"
mkdir -p "$runs"
if [[ $part == convert || $part == all ]]; then
  # no training: the default, and the nine strongest retrieval key heads kept out of every merge
  python -m dha convert --method dha --kv-budget 0.5 --tokens 0 --out $runs/dha0
  python -m dha convert --method dha --kv-budget 0.5 --tokens 0 --retrieval-heads 9 --out $runs/dha0_rh9
  for pairs in 0 5; do  # position-free key pairs: none, and those turning <= 0.5 rad over 8,192 tokens
    python -m dha convert --method dha --kv-budget 0.5 --tokens 0 --free-pairs $pairs --out $runs/dha0_fp$pairs
  done
  # the demo's budget with those groups, on rows of 2,048 and 8,192 tokens (batches of 4,096 and
  # 8,192 tokens: 6 and 3 steps), distilled from the source
  for ctx in 2048 8192; do
    python -m dha convert --method dha --plan $runs/dha0_rh9/plan.json --context $ctx --tokens 24576 \
      --no-progress --out $runs/rh9_ctx$ctx
  done
  # the long-context recipe: rows of 2,048 tokens (12 steps of one row) with the position-free pairs
  # of the model's 8,192 positions (5, the default; 0 for comparison), on the plan keeping the
  # nine retrieval key heads and their value heads, and on the default plan
  python -m dha convert --method dha --kv-budget 0.5 --tokens 0 --retrieval-heads 9 --protect-values --out $runs/dha0_pv
  python -m dha convert --method dha --kv-budget 0.5 --tokens 0 --retrieval-heads 9 --protect-values --free-pairs 0 \
    --out $runs/dha0_pv_fp0
  rows="--calib-block-size 2048 --calib-tokens 4096 --block-size 2048 --micro-batch 1 --batch-tokens 2048 --tokens 24576"
  python -m dha convert --method dha --plan $runs/dha0_pv/plan.json $rows --no-progress --out $runs/pv2k_fp5
  python -m dha convert --method dha --plan $runs/dha0_pv_fp0/plan.json --free-pairs 0 $rows --no-progress \
    --out $runs/pv2k_fp0
  python -m dha convert --method dha --plan $runs/dha0_fp5/plan.json $rows --no-progress --out $runs/plain2k_fp5
  # the control (the source trained the same way, no distillation) and svd (1/3: its uniform rounding of 1/2)
  python -m dha train smollm2-135m --block-size 2048 --batch-tokens 2048 --micro-batch 1 --tokens 24576 --no-progress \
    --out $runs/control2k
  python -m dha convert --method svd --kv-budget 0.5 $rows --distill --no-progress --out $runs/svd2k
  # the search's costs on 2,048-token calibration blocks (no training); a longer budget: 98,304 tokens
  # (4x the demo's: 48 steps of one 2,048-token row) for the no-pairs recipe
  python -m dha convert --method dha --kv-budget 0.5 --tokens 0 --calib-block-size 2048 --calib-tokens 4096 \
    --no-progress --out $runs/dha0_search2k
  python -m dha convert --method dha --plan $runs/dha0_pv_fp0/plan.json --free-pairs 0 --context 2048 --calib-tokens 4096 \
    --tokens 98304 --batch-tokens 2048 --no-progress --out $runs/pv2k_fp0_98k
  # the same 98,304 tokens on rows of 8,192 (12 steps of one row, activation checkpointing on)
  python -m dha convert --method dha --plan $runs/dha0_pv_fp0/plan.json --free-pairs 0 --context 8192 --calib-tokens 8192 \
    --tokens 98304 --batch-tokens 8192 --no-progress --out $runs/pv8k_fp0_98k
  # 49,152 more distilled tokens in rows of 8,192 (6 steps, `dha train`): on the 2,048-row model, and on
  # the 8,192-row one (147,456 tokens in all)
  long="--distill --teacher smollm2-135m --block-size 8192 --batch-tokens 8192 --micro-batch 1 --tokens 49152 --seed 1"
  python -m dha train $runs/pv2k_fp0_98k $long --lr 7.5e-5 --no-progress --out $runs/pv2k_then8k
  python -m dha train $runs/pv8k_fp0_98k $long --lr 1e-4 --no-progress --out $runs/pv8k_more
  # skipped positions (PoSE): rows of 2,048 tokens whose positions spread over 8,192 (--context 8192
  # --block-size 2048), the demo's budget (two seeds) and 4x; rows of 256 tokens (the demo's) spread
  # over 8,192; the control: the source trained the same way, no distillation
  pose="--plan $runs/dha0_pv_fp0/plan.json --free-pairs 0 --context 8192 --block-size 2048 --calib-tokens 4096 --batch-tokens 2048"
  for seed in 0 1; do
    python -m dha convert --method dha $pose --tokens 24576 --seed $seed --no-progress --out $runs/pose2k_24k_s$seed
  done
  python -m dha convert --method dha $pose --tokens 98304 --no-progress --out $runs/pose2k_98k
  python -m dha convert --method dha --plan $runs/dha0_pv_fp0/plan.json --free-pairs 0 --tokens 24576 --batch-tokens 1024 \
    --position-span 8192 --no-progress --out $runs/pose256_24k
  python -m dha train smollm2-135m --block-size 2048 --batch-tokens 2048 --micro-batch 1 --tokens 24576 --position-span 8192 \
    --no-progress --out $runs/control_pose2k
  # 98,304 more distilled tokens on the same rows and positions (196,608 in all)
  python -m dha train $runs/pose2k_98k --distill --teacher smollm2-135m --block-size 2048 --batch-tokens 2048 --micro-batch 1 \
    --position-span 8192 --tokens 98304 --seed 1 --lr 1e-4 --no-progress --out $runs/pose2k_196k
  # 98,304 tokens: a second seed; distillation alone (--distill-weight 1: no LM loss on the training
  # text); the retrieval heads found on passkey prompts of 8,192 tokens instead of 2,048
  python -m dha convert --method dha $pose --tokens 98304 --seed 1 --no-progress --out $runs/pose2k_98k_s1
  python -m dha convert --method dha $pose --tokens 98304 --distill-weight 1.0 --no-progress --out $runs/pose2k_98k_kd
  python -m dha convert --method dha --kv-budget 0.5 --tokens 0 --retrieval-heads 9 --protect-values --retrieval-length 8192 \
    --free-pairs 0 --out $runs/dha0_pv8k_fp0
  python -m dha convert --method dha ${pose/dha0_pv_fp0/dha0_pv8k_fp0} --tokens 98304 --no-progress --out $runs/pose2k_98k_rl8k
  # a third seed; attention distillation (--attention-distill 1: the KL to the source's attention of
  # each row's last 256 queries, in every layer), seeds 0 and 1
  python -m dha convert --method dha $pose --tokens 98304 --seed 2 --no-progress --out $runs/pose2k_98k_s2
  for seed in 0 1; do
    python -m dha convert --method dha $pose --tokens 98304 --seed $seed --attention-distill 1 --no-progress \
      --out $runs/akd_98k_s$seed
  done
  python -m dha convert --method dha $pose --tokens 24576 --seed 1 --attention-distill 1 --no-progress --out $runs/akd_24k_s1
  # attention distillation on rows of 8,192 (98,304 tokens: 12 steps of one row; blocks checkpointed and
  # the loss's logits made a chunk at a time); skipped positions with a third of the weight, seed 1
  python -m dha convert --method dha --plan $runs/dha0_pv_fp0/plan.json --free-pairs 0 --context 8192 --calib-tokens 8192 \
    --tokens 98304 --batch-tokens 8192 --attention-distill 1 --no-progress --out $runs/akd8k_98k
  python -m dha convert --method dha $pose --tokens 98304 --seed 1 --attention-distill 0.3 --no-progress \
    --out $runs/akd03_98k_s1
  # weight 0.3 on seed 0; and on seed 1 with the far term beside it (the KL over the keys 2,048 positions
  # back or more, each model's attention renormalized over them: --far-attention-distill 2)
  python -m dha convert --method dha $pose --tokens 98304 --seed 0 --attention-distill 0.3 --no-progress \
    --out $runs/akd03_98k_s0
  python -m dha convert --method dha $pose --tokens 98304 --seed 1 --attention-distill 0.3 --far-attention-distill 2 \
    --no-progress --out $runs/far2_98k_s1
  # recall spans: the last 256 tokens of each row repeat 256 tokens of its first part (seeds 0, 1, 2)
  for seed in 0 1 2; do
    python -m dha convert --method dha $pose --tokens 98304 --seed $seed --attention-distill 0.3 --recall-tokens 256 \
      --no-progress --out $runs/recall256_98k_s$seed
  done
  # weight 0.3 at the demo's budget (24,576 tokens), seed 1; and with recall spans of 256
  python -m dha convert --method dha $pose --tokens 24576 --seed 1 --attention-distill 0.3 --no-progress \
    --out $runs/akd03_24k_s1
  for seed in 1 0; do
    python -m dha convert --method dha $pose --tokens 24576 --seed $seed --attention-distill 0.3 --recall-tokens 256 \
      --no-progress --out $runs/recall256_24k_s$seed
  done
  # the demo's budget at 3x the learning rate (12 steps: does a larger step make up for fewer?), and half the
  # long budget (49,152 tokens), seeds 0 and 1
  for seed in 0 1; do
    python -m dha convert --method dha $pose --tokens 24576 --seed $seed --attention-distill 0.3 --recall-tokens 256 \
      --lr 4.5e-4 --no-progress --out $runs/recall256_24k_lr45_s$seed
    python -m dha convert --method dha $pose --tokens 49152 --seed $seed --attention-distill 0.3 --recall-tokens 256 \
      --no-progress --out $runs/recall256_49k_s$seed
  done
  # the demo's budget in rows of 1,024 tokens (24 steps instead of 12, twice the copies), seeds 0, 1, 2
  for seed in 0 1 2; do
    python -m dha convert --method dha --plan $runs/dha0_pv_fp0/plan.json --free-pairs 0 --context 8192 --block-size 1024 \
      --calib-tokens 4096 --batch-tokens 1024 --tokens 24576 --seed $seed --attention-distill 0.3 --recall-tokens 256 \
      --no-progress --out $runs/recall256_24k_b1k_s$seed
  done
  # the same with the plan searched in the same command (its costs from the 1,024-token blocks)
  python -m dha convert --method dha --kv-budget 0.5 --retrieval-heads 9 --protect-values --free-pairs 0 --context 8192 \
    --block-size 1024 --calib-tokens 4096 --batch-tokens 1024 --tokens 24576 --seed 0 --attention-distill 0.3 \
    --recall-tokens 256 --no-progress --out $runs/one_b1k_s0
  # their control: the source trained on the same rows of 1,024, positions and copies, no distillation
  python -m dha train smollm2-135m --block-size 1024 --batch-tokens 1024 --micro-batch 1 --tokens 24576 \
    --position-span 8192 --recall-tokens 256 --no-progress --out $runs/control_recall256_24k_b1k
  # their final tables (512-token held-out pydoc) and training logs
  python benchmarks/conversion_summaries.py $runs/recall256_24k_lr45_s0 $runs/recall256_24k_lr45_s1 \
    $runs/recall256_49k_s0 $runs/recall256_49k_s1 $runs/recall256_24k_b1k_s0 $runs/recall256_24k_b1k_s1 \
    $runs/recall256_24k_b1k_s2 $runs/one_b1k_s0 --out $res/long_context_recipe_budgets.json
  # the control with recall spans: the source trained on the same rows, positions and copies, no distillation
  python -m dha train smollm2-135m --block-size 2048 --batch-tokens 2048 --micro-batch 1 --tokens 98304 --position-span 8192 \
    --recall-tokens 256 --no-progress --out $runs/control_recall256_98k
  # 1/3 of the cache: one key and one value head per layer, so no head can be kept out of the merges;
  # no training, and the demo's budget on rows of 2,048 with no position-free pairs
  python -m dha convert --method dha --kv-budget 0.3334 --tokens 0 --no-progress --out $runs/third0
  python -m dha convert --method dha --plan $runs/third0/plan.json --free-pairs 0 --context 2048 --calib-tokens 4096 \
    --tokens 24576 --batch-tokens 2048 --no-progress --out $runs/third_2k_fp0
  # the same plan and rows with --context 2048 (so pairs for 2,048 tokens: 8)
  python -m dha convert --method dha --plan $runs/dha0_pv/plan.json --context 2048 --tokens 24576 --batch-tokens 2048 \
    --no-progress --out $runs/pv2k
fi
if [[ $part == eval || $part == all ]]; then
  # per model: 2 windows of 8,192 tokens by position, passkeys at 2,048 (10) and 8,192 (5) tokens,
  # each record appended as it is measured (benchmarks/long_context_lean.py)
  python benchmarks/long_context_lean.py smollm2-135m $runs/rh9_ctx2048 $runs/rh9_ctx8192 --data "$man" \
    --out $res/long_context_half.jsonl
  python benchmarks/long_context_lean.py $runs/dha0 --data "$man" --lengths "" --out $res/long_context_half.jsonl
  python benchmarks/long_context_lean.py $runs/pv2k_fp5 $runs/pv2k_fp0 $runs/plain2k_fp5 $runs/control2k $runs/svd2k \
    --data "$man" --lengths 8192,4096,2048 \
    --per-depth 1 --out $res/long_context_half.jsonl
  python benchmarks/long_context_lean.py $runs/dha0_fp5 $runs/dha0_search2k --data "$man" --lengths "" \
    --out $res/long_context_half.jsonl
  python benchmarks/plot_long_context.py $res/long_context_half.jsonl --out docs/images
  # 20 passkeys per length (4 per depth), the source and the no-pairs recipe at the demo's and a 4x budget
  python benchmarks/long_context_lean.py smollm2-135m $runs/pv2k_fp0 --data "$man" --windows 0 --lengths 2048,4096,8192 \
    --per-depth 4 --far-per-depth 4 --out $res/long_context_half_20.jsonl
  python benchmarks/long_context_lean.py $runs/pv2k_fp0_98k --data "$man" --windows 2 --lengths 2048,4096,8192 \
    --per-depth 4 --far-per-depth 4 --out $res/long_context_half_20.jsonl
  python benchmarks/long_context_lean.py $runs/pv8k_fp0_98k --data "$man" --windows 2 --lengths 2048,4096,8192 \
    --per-depth 4 --far-per-depth 4 --out $res/long_context_half_20.jsonl
  python benchmarks/long_context_lean.py $runs/pv2k_then8k $runs/pv8k_more --data "$man" --windows 2 \
    --lengths 2048,4096,8192 --per-depth 4 --far-per-depth 4 --out $res/long_context_half_20.jsonl
  python -m dha eval $runs/pv2k_fp0_98k --compare $runs/pv2k_then8k $runs/pv8k_fp0_98k $runs/pv8k_more \
    --max-eval-tokens 16384 --batch-sizes 1 --new-tokens 4 --repeats 1  # 512-token windows of held-out pydoc
  for m in pose2k_24k_s0 pose2k_24k_s1 pose2k_98k pose2k_196k pose256_24k control_pose2k pose2k_98k_s1 pose2k_98k_kd \
    pose2k_98k_rl8k pose2k_98k_s2 akd_98k_s0 akd_98k_s1 akd_24k_s1 akd8k_98k akd03_98k_s1 akd03_98k_s0 far2_98k_s1 akd03_24k_s1 \
    recall256_98k_s0 recall256_98k_s1 recall256_98k_s2 control_recall256_98k recall256_24k_s0; do
    python benchmarks/long_context_lean.py $runs/$m --data "$man" --windows 2 --lengths 2048,4096,8192 \
      --per-depth 4 --far-per-depth 4 --out $res/long_context_half_20.jsonl
  done
  python benchmarks/long_context_lean.py $runs/recall256_24k_s1 --data "$man" --windows 0 --lengths 2048,4096,8192 \
    --per-depth 4 --out $res/long_context_half_20.jsonl
  for m in recall256_49k_s0 recall256_49k_s1; do
    python benchmarks/long_context_lean.py $runs/$m --data "$man" --windows 0 --lengths 8192,4096,2048 --per-depth 4 \
      --far-per-depth 4 --out $res/long_context_half_20.jsonl
    python benchmarks/long_context_lean.py $runs/$m --data "$man" --windows 2 --lengths "" --out $res/long_context_half_20.jsonl
  done
  for m in recall256_24k_b1k_s0 recall256_24k_b1k_s1 recall256_24k_b1k_s2 one_b1k_s0 control_recall256_24k_b1k; do
    python benchmarks/long_context_lean.py $runs/$m --data "$man" --windows 0 --lengths 8192,4096,2048 --per-depth 4 \
      --far-per-depth 4 --out $res/long_context_half_20.jsonl
    python benchmarks/long_context_lean.py $runs/$m --data "$man" --windows 2 --lengths "" --out $res/long_context_half_20.jsonl
  done
  # 512-token perplexity of held-out pydoc for the control (a conversion's report has its own)
  python -m dha eval smollm2-135m --compare $runs/control_recall256_98k --batch-sizes 1 --new-tokens 4 --repeats 1 \
    --json > $res/control_recall256_98k_eval512.json
  python -m dha eval smollm2-135m --compare $runs/control_recall256_24k_b1k --batch-sizes 1 --new-tokens 4 --repeats 1 \
    --json > $res/control_recall256_24k_b1k_eval512.json
  python benchmarks/plot_long_context.py $res/long_context_half_20.jsonl --out docs/images \
    --retrieval smollm2-135m,recall256_24k_b1k_s0,recall256_24k_b1k_s1,recall256_24k_b1k_s2,control_recall256_24k_b1k,\
recall256_98k_s0,recall256_98k_s1,recall256_98k_s2,control_recall256_98k
  python benchmarks/long_context_lean.py $runs/third0 --data "$man" --windows 2 --lengths "" --out $res/long_context_third.jsonl
  python benchmarks/long_context_lean.py $runs/third_2k_fp0 --data "$man" --windows 2 --lengths 2048,4096,8192 \
    --per-depth 4 --far-per-depth 4 --out $res/long_context_third.jsonl
  # svd at its 1/3 (the rows of 2,048 above, distilled): 20 passkeys per length
  python benchmarks/long_context_lean.py $runs/svd2k --data "$man" --windows 0 --lengths 8192,4096,2048 \
    --per-depth 4 --far-per-depth 4 --out $res/long_context_third.jsonl
  # one 8,192-token window of man pages (passkeys: 5 per length)
  python benchmarks/long_context_lean.py smollm2-135m --data "$man" --windows 1 --lengths 4096 --per-depth 1 \
    --out $res/long_context_half_man1.jsonl
  python benchmarks/long_context_lean.py $runs/pv2k --data "$man" --windows 1 --lengths 8192,4096,2048 --per-depth 2 \
    --out $res/long_context_half_man1.jsonl
  python benchmarks/long_context_lean.py $runs/pv2k_fp0 --data "$man" --windows 1 --lengths 8192,2048 --per-depth 1 \
    --out $res/long_context_half_man1.jsonl
  # no training, one 8,192-token window of held-out pydoc (the source's row is in rh9_ctx8192's report)
  python benchmarks/long_context_lean.py $runs/dha0 $runs/dha0_rh9 $runs/dha0_fp5 $runs/dha0_fp0 --data pydoc \
    --windows 1 --lengths "" --out $res/long_context_half_pydoc.jsonl
  python benchmarks/long_context_lean.py smollm2-135m --data pydoc --windows 1 --lengths 8192 --per-depth 1 \
    --out $res/long_context_half_pydoc.jsonl
fi
if [[ $part == heads || $part == all ]]; then
  # which key heads carry retrieval, and their attention on the needle after each conversion
  python benchmarks/retrieval_heads.py --length 2048 --prompts 5 --compare $runs/dha0 \
    --out $res/retrieval_heads_half.json
  # the same on passkey prompts of 8,192 tokens, against skipped positions at 98,304 tokens
  python benchmarks/retrieval_heads.py --length 8192 --prompts 5 --top 12 --compare $runs/pose2k_98k \
    --out $res/retrieval_heads_half_8k.json
  python benchmarks/retrieval_heads.py --length 8192 --prompts 5 --top 12 --compare $runs/dha0_pv_fp0 \
    --out $res/retrieval_heads_half_8k_merge.json
  # the same, one prompt at each depth written apart (..._by_depth in the file)
  python benchmarks/retrieval_heads.py --length 8192 --prompts 5 --per-depth 1 --compare $runs/dha0_pv_fp0 \
    --out $res/retrieval_heads_half_8k_merge_by_depth.json
  python benchmarks/retrieval_heads.py --source $runs/pose2k_98k_s1 --length 8192 --prompts 5 --top 12 \
    --out $res/retrieval_heads_half_8k_seed1.json
  # a diagnostic, not a budget: the same plan with layers 14-19 left whole (0.617 of the cache), no training
  python -m dha convert --method dha --plan $res/plan_half_whole14_19.json --free-pairs 0 --tokens 0 --out $runs/diag_whole14_19
  python benchmarks/retrieval_heads.py --source $runs/diag_whole14_19 --length 8192 --prompts 5 --top 12 \
    --out $res/retrieval_heads_half_8k_whole14_19.json
  # after attention distillation (seeds 0 and 1)
  for seed in 0 1; do
    python benchmarks/retrieval_heads.py --source $runs/akd_98k_s$seed --length 8192 --prompts 5 --top 12 \
      --out $res/retrieval_heads_half_8k_akd_s$seed.json
  done
  # by depth, after attention distillation at weight 0.3 (seed 1)
  python benchmarks/retrieval_heads.py --source $runs/akd03_98k_s1 --length 8192 --prompts 5 --per-depth 1 --top 12 \
    --out $res/retrieval_heads_half_8k_akd03_s1.json
  python benchmarks/retrieval_heads.py --source $runs/akd8k_98k --length 8192 --prompts 5 --per-depth 1 --top 12 \
    --out $res/retrieval_heads_half_8k_akd8k.json
  python benchmarks/retrieval_heads.py --source $runs/far2_98k_s1 --length 8192 --prompts 5 --per-depth 1 --top 12 \
    --out $res/retrieval_heads_half_8k_far2_s1.json
  # by depth after recall spans (seed 0); the loss on a 64-token span repeated from 1k-8k tokens back
  python benchmarks/retrieval_heads.py --source $runs/recall256_98k_s0 --length 8192 --prompts 5 --per-depth 1 --top 12 \
    --out $res/retrieval_heads_half_8k_recall_s0.json
  copy="--data $man --windows 2 --distances 1024,4096,7168"
  python benchmarks/copy_by_distance.py smollm2-135m $runs/akd03_98k_s0 $runs/recall256_98k_s0 $copy \
    --out $res/copy_by_distance_half_s0.json
  python benchmarks/copy_by_distance.py $runs/akd03_98k_s1 $runs/recall256_98k_s1 $copy \
    --out $res/copy_by_distance_half_s1.json
  python benchmarks/copy_by_distance.py $runs/recall256_98k_s2 $copy --out $res/copy_by_distance_half_s2.json
  # the same with layers 0-13, 0-6 or 7-13 left whole (0.767, 0.622, 0.644 of the cache)
  for whole in 0_13 0_6 7_13; do
    python -m dha convert --method dha --plan $res/plan_half_whole$whole.json --free-pairs 0 --tokens 0 \
      --out $runs/diag_whole$whole
    python benchmarks/retrieval_heads.py --source $runs/diag_whole$whole --length 8192 --prompts 5 --top 12 \
      --out $res/retrieval_heads_half_8k_whole$whole.json
  done
fi
if [[ $part == llama || $part == all ]]; then
  # the same measures in llama.cpp on the GGUF export, f16 and q8_0 KV caches, flash attention on
  python benchmarks/long_context_llama_cpp.py $runs/dha0 --data "$man" --window 8192 --windows 1 \
    --lengths 2048,8192 --depths 5 --per-depth 1 --out $res/long_context_llama_cpp.json
  # the recipe's model in llama.cpp's layout: the KV bytes a token after --pad (printed by the export)
  python -m dha export $runs/recall256_98k_s0 --format gguf --pad --outtype f16 --out $runs/recall256_98k_s0.gguf
  # the recipe's model itself, run as the "source" (its own export, padded): f16 cache, one 8,192-token window, 5
  # passkeys at 8,192 (the source's side is the no-training run above)
  python benchmarks/long_context_llama_cpp.py --source $runs/recall256_98k_s0 --data "$man" --window 8192 --windows 1 \
    --lengths 8192 --depths 5 --per-depth 1 --cache-types f16 --threads 1 --out $res/long_context_llama_cpp_recipe_8k.json
fi
