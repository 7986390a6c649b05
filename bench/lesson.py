"""
The lesson in one command: on a task where depth matters (p-hop induction, data/prepare.py),
(1) looping buys accuracy a standard model of the same size lacks, (2) MELT keeps it at the KV
memory of a standard model after its two post-training phases, (3) zero-shot cache sharing does not.

    python bench/lesson.py --setting=cpu --seed=1 --out=out-lesson/s1      # every row, one seed
    python bench/lesson.py --setting=cpu --seed=1 --out=out-lesson/s1 --rows=standard,looplm
    python bench/lesson.py --report out-lesson/s1 out-lesson/s2 out-lesson/s3   # mean and worst seed, rows done so far
    python bench/lesson.py --report bench/results/lesson_cpu_2026-12-01_150_600/results_s*.json   # or results.json files
    python bench/lesson.py --seed=1 --out=out-lesson/long --set phase2_steps=300   # an ablation of the setting
    python bench/lesson.py --seed=1 --out=out-lesson/s1 --score my_run/ckpt.pt   # a checkpoint of your own

Each row trains (or only scores) into OUT/<row>/ and is skipped when OUT/<row>/row.json exists, so a
stopped run continues where it was. On a CPU the trained rows run two at a time, each in its own
process at half the threads (--jobs, default 2 on a CPU, 1 on a GPU). Every model sees the same
data order; accuracy is exact match over the positions with a target, at decode semantics (every earlier token final, as when
generating), per hop count p. Writes OUT/results.json (a list of rows: model, hops, accuracy,
kv_bytes_per_token, seed, train_seconds (this row's own training), total_seconds (with the rows it
continues: phase 2 counts phase 1 and the teacher), n_loops), prints the table, and draws OUT/lesson.png when
matplotlib is installed.

Rows: standard (L layers x 1 loop), standard_deep (L*R x 1), looplm (L x R, the teacher);
zero_shot_last / _mean / _first (the teacher with a shared cache, untrained); melt_phase1 and melt
(the interpolated transition, then attention-aligned distillation); melt_sweeps (the same two
phases trained with sweeps, i.e. at decode semantics); the ablations of the melt_sweeps recipe,
melt_no_interp_phase1 (phase 1 without the alpha ramp) and melt_scalar_gate_phase1 (compared with
melt_sweeps_phase1), melt_no_align (phase 2 with beta=0, compared with melt_sweeps); depth at
inference (looplm_depth, melt_depth: the LoopLM and melt_sweeps run at 1..8 loops). Not in
--rows=all (CPU time), by name only: melt_no_interp and melt_scalar_gate, those phase-1 ablations
carried through phase 2.

The dial (--rows=dial, also in --rows=all): compute at constant memory. dial_looplm trains with
Ouro's objective (every loop's exit a predictor) at dial_loops loops; dial_melt_phase1 and dial_melt
convert it (phases 1 and 2 with sweeps, each step at a loop count drawn from [dial_min_loops,
dial_max_loops], by default every count they are scored at, phase 2 distilling every loop and the
exit gate). Both are scored at every loop count from 1 to twice the trained one (rows with
n_loops; the LoopLM's KV bytes grow with the loops, MELT's do not), and
with adaptive exit (dial_looplm_exit, dial_melt_exit: exit_threshold dial_exit, with mean_loops,
the mean loop each answer came from). Pictures: OUT/lesson.png, OUT/dial.png.
"""

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import distill  # noqa: E402
import train as T  # noqa: E402
from config import coerce  # noqa: E402
from data.prepare import prepare_phop  # noqa: E402
from serve.checkpoint import load_model  # noqa: E402
from serve.runtime import pick_device, set_threads  # noqa: E402


@dataclass
class Setting:
    alphabet: int = 4           # p-hop symbols
    seq_len: int = 64           # symbols per row (plus the token that names p)
    hops: tuple = (1, 2, 3, 4, 5, 6)   # the mixture of p; the largest is "the hardest p"
    n_train: int = 60_000       # training rows (more than steps x batch: no row is seen twice)
    n_val: int = 500            # validation rows, scored at decode semantics
    n_embd: int = 128           # width
    n_head: int = 4             # heads
    n_layer: int = 2            # L: layers of the looped stack
    n_loop: int = 4             # R: loops of the LoopLM and MELT
    batch_size: int = 32        # rows per step
    steps: int = 1500           # steps of standard, standard_deep and looplm
    lr: float = 2e-3            # their peak learning rate
    phase1_steps: int = 150     # MELT phase 1: half of phase 2, where the same steps buy more (RESULTS.md)
    alpha_steps: int = 75       # phase 1's alpha ramps 0 -> 1 over these steps, then stays 1
    phase2_steps: int = 600     # MELT phase 2 (with 300 + 300, seed 3 ended 12 points behind its LoopLM)
    melt_lr: float = 1e-3       # base weights' learning rate in phase 1
    phase2_lr: float = 2e-3     # and in phase 2 (1e-3 left seed 3 3 points lower: RESULTS.md)
    align_reduce: str = "mean"  # phase 2's alignment averaged over the width (distill.py); the sum, the paper's
                                # ||.||^2, outweighs the KD term ~20:1 at beta 0.1 and cost 4-8 points at p = 6
    kd_loops: str = "last"      # phase 2 distils the teacher's last loop only: trained with loss=last, its
                                # earlier loops' logits are not predictions (kd_loops=all, the paper's, for
                                # Ouro's every-exit training, cost 6 points at p = 6 in 2 seeds of 3: RESULTS.md)
    gate_lr: float = 1e-2       # the gates' learning rate in phase 1
    chunk_size: int = 16        # MELT's training chunks
    sweeps: int = 1             # melt_sweeps: extra passes per chunk
    sweeps_grad: str = "all"    # melt_sweeps: "all" passes in the graph, or "last" (MeltConfig.sweeps_grad)
    depths: tuple = (1, 2, 3, 4, 5, 6, 8)   # loops at inference for the depth rows
    eval_interval: int = 500    # steps between train.py's evals (its log), for the base models
    dial_loops: int = 4         # the dial: loops dial_looplm trains with (scored at 1 .. 2 x this); 6 left
                                # seed 2 on the shortcut plateau at 1,500 steps (RESULTS.md)
    dial_steps: int = 2000      # its steps (at 1,500 seed 2's teacher had not learned p = 6: RESULTS.md)
    entropy_weight: float = 0.3  # its objective, Ouro's: sum_t p_t CE_t - entropy_weight H(p) (loss=expected_loss);
                                 # 1.0 left 3 loops only 8-18 points below 4, 0.1 lost MELT 8.5 points (RESULTS.md)
    dial_min_loops: int = 1     # MELT's dial phases draw each step's loop count from [this, dial_max_loops]
    dial_max_loops: int = 0     # 0 means 2 x dial_loops, every count MELT is scored at (trained up to
                                # dial_loops only, it fell 7-25 points behind past dial_loops + 1: RESULTS.md)
    dial_exit_weight: float = 1.0   # phase 2: weight of the exit gate's distillation (distill.py exit_weight)
    dial_phase2_steps: int = 1000   # the dial's phase 2: each loop count gets ~1/(2 dial_loops) of them (800 left
                                    # MELT 8.3 points behind at p = 6 with 4 loops in seed 2; RESULTS.md)
    dial_exit: float = 0.7      # exit_threshold of the adaptive-exit rows (0.5 and 0.6 stop before p = 6 is
                                # solved, up to 12.6 and 3.5 points lost; 0.8 runs every loop: RESULTS.md)


