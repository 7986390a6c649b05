"""distill.py: phase 2, attention-aligned distillation."""

import json
import os
import sys

import pytest
import torch

import distill
import train as trainer
from conftest import OURO_TINY, ROOT, run_train
from melt import MELT
from test_melt import load_reference

sys.path.insert(0, os.path.join(ROOT, "dev"))
import ouro_step  # noqa: E402


def run_distill(data, out, *extra):
    argv = [f"--dataset={data}", f"--out_dir={out}", f"--teacher={OURO_TINY}", "--batch_size=4",
            "--max_iters=24", "--eval_interval=8", "--eval_iters=2", "--warmup_iters=2", "--lr=3e-3",
            "--min_lr=3e-4", "--gate_lr=3e-2", "--sample_tokens=0", "--block_size=32", "--chunk_size=8", *extra]
    cfg, keys = trainer.parse_args(argv, train_cls=distill.DistillConfig)
    model, rec, _ = trainer.train(cfg, keys, objective_cls=distill.DistillObjective, build_fn=distill.build_distill)
    return model, [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_distill_from_ouro_lowers_kd_and_alignment(ouro_data, tmp_path):
    """Distilling the tiny Ouro model into its own shared-cache conversion for 40 steps (beta=1
    so that both terms weigh alike) lowers the KD and the attention-alignment terms on
    validation data by a fifth or more; the teacher's
    validation loss is logged beside the student's."""
    _, log = run_distill(ouro_data, tmp_path, "--lr=3e-4", "--min_lr=1e-5", "--beta=1.0", "--max_iters=40",
                         "--eval_interval=20")
    first, last = log[0], log[-1]
    assert last["val_kd"] < 0.8 * first["val_kd"]
    assert last["val_align"] < 0.8 * first["val_align"]
    assert first["teacher_val_ce"] == last["teacher_val_ce"] > 0 and "val_ce" in last


def test_distill_terms_vanish_for_a_student_identical_to_the_teacher(ouro_data):
    """A student that is the teacher (loop mode, same weights) has KD = 0 and alignment = 0."""
    teacher = MELT.from_ouro(OURO_TINY).eval()
    student = MELT.from_ouro(OURO_TINY).eval()
    cfg, _ = trainer.parse_args([f"--teacher={OURO_TINY}"], train_cls=distill.DistillConfig)
    obj = distill.DistillObjective(student, cfg)
    x = load_reference()["input_ids"]
    with torch.no_grad():
        loss, parts = obj(x, x, 1.0, obj.teacher_outputs(teacher, x))
    assert parts["kd"].abs().item() < 1e-6 and parts["align"].item() == 0.0


def test_alignment_term_sums_or_averages_the_squared_difference_over_the_width(ouro_data):
    """The alignment term is the squared difference of student and teacher attention outputs,
    summed over the width (align_reduce=sum, the paper's ||.||^2) or averaged over it (mean),
    then averaged over loops, layers and tokens: checked against a loop over each (loop, layer)."""
    teacher = MELT.from_ouro(OURO_TINY).eval()
    student = MELT.from_ouro(OURO_TINY).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = load_reference()["input_ids"]
    with torch.no_grad():
        s_out, t_out = student.run(x, collect_attn=True), teacher.run(x, collect_attn=True)
    diffs = [(s_out.attn[r][l].double() - t_out.attn[r][l].double()) ** 2
             for r in range(len(s_out.attn)) for l in range(len(s_out.attn[0]))]   # each (B, T, C)
    width, tokens = diffs[0].shape[-1], diffs[0].numel() // diffs[0].shape[-1]
    expect = {"sum": sum(d.sum().item() for d in diffs) / (len(diffs) * tokens)}
    expect["mean"] = expect["sum"] / width
    for reduce in ("sum", "mean"):
        cfg, _ = trainer.parse_args([f"--teacher={OURO_TINY}", f"--align_reduce={reduce}"],
                                    train_cls=distill.DistillConfig)
        obj = distill.DistillObjective(student, cfg)
        with torch.no_grad():
            _, parts = obj(x, x, 1.0, obj.teacher_outputs(teacher, x))
        assert expect[reduce] > 0
        assert abs(parts["align"].item() - expect[reduce]) < 1e-4 * expect[reduce]


def test_exit_term_is_the_cross_entropy_of_the_student_gate_against_the_teacher_s(ouro_data):
    """exit_weight's term: at every loop and token, the binary cross-entropy of the student's
    exit probability lambda = sigmoid(gate logit) against the teacher's, averaged, computed here
    from each loop's hidden state with the gate's own weights; a student that is the teacher scores
    the teacher's own entropy, its minimum."""
    teacher = MELT.from_ouro(OURO_TINY).eval()
    student = MELT.from_ouro(OURO_TINY).eval()
    cfg, _ = trainer.parse_args([f"--teacher={OURO_TINY}", "--exit_weight=1"], train_cls=distill.DistillConfig)
    obj = distill.DistillObjective(student, cfg)
    x = load_reference()["input_ids"]
    with torch.no_grad():
        _, same = obj(x, x, 1.0, obj.teacher_outputs(teacher, x))
        for p in student.exit_gate.parameters():
            p.add_(0.3)
        _, moved = obj(x, x, 1.0, obj.teacher_outputs(teacher, x))
        h_s, h_t = student.run(x).hidden.double(), teacher.run(x).hidden.double()
    lam = lambda m, h: torch.sigmoid(h @ m.exit_gate.weight.double().T + m.exit_gate.bias.double())[..., 0]
    q, p = lam(student, h_s), lam(teacher, h_t)
    bce = lambda q, p: -(p * q.log() + (1 - p) * (1 - q).log()).mean().item()
    assert abs(moved["exit"].item() - bce(q, p)) < 1e-4 and moved["exit"] > same["exit"]
    assert abs(same["exit"].item() - bce(p, p)) < 1e-4


def test_distill_bad_inputs(ouro_data, tiny_data, tmp_path):
    """Missing teacher directory, beta < 0, an unknown align_reduce, a loop-mode student, a student whose shapes differ
    from the teacher's, and data not tokenized with the Ouro tokenizer are refused clearly."""
    with pytest.raises(trainer.ConfigError, match="does not exist"):
        run_distill(ouro_data, tmp_path, "--teacher=/nonexistent/ouro")
    with pytest.raises(trainer.ConfigError, match="beta=-0.1 must be >= 0"):
        run_distill(ouro_data, tmp_path, "--beta=-0.1")
    with pytest.raises(trainer.ConfigError, match="align_reduce='max': use sum or mean"):
        run_distill(ouro_data, tmp_path, "--align_reduce=max")
    with pytest.raises(trainer.ConfigError, match="student is in loop mode"):
        run_distill(ouro_data, tmp_path, "--cache=loop")
    with pytest.raises(trainer.ConfigError, match="not tokenized with the teacher's tokenizer"):
        run_distill(tiny_data, tmp_path)
    run_train(tiny_data, tmp_path / "other", "--max_iters=1", "--cache=shared")
    with pytest.raises(trainer.ConfigError, match="differ in vocab_size"):
        run_distill(ouro_data, tmp_path, f"--init_from={tmp_path / 'other' / 'ckpt.pt'}")


def test_ouro_shaped_step_runs_phase_2_from_a_student_that_is_the_teacher():
    """dev/ouro_step.py (phase 2 at Ouro-1.4B's shapes, a GPU measurement) at its tiny
    shape on the CPU: the student starts with every teacher weight (the gates its own), the
    micro-batches give finite losses over config/ouro_distill.py's 2,048-token rows cut to 16, and
    the optimizer's step moves the student's weights, never the frozen teacher's (both compared
    with a fresh pair made from the same seed)."""
    teacher0, student0 = ouro_step.models(ouro_step.TINY, 2, 16, 4, torch.device("cpu"))
    t0, s0 = teacher0.state_dict(), student0.state_dict()
    assert set(s0) - set(t0) and all(".gate." in k for k in set(s0) - set(t0))
    assert all(torch.equal(t0[k], s0[k]) for k in t0)
    r, teacher, student = ouro_step.measure(["--tiny", "--device=cpu", "--micro=2"])
    assert (r["block"], r["chunk"], r["micro"], r["checkpoint_mlp"]) == (16, 4, 2, True)
    assert len(r["losses"]) == 3 and all(torch.isfinite(torch.tensor(r["losses"])))
    assert all(torch.equal(t0[k], v) for k, v in teacher.state_dict().items())
    moved = [k for k, v in student.state_dict().items() if not torch.equal(s0[k], v)]
    assert "blocks.0.attn.q_proj.weight" in moved and "blocks.0.gate.w_z.weight" in moved
