"""
Train a standard transformer, a LoopLM or MELT, or make MELT from a trained LoopLM (phase 1 of
the MELT paper: the interpolated transition).

    python train.py                                   # small MELT on Shakespeare, CPU-friendly
    python train.py config/cpu_looplm.py              # a config file, then --key=value overrides
    python train.py --cache=loop --n_loop=4 --max_iters=500
    torchrun --standalone --nproc_per_node=4 train.py config/gpu_looplm.py   # several GPUs, DDP

Config files are Python files of plain `name = value` lines; they are parsed, not executed.
Every key is a field of TrainConfig below or of melt.MeltConfig; unknown keys are refused.
distill.py (phase 2) imports its config, data, checkpoint and loop code from here.
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from config import ConfigError, parse_config, run_cli  # noqa: F401 (distill.py uses them)
from melt import MELT, MeltConfig, exit_choice
from serve.checkpoint import (RunDir, load_checkpoint, load_model, model_from_checkpoint,  # noqa: F401
                              restore_training_state, save_checkpoint)
from serve.runtime import GraphedStep, Runtime, check_cuda_graph, flops_per_token, peak_flops  # noqa: F401

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
from data.loader import Batches, load_meta  # noqa: E402,F401 (tests and distill.py use them from here)
from data.prepare import ensure_dataset, load_tokenizer  # noqa: E402

@dataclass
class TrainConfig:
    out_dir: str = "out"                 # where ckpt.pt and log.jsonl go
    init_from: str = "scratch"           # "scratch", "resume" (from out_dir), a checkpoint .pt, or an Ouro directory
    overwrite: bool = False              # a scratch run may replace an existing out_dir/ckpt.pt
    dataset: str = "shakespeare_char"    # a folder under data/ (built-ins are prepared when missing)
    batch_size: int = 16                 # sequences per micro-batch (per process)
    grad_accum: int = 1                  # micro-batches per optimizer step (per process)
    max_iters: int = 1000                # optimizer steps
    lr: float = 2e-3                     # peak learning rate of the base weights
    min_lr: float = 2e-4                 # floor of the cosine schedule
    warmup_iters: int = 100              # linear warmup steps
    lr_decay_iters: int = 0              # cosine length; 0 means max_iters
    weight_decay: float = 0.1            # AdamW decay, matrices only
    beta1: float = 0.9                   # AdamW first-moment decay
    beta2: float = 0.99                  # AdamW second-moment decay
    grad_clip: float = 1.0               # clip the global gradient norm; 0 disables
    gate_lr: float = 0.0                 # learning rate of the MELT gates; 0 means lr (the paper: ~60x lr in phase 1)
    alpha_steps: int = 0                 # transition: steps over which alpha ramps 0 -> 1; 0 means alpha = 1 throughout
    kd_weight: float = 0.0               # transition: weight of KL(start model || model) on the last loop
    kd_temperature: float = 1.0          # temperature of that KD term
    eval_interval: int = 250             # steps between evals (and checkpoints)
    eval_iters: int = 20                 # batches per eval split
    log_interval: int = 10               # steps between progress-bar updates
    sample_tokens: int = 300             # tokens sampled at the end, at most the context (0: none)
    seed: int = 1337                     # fixes the init and the data order
    device: str = "auto"                 # "auto" (cuda if present), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"                  # "auto": bfloat16 on GPUs that have it, else float16 (GradScaler); float32 on CPU
    compile: bool = False                # torch.compile the model (the uncompiled module is what gets saved)
    cuda_graph: bool = False             # one GPU: replay each micro-step's forward and backward as CUDA graphs (GraphedStep)
    threads: int = 0                     # CPU threads for torch; 0 leaves torch's default
    min_loops: int = 0                   # > 0: each step runs a loop count drawn from [min_loops, max_loops] (the dial)
    max_loops: int = 0                   # the draw's top; 0 means n_loop (more: loop counts past the trained one)


# The model trained by `python train.py` when nothing else is said: small enough for a 2-core CPU.
# loss: with Ouro's expected_logits the exit gate collapses onto loop 1 at this scale and the
# later loops never train; the entropy bonus at weight 1.0 keeps every loop trained (RESULTS.md).
DEFAULT_MODEL = dict(n_layer=2, n_loop=4, n_embd=128, n_head=4, block_size=128,
                     chunk_size=32, cache="shared", gate="learned", loss="expected_loss", entropy_weight=1.0)


# ---- configuration ---------------------------------------------------------------------------

def parse_args(argv, train_cls=TrainConfig):
    """argv -> (train config, model keys the user set): config files first, then --key=value."""
    cfg, model_keys = parse_config(argv, train_cls, DEFAULT_MODEL if train_cls is TrainConfig else None)
    return check_train_config(cfg), model_keys


def resume_config(cfg):
    """init_from=resume continues the run as it was configured: the checkpoint's training config,
    with the keys given on the command line over it (printed, so that a change is seen)."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.init_from != "resume" or not os.path.isfile(path):
        return cfg   # build() says what is missing
    try:   # memory-mapped: only the small train_config is read here; build() loads the weights once
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["train_config"]
    except Exception:
        saved = load_checkpoint(path)["train_config"]   # says what is wrong with the file
    given = getattr(cfg, "_given", {f.name for f in fields(cfg)})
    names = {f.name for f in fields(cfg)} - {"init_from", "out_dir"}
    new = replace(cfg, **{k: v for k, v in saved.items() if k in names and k not in given})
    new._given = given
    changed = {k: getattr(cfg, k) for k in sorted(given & names) if k in saved and saved[k] != getattr(cfg, k)}
    if int(os.environ.get("RANK", 0)) == 0:
        say_changed("training", path, changed, saved)
    return check_train_config(new)


