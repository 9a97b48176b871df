"""Data configs: preprocessing raw shards into token datasets, and reading them for training."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni.config.base import check, check_choice


@dataclass
class PreprocessConfig:
    """How `omni data preprocess` turns samples into token documents."""

    pair_order: str = "random"
    """Order of a pair sample (image+caption, audio+transcript): 'media_first', 'text_first', or
    'random' (chosen per sample from a hash of its key and the seed, so reruns agree)."""
    seed: int = 0
    """Seed of the 'random' pair order."""
    add_bos: bool = True
    """Start every document with <bos>."""
    add_eos: bool = True
    """End every document with <eos>."""
    log_skipped: int = 1000
    """At most this many skipped samples per shard are listed (key, reason) in its manifest; all are counted."""
    max_skip_fraction: float = 0.1
    """A run whose skipped share of the samples read, or of its shards broken by corruption (a shard
    unreadable from its start adds no sample to count), is above this fails (after writing its
    manifest), naming the count of each reason; so does a run that writes no document at all, whatever
    this is. 1.0: fail only then."""
    det_queries: int = 4
    """K: slots written after each ``<det>`` (the detection head's super-link queries; VisionLLM v2: 4).
    Training checks it against ``heads.det.n_queries``."""
    gen_queries: int = 64
    """K: slots written after each ``<gen>`` (the diffusion head's super-link queries; VisionLLM v2: 64).
    Training checks it against ``heads.gen.n_queries``."""

    def __post_init__(self) -> None:
        check_choice(self.pair_order, "pair_order", ("media_first", "text_first", "random"))
        check(self.det_queries >= 1, "det_queries", self.det_queries, ">= 1")
        check(self.gen_queries >= 1, "gen_queries", self.gen_queries, ">= 1")
        check(self.log_skipped >= 0, "log_skipped", self.log_skipped, ">= 0")
        check(0.0 <= self.max_skip_fraction <= 1.0, "max_skip_fraction", self.max_skip_fraction, "in [0, 1]")


@dataclass
class DataConfig:
    """Token datasets blended for training (each a folder written by `omni data preprocess`)."""

    tokenizer: str = ""
    """Tokenizer bundle folder the token datasets were made with (training refuses others)."""
    paths: list[str] = field(default_factory=list)
    """Token dataset folders."""
    weights: list[float] = field(default_factory=list)
    """Blend weight of each path (empty: equal weights); normalized to sum to 1."""
    eval_paths: list[str] = field(default_factory=list)
    """Held-out token dataset folders for validation (train.eval_every); none may also be in paths."""
    seq_len: int = 2048
    """Tokens per packed training sequence (inputs; the labels are shifted by one)."""
    seed: int = 1234
    """Seed of the per-epoch document shuffle."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """Options of `omni data preprocess`."""

    def __post_init__(self) -> None:
        check(self.seq_len >= 8, "seq_len", self.seq_len, ">= 8")
        both = sorted(set(self.paths) & set(self.eval_paths))
        check(not both, "eval_paths", self.eval_paths, f"folders not in data.paths (held out), but {both} are in both")
        if self.weights:
            check(len(self.weights) == len(self.paths), "weights", self.weights,
                  f"one weight per path ({len(self.paths)} paths)")
            check(all(w >= 0 for w in self.weights) and sum(self.weights) > 0, "weights", self.weights,
                  "non-negative numbers with a positive sum")
