"""
Train a standard transformer, a LoopLM or MELT, or make MELT from a trained LoopLM (phase 1 of
the MELT paper: the interpolated transition).

    python train.py                                   # small MELT on Shakespeare, CPU-friendly
    python train.py config/looplm_shakespeare.py      # a config file, then --key=value overrides
    python train.py --cache=loop --n_loop=4 --max_iters=500
    torchrun --standalone --nproc_per_node=4 train.py config/...   # several GPUs, DDP

Config files are Python files of plain `name = value` lines; they are parsed, not executed.
Every key is a field of TrainConfig below or of melt.MeltConfig; unknown keys are refused.
distill.py (phase 2) imports its config, data, checkpoint and loop code from here.
"""

import ast
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from melt import MELT, MeltConfig, MeltError

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
from data.prepare import ensure_dataset, load_tokenizer  # noqa: E402


class ConfigError(Exception):
    """A user error: printed as one line, exit status 2."""


@dataclass
class TrainConfig:
    out_dir: str = "out"                 # where ckpt.pt and log.jsonl go
    init_from: str = "scratch"           # "scratch", "resume" (from out_dir), a checkpoint .pt, or an Ouro directory
    dataset: str = "shakespeare_char"    # a folder under data/ (built-ins are prepared when missing)
    batch_size: int = 16                 # sequences per micro-batch (per process)
    grad_accum: int = 1                  # micro-batches per optimizer step (per process)
    max_iters: int = 1000                # optimizer steps
    lr: float = 2e-3                     # peak learning rate of the base weights
    min_lr: float = 2e-4                 # floor of the cosine schedule
    warmup_iters: int = 100              # linear warmup steps
    lr_decay_iters: int = 0              # cosine length; 0 means max_iters
    weight_decay: float = 0.1            # AdamW decay, matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0               # clip the global gradient norm; 0 disables
    gate_lr: float = 0.0                 # learning rate of the MELT gates; 0 means lr (the paper: ~60x lr in phase 1)
    alpha_steps: int = 0                 # transition: steps over which alpha ramps 0 -> 1; 0 means alpha = 1 throughout
    kd_weight: float = 0.0               # transition: weight of KL(start model || model) on the last loop
    kd_temperature: float = 1.0          # temperature of that KD term
    eval_interval: int = 250             # steps between evals (and checkpoints)
    eval_iters: int = 20                 # batches per eval split
    task_eval_n: int = 200               # reasoning dataset: problems per exact-match accuracy eval
    answer_only: bool = False            # reasoning dataset: score only the answer digits (the token 2 after '?')
    line_batches: bool = False           # reasoning dataset: each row one whole problem line (lines of one length), not a random window
    hide_answers: bool = False           # with answer_only: answer digits are targets only; inputs read '.' there (no elimination)
    log_interval: int = 10               # steps between progress-bar updates
    sample_tokens: int = 300             # tokens sampled at the end, at most the context (0: none)
    seed: int = 1337                     # fixes the init and the data order
    device: str = "auto"                 # "auto" (cuda if present), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"                  # "auto": bfloat16 on GPUs that have it, else float16 (GradScaler); float32 on CPU
    compile: bool = False                # torch.compile the model (the uncompiled module is what gets saved)
    cuda_graph: bool = False             # one GPU: replay each micro-step's forward and backward as CUDA graphs (GraphedStep)
    threads: int = 0                     # CPU threads for torch; 0 leaves torch's default


# The model trained by `python train.py` when nothing else is said: small enough for a 2-core CPU.
# loss: at this scale Ouro's expected_logits lets the exit gate collapse onto loop 1 (p_1 ~ 0.98
# after 300 steps) and the later loops never train; the entropy bonus at weight 1.0 keeps p near
# uniform so every loop is trained (README, "Choices").
DEFAULT_MODEL = dict(n_layer=2, n_loop=4, n_embd=128, n_head=4, block_size=128,
                     chunk_size=32, cache="shared", gate="learned", loss="expected_loss", entropy_weight=1.0)
