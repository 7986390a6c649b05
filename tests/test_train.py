"""train.py: the training loop, its checkpoints, DDP, configs and errors."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import train as trainer
from conftest import ROOT, run_train
from test_melt import tiny_model

HERE = ROOT

@pytest.mark.parametrize("mode", [["--n_loop=1", "--cache=loop"], ["--n_loop=3", "--cache=loop"],
                                  ["--n_loop=3", "--cache=shared"], ["--n_loop=2", "--cache=shared", "--gate=mean"]])
def test_training_loss_falls(tiny_data, tmp_path, mode):
    """A standard transformer, a LoopLM and MELT (chunk-wise) each lower the validation loss on a
    tiny run by a clear margin: below 0.6 of where it started (30 steps reach 0.44-0.50)."""
    _, log = run_train(tiny_data, tmp_path, *mode)
    assert log[-1]["val_loss"] < 0.6 * log[0]["val_loss"]


def test_transition_at_alpha0_reproduces_the_looplm(tiny_data, tmp_path):
    """Phase 1 starts from a LoopLM checkpoint converted to shared mode; at alpha=0 (step 0 of
    the ramp) its validation loss equals the LoopLM's own, and the run then trains the gates
    (they move from their init)."""
    _, log_loop = run_train(tiny_data, tmp_path / "loop", "--n_loop=3", "--cache=loop")
    model, log = run_train(tiny_data, tmp_path / "melt", f"--init_from={tmp_path / 'loop' / 'ckpt.pt'}",
                           "--cache=shared", "--alpha_steps=20", "--gate_lr=0.05", "--max_iters=20")
    assert log[0]["alpha"] == 0.0
    assert abs(log[0]["val_loss"] - log_loop[-1]["val_loss"]) < 1e-5
    assert log[-1]["alpha"] == 1.0
    assert model.blocks[0].gate.w_z.weight.abs().sum() > 0


def test_resume_equals_uninterrupted(tiny_data, tmp_path, capsys):
    """Stopping after 10 steps and resuming to 20 ends with the same weights and loss as 20
    steps in one go (CPU, same seed), and the resume needs only --init_from=resume and the new
    max_iters: dataset, batch size, learning rates and schedule come from the checkpoint's saved
    training config (a key given again overrides it, and is printed). Every step is logged once."""
    common = ["--cache=shared", "--n_loop=2", "--lr_decay_iters=20", "--eval_interval=5"]
    whole, log_whole = run_train(tiny_data, tmp_path / "a", *common, "--max_iters=20")
    run_train(tiny_data, tmp_path / "b", *common, "--max_iters=10")
    cfg, keys = trainer.parse_args([f"--out_dir={tmp_path / 'b'}", "--init_from=resume", "--max_iters=20"])
    assert cfg.batch_size == trainer.TrainConfig.batch_size   # the defaults, until the checkpoint is read
    resumed, rec, _ = trainer.train(cfg, keys)
    assert "resume: the training config saved in" in capsys.readouterr().out   # max_iters 10 -> 20
    log_res = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    assert log_res[-1]["val_loss"] == log_whole[-1]["val_loss"] == rec["val_loss"]
    assert [r["step"] for r in log_res] == [r["step"] for r in log_whole] == [0, 5, 10, 15, 20]
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    saved = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["train_config"]
    assert saved["batch_size"] == 8 and saved["lr"] == 0.01 and saved["dataset"] == tiny_data


def test_ddp_two_processes_equal_one(tiny_data, tmp_path):
    """torchrun with 2 CPU processes (gloo) and grad_accum=1 ends with the same loss as one
    process with grad_accum=2: the same global batch, gradients averaged by DDP."""
    args = [f"--dataset={tiny_data}", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32",
            "--chunk_size=8", "--batch_size=4", "--max_iters=8", "--eval_interval=4", "--eval_iters=2",
            "--cache=shared", "--n_loop=2", "--sample_tokens=0", "--threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(HERE, "train.py"), *args, "--grad_accum=1", f"--out_dir={tmp_path / 'ddp'}"],
                   check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args, "--grad_accum=2",
                    f"--out_dir={tmp_path / 'one'}"], check=True, env=env, capture_output=True)
    read = lambda d: [json.loads(x) for x in open(tmp_path / d / "log.jsonl")]
    ddp, one = read("ddp"), read("one")
    assert len(ddp) == len(one) == 3
    for a, b in zip(ddp, one):
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-5 and abs(a["train_loss"] - b["train_loss"]) < 1e-5


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_data, tmp_path):
    """A non-finite loss stops the run with a message naming the step; the checkpoint written
    before it is left as it was."""
    calls = {"n": 0}

    class Exploding(trainer.LMObjective):
        def forward(self, x, y, alpha, teacher_out=None):
            loss, parts = super().forward(x, y, alpha, teacher_out)
            calls["n"] += 1
            return (loss * float("nan") if calls["n"] > 12 else loss), parts

    with pytest.raises(trainer.ConfigError, match="loss became nan at step 12"):
        run_train(tiny_data, tmp_path, "--eval_interval=5", objective_cls=Exploding)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 10


def test_config_errors(tiny_data, tmp_path):
    """Unknown or mistyped keys, a missing or foreign checkpoint, chunk_size > block_size, a
    dataset whose vocabulary exceeds the model's and a resume without a checkpoint are each refused with a one-line message saying what is wrong."""
    with pytest.raises(trainer.ConfigError, match=r"unknown config keys \['n_layers'\]; valid keys"):
        trainer.parse_args(["--n_layers=3"])
    with pytest.raises(trainer.ConfigError, match="should be a int|not a valid int"):
        trainer.parse_args(["--max_iters=ten"])
    with pytest.raises(trainer.ConfigError, match="should be a bool"):
        trainer.parse_args(["--compile=3"])
    with pytest.raises(trainer.ConfigError, match="no checkpoint at"):
        run_train(tiny_data, tmp_path, "--init_from=/nonexistent/ckpt.pt")
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(trainer.ConfigError, match="not a readable melt checkpoint"):
        run_train(tiny_data, tmp_path, f"--init_from={tmp_path / 'foreign.pt'}")
    with pytest.raises(trainer.ConfigError, match="chunk_size=64 is larger than block_size=32"):
        run_train(tiny_data, tmp_path, "--chunk_size=64")
    with pytest.raises(trainer.ConfigError, match="vocab_size .* but the model has 5"):
        run_train(tiny_data, tmp_path, "--vocab_size=5")
    with pytest.raises(trainer.ConfigError, match="init_from=resume but .* does not exist"):
        run_train(tiny_data, tmp_path / "empty", "--init_from=resume")
    cfg_file = tmp_path / "bad.py"
    cfg_file.write_text("import os\n")
    with pytest.raises(trainer.ConfigError, match="only `name = value` lines"):
        trainer.parse_args([str(cfg_file)])


