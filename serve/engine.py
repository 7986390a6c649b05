"""
The decoding engine beside the model (nanochat's engine.py, gpt-fast's generate.py): the
fixed-shape one-token step that torch.compile traces once per length bucket and a GPU replays as
a CUDA graph, batches of prompts of different lengths, sampling, and the decode loop around the
model's eager step (new_cache and prefill, in melt.py): what model.generate, generate_stream and
decode_step_fixed call.
"""

import torch
import torch.nn.functional as F

from melt import Chunk, KVStore, MeltError, causal_mask, check_run, need

# torch.compile options for the one-token decode step on a CPU: inductor writes each one-row
# product as its own vectorised loop over the threads (decompose_mm_pass) instead of calling BLAS's
# single-threaded matrix-vector product, and the step's glue in C++ (cpp_wrapper). Measured in
# RESULTS.md (bench/decode_speed.py).
CPU_DECODE_COMPILE_OPTIONS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}, "cpp_wrapper": True}


def check_sampling(temperature, top_k):
    """Refuse sampling settings that mean nothing, with a clear message."""
    if not (temperature >= 0):
        raise MeltError(f"temperature={temperature} must be >= 0")
    if not (top_k is None or top_k >= 1):
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


class FixedRows(KVStore):
    """The decode-time view of a KVCache with every shape fixed, for torch.compile and CUDA graphs
    (gpt-fast's design): rows() writes the token's row at `pos`, a (1,) int64 tensor, and returns
    the first n_keys rows of the preallocated (slot, layer) block, n_keys a length bucket past pos
    (key_bucket); the attention mask hides the rows after pos. So the compiled step sees the same
    shapes at every position of a bucket and is traced once per bucket, while its attention reads
    the rows in use, not the whole cache. The caller advances the KVCache."""

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


def key_bucket(n, max_len, smallest=64):
    """The keys a fixed-shape decode step reads when n rows are in use: the next power of two
    from `smallest`, at most max_len (a few shapes, each compiled once)."""
    return min(max_len, max(smallest, 1 << (n - 1).bit_length()))


def decode_one_token(model, idx, cache_k, cache_v, position, offsets, n_keys, n_loops, exit_threshold):
    """The one-token step with every shape fixed, made to be compiled (gpt-fast): idx (B, 1) at
    `position` (KVCache.position, a (1,) tensor) writes its rows in place and attends over the
    first n_keys rows of the preallocated cache (KVCache.k / .v), rows after it masked. Same
    numbers as model.prefill() of one token; nothing depends on the position as a Python number,
    so torch.compile traces it once per bucket and a GPU replays it as a CUDA graph. offsets (B,):
    each row's first slot (KVCache's start, zeros without padding). It does not advance the cache."""
    h = model.tok_emb(idx)
    B = idx.shape[0]
    store = FixedRows(cache_k, cache_v, position, n_keys)
    at = position - offsets                                                          # (B,) each row's position
    slots = torch.arange(store.max_len, device=h.device)
    ck = Chunk(store, model.config.cache, alpha=1.0, shared_slot=0,
               cos=model.rope_cos[at].to(h.dtype).view(B, 1, 1, -1), sin=model.rope_sin[at].to(h.dtype).view(B, 1, 1, -1),
               mask=((slots <= position) & (slots >= offsets[:, None])).view(B, 1, 1, -1),   # (B, 1, 1, n_keys)
               is_causal=False)
    part = model.run_chunk(h, store, n_loops, 1.0, exit_threshold, ck=ck)
    out = model.output([part], n_loops, exit_threshold)
    return model.lm_head(out.selected[:, -1]), out.loops_used


