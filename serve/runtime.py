"""
Where the model runs: the device and dtype choice every script makes the same way (one function
each, one-line errors), the DDP process group of train.py and distill.py under torchrun, and a
training micro-step replayed as CUDA graphs (GraphedStep).
"""

import datetime
import os
from contextlib import nullcontext

import torch

from melt import MeltError

DTYPES = ("float32", "bfloat16", "float16")


def pick_device(name, local_rank=None):
    """'auto' (cuda if present), 'cpu', 'cuda' or 'cuda:N' -> torch.device; under DDP a CUDA
    process takes its own GPU (local_rank)."""
    dev = "cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name
    try:
        device = torch.device(dev)
    except (RuntimeError, TypeError):
        raise MeltError(f"device={name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise MeltError(f"device={name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MeltError(f"device={name!r} but CUDA is not available here: use --device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MeltError(f"device={name!r} but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "cuda" and local_rank is not None:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    return device


def pick_dtype(name, device):
    """'auto' (bfloat16 on GPUs that have it, else float16; float32 on a CPU) or one of DTYPES ->
    the dtype's name."""
    if name == "auto":
        if device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if name not in DTYPES:
        raise MeltError(f"dtype={name!r}: use auto, " + ", ".join(DTYPES))
    return name


def set_threads(n):
    """CPU threads for torch; 0 leaves torch's default."""
    if n < 0:
        raise MeltError(f"threads={n} must be >= 0 (0: torch's default)")
    if n:
        torch.set_num_threads(n)


class Runtime:
    """Device, autocast and the DDP process group of a training run, set up once."""

    def __init__(self, cfg):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        set_threads(cfg.threads)
        if self.ddp:
            self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            self.local_rank = int(os.environ["LOCAL_RANK"])
        else:
            self.rank, self.world, self.local_rank = 0, 1, 0
        self.device = pick_device(cfg.device, self.local_rank if self.ddp else None)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        if self.ddp:   # a rank that dies stops the others within 5 minutes, not gloo's default 30
            torch.distributed.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo",
                                                 timeout=datetime.timedelta(minutes=5))
        self.master = self.rank == 0
        self.autocast = (nullcontext() if self.dtype == "float32" else
                         torch.autocast(device_type=self.device.type, dtype=getattr(torch, self.dtype)))
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


class GraphedStep:
    """A micro-step's forward and backward replayed as CUDA graphs (cuda_graph=True, one GPU).

    MELT's chunk-wise step is thousands of small kernels (chunks x loops x layers, forward and
    backward), each launched from Python. torch.cuda.make_graphed_callables records the
    objective's forward and its backward once; each call then copies the batch into the
    recording's inputs and launches all of it at once. The optimizer stays eager. Only the model's
    own key/value layout (MELT.kv_layout at alpha=1) is recorded; the transition's alpha < 1
    steps run eager (RESULTS.md has the measurements)."""

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
           if cfg.grad_accum != 1 else
           "min_loops draws a loop count per step, and a recording has one" if cfg.min_loops else None)
    if why:
        raise MeltError(f"cuda_graph=True: {why}")


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
    return (6 * n_applied + 12 * c.n_layer * c.n_loop * c.n_head * c.head_dim * T) * (1 + c.sweeps)


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device):
    """Dense bf16 peak of the GPU, or None where unknown (then MFU is not shown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
