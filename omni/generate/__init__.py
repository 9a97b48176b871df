"""Generation: interleaved text, image and audio output (``omni.generate``) and its HTML/Markdown pages.

DESIGN.md's public call is ``omni.generate(model, tok, doc, ...)``, and ``omni/generate/`` is also
this package: once the package is imported, Python binds ``omni.generate`` to the module. So the
module itself is callable and forwards to :func:`omni.generate.generator.generate`; both spellings
work whatever was imported first.
"""

import sys
import types

from omni.generate.generator import generate


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["generate"]
