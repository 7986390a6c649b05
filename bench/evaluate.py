"""
Score a checkpoint the way it will be used: one JSON line with the validation cross-entropy of the
logits generation uses, each loop's cross-entropy, the mean exit distribution, accuracy per hop
count (p-hop data), KV-cache bytes per token, decode tokens/s and mean loops used.

    python bench/evaluate.py out/ckpt.pt
    python bench/evaluate.py out-cpu/looplm/ckpt.pt --cache=shared --gate=last     # zero-shot sharing
    python bench/evaluate.py out/ckpt.pt --n_loops=6 --exit_threshold=0.9
    ... --label=NAME --log=results.jsonl   (append the line to a file, with a label)
    ... --device=cpu                       (default: the GPU where there is one)

A shared-cache model is scored at decode semantics: chunk_size=1, so every earlier token is
already final, exactly as when decoding (train-time chunks would let a token see its chunk
neighbours' unfinished rows). `--chunk_size=N` (and `--sweeps=K`) score it at chunks of N instead,
what train.py's own evaluations compute. The data are the first `--batches` fixed validation
batches, the same for every model.
"""

import json
import os
import sys
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train as T  # noqa: E402
from config import ConfigError, parse_config, run_cli  # noqa: E402
from serve.checkpoint import load_checkpoint, load_model  # noqa: E402
from serve.runtime import pick_device, set_threads  # noqa: E402


@dataclass
class EvalConfig:
    label: str = ""              # the line's label; "" means the checkpoint's path
    log: str = ""                # also append the line to this file
    n_loops: int = 0             # loops at inference; 0 means the model's n_loop
    batches: int = 6             # fixed validation batches of 16 rows
    exit_threshold: float = 1.0  # below 1: adaptive depth (shared mode stops looping per token)
    device: str = "auto"         # "auto" (the GPU where there is one), "cpu", "cuda", ...
    threads: int = 2             # CPU threads


def main(argv):
    cfg, overrides = parse_config([a for a in argv if a.startswith("-")], EvalConfig)
    paths = [a for a in argv if not a.startswith("-")]
    if len(paths) != 1:
        raise ConfigError("give one checkpoint path (and --key=value options)")
    if cfg.batches < 1 or cfg.n_loops < 0 or not 0 < cfg.exit_threshold <= 1:
        raise ConfigError(f"batches={cfg.batches} must be >= 1, n_loops={cfg.n_loops} >= 0 (0: the model's), "
                          f"exit_threshold={cfg.exit_threshold} in (0, 1]")
    label, log, n_loops, batches_n, threshold = cfg.label or paths[0], cfg.log, cfg.n_loops or None, cfg.batches, cfg.exit_threshold
    device = pick_device(cfg.device)
    set_threads(cfg.threads)
    ckpt = load_checkpoint(paths[0])
    chunk = overrides.pop("chunk_size", 1)   # decode semantics unless asked
    model, meta = load_model(paths[0], **overrides)
    model.eval().to(device)
    data_dir = T.ensure_dataset(ckpt["train_config"]["dataset"])
    # seed 1337 whatever the run trained with: every model is scored on the same rows
    batches = T.Batches(data_dir, meta, model.config.block_size, 16, 1, seed=1337)
    losses, loop_ce, exit_p, by_hops = [], [], [], {}
    ce = lambda logits, y: T.token_ce(logits, y).item()
    with torch.no_grad():
        for i in range(batches_n):
            x, y = batches.eval_batch("val", i, 0, device)
            out = model.run(x, n_loops=n_loops, exit_threshold=threshold, chunk_size=chunk)
            losses.append(ce(model.lm_head(out.selected), y))
            loop_ce.append([ce(lg, y) for lg in model.loop_logits(out)])
            exit_p.append(out.exit_probs.mean((1, 2)).tolist())
            if meta.get("task") == "phop":
                for p, (h, s, _) in T.accuracy_by_hops(model, x, y, meta, n_loops=n_loops,
                                                    exit_threshold=threshold, chunk_size=chunk).items():
                    a, b = by_hops.get(p, (0, 0))
                    by_hops[p] = (a + h, b + s)
        mean = lambda rows: [round(sum(c) / len(c), 4) for c in zip(*rows)]
        c = model.config
        rec = dict(label=label, val_ce=sum(losses) / len(losses), loop_ce=mean(loop_ce), exit_p=mean(exit_p),
                   cache=c.cache, gate=c.gate if c.cache == "shared" else None,
                   chunk_size=chunk if c.cache == "shared" else None, n_loops=n_loops or c.n_loop,
                   exit_threshold=threshold)
        if by_hops:
            rec["accuracy_by_hops"] = {p: round(h / max(s, 1), 4) for p, (h, s) in by_hops.items()}
        rec["kv_bytes_per_token"] = model.kv_bytes_per_token(n_loops)
        cache = model.new_cache(1, c.block_size, n_loops=n_loops, device=device)
        prompt = torch.zeros((1, min(32, c.block_size // 2)), dtype=torch.long, device=device)
        n_new = min(64, c.block_size - prompt.shape[1])
        stream = model.generate_stream(prompt, n_new, temperature=0, cache=cache, n_loops=n_loops,
                                       exit_threshold=threshold)
        next(stream)
        t, used = time.perf_counter(), []
        for _, u in stream:
            used.append(float(u.float().mean()))
        rec["decode_tok_s"] = len(used) / (time.perf_counter() - t)
        rec["mean_loops_decode"] = sum(used) / max(1, len(used))
    line = json.dumps(rec)
    print(line)
    if log:
        with open(log, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    run_cli(main, "evaluate.py")
