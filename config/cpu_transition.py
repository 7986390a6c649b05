"""The miniature reproduction, phase 1: the interpolated transition from config/cpu_looplm.py.
alpha ramps 0 -> 1 over the whole phase; gates learn 60x faster than the base weights (paper).
python train.py config/cpu_transition.py"""
out_dir = "out-cpu/transition"
init_from = "out-cpu/looplm/ckpt.pt"
dataset = "shakespeare_char"
cache = "shared"
gate = "learned"
chunk_size = 32
batch_size = 16
max_iters = 200
alpha_steps = 200
lr = 2e-4
min_lr = 2e-5
gate_lr = 1.2e-2
warmup_iters = 10
eval_interval = 100
eval_iters = 10
sample_tokens = 0
