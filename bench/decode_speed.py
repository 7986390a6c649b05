"""
Decode speed of LoopLM vs MELT at the same config, measured side by side in one run.

    python bench/decode_speed.py                 # headline: eager and compiled, every model
    python bench/decode_speed.py --no-compile    # eager only (no ~1 min compile per model)
    python bench/decode_speed.py --contexts      # table 2: decode tok/s versus context length, eager and compiled
    python bench/decode_speed.py --contexts=64,2048   # the same at some lengths only
    python bench/decode_speed.py --profile       # where the compiled (fixed-shape) decode step of each layout spends its time
    python bench/decode_speed.py --reference=DIR # the Ouro reference (its remote code in DIR) beside ours, same weights
    python bench/decode_speed.py --equal-memory  # 2,048-token contexts in one LoopLM sequence's KV memory: MELT holds 4
    python bench/decode_speed.py --batches       # ragged batches of 1, 4 and 16 prompts of 32..64 tokens, 128 new each

--reference=DIR: DIR holds Ouro's remote modeling code (configuration_ouro.py, modeling_ouro.py);
it runs through transformers, which melt does not depend on (install it in a separate venv: the
message says how). The reference is built at the bench config with random weights and saved as an
Ouro directory; the LoopLM and MELT are read from that directory by MELT.from_ouro, so all three
run the same weights, and the LoopLM's greedy tokens are checked equal to the reference's. Each
model's products alone (products_step) are timed beside them: the bound of a compiled step here.

The config: ~3.4M parameters (vocab 512, width 256, 4 layers, 4 heads, 4 loops),
64-token prompt, 256 new tokens, batch 1, 2 threads, float32, greedy. Three models: the LoopLM,
MELT with its learned gate, and MELT with the parameter-free gate=mean (the shared cache layout
without the gate's two width x width matrices). Three ways to run the one-token decode step
(prefill stays eager in all): eager; MELT.prefill compiled with dynamic shapes (the attention reads
the rows up to the position, a shape that grows); and MELT.decode_step_fixed compiled, gpt-fast's design
and what `sample.py --compile` uses (position as a tensor, attention over the whole preallocated
cache with later rows masked: one graph for every position, CUDA-graph-ready on a GPU).

This VM's speed drifts by up to 2x over minutes, so in each of 5 rounds every model runs once in
every mode, and the table gives the median tok/s and medians of per-round ratios (to the LoopLM
in the same mode, and to the same model eager): a ratio compares runs seconds apart.
"""

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch.nn.functional as F  # noqa: E402

from melt import MELT, MeltConfig  # noqa: E402
from serve.engine import CPU_DECODE_COMPILE_OPTIONS, ragged_batch  # noqa: E402

CONFIG = dict(vocab_size=512, n_embd=256, n_layer=4, n_head=4, n_loop=4, block_size=8192, chunk_size=64)
MODELS = {"LoopLM": dict(cache="loop"), "MELT": dict(cache="shared"), "MELT gate=mean": dict(cache="shared", gate="mean")}


def decode_rate(model, prompt_len, new_tokens, step=None, repeats=1, batch=1):
    """Best tokens/s over `repeats` generations of new_tokens after random prompts (`batch` of
    them, decoded together: tokens/s of all rows), counting the decode steps only (the prefill and
    the first token are excluded)."""
    device = model.lm_head.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)   # GPU work is asynchronous
    idx = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    best = 0.0
    with torch.inference_mode():
        for _ in range(repeats):
            cache = model.new_cache(batch, prompt_len + new_tokens)
            stream = model.generate_stream(idx.to(device), new_tokens, temperature=0, cache=cache, decode_step=step)
            next(stream)                      # prefill and the first token
            sync()
            t = time.perf_counter()
            n = sum(1 for _ in stream)        # the rest: one decode step each
            sync()
            best = max(best, batch * n / (time.perf_counter() - t))
    return best


def weight_mb_per_token(model):
    """Megabytes of weights one decode step streams: every block's weights, the final norm and
    the exit gate once per loop (Ouro applies the last two after every loop), the LM head once."""
    n_loop = sum(p.numel() for m in (model.blocks, model.norm, model.exit_gate) for p in m.parameters())
    return (model.config.n_loop * n_loop + model.lm_head.weight.numel()) * 4 / 1e6


