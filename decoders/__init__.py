"""Task heads behind routing tokens (installed as ``omni.decoders``).

VisionLLM v2 (Wu et al., "VisionLLM v2: An End-to-End Generalist Multimodal Large Language Model
for Hundreds of Vision-Language Tasks", 2024, https://arxiv.org/abs/2406.08394) links the language
model to task decoders with routing tokens: when the decoder emits ``<det>`` or ``<gen>``, K learned
"super-link" query embeddings are appended to the sequence, and their final hidden states condition
a task head (a DETR-style detector for ``<det>``, a diffusion denoiser for ``<gen>``). The heads'
losses flow back into the decoder.

What lives here: :mod:`omni.decoders.base`, the small :class:`~omni.decoders.base.TaskHead`
interface and the ``HEADS`` registry (``register_head``, ``head_class``, ``registered_heads``);
the routing itself (:mod:`omni.decoders.routing`: slots, super-link queries, the heads of a run);
the detection head (:mod:`omni.decoders.detection`, DETR, registered as ``detr``) with its box ops
(:mod:`omni.decoders.boxes`).

May import: configs, the leaves (``omni.errors``, ``omni.io``, ``omni.registry``), the modality
tokenizers and ``torch``; never the core (vocabulary, documents, the model, checkpoints) or anything
above it: heads are components, like the modality tokenizers, which a checkpoint assembles and the
trainer and generation call (tests/test_layers.py). ``import omni.decoders`` itself imports nothing
heavy.
"""
