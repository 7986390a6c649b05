"""
An independent check for the reasoning rows: is the lookup task hard, or is our model broken?

A minimal GPT-2-style transformer written here from scratch (learned absolute positions, pre-LayerNorm,
GELU MLP, biases, tied to nothing in melt.py) trained on exactly the batches train.py gives the
standard model (train.Batches, same seed, same answer-only targets; train.make_optimizer's AdamW and
train.lr_at's schedule with config/cpu_standard.py's numbers), its exact-match accuracy measured on
the same problems (train.task_problems).
If it learns what melt's standard model does not, the fault is ours; if it fails the same way,
the task is hard at this budget. Not a second implementation of the model: nothing else uses it.

    python bench/vanilla_lookup.py --dataset=reasoning_h0 --max_iters=3000   (about 10 min, 1 thread)

--aligned=1 trains on whole lines instead (train.py's line_batches: one problem per row, the
question always at the same position, no earlier lines in the context), the way associative-
recall probes are usually trained; equal-length lines only (data/prepare.py --pairs=3 makes them):
    python bench/vanilla_lookup.py --dataset=lookup3 --aligned=1 --batch_size=64 --lr=1e-3 --min_lr=1e-3 --weight_decay=0
"""

import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.prepare import ensure_dataset  # noqa: E402
from train import Batches, TrainConfig, answer_marker, line_token, load_meta, lr_at, make_optimizer, task_problems  # noqa: E402


class VanillaBlock(nn.Module):
    def __init__(self, C, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)      # (B, T, C)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class Vanilla(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_embd, n_head):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(VanillaBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln, self.head = nn.LayerNorm(n_embd), nn.Linear(n_embd, vocab_size)

    def forward(self, idx):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))   # (B, T, V)


def main(argv):
    args = dict(dataset="reasoning_h0", max_iters=3000, eval_interval=500, batch_size=16, block_size=128,
                n_layer=2, n_embd=128, n_head=4, lr=2e-3, min_lr=2e-4, weight_decay=0.1, warmup_iters=50, seed=1337, threads=1, aligned=0)
    for a in argv:
        k, v = a[2:].split("=", 1)
        args[k] = type(args[k])(v)
    torch.set_num_threads(args["threads"])
    torch.manual_seed(args["seed"])
    data_dir = ensure_dataset(args["dataset"])
    meta = load_meta(data_dir)
    model = Vanilla(meta["vocab_size"], args["block_size"], args["n_layer"], args["n_embd"], args["n_head"])
    cfg = TrainConfig(max_iters=args["max_iters"], lr=args["lr"], min_lr=args["min_lr"],
                      weight_decay=args["weight_decay"], warmup_iters=args["warmup_iters"],
                      line_batches=bool(args["aligned"]), dataset=args["dataset"])   # AdamW and schedule exactly as train.py's
    opt = make_optimizer(model, cfg, "cpu")
    marker = answer_marker(meta, True, args["dataset"])
    batches = Batches(data_dir, args["block_size"], args["batch_size"], 1, seed=args["seed"], answer_after=marker,
                      line_token=line_token(meta, cfg))
    problems = task_problems(data_dir, meta, 200)
    n = args["max_iters"]
    print(f"vanilla transformer, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{args['dataset']}, {n} steps of {args['batch_size']} x "
          f"{'one line' if args['aligned'] else args['block_size']} tokens", flush=True)
    t0 = time.time()
    for step in range(n + 1):
        if step % args["eval_interval"] == 0:
            model.eval()
            with torch.no_grad():
                acc = sum(int(model(torch.tensor([p]))[0, -1].argmax() == a) for p, a in problems) / len(problems)
            model.train()
            print(f"step {step} | task_acc {acc:.3f} | {time.time() - t0:.0f} s", flush=True)
        if step == n:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg) * g["lr_scale"]
        x, y = batches.get("train", step, 0, torch.device("cpu"))
        loss = F.cross_entropy(model(x).view(-1, meta["vocab_size"]), y.view(-1), ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


if __name__ == "__main__":
    main(sys.argv[1:])
