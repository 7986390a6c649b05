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
# eager: compiling MELT's chunk-wise step did not pay on an H200 (RESULTS.md, 2026-11-26)
compile = False
# instead the step's forward and backward replay as CUDA graphs (serve/runtime.py GraphedStep; RESULTS.md)
cuda_graph = True