# Fields that define the weights' shapes: a resume or init_from may not change them.
ARCH_KEYS = ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "mlp_hidden")


# ---- configuration ---------------------------------------------------------------------------

def _field_types(cls):
    return {f.name: f.type for f in fields(cls)}   # real types: this file has no postponed annotations


def coerce(key, value, typ):
    """Turn the string value of --key=value (or a config-file literal) into the field's type."""
    if isinstance(value, str) and typ is not str:
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            if typ is bool and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            else:
                raise ConfigError(f"--{key}={value!r} is not a valid {typ.__name__}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is bool and value in (0, 1) and not isinstance(value, bool):
        value = bool(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r} should be a {typ.__name__}")
    return value


def read_config_file(path):
    """`name = literal` lines of a config file, parsed with ast (nothing is executed)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    out = {}
    for node in ast.parse(open(path).read(), path).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue   # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"{path}:{node.lineno}: config files hold only `name = value` lines")
        try:
            out[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise ConfigError(f"{path}:{node.lineno}: the value of {node.targets[0].id} must be a literal") from None
    return out


def parse_args(argv, train_cls=TrainConfig):
    """argv -> (train config, model keys the user set). Config files first, then --key=value."""
    ttypes, mtypes = _field_types(train_cls), _field_types(MeltConfig)
    given = {}
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"{arg}: write --key=value")
            key, value = arg[2:].split("=", 1)
            given[key] = value
        else:
            given.update(read_config_file(arg))
    unknown = sorted(set(given) - set(ttypes) - set(mtypes))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; valid keys: {sorted(set(ttypes) | set(mtypes))}")
    train = {k: coerce(k, v, ttypes[k]) for k, v in given.items() if k in ttypes}
    model = {k: coerce(k, v, mtypes[k]) for k, v in given.items() if k in mtypes and k not in ttypes}
    return train_cls(**train), model


# ---- data --------------------------------------------------------------------------------------

class Batches:
    """Random windows of a token file. The windows of step `step` are a function of (seed,
    step) alone: every process draws the same global batch and takes its own rows, so one
    process with grad_accum=2 and two processes with grad_accum=1 see the same data, and a
    resumed run continues the same sequence. The data position is the step number.
    line_token: rows are whole lines instead ('\\n' + one problem, every line one length: the
    question always at the same position, no earlier problems in the context).
    blank (with answer_after): a token id that replaces every answer digit in the inputs, so the
    answers are targets only and a later question cannot use the earlier answers."""

    def __init__(self, data_dir, block_size, batch_size, grad_accum, rank=0, world=1, seed=0, answer_after=None,
                 line_token=None, blank=None):
        self.data = {s: np.memmap(os.path.join(data_dir, f"{s}.bin"), dtype=np.uint16, mode="r")
                     for s in ("train", "val")}
        self.block_size, self.batch_size, self.grad_accum = block_size, batch_size, grad_accum
        self.rank, self.world, self.seed = rank, world, seed
        self.answer_after = answer_after   # a token id: keep only targets 2 tokens after it ('?x=' -> digit)
        self.blank = blank
        if blank is not None and answer_after is None:
            raise ConfigError("hiding the answers needs answer_only=True (the answers are found by their '?')")
        for split, d in self.data.items():
            if len(d) <= block_size + 1:
                raise ConfigError(f"{split}.bin of {data_dir} has {len(d)} tokens, fewer than block_size+1")
        self.width, self.line_starts = block_size, None   # tokens per row; where rows may start (None: anywhere)
        if line_token is not None:
            self.line_starts = {s: np.flatnonzero(np.asarray(d) == line_token)[:-1] for s, d in self.data.items()}
            widths = {int(w) for s in self.data for w in np.diff(self.line_starts[s])}
            if len(widths) != 1 or max(widths) > block_size:
                raise ConfigError(f"line_batches=True needs lines of one length, at most block_size={block_size} "
                                  f"tokens; {data_dir} has line lengths {sorted(widths)[:5]}")
            self.width = widths.pop()

    def get(self, split, step, micro, device):
        """Micro-batch `micro` of this process at step `step` -> x, y (B, T) on device."""
        data = self.data[split]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 2 + (split == "val"))
        n = self.batch_size * self.grad_accum * self.world
        if self.line_starts is None:
            starts = torch.randint(len(data) - self.block_size - 1, (n,), generator=g)
        else:
            starts = torch.from_numpy(self.line_starts[split])[torch.randint(len(self.line_starts[split]), (n,), generator=g)]
        first = (self.rank * self.grad_accum + micro) * self.batch_size
        rows = [torch.from_numpy(data[i:i + self.width + 1].astype(np.int64))
                for i in starts[first:first + self.batch_size].tolist()]
        xy = torch.stack(rows)
        x, y = xy[:, :-1], xy[:, 1:]
        if self.answer_after is not None:   # y[t] is the answer when x[t-2] is the marker
            is_answer = torch.zeros_like(y, dtype=torch.bool)
            is_answer[:, 2:] = x[:, :-2] == self.answer_after
            y = y.masked_fill(~is_answer, -1)   # -1: ignored by every loss
            if self.blank is not None:      # x[t] is an answer when x[t-3] is the marker
                in_x = torch.zeros_like(x, dtype=torch.bool)
                in_x[:, 3:] = x[:, :-3] == self.answer_after
                x = x.masked_fill(in_x, self.blank)   # a new tensor: y keeps the digits
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


def answer_marker(meta, answer_only, dataset):
    """The token id that Batches(answer_after=...) keys on: '?', two tokens before each answer
    digit of the reasoning task; None unless answer_only."""
    if not answer_only:
        return None
    if not meta.get("task"):
        raise ConfigError(f"answer_only=True needs a reasoning dataset; {dataset!r} has no answers to score")
    return load_tokenizer(meta).encode("?")[0]


def answer_blank(meta, hide_answers):
    """The token id that Batches(blank=...) writes over the answers in the inputs: '.'; None
    unless hide_answers."""
    return load_tokenizer(meta).encode(".")[0] if hide_answers else None


def line_token(meta, cfg):
    """The token id that starts each line, for Batches(line_token=...) when line_batches; else None."""
    if not cfg.line_batches:
        return None
    if not meta.get("task"):
        raise ConfigError(f"line_batches=True needs a reasoning dataset (one problem per line); {cfg.dataset!r} is not one")
    return load_tokenizer(meta).encode("\n")[0]


def token_ce(logits, y):
    """Mean cross-entropy of logits (..., V) against targets y (...), in float32; targets of -1
    (not scored, answer_only) are left out. What every eval reports as a cross-entropy."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-1)


def load_meta(data_dir):
    with open(os.path.join(data_dir, "meta.json")) as f:
        return json.load(f)


# ---- devices, precision, DDP -------------------------------------------------------------------

class Runtime:
    """Device, autocast and the DDP process group, set up once."""

    def __init__(self, cfg):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.ddp:
            self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            self.local_rank = int(os.environ["LOCAL_RANK"])
        else:
            self.rank, self.world, self.local_rank = 0, 1, 0
        dev = cfg.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={cfg.device!r} but CUDA is not available")
        if self.ddp and dev.startswith("cuda"):
            dev = f"cuda:{self.local_rank}"
            torch.cuda.set_device(dev)
        self.device = torch.device(dev)
        if self.ddp:
            torch.distributed.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        self.master = self.rank == 0
        dtype = cfg.dtype
        if dtype == "auto":
            if self.device.type == "cuda":
                dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
            else:
                dtype = "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={cfg.dtype!r}: use auto, float32, bfloat16 or float16")
        self.dtype = dtype
        self.autocast = (nullcontext() if dtype == "float32" else
                         torch.autocast(device_type=self.device.type, dtype=getattr(torch, dtype)))
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def all_mean(self, x):
        """Mean of a float over processes (for logging)."""
        if not self.ddp:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.item() / self.world

    def close(self):
        if self.ddp:
            torch.distributed.destroy_process_group()


