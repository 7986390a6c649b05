"""bench/lesson.py end to end on its toy setting (seconds): every row, resumable; --set."""

import json
import os
import sys

import pytest
import torch

import train as T
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import lesson  # noqa: E402


def test_lesson_toy_writes_every_row_and_resumes(tmp_path):
    """The toy setting trains and scores every row of one seed; results.json holds each row at
    every p with its accuracy in [0, 1], and the KV bytes per token are the layouts': MELT and the
    zero-shot rows hold 1/R of the LoopLM's, the standard model as much as MELT, the deep one L*R
    layers' worth. A second run finds every row done and returns the same results."""
    out = str(tmp_path / "toy")
    first = lesson.run("toy", 3, out, list(lesson.ROWS), threads=1)
    s = lesson.SETTINGS["toy"]
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved == first
    main_rows = {(r["model"], r["hops"]) for r in saved if not r["model"].endswith("_depth")}
    assert main_rows == {(m, p) for m in lesson.ROWS if not m.endswith("_depth") for p in s.hops}
    depth = {(r["model"], r["n_loops"]) for r in saved if r["model"].endswith("_depth")}
    assert depth == {(m, d) for m in ("looplm_depth", "melt_depth") for d in s.depths}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["seed"] == 3 for r in saved)
    kv = {r["model"]: r["kv_bytes_per_token"] for r in saved if not r["model"].endswith("_depth")}
    assert kv["looplm"] == s.n_loop * kv["melt"] == s.n_loop * kv["standard"] == s.n_loop * kv["zero_shot_last"]
    assert kv["standard_deep"] == kv["looplm"] and kv["melt_sweeps"] == kv["melt"]
    assert next(r for r in saved if r["model"] == "melt")["total_seconds"] > \
        next(r for r in saved if r["model"] == "looplm")["total_seconds"]
    assert lesson.run("toy", 3, out, list(lesson.ROWS), threads=1) == first


def test_set_overrides_fields_with_their_types_and_refuses_unknown_ones():
    """--set FIELD=VALUE replaces one field of the setting, the value read as the field's type
    (ints, floats, strings, comma-separated tuples); the other fields stay; an unknown field or a
    value of the wrong type is a one-line error."""
    toy = lesson.SETTINGS["toy"]
    s = lesson.with_sets(toy, ["phase2_steps=7", "phase2_lr=0.25", "align_reduce=sum", "hops=1,3"])
    assert (s.phase2_steps, s.phase2_lr, s.align_reduce, s.hops) == (7, 0.25, "sum", (1, 3))
    assert s.steps == toy.steps and s.melt_lr == toy.melt_lr and toy.phase2_steps != 7
    with pytest.raises(T.ConfigError, match="--set 'phase3_steps=2': use FIELD=VALUE"):
        lesson.with_sets(toy, ["phase3_steps=2"])
    with pytest.raises(T.ConfigError, match="'many' is not of type int"):
        lesson.with_sets(toy, ["steps=many"])


def test_rows_run_side_by_side_give_the_rows_run_one_after_another(tmp_path):
    """--jobs=2 trains rows in their own processes, two at a time, each as soon as the rows it
    continues are done: every row it writes has the accuracy, KV bytes and setting of the same
    row trained in this process one after another (both at 1 thread), and the rows continued
    (looplm, melt_sweeps_phase1) are trained on the way."""
    rows = ["standard", "melt_sweeps", "zero_shot_last"]
    one = lesson.run("toy", 2, str(tmp_path / "one"), rows, threads=1)
    two = lesson.run_parallel("toy", 2, str(tmp_path / "two"), rows, threads=2, sets=(), jobs=2)
    key = lambda r: (r["model"], r["hops"], r["accuracy"], r["kv_bytes_per_token"], r["setting"])
    assert [key(r) for r in two] == [key(r) for r in one]
    for row in ("looplm", "melt_sweeps_phase1", "standard", "melt_sweeps"):
        assert os.path.exists(tmp_path / "two" / row / "row.json")
        assert os.path.exists(tmp_path / "two" / row / "lesson.log")


