"""
A quick probe for choosing the lesson's task size: train one model on the p-hop mixture straight
on melt's model class (fresh rows every step, loss on the last loop, AdamW, constant lr after 100
warmup steps) and print the validation accuracy per p every 200 steps. Scored on the whole
sequence at once (the loop cache: no chunks). bench/lesson.py is the real pipeline.

    python bench/phop_grid.py --alphabet=4 --hops=1,2,3,4,5,6 --n_loop=4 --steps=1200 --threads=1
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.prepare import phop_rows  # noqa: E402
from melt import MELT, MeltConfig  # noqa: E402


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--alphabet", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--hops", default="1,2,3,4")
    ap.add_argument("--n_layer", type=int, default=2)
    ap.add_argument("--n_loop", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=128)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    hops = [int(h) for h in a.hops.split(",")]
    torch.manual_seed(a.seed)
    model = MELT(MeltConfig(vocab_size=a.alphabet + max(hops), block_size=a.seq_len + 1, n_layer=a.n_layer,
                            n_loop=a.n_loop, n_embd=a.n_embd, n_head=4, cache="loop", loss="last"))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.99))
    vx, vy = (torch.from_numpy(t) for t in phop_rows(512, a.alphabet, a.seq_len, hops, seed=999))
    rng = np.random.default_rng(a.seed)

    def accuracy():
        model.eval()
        with torch.no_grad():
            pred = model(vx)[0].argmax(-1)
        model.train()
        out = {}
        for p in hops:
            sel = (vx[:, 0] == a.alphabet + p - 1)[:, None] & (vy >= 0)
            out[p] = round(((pred == vy) & sel).sum().item() / sel.sum().item(), 3)
        return out

    t0 = time.time()
    for step in range(a.steps + 1):
        if step % 200 == 0:
            print(step, f"{time.time() - t0:.0f}s", accuracy(), flush=True)
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 100)
        x, y = (torch.from_numpy(t) for t in phop_rows(a.batch_size, a.alphabet, a.seq_len, hops,
                                                       seed=int(rng.integers(2**31))))
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    print("final", vars(a), accuracy(), f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
