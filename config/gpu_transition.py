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
# eager: torch.compile of the whole chunk-wise step (chunks x loops x layers unrolled, forward and
# backward) did not finish in 160 s on an H200 machine (bench/gpu_check_h200_2026-11-26.txt), and
# compiling each layer's pieces instead ran slower than eager there (bench/gpu_check_h200_2026-11-26b.txt).
# The LoopLM configs compile (2.6x, in ~50 s).
compile = False
