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

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from melt import MELT, MeltConfig  # noqa: E402


BASE = dict(vocab_size=84, n_layer=2, n_loop=4, n_embd=128, n_head=4, block_size=128)   # the model timed


def main(argv):
    ap = argparse.ArgumentParser(prog="bench/train_throughput.py", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model, after 2 warm-ups")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--chunks", default="", metavar="C,D,...", help="MELT's chunk sizes")
    ap.add_argument("--sweeps", type=int, default=0, help="also each chunk size with K sweeps")
    model_keys = [f.name for f in dataclasses.fields(MeltConfig) if f.type is int and f.name not in ("chunk_size", "sweeps")]
    model = ap.add_argument_group("the model timed (MeltConfig; its defaults where BASE has none)")
    for k in model_keys:
        model.add_argument(f"--{k}", type=int, default=BASE.get(k), metavar="N")
    a = ap.parse_args(argv)
    device, steps, B, sweeps, sizes = torch.device(a.device), a.steps, a.batch_size, a.sweeps, a.chunks
    base = {k: getattr(a, k) for k in model_keys if getattr(a, k) is not None}
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
