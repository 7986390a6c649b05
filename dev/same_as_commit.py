"""
Check that a refactor of melt.py changed no number: build the model of this checkout and the one of
an earlier commit (its melt.py read with git show) on the same weights, and compare logits, loss,
every gradient and the greedy generation bit for bit, for both layouts, several gates and chunk
sizes, adaptive exit and the transition.

    python dev/same_as_commit.py 7666a47
"""

import importlib.util
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import melt as new  # noqa: E402


def main(argv):
    commit = argv[0] if argv else "HEAD"
    src = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:melt.py"], capture_output=True, text=True, check=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("melt_then", f.name)
    old = importlib.util.module_from_spec(spec)
    sys.modules["melt_then"] = old   # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(old)
    torch.set_num_threads(2)
    n = n_same = 0
    for cache, gate, chunk, thr, sweeps in [("loop", "learned", 8, 1.0, 0), ("shared", "learned", 8, 1.0, 0),
                                            ("shared", "mean", 5, 1.0, 0), ("shared", "learned", 4, 0.6, 0),
                                            ("shared", "last", 16, 1.0, 0), ("shared", "learned", 8, 1.0, 2),
                                            ("shared", "scalar", 8, 1.0, 0), ("shared", "ema", 8, 1.0, 0),
                                            ("shared", "first", 8, 1.0, 0)]:
        kw = dict(vocab_size=61, n_embd=64, n_head=4, n_kv_head=2, n_layer=2, n_loop=3, block_size=64,
                  chunk_size=chunk, cache=cache, gate=gate, exit_threshold=thr, sweeps=sweeps)
        torch.manual_seed(0)
        a = new.MELT(new.MeltConfig(**kw))
        b = old.MELT(old.MeltConfig(**kw))
        b.load_state_dict(a.state_dict())
        with torch.no_grad():
            for m in (a, b):
                for blk in m.blocks:
                    if blk.gate is not None and gate == "learned":
                        torch.manual_seed(1)
                        blk.gate.w_z.weight.normal_(0, .3)
                        blk.gate.u_z.weight.normal_(0, .3)
                m.exit_gate.bias.fill_(-1.0)
        idx = torch.randint(0, 61, (3, 40), generator=torch.Generator().manual_seed(3))
        for alpha in ([None, 0.4] if cache == "shared" else [None]):
            la, loss_a = a(idx, idx, alpha=alpha)
            lb, loss_b = b(idx, idx, alpha=alpha)
            loss_a.backward()
            loss_b.backward()
            grads = [torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]) for m in (a, b)]
            a.zero_grad()
            b.zero_grad()
            gen = [m.generate(idx[:1, :10], 12, temperature=0) for m in (a, b)]
            same = (torch.equal(la, lb) and torch.equal(loss_a, loss_b) and torch.equal(*grads)
                    and torch.equal(*gen))
            print(f"cache={cache} gate={gate} chunk={chunk} exit={thr} sweeps={sweeps} alpha={alpha}: "
                  f"{'bit-identical' if same else 'DIFFERENT'}", flush=True)
            n, n_same = n + 1, n_same + same
    print(f"{n_same} of {n} bit-identical to {commit}")
    return 0 if n_same == n else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
