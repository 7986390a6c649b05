"""One GPU: a standard (non-looped) transformer on Shakespeare, the baseline.
python train.py config/gpu_standard.py"""
out_dir = "out-gpu-standard"
dataset = "shakespeare_char"
n_loop = 1
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
