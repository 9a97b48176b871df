"""Generation: interleaved text, image and audio output and its HTML/Markdown pages.

What lives here:

* :mod:`omni.generation.generator`: :func:`generate`, batched KV-cache decoding over
  :class:`omni.model.OmniDecoder` with classifier-free guidance and reranking; the public call is
  ``omni.generate(model, tok, doc, ...)``, which is this function (the package has its own name so
  the two never collide).
* :mod:`omni.generation.processors`: the modality state machine, guidance and per-modality sampling.
* :mod:`omni.generation.jacobi`: speculative Jacobi decoding of image blocks.
* :mod:`omni.generation.page`: :func:`~omni.generation.page.write_page`, the HTML/Markdown writer.
* :mod:`omni.generation.stream`: :class:`~omni.generation.stream.TerminalStream`, text streamed and
  a bar per block while ``omni generate`` runs.

May import: the core (``omni.document``, ``omni.vocab``, ``omni.bundle``, ``omni.model``,
``omni.config``, ``omni.errors``, ``omni.io``) and, once the task heads land, ``omni.decoders``;
never ``omni.train``, ``omni.data`` or ``omni.parallel``.
"""

from omni.generation.generator import generate

__all__ = ["generate"]
