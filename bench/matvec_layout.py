"""
Why melt.Linear stores weights (in, out): one-token decoding is a matrix-vector product per
weight matrix, streamed from memory. This times x @ W for the two layouts and a few dtypes on
matrices too many to stay in cache (the bench model's MLP shapes).

    python bench/matvec_layout.py
"""

import time

import torch
import torch.nn.functional as F


def bench(f, ws, x):
    for w in ws:
        f(x, w)
    t = time.perf_counter()
    for _ in range(20):
        for w in ws:
            f(x, w)
    return (time.perf_counter() - t) / 20 / len(ws)


def main():
    torch.set_num_threads(2)
    print("| matrix (fp32 unless said) | nn.Linear layout (out, in) | melt.Linear layout (in, out) | ratio |")
    print("|---|---|---|---|")
    for out_f, in_f in ((704, 256), (1408, 256)):
        n = max(8, 48_000_000 // (out_f * in_f * 4))   # ~48 MB of weights: more than the caches
        for dtype in (torch.float32, torch.bfloat16):
            w_oi = [torch.randn(out_f, in_f).to(dtype) for _ in range(n)]
            w_io = [w.t().contiguous() for w in w_oi]
            x = torch.randn(1, in_f).to(dtype)
            a = bench(F.linear, w_oi, x)
            b = bench(lambda x, w: x @ w, w_io, x)
            kb = out_f * in_f * w_oi[0].element_size() / 1024
            print(f"| {out_f} x {in_f} {str(dtype)[6:]} ({kb:.0f} KB) | {a * 1e6:.1f} us | {b * 1e6:.1f} us | "
                  f"{a / b:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