def say_changed(what, path, changed, saved):
    """On resume: the keys given on the command line that differ from the checkpoint's, printed."""
    if changed:
        print(f"resume: the {what} config saved in {path}, with from the command line: "
              + ", ".join(f"{k}={v!r} (was {saved[k]!r})" for k, v in changed.items()))


def check_train_config(cfg):
    """Refuse the values that cannot train, with the key and the fix."""
    for key in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be >= 1")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "alpha_steps", "sample_tokens", "threads", "min_loops",
                "max_loops"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be >= 0")
    for key in ("lr", "min_lr", "weight_decay", "grad_clip", "gate_lr", "kd_weight"):
        if not (getattr(cfg, key) >= 0 and math.isfinite(getattr(cfg, key))):
            raise ConfigError(f"{key}={getattr(cfg, key)} must be a finite number >= 0")
    if not (cfg.kd_temperature > 0 and math.isfinite(cfg.kd_temperature)):
        raise ConfigError(f"kd_temperature={cfg.kd_temperature} must be a finite number > 0")
    if not 0 <= cfg.beta1 < 1 or not 0 <= cfg.beta2 < 1:
        raise ConfigError(f"beta1={cfg.beta1} and beta2={cfg.beta2} must lie in [0, 1)")
    return cfg


# ---- scoring ---------------------------------------------------------------------------------------

def token_ce(logits, y):
    """Mean cross-entropy of logits (..., V) against targets y (...), in float32, targets of -1
    left out. What every eval reports as a cross-entropy."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-1)


@torch.no_grad()
def answers(model, x, n_loops=None, alpha=None, exit_threshold=None, chunk_size=1, sweeps=0, loops=False):
    """Greedy predictions (B, T), and with loops=True the loop each one comes from (B, T), 1-based:
    the loop that exit_threshold chooses. By default at decode semantics: in shared mode every
    earlier token final, as when generating (chunks of one token); a loop cache needs no chunks."""
    out = model.run(x, n_loops=n_loops, alpha=alpha, exit_threshold=exit_threshold,
                    chunk_size=chunk_size, sweeps=sweeps)
    pred = model.lm_head(out.selected).argmax(-1)
    if not loops:
        return pred, None
    q = model.config.exit_threshold if exit_threshold is None else exit_threshold
    return pred, exit_choice(out.exit_probs, q) + 1


def accuracy(model, x, y, **kw):
    """Exact-match hits (B, T) bool of the greedy prediction where y != -1, and the mask of those
    positions (answers' keyword arguments pass through)."""
    pred, _ = answers(model, x, **kw)
    scored = y != -1
    return (pred == y) & scored, scored


def accuracy_by_hops(model, x, y, meta, **kw):
    """{p: (hits, scored, loops)} on p-hop rows x, y (data/prepare.py: token 0 names p), at decode
    semantics; loops: the loops of the scored answers, summed (answers' keyword arguments pass through)."""
    pred, loops = answers(model, x, loops=True, **kw)
    scored = y != -1
    hits = (pred == y) & scored
    p = x[:, 0] - meta["alphabet"] + 1
    return {h: (int(hits[p == h].sum()), int(scored[p == h].sum()), int((loops * scored)[p == h].sum()))
            for h in meta["hops"]}


# ---- optimisation ------------------------------------------------------------------------------

def make_optimizer(model, cfg, device_type):
    """AdamW; decay on matrices only; the MELT gates in their own group at gate_lr."""
    gates, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".gate." in name:
            gates.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay, lr_scale=1.0),
              dict(params=no_decay, weight_decay=0.0, lr_scale=1.0)]
    if gates:
        groups.append(dict(params=gates, weight_decay=0.0, lr_scale=(cfg.gate_lr / cfg.lr) if cfg.gate_lr else 1.0))
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to min_lr."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def alpha_at(step, cfg, model_cfg):
    """The transition's interpolation coefficient: 0 -> 1 linearly over alpha_steps."""
    if model_cfg.cache != "shared" or cfg.alpha_steps <= 0:
        return 1.0
    return min(1.0, step / cfg.alpha_steps)