SETTINGS = {
    "cpu": Setting(),
    # one GPU: longer rows, more hops, a wider model; its time is extrapolated, not measured whole
    "gpu": Setting(alphabet=16, seq_len=256, hops=(1, 2, 3, 4, 5, 6), n_train=400_000, n_val=2_000, n_embd=256,
                   n_layer=2, n_loop=6, batch_size=64, steps=4000, phase1_steps=600, alpha_steps=300, phase2_steps=400,
                   chunk_size=32, sweeps=2, eval_interval=1000),
    # seconds, for the end-to-end test
    "toy": Setting(alphabet=4, seq_len=12, hops=(1, 2), n_train=400, n_val=40, n_embd=32, n_head=2, n_layer=1,
                   n_loop=2, batch_size=8, steps=12, phase1_steps=6, alpha_steps=3, phase2_steps=4, chunk_size=4, sweeps=1,
                   depths=(1, 2, 3), eval_interval=6, dial_loops=3, dial_steps=12, dial_phase2_steps=4),
}
CORE = ("standard", "standard_deep", "looplm", "zero_shot_last", "zero_shot_mean", "zero_shot_first",
        "melt_phase1", "melt", "melt_sweeps_phase1", "melt_sweeps")   # what the claims rest on (--rows=core)
TRAINED = ("standard", "standard_deep", "looplm", "melt_phase1", "melt", "melt_sweeps_phase1", "melt_sweeps",
           "melt_no_interp_phase1", "melt_no_align", "melt_scalar_gate_phase1")
SCORED = ("zero_shot_last", "zero_shot_mean", "zero_shot_first", "looplm_depth", "melt_depth")
DIAL = ("dial_looplm", "dial_melt_phase1", "dial_melt", "dial_looplm_exit", "dial_melt_exit")   # --rows=dial
DIALED = ("dial_looplm", "dial_melt")           # scored at every loop count from 1 to 2 x dial_loops
ALL = TRAINED + SCORED + DIAL                   # --rows=all
EXTRA = ("melt_no_interp", "melt_scalar_gate")  # the phase-1 ablations carried through phase 2 (by name only)
ROWS = ALL + EXTRA


