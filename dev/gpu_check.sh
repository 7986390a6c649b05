#!/usr/bin/env bash
# Everything we check on a lent GPU, in one call of under 10 minutes (a lent GPU's time is short):
#   bash dev/gpu_check.sh                    # decode and train; logs and tables in $OUT (default out-gpu-check/)
#   COMPILE=False bash dev/gpu_check.sh train train-compiled   # training all eager, then phase 1 compiled
#   bash dev/gpu_check.sh graph decode         # CUDA-graphed training steps against eager, then decode
#   bash dev/gpu_check.sh ouro                 # phase 2 at Ouro-1.4B's shapes: peak memory, tok/s
# 1. dev/gpu_check.py: the CUDA-graph decode step against the eager one, decode tok/s eager vs
#    CUDA graphs, the card's bf16 matrix rate.
# 2. The one-GPU configs (config/gpu_*.py), shortened, as a user runs them (bf16,
#    compiled where the config says so, or as COMPILE says): the LoopLM teacher, MELT's phase 1
#    and phase 2, then sample.py --compile on the result. Their train tok/s and MFU give the time the full GPU runs would take.
# Each part gets at most its share of the time left; a part cut off is reported as such.
set -uo pipefail
cd "$(dirname "$0")/.."
O=${OUT:-out-gpu-check}
R=${RUNS:-$O/runs}   # checkpoints (large: keep them out of a folder whose files you copy back)
mkdir -p "$R"
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-540}   # seconds for the whole script
part() {   # part NAME CAP COMMAND...: run with a timeout of min(CAP, time left), log to $O/NAME.txt
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - SECONDS )); local t=$(( cap < left ? cap : left ))
  if (( t < 10 )); then echo "== $name: skipped, no time left"; return; fi
  echo "== $name (at most $t s): $*"
  local t0=$SECONDS
  timeout "$t" "$@" > >(tr '\r' '\n' > "$O/$name.txt") 2>&1
  local rc=$?
  sleep 1
  echo "== $name: exit $rc after $(( SECONDS - t0 )) s$( (( rc == 124 )) && echo ' (cut off)')"
  grep -E '^\||TFLOP|final:|stats:|model:|student:|timed micro|peak GPU|error|Error|skipping cudagraphs' "$O/$name.txt" | tail -30
  # the last progress line: train tok/s and MFU once compiled
  grep -E 'tok_s' "$O/$name.txt" | tail -1 | cut -c1-400
}

WHAT=${*:-decode train}   # parts: decode, train, train-compiled (phase 1 compiled after an eager train)
C=${COMPILE:+--compile=$COMPILE}   # train: unset, as each config says; True / False for all runs
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$O/gpu.txt"
for w in $WHAT; do case $w in
decode)
  part decode 220 python dev/gpu_check.py ;;
train)
  part looplm 120 python train.py config/gpu_looplm.py --max_iters=100 --eval_interval=100 --eval_iters=5 \
      --log_interval=20 --sample_tokens=0 $C --out_dir="$R/looplm"
  part phase1 150 python train.py config/gpu_transition.py --init_from="$R/looplm/ckpt.pt" --max_iters=40 \
      --alpha_steps=40 --eval_interval=40 --eval_iters=5 --log_interval=10 --sample_tokens=0 $C \
      --out_dir="$R/phase1"
  part phase2 100 python distill.py config/gpu_distill.py --teacher="$R/looplm/ckpt.pt" \
      --init_from="$R/phase1/ckpt.pt" --max_iters=30 --eval_interval=30 --eval_iters=5 --log_interval=10 \
      $C --out_dir="$R/phase2"
  part sample 120 python sample.py --init_from="$R/phase2/ckpt.pt" --compile=True --max_new_tokens=200 --stream=False ;;
train-compiled)   # how long the chunk-wise transition takes to compile, and its speed after
  part phase1_compiled 400 python train.py config/gpu_transition.py --init_from="$R/looplm/ckpt.pt" \
      --max_iters=40 --alpha_steps=40 --eval_interval=40 --eval_iters=5 --log_interval=10 --sample_tokens=0 \
      --compile=True --out_dir="$R/phase1_compiled" ;;
graph)   # train.py's cuda_graph=True against eager, one after the other on the same batches: a short
  # LoopLM, then from it phase 1 (alpha 0 -> 1 over 20 of 40 steps: eager until alpha reaches 1, then
  # recorded), phase 2 from that phase 1, MELT from scratch, and the LoopLM itself recorded
  G="--eval_iters=5 --log_interval=10 --sample_tokens=0 --compile=False"
  both() {   # both NAME CAP COMMAND...: the command eager, then with --cuda_graph=True
    local n=$1 cap=$2; shift 2
    part ${n}_eager $cap "$@" --cuda_graph=False --out_dir="$R/${n}_eager"   # (gpu_distill, gpu_melt record by default)
    part ${n}_graph $cap "$@" --cuda_graph=True --out_dir="$R/${n}_graph"
  }
  part g_looplm 90 python train.py config/gpu_looplm.py --max_iters=60 --eval_interval=60 $G --out_dir="$R/g_looplm"
  both g_phase1 120 python train.py config/gpu_transition.py --init_from="$R/g_looplm/ckpt.pt" \
      --max_iters=40 --alpha_steps=20 --eval_interval=40 $G
  both g_phase2 100 python distill.py config/gpu_distill.py --teacher="$R/g_looplm/ckpt.pt" \
      --init_from="$R/g_phase1_eager/ckpt.pt" --max_iters=30 --eval_interval=30 $G
  both g_melt 100 python train.py config/gpu_melt.py --max_iters=40 --eval_interval=40 $G
  part g_looplm_graph 90 python train.py config/gpu_looplm.py --max_iters=60 --eval_interval=60 $G --cuda_graph=True \
      --out_dir="$R/g_looplm_graph" ;;
ouro)   # Ouro-1.4B-shaped teacher -> MELT-1.6B, 2,048 tokens, config/ouro_distill.py (checkpoint_mlp on)
  part ouro 300 python dev/ouro_step.py ;;
*) echo "unknown part $w"; exit 2 ;;
esac; done
echo "total $SECONDS s"