# ---- checkpoints -------------------------------------------------------------------------------

def save_checkpoint(path, raw_model, optimizer, cfg, step, best_val_loss, extra=None):
    """Everything to continue exactly, written to a temporary file and renamed, so that a kill at
    any moment leaves the previous checkpoint intact."""
    ckpt = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                model_config=asdict(raw_model.config), train_config=asdict(cfg), step=step,
                best_val_loss=best_val_loss, data_position=step, rng_cpu=torch.get_rng_state(),
                rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                **(extra or {}))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    """A checkpoint of this project (weights_only: no code runs on load)."""
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign pickle, a truncated file
        raise ConfigError(f"{path!r} is not a readable melt checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ConfigError(f"{path!r} is not a melt checkpoint (no model / model_config inside)")
    return ckpt


def restore_training_state(ckpt, optimizer):
    """What init_from=resume needs beyond the weights: optimizer moments and RNG state."""
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if ckpt["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])


def model_from_checkpoint(ckpt, **overrides):
    """Build the model a checkpoint holds; overrides may change the non-shape fields (cache,
    gate, chunk_size, ...) but not the architecture. A loop-mode checkpoint loaded with
    cache="shared" gets new gate parameters at their documented init."""
    saved = dict(ckpt["model_config"])
    for k in ARCH_KEYS:
        if k in overrides and overrides[k] != saved.get(k):
            raise ConfigError(f"checkpoint has {k}={saved.get(k)}, the config asks for {k}={overrides[k]}: "
                              f"architecture differs (drop the override or start from scratch)")
    model = MELT(MeltConfig(**{**saved, **overrides}))
    sd = ckpt["model"]
    if model.config.cache == "loop":
        sd = {k: v for k, v in sd.items() if ".gate." not in k}
    if model.config.cache == "shared" and saved.get("gate") != model.config.gate:
        sd = {k: v for k, v in sd.items() if ".gate." not in k}   # a different gate starts fresh
    model.load_weights(sd)
    return model


def load_start_model(init_from, overrides):
    """The model that init_from names: an Ouro directory or a checkpoint of this project."""
    if os.path.isdir(init_from):
        if not os.path.isfile(os.path.join(init_from, "config.json")):
            raise ConfigError(f"init_from={init_from!r} is a directory without config.json (not an Ouro checkpoint)")
        return MELT.from_ouro(init_from, dtype=torch.float32, **overrides)
    return model_from_checkpoint(load_checkpoint(init_from), **overrides)


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


def flops_per_token(model_cfg, T):
    """Training FLOPs per token (forward + backward), PaLM-style: 6 x (weights applied per
    token) + attention. A looped model applies its stack n_loop times, so its weights count
    n_loop times. Attention counts a full causal T x T per layer and loop."""
    c = model_cfg
    per_layer = c.n_embd * (c.n_head + 2 * c.n_kv_head) * c.head_dim + c.n_head * c.head_dim * c.n_embd \
        + 3 * c.n_embd * c.mlp_hidden
    if c.cache == "shared" and c.gate == "learned":
        per_layer += 2 * c.n_embd * c.n_embd
    n_applied = c.n_layer * c.n_loop * per_layer + c.n_loop * c.n_embd * c.vocab_size
    return 6 * n_applied + 12 * c.n_layer * c.n_loop * c.n_head * c.head_dim * T


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device):
    """Dense bf16 peak of the GPU, or None where unknown (then MFU is not shown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ---- evaluation ------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, batches, cfg, rt, alpha, step):
    """Mean loss on eval_iters batches of each split, at fixed data (the same every eval)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses, ces = [], []
        for i in range(cfg.eval_iters):
            for micro in range(cfg.grad_accum):   # the whole global batch, split like training's
                x, y = batches.get(split, 10_000_000 + i, micro, rt.device)
                with rt.autocast:
                    logits, loss = model(x, y, alpha=alpha)
                losses.append(loss.item())
                ces.append(token_ce(logits, y).item())
        out[split] = rt.all_mean(sum(losses) / len(losses))
        out[split + "_ce"] = rt.all_mean(sum(ces) / len(ces))
    model.train()
    return out


def val_problem_lines(data_dir, meta, n):
    """The tokenizer and the whole problem lines among the first n lines of val.bin (text, without
    the newline): what both accuracy evals read."""
    tok = load_tokenizer(meta)
    val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
    text = tok.decode(val[: 256 * (n + 1)].tolist())   # lines are under 256 tokens (all_queries ones too)
    return tok, [line for line in text.split("\n")[:n] if "?" in line and line.endswith(".")]


def task_problems(data_dir, meta, n):
    """The first n reasoning problems of val.bin as (prompt ids, answer id): each line's first question."""
    tok, lines = val_problem_lines(data_dir, meta, n)
    problems = []
    for line in lines:
        i = line.index("?")   # the line's first question ('?x=' then the digit); all_queries lines ask more after it
        prompt, answer = line[:i + 3], line[i + 3]
        problems.append((tok.encode("\n" + prompt), tok.encode(answer)[0]))
    return problems


@torch.no_grad()
def task_accuracy(model, problems, device, n_loops=None, alpha=None, exit_threshold=None):
    """Exact-match accuracy of the greedy answer digit (prompts batched by length)."""
    model.eval()
    by_len = {}
    for p, a in problems:
        by_len.setdefault(len(p), []).append((p, a))
    correct = 0
    for group in by_len.values():
        x = torch.tensor([p for p, _ in group], device=device)
        out = model.run(x, n_loops=n_loops, alpha=alpha, exit_threshold=exit_threshold)
        pred = model.lm_head(out.selected[:, -1]).argmax(-1).tolist()
        correct += sum(int(pr == a) for pr, (_, a) in zip(pred, group))
    model.train()
    return correct / max(1, len(problems))


@torch.no_grad()
def question_hits(model, data_dir, meta, n, device, n_loops=None, exit_threshold=None, hide_answers=False):
    """(lines, hits): the first n val lines of an all_queries or queries > 1 dataset (every line
    asks the same number of questions) and a (lines, questions) bool tensor, True where the model's
    greedy answer to that question of that line is right. Each line is read whole in one forward
    pass, as in training, so question k sees the answers to questions 1..k-1.
    hide_answers: the answers read '.' in the input, as a run trained with hide_answers saw them."""
    tok, lines = val_problem_lines(data_dir, meta, n)
    model.eval()
    x = torch.tensor([tok.encode("\n" + ln) for ln in lines], device=device)   # (n, 1 + line length)
    # '?' at line index i is x index i+1; the answer is x[:, i+4] ('?', letter, '='), predicted at i+3
    asks = [i for i, ch in enumerate(lines[0]) if ch == "?"]
    inp = x.clone()
    if hide_answers:
        inp[:, [i + 4 for i in asks]] = answer_blank(meta, True)
    out = model.run(inp, n_loops=n_loops, exit_threshold=exit_threshold)
    pred = model.lm_head(out.selected).argmax(-1)                               # pred[:, j] follows x[:, :j+1]
    model.train()
    return lines, torch.stack([pred[:, i + 3] == x[:, i + 4] for i in asks], dim=1)   # (n, questions)


def accuracy_by_question(lines, hits):
    """[accuracy of question 1, of question 2, ...] of a line, from question_hits: whether later
    questions are easier than the first, e.g. answerable by elimination (the last letter asked has
    the one digit of the line not yet given as an answer)."""
    return (hits.sum(0).double() / len(lines)).tolist()


def question_hops(line):
    """The hops of each question of a chain line, in order: 0 for a variable assigned a digit,
    1 + the hops of its right-hand side otherwise. 'r=4;b=r;?b=4;?r=4.' -> [1, 0]."""
    assigned = dict(stmt.split("=") for stmt in line[:line.index("?")].rstrip(";").split(";"))
    hops = lambda v: 0 if assigned[v].isdigit() else 1 + hops(assigned[v])
    return [hops(line[i + 1]) for i, ch in enumerate(line) if ch == "?"]


def accuracy_by_hops(lines, hits):
    """{hops: accuracy over every question of that many hops}, from question_hits on chain lines
    with every variable asked: which depth of lookup a model has learned, whatever the question's place."""
    right, total = {}, {}
    for line, row in zip(lines, hits.tolist()):
        for h, ok in zip(question_hops(line), row):
            right[h], total[h] = right.get(h, 0) + ok, total.get(h, 0) + 1
    return {h: right[h] / total[h] for h in sorted(total)}


def task_accuracy_by_question(model, data_dir, meta, n, device, **kw):
    """accuracy_by_question of the model on the first n val lines (question_hits)."""
    return accuracy_by_question(*question_hits(model, data_dir, meta, n, device, **kw))


def task_accuracy_by_hops(model, data_dir, meta, n, device, **kw):
    """accuracy_by_hops of the model on the first n val chain lines (question_hits)."""
    return accuracy_by_hops(*question_hits(model, data_dir, meta, n, device, **kw))


def sample_text(model, tok, device, n_tokens, seed=0, prompt="\n"):
    ids = torch.tensor([tok.encode(prompt)], device=device)
    n_tokens = min(n_tokens, model.config.block_size - ids.shape[1])   # the model's context
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, n_tokens, temperature=0.8, top_k=40, generator=g)
    return tok.decode(out[0].tolist())


