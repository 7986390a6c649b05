cd /work/main
for s in 2 3; do
  D=out-lesson/e03s2000p1000_s$s; [ $s = 2 ] && D=out-lesson/e03s2000_s2
  for m in looplm melt; do
    python dev/exit_gate_probe.py $D/dial_$m/ckpt.pt $D/data --steps=300 --k=1000 --gamma=0.01 --out=/tmp/ed/probe/s${s}_${m}_all_hard.json > /tmp/ed/probe/s${s}_${m}_all_hard.log 2>&1
    python dev/exit_gate_probe.py $D/dial_$m/ckpt.pt $D/data --steps=300 --out=/tmp/ed/probe/s${s}_${m}_all.json > /tmp/ed/probe/s${s}_${m}_all.log 2>&1
  done
done
echo done