def test_cuda_graph_refuses_what_a_recording_cannot_do(tiny_data, tmp_path):
    """cuda_graph=True is refused with its reason on a CPU, under DDP, with compile and with
    gradient accumulation; a plain one-GPU run passes, KD included."""
    with pytest.raises(trainer.ConfigError, match="cuda_graph=True: it needs a CUDA device"):
        run_train(tiny_data, tmp_path, "--cuda_graph=True")
    gpu = SimpleNamespace(device=torch.device("cuda"), ddp=False)
    for args, why in [({"compile": True}, "compile=False"), ({"grad_accum": 2}, "grad_accum must be 1")]:
        with pytest.raises(trainer.ConfigError, match=why):
            trainer.check_cuda_graph(trainer.TrainConfig(cuda_graph=True, **args), gpu)
    with pytest.raises(trainer.ConfigError, match="for one GPU"):
        trainer.check_cuda_graph(trainer.TrainConfig(cuda_graph=True), SimpleNamespace(device=gpu.device, ddp=True))
    trainer.check_cuda_graph(trainer.TrainConfig(cuda_graph=True, kd_weight=0.5), gpu)


def test_kd_loss_on_scored_positions_is_the_mean_kl_over_them():
    """kd_loss with targets is KL(teacher || student) at temperature t, times t^2, averaged over
    the positions whose target is not -1 (computed here position by position), whatever the
    other positions hold; without targets, over all positions."""
    g = torch.Generator().manual_seed(6)
    s, te = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    y = torch.tensor([[-1, 3, -1, -1, 2], [-1, -1, -1, 4, -1]])
    t = 2.0

    def kl(b, i):
        p, q = torch.softmax(te[b, i] / t, -1), torch.softmax(s[b, i] / t, -1)
        return float((p * (p.log() - q.log())).sum()) * t * t
    want = sum(kl(b, i) for b, i in [(0, 1), (0, 4), (1, 3)]) / 3
    assert trainer.kd_loss(s, te, t, y).item() == pytest.approx(want, rel=1e-5)
    s2 = s.clone()
    s2[y == -1] = 100.0   # unscored positions do not count
    assert trainer.kd_loss(s2, te, t, y).item() == pytest.approx(want, rel=1e-5)
    every = sum(kl(b, i) for b in range(2) for i in range(5)) / 10
    assert trainer.kd_loss(s, te, t).item() == pytest.approx(every, rel=1e-5)


