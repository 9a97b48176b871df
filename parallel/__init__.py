"""Parallelism (installed as ``omni.parallel``): :mod:`~omni.parallel.dist` for the plain-PyTorch backend.

``dist``: process groups from torchrun's environment, activation checkpointing, DDP/FSDP2 wrapping.
Planned here: the megatron-core backend (TP/PP/CP, FP8, converters; #21) and the Slurm launcher (#22).
May import the leaves, config and the core; never train, generation, eval or the command line, and
``omni.model`` never imports it (tests/test_layers.py).
"""
