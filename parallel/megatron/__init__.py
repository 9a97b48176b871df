"""The megatron-core backend (``parallel.backend=megatron``): the OmniDecoder on tensor, pipeline and
context parallelism, FP8 through Transformer Engine.

* :mod:`.config`: the checks of a RunConfig for this backend (before any process group starts), and
  the pure mapping ModelConfig / TrainConfig -> megatron-core ``TransformerConfig`` keyword arguments,
  FP8 included. Imports nothing of megatron-core.

megatron-core is imported lazily, by the modules that build and train models.
"""
