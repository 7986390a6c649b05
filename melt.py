"""
MELT: a looped transformer (Ouro's LoopLM) with either of two KV-cache layouts, in one file.

A looped language model applies one stack of n_layer decoder layers n_loop times to every token
(Ouro, arXiv 2510.25741). Where its keys and values live decides its memory:

- cache="loop"   (LoopLM / Ouro): one KV cache per (loop, layer). At loop r a token attends to the
                  loop-r keys/values of earlier tokens, so memory grows n_loop times.
- cache="shared" (MELT, arXiv 2605.07721): one KV cache per layer. Per layer and token a latent s
                  runs across the loops through a gate, s = z*s + (1-z)*x, and keys/values come
                  from s. Earlier tokens expose only their final row, so memory is that of a
                  standard transformer whatever n_loop is. Training runs chunk-wise, because at
                  inference earlier tokens are already final.

Where things live (search for the tags):
    THE GATE          LatentGate.forward: z and the update of s
    THE LAYOUTS       Attention.forward: which key/value rows a layer reads at a loop
    THE STORES        KVStore: the one interface to the rows (KVCache, TrainHistory, FixedRows)
    THE LOOP          MELT._run_chunk: `for r in range(n_loops)` around the blocks
    THE CHUNKS        MELT.run: shared mode runs the sequence chunk after chunk
    THE SWEEPS        MELT._run_chunk: training at decode semantics, a chunk re-run k more times
    DECODING          MELT.prefill, MELT.decode_step_fixed (gpt-fast's one-token step), generate
"""

import json
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

CACHE_LAYOUTS = ("loop", "shared")
GATES = ("learned", "scalar", "mean", "ema", "last", "first")
LOSSES = ("expected_logits", "expected_loss", "last")


class MeltError(ValueError):
    """A problem with the caller's input (config, checkpoint, prompt), stated in one line."""


