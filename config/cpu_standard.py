"""The miniature reproduction, 2-core CPU: a standard transformer with the
same weights' shapes as the LoopLM (2 layers, width 128), 1 loop."""
out_dir = "out-cpu/standard"
dataset = "shakespeare_char"
n_loop = 1
cache = "loop"
n_layer = 2
n_embd = 128
n_head = 4
loss = "expected_loss"   # Ouro's loss with an entropy bonus; see train.py DEFAULT_MODEL
entropy_weight = 1.0
block_size = 128
batch_size = 16
max_iters = 600
lr = 2e-3
min_lr = 2e-4
warmup_iters = 50
eval_interval = 200
eval_iters = 10
sample_tokens = 0
