"""
Phase 2 at Ouro-1.4B's shapes: distilling an Ouro-1.4B-shaped LoopLM into MELT-1.6B, measured
for a few micro-batches: peak GPU memory and tokens/s, in place of the README's arithmetic.
Random weights of the real shapes (24 layers, width 2048, 16 heads, MLP 5632, vocab 49,152, 4
loops), nothing downloaded; the training settings are config/ouro_distill.py's (2,048 tokens per
row, chunks of 512, the MLP halves checkpointed, the KD on every loop plus the alignment, AdamW).

    python dev/ouro_step.py                         # on a GPU (bf16 autocast, as distill.py runs)
    python dev/ouro_step.py --micro=4 --block_size=1024
    python dev/ouro_step.py --tiny --device=cpu     # the same code at a tiny shape: a dry run

What one micro-batch does is what distill.py does (its DistillObjective, train.py's optimizer):
the frozen teacher's per-loop logits and attention outputs, the student's forward and backward;
the optimizer steps once after the micro-batches. The student starts as the teacher in shared
mode with fresh gates (init_from=teacher).
"""

import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import distill as D  # noqa: E402
import train as T  # noqa: E402
from bench.kv_memory import OURO_1_4B  # noqa: E402
from melt import MELT, MeltConfig  # noqa: E402
from serve.checkpoint import load_weights  # noqa: E402

TINY = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_kv_head=2, head_dim=16, mlp_hidden=64)


def models(shape, n_loop, block_size, chunk_size, device):
    """(frozen teacher LoopLM, student MELT initialised from it), random weights of `shape`."""
    torch.manual_seed(0)
    with torch.device(device):   # made where they run: 3B parameters are slow to make on a CPU
        teacher = MELT(MeltConfig(**shape, n_loop=n_loop, block_size=block_size, cache="loop"))
        student = MELT(MeltConfig(**shape, n_loop=n_loop, block_size=block_size, cache="shared",
                                  chunk_size=chunk_size))
    load_weights(student, teacher.state_dict())   # init_from=teacher: every weight but the gates
    teacher = teacher.eval().requires_grad_(False)
    if device.type == "cuda":
        teacher.to(torch.bfloat16)   # distill.load_teacher
    return teacher, student.train()


def measure(argv):
    """Run the micro-batches -> (a dict of what was measured, the teacher, the student after the step)."""
    passed = ("--block_size=", "--chunk_size=", "--device=", "--checkpoint_mlp=", "--kd_loops=")   # to the config
    for a in argv:
        if a != "--tiny" and not a.startswith(("--micro=",) + passed):
            raise T.ConfigError(f"unknown argument {a!r}: use --tiny, --micro=N or {', '.join(p + '...' for p in passed)}")
    tiny = "--tiny" in argv
    micro = next((int(a.split("=")[1]) for a in argv if a.startswith("--micro=")), 3)
    cfg, keys = T.parse_args([os.path.join(ROOT, "config", "ouro_distill.py"), "--teacher=random"] + [a for a in argv if a.startswith(passed)],
                             train_cls=D.DistillConfig)
    block, chunk = keys.get("block_size", 2048), keys.get("chunk_size", 512)
    if tiny:
        block, chunk = min(block, 16), min(chunk, 4)
    rt = T.Runtime(cfg)
    teacher, student = models(TINY if tiny else OURO_1_4B, 2 if tiny else 4, block, chunk, rt.device)
    objective = D.DistillObjective(student, cfg)
    optimizer = T.make_optimizer(student, cfg, rt.device.type)
    cuda = rt.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(1)
    V = student.config.vocab_size
    times, losses = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(micro + 1):   # the first micro-batch warms up (allocations, kernels), untimed
        x = torch.randint(0, V, (1, block), generator=g).to(rt.device)
        y = torch.randint(0, V, (1, block), generator=g).to(rt.device)
        sync()
        t = time.perf_counter()
        with rt.autocast:
            t_out = objective.teacher_outputs(teacher, x)
            loss, _ = objective(x, y, 1.0, t_out)
        loss.backward()
        del t_out
        sync()
        if i > 0:
            times.append(time.perf_counter() - t)
        losses.append(loss.item())
    t = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return dict(params=student.num_params(), block=block, chunk=chunk, micro=micro, device=str(rt.device),
                dtype=rt.dtype, tok_s=micro * block / sum(times), optimizer_s=time.perf_counter() - t,
                losses=losses, peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                card=torch.cuda.get_device_name() if cuda else None, checkpoint_mlp=student.blocks[0].checkpoint_mlp), teacher, student


def main(argv):
    r, _, _ = measure(argv)
    c = f"{r['card']}, " if r["card"] else ""
    print(f"student: {r['params'] / 1e6:,.1f}M parameters; {c}{r['device']} ({r['dtype']}); {r['block']:,} tokens "
          f"per row, chunks of {r['chunk']}, checkpoint_mlp={r['checkpoint_mlp']}")
    print(f"{r['micro']} timed micro-batches (forward + backward, teacher included): {r['tok_s']:,.0f} tok/s; "
          f"optimizer step {r['optimizer_s']:.2f} s; losses {', '.join(f'{v:.3f}' for v in r['losses'])}")
    if r["peak_gib"] is not None:
        print(f"peak GPU memory allocated: {r['peak_gib']:.1f} GiB")


if __name__ == "__main__":
    T.run_cli(main, "dev/ouro_step.py")
