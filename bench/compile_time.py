"""
How long torch.compile takes for what this project compiles, on the machine at hand (CPU: inductor's
C++ backend; the graph capture part, Dynamo and AOTAutograd, is the same work on a GPU machine).

    python bench/compile_time.py            # both tables
    python bench/compile_time.py --decode   # the decode-step table only

Cold compiles: inductor's caches on disk are switched off (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1,
set below before torch is imported); with them on, a second run only times cache reads (the
transition's 108 s became 3 s here).

1. A training step (forward + backward) of a 2-layer toy, as a LoopLM (whole sequence at once) and
   as MELT's transition (0 < alpha < 1: both layouts, chunk-wise) with 2 and 4 chunks per sequence:
   the chunk-wise graph unrolls chunks x loops x layers, so its size, and its compile, grow with
   the number of chunks. Then the step again at the next alpha, which must not recompile.
2. The one-token decode step `sample.py --compile` compiles (MELT.decode_step_fixed), for the issue's
   4-layer decode config and the 8-layer config/gpu_*.py shape.
"""

import os
import sys
import time

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from melt import MELT, MeltConfig  # noqa: E402


def train_step_compile(cache, chunk_size, alphas):
    """Seconds for the first compiled forward + backward at alphas[0], then the seconds of the
    later alphas (a recompile would show as another long step) and the graphs compiled in all."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MELT(MeltConfig(vocab_size=65, n_layer=2, n_embd=64, n_head=2, n_loop=4, block_size=128,
                            cache=cache, chunk_size=chunk_size))
    x = torch.randint(0, 65, (2, 128))
    step = torch.compile(lambda alpha: model(x, x, alpha=alpha)[1])
    graphs, times = counters["stats"]["unique_graphs"], []
    for alpha in alphas:
        t = time.perf_counter()
        step(alpha).backward()
        times.append(time.perf_counter() - t)
    return times, counters["stats"]["unique_graphs"] - graphs


def decode_step_compile(n_layer, n_embd, n_head, vocab_size):
    """Seconds for the first call of the compiled fixed-shape decode step (it compiles)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MELT(MeltConfig(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_loop=4,
                            block_size=256, cache="shared")).eval()
    step = model.decode_step_fixed(compile=True)
    with torch.inference_mode():
        cache = model.new_cache(1, 72)
        logits, _ = model.prefill(torch.randint(0, vocab_size, (1, 8)), cache)
        t = time.perf_counter()
        step(logits.argmax(-1, keepdim=True), cache)
    return time.perf_counter() - t


def train_table():
    print("\n| training step (2 layers x 4 loops, width 64, 2 x 128 tokens) | chunks | first step (compiles) "
          "| next 3 alphas | graphs compiled |\n|---|---|---|---|---|")
    for label, cache, chunk, alphas in (("LoopLM", "loop", 128, [0.0, 0.0, 0.0, 0.0]),
                                        ("MELT transition", "shared", 64, [0.25, 0.5, 0.75, 0.9]),
                                        ("MELT transition", "shared", 32, [0.25, 0.5, 0.75, 0.9])):
        times, graphs = train_step_compile(cache, chunk, alphas)
        print(f"| {label} | {128 // chunk} | {times[0]:.0f} s | {', '.join(f'{t:.2f}' for t in times[1:])} s "
              f"| {graphs} |", flush=True)


def main():
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores")
    if "--decode" not in sys.argv:
        train_table()
    print("\n| decode step (MELT.decode_step_fixed, 4 loops) | first call (compiles) |\n|---|---|")
    for label, shape in (("4 layers, width 256 (bench/decode_speed.py)", (4, 256, 4, 512)),
                         ("8 layers, width 512 (config/gpu_*.py)", (8, 512, 8, 65))):
        print(f"| {label} | {decode_step_compile(*shape):.0f} s |", flush=True)


if __name__ == "__main__":
    main()