def decode_step_fixed(model, compile=False, buckets=True):
    """The one-token decode step for generate_stream(decode_step=...): checks the cache, runs
    decode_one_token (compiled if compile=True, once per length bucket; on a GPU as CUDA graphs,
    the cache tensors marked as static inputs so a graph may write them in place), advances the
    cache. Only this step is compiled; the prefill stays eager (gpt-fast). buckets=False reads
    the whole preallocated cache at every position (one shape)."""
    def fn(*args):
        return decode_one_token(model, *args)
    cuda_graphs = compile and model.lm_head.weight.is_cuda
    if compile:   # one graph per (model, batch size, bucket): more than dynamo's default 8 per function
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if cuda_graphs:
        fn = torch.compile(fn, fullgraph=True, dynamic=False, mode="reduce-overhead")
    elif compile:
        fn = torch.compile(fn, fullgraph=True, dynamic=False, options=CPU_DECODE_COMPILE_OPTIONS)

    def decode_step(idx, cache, n_loops=None, exit_threshold=None):
        R = model.config.n_loop if n_loops is None else n_loops
        threshold = model.config.exit_threshold if exit_threshold is None else float(exit_threshold)
        check_run(R, threshold, 1, 0, model.config.cache)   # checked here, outside the compiled graph
        cache.check(model, idx.shape[0], 1, R, model.config.cache)
        if not (idx.shape[1] == 1):
            raise MeltError(f"the fixed-shape decode step takes one token per sequence, got {idx.shape[1]}")
        if cuda_graphs:
            torch._dynamo.mark_static_address(cache.k)   # the graph writes these in place
            torch._dynamo.mark_static_address(cache.v)
            torch.compiler.cudagraph_mark_step_begin()
        n_keys = key_bucket(cache.pos + 1, cache.max_len) if buckets else cache.max_len
        logits, used = fn(idx, cache.k, cache.v, cache.position, cache.offsets, n_keys, R, threshold)
        cache.end_chunk(1)
        if cuda_graphs:   # a CUDA graph's outputs are overwritten by its next replay
            logits, used = logits.clone(), used.clone()
        return logits, used
    return decode_step


# ---- ragged batches: prompts of different lengths in one batch --------------------------------

