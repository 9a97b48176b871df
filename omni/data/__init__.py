"""Data: raw WebDataset shards -> packed token datasets (preprocess), and the training stream (packing)."""
