"""
Does the elimination shortcut hold the lookup back? A plain PyTorch loop, outside train.py.

The every-question lookup lines of data/prepare.py ('r3u2s6?s=6?r=3?u=2.') are read as ordinary
text: each answer digit is the next token and then an input, so a later question can be answered
by elimination (the digit of the line not given yet) without matching any letter, and the last
one always can. Trained that way (train.py, reproduce.sh's lookup3_aq runs) the first question
stayed at chance in every run. This script trains the same model (the standard transformer of
config/cpu_standard.py: 2 layers, width 128, 1 loop) on the same kind of lines, freshly generated
at every step by prepare.lookup_problem, in one of two forms:
    shown    the line as text, as train.py sees it (without the leading newline)
    hidden   the answer digits are targets only, never inputs: 'r3u2s6?s=?r=?u=' with targets
             6, 3, 2 at the three '='. Nothing can be eliminated: every question is a lookup.
Loss on the answers only; AdamW lr 1e-3, betas (0.9, 0.95), no weight decay, no clipping, no warmup
(the optimizer of reproduce.sh's lookup3_aq "b95" runs). Printed every 250 steps: the accuracy of
each question of 500 held-out lines (argmax, the earlier answers given as in training).

    python bench/lookup_probe.py --form=hidden --seed=1
"""

import argparse
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.prepare import TASK_CHARS, lookup_problem  # noqa: E402
from melt import MELT, MeltConfig  # noqa: E402

STOI = {c: i for i, c in enumerate(TASK_CHARS)}


def encode(rng, pairs, form):
    """One line -> (input ids, target ids with -1 where nothing is scored)."""
    prompt, answers = lookup_problem(rng, pairs, all_queries=True)
    line = prompt + answers                                   # 'r3u2s6?s=6?r=3?u=2'
    if form == "shown":                                       # next-token prediction on the text
        x, y = line[:-1], line[1:]
        return [STOI[c] for c in x], [STOI[c] if x[i] == "=" else -1 for i, c in enumerate(y)]
    x, y = [], []                                             # hidden: digits after '=' are targets only
    for i, c in enumerate(line):
        if i > 0 and line[i - 1] == "=":
            y[-1] = STOI[c]
        else:
            x.append(STOI[c])
            y.append(-1)
    return x, y


def batch(rng, n, pairs, form):
    xs, ys = zip(*(encode(rng, pairs, form) for _ in range(n)))
    return torch.tensor(xs), torch.tensor(ys)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--form", choices=("shown", "hidden"), required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    model = MELT(MeltConfig(vocab_size=len(TASK_CHARS), block_size=64, n_layer=2, n_embd=128, n_head=4,
                            n_loop=1, cache="loop"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    xv, yv = batch(random.Random(10_000 + a.seed), 500, a.pairs, a.form)   # held-out lines
    scored = (yv != -1).nonzero()[:, 1].view(len(yv), a.pairs)              # (500, pairs) positions
    t0 = time.time()
    for step in range(a.steps + 1):
        if step % 250 == 0:
            with torch.no_grad():
                pred = model(xv)[0].argmax(-1)                                    # (500, T)
                acc = (pred.gather(1, scored) == yv.gather(1, scored)).float().mean(0)
            print(f"{a.form} seed {a.seed} step {step} acc by question "
                  + " ".join(f"{v:.3f}" for v in acc.tolist()) + f" ({time.time() - t0:.0f} s)", flush=True)
        x, y = batch(rng, a.batch_size, a.pairs, a.form)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
