"""Data: raw WebDataset shards -> packed token datasets (preprocess), and the training stream (packing).

:mod:`~omni.data.samples` (a raw sample -> Document), :mod:`~omni.data.preprocess` (shards -> Megatron
indexed datasets + manifest), :mod:`~omni.data.packing` (TokenDataset, DocumentPacker, BlendedSequences).
May import the leaves (errors, io, media), config, the core (document, vocab, bundle) and
``omni.tokenizers``; never train, generation, eval or the command line.
"""

from __future__ import annotations


def indexed_dataset():
    """megatron-core's ``indexed_dataset`` module, imported without its CPU-only warnings.

    megatron-core warns at import that Transformer Engine and Apex are missing and it falls back
    to torch; on a CPU that is the expected set-up, and four such warnings in every progress
    display only hide what matters.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")
        from megatron.core.datasets import indexed_dataset as module
    return module