def loops_at(step, cfg, model_cfg):
    """The loops a training step runs: None (the model's n_loop) unless min_loops is set, then a
    count drawn uniformly from [min_loops, max_loops or n_loop], a function of (seed, step) alone like the
    batches, so every DDP process draws the same and a resumed run the same sequence. Trains every
    depth of the dial: a student read at any loop count sees such rows in training."""
    if not cfg.min_loops:
        return None
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 2 + 7)
    return int(torch.randint(cfg.min_loops, (cfg.max_loops or model_cfg.n_loop) + 1, (1,), generator=g))


# ---- evaluation ------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, batches, cfg, rt, alpha):
    """Objective and cross-entropy on eval_iters fixed batches of each split; for a dataset
    with targets, the exact-match accuracy on the validation batches at decode semantics."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses, ces, hits, scored = [], [], 0, 0
        for i in range(cfg.eval_iters):
            for micro in range(cfg.grad_accum):   # the whole global batch, split like training's
                x, y = batches.eval_batch(split, i, micro, rt.device)
                with rt.autocast:
                    logits, loss = model(x, y, alpha=alpha)
                    if batches.targets is not None and split == "val":
                        h, s = accuracy(model, x, y, alpha=alpha)
                        hits, scored = hits + int(h.sum()), scored + int(s.sum())
                losses.append(loss.item())
                ces.append(token_ce(logits, y).item())
        out[split + "_loss"] = rt.all_mean(sum(losses) / len(losses))
        out[split + "_ce"] = rt.all_mean(sum(ces) / len(ces))
        if scored:
            out["val_acc"] = rt.all_mean(hits / scored)
    model.train()
    return out


def sample_text(model, tok, device, n_tokens, seed=0, prompt="\n"):
    ids = torch.tensor([tok.encode(prompt)], device=device)
    n_tokens = min(n_tokens, model.config.block_size - ids.shape[1])   # the model's context
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, n_tokens, temperature=0.8, top_k=40, generator=g)
    return tok.decode(out[0].tolist())


# ---- building the run ------------------------------------------------------------------------

def check_model_against_data(model_cfg, meta, dataset, saved_meta=None, who="the checkpoint"):
    """The data must fit the model's vocabulary, and a model trained on other data (resume,
    init_from a checkpoint, a teacher) must have read the same tokenizer: ids would change meaning."""
    if meta["vocab_size"] > model_cfg.vocab_size:
        raise ConfigError(f"dataset {dataset!r} has vocab_size {meta['vocab_size']} but the model has "
                          f"{model_cfg.vocab_size}: prepare the data with the model's tokenizer")
    if saved_meta is not None:
        keys = ("tokenizer", "chars", "tokenizer_json", "vocab_size", "alphabet", "hops")
        diff = [k for k in keys if saved_meta.get(k) != meta.get(k)]
        if diff:
            raise ConfigError(f"dataset {dataset!r} does not use the tokenizer {who} was trained with "
                              f"(they differ in {diff[0]}): train on that checkpoint's dataset")


class Recipe:
    """What a run of train.py starts from; distill.py's DistillRecipe says it for phase 2. The rest
    of the build (the out_dir's lock and overwrite guard, the log, resume, the tokenizer checks,
    the optimizer) is build()'s, the same for both."""

    def check_config(self, cfg):
        """Settings of this recipe that contradict each other, refused before anything is loaded."""

    def start(self, cfg, model_keys, meta):
        """A new run's model, and the tokenizer description its weights read (None: new weights)."""
        if cfg.init_from == "scratch":
            return MELT(MeltConfig(**{**DEFAULT_MODEL, "vocab_size": meta["vocab_size"], **model_keys})), None
        return load_model(cfg.init_from, dtype=torch.float32, **model_keys)

    def teacher(self, cfg, start, rt):
        """(the frozen model of the KD term, its tokenizer description), or (None, None): the start
        model in loop mode. start is the run's first init_from (a resume keeps its own)."""
        if cfg.kd_weight == 0:
            return None, None
        if start in ("scratch", "resume"):
            raise ConfigError("kd_weight > 0 distils from the start model, but this run started from scratch: "
                              "give --init_from=CHECKPOINT, or drop kd_weight")
        teacher, meta = load_model(start, dtype=torch.float32, cache="loop")
        return teacher, None if os.path.isdir(start) else meta   # an Ouro directory: data/prepare.py checks

    def check(self, cfg, model, teacher, meta):
        """What the built model (and teacher) must satisfy beyond the shared checks."""


