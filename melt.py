"""
MELT: a looped transformer (Ouro's LoopLM) with either of two KV-cache layouts, in one file.

A looped language model applies one stack of n_layer decoder layers n_loop times to every token
(Ouro, arXiv 2510.25741). Where its keys and values live decides its memory:
- cache="loop"   (LoopLM / Ouro): one KV cache per (loop, layer). At loop r a token attends to the
                  loop-r keys/values of earlier tokens, so memory grows n_loop times.
- cache="shared" (MELT, arXiv 2605.07721): one KV cache per layer. Per layer and token a latent s
                  runs across the loops through a gate, s = z*s + (1-z)*x, and keys/values come
                  from s. Earlier tokens expose only their final row: a standard transformer's
                  memory whatever n_loop is. Training runs chunk-wise, as earlier tokens are final.

Read top to bottom by its tags: THE LAYOUTS, THE GATE, THE CHUNKS, THE SWEEPS, THE LOOP, THE
STORES. `naive_forward` in test_melt.py states both layouts token by token; serve/ serves the model.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

CACHE_LAYOUTS = ("loop", "shared")
GATES = ("learned", "scalar", "mean", "ema", "last", "first")
LOSSES = ("expected_logits", "expected_loss", "last")


class MeltError(ValueError):
    """A problem with the caller's input (config, checkpoint, prompt), stated in one line."""


def need(ok, msg, *args):
    """Raise MeltError(msg, formatted with args if any) unless ok; no string work unless it fails."""
    if not ok:
        raise MeltError(msg.format(*args) if args else msg)