def test_score_gives_the_accuracy_of_decoding_token_by_token(tmp_path, capsys):
    """--score CKPT scores a checkpoint of one's own on OUT/data's validation rows, per p: the
    accuracy equals greedy prediction token by token through a KV cache (a prefill of one token
    at a time, every earlier token final), counted here at every position with a target and split
    by the p each row's first token names. The command line prints the same numbers."""
    from melt import load_model
    out = str(tmp_path / "toy")
    lesson.run("toy", 3, out, ["melt_sweeps_phase1"], threads=1)   # a MELT model (and its teacher)
    ckpt = os.path.join(out, "melt_sweeps_phase1", "ckpt.pt")
    got = lesson.score_checkpoints("toy", 3, out, [ckpt], threads=1)[ckpt]
    data_dir = os.path.join(out, "data")
    meta = T.load_meta(data_dir)
    w = meta["seq_len"]
    xs, ys = T.Batches(data_dir, meta, w, 1, 1).rows("val")   # the rows as train.py reads them
    model, _ = load_model(ckpt)
    model.eval()
    hits, seen = {p: 0 for p in meta["hops"]}, {p: 0 for p in meta["hops"]}
    with torch.no_grad():
        for x, y in zip(xs, ys):
            p = int(x[0]) - meta["alphabet"] + 1
            cache = model.new_cache(1, w)
            for t in range(w):
                logits, _ = model.prefill(x[t].view(1, 1), cache)
                if y[t] != -1:
                    seen[p] += 1
                    hits[p] += int(logits.argmax(-1)) == int(y[t])
    assert all(seen.values()) and got == {p: hits[p] / seen[p] for p in meta["hops"]}
    lesson.main(["--setting=toy", "--seed=3", f"--out={out}", "--threads=1", "--score", ckpt])
    assert capsys.readouterr().out.strip().endswith("  ".join(f"p={p} {a:.3f}" for p, a in got.items()))


def test_rows_with_the_longest_chain_of_work_ahead_start_first():
    """critical_path: a trained row's work plus that of the longest chain of rows continuing it;
    work counted here by hand from the setting: steps x layers x loops x passes per chunk
    (1 + sweeps), one more pass in phase 2 (the teacher's forward)."""
    s = lesson.SETTINGS["cpu"]
    L, R, k = s.n_layer, s.n_loop, s.sweeps
    cp = lesson.critical_path(lesson.TRAINED, s, lesson.plan(s))
    looplm, phase1_sweeps, phase2_sweeps = s.steps * L * R, s.phase1_steps * L * R * (1 + k), s.phase2_steps * L * R * (k + 2)
    assert cp["looplm"] == looplm + phase1_sweeps + phase2_sweeps   # -> melt_sweeps_phase1 -> melt_sweeps
    assert cp["melt_phase1"] == s.phase1_steps * L * R + s.phase2_steps * L * R * 2   # -> melt, no sweeps
    assert cp["standard_deep"] == s.steps * (L * R) * 1 and cp["standard"] == s.steps * L
    assert max(cp, key=cp.get) == "looplm" and cp["melt_sweeps_phase1"] > cp["standard_deep"]


