"""Training: `omni train` (plain-PyTorch backend: one process, or DDP/FSDP2 under torchrun).

:mod:`~omni.train.loop` (``Trainer``, ``train``) and :mod:`~omni.train.checkpointing` (decoder
checkpoints in the run convention of :mod:`omni.run`). May import the leaves, config, ``omni.run``,
the core, ``omni.data``, ``omni.parallel`` (and ``omni.decoders`` once heads exist); never
generation, eval or the command line.
"""
