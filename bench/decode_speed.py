"""
Decode speed of LoopLM vs MELT at the same config, measured side by side in one run.

    python bench/decode_speed.py                 # headline: eager and compiled, both layouts
    python bench/decode_speed.py --no-compile    # eager only (no ~1 min compile per layout)
    python bench/decode_speed.py --contexts      # table 2: decode tok/s versus context length

The config is the issue's: ~3.4M parameters (vocab 512, width 256, 4 layers, 4 heads, 4 loops),
64-token prompt, 256 new tokens, batch 1, 2 threads, float32, greedy. Each number is the best of
3 repeats (2 for --contexts). "compiled" compiles only the one-token decode step (torch.compile, dynamic shapes),
as gpt-fast does; prefill stays eager.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from melt import MELT, MeltConfig  # noqa: E402

CONFIG = dict(vocab_size=512, n_embd=256, n_layer=4, n_head=4, n_loop=4, block_size=8192, chunk_size=64)


def decode_rate(model, prompt_len, new_tokens, step=None, repeats=3):
    idx = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    best = 0.0
    with torch.inference_mode():
        for _ in range(repeats):
            cache = model.new_cache(1, prompt_len + new_tokens)
            stream = model.generate_stream(idx, new_tokens, temperature=0, cache=cache, decode_step=step)
            next(stream)                      # prefill and the first token
            t = time.perf_counter()
            n = sum(1 for _ in stream)        # the rest: one decode step each
            best = max(best, n / (time.perf_counter() - t))
    return best


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    models = {c: MELT(MeltConfig(**CONFIG, cache=c)).eval() for c in ("loop", "shared")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{models['loop'].num_params(False) / 1e6:.2f}M parameters (LoopLM), "
          f"{models['shared'].num_params(False) / 1e6:.2f}M (MELT, with gates)")
    if "--contexts" in sys.argv:
        # Per token and loop both layouts read `context` rows per layer; what differs is how much
        # distinct memory those reads span (LoopLM: n_loop slots, MELT: one), i.e. the cache size.
        print("\n| context | LoopLM tok/s | MELT tok/s | MELT / LoopLM | KV cache MiB: LoopLM / MELT |")
        print("|---|---|---|---|---|")
        for ctx in (64, 1024, 2048, 4096):
            r = {c: decode_rate(m, ctx, 32 if ctx > 64 else 128, repeats=2) for c, m in models.items()}
            mib = {c: m.new_cache(1, ctx, device="meta").nbytes / 2**20 for c, m in models.items()}
            print(f"| {ctx} | {r['loop']:.1f} | {r['shared']:.1f} | {r['shared'] / r['loop']:.2f} | "
                  f"{mib['loop']:g} / {mib['shared']:g} |", flush=True)
        return
    rows = []
    for c, m in models.items():
        rows.append((c, "eager", decode_rate(m, 64, 256)))
        print(f"{c:7s} eager    {rows[-1][2]:7.1f} tok/s", flush=True)
    if "--no-compile" not in sys.argv:
        for c, m in models.items():
            step = torch.compile(m.step, dynamic=True)
            t = time.perf_counter()
            decode_rate(m, 64, 8, step, repeats=1)   # compiles (twice: prefill-shaped guards, then decode)
            compile_s = time.perf_counter() - t
            rows.append((c, "compiled", decode_rate(m, 64, 256, step)))
            print(f"{c:7s} compiled {rows[-1][2]:7.1f} tok/s  (compile {compile_s:.0f} s)", flush=True)
    print("\n| layout | mode | decode tok/s | x the reference's ~38 tok/s |\n|---|---|---|---|")
    for c, mode, r in rows:
        print(f"| {'LoopLM' if c == 'loop' else 'MELT'} | {mode} | {r:.1f} | {r / 38:.1f}x |")


if __name__ == "__main__":
    main()