def test_dial_rows_cover_every_loop_count_and_keep_melt_at_one_slot(tmp_path):
    """--rows=dial on the toy setting: results.json has a row for every (model, p, loops run) of
    dial_looplm and dial_melt, loops 1 .. 2 x dial_loops; MELT's KV bytes per token are the same at
    every loop count and equal a standard transformer's, 2 (k, v) x layers x width x 4 bytes,
    the LoopLM's that times the loops run; the adaptive-exit rows' mean loops lie in [1, dial_loops].
    Its pictures: dial.png, and no lesson.png (no row of the lesson's story to draw)."""
    out = str(tmp_path / "dial")
    s = lesson.SETTINGS["toy"]
    lesson.main(["--setting=toy", "--seed=1", f"--out={out}", "--threads=1", "--jobs=1", "--rows=dial"])
    saved = json.load(open(os.path.join(out, "results.json")))
    loops = range(1, 2 * s.dial_loops + 1)
    for m in ("dial_looplm", "dial_melt"):
        got = sorted((r["hops"], r["n_loops"]) for r in saved if r["model"] == m)
        assert got == sorted((p, d) for p in s.hops for d in loops)
    one_slot = 2 * s.n_layer * s.n_embd * 4
    for r in saved:
        if r["model"] == "dial_melt":
            assert r["kv_bytes_per_token"] == one_slot
        if r["model"] == "dial_looplm":
            assert r["kv_bytes_per_token"] == r["n_loops"] * one_slot
    exits = [r for r in saved if r["model"] in ("dial_looplm_exit", "dial_melt_exit")]
    assert {(r["model"], r["hops"]) for r in exits} == {(m, p) for m in ("dial_looplm_exit", "dial_melt_exit")
                                                        for p in s.hops}
    assert all(1.0 <= r["mean_loops"] <= s.dial_loops and r["n_loops"] == s.dial_loops for r in exits)
    assert os.path.exists(os.path.join(out, "dial.png")) or not _has_matplotlib()
    assert not os.path.exists(os.path.join(out, "lesson.png"))


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_an_out_folder_keeps_one_setting_and_score_refuses_other_data(tmp_path):
    """An OUT made with one setting refuses a run with another (results.json would mix them), in
    one line naming the field; --score refuses a checkpoint trained on other data; a --set that
    cannot make the task is refused; --report of an empty folder is an error, not an empty table."""
    out = str(tmp_path / "toy")
    lesson.run("toy", 1, out, ["standard"], threads=1)
    with pytest.raises(T.ConfigError, match="holds rows of another setting .*seq_len=12.*seq_len=20"):
        lesson.run("toy", 1, out, ["standard"], threads=1, sets=["seq_len=20"])
    other = str(tmp_path / "other")
    lesson.run("toy", 1, other, ["standard"], threads=1, sets=["alphabet=5"])
    with pytest.raises(T.ConfigError, match="does not use the tokenizer the checkpoint was trained with"):
        lesson.score_checkpoints("toy", 1, out, [os.path.join(other, "standard", "ckpt.pt")], threads=1)
    for bad in ("hops=0", "alphabet=99", "n_train=0"):
        with pytest.raises(T.ConfigError, match="bad setting"):
            lesson.with_sets(lesson.SETTINGS["toy"], [bad])
    with pytest.raises(T.ConfigError, match="holds no finished row"):
        lesson.main(["--report", str(tmp_path)])


