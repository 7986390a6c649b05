"""Fixtures shared by the tests in this folder (test_melt.py at the root holds the model's)."""

import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OURO_TINY = os.path.join(ROOT, "tests", "fixtures", "ouro_tiny")
torch.set_num_threads(2)

import train as trainer  # noqa: E402
from data import prepare  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A char-level dataset of a repetitive text (learnable in a few dozen steps)."""
    d = tmp_path_factory.mktemp("tinydata")
    rng = np.random.default_rng(0)
    words = ["to be", "or not", "that is", "the question", "whether tis", "nobler"]
    text = " ".join(words[i] for i in rng.integers(0, len(words), 6000)) + "\n"
    chars = sorted(set(text))
    ids = [chars.index(c) for c in text]
    cut = int(len(ids) * 0.9)
    prepare.finish(str(d), dict(tokenizer="char", chars=chars, vocab_size=len(chars)), ids[:cut], ids[cut:])
    return str(d)


@pytest.fixture(scope="session")
def ouro_data(tmp_path_factory):
    """Text tokenized with the tiny Ouro checkpoint's tokenizer.json, as for a real Ouro teacher."""
    d = tmp_path_factory.mktemp("ourodata")
    text = d / "text.txt"
    text.write_text(("First Citizen: Before we proceed any further, hear me speak. "
                     "All: Speak, speak. In 1599 the Globe opened.\n") * 60)
    prepare.prepare_text(str(d / "tok"), OURO_TINY, text_path=str(text))
    return str(d / "tok")


def run_train(data, out, *extra, objective_cls=trainer.LMObjective):
    """train.train on a tiny model; returns the model and the parsed log.jsonl."""
    argv = [f"--dataset={data}", f"--out_dir={out}", "--n_layer=1", "--n_embd=32", "--n_head=2", "--n_kv_head=2",
            "--block_size=32", "--chunk_size=8", "--batch_size=8", "--max_iters=30", "--eval_interval=10",
            "--eval_iters=4", "--warmup_iters=5", "--lr=0.01", "--min_lr=0.001", "--sample_tokens=0",
            "--seed=3", *extra]
    cfg, keys = trainer.parse_args(argv)
    model, rec, _ = trainer.train(cfg, keys, objective_cls=objective_cls)
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return model, log
