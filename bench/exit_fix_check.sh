#!/usr/bin/env bash
# Did the kept adaptive-exit rows measure the batched-exit bug that c45b852 fixed? Score one MELT
# checkpoint at exit_threshold 1.0 and 0.5 with the code just before that fix (6d78f95, in a
# temporary git worktree) and with this checkout's code.
#   bash bench/exit_fix_check.sh out-cpu/shakespeare_char/phase2/ckpt.pt
# The old code stored every projection (in, out) (its melt.Linear); checkpoints of today's code
# store nn.Linear's (out, in), so the checkpoint is transposed for it (fixed depth must agree).
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=$(realpath "$1"); OLD=$(mktemp -d); trap 'git worktree remove --force "$OLD"' EXIT
git worktree add -q --detach "$OLD" 6d78f95
mkdir -p "$OLD/data"; ln -s "$PWD"/data/* "$OLD/data/" 2>/dev/null || true
(cd "$OLD" && python - "$CKPT" "$OLD/ckpt.pt" <<'PY'
import sys, torch, melt
ck = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
model = melt.MELT(melt.MeltConfig(**ck["model_config"]))
for name, mod in model.named_modules():
    if isinstance(mod, melt.Linear):     # the old (in, out) layout
        ck["model"][name + ".weight"] = ck["model"][name + ".weight"].t().contiguous()
model.load_state_dict(ck["model"])      # every tensor in place
torch.save(ck, sys.argv[2])
PY
)
for q in 1.0 0.5; do
  echo "exit_threshold=$q, code before the fix (6d78f95):"
  (cd "$OLD" && python bench/evaluate.py "$OLD/ckpt.pt" --exit_threshold=$q --label=old)
  echo "exit_threshold=$q, this checkout:"
  python bench/evaluate.py "$CKPT" --exit_threshold=$q --label=new
done
