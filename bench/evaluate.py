"""
Score a checkpoint the way it will be used: one JSON line with validation loss (cross-entropy of
the logits generation uses; on the answer digits only for a run trained with answer_only=True),
each loop's cross-entropy, the mean exit distribution, task accuracy (reasoning data), KV-cache
bytes per token, decode tokens/s and mean loops used.

    python bench/evaluate.py out-cpu/looplm/ckpt.pt
    python bench/evaluate.py out-cpu/looplm/ckpt.pt --cache=shared --gate=last     # zero-shot sharing
    python bench/evaluate.py out-cpu/melt/ckpt.pt --n_loops=6 --exit_threshold=0.9
    ... --label=NAME --log=results.jsonl   (append the line to a file, with a label)
    ... --device=cpu                       (default: the GPU where there is one)

A shared-cache model is scored at inference semantics: chunk_size=1, so every earlier token is
already final, exactly as when decoding (train-time chunks would let a token see its chunk
neighbours' unfinished rows). `--chunk_size=N` scores it at chunks of N instead (at the training
chunks: what train.py's own evaluations and a chunked prefill compute). The data are the first
`--batches` fixed validation batches, the same for every model.
"""

import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train as T  # noqa: E402


def main(argv):
    opts = {a[2:].split("=", 1)[0]: a[2:].split("=", 1)[1] for a in argv if a.startswith("--")}
    paths = [a for a in argv if not a.startswith("--")]
    if len(paths) != 1:
        raise T.ConfigError("give one checkpoint path")
    label, log = opts.pop("label", paths[0]), opts.pop("log", None)
    n_loops = int(opts.pop("n_loops", 0)) or None
    batches_n = int(opts.pop("batches", 6))
    threshold = float(opts.pop("exit_threshold", 1.0))
    # the GPU where there is one (the GPU setting's 8 x 512 models at chunk 1 are slow on 2 cores)
    device = torch.device(opts.pop("device", "cuda" if torch.cuda.is_available() else "cpu"))
    _, overrides = T.parse_args([f"--{k}={v}" for k, v in opts.items()])
    ckpt = T.load_checkpoint(paths[0])
    if overrides.get("cache", ckpt["model_config"]["cache"]) == "shared" and "chunk_size" not in overrides:
        overrides["chunk_size"] = 1     # inference semantics: every earlier token is final
    model = T.model_from_checkpoint(ckpt, **overrides).eval().to(device)
    torch.set_num_threads(2)
    tcfg = ckpt["train_config"]
    data_dir = T.ensure_dataset(tcfg["dataset"])
    meta = T.load_meta(data_dir)
    # seed 1337 whatever the run trained with: every model is scored on the same windows; a run
    # trained with answer_only=True is scored on the answer digits only, as it was trained
    answer_after = T.answer_marker(meta, tcfg.get("answer_only", False), tcfg["dataset"])
    hide = tcfg.get("hide_answers", False)   # trained with the answers blanked in the inputs: scored so too
    batches = T.Batches(data_dir, model.config.block_size, 16, 1, seed=1337, answer_after=answer_after,
                        blank=T.answer_blank(meta, hide))
    losses, loop_ce, exit_p = [], [], []
    ce = lambda logits, y: T.token_ce(logits, y).item()
    with torch.no_grad():
        for i in range(batches_n):
            x, y = batches.get("val", 10_000_000 + i, 0, device)
            out = model.run(x, n_loops=n_loops, exit_threshold=threshold)
            losses.append(ce(model.lm_head(out.selected), y))
            loop_ce.append([ce(lg, y) for lg in model.loop_logits(out)])
            exit_p.append(out.exit_probs.mean((1, 2)).tolist())
        mean = lambda rows: [round(sum(c) / len(c), 4) for c in zip(*rows)]
        rec = dict(label=label, val_loss=sum(losses) / len(losses), scored="all tokens" if answer_after is None else "answers",
                   loop_ce=mean(loop_ce), exit_p=mean(exit_p),
                   cache=model.config.cache,
                   gate=model.config.gate if model.config.cache == "shared" else None,
                   chunk_size=model.config.chunk_size if model.config.cache == "shared" else None,
                   n_loops=n_loops or model.config.n_loop, exit_threshold=threshold)
        if meta.get("task"):
            problems = T.task_problems(data_dir, meta, 200)
            rec["task_acc"] = T.task_accuracy(model, problems, device, n_loops=n_loops,
                                              exit_threshold=threshold)
            if meta.get("all_queries") or meta.get("queries", 1) > 1:   # several questions a line: each one's accuracy
                lines, hits = T.question_hits(model, data_dir, meta, 200, device, n_loops=n_loops,
                                              exit_threshold=threshold, hide_answers=hide)
                rec["task_acc_by_question"] = [round(a, 3) for a in T.accuracy_by_question(lines, hits)]
                if meta["task"] == "chains":   # and by depth, wherever asked
                    rec["task_acc_by_hops"] = {h: round(a, 3) for h, a in T.accuracy_by_hops(lines, hits).items()}
        cache = model.new_cache(1, model.config.block_size, n_loops=n_loops, device=device)
        rec["kv_bytes_per_token"] = cache.nbytes // model.config.block_size
        newline = T.load_tokenizer(meta).encode("\n")[0]
        prompt = torch.full((1, 32), newline, dtype=torch.long, device=device)   # 32 newlines, then 64 decoded tokens
        stream = model.generate_stream(prompt, 64, temperature=0, cache=cache, n_loops=n_loops,
                                       exit_threshold=threshold)
        next(stream)
        t, used = time.perf_counter(), []
        for _, u in stream:
            used.append(float(u.float().mean()))
        rec["decode_tok_s"] = len(used) / (time.perf_counter() - t)
        rec["mean_loops_decode"] = sum(used) / len(used)
    line = json.dumps(rec)
    print(line)
    if log:
        with open(log, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    T.run_cli(main, "evaluate.py")
