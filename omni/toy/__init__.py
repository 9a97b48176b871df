"""Offline data makers only: toy scenes of colored shapes, espeak-ng speech, scikit-image photos, text.

:mod:`~omni.toy.shapes`, :mod:`~omni.toy.speech`, :mod:`~omni.toy.photos`, :mod:`~omni.toy.text`; used
by tests, benchmarks and ``omni demo``; nothing here downloads. May import only the leaves (errors,
io, media), ``omni.config`` and ``omni.document`` (tests/test_layers.py); the toy world's image
judge is evaluation and lives in ``omni.eval.judge``.
"""
