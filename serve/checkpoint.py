"""
This project's checkpoints, both halves of the format in one place (nanochat's
checkpoint_manager.py): save_checkpoint writes what train.py and distill.py need to continue
exactly; load_checkpoint, model_from_checkpoint and load_model read it back. A checkpoint is a dict
saved with torch.save and loaded with weights_only=True, so no code runs on load:

    model, optimizer           state dicts
    model_config, model_config_sha   MeltConfig as a dict, and its digest (an edited config is refused)
    train_config               the TrainConfig (or DistillConfig) the run was started with
    step, best_val_loss        where the run is
    rng_cpu, rng_cuda          random state, so a resumed run continues bit-identically
    data_meta                  the dataset's meta.json: the tokenizer the weights read
"""

import hashlib
import json
import os
from dataclasses import asdict, fields

import torch

from melt import MELT, MeltConfig, MeltError

# MeltConfig fields that define the weights' shapes: a resume or init_from may not change them.
ARCH_KEYS = ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "mlp_hidden")
MODEL_FIELDS = {f.name for f in fields(MeltConfig)}


def config_sha(model_config):
    """A digest of a saved model_config dict, stored beside it, so that a config edited in the file
    (shapes that still fit the tensors, say n_head 2 -> 4 with head_dim 16 -> 8) is refused
    instead of silently computing something else."""
    return hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest()


def save_checkpoint(path, raw_model, optimizer, cfg, step, best_val_loss, extra=None):
    """Everything to continue exactly, written to a temporary file of this process and renamed, so
    that a kill at any moment leaves the previous checkpoint intact. Refuses non-finite weights."""
    bad = [n for n, p in raw_model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise MeltError(f"weights became non-finite by step {step} ({bad[0]}, {len(bad)} tensors); "
                        f"not saved: the last good checkpoint ({path}, if any) is untouched. Lower lr")
    mc = asdict(raw_model.config)
    ckpt = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), model_config=mc,
                model_config_sha=config_sha(mc), train_config=asdict(cfg), step=step, best_val_loss=best_val_loss,
                rng_cpu=torch.get_rng_state(),
                rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], **(extra or {}))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # disk full, read-only: keep the good one, free the space
        if os.path.exists(tmp):
            os.remove(tmp)
        raise MeltError(f"could not write {path} ({type(e).__name__}: {str(e)[:80]}); "
                        f"the previous checkpoint, if any, is untouched") from None


