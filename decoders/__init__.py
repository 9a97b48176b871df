"""Task heads behind routing tokens (installed as ``omni.decoders``).

VisionLLM v2 (Wu et al., "VisionLLM v2: An End-to-End Generalist Multimodal Large Language Model
for Hundreds of Vision-Language Tasks", 2024, https://arxiv.org/abs/2406.08394) links the language
model to task decoders with routing tokens: when the decoder emits ``<det>`` or ``<gen>``, K learned
"super-link" query embeddings are appended to the sequence, and their final hidden states condition
a task head (a DETR-style detector for ``<det>``, a diffusion denoiser for ``<gen>``). The heads'
losses flow back into the decoder.

What lives here: :mod:`omni.decoders.base`, the small :class:`~omni.decoders.base.TaskHead`
interface and the ``HEADS`` registry (``register_head``, ``head_class``, ``registered_heads``);
the detection and diffusion heads themselves come later, one module each, registered by kind.

May import: the core model types (``omni.config``, ``omni.errors``, ``omni.io``) and ``torch``;
never ``omni.parallel``, ``omni.train`` or ``omni.data`` (those import the heads, not the other way
round). ``import omni.decoders`` itself imports nothing heavy.
"""