def products_step(model, chained=False):
    """A compiled function that does nothing but one decode token's matrix-vector products, on the
    model's own weights, compiled as MELT.decode_step_fixed(compile=True) compiles them on a CPU:
    every projection of every block once per loop, and the LM head once. Its rate bounds a real
    step's: what attention, norms, RoPE and the cache writes add to it is the overhead.
        chained=False  all products independent (one input row per loop), so the compiler may run
                       them back to back: the bound set by reading the weights
        chained=True   in a real step's order, each product's input the output of the one before
                       (q and k/v, and the gate's two, from the same row; attention, norms and
                       RoPE left out): the bound for a step that runs its products one after another
    """
    cfg = model.config
    names = [n for n, m in model.blocks[0].named_modules() if isinstance(m, torch.nn.Linear)]   # attn.q_proj, ...
    ws = [dict(b.named_modules())[n].weight for b in model.blocks for n in names]   # (out, in) each
    head = model.lm_head.weight                                                   # (V, C)

    def independent(xs, head, *ws):
        out = []
        for x in xs:
            out += [F.linear(x[w.shape[1]], w) for w in ws]
        return out + [F.linear(xs[-1][head.shape[1]], head)]

    def in_order(x, head, *ws):
        blocks = [dict(zip(names, ws[i:i + len(names)])) for i in range(0, len(ws), len(names))]
        for _ in range(cfg.n_loop):
            for w in blocks:
                gate = [F.linear(x, w[n]) for n in ("gate.w_z", "gate.u_z") if n in w]
                s = x + sum(gate) if gate else x   # MELT's keys/values come from the latent, after its gate
                q, kv = F.linear(x, w["attn.q_proj"]), F.linear(s, w["attn.kv_proj"])   # (1, nh hs), (1, 2 nkv hs)
                a = F.linear(q + kv[:, :q.shape[1]], w["attn.o_proj"])                  # (1, C)
                gu = F.linear(a, w["mlp.gate_up"])                                       # (1, 2 mlp_hidden)
                x = F.linear(gu[:, :cfg.mlp_hidden] * gu[:, cfg.mlp_hidden:], w["mlp.down_proj"])
        return F.linear(x, head)

    if chained:
        compiled, x0 = torch.compile(in_order, options=CPU_DECODE_COMPILE_OPTIONS), torch.randn(1, cfg.n_embd)
        return lambda: compiled(x0, head, *ws)
    # one input row per loop and width: with one row for all loops the compiler would compute
    # each loop's identical products once (common subexpressions), a quarter of the work
    xs = [{w.shape[1]: torch.randn(1, w.shape[1]) for w in ws + [head]} for _ in range(cfg.n_loop)]
    compiled = torch.compile(independent, options=CPU_DECODE_COMPILE_OPTIONS)
    return lambda: compiled(xs, head, *ws)


def products_rate(step, repeats=100):
    """Tokens/s of a products_step (after 10 warm-up calls, which compile it the first time)."""
    with torch.inference_mode():
        for _ in range(10):
            step()
        t = time.perf_counter()
        for _ in range(repeats):
            step()
    return repeats / (time.perf_counter() - t)


def profile_step(model, tokens=20):
    """torch.profiler's tables for `tokens` one-token decode steps after a 64-token prompt, eager
    then compiled, with the number of tensor ops the eager step launches per token. The compiled
    step is built with inductor's kernel profile on, so its table lists each generated kernel
    (cpp_fused_*) and each call out of them (aoti_torch_*: the attention) instead of one opaque
    call, and a last line splits a token's time between those two and the rest. The cache is
    64 + 2 * tokens long, one key bucket: nothing recompiles while profiled."""
    import torch._inductor.config as inductor_config
    from torch.profiler import profile
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):   # read when the step compiles
        compiled = model.decode_step_fixed(compile=True)
        decode_rate(model, 64, 2 * tokens, compiled)   # compiles, for the cache length profiled below
    idx = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    for name, step in (("eager", model.prefill), ("compiled", compiled)):
        with torch.inference_mode():
            cache = model.new_cache(1, 64 + 2 * tokens)
            nxt = model.prefill(idx, cache)[0].argmax(-1, keepdim=True)
            for _ in range(tokens // 2):
                step(nxt, cache)
            with profile() as prof:
                for _ in range(tokens):
                    step(nxt, cache)
        ops = sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))
        launched = f", {ops / tokens:.0f} top-level tensor ops per token" if name == "eager" else ""
        print(f"\n{name}: {tokens} decode steps{launched}; per-token time = total / {tokens}")
        events = prof.key_averages()
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
        if name == "compiled":
            us = lambda keep: sum(e.self_cpu_time_total for e in events if keep(e.key)) / tokens
            total, kernels = us(lambda k: True), us(lambda k: "cpp_fused" in k)
            calls = us(lambda k: k.startswith("aoti_torch"))
            print(f"compiled step, per token: {total:.0f} us = generated kernels {kernels:.0f} us "
                  f"+ calls out of them (attention) {calls:.0f} us + the rest {total - kernels - calls:.0f} us")