def load_checkpoint(path):
    """A checkpoint of this project as a dict (weights_only: no code runs on load)."""
    if not os.path.isfile(path):
        raise MeltError(f"no checkpoint at {path!r}: it does not exist (give a checkpoint .pt of this "
                        f"project or an Ouro directory)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign pickle, a truncated file
        raise MeltError(f"{path!r} is not a readable melt checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or not isinstance(ckpt.get("model_config"), dict):
        raise MeltError(f"{path!r} is not a melt checkpoint (no model / model_config inside)")
    return ckpt


def restore_training_state(ckpt, optimizer):
    """What init_from=resume needs beyond the weights: optimizer moments and RNG state."""
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:   # another parameter grouping: a loop checkpoint resumed as MELT
        raise MeltError(f"the checkpoint's optimizer state does not fit this model ({str(e)[:80]}): "
                        f"resume with the model keys it was trained with") from None
    torch.set_rng_state(ckpt["rng_cpu"])
    if ckpt["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])


def load_weights(model, state_dict):
    """Load a state dict into model; names and shapes must match, except that gate parameters a
    looped checkpoint lacks (converting to shared mode) keep their documented init."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and ".gate." not in k]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise MeltError(f"checkpoint does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, t in state_dict.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise MeltError(f"tensor {k} has shape {tuple(t.shape)}, the model expects {tuple(own[k].shape)}")
    model.load_state_dict(state_dict, strict=False)
    return model


def model_from_checkpoint(ckpt, **overrides):
    """The model a checkpoint of this project holds (a path or load_checkpoint's dict); overrides
    may change the non-shape fields (cache, gate, chunk_size, ...) but not the architecture. A
    loop-mode checkpoint loaded with cache="shared" gets new gate parameters at their documented
    init; so does a different gate."""
    ckpt = load_checkpoint(ckpt) if isinstance(ckpt, str) else ckpt
    saved = dict(ckpt["model_config"])
    for k in ARCH_KEYS:
        if k in overrides and overrides[k] != saved.get(k):
            raise MeltError(f"checkpoint has {k}={saved.get(k)}, the config asks for {k}={overrides[k]}: "
                            f"architecture differs (drop the override or start from scratch)")
    if "model_config_sha" in ckpt and ckpt["model_config_sha"] != config_sha(ckpt["model_config"]):
        raise MeltError("the checkpoint's model_config was changed after it was saved: its weights were "
                        "trained with another one (give changes as overrides instead)")
    saved = {k: v for k, v in saved.items() if k in MODEL_FIELDS}   # checkpoints before a field existed
    model = MELT(MeltConfig(**{**saved, **overrides}))
    sd = ckpt["model"]
    if model.config.cache == "loop" or saved.get("gate") != model.config.gate:
        sd = {k: v for k, v in sd.items() if ".gate." not in k}
    return load_weights(model, sd)


def load_model(path, dtype=None, **overrides):
    """THE loader: a checkpoint .pt of this project or an Ouro directory -> (model, tokenizer
    description). overrides are MeltConfig fields (an Ouro directory loads in loop mode unless
    told otherwise). The description is the checkpoint's data_meta (data/prepare.py's
    load_tokenizer reads it), for an Ouro directory its tokenizer.json."""
    if os.path.isdir(path):
        from serve.ouro import from_ouro
        model = from_ouro(path, dtype=dtype, **{"cache": "loop", **overrides})
        tj = os.path.join(path, "tokenizer.json")
        meta = dict(tokenizer="hf", tokenizer_json=tj, vocab_size=model.config.vocab_size) if os.path.isfile(tj) else None
        return model, meta
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, **overrides)
    return (model if dtype is None else model.to(dtype)), ckpt.get("data_meta")


class RunDir:
    """The out_dir of one run: ckpt.pt, log.jsonl, and the lock that makes the run its only writer.

    The lock is an exclusive flock on out_dir/.lock, taken by claim() and held until the process
    ends: the kernel drops it with the process, so a kill -9 cannot leave it stale (a lock file
    checked for existence, or a pid in a file, could). A second run into the folder is refused in
    one line naming the holder."""

    def __init__(self, path):
        self.path = path
        self.ckpt, self.log = os.path.join(path, "ckpt.pt"), os.path.join(path, "log.jsonl")
        self._lock = None

    def claim(self):
        import fcntl
        os.makedirs(self.path, exist_ok=True)
        f = open(os.path.join(self.path, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise MeltError(f"{self.path} is in use by another run ({holder}): wait for it to end, "
                            f"or give another out_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        self._lock = f
        return self

    def release(self):
        if self._lock is not None:
            self._lock.close()   # closing the file drops the flock
            self._lock = None

    def start_new(self, overwrite):
        """Before a new run (not a resume): refuse to replace a checkpoint unless overwrite; move the
        old run (checkpoint first, then its log) aside into out_dir/previous/, so that the folder
        never holds the old checkpoint with the new log, and the old run stays whole."""
        if os.path.isfile(self.ckpt) and not overwrite:
            raise MeltError(f"{self.ckpt} exists: continue it with --init_from=resume, or replace it "
                            f"with --overwrite=True")
        old = [p for p in (self.ckpt, self.log) if os.path.exists(p)]
        if old:
            aside = os.path.join(self.path, "previous")
            if os.path.isdir(aside):
                import shutil
                shutil.rmtree(aside)
            os.makedirs(aside)
            for p in old:
                os.replace(p, os.path.join(aside, os.path.basename(p)))
            print(f"moved the previous run's {' and '.join(os.path.basename(p) for p in old)} to {aside}/")
