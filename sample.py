"""
Sample from a checkpoint of this project or an Ouro directory.

    python sample.py --init_from=out/ckpt.pt --start="ROMEO:" --num_samples=2
    python sample.py --init_from=out/ckpt.pt --cache=shared --gate=last        # zero-shot shared cache
    python sample.py --init_from=out/ckpt.pt --exit_threshold=0.9              # adaptive depth
    python sample.py --init_from=/path/to/Ouro-1.4B-Thinking --chat=True --start="What is 7*8?"
    python sample.py --start=FILE:prompt.txt
    python sample.py --prompts=prompts.txt            # one prompt a line, all in one batch
    python sample.py --num_samples=8 --batch=True     # eight samples of one prompt at once

--cache, --gate, --chunk_size and --exit_threshold override the model's config (so one LoopLM
checkpoint can be sampled with its own per-loop cache or a shared one); --n_loops changes the
depth. The last line printed is the run's statistics.
"""

import os
import resource
import sys
import time
from dataclasses import dataclass

import torch

from config import ConfigError, parse_config, run_cli
from data.prepare import load_tokenizer
from serve.checkpoint import load_model
from serve.engine import check_sampling, ragged_batch
from serve.ouro import load_ouro_tokenizer
from serve.runtime import pick_device, pick_dtype, set_threads


@dataclass
class SampleConfig:
    init_from: str = "out/ckpt.pt"   # a checkpoint of this project or an Ouro directory
    start: str = "\n"                # the prompt, or FILE:path to read it from a file
    num_samples: int = 1             # samples, one after another (or all at once with batch=True)
    batch: bool = False              # generate the num_samples samples, or the prompts' lines, as one batch
    prompts: str = ""                # a file with one prompt per line: all generated as one ragged batch
    max_new_tokens: int = 300        # tokens generated per sample
    temperature: float = 0.8         # 0 is greedy
    top_k: int = 200                 # sample among the k likeliest tokens (>= 1)
    seed: int = 1337
    n_loops: int = 0                 # loops per token; 0 means the model's n_loop
    chat: bool = False               # Ouro: wrap the prompt in its chat template, stop at <|im_end|>
    stream: bool = True              # print tokens as they come
    device: str = "auto"             # "auto", "cpu", "cuda", ...
    dtype: str = "auto"              # "auto": bfloat16 on GPU, float32 on CPU
    compile: bool = False            # torch.compile the one-token decode step (CUDA graphs on a GPU)
    threads: int = 0                 # CPU threads; 0 leaves torch's default


def load_model_and_tokenizer(path, overrides):
    """(model, encode, decode, stop token ids, Ouro tokenizer or None) for a checkpoint .pt or an
    Ouro directory (melt.load_model)."""
    model, meta = load_model(path, **{k: v for k, v in overrides.items() if k != "block_size"})
    if overrides.get("block_size", 0) > model.config.block_size:
        raise ConfigError(f"block_size={overrides['block_size']} is beyond the model's context of "
                          f"{model.config.block_size} tokens: it was never trained (or built) for more")
    if "block_size" in overrides:
        model.config.block_size = overrides["block_size"]
    if meta is None:
        raise ConfigError(f"{path!r} holds no tokenizer description (data_meta or tokenizer.json)")
    tok = load_tokenizer(meta)
    hf_tok = load_ouro_tokenizer(path) if os.path.isdir(path) else None
    stop = ([i for i in (hf_tok.token_to_id("<|endoftext|>"),) if i is not None] if hf_tok else
            [50256] if meta["tokenizer"] == "gpt2" else [])
    def encode(text):
        try:
            return tok.encode(text)
        except ValueError as e:   # a character vocabulary without some of the prompt's characters
            raise ConfigError(f"the prompt cannot be encoded: {e}") from None
    return model, encode, tok.decode, stop, hf_tok