INSTALL_REFERENCE = """--reference needs transformers (melt does not depend on it). In a separate venv:
    python -m venv .venv-ref && .venv-ref/bin/pip install torch==2.13.0 transformers==4.57.6 safetensors
    .venv-ref/bin/python bench/decode_speed.py --reference=DIR
(4.57.6 is the version Ouro's cache code is known to run with.)"""


def reference_models(ref_dir, tmp):
    """(the reference OuroForCausalLM, our LoopLM, our MELT) on the same random weights at the
    bench config: the reference is built from ref_dir's code, saved into tmp as an Ouro directory,
    and ours are read from it by MELT.from_ouro (the loading path users take)."""
    if importlib.util.find_spec("transformers") is None:
        raise SystemExit(INSTALL_REFERENCE)
    ref_dir = os.path.abspath(ref_dir)
    if not os.path.isfile(os.path.join(ref_dir, "modeling_ouro.py")):
        raise SystemExit(f"--reference={ref_dir}: no modeling_ouro.py there")
    sys.path.insert(0, os.path.dirname(ref_dir))   # the code imports itself as a package (relative imports)
    pkg = os.path.basename(ref_dir)
    OuroConfig = importlib.import_module(f"{pkg}.configuration_ouro").OuroConfig
    OuroForCausalLM = importlib.import_module(f"{pkg}.modeling_ouro").OuroForCausalLM
    c = MeltConfig(**CONFIG)
    hf = OuroConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
                    num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                    head_dim=c.head_dim, total_ut_steps=c.n_loop, max_position_embeddings=c.block_size,
                    rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps, tie_word_embeddings=False,
                    early_exit_threshold=1.0, bos_token_id=0, eos_token_id=None, pad_token_id=0,
                    attn_implementation="sdpa")
    torch.manual_seed(0)
    ref = OuroForCausalLM(hf).eval()
    ref.save_pretrained(tmp, safe_serialization=True)
    looplm = MELT.from_ouro(tmp, block_size=CONFIG["block_size"]).eval()
    melt = MELT.from_ouro(tmp, cache="shared", block_size=CONFIG["block_size"], chunk_size=CONFIG["chunk_size"]).eval()
    return ref, looplm, melt


def reference_prompt(vocab_size, prompt_len):
    """The prompt the reference is timed on, and ours compared on: (1, prompt_len), seed 0."""
    return torch.randint(0, vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))


def reference_rate(ref, prompt_len, new_tokens):
    """The reference's decode tokens/s: generate(use_cache=True), greedy, timed for new_tokens and
    for 1 new token, so that the prefill and the first token cancel out; and its tokens."""
    idx = reference_prompt(ref.config.vocab_size, prompt_len)
    kw = dict(do_sample=False, use_cache=True, min_new_tokens=new_tokens, pad_token_id=0)
    with torch.inference_mode():
        t = time.perf_counter()
        ref.generate(idx, max_new_tokens=1, **{**kw, "min_new_tokens": 1})
        one = time.perf_counter() - t
        t = time.perf_counter()
        out = ref.generate(idx, max_new_tokens=new_tokens, **kw)
        many = time.perf_counter() - t
    return (new_tokens - 1) / (many - one), out[0, prompt_len:]


CEILINGS = {"its products alone, in the step's order": True, "its products alone, all independent": False}


