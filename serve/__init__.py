"""What serves the model in melt.py: the decoding engine (engine.py), this project's checkpoints
(checkpoint.py), Ouro directories (ouro.py), devices, DDP and CUDA graphs (runtime.py)."""
