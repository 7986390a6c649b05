"""
The decode checks and timings that need a GPU, in one short run (dev/gpu_check.sh runs it with
the training checks; a lent GPU's time is short).

    python dev/gpu_check.py                # on a CUDA machine
    python dev/gpu_check.py --device=cpu   # the same code path without CUDA graphs (a dry run)

1. The CUDA-graph decode step, MELT.decode_step_fixed(compile=True), which `sample.py --compile`
   uses, fed the same tokens as the eager MELT.prefill, teacher-forced so that one early difference
   cannot change every later input: logits agree to the dtype's rounding, loops used are equal,
   nothing is recompiled while the position moves, and inductor did not skip the CUDA graph.
   float32 (matrix units' TF32 off) for the loop layout, the shared layout, and the shared layout
   with adaptive exit in a batch of 3 whose sequences exit at different loops; bfloat16 (what
   sample.py uses on a GPU) for both layouts.
2. Decode tokens/s at batch 1, eager vs compiled (CUDA graphs), LoopLM vs MELT, in bfloat16, in
   interleaved rounds (bench/decode_speed.py's config: 64-token prompt, 256 new tokens, greedy).
3. The card's bf16 matrix-product rate on random data, the ceiling that MFU is measured against.
"""

import argparse
import os
import statistics
import sys
import time

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from melt import MELT, MeltConfig  # noqa: E402
from bench.decode_speed import CONFIG, decode_rate  # noqa: E402


def teacher_forced(model, compiled, B=1, prompt_len=64, n=48, exit_threshold=None):
    """Feed the same random tokens to the eager step and the compiled fixed-shape step, each with
    its own cache. Returns (worst |logit difference| / max |logit|, fraction of equal argmaxes,
    positions whose loops used differ, graphs compiled during the timed positions, the distinct
    loop counts used)."""
    device = model.lm_head.weight.device
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (B, prompt_len), generator=g).to(device)
    forced = torch.randint(0, model.config.vocab_size, (B, n), generator=g).to(device)
    kw = dict(exit_threshold=exit_threshold)
    with torch.inference_mode():
        ce, cc = model.new_cache(B, prompt_len + n), model.new_cache(B, prompt_len + n)
        model.prefill(prompt, ce, **kw)
        model.prefill(prompt, cc, **kw)
        compiled(forced[:, :1], cc, **kw)            # compiles (or replays) at the first position
        model.prefill(forced[:, :1], ce, **kw)
        graphs = counters["stats"]["unique_graphs"]
        worst, agree, used_differ, depths = 0.0, 0.0, 0, set()
        for t in range(1, n):
            le, ue = model.prefill(forced[:, t:t + 1], ce, **kw)
            lc, uc = compiled(forced[:, t:t + 1], cc, **kw)
            le, lc = le.float(), lc.float()
            worst = max(worst, ((lc - le).abs().max() / le.abs().max()).item())
            agree += (lc.argmax(-1) == le.argmax(-1)).float().mean().item() / (n - 1)
            used_differ += int(not torch.equal(ue, uc))
            depths.update(ue.flatten().tolist())
    return worst, agree, used_differ, counters["stats"]["unique_graphs"] - graphs, sorted(depths)


def matmul_tflops(device, n=8192, reps=10):
    """bf16 n x n x n products on random data: mean TFLOP/s of `reps` after 3 warm-ups."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def main(argv):
    ap = argparse.ArgumentParser(prog="dev/gpu_check.py", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cpu: the same code path without CUDA graphs")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the decode timing")
    a = ap.parse_args(argv)
    device, rounds = torch.device(a.device), a.rounds
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}", flush=True)

    def make(cache, dtype, **kw):
        torch.manual_seed(0)
        model = MELT(MeltConfig(**{**CONFIG, "block_size": 512}, cache=cache, **kw))
        return model.to(device=device, dtype=dtype).eval()

    # 1. the CUDA-graph step against the eager one
    print("\n| check | dtype | worst logit diff / max logit | argmax equal | positions with other loops used "
          "| loops used | graphs compiled after the first position | CUDA graphs skipped | s (compile + 48 steps) |"
          "\n|---|---|---|---|---|---|---|---|---|")
    cases = [("LoopLM", "loop", torch.float32, 1, None), ("MELT", "shared", torch.float32, 1, None),
             ("MELT, adaptive exit q=0.5, batch 3", "shared", torch.float32, 3, 0.5),
             ("LoopLM", "loop", torch.bfloat16, 1, None), ("MELT", "shared", torch.bfloat16, 1, None)]
    models, steps = {}, {}
    for label, cache, dtype, B, q in cases:
        model = make(cache, dtype)
        compiled = model.decode_step_fixed(compile=True)
        skips = counters["inductor"]["cudagraph_skips"]
        t = time.perf_counter()
        worst, agree, used_differ, graphs, depths = teacher_forced(model, compiled, B=B, exit_threshold=q)
        print(f"| {label} | {str(dtype)[6:]} | {worst:.1e} | {agree:.3f} | {used_differ} | {depths} | {graphs} | "
              f"{counters['inductor']['cudagraph_skips'] - skips} | {time.perf_counter() - t:.0f} |", flush=True)
        if dtype == torch.bfloat16:
            models[label], steps[label] = model, compiled

    # 2. decode speed, bf16, batch 1: in each round every model runs eager and compiled
    rates = {(m, mode): [] for m in models for mode in ("eager", "compiled")}
    for m, model in models.items():
        decode_rate(model, 64, 256, steps[m])      # records the CUDA graph for this cache length
    for _ in range(rounds):
        for m, model in models.items():
            rates[(m, "eager")].append(decode_rate(model, 64, 256))
            rates[(m, "compiled")].append(decode_rate(model, 64, 256, steps[m]))
    ratio = lambda r, ref: statistics.median(a / b for a, b in zip(r, ref))
    print(f"\ndecode, batch 1, bf16, 64-token prompt, 256 new tokens, {rounds} interleaved rounds")
    print("| model | mode | tok/s (median) | range | / LoopLM, same mode | / eager, same model |\n|---|---|---|---|---|---|")
    for (m, mode), r in rates.items():
        print(f"| {m} | {mode} | {statistics.median(r):.0f} | {min(r):.0f}-{max(r):.0f} | "
              f"{ratio(r, rates[('LoopLM', mode)]):.2f} | {ratio(r, rates[(m, 'eager')]):.2f} |", flush=True)

    # 3. the ceiling for MFU
    if device.type == "cuda":
        print(f"\nbf16 8192^3 matrix product on random data: {matmul_tflops(device):.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