# ---- the training loop ---------------------------------------------------------------------------

def check_model_against_data(model_cfg, meta, dataset):
    if meta["vocab_size"] > model_cfg.vocab_size:
        raise ConfigError(f"dataset {dataset!r} has vocab_size {meta['vocab_size']} but the model has "
                          f"{model_cfg.vocab_size}: prepare the data with the model's tokenizer")


def build(cfg, model_keys, rt):
    """(model, optimizer, start step, best val loss, teacher for KD or None, checkpoint extra)."""
    data_dir = ensure_dataset(cfg.dataset)
    meta = load_meta(data_dir)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    start_step, best, teacher = 0, float("inf"), None
    torch.manual_seed(cfg.seed)
    if cfg.init_from == "resume":
        if not os.path.isfile(ckpt_path):
            raise ConfigError(f"init_from=resume but {ckpt_path} does not exist: train first, or set out_dir")
        ckpt = load_checkpoint(ckpt_path)
        model = model_from_checkpoint(ckpt, **model_keys)
        start_step, best = ckpt["step"], ckpt["best_val_loss"]
        saved_train = ckpt["train_config"]
        if saved_train.get("init_from") not in ("scratch", "resume") and cfg.kd_weight > 0:
            teacher = load_start_model(saved_train["init_from"], dict(cache="loop"))
    elif cfg.init_from == "scratch":
        keys = {**DEFAULT_MODEL, "vocab_size": meta["vocab_size"], **model_keys}
        model = MELT(MeltConfig(**keys))
    else:
        model = load_start_model(cfg.init_from, model_keys)
        if cfg.kd_weight > 0:
            teacher = load_start_model(cfg.init_from, {"cache": "loop"})
    mc = model.config
    check_model_against_data(mc, meta, cfg.dataset)
    if mc.chunk_size > mc.block_size:
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
    tokens; with targets (B, T), over the scored ones only (not -1: with answer_only, KD is taken
    where the LM loss is). A weighted mean, not a selection: no shape depends on the data, so a
    CUDA-graphed step (cuda_graph=True) can record it."""
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
    outputs are computed outside it (teacher_outputs) and passed in."""

    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg

    @torch.no_grad()
    def teacher_outputs(self, teacher, x):
        return teacher.lm_head(teacher.run(x).hidden[-1])

    def forward(self, x, y, alpha, teacher_out=None):
        out = self.model.run(x, alpha=alpha)
        lm = self.model.loss(out, y)
        if teacher_out is None:
            return lm, {}
        s_logits, t_logits = self.model.lm_head(out.hidden[-1]), teacher_out
        kd = kd_loss(s_logits, t_logits, self.cfg.kd_temperature, y if self.cfg.answer_only else None)
        return lm + self.cfg.kd_weight * kd, {"lm": lm.detach(), "kd": kd.detach()}