def pad_prompts(model, prompts):
    """Prompts of different lengths -> (left-padded ids (B, T) on the model's device, each row's
    first slot (B,))."""
    need(isinstance(prompts, (list, tuple)) and len(prompts) > 0
         and all(isinstance(p, torch.Tensor) and p.dim() == 1 and p.numel() > 0 for p in prompts),
         "give a non-empty list of non-empty 1-D prompts")
    T = max(p.numel() for p in prompts)
    dev = model.lm_head.weight.device
    padded = torch.zeros(len(prompts), T, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        padded[b, T - p.numel():] = p.to(dev)
    return padded, [T - p.numel() for p in prompts]


def ragged_batch(model, prompts, max_new_tokens, n_loops=None):
    """Prompts of different lengths -> (left-padded ids (B, T), a KVCache whose start says where
    each row's tokens begin), for generate_stream."""
    padded, start = pad_prompts(model, prompts)
    return padded, model.new_cache(len(prompts), padded.shape[1] + max_new_tokens, n_loops=n_loops, start=start)


def ragged_chunk(model, store, c, layout, alpha, slot, device, dtype, sweep=False):
    """MELT.chunk for a ragged batch (store.start): each row's positions count from its own first
    token, and its queries never read the padding before it."""
    pos = store.pos
    at = (torch.arange(pos, pos + c, device=device)[None] - store.start[:, None]).clamp_min(0)   # (B, c)
    key_slot = torch.arange(pos + c, device=device)            # the cache slot of each key column
    if sweep:
        key_slot = torch.cat((key_slot, torch.arange(pos, pos + c, device=device)))
    mask = causal_mask(pos, c, device, sweep)
    mask = torch.ones(c, len(key_slot), dtype=torch.bool, device=device) if mask is None else mask
    mask = mask & (key_slot[None] >= store.start[:, None]).unsqueeze(1)                # (B, c, keys)
    return Chunk(store, layout, alpha, slot, cos=model.rope_cos[at].to(dtype).unsqueeze(1),
                 sin=model.rope_sin[at].to(dtype).unsqueeze(1), mask=mask.unsqueeze(1),    # (B, 1, c, keys)
                 is_causal=False)


def prefill_ragged(model, idx, cache, n_loops=None, exit_threshold=None):
    """model.prefill of a ragged batch (cache.start, left-padded): each prompt is prefilled alone,
    so that it is chunked from its own first token exactly as alone, and its rows copied in."""
    B, T = idx.shape
    logits, used = [], []
    for b in range(B):
        first = int(cache.start[b])
        one = model.new_cache(1, T - first, n_loops=n_loops, dtype=cache.k.dtype, device=cache.k.device)
        lg, u = model.prefill(idx[b:b + 1, first:], one, n_loops, exit_threshold)
        cache.k[:, :, b, :, first:T] = one.k[:, :, 0]   # (slots, layers, nkv, T - first, hs)
        cache.v[:, :, b, :, first:T] = one.v[:, :, 0]
        logits.append(lg)
        used.append(u[:, -1:])
    cache.end_chunk(T)
    return torch.cat(logits), torch.cat(used)


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, cache=None, generator=None,
                    n_loops=None, exit_threshold=None, decode_step=None):
    """model.generate_stream: prefill the prompt into the cache, then decode one token at a time
    reusing it; decode_step replaces the eager model.prefill for the one-token steps."""
    model.check_ids(idx)
    B, T = idx.shape
    need(T > 0, "empty prompt: give at least one token")
    check_sampling(temperature, top_k)   # before the prefill, not after it
    need(isinstance(max_new_tokens, int) and max_new_tokens >= 1, f"max_new_tokens={max_new_tokens!r} must be >= 1")
    if cache is None:
        cache = model.new_cache(B, T + max_new_tokens, n_loops=n_loops)
    need(cache.pos + T + max_new_tokens <= cache.max_len,
         f"prompt of {T} tokens + {max_new_tokens} new ones exceed the cache length "
         f"{cache.max_len} (block_size {model.config.block_size})")
    decode_step = decode_step or model.prefill
    logits, used = model.prefill(idx, cache, n_loops, exit_threshold)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, generator)
        yield nxt, used[:, -1]
        if i < max_new_tokens - 1:
            logits, used = decode_step(nxt, cache, n_loops, exit_threshold)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, cache=None, generator=None,
             n_loops=None, exit_threshold=None, decode_step=None):
    """model.generate: a (B, T) prompt -> (B, T + max_new_tokens); a list of prompts -> a list."""
    if isinstance(idx, (list, tuple)):
        return generate_ragged(model, idx, max_new_tokens, temperature, top_k, cache, generator, n_loops,
                               exit_threshold, decode_step)
    new = [t for t, _ in generate_stream(model, idx, max_new_tokens, temperature, top_k, cache, generator,
                                         n_loops, exit_threshold, decode_step)]
    return torch.cat([idx, *new], dim=1)


def generate_ragged(model, prompts, max_new_tokens, temperature=1.0, top_k=None, cache=None, generator=None,
                    n_loops=None, exit_threshold=None, decode_step=None):
    """model.generate of a list of 1-D prompts: one left-padded batch, each row with its own
    positions and mask -> a list, each its prompt and its new tokens. A cache given must be the
    one ragged_batch made for these prompts."""
    padded, start = pad_prompts(model, prompts)
    if cache is None:
        cache = model.new_cache(len(prompts), padded.shape[1] + max_new_tokens, n_loops=n_loops, start=start)
    need(cache.start is not None and cache.start.tolist() == start,
         "a cache for a ragged batch must come from ragged_batch() of the same prompts")
    new = model.generate(padded, max_new_tokens, temperature, top_k, cache, generator, n_loops,
                         exit_threshold, decode_step)[:, padded.shape[1]:]
    return [torch.cat([p.to(new.device), row]) for p, row in zip(prompts, new)]
