"""
MELT's phase 2: attention-aligned distillation from a frozen looped teacher.

    python distill.py config/cpu_distill.py
    python distill.py --teacher=/path/to/Ouro-1.4B-Thinking --init_from=teacher --dataset=shakespeare_ouro

The loss, per micro-batch (MELT paper, Sec. 4):
    L = kd_weight * L_KD + beta * mean_{l,t} ||o_student(l,t) - sg(o_teacher(l,t))||^2 + lm_weight * L_LM
        + exit_weight * mean_t BCE(lambda_student(t), lambda_teacher(t))
o(l,t) is the attention output (after o_proj) of layer l at loop t, for every token; ||.||^2 sums
over the width (align_reduce="sum", the paper's notation) or averages over it ("mean"), and is
averaged over tokens. L_KD is KL(teacher || student) at kd_temperature,
averaged over all loops (kd_loops="all") or on the last loop only (kd_loops="last", the ablation).
beta=0 is the ablation without attention alignment.

Teacher: an Ouro directory or a LoopLM checkpoint of this project, frozen, in loop mode over the
whole sequence at once (bf16 on GPU). Student: a phase-1 checkpoint (init_from=PATH), the teacher
itself converted to shared mode (init_from=teacher), or init_from=resume. Config, data,
checkpoints, logging, DDP and the loop are train.py's.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import train as T
from serve.checkpoint import load_model


@dataclass
class DistillConfig(T.TrainConfig):
    out_dir: str = "out-distill"
    init_from: str = "teacher"           # a phase-1 checkpoint, "teacher" (convert the teacher), or "resume"
    teacher: str = ""                    # an Ouro directory or a LoopLM checkpoint .pt of this project
    beta: float = 0.1                    # weight of the attention alignment (the paper: 0.1; 0 = ablation)
    align_reduce: str = "sum"            # over the width: "sum" (the paper's ||.||^2) or "mean"; the paper
                                         # does not give the scale of o, and at width 128 the sum at beta 0.1
                                         # outweighs the KD term ~20:1 (RESULTS.md, the lesson)
    kd_weight: float = 1.0               # weight of the KD term
    kd_loops: str = "all"                # "all": KD on every loop's logits (the paper); "last": last loop only
    lm_weight: float = 0.0               # optional LM cross-entropy on the data
    exit_weight: float = 0.0             # > 0: the student's exit gate learns the teacher's, loop by loop (adaptive depth)
    checkpoint_mlp: bool = False         # activation checkpointing of each layer's MLP half
    max_iters: int = 300
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_iters: int = 20
    eval_interval: int = 50


class DistillRecipe(T.Recipe):
    """Phase 2's start and teacher, for train.py's build (the out_dir guard, resume and the
    tokenizer checks are the same as train.py's)."""

    def check_config(self, cfg):
        if cfg.beta < 0 or not cfg.beta < float("inf"):
            raise T.ConfigError(f"beta={cfg.beta} must be >= 0 and finite")
        if cfg.align_reduce not in ("sum", "mean"):
            raise T.ConfigError(f"align_reduce={cfg.align_reduce!r}: use sum or mean")
        if cfg.kd_loops not in ("all", "last"):
            raise T.ConfigError(f"kd_loops={cfg.kd_loops!r}: use all or last")
        for key in ("lm_weight", "exit_weight"):
            if not 0 <= getattr(cfg, key) < float("inf"):
                raise T.ConfigError(f"{key}={getattr(cfg, key)} must be >= 0 and finite (a negative weight maximises the loss)")
        if cfg.kd_weight == 0 and cfg.beta == 0 and cfg.lm_weight == 0:
            raise T.ConfigError("kd_weight, beta and lm_weight are all 0: nothing to train on")
        if not cfg.teacher:
            raise T.ConfigError("say which teacher: --teacher=OURO_DIR or --teacher=looplm/ckpt.pt")

    def start(self, cfg, model_keys, meta):
        if cfg.init_from == "teacher":   # the teacher converted to shared mode
            student, saved = load_model(cfg.teacher, dtype=torch.float32, **{"cache": "shared", **model_keys})
            return student, None if os.path.isdir(cfg.teacher) else saved
        return load_model(cfg.init_from, dtype=torch.float32, **model_keys)

    def teacher(self, cfg, start, rt):
        """The frozen looped teacher: an Ouro directory or a LoopLM checkpoint of this project
        (bf16 on a GPU)."""
        path = cfg.teacher
        if not os.path.isdir(path) and os.path.exists(path):
            if T.load_checkpoint(path)["model_config"].get("cache") != "loop":
                raise T.ConfigError(f"teacher {path!r} is a shared-cache (MELT) model; the teacher must be a LoopLM")
        teacher, meta = load_model(path, dtype=torch.float32)
        if rt.device.type == "cuda":
            teacher.to(torch.bfloat16)
        if cfg.kd_loops == "all" and teacher.config.loss == "last" and rt.master:
            print("note: the teacher was trained on its last loop only (loss=last), so its earlier loops' logits "
                  "are not predictions; --kd_loops=last distils what it learned (kd_loops=all: RESULTS.md, the lesson)")
        return teacher, None if os.path.isdir(path) else meta

    def check(self, cfg, student, teacher, meta):
        s, t = student.config, teacher.config
        if s.cache != "shared":
            raise T.ConfigError("the student is in loop mode: phase 2 distills into MELT (cache=shared)")
        for k in ("vocab_size", "n_layer", "n_loop", "n_embd", "n_head", "head_dim"):
            if getattr(s, k) != getattr(t, k):
                raise T.ConfigError(f"student and teacher differ in {k} ({getattr(s, k)} vs {getattr(t, k)}): "
                                    f"they must share the vocabulary and the layer/loop shapes")
        if os.path.isdir(cfg.teacher) and meta.get("tokenizer") != "hf":
            raise T.ConfigError(f"dataset {cfg.dataset!r} was not tokenized with the teacher's tokenizer.json: "
                                f"prepare it with data/prepare.py --tokenizer={cfg.teacher}")


def build_distill(cfg, model_keys, rt, run_dir=None):
    """train.py's build with phase 2's recipe: (student, optimizer, start step, best val, teacher,
    data dir, meta)."""
    return T.build(cfg, model_keys, rt, run_dir, recipe=DistillRecipe())


class DistillObjective(torch.nn.Module):
    """The phase-2 loss of one micro-batch; the teacher's outputs come in precomputed."""

    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg
        self._teacher_val = None
        for block in model.blocks:   # training memory: each layer's MLP half recomputed in backward
            block.checkpoint_mlp = cfg.checkpoint_mlp

    @torch.no_grad()
    def teacher_outputs(self, teacher, x, n_loops=None):
        """Per-loop logits (R, B, T, V) and attention outputs (R, L, B, T, C) of the teacher,
        computed once per micro-batch; freed when the step drops them."""
        out = teacher.run(x, n_loops=n_loops, collect_attn=True)
        logits = teacher.loop_logits(out) if self.cfg.kd_loops == "all" else teacher.lm_head(out.hidden[-1:])
        attn = torch.stack([torch.stack(a) for a in out.attn])
        return {"logits": logits, "attn": attn, "gates": out.gate_logits}

    def forward(self, x, y, alpha, t, n_loops=None):
        m, cfg = self.model, self.cfg
        out = m.run(x, alpha=alpha, n_loops=n_loops, collect_attn=True)
        s_logits = m.loop_logits(out) if cfg.kd_loops == "all" else m.lm_head(out.hidden[-1:])
        t_logits = t["logits"]
        kd = torch.stack([T.kd_loss(s_logits[r], t_logits[r], cfg.kd_temperature, y)
                          for r in range(s_logits.shape[0])]).mean()
        s_attn = torch.stack([torch.stack(a) for a in out.attn])                    # (R, L, B, T, C)
        sq = (s_attn.float() - t["attn"].float()).pow(2)
        align = (sq.sum(-1) if cfg.align_reduce == "sum" else sq.mean(-1)).mean()
        loss = cfg.kd_weight * kd + cfg.beta * align
        parts = {"kd": kd.detach(), "align": align.detach()}
        if cfg.exit_weight:   # the exit gate's lambda_t, as a probability, towards the teacher's at every loop
            gate = F.binary_cross_entropy_with_logits(out.gate_logits.float(), torch.sigmoid(t["gates"].float()))
            loss = loss + cfg.exit_weight * gate
            parts["exit"] = gate.detach()
        if cfg.lm_weight:
            lm = m.loss(out, y)
            loss = loss + cfg.lm_weight * lm
            parts["lm"] = lm.detach()
        return loss, parts

    @torch.no_grad()
    def eval_extra(self, teacher, batches, rt, alpha):
        """The two terms on validation batches, and the teacher's validation cross-entropy (fixed
        data, so computed once) beside the student's (val_ce), to see the gap close."""
        self.model.eval()
        kd, align, t_loss = [], [], []
        for i in range(self.cfg.eval_iters):
            x, y = batches.eval_batch("val", i, 0, rt.device)
            with rt.autocast:
                t_out = self.teacher_outputs(teacher, x)
                _, parts = self.forward(x, y, alpha, t_out)
                if self._teacher_val is None:
                    t_logits, _ = teacher(x)
                    t_loss.append(T.token_ce(t_logits, y).item())
            kd.append(parts["kd"].item())
            align.append(parts["align"].item())
        if self._teacher_val is None:
            self._teacher_val = rt.all_mean(sum(t_loss) / len(t_loss))
        self.model.train()
        return {"val_kd": rt.all_mean(sum(kd) / len(kd)), "val_align": rt.all_mean(sum(align) / len(align)),
                "teacher_val_ce": self._teacher_val}


def main(argv):
    cfg, model_keys = T.parse_args(argv, train_cls=DistillConfig)
    student, rec, _ = T.train(cfg, model_keys, objective_cls=DistillObjective, build_fn=build_distill)
    print(f"final: student val CE {rec['val_ce']:.4f}, teacher val CE {rec['teacher_val_ce']:.4f}, "
          f"val KD {rec['val_kd']:.4f}, val alignment {rec['val_align']:.4f}; "
          f"checkpoint {os.path.join(cfg.out_dir, 'ckpt.pt')}")


if __name__ == "__main__":
    T.run_cli(main, "distill.py")
