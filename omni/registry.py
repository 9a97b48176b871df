"""Name -> implementation registries (tokenizer kinds, task heads, evaluation suites, data sources).

A :class:`Registry` is a dict whose values are the registered objects or their ``'module:attribute'``
paths; :meth:`Registry.load` imports a path on first use and keeps the result, so naming a
built-in costs no import until it is needed. A leaf: it imports only :mod:`omni.errors`.
"""

from __future__ import annotations

import importlib

from omni.errors import OmniError


class Registry(dict):
    """``name -> object or 'module:attribute'``; unknown names are an OmniError listing the known ones."""

    def __init__(self, what: str, listing: str = "registered", entries: dict | None = None):
        super().__init__(entries or {})
        self.what = what
        """What a name names, for messages ('modality tokenizer kind', 'evaluation suite')."""
        self.listing = listing
        """How the message introduces the known names ('registered kinds', 'suites')."""

    def register(self, name: str, obj) -> None:
        """Make ``name`` findable; ``obj`` is the object or its 'module:attribute' path."""
        self[name] = obj

    def names(self) -> list[str]:
        return sorted(self)

    def load(self, name: str):
        """The object registered as ``name``, imported on first use."""
        if name not in self:
            raise OmniError(f"unknown {self.what} {name!r}; {self.listing}: "
                            f"{', '.join(self.names()) or 'none registered yet'}")
        entry = self[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            try:
                entry = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise OmniError(f"{self.what} {name!r} points at {self[name]!r}, which cannot be imported: {e}") from None
            self[name] = entry
        return entry
