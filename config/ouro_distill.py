"""One GPU, Ouro-1.4B(-Thinking) -> MELT-1.6B, phase 2 straight from the teacher (init_from =
teacher converts it to shared mode). Prepare the data with the checkpoint's tokenizer first:
    python data/prepare.py --name=shakespeare_ouro --tokenizer=/path/to/Ouro-1.4B-Thinking
    python distill.py config/ouro_distill.py --teacher=/path/to/Ouro-1.4B-Thinking
dev/ouro_step.py measures a few micro-batches at these settings on random weights of these
shapes (peak GPU memory, tok/s); not yet run: no GPU was at hand."""
out_dir = "out-ouro-distill"
init_from = "teacher"
dataset = "shakespeare_ouro"
block_size = 2048
chunk_size = 512
batch_size = 1
grad_accum = 64
max_iters = 300
lr = 8e-6
min_lr = 8e-7
gate_lr = 5e-4
warmup_iters = 10
beta = 0.1
checkpoint_mlp = True
eval_interval = 50
eval_iters = 4
sample_tokens = 0
