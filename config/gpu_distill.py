"""One GPU: MELT's phase 2 after config/gpu_transition.py, teacher = config/gpu_looplm.py.
python distill.py config/gpu_distill.py"""
out_dir = "out-gpu-distill"
teacher = "out-gpu-looplm/ckpt.pt"
init_from = "out-gpu-transition/ckpt.pt"
dataset = "shakespeare_char"
beta = 0.1
batch_size = 32
max_iters = 600
lr = 1e-4
min_lr = 1e-5
gate_lr = 1e-3
warmup_iters = 50
eval_interval = 100
# eager: compiling MELT's chunk-wise step did not pay on an H200 (RESULTS.md, 2026-11-26)
compile = False
# instead the step's forward and backward replay as CUDA graphs (serve/runtime.py GraphedStep; RESULTS.md)
cuda_graph = True
