#!/usr/bin/env bash
# sweeps measure 2, seed S, Shakespeare: teacher, then MELT phases 1+2 at chunk 32 with sweeps k beside chunk 1 (same protocol as seed 1337)
set -u
S=$1
cd /tmp/wt22
D=/tmp/S$S
mkdir -p $D
t() { local name=$1; shift; local t0=$(date +%s.%N); "$@" > $D/$name.log 2> $D/$name.err; echo "$name rc=$? $(echo "$(date +%s.%N) - $t0" | bc) s" >> $D/times.txt; }
variant() {  # variant NAME CHUNK SWEEPS THREADS
  t $1_p1 python train.py config/cpu_transition.py --init_from=$D/looplm/ckpt.pt --out_dir=$D/$1_p1 --chunk_size=$2 --sweeps=$3 --threads=$4 --device=cpu --seed=$S
  t $1_p2 python distill.py config/cpu_distill.py --teacher=$D/looplm/ckpt.pt --init_from=$D/$1_p1/ckpt.pt --out_dir=$D/$1_p2 --chunk_size=$2 --sweeps=$3 --threads=$4 --device=cpu --seed=$S
  python bench/evaluate.py $D/$1_p2/ckpt.pt --device=cpu --label=$1 --log=$D/eval.jsonl > /dev/null 2>> $D/eval.err
}
echo "start $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD)" >> $D/times.txt
t looplm python train.py config/cpu_looplm.py --out_dir=$D/looplm --threads=2 --device=cpu --seed=$S
python bench/evaluate.py $D/looplm/ckpt.pt --device=cpu --label=looplm --log=$D/eval.jsonl > /dev/null 2>> $D/eval.err
variant c1 1 0 1 &
for k in 0 1 2 3; do variant c32_s$k 32 $k 1; done
wait
echo "all done $(date -u +%FT%TZ)" >> $D/times.txt