def check_run(n_loops, exit_threshold, chunk_size, sweeps, cache, alpha=1.0, loops_name="n_loops"):
    """How deep and in what chunks a forward runs: checked here for the config and for every run."""
    need(type(n_loops) is int and n_loops >= 1, "{}={!r} must be an integer >= 1", loops_name, n_loops)
    need(0.0 < exit_threshold <= 1.0, "exit_threshold={} not in (0, 1]", exit_threshold)
    need(chunk_size >= 1, "chunk_size={} must be >= 1", chunk_size)
    need(sweeps >= 0, "sweeps={} must be >= 0", sweeps)
    need(sweeps == 0 or cache == "shared", "sweeps={} needs cache='shared' (a loop cache has no chunks)", sweeps)
    need(0.0 <= alpha <= 1.0, "alpha={} must be in [0, 1]", alpha)


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
        for f, want in self.__annotations__.items():   # MeltConfig(n_loop="4") is refused, not stored
            v = getattr(self, f)
            if want is float and type(v) is int:   # 1 means 1.0
                setattr(self, f, float(v))
            need(isinstance(getattr(self, f), want) and type(v) is not bool,
                 "bad MeltConfig: {}={!r} should be a {}", f, v, want.__name__)
        need(self.head_dim != 0 or self.n_head < 1 or self.n_embd % self.n_head == 0,
             f"bad MeltConfig: n_head={self.n_head} does not divide n_embd={self.n_embd}")
        self.head_dim = self.head_dim or self.n_embd // max(self.n_head, 1)
        self.n_kv_head = self.n_kv_head or self.n_head
        self.mlp_hidden = self.mlp_hidden or int(round(2.75 * self.n_embd))
        self.validate()

    def validate(self):
        """Raise MeltError naming the first contradiction in this config."""
        def want(ok, msg):
            need(ok, f"bad MeltConfig: {msg}")
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "n_kv_head"):
            want(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        check_run(self.n_loop, self.exit_threshold, self.chunk_size, self.sweeps, self.cache, loops_name="n_loop")
        for name, allowed in (("cache", CACHE_LAYOUTS), ("gate", GATES), ("loss", LOSSES),
                              ("sweeps_grad", ("all", "last"))):
            want(getattr(self, name) in allowed, f"{name}={getattr(self, name)!r}, expected one of {allowed}")
        want(self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        want(self.head_dim >= 2 and self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        want(0.0 < self.ema_rate <= 1.0, f"ema_rate={self.ema_rate} not in (0, 1]")
        want(self.entropy_weight >= 0 and self.norm_eps > 0 and self.rope_theta > 0 and self.init_std >= 0,
             "entropy_weight, init_std must be >= 0 and norm_eps, rope_theta > 0")
        return self


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
    """Rotate x (B, nh, T, hs) by position; tables (T, hs). The usual x * cos + cat(-x2, x1) * sin
    with cat(x2, x1) = roll(x, hs/2) and the sign in the table: three ops fewer per decode call."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


@dataclass
class Chunk:
    """The fixed facts of the chunk every layer runs on, made once per pass (MELT.chunk, or the
    decode step in serve/engine.py); what changes while it runs is passed to the layers."""
    store: "KVStore"                     # where the rows are read and written (THE STORES)
    layout: str                          # "loop", "shared" or "both" (MELT.kv_layout)
    alpha: float                         # the transition: weight of the shared rows in "both"
    shared_slot: int                     # the shared rows' slot: 0, or n_loops in the transition
    cos: torch.Tensor                    # (c, hs) RoPE tables at the chunk's positions
    sin: torch.Tensor
    mask: torch.Tensor | None            # (c, keys) bool, True = may read; None with is_causal or one token
    is_causal: bool                      # SDPA's own causal mask (a first chunk, nothing before it)


class Attention(nn.Module):
    """One attention layer, no biases (Ouro). kv_proj holds W_K's rows then W_V's (one read when
    decoding); queries have their own: in shared mode they come from x, keys/values from s."""

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

    def forward(self, x, s, r, ck, prev=None):
        """THE LAYOUTS. Attention at loop r for the chunk's normed inputs x (B, c, C); s is the
        MELT latent (shared layouts). Which key/value rows are read is the whole difference:
            loop    rows projected from x at loop r; earlier tokens' loop-r rows (slot r)
            shared  rows projected from s; earlier tokens' final rows (one slot)
            both    the transition: alpha * shared + (1 - alpha) * loop, both kept
        THE SWEEPS: prev, this layer's rows of the chunk from the previous pass (k, v), are
        appended; the mask shows each query its own current row and the earlier tokens' prev rows."""
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
        if prev is not None:   # append the previous pass's rows of the chunk: (B, nkv, P + 2c, hs)
            pk, pv = prev
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
    """THE GATE. How the MELT latent s of a layer carries from loop to loop (shared mode). x is
    the layer's normed input at this loop (what Ouro projects q/k/v from), s the latent after the
    previous loop. Loop 1 sets s = x (the paper does not say); later loops s = z*s + (1-z)*x with
        learned  z = sigmoid(x W_z + s U_z + b_z), element-wise (MELT, Eq. of Sec. 3)
        scalar   z = sigmoid(w), one learned number per layer
        mean     z = (r-1)/r at loop r (1-based): s is the running mean of the loops' x
        ema      z = 1 - ema_rate
        last     z = 0: keep the newest loop only (Ouro's decode-time reuse of the last loop)
        first    z = 1: keep loop 1 only (Mixture-of-Recursions-style recursive sharing)
    One set of parameters per layer, shared by the loops, initialised by reset_parameters only."""

    def __init__(self, cfg):
        super().__init__()
        self.kind, self.ema_rate, self.bias_init = cfg.gate, cfg.ema_rate, cfg.gate_bias_init
        if self.kind == "learned":
            self.w_z = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)   # x W_z
            self.u_z = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)   # s U_z
            self.b_z = nn.Parameter(torch.zeros(cfg.n_embd))
        elif self.kind == "scalar":
            self.w = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def reset_parameters(self):
        """W_z = U_z = 0, b_z = gate_bias_init: z = sigmoid(bias) everywhere, a fixed EMA leaning to
        the newest loop, from which the gradient still reaches W_z and U_z."""
        if self.kind == "learned":
            self.w_z.weight.zero_()
            self.u_z.weight.zero_()
            self.b_z.fill_(self.bias_init)
        elif self.kind == "scalar":
            self.w.fill_(self.bias_init)

    def forward(self, x, s, r):
        """x, s: (B, T, C); r: 0-based loop index. Returns the new s."""
        if r == 0 or self.kind == "last":
            return x
        if self.kind == "first":
            return s
        if self.kind == "learned":
            z = torch.sigmoid(self.w_z(x) + self.u_z(s) + self.b_z)
        elif self.kind == "scalar":
            z = torch.sigmoid(self.w)
        else:
            z = r / (r + 1) if self.kind == "mean" else 1.0 - self.ema_rate   # mean or ema
        return z * s + (1 - z) * x


class Block(nn.Module):
    """One decoder layer in Ouro's "sandwich" form, four RMSNorms (Ouro's input_layernorm{,_2},
    post_attention_layernorm{,_2}). In shared mode the gate updates s before keys/values are read."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.attn_in_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.attn_out_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp_in_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.mlp_out_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.gate = LatentGate(cfg) if cfg.cache == "shared" else None
        self.checkpoint_mlp = False   # training memory: recompute the MLP half, the widest activations,
                                      # in backward (not the attention half: it writes the KV store)

    def forward(self, h, s, r, ck, prev=None, exited=None):
        """h (B, c, C) at loop r, s this layer's latent -> (h, s, attention output). exited (B, c, 1):
        tokens that stopped looping keep their latent, so the row they rewrite is their final row."""
        x = self.attn_in_norm(h)
        if ck.layout != "loop":
            s_new = self.gate(x, s, r)   # THE GATE: s carries across loops, keys/values come from it
            s = s_new if exited is None else torch.where(exited, s, s_new)
        a = self.attn(x, s, r, ck, prev)
        h = h + self.attn_out_norm(a)
        h = h + (torch.utils.checkpoint.checkpoint(self.mlp_half, h, use_reentrant=False)
                 if self.checkpoint_mlp and torch.is_grad_enabled() else self.mlp_half(h))
        return h, s, a

    def mlp_half(self, h):
        return self.mlp_out_norm(self.mlp(self.mlp_in_norm(h)))


def causal_mask(n_past, n_new, device, sweep=False):
    """(n_new, keys) bool, True where a new token may read: the past and the new rows up to itself.
    sweep=True: keys [past | the chunk's current rows | its previous pass's rows] (THE SWEEPS), a
    token reading its own current row and the earlier tokens' previous rows. None: no mask needed."""
    if sweep:
        own = torch.eye(n_new, dtype=torch.bool, device=device)
        before = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril(-1)
        past = torch.ones(n_new, n_past, dtype=torch.bool, device=device)
        return torch.cat((past, own, before), dim=1)
    if n_new == 1:
        return None
    return torch.ones(n_new, n_past + n_new, dtype=torch.bool, device=device).tril(n_past)


# -----------------------------------------------------------------------------
# the model

@dataclass
class LoopOutput:
    """What one pass of the looped model computed (all tensors for the positions passed in)."""
    hidden: torch.Tensor        # (R, B, T, C) each loop's output, after the final norm
    gate_logits: torch.Tensor   # (R, B, T) the early-exit gate before its sigmoid, per loop
    exit_probs: torch.Tensor    # (R, B, T) Ouro's exit distribution p_t
    selected: torch.Tensor      # (B, T, C) hidden of the loop chosen by exit_threshold
    loops_used: torch.Tensor    # (B, T) loops actually computed for each token
    attn: list                  # attn[t][l] (B, T, C): attention output of layer l at loop t, or None


@dataclass
class ChunkOutput:
    """Every loop of one chunk (MELT.run_chunk), before the chunks are put together."""
    hidden: list                # per loop run, (B, c, C)
    gate_logits: list           # per loop run, (B, c)
    attn: list                  # per loop run, per layer (B, c, C); empty unless collected
    loops_used: torch.Tensor    # (B, c)


class MELT(nn.Module):
    """The looped language model: tok_emb, n_layer Blocks run n_loop times (the final norm and the
    exit gate after every loop), lm_head. cache="loop" is a LoopLM (Ouro; n_loop=1 a standard
    transformer), cache="shared" MELT. forward() trains; run() returns every loop (LoopOutput)."""

    def __init__(self, config):
        super().__init__()
        self.config = cfg = config.validate()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)   # no scaling (Ouro)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)              # applied after every loop
        self.exit_gate = nn.Linear(cfg.n_embd, 1, bias=True)       # lambda_t = sigmoid(exit_gate(h_t))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)   # untied from tok_emb
        self.init_rope()
        self.apply(self._init_weights)

    def init_rope(self, device=None):
        cos, sin = rope_tables(self.config.head_dim, self.config.block_size, self.config.rope_theta)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def _init_weights(self, module):
        # apply() visits a gate's own matrices before the gate: the gate's reset comes last
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, LatentGate):
            module.reset_parameters()

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

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
        """The looped forward pass on token ids idx (B, T) -> LoopOutput. cache: a KVCache holding
        the earlier tokens, or None (position 0, nothing kept). alpha: the transition's weight of
        the shared layout (default 1, MELT). exit_threshold below 1: tokens stop looping (shared
        mode). collect_attn: every layer's attention output at every loop (distillation). The
        rest default to the config; chunk_size=1 is decode semantics."""
        cfg = self.config
        R = cfg.n_loop if n_loops is None else n_loops
        threshold = cfg.exit_threshold if exit_threshold is None else float(exit_threshold)
        alpha = 1.0 if alpha is None else float(alpha)
        chunk = cfg.chunk_size if chunk_size is None else chunk_size
        sweeps = cfg.sweeps if sweeps is None else sweeps
        if not torch.compiler.is_compiling():
            if not (isinstance(idx, torch.Tensor) and idx.dim() == 2 and idx.dtype in (torch.int64, torch.int32)):
                raise MeltError(f"token ids must be a (batch, length) tensor of int64, got "
                                f"{tuple(getattr(idx, 'shape', ())) or type(idx).__name__} {getattr(idx, 'dtype', '')}")
            check_run(R, threshold, chunk, sweeps, cfg.cache, alpha)
        B, T = idx.shape
        layout = self.kv_layout(alpha)
        store = TrainHistory() if cache is None else cache
        if cache is not None:
            cache.check(self, B, T, R, layout)
        need(store.pos + T <= cfg.block_size, "positions up to {} exceed block_size={}", store.pos + T - 1, cfg.block_size)
        # THE CHUNKS. Loop mode needs none: at loop r a token reads earlier tokens' loop-r rows,
        # which a causal mask over the whole sequence already gives. Shared mode reads earlier
        # tokens' *final* rows, which exist only once their chunk has run all its loops.
        if layout == "loop":
            chunk, sweeps = T, 0
        emb = self.tok_emb(idx)   # (B, T, C)
        parts = [self.run_chunk(emb[:, i:i + chunk], store, R, alpha, threshold, collect_attn, sweeps)
                 for i in range(0, T, chunk)]          # chunks in sequence, tokens within in parallel
        return self.output(parts, R, threshold, collect_attn)

    def chunk(self, store, c, R, alpha, device, dtype, sweep=False):
        """The Chunk of c tokens after store.pos (variable shapes: training, prefill)."""
        pos, layout = store.pos, self.kv_layout(alpha)
        slot = R if layout == "both" else 0
        if store.start is not None:   # a ragged batch: per-row positions and masks (serve/engine.py)
            from serve.engine import ragged_chunk
            return ragged_chunk(self, store, c, layout, alpha, slot, device, dtype, sweep)
        return Chunk(store, layout, alpha, slot, cos=self.rope_cos[pos:pos + c].to(dtype),
                     sin=self.rope_sin[pos:pos + c].to(dtype),
                     mask=causal_mask(pos, c, device, sweep) if pos > 0 or sweep else None,
                     is_causal=c > 1 and pos == 0 and not sweep)   # c first: a plain bool under compile

    def run_chunk(self, h, store, n_loops, alpha, threshold, collect_attn=False, sweeps=0, ck=None):
        """Every loop of one chunk h (B, c, C) of embeddings, earlier chunks in store -> ChunkOutput.
        ck: the Chunk, made here unless given (the fixed-shape decode step makes its own).

        THE SWEEPS. Inside a chunk, tokens read each other's current-loop rows, which never exist
        when decoding (earlier tokens are final there). sweeps=k re-runs the chunk k times more,
        each token reading its earlier neighbours' final rows from the pass before (and its own
        current row): after pass j the first j+1 tokens are exact, sweeps >= c-1 is decode
        semantics (a Jacobi iteration). sweeps_grad="all" trains through every pass, so a token's
        loss trains the rows its neighbours wrote for it; "last" runs the earlier passes without
        gradient (cheaper; those rows train through their own tokens' losses only).

        THE LOOP. Adaptive depth (threshold < 1) saves compute only in shared mode: an exited token
        keeps its hidden state, latent and KV row, which later tokens read. In loop mode earlier
        tokens need a row at every loop: all loops run, and the exit is chosen after (output)."""
        B, c, _ = h.shape
        ck = ck or self.chunk(store, c, n_loops, alpha, h.device, h.dtype)
        sweeps = sweeps if c > 1 and ck.layout != "loop" else 0
        h0, prev = h, [None] * len(self.blocks)
        for j in range(sweeps + 1):
            if j == 1:   # from the second pass on: the previous pass's rows appended, their own mask
                ck = self.chunk(store, c, n_loops, alpha, h.device, h.dtype, sweep=True)
            if j > 0:
                prev = [store.chunk_rows(ck.shared_slot, l) for l in range(len(self.blocks))]
            detached = j < sweeps and self.config.sweeps_grad == "last"
            with torch.set_grad_enabled(torch.is_grad_enabled() and not detached):
                h, exited = h0, None
                s = [None] * len(self.blocks)   # the MELT latent of each layer, carried across loops
                out = ChunkOutput([], [], [], torch.zeros(B, c, dtype=torch.long, device=h.device))
                for r in range(n_loops):
                    attn_r = []
                    for l, block in enumerate(self.blocks):
                        h_new, s[l], a = block(h, s[l], r, ck, prev[l], exited)
                        h = h_new if exited is None else torch.where(exited, h, h_new)
                        attn_r.append(a)
                    # Ouro: the final norm's output is the next loop's input (an exited token's stays)
                    h = self.norm(h) if exited is None else torch.where(exited, out.hidden[-1], self.norm(h))
                    out.hidden.append(h)
                    out.gate_logits.append(self.exit_gate(h).squeeze(-1))   # (B, c)
                    if collect_attn:
                        out.attn.append(attn_r)
                    out.loops_used = out.loops_used + (1 if exited is None else (~exited[..., 0]).long())
                    if ck.layout == "shared" and threshold < 1.0 and r < n_loops - 1:
                        cum = exit_distribution(torch.stack(out.gate_logits).float(), final=False).cumsum(0)[-1]
                        exited = (cum >= threshold).unsqueeze(-1)   # (B, c, 1)
                        # a compiled step cannot branch on data: it runs every loop, exited tokens
                        # frozen by the torch.where calls (same numbers, no compute saved)
                        if not torch.compiler.is_compiling() and bool(exited.all()):
                            break
        store.end_chunk(c)
        return out

    def output(self, parts, R, threshold, collect_attn=False):
        """LoopOutput of the chunks: Ouro's exit distribution and, per token, the hidden state of
        the loop exit_threshold chooses (a chunk that exited early repeats its exit state to R)."""
        if len({len(p.hidden) for p in parts}) > 1:
            for p in parts:
                p.hidden += [p.hidden[-1]] * (R - len(p.hidden))
                p.gate_logits += [p.gate_logits[-1]] * (R - len(p.gate_logits))
        hidden = torch.cat([torch.stack(p.hidden) for p in parts], dim=2)             # (R', B, T, C)
        gate_logits = torch.cat([torch.stack(p.gate_logits) for p in parts], dim=2)   # (R', B, T)
        loops_used = torch.cat([p.loops_used for p in parts], dim=1)                  # (B, T)
        attn = [[torch.cat([p.attn[t][l] for p in parts], dim=1) for l in range(self.config.n_layer)]
                for t in range(len(parts[0].attn))] if collect_attn else None
        exit_probs = exit_distribution(gate_logits)
        choice = exit_choice(exit_probs, threshold)                            # (B, T)
        selected = hidden.gather(0, choice[None, :, :, None].expand(1, *hidden.shape[1:])).squeeze(0)
        return LoopOutput(hidden, gate_logits, exit_probs, selected, loops_used, attn)

    def kv_layout(self, alpha):
        """The rows a forward at this alpha computes: "loop", "shared" or "both" (the transition)."""
        loop = self.config.cache == "loop" or alpha == 0.0
        return "loop" if loop else "shared" if alpha == 1.0 else "both"

    def check_ids(self, idx):
        """Refuse token ids outside the vocabulary with a clear message (a sync: not per step)."""
        lo, hi = (int(idx.min()), int(idx.max())) if idx.numel() else (0, 0)
        need(0 <= lo and hi < self.config.vocab_size, "token ids must lie in [0, {}); got min {}, max {}",
             self.config.vocab_size, lo, hi)

    def loop_logits(self, out):
        """Per-loop logits (R, B, T, V) of a LoopOutput."""
        return self.lm_head(out.hidden)

    def loss(self, out, targets):
        """Training loss of a LoopOutput against targets (B, T), -1 ignored.
            expected_logits  cross-entropy of sum_t p_t * logits_t (what released Ouro code trains)
            expected_loss    sum_t p_t * CE_t - entropy_weight * H(p) (the Ouro paper's objective)
            last             cross-entropy of the last loop's logits"""
        kind = self.config.loss
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
        ce = F.cross_entropy(logits.view(-1, V), flat_t.repeat(R), ignore_index=-1,
                             reduction="none").view(R, -1)   # (R, B*T)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(0).view(-1)
        valid = (flat_t != -1).float()
        per_token = (p.view(R, -1) * ce).sum(0) - self.config.entropy_weight * entropy
        return (per_token * valid).sum() / valid.sum().clamp_min(1.0)

    def kv_bytes_per_token(self, n_loops=None, dtype=None):
        """KV-cache bytes one token costs: those of a one-token cache (new_cache), made on the meta
        device, where nothing is allocated."""
        return self.new_cache(1, 1, n_loops, dtype, "meta").nbytes

    # ---- weights in: serve/checkpoint.py (this project's checkpoints), serve/ouro.py ------------

    @classmethod
    def from_checkpoint(cls, ckpt, **overrides):   # a path or its dict; overrides: cache, gate, chunk_size, ...
        from serve.checkpoint import model_from_checkpoint
        return model_from_checkpoint(ckpt, **overrides)

    @classmethod
    def from_ouro(cls, path, **options):   # a Hugging Face Ouro directory; dtype, device, MeltConfig overrides
        from serve.ouro import from_ouro
        return from_ouro(path, **options)

    # ---- eager decoding: new_cache, prefill (the prompt or one token); the loops in serve/engine.py

    def new_cache(self, batch_size, max_seq_len=None, n_loops=None, dtype=None, device=None, start=None):
        """A preallocated KVCache: one slot per loop (n_loops) in the loop layout, one whatever the
        loops in the shared layout. start (B,): each row's first slot (left-padded prompts)."""
        cfg = self.config
        max_seq_len = max_seq_len or cfg.block_size
        need(max_seq_len <= cfg.block_size, f"max_seq_len={max_seq_len} exceeds block_size={cfg.block_size}")
        n_slots = (n_loops or cfg.n_loop) if cfg.cache == "loop" else 1
        p = self.lm_head.weight
        return KVCache(cfg.cache, n_slots, cfg.n_layer, batch_size, cfg.n_kv_head, max_seq_len,
                       cfg.head_dim, dtype or p.dtype, device or p.device, start=start)

    def prefill(self, idx, cache, n_loops=None, exit_threshold=None):
        """Run idx (B, c) after what the cache holds, writing its rows -> (last position's logits
        (B, V), loops used (B, c)). A ragged batch's prompts are prefilled each alone."""
        if cache.start is not None and cache.pos == 0:
            from serve.engine import prefill_ragged
            return prefill_ragged(self, idx, cache, n_loops, exit_threshold)
        out = self.run(idx, n_loops=n_loops, cache=cache, exit_threshold=exit_threshold)
        return self.lm_head(out.selected[:, -1]), out.loops_used

    def generate(self, idx, max_new_tokens, *args, **kwargs):
        """Prompt idx (B, T) -> (B, T + max_new_tokens), temperature 0 greedy; a list of 1-D prompts
        of different lengths -> a list, each its prompt and new tokens (one ragged batch)."""
        from serve.engine import generate
        return generate(self, idx, max_new_tokens, *args, **kwargs)

    def generate_stream(self, idx, max_new_tokens, *args, **kwargs):   # yields (ids (B, 1), loops used (B,))
        from serve.engine import generate_stream
        return generate_stream(self, idx, max_new_tokens, *args, **kwargs)

    def decode_step_fixed(self, compile=False, buckets=True):   # fixed shapes: compiled, CUDA graphs on a GPU
        from serve.engine import decode_step_fixed
        return decode_step_fixed(self, compile, buckets)


