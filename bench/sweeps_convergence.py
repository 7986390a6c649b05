"""
How fast THE SWEEPS converge to decode semantics on a trained MELT checkpoint: for k = 0..K, the
largest |logit| difference between the chunk-wise forward with k sweeps and the forward at decode
semantics (chunks of one token), and the positions that are already exact, on fixed validation
batches; with the forward's time for each k.

    python bench/sweeps_convergence.py out/ckpt.pt --chunk_size=32 --max_sweeps=4
"""

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train as T  # noqa: E402
from melt import load_checkpoint, load_model  # noqa: E402


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--chunk_size", type=int, default=32)
    ap.add_argument("--max_sweeps", type=int, default=4)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=8)
    a = ap.parse_args(argv)
    model, meta = load_model(a.ckpt)
    if model.config.cache != "shared":
        raise T.ConfigError(f"{a.ckpt} is a loop-cache model: sweeps are for MELT (cache=shared)")
    model.eval()
    data_dir = T.ensure_dataset(load_checkpoint(a.ckpt)["train_config"]["dataset"])
    batches = T.Batches(data_dir, meta, model.config.block_size, a.batch_size, 1, seed=1337)
    xs = [batches.eval_batch("val", i, 0, torch.device("cpu"))[0] for i in range(a.batches)]
    print(f"{a.ckpt}: {xs[0].shape[1]} tokens per row, chunk {a.chunk_size}, {a.batches} x {a.batch_size} rows")
    print("| sweeps | max abs logit diff to decode semantics | positions within 1e-4 | argmax agrees | forward s |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        exact = [model.lm_head(model.run(x, chunk_size=1).selected) for x in xs]
        for k in range(a.max_sweeps + 1):
            t0 = time.perf_counter()
            got = [model.lm_head(model.run(x, chunk_size=a.chunk_size, sweeps=k).selected) for x in xs]
            dt = time.perf_counter() - t0
            diff = torch.cat([(g - e).abs().amax(-1).flatten() for g, e in zip(got, exact)])
            agree = torch.cat([(g.argmax(-1) == e.argmax(-1)).flatten() for g, e in zip(got, exact)])
            print(f"| {k} | {diff.max().item():.2e} | {(diff < 1e-4).float().mean().item():.3f} | "
                  f"{agree.float().mean().item():.4f} | {dt:.2f} |", flush=True)


if __name__ == "__main__":
    T.run_cli(main, "sweeps_convergence.py")
