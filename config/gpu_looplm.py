"""One GPU: a LoopLM (Ouro-style, one KV cache per loop and layer) on Shakespeare, with 4 loops.
It is also the starting model of the transition (config/gpu_transition.py).
python train.py config/gpu_looplm.py"""
out_dir = "out-gpu-looplm"
dataset = "shakespeare_char"
n_loop = 4
cache = "loop"
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
compile = True