def build(cfg, model_keys, rt, run_dir=None, recipe=Recipe()):
    """(model, optimizer, start step, best val loss, teacher for KD or None, data dir, meta).
    run_dir: the claimed RunDir of the run (train() claims it)."""
    recipe.check_config(cfg)
    data_dir = ensure_dataset(cfg.dataset)
    meta = load_meta(data_dir)
    run_dir = run_dir or RunDir(cfg.out_dir)
    start_step, best, saved_meta = 0, float("inf"), None
    torch.manual_seed(cfg.seed)
    if cfg.init_from == "resume":
        if not os.path.isfile(run_dir.ckpt):
            raise ConfigError(f"init_from=resume but {run_dir.ckpt} does not exist: train first, or set out_dir")
        ckpt = load_checkpoint(run_dir.ckpt)
        saved = ckpt["model_config"]
        changed = {k: v for k, v in sorted(model_keys.items()) if k in saved and saved[k] != v}
        if rt.master:   # the new checkpoint keeps them
            say_changed("model", run_dir.ckpt, changed, saved)
        model = model_from_checkpoint(ckpt, **model_keys)
        start_step, best, saved_meta = ckpt["step"], ckpt["best_val_loss"], ckpt.get("data_meta")
        start = ckpt["train_config"].get("init_from")
    else:
        if rt.master:
            run_dir.start_new(cfg.overwrite)
        model, saved_meta = recipe.start(cfg, model_keys, meta)
        start = cfg.init_from
    teacher, teacher_meta = recipe.teacher(cfg, start, rt)
    mc = model.config
    recipe.check(cfg, model, teacher, meta)
    check_model_against_data(mc, meta, cfg.dataset, saved_meta)
    if teacher is not None:
        check_model_against_data(teacher.config, meta, cfg.dataset, teacher_meta, who="the teacher")
    if mc.cache == "loop" and (cfg.alpha_steps or cfg.gate_lr):
        raise ConfigError(f"{'alpha_steps' if cfg.alpha_steps else 'gate_lr'} is for MELT (cache=shared); "
                          f"this model has cache=loop, where it would do nothing: drop it")
    if cfg.min_loops > (cfg.max_loops or mc.n_loop) or (cfg.max_loops and not cfg.min_loops):
        raise ConfigError(f"min_loops={cfg.min_loops} and max_loops={cfg.max_loops}: draw from 1 <= min_loops <= "
                          f"max_loops (0: the model's n_loop={mc.n_loop})")
    if mc.cache == "shared" and mc.chunk_size > mc.block_size:
        raise ConfigError(f"chunk_size={mc.chunk_size} is larger than block_size={mc.block_size}")
    model.to(rt.device)
    optimizer = make_optimizer(model, cfg, rt.device.type)
    if cfg.init_from == "resume":
        restore_training_state(ckpt, optimizer)
    if teacher is not None:
        teacher.to(rt.device).eval().requires_grad_(False)
    return model, optimizer, start_step, best, teacher, data_dir, meta


