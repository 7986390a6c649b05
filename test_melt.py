"""Tests of melt.py, the model: what a reader of melt.py wants to hold. Training, data,
distillation and sampling are tested by topic in tests/.

Run: python -m pytest -q test_melt.py tests
The model tests compare against two independent computations: the reference Ouro implementation's
outputs on a tiny checkpoint (tests/fixtures/ouro_tiny), and `naive_forward` below, which spells
out the MELT and LoopLM definitions token by token with Python loops and no shared code.
"""

import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from melt import MELT, MeltConfig, MeltError
from serve.checkpoint import load_weights
from serve.engine import key_bucket, ragged_batch, sample_next
from serve.ouro import load_ouro_tokenizer

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
    load_weights(looped, {k: v for k, v in shared.state_dict().items() if ".gate." not in k})
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
# the sweeps: chunk-wise training at decode semantics

@pytest.mark.parametrize("gate,chunk,n_loops", [
    ("learned", 4, 3), ("learned", 5, 2), ("learned", 16, 3), ("scalar", 3, 3), ("mean", 4, 4),
    ("ema", 4, 3), ("last", 3, 3), ("first", 2, 3),
])
def test_enough_sweeps_are_decode_semantics(gate, chunk, n_loops):
    """With sweeps >= chunk_size - 1 the chunk-wise forward equals decode semantics: the forward at
    chunk_size=1 and the naive token-by-token definition with every earlier token final, for
    every gate, several chunk sizes and loop counts (float32). With fewer sweeps it does not."""
    model = tiny_model(cache="shared", gate=gate, chunk_size=chunk)
    idx = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        swept = model.run(idx, n_loops=n_loops, sweeps=chunk - 1).hidden
        decode = model.run(idx, n_loops=n_loops, chunk_size=1).hidden
        more = model.run(idx, n_loops=n_loops, sweeps=chunk + 2).hidden
    expect = naive_forward(model, idx, chunks(11, 1), n_loops=n_loops)
    torch.testing.assert_close(swept, expect, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(decode, expect, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(more, expect, atol=2e-5, rtol=1e-4)
    if gate not in ("first",) and chunk > 2:   # "first" keeps loop 1 only: loop-1 rows are already exact
        with torch.no_grad():
            fewer = model.run(idx, n_loops=n_loops, sweeps=0).hidden
        assert (fewer - expect).abs().max() > 1e-4


def test_each_sweep_makes_one_more_token_of_a_chunk_exact():
    """After sweeps=j the first j+1 tokens of the first chunk equal decode semantics and the next
    do not (the Jacobi iteration's invariant; later chunks read the earlier chunks' rows, exact
    only once those are); sweeps=0 is the plain chunk-wise forward, bit for bit."""
    model = tiny_model(cache="shared", gate="learned", chunk_size=6)
    idx = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        exact = model.run(idx, chunk_size=1).hidden
        assert torch.equal(model.run(idx, sweeps=0).hidden, model.run(idx).hidden)
        for j in range(5):
            h = model.run(idx, sweeps=j).hidden
            torch.testing.assert_close(h[:, :, :j + 1], exact[:, :, :j + 1], atol=2e-5, rtol=1e-4)
            assert (h[:, :, j + 1:6] - exact[:, :, j + 1:6]).abs().max() > 1e-5


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_sweeps_in_the_transition_reach_its_decode_semantics(alpha):
    """In the transition (keys/values alpha*shared + (1-alpha)*loop) enough sweeps equal the
    naive definition with chunks of one token at the same alpha."""
    model = tiny_model(cache="shared", gate="learned", chunk_size=4)
    idx = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = model.run(idx, alpha=alpha, sweeps=3).hidden
    torch.testing.assert_close(hidden, naive_forward(model, idx, chunks(9, 1), alpha=alpha), atol=2e-5, rtol=1e-4)


def test_sweep_gradients_reach_the_rows_later_tokens_read():
    """With sweeps=1, a loss on the last token of a chunk reaches the input of the first token's
    key/value projection in the first pass (its final row, which the second pass reads), at
    every layer: the earlier pass is part of the graph, not detached."""
    model = tiny_model(cache="shared", gate="learned", chunk_size=4, n_loop=2).train()
    inputs = []

    def keep(module, args, out):
        args[0].retain_grad()
        inputs.append(args[0])
    hooks = [b.attn.kv_proj.register_forward_hook(keep) for b in model.blocks]
    out = model.run(torch.tensor([[1, 2, 3, 4]]), sweeps=1)
    for hk in hooks:
        hk.remove()
    model.lm_head(out.hidden[-1][:, 3]).sum().backward()
    R, L = 2, len(model.blocks)
    assert len(inputs) == 2 * R * L                    # two passes of R loops of L layers
    for l in range(L):
        first_pass_final = inputs[(R - 1) * L + l]       # pass 0, last loop, layer l
        assert first_pass_final.grad[0, 0].abs().sum() > 0


def test_detached_sweeps_same_forward_no_gradient_through_earlier_passes():
    """sweeps_grad="last" computes the same forward as "all" (bit for bit), but a loss on the last
    token of a one-chunk sequence no longer reaches the first token's embedding: in the last pass
    it reads the first token only through the previous pass's rows, which carry no gradient."""
    idx = torch.tensor([[1, 2, 3, 4]])
    grads = {}
    for mode in ("all", "last"):
        model = tiny_model(cache="shared", gate="learned", chunk_size=4, n_loop=2, sweeps=1, sweeps_grad=mode).train()
        out = model.run(idx)
        model.lm_head(out.hidden[-1][:, 3]).sum().backward()
        grads[mode] = (out.hidden.detach(), model.tok_emb.weight.grad[1].abs().sum())
    assert torch.equal(grads["all"][0], grads["last"][0])
    assert grads["all"][1] > 0
    assert grads["last"][1] == 0


def test_sweeps_bad_input():
    """sweeps < 0 and sweeps with a loop cache are refused with a one-line error."""
    with pytest.raises(MeltError, match="sweeps=-1 must be >= 0"):
        MeltConfig(cache="shared", sweeps=-1)
    with pytest.raises(MeltError, match="sweeps=2 needs cache='shared'"):
        MeltConfig(cache="loop", sweeps=2)
    with pytest.raises(MeltError, match="sweeps=-1"):
        tiny_model(cache="shared").run(torch.zeros(1, 4, dtype=torch.long), sweeps=-1)
    with pytest.raises(MeltError, match="sweeps_grad='some'"):
        MeltConfig(cache="shared", sweeps=1, sweeps_grad="some")

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
        logits1, _ = model.prefill(prompt, c1)
        c2 = model.new_cache(2, 16)
        for t in range(9):
            logits2, _ = model.prefill(prompt[:, t:t + 1], c2)
    torch.testing.assert_close(logits1, logits2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c1.k[:, :, :, :, :9], c2.k[:, :, :, :, :9], atol=1e-5, rtol=1e-5)
    assert c1.pos == c2.pos == 9


@pytest.mark.parametrize("cache,threshold,fixed", [("loop", 1.0, False), ("shared", 1.0, False),
                                                   ("shared", 0.5, False), ("loop", 1.0, True), ("shared", 1.0, True)])
def test_ragged_batch_equals_each_prompt_alone(cache, threshold, fixed):
    """generate() on a list of prompts of different lengths (one left-padded batch, each row with
    its own positions and mask) gives, row by row, the tokens of that prompt generated alone,
    greedy, token for token: both layouts, adaptive exit, eager and fixed-shape decode steps; the
    cache holds the batch's rows, (longest prompt + new tokens) per row."""
    model = tiny_model(cache=cache, chunk_size=3, exit_threshold=threshold)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 61, (n,), generator=g) for n in (7, 2, 11, 5)]
    step = model.decode_step_fixed() if fixed else None
    batch = model.generate(prompts, 9, temperature=0, decode_step=step)
    for p, row in zip(prompts, batch):
        alone = model.generate(p[None], 9, temperature=0, decode_step=step)[0]
        assert torch.equal(row, alone), (len(p), row, alone)
    padded, ragged_cache = ragged_batch(model, prompts, 9)
    assert padded.shape == (4, 11) and ragged_cache.start.tolist() == [4, 9, 0, 6]
    assert ragged_cache.nbytes == model.new_cache(4, 11 + 9).nbytes


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
        logits, used = model.prefill(prompt, cache, exit_threshold=0.4)
        loops = []
        tok = logits.argmax(-1, keepdim=True)
        for _ in range(8):
            before = cache.clone()
            logits, used = model.prefill(tok, cache, exit_threshold=0.4)
            e = int(used[0, -1])
            loops.append(e)
            check_logits, _ = model.prefill(tok, before, n_loops=e, exit_threshold=1.0)
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
        logits, used = model.prefill(prompt, cache, exit_threshold=threshold)
        out, loops = [], []
        for _ in range(n):
            logits, used = (step or model.prefill)(logits.argmax(-1, keepdim=True), cache, None, threshold)
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
    """The fixed-shape decode step (the one-token step made to be compiled: position as a tensor, rows written with
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


@pytest.mark.parametrize("cache", ["loop", "shared"])
def test_length_buckets_equal_the_whole_cache_and_compile_once_each(cache, monkeypatch):
    """The fixed-shape decode step reads a power-of-two bucket of keys past the position instead
    of the whole preallocated cache: its logits equal the whole-cache step's at every position
    from 60 to 140 (across the buckets 64, 128, 256), and compiled it traces once per bucket
    touched, then never again (dynamo counted with a counting backend)."""
    from torch._dynamo.testing import CompileCounter
    model = tiny_model(cache=cache, n_loop=2, block_size=512)
    prompt = torch.randint(0, 61, (2, 60), generator=torch.Generator().manual_seed(4))
    assert [key_bucket(n, 512) for n in (1, 64, 65, 129, 400, 600)] == [64, 64, 128, 256, 512, 512]

    def run(step):
        with torch.no_grad():
            c = model.new_cache(2, 300)
            logits, _ = model.prefill(prompt, c)
            out = []
            for _ in range(80):
                logits, _ = step(logits.argmax(-1, keepdim=True), c)
                out.append(logits)
        return torch.stack(out)

    whole = run(model.decode_step_fixed(buckets=False))
    torch.testing.assert_close(run(model.decode_step_fixed()), whole, atol=1e-5, rtol=0)
    counter, real = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=counter, fullgraph=True, dynamic=False))
    torch._dynamo.reset()
    step = model.decode_step_fixed(compile=True)
    torch.testing.assert_close(run(step), whole, atol=1e-5, rtol=0)
    assert counter.frame_count == 3   # buckets 64, 128, 256
    run(step)
    assert counter.frame_count == 3


def test_kv_bytes_per_token_is_the_cache_s_bytes_per_token():
    """model.kv_bytes_per_token (what the lesson and evaluate.py report) equals a cache's bytes
    divided by batch and length, and the layout's formula: 2 (k, v) x slots x layers x kv heads x
    head_dim x bytes, slots = loops run in the loop layout and 1 in the shared one."""
    for cache in ("loop", "shared"):
        model = tiny_model(cache=cache, n_loop=3)
        for n_loops in (None, 2, 5):
            slots = (n_loops or 3) if cache == "loop" else 1
            formula = 2 * slots * 2 * 2 * 8 * 4   # layers 2, kv heads 2, head_dim 32 / 4
            assert model.kv_bytes_per_token(n_loops) == formula
            assert model.new_cache(3, 10, n_loops=n_loops).nbytes == formula * 3 * 10


def test_the_gate_starts_where_its_documentation_says_however_the_model_is_made():
    """A learned gate starts at W_z = U_z = 0 and b_z = gate_bias_init (z = sigmoid(bias)
    everywhere), a scalar gate at w = gate_bias_init: for a model built from its config, converted
    from an Ouro directory and converted from a LoopLM checkpoint of this project."""
    from serve.checkpoint import model_from_checkpoint

    def at_init(model, bias):
        for blk in model.blocks:
            g = blk.gate
            if g.kind == "learned":
                assert not g.w_z.weight.any() and not g.u_z.weight.any() and torch.all(g.b_z == bias)
            else:
                assert float(g.w.detach()) == bias
    torch.manual_seed(0)
    at_init(MELT(MeltConfig(vocab_size=61, n_embd=32, n_head=4, n_layer=2, cache="shared", gate_bias_init=-1.5)), -1.5)
    at_init(MELT.from_ouro(OURO_TINY, cache="shared", gate="scalar", gate_bias_init=-3.0), -3.0)
    looped = tiny_model(cache="loop")
    ckpt = dict(model=looped.state_dict(), model_config=vars(looped.config))
    at_init(model_from_checkpoint(ckpt, cache="shared", gate_bias_init=0.5), 0.5)


def test_a_ragged_batch_decodes_into_the_cache_it_is_given():
    """generate(list of prompts, cache=...) writes into the cache ragged_batch made (no second
    cache is built and dropped): the given cache ends at the longest prompt + new tokens."""
    model = tiny_model(cache="shared")
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7, 8])]
    _, cache = ragged_batch(model, prompts, 4)
    model.generate(prompts, 4, temperature=0, cache=cache)
    assert cache.pos == 5 + 4 - 1   # the last token is sampled, not written
    with pytest.raises(MeltError, match="must come from ragged_batch"):
        model.generate(prompts, 4, temperature=0, cache=model.new_cache(2, 9))
