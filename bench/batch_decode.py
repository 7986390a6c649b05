"""
Decode tokens/s of batched generation (melt's ragged batches: prompts of different lengths, each
row with its own positions and mask) at batch 1, 4 and 16, both layouts, eager and with the
compiled fixed-shape step; rounds interleaved, medians, one run side by side.

    python bench/batch_decode.py [--rounds=3] [--no-compile]

The bench config (vocab 512, width 256, 4 layers, 4 heads, 4 loops, fp32), prompts of 32..64
tokens, 128 new tokens per row, greedy. tok/s counts every row's new tokens after the prefill.
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from melt import MELT, MeltConfig  # noqa: E402

CONFIG = dict(vocab_size=512, n_embd=256, n_layer=4, n_head=4, n_loop=4, block_size=1024, chunk_size=64)


def rate(model, B, new, step):
    g = torch.Generator().manual_seed(B)
    prompts = [torch.randint(0, 512, (int(n),), generator=g) for n in torch.linspace(32, 64, B).round()]
    with torch.inference_mode():
        padded, cache = model.ragged_batch(prompts, new)
        stream = model.generate_stream(padded, new, temperature=0, cache=cache, decode_step=step)
        next(stream)                       # the prefill (row by row) and the first tokens
        t = time.perf_counter()
        n = sum(1 for _ in stream)
        return B * n / (time.perf_counter() - t)


def main(argv):
    rounds = next((int(a.split("=")[1]) for a in argv if a.startswith("--rounds=")), 3)
    compiled = "--no-compile" not in argv
    torch.set_num_threads(2)
    torch.manual_seed(0)
    models = {c: MELT(MeltConfig(**CONFIG, cache=c)).eval() for c in ("loop", "shared")}
    modes = {"eager": {c: None for c in models}}
    if compiled:
        modes["compiled"] = {c: m.decode_step_fixed(compile=True) for c, m in models.items()}
    for mode, steps in modes.items():   # one untimed round: compiles every (batch size, bucket) graph
        for c, m in models.items():
            for B in (1, 4, 16):
                rate(m, B, 128, steps[c])
    res = {}
    for _ in range(rounds):
        for mode, steps in modes.items():
            for c, m in models.items():
                for B in (1, 4, 16):
                    res.setdefault((mode, c, B), []).append(rate(m, B, 128, steps[c]))
    print("| mode | layout | batch 1 tok/s | batch 4 | batch 16 | 16 / 1 |\n|---|---|---|---|---|---|")
    for mode in modes:
        for c in models:
            med = [statistics.median(res[mode, c, B]) for B in (1, 4, 16)]
            print(f"| {mode} | {c} | {med[0]:,.0f} | {med[1]:,.0f} | {med[2]:,.0f} | {med[2] / med[0]:.1f}x |")


if __name__ == "__main__":
    main(sys.argv[1:])
