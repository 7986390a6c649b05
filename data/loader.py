"""
Reading a prepared dataset (data/prepare.py writes it): its meta.json, and the batches of train.py,
distill.py and the lesson, a function of (seed, step) alone.
"""

import json
import os

import numpy as np
import torch

from melt import MeltError as ConfigError

EVAL_STEP = 10_000_000   # evals draw the batches of steps EVAL_STEP, EVAL_STEP+1, ...: fixed data, never trained on


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): prepare the dataset again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int):
        raise ConfigError(f"{path} gives no vocab_size: prepare the dataset again (data/prepare.py)")
    return meta


class Batches:
    """Batches of a prepared dataset, of one of two kinds (data/prepare.py):
        text     random windows of a token file; the target is the next token
        targets  whole rows of `seq_len` inputs with a target per position stored beside them
                 ({split}_targets.bin, -1 where nothing is scored), e.g. the p-hop task
    The rows of step `step` are a function of (seed, step) alone: every process draws the same
    global batch and takes its own rows, so one process with grad_accum=2 and two with
    grad_accum=1 see the same data, and a resumed run continues the same sequence."""

    def __init__(self, data_dir, meta, block_size, batch_size, grad_accum, rank=0, world=1, seed=0):
        try:
            self.data = {s: np.memmap(os.path.join(data_dir, f"{s}.bin"), dtype=np.uint16, mode="r")
                         for s in ("train", "val")}
        except ValueError as e:   # a file of odd length, an empty one
            raise ConfigError(f"the token files of {data_dir} are damaged ({e}): prepare the dataset again") from None
        self.batch_size, self.grad_accum, self.rank, self.world, self.seed = batch_size, grad_accum, rank, world, seed
        self.targets = None
        if meta.get("targets"):
            self.width = meta["seq_len"]   # tokens per row
            if self.width > block_size:
                raise ConfigError(f"the rows of {data_dir} are {self.width} tokens, more than block_size={block_size}")
            self.targets = {s: np.memmap(os.path.join(data_dir, f"{s}_targets.bin"), dtype=np.int16, mode="r")
                            for s in ("train", "val")}
            self.n_rows = {s: len(d) // self.width for s, d in self.data.items()}
        else:
            self.width = block_size
            for split, d in self.data.items():
                if len(d) <= block_size + 1:
                    raise ConfigError(f"{split}.bin of {data_dir} has {len(d)} tokens, fewer than block_size+1")

    def get(self, split, step, micro, device):
        """Micro-batch `micro` of this process at step `step` -> x, y (B, T) on device."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 2 + (split == "val"))
        n = self.batch_size * self.grad_accum * self.world
        first = (self.rank * self.grad_accum + micro) * self.batch_size
        if self.targets is None:
            data = self.data[split]
            starts = torch.randint(len(data) - self.width - 1, (n,), generator=g)[first:first + self.batch_size]
            xy = torch.stack([torch.from_numpy(data[i:i + self.width + 1].astype(np.int64)) for i in starts.tolist()])
            x, y = xy[:, :-1], xy[:, 1:]
        else:
            rows = torch.randint(self.n_rows[split], (n,), generator=g)[first:first + self.batch_size].tolist()
            w = self.width
            x = torch.stack([torch.from_numpy(self.data[split][r * w:(r + 1) * w].astype(np.int64)) for r in rows])
            y = torch.stack([torch.from_numpy(self.targets[split][r * w:(r + 1) * w].astype(np.int64)) for r in rows])
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def rows(self, split):
        """Every whole row of a targets dataset's split -> x, y (n_rows, seq_len) int64 on the CPU,
        in file order (scoring all of it, e.g. bench/lesson.py)."""
        n, w = self.n_rows[split], self.width
        x = torch.from_numpy(self.data[split][:n * w].astype(np.int64)).view(n, w)
        y = torch.from_numpy(self.targets[split][:n * w].astype(np.int64)).view(n, w)
        return x, y

    def eval_batch(self, split, i, micro, device):
        """The i-th eval batch: the same at every eval, never a training batch."""
        return self.get(split, EVAL_STEP + i, micro, device)
