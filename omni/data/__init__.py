"""Data: raw WebDataset shards -> packed token datasets (preprocess), and the training stream (packing)."""

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