def main(argv):
    cfg, overrides = parse_config(argv, SampleConfig)
    check_sampling(cfg.temperature, cfg.top_k)
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    dtype = getattr(torch, pick_dtype(cfg.dtype, device))
    if cfg.max_new_tokens < 1 or cfg.num_samples < 1 or cfg.n_loops < 0:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} and num_samples={cfg.num_samples} must be >= 1, "
                          f"n_loops={cfg.n_loops} >= 0 (0: the model's)")
    model, encode, decode, stop, hf_tok = load_model_and_tokenizer(cfg.init_from, overrides)
    model.to(device=device, dtype=dtype).eval()
    mc = model.config

    prompt = cfg.start
    if prompt.startswith("FILE:"):
        with open(prompt[5:], encoding="utf-8") as f:
            prompt = f.read()
    if cfg.chat:
        if hf_tok is None or hf_tok.token_to_id("<|im_end|>") is None:
            raise ConfigError("chat=True needs an Ouro directory whose tokenizer has <|im_start|>/<|im_end|>")
        prompt = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        stop = [hf_tok.token_to_id("<|im_end|>")]
    n_loops = cfg.n_loops or None
    if mc.cache == "loop" and mc.exit_threshold < 1.0:
        print("note: with cache=loop every loop still runs (later tokens need every loop's row); "
              "exit_threshold only picks which loop's logits are used", file=sys.stderr)
    if cfg.prompts:   # the file's prompts, not --start
        return sample_batch(cfg, model, encode, decode, stop, None, n_loops, device)
    ids = encode(prompt)   # (a char vocabulary refuses characters it lacks: CharTokenizer)
    if not ids:
        raise ConfigError("empty prompt: give --start=TEXT or --start=FILE:path")
    if len(ids) + cfg.max_new_tokens > mc.block_size:
        raise ConfigError(f"prompt ({len(ids)} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceed the "
                            f"model's context of {mc.block_size} tokens")
    if cfg.batch:
        return sample_batch(cfg, model, encode, decode, stop, ids, n_loops, device)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    # compile only the one-token step, in its fixed-shape form (CUDA graphs on a GPU), as gpt-fast does
    decode_step = model.decode_step_fixed(compile=True) if cfg.compile else None
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    stats = dict(prefill_s=0.0, decode_s=0.0, decoded=0, prompt=0, loops=[], cache_bytes=0)
    for _ in range(cfg.num_samples):
        cache = model.new_cache(1, len(ids) + cfg.max_new_tokens, n_loops=n_loops)
        stats["cache_bytes"] = cache.nbytes
        out = []
        t0 = time.perf_counter()
        stream = model.generate_stream(x, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cache=cache,
                                       generator=gen, n_loops=n_loops, decode_step=decode_step)
        printed = 0
        if cfg.stream:
            print(prompt, end="", flush=True)
        for i, (nxt, used) in enumerate(stream):
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if i == 0:
                stats["prefill_s"] += now - t0
                stats["prompt"] += len(ids)
            elif i == 1 and cfg.compile and "compile_s" not in stats:
                stats["compile_s"] = now - t0   # the first compiled step compiles: not a decode rate
            else:
                stats["decode_s"] += now - t0
                stats["decoded"] += 1
            t0 = now
            stats["loops"].append(used.float().mean().item())
            token = nxt[0, 0].item()
            if token in stop:
                break
            out.append(token)
            if cfg.stream:
                text = decode(out)
                print(text[printed:], end="", flush=True)
                printed = len(text)
        if not cfg.stream:
            print(prompt + decode(out))
        print("\n" + "-" * 40)
    if device.type == "cuda":
        peak = f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB"
    else:
        peak = f"peak process memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.1f} MiB"
    print(f"stats: prefill {stats['prompt'] / max(stats['prefill_s'], 1e-9):,.1f} tok/s, "
          f"decode {stats['decoded'] / max(stats['decode_s'], 1e-9):,.1f} tok/s"
          + (f" (after {stats['compile_s']:.1f} s compiling the decode step)" if "compile_s" in stats else "") + ", "
          f"KV cache {stats['cache_bytes']:,} bytes ({mc.cache}), {peak}, "
          f"mean loops per token {sum(stats['loops']) / max(1, len(stats['loops'])):.2f} of {n_loops or mc.n_loop}")


def sample_batch(cfg, model, encode, decode, stop, ids, n_loops, device):
    """The prompts of --prompts (one a line), or num_samples copies of the prompt, as one batch:
    each row its own length (melt's ragged batches), printed when all are done, then the stats."""
    if cfg.prompts:
        try:
            with open(cfg.prompts, encoding="utf-8") as f:
                texts = [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--prompts={cfg.prompts!r}: cannot read it as UTF-8 text ({type(e).__name__})") from None
        if not texts:
            raise ConfigError(f"--prompts={cfg.prompts!r} holds no prompt (one per line)")
    else:
        texts = [None] * cfg.num_samples
    prompts = [torch.tensor(ids if t is None else encode(t), dtype=torch.long, device=device) for t in texts]
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0 or longest + cfg.max_new_tokens > model.config.block_size:
        raise ConfigError(f"every prompt needs 1 to {model.config.block_size - cfg.max_new_tokens} tokens "
                          f"(context {model.config.block_size}, max_new_tokens {cfg.max_new_tokens})")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    step = model.decode_step_fixed(compile=True) if cfg.compile else None
    _, cache = ragged_batch(model, prompts, cfg.max_new_tokens, n_loops)
    t0 = time.perf_counter()
    out = model.generate(prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cache=cache, generator=gen,
                         n_loops=n_loops, decode_step=step)
    dt = time.perf_counter() - t0
    for p, row in zip(prompts, out):
        new = row[len(p):].tolist()
        cut = next((i for i, t in enumerate(new) if t in stop), len(new))
        print(decode(p.tolist() + new[:cut]))
        print("-" * 40)
    print(f"stats: batch of {len(prompts)}, {len(prompts) * cfg.max_new_tokens / dt:,.1f} tok/s "
          f"(prefill and decode, {dt:.2f} s), KV cache {cache.nbytes:,} bytes ({model.config.cache})")


if __name__ == "__main__":
    run_cli(main, "sample.py")
