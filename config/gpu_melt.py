"""One GPU: MELT trained from scratch (one shared KV cache per layer, learned gate), chunk-wise.
python train.py config/gpu_melt.py"""
out_dir = "out-gpu-melt"
dataset = "shakespeare_char"
n_loop = 4
cache = "shared"
gate = "learned"
chunk_size = 64
n_layer = 8
n_embd = 512
n_head = 8
loss = "expected_loss"   # Ouro's loss with an entropy bonus; see train.py DEFAULT_MODEL
entropy_weight = 1.0
block_size = 256
batch_size = 64
max_iters = 5000
lr = 1e-3
min_lr = 1e-4
warmup_iters = 200
eval_interval = 500
# eager: torch.compile of the whole chunk-wise step (chunks x loops x layers unrolled, forward and
# backward) did not finish in 160 s on an H200 machine (bench/gpu_check_h200_2026-11-26.txt), and
# compiling each layer's pieces instead ran slower than eager there (bench/gpu_check_h200_2026-11-26b.txt).
# The LoopLM configs compile (2.6x, in ~50 s).
compile = False
# instead the step's forward and backward are replayed as CUDA graphs (train.py GraphedStep): 3.2x
# eager for phase 2, 2.7-3.2x for MELT from scratch on an H200 (bench/gpu_check_h200_2026-11-26c.txt)
cuda_graph = True
