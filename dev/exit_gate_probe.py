"""
Probe: can the exit gate learn to spend loops by difficulty? Ouro trains its gate in a second
stage on whether more loops still lower the loss; this retrains only the exit gate of a trained
dial checkpoint (bench/lesson.py --rows=dial) that way, every other weight frozen, and scores
adaptive exit per hop count p before and after.

    python dev/exit_gate_probe.py OUT/dial_looplm/ckpt.pt OUT/data [--ahead=all] [--steps=300] --out=R.json
    python dev/exit_gate_probe.py --report R1.json R2.json ...   # a markdown table of saved results

Per token and loop t < R (CE_t: the cross-entropy of loop t's logits, computed with every loop
run, at the model's training chunks): the gain of going on is I_t = CE_t - min_{u>t} CE_u
(--ahead=all) or CE_t - CE_{t+1} (--ahead=1, one step as Ouro's), clamped at 0; the target of the
exit probability lambda_t is 1 - sigmoid(k (I_t - gamma)) (--k, --gamma; 50 and 0.005 by default:
a token that gains nothing gets an exit target of only 0.56; --k=1000 --gamma=0.01: 1), and the loss is
their binary cross-entropy over the scored positions. Scoring is bench/lesson.py's: every
validation row at decode semantics, accuracy and the mean loop the answers come from.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import lesson  # noqa: E402
from data.loader import Batches, load_meta  # noqa: E402
from serve.checkpoint import load_model  # noqa: E402


def gate_targets(model, x, y, ahead, k=50.0, gamma=0.005, per="token"):
    """Exit targets (R-1, B, T) for loops 1..R-1, the hidden states (R, B, T, C), the scored mask (B, T).
    per="row": every token of a row gets the row's largest gain (no token exits while another
    token of its row still gains: in the shared layout later tokens read an exited token's row);
    per="suffix": the largest gain of the token and the tokens after it, the ones that read it."""
    with torch.no_grad():
        out = model.run(x)
        R, B, Tn, V = out.hidden.shape[0], *x.shape, model.config.vocab_size
        ce = F.cross_entropy(model.lm_head(out.hidden).float().view(-1, V), y.reshape(-1).repeat(R),
                             ignore_index=-1, reduction="none").view(R, B, Tn)
        if ahead == "all":
            later = torch.flip(torch.cummin(torch.flip(ce[1:], [0]), 0).values, [0])   # min over u > t
        else:
            later = ce[1:]                                                               # CE_{t+1}
        gain = (ce[:-1] - later).clamp_min(0) * (y != -1)
        if per == "row":
            gain = gain.amax(dim=2, keepdim=True).expand_as(gain)
        elif per == "suffix":
            gain = torch.flip(torch.cummax(torch.flip(gain, [2]), 2).values, [2])   # max over positions >= i
        return 1 - torch.sigmoid(k * (gain - gamma)), out.hidden, y != -1


def report(paths):
    """One markdown line per (result file, before/after, threshold): accuracy (mean loops) per p."""
    print("| file | model | targets | gate | threshold | " + " | ".join(f"p={p}" for p in range(1, 7)) + " |")
    print("|---|---|---|---|---|" + "---|" * 6)
    for path in paths:
        r = json.load(open(path))
        model = os.path.basename(os.path.dirname(r["ckpt"]))
        targets = (f"k={r.get('k', 50.0):g} gamma={r.get('gamma', 0.005):g} per {r.get('per', 'token')}"
                   + (", every position" if r.get("train_on") == "all" else ""))
        for when in ("before", "after"):
            for q, per_p in r[when].items():
                cells = " | ".join(f"{acc:.3f} ({used:.2f})" for acc, used in per_p.values())
                print(f"| {os.path.basename(path)} | {model} | {targets} | {when} | {q} | {cells} |")


def main(argv):
    if argv[:1] == ["--report"]:
        return report(argv[1:])
    ap = argparse.ArgumentParser(prog="dev/exit_gate_probe.py", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("data_dir")
    ap.add_argument("--ahead", choices=("1", "all"), default="all")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--k", type=float, default=50.0, help="sharpness of the target (large: a hard 0/1 target)")
    ap.add_argument("--gamma", type=float, default=0.005, help="the gain in CE below which going on is not worth it")
    ap.add_argument("--per", choices=("token", "row", "suffix"), default="token", help="whose gain sets a token's target")
    ap.add_argument("--train_on", choices=("scored", "all"), default="scored",
                    help="the positions the gate's loss covers: those with a target, or every one (row, suffix)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--thresholds", default="0.5,0.7,0.9")
    ap.add_argument("--out", default="", help="write the results here as JSON")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    model, _ = load_model(a.ckpt)
    meta = load_meta(a.data_dir)
    device = torch.device("cpu")
    thresholds = [float(q) for q in a.thresholds.split(",")]
    R = model.config.n_loop

    def scores(label):
        got = {}
        for q in thresholds:
            got[q] = lesson.score(model, a.data_dir, meta, 32, device, n_loops=R, exit_threshold=q, loops=True)
            print(f"{label} threshold {q}: " + "  ".join(f"p={p} {acc:.3f} ({used:.2f} loops)"
                                                        for p, (acc, used) in got[q].items()), flush=True)
        return got

    if a.train_on == "all" and a.per == "token":
        ap.error("--train_on=all needs --per=row or suffix (a position without a target has no gain of its own)")
    results = {"ckpt": a.ckpt, "ahead": a.ahead, "per": a.per, "train_on": a.train_on, "steps": a.steps, "lr": a.lr, "k": a.k, "gamma": a.gamma,
               "before": scores("before")}
    for p in model.parameters():
        p.requires_grad_(False)
    gate = model.exit_gate
    for p in gate.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(gate.parameters(), lr=a.lr, weight_decay=0.0)
    batches = Batches(a.data_dir, meta, meta["seq_len"], 32, 1, seed=1)
    t0 = time.time()
    for step in range(a.steps):
        x, y = batches.get("train", step, 0, device)
        target, hidden, scored = gate_targets(model, x, y, a.ahead, a.k, a.gamma, a.per)
        lam_logits = gate(hidden[:-1]).squeeze(-1)                                   # (R-1, B, T)
        loss = F.binary_cross_entropy_with_logits(lam_logits, target, reduction="none")
        if a.train_on == "all":   # the positions without a target too (the first token, whose row all read)
            scored = torch.ones_like(scored)
        loss = (loss * scored).sum() / (scored.sum() * (R - 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step}: gate loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    results["after"] = scores("after")
    results["train_seconds"] = round(time.time() - t0, 1)   # the gate's training and the scoring after it
    if a.out:
        with open(a.out, "w") as f:
            json.dump({k: ({str(q): v for q, v in r.items()} if isinstance(r, dict) else r) for k, r in results.items()},
                      f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