def test_dial_bars_state_each_seed_against_hand_made_curves():
    """dial_bars on rows made by hand, hardest p = 2, 4 loops: seed 1's staircase first reaches 0.95
    at 3 loops with 2 loops 0.10 below it (not met: 10 points, not 20), MELT 0.04 behind at worst
    (met, at 4 loops); seed 2's LoopLM never reaches 0.95. The exit rows of seed 1: the LoopLM uses
    1.5 loops at p = 1 and 3.0 at p = 2, 0.5 points below its 4 fixed loops (met); MELT 0.03
    below (not met)."""
    curves = {(1, "dial_looplm"): [0.50, 0.86, 0.96, 0.99], (1, "dial_melt"): [0.50, 0.80, 0.95, 0.95],
              (2, "dial_looplm"): [0.50, 0.60, 0.70, 0.80], (2, "dial_melt"): [0.50, 0.60, 0.70, 0.80]}
    rows = [dict(model=m, seed=s, hops=p, n_loops=n + 1, accuracy=a if p == 2 else 1.0, kv_bytes_per_token=1)
            for (s, m), accs in curves.items() for n, a in enumerate(accs) for p in (1, 2)]
    rows += [dict(model=m, seed=1, hops=p, n_loops=4, accuracy=a, mean_loops=u)
             for m, got in (("dial_looplm_exit", [(1.0, 1.5), (0.985, 3.0)]), ("dial_melt_exit", [(0.97, 1.5), (0.95, 3.0)]))
             for p, (a, u) in zip((1, 2), got)]
    acc = {(r["model"], r["seed"], r["n_loops"], r["hops"]): r for r in rows if r["model"] in lesson.DIALED}
    bars = lesson.dial_bars(rows, acc, [1, 2], 2)
    assert bars[0].startswith("seed 1: staircase NOT met") and "from 3 loops" in bars[0] and "10.0 points" in bars[0]
    assert bars[1].startswith("seed 1: MELT within 5 points at 2 loop counts") and "met (worst 4.0 at 4 loops)" in bars[1]
    assert bars[2].startswith("seed 1: dial_looplm_exit: met") and "1.50 loops at p = 1, 3.00 at p = 2" in bars[2]
    assert "at most 0.5 points" in bars[2]
    assert bars[3].startswith("seed 1: dial_melt_exit: NOT met") and "at most 3.0 points" in bars[3]
    assert bars[4].startswith("seed 2: staircase NOT met: the LoopLM never reaches 0.95") and len(bars) == 5
    assert "| MELT behind, worst seed (points) | 0.0 | 6.0 | 1.0 | 4.0 |" in lesson.dial_table(rows)


def test_widest_counts_the_rows_that_can_run_side_by_side():
    """widest: the dial's rows form a chain (teacher, phase 1, phase 2), so one runs at a time; the
    lesson's trained rows can run four side by side, the phase-1 rows that all continue the LoopLM
    (melt, sweeps, no interpolation, scalar gate)."""
    s = lesson.SETTINGS["cpu"]
    steps = lesson.plan(s)
    assert lesson.widest(["dial_looplm", "dial_melt_phase1", "dial_melt"], steps) == 1
    assert lesson.widest(["dial_melt"], steps) == 1
    assert lesson.widest(list(lesson.TRAINED), steps) == 4


def test_exit_gate_probe_targets_follow_the_loss_still_to_gain():
    """dev/exit_gate_probe.py's targets, checked token by token against the per-loop losses
    computed here with log_softmax: with a hard target (k large) a token's exit target at loop t
    is 1 exactly when no later loop lowers its loss by more than gamma (--ahead=all) or the next
    loop does not (--ahead=1); per="row" gives every token of a row the row's largest gain,
    per="suffix" the largest of its own and later tokens'; and positions without a target never
    count as gaining."""
    sys.path.insert(0, os.path.join(ROOT, "dev"))
    import exit_gate_probe
    from test_melt import tiny_model
    model = tiny_model(n_loop=4)
    x = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(2))
    y[:, :2] = -1
    with torch.no_grad():
        hidden = model.run(x).hidden
        logp = torch.log_softmax(model.lm_head(hidden).double(), -1)              # (R, B, T, V)
    R, gamma = hidden.shape[0], 0.01
    ce = [[[-float(logp[t, b, i, y[b, i]]) if y[b, i] >= 0 else 0.0 for i in range(9)] for b in range(3)]
          for t in range(R)]
    for ahead in ("all", "1"):
        for per in ("token", "row", "suffix"):
            target, _, scored = exit_gate_probe.gate_targets(model, x, y, ahead, k=1e6, gamma=gamma, per=per)
            assert torch.equal(scored, y != -1)
            for t in range(R - 1):
                for b in range(3):
                    later = list(range(t + 1, R)) if ahead == "all" else [t + 1]
                    gain = [max(0.0, ce[t][b][i] - min(ce[u][b][i] for u in later)) for i in range(9)]
                    if per == "row":
                        gain = [max(gain)] * 9
                    elif per == "suffix":
                        gain = [max(gain[i:]) for i in range(9)]
                    want = torch.tensor([1.0 if g < gamma else 0.0 for g in gain])
                    assert torch.equal(target[t, b].round(), want), (ahead, per, t, b)