def test_graphed_step_feeds_the_recording_what_the_eager_step_computes(monkeypatch):
    """What GraphedStep hands to the recording (the objective at alpha=1, the teacher's outputs as
    an input) gives the eager step's loss and gradients; the transition's steps at alpha < 1 run
    the eager objective; it records once, at the first step in the model's own layout. The
    recording itself needs a GPU: here make_graphed_callables returns the module unrecorded."""
    recorded = []
    monkeypatch.setattr(torch.cuda, "make_graphed_callables",
                        lambda module, args, **kw: recorded.append((module.alpha, len(args))) or module)
    model = tiny_model(cache="shared", gate="learned", chunk_size=4).train()
    teacher = tiny_model(seed=1, cache="loop")
    objective = trainer.LMObjective(model, trainer.TrainConfig(kd_weight=0.5))
    graphed = trainer.GraphedStep(objective, SimpleNamespace(dtype="float32"))
    x = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(5))
    t_out = objective.teacher_outputs(teacher, x)
    for alpha in (0.0, 0.4, 1.0, 1.0):
        losses, grads = [], []
        for step in (objective, graphed):
            model.zero_grad(set_to_none=True)
            loss, parts = step(x, y, alpha, t_out)
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
        assert torch.equal(*losses) and set(parts) == {"ce", "lm", "kd"}   # ce: the objective is not a CE of the chosen logits
        for a, b in zip(*grads):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    assert recorded == [(1.0, 3)]   # once, at alpha=1, with (x, y, teacher outputs)


def test_resume_with_other_architecture_is_refused(tiny_data, tmp_path):
    """Resuming with a config whose architecture differs from the checkpoint says so."""
    run_train(tiny_data, tmp_path, "--max_iters=2")
    with pytest.raises(trainer.ConfigError, match="architecture differs"):
        run_train(tiny_data, tmp_path, "--max_iters=4", "--init_from=resume", "--n_embd=64")


def test_cli_error_is_one_line(tmp_path):
    """train.py on a bad key prints one 'train.py: error:' line and exits with status 2."""
    res = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--bogus=1"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("train.py: error: unknown config keys")


def test_config_files_parse_and_are_complete():
    """Every config file in config/ parses into a valid train.py or distill.py config (nothing runs)."""
    import config
    import distill
    for name in sorted(os.listdir(os.path.join(HERE, "config"))):
        if name.endswith(".py") and name != "__init__.py":
            keys = config.read_config_file(os.path.join(HERE, "config", name))
            cls = distill.DistillConfig if "teacher" in keys or "beta" in keys else trainer.TrainConfig
            trainer.parse_args([os.path.join(HERE, "config", name)], train_cls=cls)

