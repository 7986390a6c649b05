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

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train as T  # noqa: E402
from config import ConfigError, parse_config, run_cli  # noqa: E402
from melt import load_checkpoint, load_model  # noqa: E402


def main(argv):
    opts = {a[2:].split("=", 1)[0]: a[2:].split("=", 1)[1] for a in argv if a.startswith("--") and "=" in a}
    paths = [a for a in argv if not a.startswith("--")]
    if len(paths) != 1:
        raise ConfigError("give one checkpoint path")
    label, log = opts.pop("label", paths[0]), opts.pop("log", None)
    n_loops = int(opts.pop("n_loops", 0)) or None
    batches_n = int(opts.pop("batches", 6))
    threshold = float(opts.pop("exit_threshold", 1.0))
    device = torch.device(opts.pop("device", "cuda" if torch.cuda.is_available() else "cpu"))
    _, overrides = parse_config([f"--{k}={v}" for k, v in opts.items()], T.TrainConfig)
    ckpt = load_checkpoint(paths[0])
    chunk = overrides.pop("chunk_size", 1)   # decode semantics unless asked
    model, meta = load_model(paths[0], **overrides)
    model.eval().to(device)
    torch.set_num_threads(2)
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
                for p, (h, s) in T.accuracy_by_hops(model, x, y, meta, n_loops=n_loops,
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
        cache = model.new_cache(1, c.block_size, n_loops=n_loops, device=device)
        rec["kv_bytes_per_token"] = cache.nbytes // c.block_size
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