class GraphedStep:
    """A micro-step's forward and backward replayed as CUDA graphs (cuda_graph=True, one GPU).

    Why: MELT's chunk-wise step is thousands of small kernels (chunks x loops x layers, forward and
    backward), each launched from Python: on an H200 eager phase 1 ran at 0.29x the eager LoopLM,
    and compiling it did not finish (README, "On one GPU"). torch.cuda.make_graphed_callables
    records the objective's forward and its backward once; each call then copies the batch into the
    recording's inputs and launches all of it at once. The optimizer stays eager.
    Only the model's own key/value layout is recorded (MELT.kv_layout: "shared" for MELT, "loop"
    for a LoopLM), with alpha fixed at 1. The transition's other steps (alpha < 1) run eager: our
    first recording of the mixed layout, alpha a device scalar, failed on an H200 (README, "On one
    GPU"; PyTorch's warning named the previous step's autograd graph, still alive, which the
    training loop now drops; whether the mixed layout records since then is untested)."""

    def __init__(self, objective, rt):
        self.objective, self.fn = objective, None
        # make_graphed_callables refuses autocast's weight cache (a recording cannot reuse casts)
        self.autocast = (nullcontext() if rt.dtype == "float32" else
                         torch.autocast("cuda", dtype=getattr(torch, rt.dtype), cache_enabled=False))

    def __call__(self, x, y, alpha, teacher_out=None):
        model = self.objective.model
        t = () if teacher_out is None else (teacher_out,)
        if model.kv_layout(alpha) != model.config.cache:
            return self.objective(x, y, alpha, *t)   # the transition before alpha reaches 1: eager
        with self.autocast:
            if self.fn is None:
                self.fn = torch.cuda.make_graphed_callables(_AtAlpha(self.objective, alpha), (x, y, *t))
            return self.fn(x, y, *t)