def kd_loss(student_logits, teacher_logits, temperature, targets=None):
    """KL(teacher || student) of next-token distributions (B, T, V) at a temperature, mean over
    tokens; with targets (B, T), over the scored ones only (not -1). A weighted mean, not a
    selection: no shape depends on the data, so a CUDA-graphed step can record it."""
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(s, p, log_target=True, reduction="none").sum(-1)   # (B, T)
    w = torch.ones_like(kl) if targets is None else (targets != -1).float()
    return (kl * w).sum() / w.sum().clamp_min(1.0) * t * t


class LMObjective(torch.nn.Module):
    """What train.py minimises for one micro-batch: the model's LM loss (MeltConfig.loss), plus,
    during the transition with kd_weight > 0, KL(start model || model) on the last loop. A module,
    so that DDP and torch.compile wrap the whole computation of the loss. The frozen teacher's
    outputs are computed outside it (teacher_outputs) and passed in. Returns (loss, parts): parts
    are the terms to show, "ce" the cross-entropy whenever the loss is something else."""

    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg

    @torch.no_grad()
    def teacher_outputs(self, teacher, x, n_loops=None):
        return teacher.lm_head(teacher.run(x, n_loops=n_loops).hidden[-1])

    def forward(self, x, y, alpha, teacher_out=None, n_loops=None):
        out = self.model.run(x, alpha=alpha, n_loops=n_loops)
        lm = self.model.loss(out, y)
        parts = {}
        c = self.model.config
        if c.loss != "last" or c.exit_threshold < 1.0:   # the objective is not the CE of what generation uses
            with torch.no_grad():
                parts["ce"] = token_ce(self.model.lm_head(out.selected), y)
        if teacher_out is None:
            return lm, parts
        kd = kd_loss(self.model.lm_head(out.hidden[-1]), teacher_out, self.cfg.kd_temperature, y)
        return lm + self.cfg.kd_weight * kd, {**parts, "lm": lm.detach(), "kd": kd.detach()}


# ---- the training loop ---------------------------------------------------------------------------

def train(cfg, model_keys, objective_cls=LMObjective, build_fn=build):
    """The loop shared by train.py and distill.py: build, then step / eval / checkpoint."""
    cfg = resume_config(cfg)
    rt = Runtime(cfg)
    check_cuda_graph(cfg, rt)
    run_dir = RunDir(cfg.out_dir)
    if rt.master:
        run_dir.claim()   # the run's only writer until it ends (a second run is refused)
    try:
        return _train(cfg, model_keys, objective_cls, build_fn, rt, run_dir)
    finally:
        run_dir.release()