def with_sets(s, sets):
    """The Setting s with FIELD=VALUE overrides (--set), each VALUE read as its field's type by the
    scripts' own reader (config.coerce; a tuple: comma-separated ints)."""
    types = {f.name: f.type for f in fields(s)}
    changes = {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or key not in types:
            raise T.ConfigError(f"--set {item!r}: use FIELD=VALUE with FIELD one of {', '.join(types)}")
        try:
            typ = types[key]
            changes[key] = tuple(int(v) for v in value.split(",")) if typ is tuple else coerce(key, value, typ)
        except (ValueError, T.ConfigError):
            raise T.ConfigError(f"--set {item!r}: {value!r} is not of type {types[key].__name__}") from None
    return check_setting(replace(s, **changes))


def check_setting(s):
    """Refuse a setting that cannot make the task or train, naming the field."""
    bad = next((msg for ok, msg in [
        (2 <= s.alphabet <= 64, f"alphabet={s.alphabet} must be in [2, 64]"),
        (s.hops and min(s.hops) >= 1, f"hops={s.hops} must be hop counts >= 1"),
        (s.seq_len >= max(s.hops or (1,)) + 2, f"seq_len={s.seq_len} is too short for hops={s.hops}"),
        (s.n_train >= s.batch_size and s.n_val >= 1, f"n_train={s.n_train} must be >= batch_size and n_val >= 1"),
        (min(s.n_embd, s.n_head, s.n_layer, s.n_loop, s.batch_size, s.steps, s.phase1_steps, s.phase2_steps,
             s.chunk_size, s.dial_loops, s.dial_steps, s.dial_min_loops, s.dial_phase2_steps) >= 1,
         "sizes and steps must be >= 1"),
        (s.dial_min_loops <= (s.dial_max_loops or 2 * s.dial_loops) and s.dial_max_loops >= 0,
         f"dial_min_loops={s.dial_min_loops} must be <= dial_max_loops={s.dial_max_loops or 2 * s.dial_loops}"),
        (s.dial_exit_weight >= 0, f"dial_exit_weight={s.dial_exit_weight} must be >= 0"),
        (0 < s.dial_exit <= 1, f"dial_exit={s.dial_exit} must be in (0, 1]"),
        (s.depths and min(s.depths) >= 1, f"depths={s.depths} must be loop counts >= 1")] if not ok), None)
    if bad:
        raise T.ConfigError(f"bad setting: {bad}")
    return s


def common_args(s, seed, data_dir, out_dir, threads):
    return [f"--dataset={data_dir}", f"--out_dir={out_dir}", f"--seed={seed}", f"--batch_size={s.batch_size}",
            f"--block_size={s.seq_len + 1}", "--sample_tokens=0", "--eval_iters=4", "--log_interval=50",
            f"--threads={threads}", "--overwrite=True", "--device=cpu" if threads else "--device=auto"]


def base_args(s, n_layer, n_loop, cache, steps=None, loss="last"):
    steps = steps or s.steps
    return [f"--n_layer={n_layer}", f"--n_loop={n_loop}", f"--cache={cache}", f"--n_embd={s.n_embd}",
            f"--n_head={s.n_head}", f"--loss={loss}", f"--max_iters={steps}", f"--lr={s.lr}", f"--min_lr={s.lr / 10}",
            "--warmup_iters=100" if steps >= 400 else f"--warmup_iters={max(1, steps // 10)}",
            f"--eval_interval={s.eval_interval}"] + ([f"--entropy_weight={s.entropy_weight}"] if loss != "last" else [])


def phase1_args(s, teacher, gate="learned", interpolate=True, sweeps=0):
    n = s.phase1_steps
    return [f"--init_from={teacher}", "--cache=shared", f"--gate={gate}", f"--chunk_size={s.chunk_size}",
            f"--sweeps={sweeps}", f"--sweeps_grad={s.sweeps_grad}", f"--max_iters={n}", f"--alpha_steps={s.alpha_steps if interpolate else 0}", f"--lr={s.melt_lr}",
            f"--min_lr={s.melt_lr / 10}", f"--gate_lr={s.gate_lr}", f"--warmup_iters={max(1, n // 10)}",
            f"--eval_interval={n}"]


def phase2_args(s, teacher, student, beta=0.1, sweeps=0, kd_loops=None, steps=None):
    n = steps or s.phase2_steps
    return [f"--teacher={teacher}", f"--init_from={student}", f"--beta={beta}", f"--align_reduce={s.align_reduce}",
            f"--sweeps={sweeps}", f"--kd_loops={kd_loops or s.kd_loops}", f"--max_iters={n}", f"--lr={s.phase2_lr}",
            f"--min_lr={s.phase2_lr / 10}", f"--warmup_iters={max(1, n // 10)}", f"--eval_interval={n}"]


def plan(s):
    """{row: (kind, argument builder, the rows it needs)} for every trained row. The ablations change
    one thing of the better recipe (melt_sweeps): the phase-1 ones (no interpolation, scalar gate)
    are compared with melt_sweeps_phase1 at the end of phase 1, no alignment with melt_sweeps."""
    ck = lambda row, out: os.path.join(out, row, "ckpt.pt")
    L, R, k = s.n_layer, s.n_loop, s.sweeps
    dial_loops = [f"--min_loops={s.dial_min_loops}", f"--max_loops={s.dial_max_loops or 2 * s.dial_loops}"]
    return {
        "standard": ("train", lambda out: base_args(s, L, 1, "loop"), ()),
        "standard_deep": ("train", lambda out: base_args(s, L * R, 1, "loop"), ()),
        "looplm": ("train", lambda out: base_args(s, L, R, "loop"), ()),
        "melt_phase1": ("train", lambda out: phase1_args(s, ck("looplm", out)), ("looplm",)),
        "melt": ("distill", lambda out: phase2_args(s, ck("looplm", out), ck("melt_phase1", out)), ("melt_phase1",)),
        "melt_sweeps_phase1": ("train", lambda out: phase1_args(s, ck("looplm", out), sweeps=k), ("looplm",)),
        "melt_sweeps": ("distill", lambda out: phase2_args(s, ck("looplm", out), ck("melt_sweeps_phase1", out),
                                                           sweeps=k), ("melt_sweeps_phase1",)),
        "melt_no_interp_phase1": ("train", lambda out: phase1_args(s, ck("looplm", out), interpolate=False, sweeps=k),
                                  ("looplm",)),
        "melt_no_interp": ("distill", lambda out: phase2_args(s, ck("looplm", out), ck("melt_no_interp_phase1", out),
                                                              sweeps=k), ("melt_no_interp_phase1",)),
        "melt_no_align": ("distill", lambda out: phase2_args(s, ck("looplm", out), ck("melt_sweeps_phase1", out),
                                                             beta=0.0, sweeps=k), ("melt_sweeps_phase1",)),
        "melt_scalar_gate_phase1": ("train", lambda out: phase1_args(s, ck("looplm", out), gate="scalar", sweeps=k),
                                    ("looplm",)),
        "melt_scalar_gate": ("distill", lambda out: phase2_args(s, ck("looplm", out), ck("melt_scalar_gate_phase1", out),
                                                                sweeps=k), ("melt_scalar_gate_phase1",)),
        # the dial: every loop's exit trained (Ouro's objective); MELT's phases at a loop count drawn
        # per step, phase 2 distilling every loop, so that the student can be read at any depth
        "dial_looplm": ("train", lambda out: base_args(s, L, s.dial_loops, "loop", s.dial_steps, "expected_loss"), ()),
        "dial_melt_phase1": ("train", lambda out: phase1_args(s, ck("dial_looplm", out), sweeps=k) + dial_loops,
                             ("dial_looplm",)),
        "dial_melt": ("distill", lambda out: phase2_args(s, ck("dial_looplm", out), ck("dial_melt_phase1", out),
                                                         sweeps=k, kd_loops="all", steps=s.dial_phase2_steps)
                      + dial_loops + [f"--exit_weight={s.dial_exit_weight}"], ("dial_melt_phase1",)),
    }


def ensure_data(s, out):
    """OUT/data, the setting's p-hop dataset, generated unless it is there; its path."""
    data_dir = os.path.join(out, "data")
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        prepare_phop(data_dir, alphabet=s.alphabet, seq_len=s.seq_len, hops=s.hops, n_train=s.n_train,
                     n_val=s.n_val, seed=0)   # the same data for every seed: the seed is the model's
    return data_dir


def setup(s, out, threads, label=None):
    """(OUT/data, its meta, the device) for scoring or training in this process; threads > 0
    forces the CPU at that many threads. With label (a run, not --score): OUT belongs to one
    setting (OUT/setting.json), and another is refused, so that results.json never mixes two."""
    set_threads(threads)
    os.makedirs(out, exist_ok=True)
    if label is not None:
        path, want = os.path.join(out, "setting.json"), dict(label=label, **asdict(s))
        want = json.loads(json.dumps(want))   # tuples as lists, as read back
        have = json.load(open(path)) if os.path.exists(path) else None
        if have is not None and have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise T.ConfigError(f"{out} holds rows of another setting ({', '.join(f'{k}={have.get(k)!r}' for k in diff)}; "
                                f"this run asks for {', '.join(f'{k}={want.get(k)!r}' for k in diff)}): use another --out")
        if have is None:
            with open(path + ".tmp", "w") as f:
                json.dump(want, f)
            os.replace(path + ".tmp", path)
    data_dir = os.path.abspath(ensure_data(s, out))   # the rows' processes may run elsewhere
    return data_dir, T.load_meta(data_dir), pick_device("cpu" if threads else "auto")


def needs(row, steps):
    """The rows `row` continues (trained rows) or scores (the zero-shot, depth and exit rows)."""
    if row in steps:
        return steps[row][2]
    return {"melt_depth": ("melt_sweeps",), "dial_looplm_exit": ("dial_looplm",),
            "dial_melt_exit": ("dial_melt",)}.get(row, ("looplm",))


def work(row, s, steps):
    """A trained row's cost, for ordering the rows only: steps x layers x loops x passes per chunk
    (1 + sweeps), one more pass in phase 2 for the teacher's forward. Read off the row's own
    arguments (phase 1 and 2 keep the LoopLM's layers and loops)."""
    kind, args, _ = steps[row]
    a = dict(x[2:].split("=", 1) for x in args(""))
    loops = int(a.get("n_loop", s.dial_loops if row.startswith("dial") else s.n_loop))
    if "min_loops" in a:   # a loop count drawn per step: the mean
        loops = (int(a["max_loops"]) + int(a["min_loops"])) / 2
    n = int(a["max_iters"]) * int(a.get("n_layer", s.n_layer)) * loops
    return n * (1 + int(a.get("sweeps", 0)) + (kind == "distill"))


def critical_path(rows, s, steps):
    """{row: the work of the longest chain of rows from it to the end}: its own work and that of
    the longest chain of rows continuing it. Starting the longest chains first keeps the longest
    one from starting last (list scheduling by critical path)."""
    memo = {}

    def chain(r):
        if r not in memo:
            memo[r] = work(r, s, steps) + max((chain(o) for o in rows if r in needs(o, steps)), default=0)
        return memo[r]
    return {r: chain(r) for r in rows}


def widest(rows, steps):
    """The most of `rows` that can run side by side: the largest number at one depth of the chain
    of rows they continue (1 for a chain)."""
    depth = {}

    def d(r):
        if r not in depth:
            depth[r] = 1 + max((d(n) for n in needs(r, steps) if n in rows), default=0)
        return depth[r]
    levels = [d(r) for r in rows]
    return max((levels.count(k) for k in set(levels)), default=1)


def run_parallel(setting, seed, out, rows, threads, sets, jobs):
    """Train the trained rows among `rows` (and the rows they continue) `jobs` at a time, each in
    its own process (`lesson.py --rows=ROW`, its output in OUT/ROW/lesson.log) with threads/jobs
    threads, as soon as the rows it continues are done; then run() scores the rest and writes the
    table. Why: at the CPU setting's small shapes two 1-thread processes side by side do more work
    than one 2-thread process (a whole seed 1.11x faster on 2 cores: RESULTS.md). Of the rows
    ready to start, those with the longest chain of work ahead (critical_path) go first. Rows that
    can only run one after another (the dial's chain) run one at a time with every thread."""
    s = with_sets(SETTINGS[setting], sets)
    steps = plan(s)
    setup(s, out, 0, label_of(setting, sets))   # OUT's setting checked, the data made once, before the processes read them
    todo = set()

    def want(r):   # the trained rows asked for, and every row they continue
        todo.update([r] if r in steps else [])
        for n in needs(r, steps):
            want(n)
    for r in rows:
        want(r)
    done = lambda r: os.path.exists(os.path.join(out, r, "row.json"))
    ahead = critical_path(todo, s, steps)
    todo = sorted((r for r in todo if not done(r)), key=lambda r: (-ahead[r], ROWS.index(r)))
    jobs = min(jobs, widest(todo, steps))   # a chain (--rows=dial) runs one row at a time, with every thread
    per_job = max(1, (threads or os.cpu_count() or 2) // jobs)
    on_cpu = threads or not torch.cuda.is_available()   # each process forced to the CPU, or all on the GPU
    running = {}
    try:
        schedule(todo, running, jobs, done, steps, setting, seed, out, per_job if on_cpu else 0, sets)
    finally:   # an error or ^C here: no row left running on its own
        for proc, _, _ in running.values():
            proc.kill()
    return run(setting, seed, out, rows, threads, sets)


def schedule(todo, running, jobs, done, steps, setting, seed, out, threads, sets):
    """run_parallel's loop: start the ready rows, `jobs` at a time, until every row is done."""
    import subprocess
    while todo or running:
        for r in [r for r in todo if all(done(n) for n in needs(r, steps))][:jobs - len(running)]:
            todo.remove(r)
            os.makedirs(os.path.join(out, r), exist_ok=True)
            argv = [sys.executable, os.path.abspath(__file__), f"--setting={setting}", f"--seed={seed}", f"--out={out}",
                    f"--rows={r}", f"--threads={threads}", "--jobs=1", f"--parent={os.getpid()}"] \
                + [f"--set={x}" for x in sets]
            log = open(os.path.join(out, r, "lesson.log"), "w")
            running[r] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log, time.time())
            print(f"== {r}: started (log {log.name})", flush=True)
        time.sleep(0.2)
        for r, (proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[r]
            if proc.returncode != 0 or not done(r):
                raise T.ConfigError(f"row {r} failed (exit status {proc.returncode}): see {log.name}")
            print(f"== {r}: done in {time.time() - t0:.0f} s", flush=True)


def die_with(parent):
    """In a row's own process: stop when the lesson process that started it ends, even killed with
    -9 (no signal reaches the row then; its parent changes), so that no row is left writing and a
    rerun never meets a second writer (train.py's out_dir lock would refuse it anyway)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(3)
    threading.Thread(target=watch, daemon=True).start()


@torch.no_grad()
def score(model, data_dir, meta, batch_size, device, n_loops=None, exit_threshold=None, loops=False):
    """{p: accuracy} over every validation row, at decode semantics; loops=True: {p: (accuracy,
    mean loop the answers came from)}."""
    model.eval().to(device)
    xs, ys = T.Batches(data_dir, meta, meta["seq_len"], batch_size, 1).rows("val")
    total = {p: [0, 0, 0] for p in meta["hops"]}
    for i in range(0, len(xs), 4 * batch_size):
        x, y = xs[i:i + 4 * batch_size].to(device), ys[i:i + 4 * batch_size].to(device)
        for p, got in T.accuracy_by_hops(model, x, y, meta, n_loops=n_loops, exit_threshold=exit_threshold).items():
            total[p] = [a + b for a, b in zip(total[p], got)]
    if loops:
        return {p: (h / max(n, 1), u / max(n, 1)) for p, (h, n, u) in total.items()}
    return {p: h / max(n, 1) for p, (h, n, _) in total.items()}


def score_checkpoints(setting, seed, out, paths, threads, sets=()):
    """--score: {path: {p: accuracy}} of checkpoints of your own (e.g. train.py or distill.py run
    with --dataset=OUT/data, an ablation the rows lack) on the setting's validation rows, scored as
    the rows are (every row, at decode semantics). OUT/data is made for the setting and seed if absent."""
    s = with_sets(SETTINGS[setting], sets)
    data_dir, meta, device = setup(s, out, threads)
    got = {}
    for path in paths:
        model, saved_meta = load_model(path)
        T.check_model_against_data(model.config, meta, data_dir, saved_meta)   # trained on these data's tokens
        got[path] = score(model, data_dir, meta, s.batch_size, device)
        print(f"{path}: " + "  ".join(f"p={p} {a:.3f}" for p, a in got[path].items()), flush=True)
    return got


def label_of(setting, sets):
    return setting + "".join(f" {x}" for x in sets)   # each row says what it ran with


def run(setting, seed, out, rows, threads, sets=()):
    s = with_sets(SETTINGS[setting], sets)
    label = label_of(setting, sets)
    print(f"setting {label}: {asdict(s)}", flush=True)
    data_dir, meta, device = setup(s, out, threads, label)
    steps = plan(s)
    results = []

    def done(row):
        path = os.path.join(out, row, "row.json")
        return json.load(open(path)) if os.path.exists(path) else None

    def ensure(row):
        """Train (or score) `row` unless its row.json exists; return its list of result rows."""
        got = done(row)
        if got is not None:
            return got
        for need in needs(row, steps):
            ensure(need)
        row_dir = os.path.join(out, row)
        os.makedirs(row_dir, exist_ok=True)
        t0 = time.time()
        scored = []
        if row in steps:
            kind, make, _ = steps[row]
            argv = common_args(s, seed, data_dir, row_dir, threads) + make(out)
            print(f"== {row}: {' '.join(argv)}", flush=True)
            if kind == "train":
                cfg, keys = T.parse_args(argv)
                T.train(cfg, keys)
            else:
                cfg, keys = T.parse_args(argv, train_cls=distill.DistillConfig)
                T.train(cfg, keys, objective_cls=distill.DistillObjective, build_fn=distill.build_distill)
            own = time.time() - t0
            total = own + sum(done(n)[0]["total_seconds"] for n in steps[row][2])
            model, _ = load_model(os.path.join(row_dir, "ckpt.pt"))
            depths = range(1, 2 * s.dial_loops + 1) if row in DIALED else [None]
            scored += [(row, d, model, own, total) for d in depths]
        elif row.startswith("zero_shot_"):
            model, _ = load_model(os.path.join(out, "looplm", "ckpt.pt"), cache="shared", gate=row[len("zero_shot_"):])
            scored.append((row, None, model, 0.0, done("looplm")[0]["total_seconds"]))
        elif row.endswith("_exit"):   # adaptive depth: each token stops where its exit gate says
            src = done(needs(row, steps)[0])[0]
            model, _ = load_model(os.path.join(out, src["model"], "ckpt.pt"), exit_threshold=s.dial_exit)
            scored.append((row, None, model, 0.0, src["total_seconds"]))
        else:   # depth at inference
            src = done({"looplm_depth": "looplm", "melt_depth": "melt_sweeps"}[row])[0]
            model, _ = load_model(os.path.join(out, src["model"], "ckpt.pt"))
            scored += [(row, d, model, 0.0, src["total_seconds"]) for d in s.depths]
        rows_out = []
        for name, n_loops, model, own, total in scored:
            acc = score(model, data_dir, meta, s.batch_size, device, n_loops, loops=True)
            kv = model.kv_bytes_per_token(n_loops, dtype=torch.float32)
            for p, (a, used) in acc.items():
                rows_out.append(dict(model=name, hops=p, accuracy=round(a, 4), kv_bytes_per_token=kv, seed=seed,
                                     train_seconds=round(own, 1), total_seconds=round(total, 1),
                                     n_loops=n_loops or model.config.n_loop, setting=label,
                                     **({"mean_loops": round(used, 3)} if name.endswith("_exit") else {})))
        with open(os.path.join(row_dir, "row.json.tmp"), "w") as f:
            json.dump(rows_out, f)
        os.replace(os.path.join(row_dir, "row.json.tmp"), os.path.join(row_dir, "row.json"))
        print(table(rows_out), flush=True)
        return rows_out

    for row in rows:
        results += ensure(row)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))
    plot(results, os.path.join(out, "lesson.png"))
    if any(r["model"] in DIALED for r in results):
        print("\n" + dial_table(results))
        plot_dial(results, os.path.join(out, "dial.png"))
    return results


def table(results, seeds=False):
    """Markdown: a line per model (and depth), a column per p, then KV bytes per token and the row's
    own training seconds; with seeds=True the mean over seeds, the worst seed in brackets."""
    hops = sorted({r["hops"] for r in results})
    keyed = {}
    for r in results:
        name = r["model"] + (f" @{r['n_loops']}" if r["model"].endswith("_depth") or r["model"] in DIALED else "")
        keyed.setdefault(name, {}).setdefault(r["hops"], []).append(r)
    head = "| model | " + " | ".join(f"p={p}" for p in hops) + " | KV bytes/token | train s |" + (" seeds |" if seeds else "")
    lines = [head, "|" + "---|" * (len(hops) + 3 + seeds)]
    for name, by_p in keyed.items():
        cells = []
        for p in hops:
            accs = [r["accuracy"] for r in by_p.get(p, [])]
            used = [r["mean_loops"] for r in by_p.get(p, []) if "mean_loops" in r]
            cells.append("-" if not accs else f"{sum(accs) / len(accs):.3f}" +
                         (f" ({min(accs):.3f})" if seeds and len(accs) > 1 else "") +
                         (f" @{sum(used) / len(used):.2f} loops" if used else ""))
        any_r = next(iter(by_p.values()))
        secs = [r["train_seconds"] for r in any_r]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {any_r[0]['kv_bytes_per_token']:,} | "
                     f"{sum(secs) / len(secs):.0f} |" + (f" {len(any_r)} |" if seeds else ""))
    return "\n".join(lines)


def dial_table(results):
    """Markdown: the dial at the hardest p, a column per loop count (the LoopLM's and MELT's accuracy,
    mean over seeds with the worst seed in brackets, MELT's largest gap in any seed, KV bytes per
    token); adaptive exit per p; then the dial's three bars, each checked in every seed."""
    P = max(r["hops"] for r in results if r["model"] in DIALED)
    seeds = sorted({r["seed"] for r in results if r["model"] in DIALED})
    acc = {(r["model"], r["seed"], r["n_loops"], r["hops"]): r for r in results}
    loops = sorted({r["n_loops"] for r in results if r["model"] in DIALED})
    f = lambda xs: f"{sum(xs) / len(xs):.3f}" + (f" ({min(xs):.3f})" if len(xs) > 1 else "")
    at = lambda m, n: [acc[m, s, n, P]["accuracy"] for s in seeds if (m, s, n, P) in acc]
    gap = lambda n: max((acc["dial_looplm", s, n, P]["accuracy"] - acc["dial_melt", s, n, P]["accuracy"]
                         for s in seeds if ("dial_melt", s, n, P) in acc and ("dial_looplm", s, n, P) in acc), default=None)
    lines = ["| loops run | " + " | ".join(map(str, loops)) + " |", "|---|" + "---|" * len(loops)]
    for m, name in (("dial_looplm", "LoopLM"), ("dial_melt", "MELT")):
        lines.append(f"| {name}, p = {P} | " + " | ".join(f(at(m, n)) if at(m, n) else "-" for n in loops) + " |")
    lines.append("| MELT behind, worst seed (points) | " + " | ".join(
        "-" if gap(n) is None else f"{100 * gap(n):.1f}" for n in loops) + " |")
    for m, name in (("dial_looplm", "LoopLM"), ("dial_melt", "MELT")):
        kv = [next((r["kv_bytes_per_token"] for r in results if r["model"] == m and r["n_loops"] == n), None) for n in loops]
        lines.append(f"| {name} KV bytes/token | " + " | ".join("-" if k is None else f"{k:,}" for k in kv) + " |")
    hops = sorted({r["hops"] for r in results if r["model"].startswith("dial_") and r["model"].endswith("_exit")})
    if hops:
        lines += ["", "| adaptive exit: accuracy, loops used | " + " | ".join(f"p = {p}" for p in hops) + " |",
                  "|---|" + "---|" * len(hops)]
        for m, name in (("dial_looplm_exit", "LoopLM"), ("dial_melt_exit", "MELT")):
            rows = {p: [r for r in results if r["model"] == m and r["hops"] == p] for p in hops}
            lines.append(f"| {name} | " + " | ".join(
                f"{f([r['accuracy'] for r in rs])} at {sum(r['mean_loops'] for r in rs) / len(rs):.2f}" if rs else "-"
                for rs in rows.values()) + " |")
    return "\n".join(lines + [""] + [f"- {b}" for b in dial_bars(results, acc, seeds, P)])


def dial_bars(results, acc, seeds, P):
    """The dial's bars, each over every seed (the worst counts): the staircase (the LoopLM at the
    hardest p reaches 0.95, and at every fewer loops is 20 points below where it first does),
    MELT within 5 points wherever the LoopLM reaches 0.95, adaptive exit (fewer loops at p = 1
    than at the hardest p, every p within 2 points of running the trained loops)."""
    out, hops = [], sorted({r["hops"] for r in results if r["model"] in DIALED})
    for s in seeds:
        curve = {n: r["accuracy"] for (m, s2, n, p), r in acc.items() if m == "dial_looplm" and s2 == s and p == P}
        top = [n for n in sorted(curve) if curve[n] >= 0.95]
        if not top:
            out.append(f"seed {s}: staircase NOT met: the LoopLM never reaches 0.95 at p = {P} "
                       f"(best {max(curve.values(), default=0):.3f})")
            continue
        step = min((curve[top[0]] - curve[n] for n in curve if n < top[0]), default=1.0)
        out.append(f"seed {s}: staircase {'met' if step >= 0.2 else 'NOT met'}: 0.95 from {top[0]} loops, "
                   f"fewer loops at least {100 * step:.1f} points lower")
        gaps = {n: curve[n] - acc["dial_melt", s, n, P]["accuracy"] for n in top if ("dial_melt", s, n, P) in acc}
        if gaps:
            worst = max(gaps, key=gaps.get)
            out.append(f"seed {s}: MELT within 5 points at {len(gaps)} loop counts where the LoopLM >= 0.95: "
                       f"{'met' if gaps[worst] <= 0.05 else 'NOT met'} (worst {100 * gaps[worst]:.1f} at {worst} loops)")
        for m, fixed in (("dial_looplm_exit", "dial_looplm"), ("dial_melt_exit", "dial_melt")):
            ex = {r["hops"]: r for r in results if r["model"] == m and r["seed"] == s}
            if not ex:
                continue
            n = ex[hops[0]]["n_loops"]
            drop = max(acc[fixed, s, n, p]["accuracy"] - ex[p]["accuracy"] for p in hops if (fixed, s, n, p) in acc)
            ok = ex[hops[0]]["mean_loops"] < ex[P]["mean_loops"] and drop <= 0.02
            out.append(f"seed {s}: {m}: {'met' if ok else 'NOT met'}: {ex[hops[0]]['mean_loops']:.2f} loops at "
                       f"p = {hops[0]}, {ex[P]['mean_loops']:.2f} at p = {P}, at most {100 * drop:.1f} points "
                       f"below {n} fixed loops")
    return out


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("(matplotlib is not installed: no pictures; pip install matplotlib)")
        return None


STORY = {"standard": "standard (2 x 1)", "looplm": "LoopLM (2 x 4)",
         "standard_deep": "standard, 4x the weights (8 x 1)", "zero_shot_last": "zero-shot sharing, last", "zero_shot_mean": "zero-shot, mean",
         "zero_shot_first": "zero-shot, first", "melt_sweeps": "MELT (2 x 4, one slot)"}   # the lead panel's points


def plot(results, path):
    """The lesson at a glance: accuracy at the hardest p against KV bytes per token, one labelled
    point per model of the story (STORY; the seeds' range as a bar where there are several), then
    the accuracy per p of every model beside it."""
    plt = _pyplot()
    main = [r for r in results if not r["model"].endswith(("_depth", "_exit")) and r["model"] not in DIAL]
    if plt is None or not main:
        return
    models = list(dict.fromkeys(r["model"] for r in main))
    hops = sorted({r["hops"] for r in main})
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw=dict(width_ratios=[1, 1.4]))
    placed = {}
    for m, label in STORY.items():
        accs = [r["accuracy"] for r in main if r["model"] == m and r["hops"] == hops[-1]]
        if not accs:
            continue
        kv = next(r["kv_bytes_per_token"] for r in main if r["model"] == m)
        k = placed.get(kv, 0)   # models holding the same bytes: side by side, labels apart
        x, placed[kv] = kv * (1 + 0.12 * k), k + 1
        mean = sum(accs) / len(accs)
        color = ("tab:red" if m.startswith("zero_shot") else "tab:green" if m.startswith("melt") else
                 "tab:blue" if m == "looplm" else "tab:gray")
        ax.errorbar([x], [mean], yerr=[[mean - min(accs)], [max(accs) - mean]], fmt="o", ms=8, color=color, capsize=3)
        ax.annotate(label, (x, mean), textcoords="offset points", xytext=(8, 4 - 14 * (k % 2)), fontsize=9, color=color)
    ax.set_xscale("log", base=2)
    if placed:
        ax.set_xlim(min(placed) / 1.5, max(placed) * 3)
    ax.set_xlabel("KV-cache bytes per token (log scale)")
    ax.set_ylabel(f"accuracy at p = {hops[-1]}, decode semantics")
    ax.set_ylim(0, 1.05)
    ax.set_title("looping buys depth; MELT keeps it at a quarter of the memory")
    w = 0.8 / len(hops)
    for j, p in enumerate(hops):
        vals = []
        for m in models:
            accs = [r["accuracy"] for r in main if r["model"] == m and r["hops"] == p]
            vals.append(sum(accs) / len(accs) if accs else 0)
        bx.bar([i + j * w for i in range(len(models))], vals, w, label=f"p = {p}")
    bx.set_xticks([i + 0.4 - w / 2 for i in range(len(models))], models, rotation=40, ha="right", fontsize=8)
    bx.set_ylim(0, 1)
    bx.legend(fontsize=7, ncol=2)
    bx.set_title("accuracy per hop count p, every row")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def plot_dial(results, path):
    """The dial: accuracy against loops run, one line per p (the staircase), for the LoopLM and
    MELT side by side; KV bytes per token against loops; the loops adaptive exit uses per p."""
    plt = _pyplot()
    if plt is None:
        return
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)
    hops = sorted({r["hops"] for r in results if r["model"] in DIALED})
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.4))
    for ax, m in zip(axes[:2], DIALED):
        for p in hops:
            rs = [r for r in results if r["model"] == m and r["hops"] == p]
            loops = sorted({r["n_loops"] for r in rs})
            ax.plot(loops, [mean([r for r in rs if r["n_loops"] == d], "accuracy") for d in loops], "o-", ms=3,
                    label=f"p = {p}")
        ax.set_title(f"{m}: accuracy by loops run")
        ax.set_xlabel("loops run at inference")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("accuracy (decode semantics)")
    for m, style in zip(DIALED, ("o-", "s--")):
        rs = {r["n_loops"]: r["kv_bytes_per_token"] for r in results if r["model"] == m}
        axes[2].plot(sorted(rs), [rs[d] for d in sorted(rs)], style, label=m)
    axes[2].set_title("KV-cache bytes per token")
    axes[2].set_xlabel("loops run at inference")
    axes[2].legend(fontsize=8)
    w = 0.4
    for i, m in enumerate(("dial_looplm_exit", "dial_melt_exit")):
        rs = [r for r in results if r["model"] == m]
        if rs:
            axes[3].bar([p + (i - 0.5) * w for p in hops], [mean([r for r in rs if r["hops"] == p], "mean_loops")
                                                            for p in hops], w, label=m)
    axes[3].set_title("adaptive exit: mean loops used")
    axes[3].set_xlabel("hop count p")
    if axes[3].get_legend_handles_labels()[0]:   # no exit rows yet: no legend
        axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