def reference_table(ref_dir, compile=True, n_rounds=5):
    """The reference beside our LoopLM and MELT (eager, and the compiled fixed-shape step), same
    weights, 64-token prompt, 256 new tokens; in each round every model runs once in every mode,
    and "x the reference" is the median of per-round ratios. With compile, each model's two
    products_step bounds are timed in every round too: their ratios to the reference say how far
    a compiled step could go on this machine if everything but the products cost nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        ref, looplm, melt = reference_models(ref_dir, tmp)
    _, ref_tokens = reference_rate(ref, 64, 256)
    ours = looplm.generate(reference_prompt(ref.config.vocab_size, 64), 256, temperature=0)[0, 64:]
    same = int((ours == ref_tokens).sum())
    print(f"greedy tokens, reference vs our LoopLM on the same weights: {same} of 256 equal", flush=True)
    models = {"LoopLM": looplm, "MELT": melt}
    modes = {"eager": {}}
    if compile:
        modes["compiled, fixed shapes"] = {n: m.decode_step_fixed(compile=True) for n, m in models.items()}
        for n, m in models.items():
            decode_rate(m, 64, 256, modes["compiled, fixed shapes"][n])   # compiles, at the cache length timed
    ceilings = {(c, n): products_step(m, chained) for c, chained in CEILINGS.items()
                for n, m in models.items()} if compile else {}
    ref_r, r = [], {(mode, n): [] for mode in modes for n in models}
    r.update({key: [] for key in ceilings})
    for _ in range(n_rounds):   # the reference, then one round of ours (rounds()), seconds apart
        ref_r.append(reference_rate(ref, 64, 256)[0])
        for mode, by_name in rounds(models, modes, rounds=1).items():
            for n, rates in by_name.items():
                r[mode, n] += rates
        for key, step in ceilings.items():
            r[key].append(products_rate(step))
    print(f"\ntorch {torch.__version__}, transformers {importlib.import_module('transformers').__version__}, "
          f"{torch.get_num_threads()} threads, float32, batch 1, 64-token prompt, 256 new tokens, {n_rounds} rounds")
    print("\n| model | mode | decode tok/s (median) | range | x the reference (median of per-round ratios, range) |"
          "\n|---|---|---|---|---|")
    print(f"| reference (Ouro remote code, transformers) | generate(use_cache=True) | {statistics.median(ref_r):.1f} | "
          f"{min(ref_r):.0f}-{max(ref_r):.0f} | 1 |")
    for (mode, n), rates in r.items():
        x = [a / b for a, b in zip(rates, ref_r)]
        print(f"| {n} | {mode} | {statistics.median(rates):.1f} | {min(rates):.0f}-{max(rates):.0f} | "
              f"{statistics.median(x):.2f} ({min(x):.2f}-{max(x):.2f}) |", flush=True)


def rounds(models, modes, rounds=5):
    """tok/s per (mode, model name), one list entry per round; in each round every model runs
    once in every mode, so any two entries of a round were measured seconds apart."""
    rates = {mode: {name: [] for name in models} for mode in modes}
    for _ in range(rounds):
        for mode, steps in modes.items():
            for name, m in models.items():
                rates[mode][name].append(decode_rate(m, 64, 256, steps.get(name)))
    return rates


def contexts_table(looplm, melt, contexts=(64, 512, 1024, 2048, 4096), compile=True):
    """Table 2: decode tok/s versus context length, LoopLM and MELT back to back, eager and (unless
    compile=False) with the compiled fixed-shape step. Per token and loop both layouts read
    `context` rows per layer; what differs is how much distinct memory those reads span (LoopLM:
    n_loop slots, MELT: one), i.e. the cache size. In 3 rounds, LoopLM and MELT one after the other
    at each length (which goes first alternates): a ratio is the median of per-round ratios of runs
    seconds apart. The fixed-shape step is compiled anew for every length (its cache length is
    part of the graph)."""
    pair = {"loop": looplm, "shared": melt}
    modes = ("eager", "compiled") if compile else ("eager",)
    print("\n| context | mode | LoopLM tok/s (median of 3) | MELT tok/s | MELT / LoopLM (median of per-round "
          "ratios, range) | KV cache MiB: LoopLM / MELT |\n|---|---|---|---|---|---|", flush=True)
    for ctx in contexts:
        new = 32 if ctx > 64 else 128
        steps = {"eager": {c: None for c in pair}}
        if compile:
            torch._dynamo.reset()   # a fresh graph per cache length, not a recompile of the last one
            steps["compiled"] = {c: m.decode_step_fixed(compile=True) for c, m in pair.items()}
            for c, m in pair.items():
                decode_rate(m, ctx, new, steps["compiled"][c])   # compiles, at the cache length timed
        r = {(mode, c): [] for mode in modes for c in pair}
        for i in range(3):
            for mode in modes:
                for c in (("loop", "shared") if i % 2 == 0 else ("shared", "loop")):
                    r[mode, c].append(decode_rate(pair[c], ctx, new, steps[mode][c]))
        mib = {c: m.new_cache(1, ctx, device="meta").nbytes / 2**20 for c, m in pair.items()}
        for mode in modes:
            ratios = [a / b for a, b in zip(r[mode, "shared"], r[mode, "loop"])]
            print(f"| {ctx} | {mode} | {statistics.median(r[mode, 'loop']):.1f} | "
                  f"{statistics.median(r[mode, 'shared']):.1f} | {statistics.median(ratios):.2f} "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) | {mib['loop']:g} / {mib['shared']:g} |", flush=True)


def equal_memory_table(looplm, melt, ctx=2048, new=32, n_rounds=3):
    """MELT's 4x as throughput: in the KV memory of one LoopLM sequence of `ctx` tokens, MELT holds
    n_loop sequences. Decode tok/s of the LoopLM at batch 1 beside MELT at batch n_loop (the same
    cache bytes, checked), compiled fixed-shape step, `n_rounds` interleaved rounds; the ratio is
    the median of per-round ratios. Also the LoopLM at batch n_loop, which needs n_loop x the memory."""
    R = melt.config.n_loop
    runs = {"LoopLM, batch 1": (looplm, 1), f"MELT, batch {R}": (melt, R), f"LoopLM, batch {R}": (looplm, R)}
    mib = {n: m.new_cache(b, ctx + new, device="meta").nbytes / 2**20 for n, (m, b) in runs.items()}
    assert mib["LoopLM, batch 1"] == mib[f"MELT, batch {R}"]
    steps = {n: m.decode_step_fixed(compile=True) for n, (m, b) in runs.items()}
    for n, (m, b) in runs.items():
        decode_rate(m, ctx, new, steps[n], batch=b)   # compiles, at the shapes timed
    r = {n: [] for n in runs}
    for _ in range(n_rounds):
        for n, (m, b) in runs.items():
            r[n].append(decode_rate(m, ctx, new, steps[n], batch=b))
    base = r["LoopLM, batch 1"]
    print(f"\n{ctx}-token contexts, {new} new tokens, compiled fixed-shape step, {n_rounds} rounds\n"
          "\n| model, batch | KV cache MiB | decode tok/s, all rows (median) | / LoopLM batch 1 (per-round ratios) |"
          "\n|---|---|---|---|")
    for n, rates in r.items():
        x = [a / b for a, b in zip(rates, base)]
        print(f"| {n} | {mib[n]:g} | {statistics.median(rates):.1f} | {statistics.median(x):.2f} "
              f"({min(x):.2f}-{max(x):.2f}) |", flush=True)


def ragged_rate(model, B, new, step):
    """Decode tok/s of all rows of a ragged batch of B prompts of 32..64 tokens (each row its own
    positions and mask), after the prefill and first tokens."""
    g = torch.Generator().manual_seed(B)
    prompts = [torch.randint(0, 512, (int(n),), generator=g) for n in torch.linspace(32, 64, B).round()]
    with torch.inference_mode():
        padded, cache = ragged_batch(model, prompts, new)
        stream = model.generate_stream(padded, new, temperature=0, cache=cache, decode_step=step)
        next(stream)                       # the prefill (row by row) and the first tokens
        t = time.perf_counter()
        n = sum(1 for _ in stream)
        return B * n / (time.perf_counter() - t)


def batches_table(models, compile=True, n_rounds=3, sizes=(1, 4, 16), new=128):
    """Decode tok/s of ragged batches, both layouts, eager and compiled fixed-shape step; one
    untimed round compiles every (batch size, bucket) graph, then interleaved rounds, medians."""
    models = {c: models[n] for c, n in (("loop", "LoopLM"), ("shared", "MELT"))}
    modes = {"eager": {c: None for c in models}}
    if compile:
        modes["compiled"] = {c: m.decode_step_fixed(compile=True) for c, m in models.items()}
    res = {}
    for i in range(n_rounds + 1):
        for mode, steps in modes.items():
            for c, m in models.items():
                for B in sizes:
                    r = ragged_rate(m, B, new, steps[c])
                    if i:
                        res.setdefault((mode, c, B), []).append(r)
    print("| mode | layout | " + " | ".join(f"batch {B} tok/s" for B in sizes) + f" | {sizes[-1]} / 1 |\n"
          + "|---" * (len(sizes) + 3) + "|")
    for mode in modes:
        for c in models:
            med = [statistics.median(res[mode, c, B]) for B in sizes]
            print(f"| {mode} | {c} | " + " | ".join(f"{m:,.0f}" for m in med) + f" | {med[-1] / med[0]:.1f}x |")


def parse(argv):
    """The usage lines of the docstring as options: --help shows them; an unknown option, or two
    tables asked at once, is refused with an error line naming it (exit 2), nothing run."""
    def lengths(text):   # "64,2048" -> [64, 2048]
        return [int(n) for n in text.split(",")]
    ap = argparse.ArgumentParser(prog="bench/decode_speed.py", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    table = ap.add_mutually_exclusive_group()
    table.add_argument("--contexts", nargs="?", const=[64, 512, 1024, 2048, 4096], metavar="N,N,...",
                       type=lengths, help="decode tok/s versus context length")
    table.add_argument("--profile", action="store_true", help="where each layout's compiled step spends its time")
    table.add_argument("--reference", metavar="DIR", help="the Ouro reference (its remote code in DIR) beside ours")
    table.add_argument("--equal-memory", action="store_true", help="2,048-token contexts in one LoopLM's KV memory")
    table.add_argument("--batches", action="store_true", help="ragged batches of 1, 4 and 16 prompts")
    return ap.parse_args(argv)


def main(argv):
    a = parse(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if a.reference:
        reference_table(a.reference, compile=not a.no_compile)
        return
    models = {name: MELT(MeltConfig(**CONFIG, **kw)).eval() for name, kw in MODELS.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          + ", ".join(f"{name}: {m.num_params() / 1e6:.2f}M parameters" for name, m in models.items()))
    if a.profile:
        for name in ("LoopLM", "MELT"):   # side by side: where MELT's step differs from the LoopLM's
            print(f"\n=== {name}")
            profile_step(models[name])
        return
    if a.batches:
        batches_table(models, compile=not a.no_compile)
        return
    if a.equal_memory:
        equal_memory_table(models["LoopLM"], models["MELT"])
        return
    if a.contexts:   # --contexts, or --contexts=64,2048 for some lengths only
        contexts_table(models["LoopLM"], models["MELT"], a.contexts, compile=not a.no_compile)
        return
    for name, m in models.items():
        print(f"{name}: its matrix-vector products alone run at {products_rate(products_step(m, chained=True)):.0f} tok/s "
              f"in the step's order, {products_rate(products_step(m)):.0f} tok/s all independent", flush=True)
    modes = {"eager": {}}
    if not a.no_compile:
        for mode, make in (("compiled, dynamic shapes", lambda m: torch.compile(m.prefill, dynamic=True)),
                           ("compiled, fixed shapes", lambda m: m.decode_step_fixed(compile=True))):
            modes[mode] = {}
            for name, m in models.items():
                modes[mode][name] = make(m)
                t = time.perf_counter()
                decode_rate(m, 64, 256, modes[mode][name])   # compiles, at the cache length timed below
                print(f"{mode}: compiled {name}'s one-token step in {time.perf_counter() - t:.0f} s", flush=True)
    rates = rounds(models, modes)
    ratio = lambda r, ref: statistics.median(a / b for a, b in zip(r, ref))   # median per-round ratio
    print("\n| model | mode | weights read per token | decode tok/s (median of 5) | range | / LoopLM, same mode "
          "| / eager, same model |\n|---|---|---|---|---|---|---|")
    for mode in modes:
        for name, r in rates[mode].items():
            med = statistics.median(r)
            print(f"| {name} | {mode} | {weight_mb_per_token(models[name]):.1f} MB | {med:.1f} | "
                  f"{min(r):.0f}-{max(r):.0f} | {ratio(r, rates[mode]['LoopLM']):.2f} | "
                  f"{ratio(r, rates['eager'][name]):.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