# -----------------------------------------------------------------------------
# the exit distribution

def exit_distribution(gate_logits, final=True):
    """Ouro's p_t = lambda_t * prod_{j<t}(1 - lambda_j), the last loop taking the remainder.
    gate_logits: (R, ...) -> p: (R, ...). Same order of operations as the reference code.
    final=False: the loops so far of a run that may go on (no loop takes the remainder)."""
    lam = torch.sigmoid(gate_logits)
    remaining, p = torch.ones_like(lam[0]), []
    for lam_t in lam[:-1] if final else lam:
        p.append(lam_t * remaining)
        remaining = remaining * (1.0 - lam_t)
    return torch.stack(p + [remaining] if final else p)


def exit_choice(exit_probs, threshold):
    """Index of the first loop whose cumulative exit probability reaches threshold, else the
    last loop (Ouro's early_exit_threshold rule). (R, B, T) -> (B, T) int64."""
    reached = exit_probs.cumsum(0) >= threshold
    choice = reached.float().argmax(0)
    return torch.where(reached.any(0), choice, torch.full_like(choice, exit_probs.shape[0] - 1))


# -----------------------------------------------------------------------------
# THE STORES: where a layer's key/value rows live

class KVStore:
    """The one interface between the layers and their key/value rows. A slot is a loop index in
    the loop layout (slot r: every token's loop-r rows), 0 in the shared layout. Implementations:
    KVCache (inference), TrainHistory (training), FixedRows (the compiled step's, serve/engine.py).
        rows(slot, layer, k, v)  write the chunk's rows k, v (B, nkv, c, hs); return every row of
                                 (slot, layer) its queries may read, earlier tokens' first
        chunk_rows(slot, layer)  the chunk's rows as last written (THE SWEEPS read them)
        end_chunk(n)             the chunk's n tokens are done; pos, the tokens before it, grows
        start                    None, or (B,) each row's first slot in a left-padded batch of
                                 prompts of different lengths (KVCache)"""

    start = None