class _Args(argparse.ArgumentParser):
    def error(self, message):   # one line, exit status 2, like every script's mistakes (config.run_cli)
        raise T.ConfigError(message)


def main(argv):
    ap = _Args(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", default="cpu", choices=sorted(SETTINGS))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None, help="default out-lesson/<setting>_s<seed>; with --report, where its "
                    "pictures go (default out-lesson/report)")
    ap.add_argument("--rows", default="all", help="comma-separated rows, 'core' (the claims' rows), 'dial' (the dial's "
                    "rows) or 'all' (every row but " + ", ".join(EXTRA) + ")")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (and force the CPU); 0: the GPU if any")
    ap.add_argument("--jobs", type=int, default=0, help="trained rows run side by side, each in its own process "
                    "with threads/jobs threads; 0: 2 on a CPU, 1 on a GPU")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a field of the setting (repeatable), e.g. --set phase2_steps=300")
    ap.add_argument("--report", nargs="+", help="the table of these runs (OUT folders or results.json files), "
                    "mean and worst seed, and their pictures (in --out)")
    ap.add_argument("--score", nargs="+", metavar="CKPT", help="score these checkpoints on OUT/data's validation "
                    "rows (made for --setting and --seed if absent) at decode semantics, per p")
    ap.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)   # a row's process: run_parallel's pid
    a = ap.parse_args(argv)
    if a.parent:
        die_with(a.parent)
    if a.threads < 0 or a.jobs < 0:
        raise T.ConfigError(f"--threads={a.threads} and --jobs={a.jobs} must be >= 0 (0: the default)")
    if a.report:   # OUT folders (every row done so far) or results.json files
        missing = [d for d in a.report if not os.path.exists(d)]
        results = [r for d in a.report if os.path.isfile(d) for r in json.load(open(d))] + \
            [r for d in a.report if os.path.isdir(d) for row in ROWS if os.path.exists(os.path.join(d, row, "row.json"))
             for r in json.load(open(os.path.join(d, row, "row.json")))]
        if missing or not results:
            raise T.ConfigError(f"--report: {', '.join(missing) or ' '.join(a.report)} "
                                f"{'does not exist' if missing else 'holds no finished row (OUT/ROW/row.json)'}")
        print(table(results, seeds=True))
        if any(r["model"] in DIALED for r in results):
            print("\n" + dial_table(results))
        where = a.out or os.path.join("out-lesson", "report")   # never beside the runs or files reported
        os.makedirs(where, exist_ok=True)
        plot(results, os.path.join(where, "lesson_seeds.png"))
        if any(r["model"] in DIALED for r in results):
            plot_dial(results, os.path.join(where, "dial_seeds.png"))
        return
    named = {"all": ALL, "core": CORE, "dial": DIAL}
    rows = list(named[a.rows]) if a.rows in named else a.rows.split(",")
    bad = sorted(set(rows) - set(ROWS))
    if bad:
        raise T.ConfigError(f"unknown rows {bad}; rows: {', '.join(ROWS)}")
    out = a.out or os.path.join("out-lesson", f"{a.setting}_s{a.seed}")
    if a.score:
        score_checkpoints(a.setting, a.seed, out, a.score, a.threads, a.set)
        return
    jobs = a.jobs or (1 if torch.cuda.is_available() and not a.threads else 2)
    if jobs > 1:
        run_parallel(a.setting, a.seed, out, rows, a.threads, a.set, jobs)
    else:
        run(a.setting, a.seed, out, rows, a.threads, a.set)


if __name__ == "__main__":
    T.run_cli(main, "lesson.py")
