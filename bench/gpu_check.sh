#!/usr/bin/env bash
# Everything we check on a lent GPU, in one call of under 10 minutes (a lent GPU's time is short):
#   bash bench/gpu_check.sh                    # decode and train; logs and tables in $OUT (default out-gpu-check/)
#   COMPILE=False bash bench/gpu_check.sh train train-compiled   # training all eager, then phase 1 compiled
#   bash bench/gpu_check.sh train reasoning      # ... then the reasoning sweep (12 small runs at once)
#   bash bench/gpu_check.sh reasoning-batch      # the reasoning task at batch 256, every variable asked
#   bash bench/gpu_check.sh graph decode         # CUDA-graphed training steps against eager, then decode
# 1. bench/gpu_check.py: the CUDA-graph decode step against the eager one, decode tok/s eager vs
#    CUDA graphs, the card's bf16 matrix rate.
# 2. The one-GPU configs of bench/reproduce.sh (GPU=1), shortened, as a user runs them (bf16,
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
  grep -E '^\||TFLOP|final:|stats:|model:|error|Error|skipping cudagraphs' "$O/$name.txt" | tail -30
  # the last progress line: train tok/s and MFU once compiled
  grep -E 'tok_s' "$O/$name.txt" | tail -1 | cut -c1-400
}

sweep() {   # sweep DIR NAME DATA CONFIG ARGS...: one reasoning run in the background, answer-only, eager,
  # accuracy every 500 steps, cut off when the script's time is up ($left); its log in $R/DIR/NAME
  local dir=$1 n=$2 d=$3 c=$4; shift 4
  ( timeout $left python train.py config/$c.py --dataset=$d --answer_only=True --eval_interval=500 --eval_iters=5 \
      --log_interval=100 --sample_tokens=0 --compile=False "$@" --out_dir="$R/$dir/$n" > "$R/${dir}_$n.txt" 2>&1 ) &
}
sweep_report() {   # sweep_report DIR FILES...: step:accuracy of each run, then its logs (and FILES) in one
  # archive under $O: a lent GPU returns at most 8 files
  local dir=$1; shift
  wait
  for f in "$R/$dir"/*/log.jsonl; do
    echo "$(basename "$(dirname "$f")"): $(python -c "import json,sys; print(' '.join(f\"{d['step']}:{d.get('task_acc')}\" for d in map(json.loads, open(sys.argv[1]))))" "$f")"
  done
  tar czf "$O/$dir.tgz" -C "$R" $(cd "$R" && ls ${dir}_*.txt "$dir"/*/log.jsonl $@ 2>/dev/null)   # $@ unquoted: globs in $R
}

WHAT=${*:-decode train}   # parts: decode, train, train-compiled (phase 1 compiled after an eager train)
C=${COMPILE:+--compile=$COMPILE}   # train: unset, as each config says; True / False for all runs
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$O/gpu.txt"
for w in $WHAT; do case $w in
decode)
  part decode 220 python bench/gpu_check.py ;;
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
reasoning)   # which small models learn the lookup tasks: many short runs at once (the GPU is mostly idle
  # for these sizes), answer-only loss, task accuracy every 500 steps in each run's log.jsonl; with
  # sample.py --compile on the phase-2 checkpoint of `train` beside them (its timing is not clean)
  for h in 0 1; do [ -f data/reasoning_h${h}_big/meta.json ] || \
      python data/prepare.py --name=reasoning_h${h}_big --hops=$h --n_train=400000; done
  left=$(( BUDGET - SECONDS - 15 ))
  [ -f "$R/phase2/ckpt.pt" ] && timeout $(( left < 200 ? left : 200 )) python sample.py \
      --init_from="$R/phase2/ckpt.pt" --compile=True --max_new_tokens=200 --stream=False > "$O/sample_compile.txt" 2>&1 &
  H0=reasoning_h0_big; H1=reasoning_h1_big
  sweep rs h0_std_b16 $H0 cpu_standard --max_iters=3000
  sweep rs h0_std_b64 $H0 cpu_standard --max_iters=3000 --batch_size=64
  sweep rs h0_std_b64_lr1e-3 $H0 cpu_standard --max_iters=3000 --batch_size=64 --lr=1e-3 --min_lr=1e-4
  sweep rs h0_std_b64_l4 $H0 cpu_standard --max_iters=3000 --batch_size=64 --n_layer=4
  sweep rs h0_std_b64_w256 $H0 cpu_standard --max_iters=3000 --batch_size=64 --n_embd=256
  sweep rs h0_std_b64_fullloss $H0 cpu_standard --max_iters=3000 --batch_size=64 --answer_only=False
  sweep rs h0_std_8x512 $H0 gpu_standard --max_iters=1000 --lr=5e-4 --min_lr=5e-5
  sweep rs h1_std_b64 $H1 cpu_standard --max_iters=3000 --batch_size=64
  sweep rs h1_std_b64_l4 $H1 cpu_standard --max_iters=3000 --batch_size=64 --n_layer=4
  sweep rs h1_loop_b64 $H1 cpu_looplm --max_iters=2000 --batch_size=64
  sweep rs h1_loop_b64_lr1e-3 $H1 cpu_looplm --max_iters=2000 --batch_size=64 --lr=1e-3 --min_lr=1e-4
  sweep rs h1_std_8x512 $H1 gpu_standard --max_iters=1000 --lr=5e-4 --min_lr=5e-5
  sweep_report rs
  grep -E 'stats|compil|error|Error' "$O/sample_compile.txt" | tail -5 ;;
reasoning-batch)   # the same question with 4x the batch (256 x 128 tokens) and every variable of a line
  # asked (data/prepare.py --all_queries=1: questions of every depth, a curriculum inside the data)
  for h in 0 1 2; do [ -f data/reasoning_h${h}_aq/meta.json ] || \
      python data/prepare.py --name=reasoning_h${h}_aq --hops=$h --all_queries=1 --n_train=200000; done
  [ -f data/reasoning_h0_big/meta.json ] || python data/prepare.py --name=reasoning_h0_big --hops=0 --n_train=400000
  left=$(( BUDGET - SECONDS - 25 ))
  sweep rb q0_std reasoning_h0_big cpu_standard --batch_size=256 --max_iters=4000
  sweep rb aq0_std reasoning_h0_aq cpu_standard --batch_size=256 --max_iters=4000
  sweep rb aq1_std reasoning_h1_aq cpu_standard --batch_size=256 --max_iters=4000
  sweep rb aq1_std_8layers reasoning_h1_aq cpu_standard --batch_size=256 --max_iters=4000 --n_layer=8
  sweep rb aq1_looplm reasoning_h1_aq cpu_looplm --batch_size=256 --max_iters=3000
  sweep rb aq2_std reasoning_h2_aq cpu_standard --batch_size=256 --max_iters=4000
  sweep rb aq2_looplm reasoning_h2_aq cpu_looplm --batch_size=256 --max_iters=3000
  sweep rb aq2_std_8layers reasoning_h2_aq cpu_standard --batch_size=256 --max_iters=4000 --n_layer=8
  sweep_report rb "rb/*looplm*/ckpt.pt" ;;   # with the looped models' checkpoints
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
*) echo "unknown part $w"; exit 2 ;;
esac; done
echo "total $SECONDS s"
