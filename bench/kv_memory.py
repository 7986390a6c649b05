"""
Table 1: KV-cache bytes per token and in total, versus loops and context length, for a standard
transformer (1 loop), a LoopLM (one cache per loop and layer) and MELT (one cache per layer).

    python bench/kv_memory.py            # prints the markdown tables the README shows
    python bench/kv_memory.py --plot     # also writes bench/results/kv_memory.png (needs matplotlib)

The small config (the bench model: vocab 512, width 256, 4 layers, 4 heads) is *measured*: real
caches are allocated with model.new_cache() and their tensors' bytes summed. Ouro-1.4B's config
(24 layers, 16 kv heads x 128) is *computed from shapes*: the same new_cache() on PyTorch's meta
device, which records shapes without allocating. All in bf16, as the paper's figures are.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from melt import MELT, MeltConfig  # noqa: E402

SMALL = dict(vocab_size=512, n_embd=256, n_layer=4, n_head=4)
OURO_1_4B = dict(vocab_size=49152, n_embd=2048, n_layer=24, n_head=16, n_kv_head=16, head_dim=128, mlp_hidden=5632)
LOOPS = (1, 2, 4, 8)
CONTEXTS = (1024, 4096, 16384, 32768)
PAPER = {"Ouro-1.4B (4 loops)": 0.786, "MELT-1.6B": 0.197}   # MB per token, bf16 (paper_notes)


def cache_bytes(shape_cfg, cache, n_loop, context, device):
    cfg = MeltConfig(**shape_cfg, n_loop=n_loop, cache=cache, block_size=max(CONTEXTS))
    with torch.device("meta"):
        model = MELT(cfg)
    c = model.new_cache(1, context, dtype=torch.bfloat16, device=device)
    return c.nbytes


def table(name, shape_cfg, device):
    rows = [f"### {name} ({'measured' if device == 'cpu' else 'computed from shapes'}, bf16, batch 1)", "",
            "| model | loops | KV bytes/token | " + " | ".join(f"total @ {c // 1024}k" for c in CONTEXTS) + " |",
            "|---|---|---|" + "---|" * len(CONTEXTS)]
    results = {}
    for label, cache, loops in [("standard", "loop", (1,)), ("LoopLM", "loop", LOOPS), ("MELT", "shared", LOOPS)]:
        for n in loops:
            totals = [cache_bytes(shape_cfg, cache, n, c, device) for c in CONTEXTS]
            per_token = totals[0] // CONTEXTS[0]
            results[label, n] = (per_token, totals)
            rows.append(f"| {label} | {n} | {per_token:,} ({per_token / 1e6:.3f} MB) | "
                        + " | ".join(f"{t / 2**20:,.1f} MiB" if t < 2**30 else f"{t / 2**30:,.2f} GiB" for t in totals)
                        + " |")
    return "\n".join(rows), results


def main(argv):
    ap = argparse.ArgumentParser(prog="bench/kv_memory.py", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plot", action="store_true", help="also write bench/results/kv_memory.png (matplotlib)")
    a = ap.parse_args(argv)
    small, small_res = table("Small config (vocab 512, width 256, 4 layers, 4 heads)", SMALL, "cpu")
    ouro, ouro_res = table("Ouro-1.4B shapes (24 layers, 16 kv heads x 128)", OURO_1_4B, "meta")
    print(small + "\n\n" + ouro + "\n")
    print("Paper (bf16, per token): Ouro-1.4B 0.786 MB, MELT-1.6B 0.197 MB. Ours at Ouro-1.4B's shapes: "
          f"LoopLM x4 {ouro_res['LoopLM', 4][0] / 1e6:.3f} MB, MELT {ouro_res['MELT', 4][0] / 1e6:.3f} MB.")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for label, marker in [("LoopLM", "o"), ("MELT", "s")]:
            a.plot(LOOPS, [ouro_res[label, n][0] / 1e6 for n in LOOPS], marker=marker, label=label)
            b.plot([c // 1024 for c in CONTEXTS], [t / 2**30 for t in ouro_res[label, 4][1]], marker=marker,
                   label=f"{label} (4 loops)")
        b.plot([c // 1024 for c in CONTEXTS], [t / 2**30 for t in ouro_res["standard", 1][1]], marker="^",
               label="standard")
        a.set(xlabel="loops", ylabel="KV MB per token", title="Ouro-1.4B shapes: KV per token vs loops")
        b.set(xlabel="context (k tokens)", ylabel="KV GiB", title="KV total vs context")
        for ax in (a, b):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kv_memory.png")
        fig.savefig(out, dpi=110)
        print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
