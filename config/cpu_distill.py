"""The miniature reproduction, phase 2: attention-aligned distillation (beta = 0.1, KD on all
loops) from the LoopLM of config/cpu_looplm.py into the phase-1 model of config/cpu_transition.py.
python distill.py config/cpu_distill.py   (a few minutes on a 2-core CPU)"""
out_dir = "out-cpu/distill"
teacher = "out-cpu/looplm/ckpt.pt"
init_from = "out-cpu/transition/ckpt.pt"
dataset = "shakespeare_char"
beta = 0.1
kd_loops = "all"
batch_size = 16
max_iters = 100
lr = 2e-4
min_lr = 2e-5
gate_lr = 1.2e-2
warmup_iters = 10
eval_interval = 50
eval_iters = 10
sample_tokens = 0
