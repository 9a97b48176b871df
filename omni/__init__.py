"""omni: training and inference for early-fusion any-to-any multimodal models.

The public facade (``_LAZY`` below): documents, the unified tokenizer, ``omni.load``, ``omni.generate``,
the decoder, configs and errors. ``import omni`` is cheap: torch and every heavy module load on first
use of a name. Beside the subpackages, ``omni/`` holds the leaves (errors, io, registry, media, run)
and the core (document, vocab, bundle, model, checkpoint, chameleon); this facade may name any module
and is left out of the layer check (tests/test_layers.py, docs/architecture.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> "module:attribute"
_LAZY = {
    "Document": "omni.document:Document",
    "Text": "omni.document:Text",
    "Image": "omni.document:Image",
    "Audio": "omni.document:Audio",
    "Detect": "omni.document:Detect",
    "Generate": "omni.document:Generate",
    "UnifiedVocab": "omni.vocab:UnifiedVocab",
    "UnifiedTokenizer": "omni.bundle:UnifiedTokenizer",
    "RunConfig": "omni.config:RunConfig",
    "load_config": "omni.config:load_config",
    "OmniError": "omni.errors:OmniError",
    "ConfigError": "omni.errors:ConfigError",
    "generate": "omni.generation.generator:generate",
    "GenerateConfig": "omni.config.generate:GenerateConfig",
    "load": "omni.checkpoint:load",
    "OmniDecoder": "omni.model:OmniDecoder",
    "ModelConfig": "omni.config.model:ModelConfig",
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from omni.bundle import UnifiedTokenizer
    from omni.checkpoint import load
    from omni.config import RunConfig, load_config
    from omni.config.generate import GenerateConfig
    from omni.config.model import ModelConfig
    from omni.document import Audio, Detect, Document, Generate, Image, Text
    from omni.errors import ConfigError, OmniError
    from omni.generation.generator import generate
    from omni.model import OmniDecoder
    from omni.vocab import UnifiedVocab


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'omni' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__
