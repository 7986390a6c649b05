"""
What chunk-wise training costs: training tokens/s of the same model as a LoopLM (whole sequence
at once, one cache per loop) and as MELT at several chunk sizes, measured side by side in one run.

    python bench/train_throughput.py                  # the default train.py model, CPU
    python bench/train_throughput.py --device=cuda --n_embd=512 --n_layer=8 --block_size=256 --batch_size=64
    python bench/train_throughput.py --vocab_size=10 --block_size=65 --batch_size=32 --chunks=16 --sweeps=1   # the lesson's shape

--chunks=C,D: MELT's chunk sizes (default 8,16,32,64 and the whole sequence); --sweeps=K adds, at
each, K sweeps with gradients through every pass (sweeps_grad=all) and through the last only.

Each number: forward + backward + AdamW step, median of `--steps` timed steps after 2 warm-ups.
The models take turns, one step each per round, so every ratio compares steps seconds apart (run
one after another, the same step drifted by 1.5x on a 2-core VM: RESULTS.md).
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from melt import MELT, MeltConfig  # noqa: E402


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    device = torch.device(opts.pop("device", "cpu"))
    steps = int(opts.pop("steps", 5))
    B = int(opts.pop("batch_size", 16))
    sweeps = int(opts.pop("sweeps", 0))
    sizes = opts.pop("chunks", "")
    base = dict(vocab_size=84, n_layer=2, n_loop=4, n_embd=128, n_head=4, block_size=128)
    base.update({k: int(v) for k, v in opts.items()})
    T = base["block_size"]
    torch.set_num_threads(2)
    runs = [("LoopLM (whole sequence)", dict(cache="loop"))]
    for c in [int(c) for c in sizes.split(",")] if sizes else [c for c in (8, 16, 32, 64, T) if c <= T]:
        runs.append((f"MELT chunk {c}", dict(cache="shared", chunk_size=c)))
        if sweeps:
            runs += [(f"MELT chunk {c}, sweeps {sweeps}, gradient through {what}",
                      dict(cache="shared", chunk_size=c, sweeps=sweeps, sweeps_grad=g))
                     for g, what in (("all", "every pass"), ("last", "the last pass only"))]
    print(f"{device}, batch {B} x {T} tokens, {base}")
    x = torch.randint(0, base["vocab_size"], (B, T), device=device)
    built = []
    for name, kw in runs:
        torch.manual_seed(0)
        model = MELT(MeltConfig(**base, **kw)).to(device).train()
        built.append((name, kw, model, torch.optim.AdamW(model.parameters(), lr=1e-3), []))
    for i in range(steps + 2):   # rounds: one step of every model
        for name, kw, model, opt, times in built:
            t = time.perf_counter()
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t)
    print("\n| model | chunks per sequence | train tok/s | vs LoopLM |\n|---|---|---|---|")
    ref = None
    for name, kw, _, _, times in built:
        rate = B * T / statistics.median(times)
        ref = ref or rate
        chunks = 1 if kw["cache"] == "loop" else -(-T // kw["chunk_size"])   # ceil(T / c)
        print(f"| {name} | {chunks} | {rate:,.0f} | {rate / ref:.2f}x |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