class KVCache(KVStore):
    """Preallocated keys/values for inference, passed into the model, never stored on it.
    k, v: (n_slots, n_layer, B, n_kv_head, max_len, head_dim), keys after RoPE; n_slots = n_loop
    in the loop layout (LoopLM), 1 in the shared layout (MELT: while a chunk runs its current rows,
    after its last loop its final rows). pos: tokens in the cache, advanced by end_chunk() only;
    position: the same as a (1,) tensor, which the compiled decode step reads instead of a number."""

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

    def check(self, model, B, T, R, layout):
        """Refuse a run of T tokens, batch B, R loops that this cache cannot hold, in one line."""
        cfg = model.config
        need(self.layout == cfg.cache, "cache layout {!r} does not match the model's cache={!r}", self.layout, cfg.cache)
        need(cfg.cache == "loop" or layout == "shared",
             "a KV cache holds one layout: run with alpha=1 (MELT), or without a cache")
        need(cfg.cache == "shared" or self.k.shape[0] >= R, "this loop cache has {} loop slots, n_loops={} needs {}",
             self.k.shape[0], R, R)
        need(self.batch_size == B, "cache is for batch size {}, got {}", self.batch_size, B)
        need(self.pos + T <= self.max_len, "prompt of {} tokens after {} cached ones exceeds the cache length {}: "
             "make a longer cache with new_cache()", T, self.pos, self.max_len)

    def clone(self):
        """An independent copy at the same position (e.g. to branch generation from one prompt)."""
        dup = KVCache(self.layout, *self.k.shape, self.k.dtype, self.k.device, start=self.start)
        dup.k.copy_(self.k)
        dup.v.copy_(self.v)
        dup.end_chunk(self.pos)
        return dup


class TrainHistory(KVStore):
    """The training-time store: earlier chunks' rows kept as autograd tensors (concatenated, not
    written in place) so that gradients flow through them. Slots are dict keys: the transition
    holds both layouts (loop slots 0..R-1, the shared slot R)."""

    def __init__(self):
        self.past, self.current, self.pos = {}, {}, 0

    def rows(self, slot, layer, k, v):
        self.current[slot, layer] = (k, v)   # in shared mode the last loop's write is the final row
        return self.after_past((slot, layer), k, v)

    def after_past(self, key, k, v):
        """The earlier chunks' rows of slot and layer `key`, then k, v (B, nkv, c, hs)."""
        if key not in self.past:
            return k, v
        pk, pv = self.past[key]
        return torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)

    def chunk_rows(self, slot, layer):
        return self.current[slot, layer]

    def end_chunk(self, n_tokens):
        self.past.update({key: self.after_past(key, k, v) for key, (k, v) in self.current.items()})
        self.current = {}
        self.pos += n_tokens


def load_model(path, dtype=None, **overrides):
    """A checkpoint .pt of this project or an Ouro directory -> (model, tokenizer description)."""
    from serve.checkpoint import load_model
    return load_model(path, dtype=dtype, **overrides)
