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


# ---- one run per out_dir, nothing lost, nothing misread -------------------------------------------

def lesson_rows(parent):
    """Pids of the row processes a lesson.py process started (their command line names it)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"--parent={parent}".encode() in cmd:
            pids.append(int(pid))
    return pids


def test_distill_never_replaces_a_checkpoint_silently(ouro_data, tmp_path):
    """distill.py into an out_dir that holds a checkpoint is refused without --overwrite=True,
    the checkpoint and its log untouched; with it, the old run is moved whole into previous/."""
    from test_distill import run_distill
    run_distill(ouro_data, tmp_path, "--max_iters=4", "--eval_interval=4")
    before = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    log_before = open(tmp_path / "log.jsonl").read()
    with pytest.raises(trainer.ConfigError, match="exists: continue it with --init_from=resume"):
        run_distill(ouro_data, tmp_path, "--max_iters=2", "--eval_interval=2")
    after = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert after["step"] == before["step"] == 4 and open(tmp_path / "log.jsonl").read() == log_before
    _, log = run_distill(ouro_data, tmp_path, "--max_iters=2", "--eval_interval=2", "--overwrite=True")
    assert [r["step"] for r in log] == [0, 2]
    assert torch.load(tmp_path / "previous" / "ckpt.pt", weights_only=True)["step"] == 4
    assert open(tmp_path / "previous" / "log.jsonl").read() == log_before


def test_an_overwrite_keeps_the_old_run_whole_until_it_is_moved_aside(tiny_data, tmp_path):
    """A run with --overwrite=True that dies before its first checkpoint leaves no mix of two runs:
    the old checkpoint and log together in previous/, out_dir without the old checkpoint."""
    run_train(tiny_data, tmp_path, "--max_iters=10")
    old_log = open(tmp_path / "log.jsonl").read()
    with pytest.raises(trainer.ConfigError, match="loss became nan"):
        run_train(tiny_data, tmp_path, "--max_iters=10", "--overwrite=True", "--lr=1e30", "--eval_interval=100")
    assert not os.path.exists(tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "previous" / "ckpt.pt", weights_only=True)["step"] == 10
    assert open(tmp_path / "previous" / "log.jsonl").read() == old_log


def test_a_second_run_into_a_busy_out_dir_is_refused(tiny_data, tmp_path):
    """While one train.py holds an out_dir, a second into it exits 2 with one line naming the
    holder's pid; once the first ends (even killed with -9: the lock dies with the process), the
    folder is free again."""
    out = tmp_path / "o"
    args = [os.path.join(ROOT, "train.py"), f"--dataset={tiny_data}", f"--out_dir={out}", "--n_layer=1",
            "--n_embd=32", "--n_head=2", "--block_size=32", "--chunk_size=8", "--sample_tokens=0", "--eval_iters=1",
            "--device=cpu", "--threads=1"]
    first = subprocess.Popen([sys.executable, *args, "--max_iters=100000"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        for line in first.stdout:   # the first eval is written once the run holds the folder
            if line.startswith("step 0 |"):
                break
        second = cli("train.py", *args[1:], "--max_iters=2", "--overwrite=True")
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"is in use by another run (pid {first.pid})" in second.stderr
    finally:
        first.kill()
        first.wait()
    again = cli("train.py", *args[1:], "--max_iters=2", "--overwrite=True")
    assert again.returncode == 0, again.stderr


def test_killing_the_lesson_leaves_no_row_running(tmp_path):
    """kill -9 of bench/lesson.py (rows side by side in their own processes) leaves no row process
    running: each notices its parent is gone and stops within a second or two."""
    import signal
    import time
    out = tmp_path / "toy"
    parent = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "lesson.py"), "--setting=toy",
                               f"--out={out}", "--threads=2", "--jobs=2", "--rows=standard_deep,looplm",
                               "--set=steps=100000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 60
    while len(lesson_rows(parent.pid)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    rows = lesson_rows(parent.pid)
    assert len(rows) == 2
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z" for p in rows) \
            and time.time() < deadline:
        time.sleep(0.1)
    alive = [p for p in rows if os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"]
    assert alive == []


def test_resume_says_which_model_keys_changed(tiny_data, tmp_path, capsys):
    """A model key given on resume (chunk_size) is printed beside its saved value, like the
    training keys, instead of changing without a word."""
    run_train(tiny_data, tmp_path, "--max_iters=10", "--cache=shared")
    capsys.readouterr()
    run_train(tiny_data, tmp_path, "--init_from=resume", "--max_iters=12", "--chunk_size=16")
    assert "chunk_size=16 (was 8)" in capsys.readouterr().out


def test_options_that_would_do_nothing_are_refused(tiny_data, ouro_data, tmp_path):
    """Settings a run would ignore or misread are refused naming the key: kd_weight with no start
    model, alpha_steps and gate_lr on a loop cache, kd_temperature <= 0; in distill.py a negative
    lm_weight or an infinite beta; sweeps on a LoopLM's run(); a config file's quoted number; and a
    distillation from a teacher trained on other data."""
    from test_distill import run_distill
    from test_melt import tiny_model
    for args, msg in [(["--kd_weight=1"], "kd_weight > 0 distils from the start model"),
                      (["--cache=loop", "--alpha_steps=5"], "alpha_steps is for MELT"),
                      (["--cache=loop", "--gate_lr=0.1"], "gate_lr is for MELT"),
                      (["--kd_temperature=0"], "kd_temperature=0.0 must be")]:
        with pytest.raises(trainer.ConfigError, match=msg):
            run_train(tiny_data, tmp_path / "a", "--overwrite=True", *args)
    for args, msg in [(["--lm_weight=-5"], "lm_weight=-5.0 must be >= 0"), (["--beta=1e999"], "beta=inf must be")]:
        with pytest.raises(trainer.ConfigError, match=msg):
            run_distill(ouro_data, tmp_path / "b", *args)
    with pytest.raises(MeltError, match="sweeps=2 needs cache='shared'"):
        tiny_model(cache="loop").run(torch.zeros(1, 4, dtype=torch.long), sweeps=2)
    cfg_file = tmp_path / "quoted.py"
    cfg_file.write_text('max_iters = "10"\n')
    with pytest.raises(trainer.ConfigError, match="max_iters='10' should be a int"):
        trainer.parse_args([str(cfg_file)])
    # the same symbols and vocabulary, other hops: only the teacher was trained on other data
    phop_a, phop_b = tmp_path / "phop_a", tmp_path / "phop_b"
    prepare.prepare_phop(str(phop_a), alphabet=4, seq_len=12, hops=(1, 2), n_train=50, n_val=8)
    prepare.prepare_phop(str(phop_b), alphabet=4, seq_len=12, hops=(2,), n_train=50, n_val=8)
    run_train(phop_a, tmp_path / "teacher", "--max_iters=2", "--cache=loop", "--n_loop=2")
    run_train(phop_b, tmp_path / "student", "--max_iters=2", "--cache=shared", "--n_loop=2")
    import distill
    argv = [f"--dataset={phop_b}", f"--out_dir={tmp_path / 'd'}", f"--teacher={tmp_path / 'teacher' / 'ckpt.pt'}",
            f"--init_from={tmp_path / 'student' / 'ckpt.pt'}", "--max_iters=2", "--block_size=32", "--chunk_size=8",
            "--batch_size=2"]
    cfg, keys = trainer.parse_args(argv, train_cls=distill.DistillConfig)
    with pytest.raises(trainer.ConfigError, match="does not use the tokenizer the teacher was trained with "
                                                   r"\(they differ in hops\)"):
        trainer.train(cfg, keys, objective_cls=distill.DistillObjective, build_fn=distill.build_distill)


def test_more_mistakes_are_one_line_errors(tiny_data, tmp_path):
    """Mistakes across the scripts and the Python API are one line with exit status 2 (a
    MeltError from Python): sample.py's dtype, device and threads; evaluate.py's unknown flag,
    non-numbers and zero batches; data/prepare.py's missing tokenizer (before any download), a
    tokenizer.json that is not JSON (leaving no folder), a huge seq_len; lesson.py's bad --set
    and --report; a meta.json without vocab_size; and MeltConfig / run() given values of the
    wrong type or shape."""
    from test_melt import tiny_model
    run_train(tiny_data, tmp_path / "o", "--max_iters=2")
    ckpt = str(tmp_path / "o" / "ckpt.pt")
    bad_tok = tmp_path / "badtok"
    bad_tok.mkdir()
    (bad_tok / "tokenizer.json").write_text("not json")
    no_vocab = tmp_path / "novocab"
    shutil.copytree(tiny_data, no_vocab)
    (no_vocab / "meta.json").write_text('{"tokenizer": "char"}')
    cases = [("sample.py", [f"--init_from={ckpt}", "--dtype=float64"], "dtype='float64'"),
             ("sample.py", [f"--init_from={ckpt}", "--device=gpu"], "device='gpu'"),
             ("sample.py", [f"--init_from={ckpt}", "--threads=-1"], "threads=-1 must be >= 0"),
             ("bench/evaluate.py", [ckpt, "--verbose"], "--verbose: write --key=value"),
             ("bench/evaluate.py", [ckpt, "--n_loops=abc"], "not a valid int"),
             ("bench/evaluate.py", [ckpt, "--batches=0"], "batches=0 must be >= 1"),
             ("bench/evaluate.py", [ckpt, "--device=gpu"], "device='gpu'"),
             ("data/prepare.py", ["--name=t_bad", "--tokenizer=/nonexistent"], "no tokenizer.json at"),
             ("data/prepare.py", ["--name=t_bad", f"--tokenizer={bad_tok}"], "not a readable tokenizer.json"),
             ("data/prepare.py", ["--name=t_bad", "--seq_len=100000000"], "seq_len <= 65535"),
             ("bench/lesson.py", ["--setting=toy", "--set=hops=0", f"--out={tmp_path / 'l'}"], "bad setting"),
             ("bench/lesson.py", ["--report", str(tmp_path / "nothing")], "does not exist"),
             ("train.py", [f"--dataset={no_vocab}", f"--out_dir={tmp_path / 'n'}"], "gives no vocab_size")]
    if not torch.cuda.is_available():
        cases.append(("sample.py", [f"--init_from={ckpt}", "--device=cuda"], "device='cuda' but CUDA is not available"))
    for script, args, msg in cases:
        res = cli(script, *args)
        assert res.returncode == 2 and msg in res.stderr and res.stderr.count("\n") == 1, (script, args, res.stderr)
    assert not os.path.exists(os.path.join(ROOT, "data", "t_bad"))
    with pytest.raises(MeltError, match="n_loop='4' should be a int"):
        trainer.MeltConfig(n_loop="4")
    model = tiny_model()
    for ids in (torch.zeros(4, dtype=torch.long), torch.zeros(1, 4)):
        with pytest.raises(MeltError, match="token ids must be a"):
            model.run(ids)


def test_a_log_file_gets_progress_lines_not_bar_redraws(tiny_data, tmp_path):
    """train.py writing to a file (nohup, a lesson row's lesson.log) prints one line per log
    interval, with no carriage-return redraws of a progress bar."""
    res = cli("train.py", f"--dataset={tiny_data}", f"--out_dir={tmp_path}", "--n_layer=1", "--n_embd=32",
              "--n_head=2", "--block_size=32", "--chunk_size=8", "--sample_tokens=0", "--eval_iters=1",
              "--max_iters=20", "--log_interval=5", "--device=cpu")
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stdout + res.stderr
    assert [line.split(" |")[0] for line in res.stdout.splitlines() if line.startswith("step ") and "/" in line.split()[1]] \
        == ["step 5/20", "step 10/20", "step 15/20", "step 20/20"]


def test_bench_tools_refuse_an_option_they_do_not_know(capsys):
    """bench/decode_speed.py, kv_memory.py and train_throughput.py read their options with
    argparse: --help prints the usage and exits 0, and an unknown or misspelt option (also a
    prefix of a real one) or two of decode_speed's tables at once exits 2 naming it, before any
    model is built or measured (no table on stdout)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import decode_speed
    import kv_memory
    import train_throughput
    for mod, wrong in ((decode_speed, ["--batch"]), (decode_speed, ["--profile", "--batches"]),
                       (decode_speed, ["--contexts=64,x"]), (kv_memory, ["--plt"]),
                       (train_throughput, ["--sweep=1"]), (train_throughput, ["--n_layers=2"])):
        with pytest.raises(SystemExit) as exit_:
            mod.main(wrong)
        out, err = capsys.readouterr()
        assert exit_.value.code == 2 and out == "", (mod.__name__, wrong, out)
        assert "error:" in err and wrong[-1].split("=")[0] in err, (mod.__name__, wrong, err)
    for mod in (decode_speed, kv_memory, train_throughput):
        with pytest.raises(SystemExit) as exit_:
            mod.main(["--help"])
        assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: bench/{mod.__name__}.py")


def test_help_lists_every_key_with_its_default(tmp_path):
    """`train.py --help` prints its docstring and every key it takes, exit 0, nothing trained:
    each TrainConfig field as --name=default, each MeltConfig field with the default model of a
    run from scratch (train.DEFAULT_MODEL over MeltConfig's own), each with the comment that
    declares it. sample.py and evaluate.py (-h) list their own fields and the model's keys with
    their types, as those default to the loaded checkpoint's config (but for keys their own
    config takes first, listed once, there)."""
    from dataclasses import MISSING, fields

    import sample
    from bench import evaluate
    from melt import MeltConfig
    res = cli("train.py", "--help", f"--out_dir={tmp_path / 'o'}")
    assert res.returncode == 0 and res.stdout.startswith("Train a standard transformer") and res.stderr == ""
    lines = res.stdout.splitlines()
    def line_of(key):
        return next(line.split() for line in lines if line.startswith(f"  --{key}="))
    for f in fields(trainer.TrainConfig):
        default = f.default_factory() if f.default is MISSING else f.default
        assert line_of(f.name)[0] == f"--{f.name}={default!r}"
    for f in fields(MeltConfig):
        assert line_of(f.name)[0] == f"--{f.name}={trainer.DEFAULT_MODEL.get(f.name, f.default)!r}"
    assert " ".join(line_of("n_loop")[1:]) == "times the stack runs per token; 1 is a standard transformer"
    assert not os.path.exists(tmp_path / "o")
    for script, flag, cls in (("sample.py", "--help", sample.SampleConfig), ("bench/evaluate.py", "-h", evaluate.EvalConfig)):
        res = cli(script, flag)
        assert res.returncode == 0, (script, res.stderr)
        lines = res.stdout.splitlines()
        for f in fields(cls):
            assert line_of(f.name)[0] == f"--{f.name}={f.default!r}", script
        own = {f.name for f in fields(cls)}
        for f in fields(MeltConfig):
            want = f"--{f.name}={f.default!r}" if f.name in own else f"--{f.name}={f.type.__name__.upper()}"
            assert [line.split()[0] for line in lines if line.startswith(f"  --{f.name}=")] == [want], script