@dataclass
class MeltConfig:
    vocab_size: int = 512            # number of token ids
    block_size: int = 1024           # longest position the model handles (RoPE table, default cache)
    n_layer: int = 4                 # decoder layers in the stack that is looped
    n_loop: int = 4                  # times the stack runs per token; 1 is a standard transformer
    n_embd: int = 256                # model width
    n_head: int = 4                  # query heads
    n_kv_head: int = 0               # key/value heads; 0 means n_head; fewer is grouped-query attention
    head_dim: int = 0                # width of one head; 0 means n_embd // n_head
    mlp_hidden: int = 0              # SwiGLU inner width; 0 means round(2.75 * n_embd), Ouro's ratio
    rope_theta: float = 10000.0      # RoPE base (Ouro-1.4B uses 1e6)
    norm_eps: float = 1e-6           # RMSNorm epsilon
    cache: str = "loop"              # KV layout: "loop" (one cache per loop and layer) or "shared" (MELT)
    gate: str = "learned"            # shared mode: how s carries across loops, one of GATES
    gate_bias_init: float = -2.0     # learned/scalar gate start: z = sigmoid(-2) = 0.12, near "last"
    ema_rate: float = 0.2            # gate="ema": weight of the new loop, s = (1-rate)*s + rate*x
    chunk_size: int = 64             # shared mode: tokens per chunk in training and prefill
    sweeps: int = 0                  # shared mode: extra passes per chunk towards decode semantics (THE SWEEPS)
    sweeps_grad: str = "all"         # THE SWEEPS in training: "all" passes in the graph, or "last" (earlier ones without gradient)
    exit_threshold: float = 1.0      # the loop whose logits are "the" logits: first with cum. exit prob >= this
    loss: str = "expected_logits"    # training loss, one of LOSSES
    entropy_weight: float = 0.05     # loss="expected_loss": beta of the entropy bonus on the exit distribution
    init_std: float = 0.02           # std of the normal init of matrices and embeddings

    def __post_init__(self):
        if self.head_dim == 0 and self.n_head >= 1 and self.n_embd % self.n_head:
            raise MeltError(f"bad MeltConfig: n_head={self.n_head} does not divide n_embd={self.n_embd}")
        self.head_dim = self.head_dim or self.n_embd // max(self.n_head, 1)
        self.n_kv_head = self.n_kv_head or self.n_head
        self.mlp_hidden = self.mlp_hidden or int(round(2.75 * self.n_embd))
        self.validate()

    def validate(self):
        """Raise MeltError naming the first contradiction in this config."""
        def need(ok, msg):
            if not ok:
                raise MeltError(f"bad MeltConfig: {msg}")
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "n_kv_head"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        need(self.n_loop >= 1, f"n_loop={self.n_loop} must be >= 1")
        need(self.chunk_size >= 1, f"chunk_size={self.chunk_size} must be >= 1")
        need(self.sweeps >= 0, f"sweeps={self.sweeps} must be >= 0")
        need(self.sweeps == 0 or self.cache == "shared",
             f"sweeps={self.sweeps} needs cache='shared' (a loop cache has no chunks to sweep)")
        need(self.sweeps_grad in ("all", "last"), f"sweeps_grad={self.sweeps_grad!r}, expected 'all' or 'last'")
        need(self.cache in CACHE_LAYOUTS, f"cache={self.cache!r}, expected one of {CACHE_LAYOUTS}")
        need(self.gate in GATES, f"gate={self.gate!r}, expected one of {GATES}")
        need(self.loss in LOSSES, f"loss={self.loss!r}, expected one of {LOSSES}")
        need(self.n_head % self.n_kv_head == 0,
             f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        need(self.head_dim >= 2 and self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        need(0.0 < self.exit_threshold <= 1.0, f"exit_threshold={self.exit_threshold} not in (0, 1]")
        need(0.0 < self.ema_rate <= 1.0, f"ema_rate={self.ema_rate} not in (0, 1]")
        return self


# -----------------------------------------------------------------------------
# THE STORES: where a layer's key/value rows live

class KVStore:
    """The one interface between the layers and their key/value rows.

    rows(slot, layer, k, v): write the current chunk's rows k, v (B, nkv, c, hs) of (slot, layer)
        and return every row of (slot, layer) a query of this chunk may read, earlier tokens'
        first, then the chunk's (the attention mask hides what a query may not see).
    end_chunk(n): the chunk's n tokens are done; the next rows come after them.
    pos: the number of tokens before the current chunk (an int; a (1,) tensor in FixedRows).
    chunk_rows(slot, layer): the chunk's rows as last written (THE SWEEPS read them).
    start: None, or (B,) the first slot of each row's own tokens in a batch of prompts of
        different lengths, left-padded (KVCache): a row's positions count from its start and
        its queries never read the slots before it.

    A slot is a loop index in the loop layout (slot r: every token's loop-r rows) and 0 in the
    shared layout (one row per token and layer). Three implementations:
        KVCache       inference: preallocated, written in place, passed into the model
        TrainHistory  training: autograd tensors, concatenated, so gradients reach earlier chunks
        FixedRows     the fixed-shape one-token decode view of a KVCache (torch.compile, CUDA graphs)
    """

    start = None

    def rows(self, slot, layer, k, v):
        raise NotImplementedError

    def end_chunk(self, n_tokens):
        raise NotImplementedError


class KVCache(KVStore):
    """Preallocated keys/values for inference, passed into the model, never stored on it.

    k, v have shape (n_slots, n_layer, B, n_kv_head, max_len, head_dim), keys after RoPE:
        loop layout   (LoopLM): n_slots = n_loop, slot r holds every token's loop-r row.
        shared layout (MELT):   n_slots = 1, the one row per token and layer that all loops read;
                                while a chunk runs it holds the chunk's current rows, after the
                                chunk's last loop its final rows.
    `pos` is the number of tokens already in the cache; it advances in end_chunk() and nowhere else.
    `position` is the same number as a (1,) tensor on the cache's device, for the fixed-shape
    decode step, whose compiled graph must not depend on a Python number.
    """

    def __init__(self, layout, n_slots, n_layer, batch_size, n_kv_head, max_len, head_dim, dtype, device,
                 start=None):
        shape = (n_slots, n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.layout, self.batch_size, self.max_len = layout, batch_size, max_len
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # views of each (slot, layer) block, made once: indexing them is the decode hot path
        self._k = [list(self.k[i].unbind(0)) for i in range(n_slots)]   # [slot][layer] (B, nkv, max_len, hs)
        self._v = [list(self.v[i].unbind(0)) for i in range(n_slots)]
        self.pos, self._c = 0, 0
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        # the decode step always reads a start (zeros: no padding), so one compiled graph serves both
        self.offsets = torch.zeros(batch_size, dtype=torch.long, device=device)
        if start is not None:
            self.start = torch.as_tensor(start, dtype=torch.long, device=device).view(batch_size)
            self.offsets.copy_(self.start)

    @property
    def nbytes(self):
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def rows(self, slot, layer, k, v):
        self._c = k.shape[2]
        end = self.pos + self._c
        kc, vc = self._k[slot][layer], self._v[slot][layer]
        kc[:, :, self.pos:end] = k
        vc[:, :, self.pos:end] = v
        return kc[:, :, :end], vc[:, :, :end]   # views, no copy

    def chunk_rows(self, slot, layer):
        end = self.pos + self._c
        return self._k[slot][layer][:, :, self.pos:end].clone(), self._v[slot][layer][:, :, self.pos:end].clone()

    def end_chunk(self, n_tokens):
        self.pos += n_tokens
        self.position.fill_(self.pos)

    def reset(self):
        self.pos = 0
        self.position.zero_()

    def clone(self):
        """An independent copy at the same position (e.g. to branch generation from one prompt)."""
        dup = KVCache(self.layout, *self.k.shape, self.k.dtype, self.k.device, start=self.start)
        dup.k.copy_(self.k)
        dup.v.copy_(self.v)
        dup.end_chunk(self.pos)
        return dup


class TrainHistory(KVStore):
    """The training-time store: earlier chunks' rows kept as autograd tensors (concatenated, not
    written in place) so that gradients flow through them. Slots are dict keys, so the
    transition can hold both layouts (loop slots 0..R-1 and the shared slot R)."""

    def __init__(self):
        self.past, self.current, self.pos = {}, {}, 0

    def rows(self, slot, layer, k, v):
        self.current[slot, layer] = (k, v)   # in shared mode the last loop's write is the final row
        if (slot, layer) not in self.past:
            return k, v
        pk, pv = self.past[slot, layer]
        return torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)

    def chunk_rows(self, slot, layer):
        return self.current[slot, layer]

    def end_chunk(self, n_tokens):
        for key, (k, v) in self.current.items():
            if key in self.past:
                pk, pv = self.past[key]
                k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
            self.past[key] = (k, v)
        self.current = {}
        self.pos += n_tokens


class FixedRows(KVStore):
    """The decode-time view of a KVCache with every shape fixed, for torch.compile and CUDA graphs
    (gpt-fast's design): rows() writes the token's row at `pos`, a (1,) int64 tensor, and returns
    the first n_keys rows of the preallocated (slot, layer) block, n_keys a length bucket past pos
    (MELT.key_bucket); the attention mask hides the rows after pos. So the compiled step sees the
    same shapes at every position of a bucket and is traced once per bucket, while its attention
    reads the rows in use, not the whole cache. The caller advances the KVCache."""

    def __init__(self, k, v, pos, n_keys=None):
        _, _, B, nkv, max_len, _ = k.shape
        self.k, self.v, self.pos, self.max_len = k, v, pos, n_keys or max_len
        # where a token's rows go, as index tensors broadcast to (B, nkv, 1): index_put_ on the
        # whole cache tensor, not on a view of it, which a compiled graph would copy every step
        self.b = torch.arange(B, device=k.device).view(B, 1, 1)
        self.h = torch.arange(nkv, device=k.device).view(1, nkv, 1)

    def rows(self, slot, layer, k, v):
        at = (self.pos.new_full((1, 1, 1), slot), self.pos.new_full((1, 1, 1), layer), self.b, self.h,
              self.pos.view(1, 1, 1))
        self.k.index_put_(at, k)   # k, v: (B, nkv, 1, hs), i.e. one row of hs per (b, head)
        self.v.index_put_(at, v)
        return self.k[slot, layer, :, :, :self.max_len], self.v[slot, layer, :, :, :self.max_len]   # (B, nkv, n_keys, hs)

    def end_chunk(self, n_tokens):
        pass   # the cache's position advances outside the compiled step, in KVCache.end_chunk


@dataclass
class Chunk:
    """What every layer needs to know about the chunk it runs, besides its own inputs. Made once
    per chunk (MELT._chunk, or MELT._decode_one_token for the fixed-shape step)."""
    store: KVStore                       # where the rows are read and written
    layout: str                          # "loop", "shared" or "both" (MELT.kv_layout)
    alpha: float                         # the transition: weight of the shared rows in "both"
    shared_slot: int                     # the shared rows' slot: 0, or n_loops in the transition
    cos: torch.Tensor                    # (c, hs) RoPE tables at the chunk's positions
    sin: torch.Tensor
    mask: Optional[torch.Tensor]         # (c, keys) bool, True = may read; None with is_causal or one token
    is_causal: bool                      # SDPA's own causal mask (a first chunk, nothing before it)
    prev: Optional[dict] = None          # THE SWEEPS: {(slot, layer): (k, v)} the chunk's rows of the pass before
    exited: Optional[torch.Tensor] = None   # adaptive depth: (B, c, 1) bool, tokens that stopped looping


# -----------------------------------------------------------------------------
# the layers: norm, rotary embedding, attention, MLP, the MELT gate, the block

class RMSNorm(nn.Module):
    """Weight-only RMSNorm computed in float32 and cast back before the scale, as Ouro does."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_tables(head_dim, max_len, theta):
    """cos, signed sin of shape (max_len, head_dim) in float32 for split-half (NeoX) RoPE, where
    dimension i pairs with i + hs/2. The sin table's first half is negated (see apply_rope)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)                                     # (T, hs)
    sin = emb.sin()
    sin[:, :head_dim // 2] *= -1
    return emb.cos(), sin


def apply_rope(x, cos, sin_signed):
    """Rotate x (B, nh, T, hs) by position; tables (T, hs). The usual form is
    x * cos + cat(-x2, x1) * sin with x = (x1, x2); cat(x2, x1) is roll(x, hs/2) and the sign
    lives in the table, which saves three ops per call on the decode path."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class Attention(nn.Module):
    """One attention layer, no biases (Ouro). Keys and values share one matrix kv_proj, W_K's rows
    then W_V's (one read instead of two when decoding); queries have their own because in shared
    mode they come from x while keys/values come from the latent s."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.kv_proj = nn.Linear(cfg.n_embd, 2 * cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def kv(self, inp, ck):
        """Keys (after RoPE) and values of the rows inp (B, c, C) -> 2 x (B, nkv, c, hs)."""
        B, c, _ = inp.shape
        kv = self.kv_proj(inp).view(B, c, 2 * self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, 2nkv, c, hs)
        k, v = kv.split(self.n_kv_head, dim=1)                                              # (B, nkv, c, hs)
        return apply_rope(k, ck.cos, ck.sin), v

    def forward(self, x, s, r, ck):
        """THE LAYOUTS. Attention at loop r for the chunk's normed inputs x (B, c, C); s is the
        MELT latent (shared layouts). Which key/value rows are read is the whole difference:
            loop    rows projected from x at loop r; earlier tokens' loop-r rows (slot r)
            shared  rows projected from s; earlier tokens' final rows (one slot)
            both    the transition: alpha * shared + (1 - alpha) * loop, both kept
        With THE SWEEPS (ck.prev) the chunk's earlier tokens are read from the previous pass's
        final rows instead of their current ones (the mask shows each query its own current row
        and the earlier tokens' previous rows)."""
        B, c, _ = x.shape
        q = self.q_proj(x).view(B, c, self.n_head, self.head_dim).transpose(1, 2)   # (B, nh, c, hs)
        q = apply_rope(q, ck.cos, ck.sin)
        store, l = ck.store, self.layer
        if ck.layout == "loop":
            k, v = store.rows(r, l, *self.kv(x, ck))
        elif ck.layout == "shared":
            k, v = store.rows(ck.shared_slot, l, *self.kv(s, ck))
        else:
            k_loop, v_loop = store.rows(r, l, *self.kv(x, ck))
            k_shr, v_shr = store.rows(ck.shared_slot, l, *self.kv(s, ck))
            k = ck.alpha * k_shr + (1.0 - ck.alpha) * k_loop
            v = ck.alpha * v_shr + (1.0 - ck.alpha) * v_loop
        if ck.prev is not None:   # append the previous pass's rows of the chunk: (B, nkv, P + 2c, hs)
            pk, pv = ck.prev[ck.shared_slot, l]
            if ck.layout == "both":   # the loop rows of the chunk are current in every pass
                pk = ck.alpha * pk + (1.0 - ck.alpha) * k_loop[:, :, -c:]
                pv = ck.alpha * pv + (1.0 - ck.alpha) * v_loop[:, :, -c:]
            k, v = torch.cat((k, pk), dim=2), torch.cat((v, pv), dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=ck.mask, is_causal=ck.is_causal,
                                           enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, c, hs)
        y = y.transpose(1, 2).reshape(B, c, self.n_head * self.head_dim)             # (B, c, nh*hs)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with W_gate's and W_up's rows in one matrix gate_up."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_up = nn.Linear(cfg.n_embd, 2 * cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LatentGate(nn.Module):
    """THE GATE. How the MELT latent s of a layer carries from loop to loop (shared mode).

    x is the layer's normed input at this loop (what Ouro projects q/k/v from), s the latent
    after the previous loop. Loop 1 sets s = x (our choice; the paper does not say); later loops
    s = z*s + (1-z)*x, with z, by kind:
        learned  z = sigmoid(x W_z + s U_z + b_z), element-wise (MELT, Eq. of Sec. 3)
        scalar   z = sigmoid(w), one learned number per layer
        mean     z = (r-1)/r at loop r (1-based): s is the running mean of the loops' x
        ema      z = 1 - ema_rate
        last     z = 0: keep the newest loop only (Ouro's decode-time reuse of the last loop)
        first    z = 1: keep loop 1 only (Mixture-of-Recursions-style recursive sharing)
    One set of parameters per layer, shared by the loops.
    """

    def __init__(self, cfg):
        super().__init__()
        self.kind, self.ema_rate = cfg.gate, cfg.ema_rate
        if self.kind == "learned":
            self.w_z = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)   # x W_z
            self.u_z = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)   # s U_z
            self.b_z = nn.Parameter(torch.zeros(cfg.n_embd))
        elif self.kind == "scalar":
            self.w = nn.Parameter(torch.zeros(()))
        self.reset_parameters(cfg.gate_bias_init)

    @torch.no_grad()
    def reset_parameters(self, bias):
        """The documented start: W_z = U_z = 0 and b_z = bias, so z = sigmoid(bias) everywhere,
        a fixed EMA that leans to the newest loop; the gradient still reaches W_z and U_z."""
        if self.kind == "learned":
            self.w_z.weight.zero_()
            self.u_z.weight.zero_()
            self.b_z.fill_(bias)
        elif self.kind == "scalar":
            self.w.fill_(bias)

    def forward(self, x, s, r):
        """x, s: (B, T, C); r: 0-based loop index. Returns the new s."""
        if r == 0:
            return x
        if self.kind == "learned":
            z = torch.sigmoid(self.w_z(x) + self.u_z(s) + self.b_z)
        elif self.kind == "scalar":
            z = torch.sigmoid(self.w)
        elif self.kind == "mean":
            z = r / (r + 1)
        elif self.kind == "ema":
            z = 1.0 - self.ema_rate
        elif self.kind == "last":
            return x
        else:  # "first"
            return s
        return z * s + (1 - z) * x


class Block(nn.Module):
    """One decoder layer in Ouro's "sandwich" form, four RMSNorms (Ouro's names: input_layernorm,
    input_layernorm_2, post_attention_layernorm, post_attention_layernorm_2). In shared mode the
    gate updates the latent s from the attention's normed input before keys/values are read."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.attn_in_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.attn_out_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp_in_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.mlp_out_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.gate = LatentGate(cfg) if cfg.cache == "shared" else None
        self.checkpoint_mlp = False   # training memory: recompute the MLP half in backward

    def forward(self, h, s, r, ck):
        """h (B, c, C) at loop r, s this layer's latent -> (h, s, attention output)."""
        x = self.attn_in_norm(h)
        if ck.layout != "loop":
            s_new = self.gate(x, s, r)   # THE GATE: s carries across loops, keys/values come from it
            # a token that has exited (adaptive depth) keeps its latent, so the row it writes
            # again is its final row, the one later tokens must read
            s = s_new if ck.exited is None else torch.where(ck.exited, s, s_new)
        a = self.attn(x, s, r, ck)
        h = h + self.attn_out_norm(a)
        h = h + self.mlp_half(h)
        return h, s, a

    def mlp_half(self, h):
        if self.checkpoint_mlp and torch.is_grad_enabled():
            # the widest activations, recomputed in backward; the attention half reads the KV
            # store, so it is not recomputed
            return torch.utils.checkpoint.checkpoint(self._mlp_half, h, use_reentrant=False)
        return self._mlp_half(h)

    def _mlp_half(self, h):
        return self.mlp_out_norm(self.mlp(self.mlp_in_norm(h)))


# -----------------------------------------------------------------------------
# the exit distribution, sampling

@dataclass
class LoopOutput:
    """What one pass of the looped model computed (all tensors for the positions passed in)."""
    hidden: torch.Tensor        # (R, B, T, C) each loop's output, after the final norm
    gate_logits: torch.Tensor   # (R, B, T) the early-exit gate before its sigmoid, per loop
    exit_probs: torch.Tensor    # (R, B, T) Ouro's exit distribution p_t
    selected: torch.Tensor      # (B, T, C) hidden of the loop chosen by exit_threshold
    loops_used: torch.Tensor    # (B, T) loops actually computed for each token
    attn: list                  # attn[t][l] (B, T, C): attention output of layer l at loop t, or None


def exit_distribution(gate_logits, final=True):
    """Ouro's p_t = lambda_t * prod_{j<t}(1 - lambda_j), the last loop taking the remainder.
    gate_logits: (R, ...) -> p: (R, ...). Same order of operations as the reference code.
    final=False: the loops so far of a run that may go on (no loop takes the remainder)."""
    lam = torch.sigmoid(gate_logits)
    remaining = torch.ones_like(lam[0])
    p = []
    for t in range(lam.shape[0]):
        if t < lam.shape[0] - 1 or not final:
            p.append(lam[t] * remaining)
            remaining = remaining * (1.0 - lam[t])
        else:
            p.append(remaining)
    return torch.stack(p)


def exit_choice(exit_probs, threshold):
    """Index of the first loop whose cumulative exit probability reaches threshold, else the
    last loop (Ouro's early_exit_threshold rule). (R, B, T) -> (B, T) int64."""
    reached = exit_probs.cumsum(0) >= threshold
    choice = reached.float().argmax(0)
    return torch.where(reached.any(0), choice, torch.full_like(choice, exit_probs.shape[0] - 1))


def causal_mask(n_past, n_new, device, sweep=False):
    """(n_new, keys) bool, True where a new token may read: every past row and the new rows up to
    itself; keys = n_past + n_new. With sweep=True the keys are [past | the chunk's current rows |
    its rows of the previous pass] (THE SWEEPS): a token reads its own current row and the earlier
    tokens' previous rows, keys = n_past + 2 n_new. None where SDPA needs no mask."""
    if sweep:
        own = torch.eye(n_new, dtype=torch.bool, device=device)
        before = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril(-1)
        past = torch.ones(n_new, n_past, dtype=torch.bool, device=device)
        return torch.cat((past, own, before), dim=1)
    if n_new == 1:
        return None
    return torch.ones(n_new, n_past + n_new, dtype=torch.bool, device=device).tril(n_past)


def check_sampling(temperature, top_k):
    """Refuse sampling settings that mean nothing, with a clear message."""
    if temperature < 0:
        raise MeltError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise MeltError(f"top_k={top_k} must be >= 1")


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """Pure sampling step: logits (B, V) -> ids (B, 1). temperature 0 means argmax."""
    check_sampling(temperature, top_k)
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


# -----------------------------------------------------------------------------
# the model

# torch.compile options for the one-token decode step on a CPU: inductor writes each one-row
# product as its own vectorised loop over the threads (decompose_mm_pass) instead of calling BLAS's
# single-threaded matrix-vector product, and the step's glue in C++ (cpp_wrapper). Measured in
# RESULTS.md (bench/matvec_layout.py, bench/decode_speed.py).
CPU_DECODE_COMPILE_OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}, "cpp_wrapper": True}
# MeltConfig fields that define the weights' shapes: a resume or init_from may not change them.
ARCH_KEYS = ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "mlp_hidden")
MODEL_FIELDS = {f.name for f in fields(MeltConfig)}


