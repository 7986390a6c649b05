"""
Why melt's projections are plain nn.Linear, weights stored (out, in), on the CPU decode path.

One-token decoding is a matrix-vector product per weight matrix. This times one pass over the
matrices of the bench model's 4 layers (q, k|v, o, gate|up, down: 12.8 MB in fp32, more than the
per-core caches) in both layouts, three ways:
    eager      x @ W (in, out) or F.linear(x, W) (out, in): BLAS's matrix-vector product
    compiled   the same under torch.compile (inductor still calls BLAS)
    compiled, decomposed   torch.compile with melt.CPU_DECODE_COMPILE_OPTIONS (what
               MELT.decode_step_fixed(compile=True) uses on a CPU): inductor writes each product
               as its own loop over both threads
In eager the (in, out) layout is the faster one here; compiled and decomposed, (out, in) is,
because each output is then a dot product over contiguous memory. sample.py --compile decodes
that way, so the model keeps nn.Linear's layout.

    python bench/matvec_layout.py
"""

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from melt import CPU_DECODE_COMPILE_OPTIONS  # noqa: E402

SHAPES = [(256, 256), (512, 256), (256, 256), (1408, 256), (256, 704)] * 4   # (out, in), 4 layers


def per_pass(f, *args, n=200):
    """Best of 3 mean times of one call of f(*args), in microseconds."""
    for _ in range(20):
        f(*args)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            f(*args)
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def out_in(xs, *ws):   # nn.Linear: W (out, in)
    return [F.linear(xs[w.shape[1]], w) for w in ws]


def in_out(xs, *ws):   # x @ W with W (in, out)
    return [xs[w.shape[0]] @ w for w in ws]


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    w_oi = [torch.randn(o, i) for o, i in SHAPES]
    w_io = [w.t().contiguous() for w in w_oi]
    xs = {i: torch.randn(1, i) for i in (256, 704)}
    mb = sum(w.numel() for w in w_oi) * 4 / 1e6
    print(f"torch {torch.__version__}, 2 threads, one pass over {len(SHAPES)} matrices ({mb:.1f} MB, float32)")
    print("\n| way | (in, out), x @ W | (out, in), nn.Linear | (in, out) / (out, in) |\n|---|---|---|---|")
    with torch.inference_mode():
        for way, make in (("eager", lambda f: f),
                          ("compiled", lambda f: torch.compile(f)),
                          ("compiled, decomposed", lambda f: torch.compile(f, options=CPU_DECODE_COMPILE_OPTIONS))):
            a = per_pass(make(in_out), xs, *w_io)
            b = per_pass(make(out_in), xs, *w_oi)
            print(f"| {way} | {a:.0f} us | {b:.0f} us | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
