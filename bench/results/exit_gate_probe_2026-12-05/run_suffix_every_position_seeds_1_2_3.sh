cd /work/main
for s in 1 2 3; do
  D=out-lesson/e03s2000p1000_s$s; [ $s = 2 ] && D=out-lesson/e03s2000_s2
  python dev/exit_gate_probe.py $D/dial_melt/ckpt.pt $D/data --steps=300 --k=1000 --gamma=0.01 --per=suffix --train_on=all --out=/tmp/ed/probe/s${s}_melt_all_hard_suffix_every.json > /tmp/ed/probe/s${s}_melt_all_hard_suffix_every.log 2>&1
done
echo done