class MELT(nn.Module):
    """The looped language model: tok_emb, n_layer Blocks run n_loop times (the final norm and the
    exit gate after every loop), lm_head. One class for three models:
        cache="loop"             a LoopLM (Ouro): one KV cache per loop and layer
        cache="loop", n_loop=1   a standard transformer
        cache="shared"           MELT: one KV cache per layer, the latent gate, chunk-wise training
    forward() is what training calls; run() returns every loop (LoopOutput); prefill(),
    decode_step_fixed() and generate() decode with a KVCache made by new_cache()."""

    def __init__(self, config):
        super().__init__()
        self.config = config.validate()
        cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)   # no scaling (Ouro)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)              # applied after every loop
        self.exit_gate = nn.Linear(cfg.n_embd, 1, bias=True)       # lambda_t = sigmoid(exit_gate(h_t))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)   # untied from tok_emb
        self._init_rope()
        self.apply(self._init_weights)
        for block in self.blocks:
            if block.gate is not None:
                block.gate.reset_parameters(cfg.gate_bias_init)

    def _init_rope(self, device=None):
        cos, sin = rope_tables(self.config.head_dim, self.config.block_size, self.config.rope_theta)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    @property
    def checkpoint_mlp(self):
        return self.blocks[0].checkpoint_mlp

    @checkpoint_mlp.setter
    def checkpoint_mlp(self, on):
        for block in self.blocks:
            block.checkpoint_mlp = bool(on)

    # ---- the forward -----------------------------------------------------------------------

    def forward(self, idx, targets=None, n_loops=None, alpha=None):
        """idx (B, T) -> (logits (B, T, V) of the loop chosen by exit_threshold, loss or None)."""
        if not torch.compiler.is_compiling():
            self.check_ids(idx)
        out = self.run(idx, n_loops=n_loops, alpha=alpha)
        logits = self.lm_head(out.selected)
        loss = None if targets is None else self.loss(out, targets)
        return logits, loss

    def run(self, idx, n_loops=None, cache=None, alpha=None, exit_threshold=None, collect_attn=False,
            chunk_size=None, sweeps=None):
        """The looped forward pass on token ids idx (B, T) -> LoopOutput.

        n_loops: loops to run (default config.n_loop). cache: a KVCache from new_cache() holding
        the earlier tokens, or None to start from position 0 without keeping anything.
        alpha: shared mode's interpolation between the layouts (default 1: pure MELT).
        exit_threshold: default config.exit_threshold; below 1 in shared mode tokens stop looping.
        collect_attn: keep every layer's attention output at every loop (for distillation).
        chunk_size, sweeps: default the config's (shared mode); chunk_size=1 is decode semantics.
        """
        cfg = self.config
        B, T = idx.shape
        R, q = self._depth(n_loops, exit_threshold)
        alpha = 1.0 if alpha is None else float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise MeltError(f"alpha={alpha} must be in [0, 1]")
        layout = self.kv_layout(alpha)
        chunk = cfg.chunk_size if chunk_size is None else chunk_size
        sweeps = cfg.sweeps if sweeps is None else sweeps
        if chunk < 1 or sweeps < 0:
            raise MeltError(f"chunk_size={chunk} must be >= 1 and sweeps={sweeps} >= 0")
        store = TrainHistory() if cache is None else cache
        if cache is not None:
            self._check_cache(cache, B, T, R, layout)
        if store.pos + T > cfg.block_size:
            raise MeltError(f"positions {store.pos}..{store.pos + T - 1} exceed block_size={cfg.block_size}")
        # THE CHUNKS. Loop mode needs none: at loop r a token reads earlier tokens' loop-r rows,
        # which a causal mask over the whole sequence already gives. Shared mode reads earlier
        # tokens' *final* rows, which exist only once their chunk has run all its loops.
        if layout == "loop":
            chunk, sweeps = T, 0
        emb = self.tok_emb(idx)   # (B, T, C)
        parts = [self._run_chunk(emb[:, i:i + chunk], store, R, alpha, layout, q, collect_attn, sweeps)
                 for i in range(0, T, chunk)]          # chunks in sequence, tokens within in parallel
        if len({len(p[0]) for p in parts}) > 1:   # adaptive exit ended chunks at different loops:
            parts = [([*hd, *[hd[-1]] * (R - len(hd))], [*g, *[g[-1]] * (R - len(g))], a, u)
                     for hd, g, a, u in parts]     # repeat each chunk's exit state up to R loops
        hidden = torch.cat([torch.stack(p[0]) for p in parts], dim=2)        # (R', B, T, C)
        gate_logits = torch.cat([torch.stack(p[1]) for p in parts], dim=2)   # (R', B, T)
        loops_used = torch.cat([p[3] for p in parts], dim=1)                 # (B, T)
        attn = None
        if collect_attn:
            attn = [[torch.cat([p[2][t][l] for p in parts], dim=1) for l in range(cfg.n_layer)]
                    for t in range(len(parts[0][2]))]
        return self._output(hidden, gate_logits, loops_used, attn, q)

    def _chunk(self, store, c, alpha, layout, R, device, dtype, sweep=False):
        """The Chunk of c tokens after store.pos (variable shapes: training, prefill)."""
        pos, slot = store.pos, R if layout == "both" else 0
        if store.start is not None:   # a ragged batch: per-row positions and a per-row mask
            at = (torch.arange(pos, pos + c, device=device)[None] - store.start[:, None]).clamp_min(0)   # (B, c)
            key_slot = torch.arange(pos + c, device=device)            # the cache slot of each key column
            if sweep:
                key_slot = torch.cat((key_slot, torch.arange(pos, pos + c, device=device)))
            mask = causal_mask(pos, c, device, sweep)
            mask = torch.ones(c, len(key_slot), dtype=torch.bool, device=device) if mask is None else mask
            mask = mask & (key_slot[None] >= store.start[:, None]).unsqueeze(1)                # (B, c, keys)
            return Chunk(store=store, layout=layout, alpha=alpha, shared_slot=slot,
                         cos=self.rope_cos[at].to(dtype).unsqueeze(1), sin=self.rope_sin[at].to(dtype).unsqueeze(1),
                         mask=mask.unsqueeze(1), is_causal=False)                           # (B, 1, c, keys)
        return Chunk(store=store, layout=layout, alpha=alpha, shared_slot=slot,
                     cos=self.rope_cos[pos:pos + c].to(dtype), sin=self.rope_sin[pos:pos + c].to(dtype),
                     mask=causal_mask(pos, c, device, sweep) if pos > 0 or sweep else None,
                     is_causal=c > 1 and pos == 0 and not sweep)   # c first: a plain bool under compile

    def _run_chunk(self, h, store, n_loops, alpha, layout, threshold, collect_attn, sweeps=0, ck=None):
        """All loops for one chunk h (B, c, C) of embeddings; earlier chunks are in store.

        THE SWEEPS. Inside a chunk, tokens read each other's current-loop rows, which never exist
        when decoding (there, every earlier token is final). sweeps=k re-runs the chunk k more
        times; in each, a token reads its earlier in-chunk neighbours' final rows from the pass
        before (and its own current row), so after pass j the chunk's first j+1 tokens are exact
        and sweeps >= c-1 is decode semantics exactly: a Jacobi iteration, every token in
        parallel. With sweeps_grad="all" gradients flow through every pass, so a token's loss
        trains the rows its in-chunk neighbours wrote for it; "last" runs the passes before the
        last without gradient (a forward only, cheaper), and those rows then train only through
        the tokens' own losses and later chunks."""
        B, c, _ = h.shape
        if ck is None:
            ck = self._chunk(store, c, alpha, layout, n_loops, h.device, h.dtype)
        sweeps = sweeps if c > 1 and layout != "loop" else 0
        for j in range(sweeps + 1):
            if j == 1:
                ck = self._chunk(store, c, alpha, layout, n_loops, h.device, h.dtype, sweep=True)
            if j > 0:
                ck.prev = {(ck.shared_slot, l): store.chunk_rows(ck.shared_slot, l) for l in range(len(self.blocks))}
            detached = j < sweeps and self.config.sweeps_grad == "last"
            with torch.set_grad_enabled(torch.is_grad_enabled() and not detached):
                res = self._loops(h, ck, n_loops, layout, threshold, collect_attn)
        store.end_chunk(c)
        return res

    def _loops(self, h, ck, n_loops, layout, threshold, collect_attn):
        """THE LOOP: every loop of every layer for one pass over a chunk h (B, c, C)."""
        B, c, _ = h.shape
        # Adaptive depth saves compute only in shared mode: a token that has exited keeps its
        # hidden state, latent and KV row, and later tokens read that row. In loop mode every
        # earlier token must have a row at every loop, so all loops run and the exit is chosen after.
        adaptive = layout == "shared" and threshold < 1.0
        ck.exited = None
        loops_used = torch.zeros(B, c, dtype=torch.long, device=h.device)
        s = [None] * self.config.n_layer   # the MELT latent of each layer, carried across loops
        hidden, gate_logits, attn = [], [], []
        for r in range(n_loops):
            attn_r = []
            for l, block in enumerate(self.blocks):
                h_new, s[l], a = block(h, s[l], r, ck)
                h = h_new if ck.exited is None else torch.where(ck.exited, h, h_new)
                attn_r.append(a)
            h_final = self.norm(h)
            if ck.exited is not None:
                h_final = torch.where(ck.exited, hidden[-1], h_final)
            h = h_final                       # Ouro: the final norm's output is the next loop's input
            hidden.append(h)
            gate_logits.append(self.exit_gate(h).squeeze(-1))   # (B, c)
            if collect_attn:
                attn.append(attn_r)
            loops_used = loops_used + (1 if ck.exited is None else (~ck.exited[..., 0]).long())
            if adaptive and r < n_loops - 1:
                cum = exit_distribution(torch.stack(gate_logits).float(), final=False).cumsum(0)[-1]
                ck.exited = (cum >= threshold).unsqueeze(-1)   # (B, c, 1)
                # a compiled step cannot branch on data: it runs every loop, exited tokens frozen
                # by the torch.where calls on ck.exited (same numbers, no compute saved)
                if not torch.compiler.is_compiling() and bool(ck.exited.all()):
                    break
        return hidden, gate_logits, attn, loops_used

    @staticmethod
    def _output(hidden, gate_logits, loops_used, attn, threshold):
        """LoopOutput of stacked per-loop hidden (R, B, T, C) and gate logits (R, B, T): Ouro's exit
        distribution and, per token, the hidden state of the loop that exit_threshold chooses."""
        exit_probs = exit_distribution(gate_logits)
        choice = exit_choice(exit_probs, threshold)                            # (B, T)
        selected = hidden.gather(0, choice[None, :, :, None].expand(1, *hidden.shape[1:])).squeeze(0)
        return LoopOutput(hidden, gate_logits, exit_probs, selected, loops_used, attn)

    def kv_layout(self, alpha):
        """Which key/value rows a forward at this alpha computes (Attention.forward): "loop" (a
        LoopLM, or shared mode at alpha=0), "shared" (MELT, alpha=1) or "both" (the transition)."""
        if self.config.cache == "loop":
            return "loop"
        return "loop" if alpha == 0.0 else "shared" if alpha == 1.0 else "both"

    def _depth(self, n_loops, exit_threshold):
        """(loops to run, exit threshold): the arguments or the config's defaults, checked."""
        R = self.config.n_loop if n_loops is None else n_loops
        q = self.config.exit_threshold if exit_threshold is None else float(exit_threshold)
        if R < 1:
            raise MeltError(f"n_loops={R} must be >= 1")
        if not 0.0 < q <= 1.0:
            raise MeltError(f"exit_threshold={q} must be in (0, 1]")
        return R, q

    def _check_cache(self, cache, B, T, R, layout):
        cfg = self.config
        if cache.layout != cfg.cache:
            raise MeltError(f"cache layout {cache.layout!r} does not match the model's cache={cfg.cache!r}")
        if cfg.cache == "shared" and layout != "shared":
            raise MeltError("a KV cache holds one layout: run with alpha=1 (MELT), or without a cache")
        if cfg.cache == "loop" and cache.k.shape[0] < R:
            raise MeltError(f"this loop cache has {cache.k.shape[0]} loop slots, n_loops={R} needs {R}")
        if cache.batch_size != B:
            raise MeltError(f"cache is for batch size {cache.batch_size}, got {B}")
        if cache.pos + T > cache.max_len:
            raise MeltError(f"prompt of {T} tokens after {cache.pos} cached ones exceeds the cache "
                            f"length {cache.max_len}: make a longer cache with new_cache()")

    def check_ids(self, idx):
        """Refuse token ids outside the vocabulary with a clear message."""
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise MeltError(f"token ids must lie in [0, {self.config.vocab_size}); got "
                            f"min {int(idx.min())}, max {int(idx.max())}")

    def loop_logits(self, out):
        """Per-loop logits (R, B, T, V) of a LoopOutput."""
        return self.lm_head(out.hidden)

    def loss(self, out, targets, kind=None):
        """Training loss of a LoopOutput against targets (B, T), -1 ignored.
            expected_logits  cross-entropy of sum_t p_t * logits_t (what released Ouro code trains)
            expected_loss    sum_t p_t * CE_t - entropy_weight * H(p) (the Ouro paper's objective)
            last             cross-entropy of the last loop's logits
        """
        kind = kind or self.config.loss
        V = self.config.vocab_size
        flat_t = targets.reshape(-1)
        if kind == "last":
            return F.cross_entropy(self.lm_head(out.hidden[-1]).float().view(-1, V), flat_t, ignore_index=-1)
        logits = self.loop_logits(out).float()              # (R, B, T, V)
        p = out.exit_probs.float()                           # (R, B, T)
        if kind == "expected_logits":
            mixed = (p.unsqueeze(-1) * logits).sum(0)        # (B, T, V)
            return F.cross_entropy(mixed.view(-1, V), flat_t, ignore_index=-1)
        R = logits.shape[0]
        ce = F.cross_entropy(logits.view(-1, V), flat_t.repeat(R), ignore_index=-1, reduction="none")
        ce = ce.view(R, -1)                                  # (R, B*T)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(0).view(-1)
        valid = (flat_t != -1).float()
        per_token = (p.view(R, -1) * ce).sum(0) - self.config.entropy_weight * entropy
        return (per_token * valid).sum() / valid.sum().clamp_min(1.0)

    # ---- DECODING: a cache, prefill, the one-token step, generate ------------------------------

    def new_cache(self, batch_size, max_seq_len=None, n_loops=None, dtype=None, device=None, start=None):
        """A preallocated KVCache for this model's layout. Loop layout: one slot per loop
        (n_loops, default config.n_loop); shared layout: one slot, whatever the loop count.
        start (B,): each row's first slot, for prompts of different lengths left-padded."""
        cfg = self.config
        max_seq_len = max_seq_len or cfg.block_size
        if max_seq_len > cfg.block_size:
            raise MeltError(f"max_seq_len={max_seq_len} exceeds block_size={cfg.block_size}")
        n_slots = (n_loops or cfg.n_loop) if cfg.cache == "loop" else 1
        p = self.lm_head.weight
        return KVCache(cfg.cache, n_slots, cfg.n_layer, batch_size, cfg.n_kv_head, max_seq_len,
                       cfg.head_dim, dtype or p.dtype, device or p.device, start=start)

    def prefill(self, idx, cache, n_loops=None, exit_threshold=None):
        """Run idx (B, c) after what the cache holds, writing its rows -> (logits of the last
        position (B, V), loops used (B, c)). The prompt, in chunks; also the eager one-token step.
        The prompts of a ragged batch (cache.start, left-padded) are prefilled one by one, so that
        each is chunked from its own first token exactly as alone, and their rows copied into it."""
        if cache.start is not None and cache.pos == 0:
            B, T = idx.shape
            logits, used = [], []
            for b in range(B):
                s = int(cache.start[b])
                one = self.new_cache(1, T - s, n_loops=n_loops, dtype=cache.k.dtype, device=cache.k.device)
                lg, u = self.prefill(idx[b:b + 1, s:], one, n_loops, exit_threshold)
                cache.k[:, :, b, :, s:T] = one.k[:, :, 0]
                cache.v[:, :, b, :, s:T] = one.v[:, :, 0]
                logits.append(lg)
                used.append(u[:, -1:])
            cache.end_chunk(T)
            return torch.cat(logits), torch.cat(used)
        out = self.run(idx, n_loops=n_loops, cache=cache, exit_threshold=exit_threshold)
        return self.lm_head(out.selected[:, -1]), out.loops_used

    @staticmethod
    def key_bucket(n, max_len, smallest=64):
        """The keys a fixed-shape decode step reads when n rows are in use: the next power of two
        from `smallest`, at most max_len (a few shapes, each compiled once)."""
        return min(max_len, max(smallest, 1 << (n - 1).bit_length()))

    def _decode_one_token(self, idx, cache_k, cache_v, position, offsets, n_keys, n_loops, exit_threshold):
        """The one-token step with every shape fixed, made to be compiled (gpt-fast): idx (B, 1) at
        `position` (KVCache.position, a (1,) tensor) writes its rows in place and attends over the
        whole preallocated cache (KVCache.k / .v), rows after it masked. Same numbers as prefill()
        of one token; nothing depends on the position as a Python number, so torch.compile traces
        it once and a GPU replays it as a CUDA graph. offsets (B,): each row's first slot (KVCache's
        start, zeros without padding). It does not advance the cache."""
        h = self.tok_emb(idx)
        B = idx.shape[0]
        store = FixedRows(cache_k, cache_v, position, n_keys)
        at = position - offsets                                                          # (B,) each row's position
        slots = torch.arange(store.max_len, device=h.device)
        ck = Chunk(store=store, layout=self.config.cache, alpha=1.0, shared_slot=0,
                   cos=self.rope_cos[at].to(h.dtype).view(B, 1, 1, -1), sin=self.rope_sin[at].to(h.dtype).view(B, 1, 1, -1),
                   mask=((slots <= position) & (slots >= offsets[:, None])).view(B, 1, 1, -1),   # (B, 1, 1, max_len)
                   is_causal=False)
        hidden, gate_logits, _, used = self._run_chunk(h, store, n_loops, 1.0, self.config.cache,
                                                       exit_threshold, False, ck=ck)
        out = self._output(torch.stack(hidden), torch.stack(gate_logits), used, None, exit_threshold)
        return self.lm_head(out.selected[:, -1]), out.loops_used

    def decode_step_fixed(self, compile=False, buckets=True):
        """The one-token decode step for generate_stream(decode_step=...): checks the cache, runs
        _decode_one_token (compiled if compile=True, once per length bucket; on a GPU as CUDA
        graphs, the cache tensors marked as static inputs so a graph may write them in place),
        advances the cache. Only this step is compiled; the prefill stays eager (gpt-fast).
        buckets=False reads the whole preallocated cache at every position (one shape)."""
        fn = self._decode_one_token
        cuda_graphs = compile and self.lm_head.weight.is_cuda
        if compile:   # one graph per (model, batch size, bucket): more than dynamo's default 8 per function
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        if cuda_graphs:
            fn = torch.compile(fn, fullgraph=True, dynamic=False, mode="reduce-overhead")
        elif compile:
            fn = torch.compile(fn, fullgraph=True, dynamic=False, options=CPU_DECODE_COMPILE_OPTIONS)

        def decode_step(idx, cache, n_loops=None, exit_threshold=None):
            R, q = self._depth(n_loops, exit_threshold)   # checked here, outside the compiled graph
            self._check_cache(cache, idx.shape[0], 1, R, self.config.cache)
            if idx.shape[1] != 1:
                raise MeltError(f"the fixed-shape decode step takes one token per sequence, got {idx.shape[1]}")
            if cuda_graphs:
                torch._dynamo.mark_static_address(cache.k)   # the graph writes these in place
                torch._dynamo.mark_static_address(cache.v)
                torch.compiler.cudagraph_mark_step_begin()
            n_keys = self.key_bucket(cache.pos + 1, cache.max_len) if buckets else cache.max_len
            logits, used = fn(idx, cache.k, cache.v, cache.position, cache.offsets, n_keys, R, q)
            cache.end_chunk(1)
            if cuda_graphs:   # a CUDA graph's outputs are overwritten by its next replay
                logits, used = logits.clone(), used.clone()
            return logits, used
        return decode_step

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, cache=None,
                        generator=None, n_loops=None, exit_threshold=None, decode_step=None):
        """Yield (next ids (B, 1), loops used per token (B,)) one step at a time: prefill the
        prompt into the cache, then decode one token at a time reusing it. decode_step replaces
        the eager prefill() for the one-token steps, e.g. decode_step_fixed(compile=True)."""
        B, T = idx.shape
        if T == 0:
            raise MeltError("empty prompt: give at least one token")
        check_sampling(temperature, top_k)   # before the prefill, not after it
        self.check_ids(idx)
        if cache is None:
            cache = self.new_cache(B, T + max_new_tokens, n_loops=n_loops)
        if cache.pos + T + max_new_tokens > cache.max_len:
            raise MeltError(f"prompt of {T} tokens + {max_new_tokens} new ones exceed the cache length "
                            f"{cache.max_len} (block_size {self.config.block_size})")
        decode_step = decode_step or self.prefill
        logits, used = self.prefill(idx, cache, n_loops, exit_threshold)
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)
            yield nxt, used[:, -1]
            if i < max_new_tokens - 1:
                logits, used = decode_step(nxt, cache, n_loops, exit_threshold)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, cache=None, generator=None,
                 n_loops=None, exit_threshold=None, decode_step=None):
        """Prompt idx (B, T) -> (B, T + max_new_tokens). temperature=0 is greedy. idx may also be a
        list of 1-D prompts of different lengths: they run as one batch (left-padded, each row's
        positions and mask its own) and come back as a list, each its prompt and its new tokens."""
        if isinstance(idx, (list, tuple)):
            padded, made = self.ragged_batch(idx, max_new_tokens, n_loops)
            cache = made if cache is None else cache   # a cache given for a ragged batch: ragged_batch's
            new = self.generate(padded, max_new_tokens, temperature, top_k, cache, generator, n_loops,
                                exit_threshold, decode_step)[:, padded.shape[1]:]
            return [torch.cat([p.to(new.device), row]) for p, row in zip(idx, new)]
        new = [t for t, _ in self.generate_stream(idx, max_new_tokens, temperature, top_k, cache,
                                                   generator, n_loops, exit_threshold, decode_step)]
        return torch.cat([idx, *new], dim=1)

    def ragged_batch(self, prompts, max_new_tokens, n_loops=None):
        """Prompts of different lengths -> (left-padded ids (B, T), a KVCache whose start says
        where each row's tokens begin), for generate_stream."""
        if not prompts or any(p.dim() != 1 or p.numel() == 0 for p in prompts):
            raise MeltError("give a non-empty list of non-empty 1-D prompts")
        T = max(p.numel() for p in prompts)
        dev = self.lm_head.weight.device
        padded = torch.zeros(len(prompts), T, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            padded[b, T - p.numel():] = p.to(dev)
        start = [T - p.numel() for p in prompts]
        return padded, self.new_cache(len(prompts), T + max_new_tokens, n_loops=n_loops, start=start)

    # ---- weights: this project's checkpoints and Ouro directories ------------------------------

    def load_weights(self, state_dict, strict_gates=False):
        """Load a state dict; shapes and names must match, except that gate parameters a
        looped checkpoint lacks (converting to shared mode) keep their documented init
        (LatentGate.reset_parameters)."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if not strict_gates:
            missing = [k for k in missing if ".gate." not in k]
        if missing or unexpected:
            raise MeltError(f"checkpoint does not fit this model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
        for k, t in state_dict.items():
            if tuple(t.shape) != tuple(own[k].shape):
                raise MeltError(f"tensor {k} has shape {tuple(t.shape)}, the model expects {tuple(own[k].shape)}")
        self.load_state_dict(state_dict, strict=False)
        return self

    @classmethod
    def from_checkpoint(cls, ckpt, **overrides):
        """The model a checkpoint of this project holds (a path or load_checkpoint's dict);
        overrides may change the non-shape fields (cache, gate, chunk_size, ...) but not the
        architecture. A loop-mode checkpoint loaded with cache="shared" gets new gate parameters
        at their documented init; so does a different gate."""
        ckpt = load_checkpoint(ckpt) if isinstance(ckpt, str) else ckpt
        saved = dict(ckpt["model_config"])
        for k in ARCH_KEYS:
            if k in overrides and overrides[k] != saved.get(k):
                raise MeltError(f"checkpoint has {k}={saved.get(k)}, the config asks for {k}={overrides[k]}: "
                                f"architecture differs (drop the override or start from scratch)")
        if "model_config_sha" in ckpt and ckpt["model_config_sha"] != config_sha(ckpt["model_config"]):
            raise MeltError("the checkpoint's model_config was changed after it was saved: its weights were "
                            "trained with another one (give changes as overrides instead)")
        saved = {k: v for k, v in saved.items() if k in MODEL_FIELDS}   # checkpoints before a field existed
        model = cls(MeltConfig(**{**saved, **overrides}))
        sd = ckpt["model"]
        if model.config.cache == "loop" or saved.get("gate") != model.config.gate:
            sd = {k: v for k, v in sd.items() if ".gate." not in k}
        return model.load_weights(sd)

    @classmethod
    def from_ouro(cls, path, dtype=None, torch_dtype=None, device="cpu", **overrides):
        """Read a local Hugging Face Ouro directory (config.json, model.safetensors or a sharded
        model.safetensors.index.json) into a MELT model. overrides are MeltConfig fields, e.g.
        cache="shared", gate="last". Weights keep the file's dtype unless dtype (or torch_dtype)
        is given. In shared mode the new gate parameters start as LatentGate.reset_parameters says.
        A sharded checkpoint is read exactly as its index says. Nothing is downloaded."""
        from safetensors import safe_open

        if not os.path.isdir(path):
            raise MeltError(f"no Ouro checkpoint directory at {path!r}")
        hf = _read_json(os.path.join(path, "config.json"), f"{path!r} has no config.json: not a Hugging Face checkpoint directory")
        config = ouro_config(hf, **overrides)
        dtype = dtype or torch_dtype
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."))

        single = os.path.join(path, "model.safetensors")
        index_path = os.path.join(path, "model.safetensors.index.json")
        try:
            if os.path.isfile(single):
                with safe_open(single, "pt") as f:
                    where = {k: single for k in f.keys()}
            elif os.path.isfile(index_path):
                weight_map = _read_json(index_path, "").get("weight_map")
                if not isinstance(weight_map, dict):
                    raise MeltError(f"{index_path!r} has no weight_map")
                where = {}
                for k, v in weight_map.items():
                    if not isinstance(v, str) or os.path.basename(v) != v:
                        raise MeltError(f"{index_path!r} names shard {v!r} for {k}: shards must be files of {path!r}")
                    where[k] = os.path.join(path, v)
            else:
                raise MeltError(f"{path!r} has neither model.safetensors nor model.safetensors.index.json")
            expected = ouro_shapes(config)
            if "lm_head.weight" not in where and hf.get("tie_word_embeddings"):
                expected.pop("lm_head.weight")
            unknown = sorted(set(where) - set(expected))
            if unknown:
                raise MeltError(f"cannot map Ouro tensors {unknown[:5]} (of {len(unknown)}) to this model")
            absent = sorted(set(expected) - set(where))
            if absent:
                raise MeltError(f"Ouro checkpoint lacks tensors {absent[:5]} (of {len(absent)})")
            hf_state = {}
            for fp in sorted(set(where.values())):
                if not os.path.isfile(fp):
                    raise MeltError(f"weight shard {fp!r} named in the index is missing")
                with safe_open(fp, "pt", device="cpu") as f:
                    have = set(f.keys())
                    for name in sorted(n for n, p in where.items() if p == fp):   # what the index says, no more
                        if name not in have:
                            raise MeltError(f"the index puts {name} in {fp!r}, which does not hold it")
                        t = f.get_tensor(name)
                        if tuple(t.shape) != expected[name]:
                            raise MeltError(f"Ouro tensor {name} has shape {tuple(t.shape)}, "
                                            f"config.json implies {expected[name]}")
                        if not torch.isfinite(t.float()).all():
                            raise MeltError(f"Ouro tensor {name} in {fp!r} holds NaN or infinite values")
                        hf_state[name] = t if dtype is None else t.to(dtype)
        except MeltError:
            raise
        except Exception as e:   # safetensors' own errors: a truncated or foreign file
            raise MeltError(f"cannot read the weights of {path!r} ({type(e).__name__}: {str(e)[:120]})") from None
        state = ouro_to_melt(hf_state, config)
        with torch.device("meta"):
            model = cls(config)
        for name, t in model.state_dict().items():   # new gate parameters: the documented init
            if name not in state:
                state[name] = torch.zeros(t.shape, dtype=state["tok_emb.weight"].dtype)
        model.load_state_dict(state, strict=True, assign=True)
        for block in model.blocks:
            if block.gate is not None:
                block.gate.reset_parameters(config.gate_bias_init)
        model._init_rope()
        return model.to(device)


def _read_json(path, missing_msg):
    if not os.path.isfile(path):
        raise MeltError(missing_msg or f"{path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise MeltError(f"{path!r} is not valid JSON ({e})") from None


def load_checkpoint(path):
    """A checkpoint of this project as a dict (weights_only: no code runs on load)."""
    if not os.path.isfile(path):
        raise MeltError(f"no checkpoint at {path!r}: it does not exist (give a checkpoint .pt of this "
                        f"project or an Ouro directory)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign pickle, a truncated file
        raise MeltError(f"{path!r} is not a readable melt checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise MeltError(f"{path!r} is not a melt checkpoint (no model / model_config inside)")
    return ckpt


def load_model(path, dtype=None, **overrides):
    """THE loader: a checkpoint .pt of this project or an Ouro directory -> (model, tokenizer
    description). overrides are MeltConfig fields (an Ouro directory loads in loop mode unless
    told otherwise). The description is the checkpoint's data_meta (data/prepare.py's
    load_tokenizer reads it), for an Ouro directory its tokenizer.json."""
    if os.path.isdir(path):
        model = MELT.from_ouro(path, dtype=dtype, **{"cache": "loop", **overrides})
        tj = os.path.join(path, "tokenizer.json")
        meta = dict(tokenizer="hf", tokenizer_json=tj, vocab_size=model.config.vocab_size) if os.path.isfile(tj) else None
        return model, meta
    ckpt = load_checkpoint(path)
    model = MELT.from_checkpoint(ckpt, **overrides)
    return (model if dtype is None else model.to(dtype)), ckpt.get("data_meta")


def ouro_shapes(cfg):
    """Every tensor name of a Hugging Face Ouro checkpoint with the shape cfg implies."""
    C, V, H = cfg.n_embd, cfg.vocab_size, cfg.mlp_hidden
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,), "lm_head.weight": (V, C),
              "model.early_exit_gate.weight": (1, C), "model.early_exit_gate.bias": (1,)}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm",
                     "post_attention_layernorm_2"):
            shapes[p + norm + ".weight"] = (C,)
        shapes.update({p + "self_attn.q_proj.weight": (q, C), p + "self_attn.k_proj.weight": (kv, C),
                       p + "self_attn.v_proj.weight": (kv, C), p + "self_attn.o_proj.weight": (C, q),
                       p + "mlp.gate_proj.weight": (H, C), p + "mlp.up_proj.weight": (H, C),
                       p + "mlp.down_proj.weight": (C, H)})
    return shapes


def ouro_to_melt(hf, cfg):
    """Hugging Face Ouro tensors -> this model's state dict. Same nn.Linear (out, in) layout;
    k/v and gate/up are stacked into kv_proj and gate_up (k's rows, then v's; gate's, then up's).
    The four sandwich norms are renamed by what they do."""
    sd = {"tok_emb.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
          "exit_gate.weight": hf["model.early_exit_gate.weight"],
          "exit_gate.bias": hf["model.early_exit_gate.bias"],
          "lm_head.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"]).clone()}
    norms = {"input_layernorm": "attn_in_norm", "input_layernorm_2": "attn_out_norm",
             "post_attention_layernorm": "mlp_in_norm", "post_attention_layernorm_2": "mlp_out_norm"}
    for i in range(cfg.n_layer):
        p, b = f"model.layers.{i}.", f"blocks.{i}."
        for theirs, ours in norms.items():
            sd[b + ours + ".weight"] = hf[p + theirs + ".weight"]
        sd[b + "attn.q_proj.weight"] = hf[p + "self_attn.q_proj.weight"]
        sd[b + "attn.kv_proj.weight"] = torch.cat((hf[p + "self_attn.k_proj.weight"],
                                                   hf[p + "self_attn.v_proj.weight"]), dim=0)
        sd[b + "attn.o_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        sd[b + "mlp.gate_up.weight"] = torch.cat((hf[p + "mlp.gate_proj.weight"],
                                                  hf[p + "mlp.up_proj.weight"]), dim=0)
        sd[b + "mlp.down_proj.weight"] = hf[p + "mlp.down_proj.weight"]
    return sd


def ouro_config(hf, **overrides):
    """MeltConfig from an Ouro config.json dict; refuses what this model does not implement."""
    if hf.get("model_type") != "ouro" and "OuroForCausalLM" not in hf.get("architectures", []):
        raise MeltError(f"config.json is not an Ouro model (model_type={hf.get('model_type')!r})")
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        raise MeltError("sliding-window attention layers are not supported")
    if hf.get("rope_scaling"):
        raise MeltError(f"rope_scaling={hf['rope_scaling']!r} is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise MeltError(f"hidden_act={hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    try:
        kw = dict(vocab_size=hf["vocab_size"], n_embd=hf["hidden_size"], mlp_hidden=hf["intermediate_size"],
                  n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                  n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                  head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                  rope_theta=float(hf.get("rope_theta", 10000.0)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                  n_loop=hf.get("total_ut_steps", 4), block_size=hf.get("max_position_embeddings", 4096),
                  exit_threshold=float(hf.get("early_exit_threshold") or 1.0))
    except KeyError as e:
        raise MeltError(f"Ouro config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise MeltError(f"Ouro config.json has a value of the wrong type ({e})") from None
    for k, v in kw.items():
        if k not in ("rope_theta", "norm_eps", "exit_threshold") and (not isinstance(v, int) or isinstance(v, bool)):
            raise MeltError(f"Ouro config.json gives {k}={v!r}, which should be an integer")
    known = {f.name for f in fields(MeltConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise MeltError(f"unknown MeltConfig fields {bad}; valid: {sorted(known)}")
    kw.update(overrides)
    return MeltConfig(**kw)


def load_ouro_tokenizer(path):
    """The tokenizer of an Ouro directory, from its tokenizer.json (Hugging Face `tokenizers`)."""
    from tokenizers import Tokenizer
    fp = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(fp):
        raise MeltError(f"{path!r} has no tokenizer.json")
    return Tokenizer.from_file(fp)


def config_sha(model_config):
    """A digest of a saved model_config dict: train.py stores it beside the config, so that a
    config edited in the file (shapes that still fit the tensors, say n_head 2 -> 4 with head_dim
    16 -> 8) is refused instead of silently computing something else."""
    import hashlib
    return hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest()