class _AtAlpha(torch.nn.Module):
    """The objective at one fixed alpha, for recording (make_graphed_callables takes tensors only)."""

    def __init__(self, objective, alpha):
        super().__init__()
        self.objective, self.alpha = objective, alpha

    def forward(self, x, y, *teacher_out):
        return self.objective(x, y, self.alpha, *teacher_out)


def check_cuda_graph(cfg, rt):
    """What a CUDA-graphed step cannot do, refused before anything is built."""
    if not cfg.cuda_graph:
        return
    why = ("it needs a CUDA device" if rt.device.type != "cuda" else
           "it is for one GPU (under torchrun, DDP's gradient hooks run outside the recording)" if rt.ddp else
           "use one or the other (compile=False)" if cfg.compile else
           "grad_accum must be 1 (the recording's gradient buffers are reused by the next micro-step)"
           if cfg.grad_accum != 1 else None)
    if why:
        raise ConfigError(f"cuda_graph=True: {why}")


def train(cfg, model_keys, objective_cls=LMObjective, build_fn=build):
    """The loop shared by train.py and distill.py: build, then step / eval / checkpoint."""
    from tqdm import tqdm

    rt = Runtime(cfg)
    check_cuda_graph(cfg, rt)
    raw, optimizer, step, best, teacher, data_dir, meta = build_fn(cfg, model_keys, rt)
    batches = Batches(data_dir, raw.config.block_size, cfg.batch_size, cfg.grad_accum, rt.rank, rt.world,
                      cfg.seed, answer_marker(meta, cfg.answer_only, cfg.dataset), line_token(meta, cfg),
                      answer_blank(meta, cfg.hide_answers))
    problems = task_problems(data_dir, meta, cfg.task_eval_n) if meta.get("task") else None
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
    os.makedirs(cfg.out_dir, exist_ok=True)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * rt.world * batches.width
    flops = flops_per_token(raw.config, batches.width) * tokens_per_step
    peak = peak_flops(rt.device)
    if rt.master:
        c = raw.config
        print(f"model: {raw.num_params(False)/1e6:.2f}M parameters, {c.n_layer} layers x {c.n_loop} loops, "
              f"cache={c.cache}" + (f", gate={c.gate}, chunk_size={c.chunk_size}" if c.cache == "shared" else "")
              + f"; {tokens_per_step:,} tokens per step on {rt.device} ({rt.dtype})")
    bar = tqdm(total=cfg.max_iters, initial=step, disable=not rt.master, dynamic_ncols=True)
    t0 = time.time()

    def do_eval(step):
        nonlocal best
        alpha = alpha_at(step, cfg, raw.config)
        losses = evaluate(raw, batches, cfg, rt, alpha, step)
        # *_loss: the training objective; val_ce: cross-entropy of the logits generation uses
        rec = dict(step=step, train_loss=losses["train"], val_loss=losses["val"], val_ce=losses["val_ce"],
                   alpha=alpha, lr=lr_at(step, cfg))
        if problems is not None:
            rec["task_acc"] = task_accuracy(raw, problems, rt.device, alpha=alpha)
        if hasattr(objective, "eval_extra"):
            rec.update(objective.eval_extra(teacher, batches, rt, alpha))
        rec["time"] = time.time()
        best = min(best, losses["val"])
        if rt.master:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.write(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in rec.items() if k != "time"))
        return rec

    raw.train()
    while step < cfg.max_iters:
        if step % cfg.eval_interval == 0:
            do_eval(step)
            if step > 0 and rt.master:
                save_checkpoint(ckpt_path, raw, optimizer, cfg, step, best, dict(data_meta=meta))
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        alpha = alpha_at(step, cfg, raw.config)
        total, parts = 0.0, {}
        for micro in range(cfg.grad_accum):
            x, y = batches.get("train", step, micro, rt.device)
            sync = ddp.no_sync() if rt.ddp and micro < cfg.grad_accum - 1 else nullcontext()
            with sync, rt.autocast:
                t_out = objective.teacher_outputs(teacher, x) if teacher is not None else None
                loss, parts = step_fn(x, y, alpha, t_out)
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
            post = dict(loss=f"{rt.all_mean(total):.4f}", tok_s=f"{tokens_per_step / dt:,.0f}",
                        mfu=f"{100 * flops / dt / (peak * rt.world):.1f}%" if peak else "n/a")
            if raw.config.cache == "shared" and cfg.alpha_steps:
                post["alpha"] = f"{alpha:.2f}"
            post.update({k: f"{v.item():.4f}" for k, v in parts.items()})
            bar.set_postfix(post, refresh=False)
        bar.update(1)
    rec = do_eval(step)
    if rt.master:
        save_checkpoint(ckpt_path, raw, optimizer, cfg, step, best, dict(data_meta=meta))
    bar.close()
    rt.close()
    return raw, rec, meta


def main(argv):
    cfg, model_keys = parse_args(argv)
    model, rec, meta = train(cfg, model_keys)
    if cfg.sample_tokens and int(os.environ.get("RANK", 0)) == 0:
        tok = load_tokenizer(meta)
        print("-" * 60)
        print(sample_text(model, tok, next(model.parameters()).device, cfg.sample_tokens))
        print("-" * 60)
    print(f"final: val loss {rec['val_loss']:.4f}" + (f", task accuracy {rec['task_acc']:.3f}" if "task_acc" in rec else "")
          + f"; checkpoint {os.path.join(cfg.out_dir, 'ckpt.pt')}")


def run_cli(main_fn, prog):
    try:
        main_fn(sys.argv[1:])
    except (ConfigError, MeltError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_cli(main, "train.py")
