"""Modality tokenizers (installed as ``omni.tokenizers``): text, image, audio, and their trainers.

``base`` (the interface every tokenizer implements, the registry of kinds), ``text`` (SentencePiece
BPE), ``text_hf`` (Hugging Face tokenizer.json), ``image`` + ``image_train`` (VQ), ``audio`` +
``audio_train`` (whisper-VQ). May import the leaves, config and ``omni.run``; never the vocabulary,
bundle, documents, data, toy, generation, train or eval (tests/test_layers.py).
"""

if __name__ == "tokenizers":  # pragma: no cover - only when run from the repository root
    # With the repository root as the working directory (``python -c``, ``python -m pytest``),
    # this folder is also reachable as a top-level ``tokenizers`` and would shadow PyPI's
    # ``tokenizers``, which transformers needs. Hand that name back to the real package.
    import importlib
    import os
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    del sys.modules["tokenizers"]
    try:
        sys.modules["tokenizers"] = importlib.import_module("tokenizers")
    finally:
        sys.path[:] = _saved
