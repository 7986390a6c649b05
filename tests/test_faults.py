"""The faults a user meets: nothing lost, nothing silent (checkpoints, resume, loaders, CLI errors)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train as trainer
from conftest import OURO_TINY, ROOT, run_train
from data import prepare
from melt import MELT, MeltError, load_model


def finite(ckpt):
    return all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_non_finite_weights_are_never_saved(tiny_data, tmp_path):
    """A run whose weights turn non-finite (lr 1e30, an eval at every step) stops with a message
    and never writes them: the checkpoint left is finite, from a step before the failure."""
    run_train(tiny_data, tmp_path, "--max_iters=10")
    before = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert finite(before) and before["step"] == 10
    with pytest.raises(trainer.ConfigError, match=r"weights became non-finite by step (\d+) .* not saved") as err:
        run_train(tiny_data, tmp_path, "--init_from=resume", "--lr=1e30", "--max_iters=40", "--eval_interval=1")
    after = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    failed_at = int(err.value.args[0].split("by step ")[1].split()[0])
    assert finite(after) and 10 <= after["step"] < failed_at


def test_scratch_run_never_replaces_a_checkpoint_silently(tiny_data, tmp_path):
    """A scratch run into an out_dir that holds a checkpoint is refused, naming --init_from=resume
    and --overwrite=True; with --overwrite=True it replaces it and starts a new log."""
    run_train(tiny_data, tmp_path, "--max_iters=10")
    with pytest.raises(trainer.ConfigError, match="exists: continue it with --init_from=resume, or replace it with --overwrite=True"):
        run_train(tiny_data, tmp_path, "--max_iters=10")
    _, log = run_train(tiny_data, tmp_path, "--max_iters=10", "--overwrite=True")
    assert [r["step"] for r in log] == [0, 10]


def test_resume_and_init_from_check_the_tokenizer(tiny_data, tmp_path):
    """Resuming, or starting from a checkpoint, on a dataset with another vocabulary of no larger
    size is refused: the ids would change meaning."""
    run_train(tiny_data, tmp_path / "a", "--max_iters=5")
    other = tmp_path / "other"
    chars = list("zyxwvutsrqponmlk")[:json.load(open(os.path.join(tiny_data, "meta.json")))["vocab_size"]]
    ids = [i % len(chars) for i in range(3000)]
    other.mkdir()
    prepare.finish(str(other), dict(tokenizer="char", chars=chars, vocab_size=len(chars)), ids, ids)
    with pytest.raises(trainer.ConfigError, match="does not use the tokenizer the checkpoint was trained with"):
        run_train(str(other), tmp_path / "a", "--init_from=resume", "--max_iters=8")
    with pytest.raises(trainer.ConfigError, match="does not use the tokenizer"):
        run_train(str(other), tmp_path / "b", f"--init_from={tmp_path / 'a' / 'ckpt.pt'}", "--max_iters=8")


def shard(tmp_path, weight_map_edit=None, extra=None):
    """The tiny Ouro checkpoint split in two shards with an index (optionally edited)."""
    from safetensors.torch import load_file, save_file
    d = tmp_path / "sharded"
    shutil.copytree(OURO_TINY, d)
    sd = load_file(str(d / "model.safetensors"))
    os.remove(d / "model.safetensors")
    names = sorted(sd)
    half = {n: sd[n] for n in names[: len(names) // 2]}, {n: sd[n] for n in names[len(names) // 2:]}
    second = dict(half[1], **(extra or {}))
    save_file(half[0], str(d / "a.safetensors"))
    save_file(second, str(d / "b.safetensors"))
    wm = {n: "a.safetensors" for n in half[0]} | {n: "b.safetensors" for n in half[1]}
    if weight_map_edit:
        weight_map_edit(wm)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return str(d)


def test_sharded_ouro_loader_follows_the_index_exactly(tmp_path):
    """A sharded Ouro checkpoint is read exactly as its index says: the same model as the single
    file; a stray tensor in a shard that the index does not name is not read (it cannot replace
    lm_head); a name the index puts in a shard that lacks it, and a shard path outside the
    directory, are one-line errors."""
    ref = MELT.from_ouro(OURO_TINY).state_dict()
    stray = {"lm_head.weight": torch.zeros_like(ref["lm_head.weight"])}
    d = shard(tmp_path / "1", extra=stray)   # lm_head sorts first: the index puts it in a.safetensors
    assert json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]["lm_head.weight"] == "a.safetensors"
    got = MELT.from_ouro(d).state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.items())
    with pytest.raises(MeltError, match="which does not hold it"):
        MELT.from_ouro(shard(tmp_path / "2", lambda wm: wm.update({n: "a.safetensors" for n in wm})))
    with pytest.raises(MeltError, match="shards must be files of"):
        MELT.from_ouro(shard(tmp_path / "3", lambda wm: wm.update({next(iter(wm)): "../a.safetensors"})))


def test_bad_ouro_files_are_one_line_errors(tmp_path):
    """config.json that is not JSON or gives a string hidden_size, a truncated model.safetensors
    and NaN weights are refused with a MeltError naming the problem."""
    from safetensors.torch import load_file, save_file
    cases = []
    for name in ("notjson", "string", "truncated", "nan"):
        d = tmp_path / name
        shutil.copytree(OURO_TINY, d)
        cases.append(d)
    (cases[0] / "config.json").write_text("{not json")
    cfg = json.loads((cases[1] / "config.json").read_text())
    cfg["hidden_size"] = str(cfg["hidden_size"])
    (cases[1] / "config.json").write_text(json.dumps(cfg))
    data = (cases[2] / "model.safetensors").read_bytes()
    (cases[2] / "model.safetensors").write_bytes(data[: len(data) // 2])
    sd = load_file(str(cases[3] / "model.safetensors"))
    sd["model.norm.weight"][0] = float("nan")
    save_file(sd, str(cases[3] / "model.safetensors"))
    for d, msg in zip(cases, ("not valid JSON", "should be an integer", "cannot read the weights", "NaN")):
        with pytest.raises(MeltError, match=msg):
            load_model(str(d))


def test_an_edited_checkpoint_config_is_refused(tiny_data, tmp_path):
    """A checkpoint whose saved model_config was edited so that the shapes still fit (n_head 2 -> 4
    with head_dim 16 -> 8) is refused instead of computing another model."""
    run_train(tiny_data, tmp_path, "--max_iters=2")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["model_config"].update(n_head=4, n_kv_head=4, head_dim=8)
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(MeltError, match="model_config was changed after it was saved"):
        load_model(str(tmp_path / "edited.pt"))


def cli(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_plain_mistakes_are_one_line_errors(tiny_data, tmp_path):
    """Each plain mistake is one line on stderr naming the problem, exit status 2, no traceback:
    a config file with a syntax error, batch_size=0, negative max_iters, lr=-1, device=foo, a
    damaged token file; at sampling a prompt outside a char vocabulary, max_new_tokens=-5, a
    non-UTF-8 prompt file, and a block_size beyond the trained context."""
    bad_cfg = tmp_path / "bad.py"
    bad_cfg.write_text("n_layer = (\n")
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_data, damaged)
    with open(damaged / "train.bin", "ab") as f:
        f.write(b"\x01")   # odd length: not uint16
    base = [f"--dataset={tiny_data}", f"--out_dir={tmp_path / 'o'}", "--max_iters=2", "--n_layer=1", "--n_embd=32",
            "--n_head=2", "--block_size=32", "--chunk_size=8", "--sample_tokens=0", "--eval_iters=1"]
    train_cases = [([str(bad_cfg)], "not valid Python"), (["--batch_size=0"], "batch_size=0 must be >= 1"),
                   (["--max_iters=-3"], "max_iters=-3 must be >= 0"), (["--lr=-1"], "lr=-1.0 must be"),
                   (["--device=foo"], "device='foo'"), ([f"--dataset={damaged}"], "damaged")]
    for args, msg in train_cases:
        res = cli("train.py", *base, *args)
        assert res.returncode == 2 and msg in res.stderr and res.stderr.count("\n") == 1, (args, res.stderr)
    assert cli("train.py", *base).returncode == 0
    ckpt = str(tmp_path / "o" / "ckpt.pt")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    sample_cases = [(["--start=€uro"], "not in this character vocabulary"), (["--max_new_tokens=-5"], "must be >= 1"),
                    ([f"--start=FILE:{latin}"], "codec can't decode"), (["--block_size=1000"], "beyond the model's context")]
    for args, msg in sample_cases:
        res = cli("sample.py", f"--init_from={ckpt}", "--device=cpu", "--max_new_tokens=4", *args)
        assert res.returncode == 2 and msg in res.stderr and res.stderr.count("\n") == 1, (args, res.stderr)
    debug = cli("train.py", *base, "--batch_size=0", "--debug=True")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
