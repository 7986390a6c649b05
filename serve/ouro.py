"""
Reading Ouro checkpoints (Hugging Face directories: config.json, model.safetensors or a sharded
index, tokenizer.json) into this project's model, as gpt-fast keeps its conversion out of the
model file. Nothing is downloaded: give a local directory. MELT.from_ouro and load_model call
from_ouro; the tensors map one to one (ouro_to_melt), the config field by field (ouro_config).
"""

import json
import os
from dataclasses import fields

import torch

from melt import MELT, MeltConfig, MeltError


def from_ouro(path, dtype=None, device="cpu", torch_dtype=None, **overrides):
    """Read a local Hugging Face Ouro directory (config.json, model.safetensors or a sharded
    model.safetensors.index.json) into a MELT model. overrides are MeltConfig fields, e.g.
    cache="shared", gate="last". Weights keep the file's dtype unless dtype (or torch_dtype, as
    Hugging Face names it) is given. In shared mode the new gate parameters start as
    LatentGate.reset_parameters says. A sharded checkpoint is read exactly as its index says.
    Nothing is downloaded."""
    from safetensors import safe_open

    if not os.path.isdir(path):
        raise MeltError(f"no Ouro checkpoint directory at {path!r}")
    hf = _read_json(os.path.join(path, "config.json"), f"{path!r} has no config.json: not a Hugging Face checkpoint directory")
    config = ouro_config(hf, **overrides)
    dtype = dtype or torch_dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise MeltError("dtype must be a torch dtype or its name, e.g. 'bfloat16'")

    single = os.path.join(path, "model.safetensors")
    index_path = os.path.join(path, "model.safetensors.index.json")
    try:
        if os.path.isfile(single):
            with safe_open(single, "pt") as f:
                where = {k: single for k in f.keys()}
        elif os.path.isfile(index_path):
            index = _read_json(index_path, "")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
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
        model = MELT(config)
    for name, t in model.state_dict().items():   # new gate parameters: the documented init
        if name not in state:
            state[name] = torch.zeros(t.shape, dtype=state["tok_emb.weight"].dtype)
    model.load_state_dict(state, strict=True, assign=True)
    for block in model.blocks:   # THE GATE's documented start, the one init (LatentGate.reset_parameters)
        if block.gate is not None:
            block.gate.reset_parameters()
    model.init_rope()
    return model.to(device)


def _read_json(path, missing_msg):
    if not os.path.isfile(path):
        raise MeltError(missing_msg or f"{path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise MeltError(f"{path!r} is not valid JSON ({e})") from None


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
    if not isinstance(hf, dict):
        raise MeltError(f"config.json holds a {type(hf).__name__}, not an object of settings")
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
                  head_dim=hf.get("head_dim") or hf["hidden_size"] // max(1, hf["num_attention_heads"]),
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
