"""sample.py: generation from a checkpoint or an Ouro directory, end to end."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import OURO_TINY, ROOT
from melt import MELT
from serve.ouro import load_ouro_tokenizer

HERE = ROOT
SAMPLE = os.path.join(HERE, "sample.py")


def run_sample(*args):
    return subprocess.run([sys.executable, SAMPLE, *args], capture_output=True, text=True)


def test_sample_on_ouro_fixture_reports_real_cache_bytes():
    """sample.py runs on the tiny Ouro directory with its tokenizer (greedy), and the stats line
    reports the bytes of the cache that new_cache allocates for prompt + new tokens."""
    res = run_sample(f"--init_from={OURO_TINY}", "--start=First Citizen:", "--max_new_tokens=12",
                     "--temperature=0", "--device=cpu")
    assert res.returncode == 0, res.stderr
    tok = load_ouro_tokenizer(OURO_TINY)
    n_prompt = len(tok.encode("First Citizen:").ids)
    expect = MELT.from_ouro(OURO_TINY).new_cache(1, n_prompt + 12).nbytes
    stats = res.stdout.strip().splitlines()[-1]
    assert stats.startswith("stats:") and f"KV cache {expect:,} bytes (loop)" in stats
    assert "mean loops per token 3.00 of 3" in stats
    shared = run_sample(f"--init_from={OURO_TINY}", "--start=First Citizen:", "--max_new_tokens=12",
                        "--cache=shared", "--gate=last", "--device=cpu")
    assert f"KV cache {expect // 3:,} bytes (shared)" in shared.stdout


@pytest.mark.skipif(not shutil.which("c++") and not shutil.which("g++"), reason="inductor needs a C++ compiler")
def test_sample_compile_gives_the_same_text_and_times_the_compile_apart():
    """sample.py --compile (the compiled fixed-shape decode step) prints the same greedy text as
    the eager sampler, and its stats line gives the compile of the first decode step apart from
    the decode rate (it is not a decode speed)."""
    args = [f"--init_from={OURO_TINY}", "--start=First Citizen:", "--max_new_tokens=12", "--temperature=0",
            "--device=cpu", "--stream=False"]
    eager, compiled = run_sample(*args), run_sample(*args, "--compile=True")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    text = lambda out: out.split("-" * 40)[0]
    assert text(compiled.stdout) == text(eager.stdout) and len(text(eager.stdout)) > len("First Citizen:")
    assert "s compiling the decode step" in compiled.stdout.splitlines()[-1]
    assert "compiling" not in eager.stdout.splitlines()[-1]


def test_sample_bad_inputs(tmp_path):
    """Prompt longer than the context, empty prompt, top_k < 1, negative temperature,
    exit_threshold outside (0, 1] and a file that is not a checkpoint each give one error line."""
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"junk")
    cases = [(["--start=" + "a" * 300], "exceed the model's context"), (["--start="], "empty prompt"),
             (["--top_k=0"], "top_k=0 must be >= 1"), (["--temperature=-1"], "temperature=-1.0 must be >= 0"),
             (["--exit_threshold=1.5"], "exit_threshold=1.5 not in"), ([f"--init_from={bad}"], "not a readable")]
    for args, msg in cases:
        res = run_sample(f"--init_from={OURO_TINY}", "--device=cpu", *args) if "--init_from" not in args[0] \
            else run_sample("--device=cpu", *args)
        assert res.returncode == 2 and msg in res.stderr and res.stderr.count("\n") == 1, (args, res.stderr)


def test_sample_prompts_file_is_one_batch_equal_to_each_alone(tmp_path):
    """sample.py --prompts=FILE generates every line as one ragged batch; greedy, each completion
    is the text that prompt gives alone, and the stats line names the batch and its cache."""
    lines = ["First Citizen:", "All:", "Speak, speak. In 1599"]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    common = [f"--init_from={OURO_TINY}", "--max_new_tokens=8", "--temperature=0", "--device=cpu"]
    batch = run_sample(*common, f"--prompts={tmp_path / 'p.txt'}")
    assert batch.returncode == 0, batch.stderr
    texts = [t.strip("\n") for t in batch.stdout.split("-" * 40)[:3]]
    for line, text in zip(lines, texts):
        alone = run_sample(*common, f"--start={line}", "--stream=False")
        assert alone.stdout.split("-" * 40)[0].strip("\n") == text
    assert batch.stdout.strip().splitlines()[-1].startswith("stats: batch of 3")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    res = run_sample(*common, f"--prompts={empty}")
    assert res.returncode == 2 and "holds no prompt" in res.stderr
