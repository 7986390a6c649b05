"""One GPU: MELT's phase 1, the interpolated transition from the LoopLM of config/gpu_looplm.py.
Keys/values are alpha*MELT + (1-alpha)*LoopLM with alpha ramping 0 -> 1 over the whole run; the
gates learn ~60x faster than the base weights, as in the paper (5e-4 vs 8e-6 there).
python train.py config/gpu_transition.py   (then distill.py config/gpu_distill.py for phase 2)"""
out_dir = "out-gpu-transition"
init_from = "out-gpu-looplm/ckpt.pt"
dataset = "shakespeare_char"
cache = "shared"
gate = "learned"
chunk_size = 64
batch_size = 64
max_iters = 1000
alpha_steps = 1000
lr = 1e-4
min_lr = 1e-5
gate_lr = 6e-3
warmup_iters = 50
kd_weight = 0.0
eval_interval = 250
# eager: compiling MELT's chunk-wise step did not pay on an H200 (RESULTS.md, 2026-11-26)
compile = False
