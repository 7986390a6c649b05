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
# eager: torch.compile of the whole chunk-wise step (chunks x loops x layers unrolled, forward and
# backward) did not finish in 160 s on an H200 machine (bench/gpu_check_h200_2026-11-26.txt), and
# compiling each layer's pieces instead ran slower than eager there (bench/gpu_check_h200_2026-11-26b.txt).
# The LoopLM configs compile (2.6x, in ~50 s).
compile = False
# instead the step's forward and backward are replayed as CUDA graphs (train.py GraphedStep): 3.2x
# eager for phase 2, 2.7-3.2x for MELT from scratch on an H200 (bench/gpu_check_h200_2026-11-26c.txt)
cuda_graph = True