def _train(cfg, model_keys, objective_cls, build_fn, rt, run_dir):
    from tqdm import tqdm

    raw, optimizer, step, best, teacher, data_dir, meta = build_fn(cfg, model_keys, rt, run_dir)
    start_step = step
    batches = Batches(data_dir, meta, raw.config.block_size, cfg.batch_size, cfg.grad_accum, rt.rank, rt.world,
                      cfg.seed)
    objective = objective_cls(raw, cfg)
    step_fn = ddp = objective
    if rt.ddp:   # unused parameters are normal here: gates at alpha=0, the exit gate with loss="last"
        step_fn = ddp = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
            find_unused_parameters=True)
    if cfg.compile:
        step_fn = torch.compile(step_fn)   # raw stays uncompiled: it is what gets saved
    if cfg.cuda_graph:
        step_fn = GraphedStep(objective, rt)
    scaler = torch.amp.GradScaler(enabled=rt.dtype == "float16")
    log_path, ckpt_path = run_dir.log, run_dir.ckpt
    tokens_per_step = cfg.batch_size * cfg.grad_accum * rt.world * batches.width
    flops = flops_per_token(raw.config, batches.width) * tokens_per_step
    peak = peak_flops(rt.device)
    if rt.master:
        c = raw.config
        print(f"model: {raw.num_params()/1e6:.2f}M parameters, {c.n_layer} layers x {c.n_loop} loops, "
              f"cache={c.cache}" + (f", gate={c.gate}, chunk_size={c.chunk_size}, sweeps={c.sweeps}"
                                    if c.cache == "shared" else "")
              + f"; {tokens_per_step:,} tokens per step on {rt.device} ({rt.dtype})")
    # a bar on a terminal; in a file (nohup, a lesson row's log) a line at each log interval instead
    on_tty = sys.stderr.isatty()
    bar = tqdm(total=cfg.max_iters, initial=step, disable=not (rt.master and on_tty), dynamic_ncols=True)
    t0 = time.time()

    def do_eval(step):
        nonlocal best
        alpha = alpha_at(step, cfg, raw.config)
        # *_loss: the training objective; *_ce: cross-entropy of the logits generation uses
        rec = dict(step=step, **evaluate(raw, batches, cfg, rt, alpha), alpha=alpha, lr=lr_at(step, cfg))
        if hasattr(objective, "eval_extra"):
            rec.update(objective.eval_extra(teacher, batches, rt, alpha))
        rec["time"] = time.time()
        best = min(best, rec["val_loss"])
        if rt.master:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            (bar.write if on_tty else print)(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in rec.items() if k != "time"))
        return rec

    raw.train()
    rec = None   # the last eval (a resumed run's first step was evaluated and logged before the stop)
    while step < cfg.max_iters:
        if step % cfg.eval_interval == 0 and not (cfg.init_from == "resume" and step == start_step):
            rec = do_eval(step)
            if step > 0 and rt.master:
                save_checkpoint(ckpt_path, raw, optimizer, cfg, step, best, dict(data_meta=meta))
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        alpha = alpha_at(step, cfg, raw.config)
        n_loops = loops_at(step, cfg, raw.config)
        total, parts = 0.0, {}
        for micro in range(cfg.grad_accum):
            x, y = batches.get("train", step, micro, rt.device)
            sync = ddp.no_sync() if rt.ddp and micro < cfg.grad_accum - 1 else nullcontext()
            with sync, rt.autocast:
                depth = () if n_loops is None else (n_loops,)   # a drawn loop count (min_loops), if any
                t_out = objective.teacher_outputs(teacher, x, *depth) if teacher is not None else None
                loss, parts = step_fn(x, y, alpha, t_out, *depth)
                loss = loss / cfg.grad_accum
            scaler.scale(loss).backward()
            total += loss.item()
            # drop the step's autograd graph now: kept alive into the next step, its gradient
            # accumulators (on the default stream) would break a CUDA-graph recording (GraphedStep)
            del loss
        if not math.isfinite(total):
            bar.close()
            raise ConfigError(f"loss became {total} at step {step}; stopped. The last good checkpoint "
                              f"({ckpt_path}, if any) is untouched: lower lr or check the data")
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            dt = (time.time() - t0) / cfg.log_interval
            t0 = time.time()
            post = dict(loss=f"{rt.all_mean(total):.4f}")
            post.update({k: f"{v.item():.4f}" for k, v in parts.items()})
            post.update(tok_s=f"{tokens_per_step / dt:,.0f}",
                        mfu=f"{100 * flops / dt / (peak * rt.world):.1f}%" if peak else "n/a")
            if raw.config.cache == "shared" and cfg.alpha_steps:
                post["alpha"] = f"{alpha:.2f}"
            if n_loops is not None:
                post["loops"] = str(n_loops)
            bar.set_postfix(post, refresh=False)
            if rt.master and not on_tty:
                print(f"step {step}/{cfg.max_iters} | " + " | ".join(f"{k} {v}" for k, v in post.items()), flush=True)
        bar.update(1)
    if rec is None or rec["step"] != step:
        rec = do_eval(step)
    if rt.master:
        save_checkpoint(ckpt_path, raw, optimizer, cfg, step, best, dict(data_meta=meta))
    bar.close()
    rt.close()
    return raw, rec, meta


def final_line(rec):
    """The run's last words: validation cross-entropy, and the objective beside it when it differs."""
    line = f"val CE {rec['val_ce']:.4f}"
    if abs(rec["val_loss"] - rec["val_ce"]) > 1e-9:
        line += f" (objective {rec['val_loss']:.4f})"
    if "val_acc" in rec:
        line += f", val accuracy {rec['val_acc']:.3f} (decode semantics)"
    return line


def main(argv):
    cfg, model_keys = parse_args(argv)
    model, rec, meta = train(cfg, model_keys)
    if cfg.sample_tokens and int(os.environ.get("RANK", 0)) == 0 and not meta.get("targets"):
        tok = load_tokenizer(meta)
        print("-" * 60)
        print(sample_text(model, tok, next(model.parameters()).device, cfg.sample_tokens))
        print("-" * 60)
    print(f"final: {final_line(rec)}; checkpoint {os.path.join(cfg.out_dir, 'ckpt.pt')}")


if __name__ == "__main__":
    run_cli(main, "train.py")
