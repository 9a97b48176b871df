"""Tokenizer configs: one dataclass per modality tokenizer, nested in :class:`TokenizerConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni.config.audio_tokenizer import AudioTokenizerRecipe
from omni.config.base import check, check_choice
from omni.config.image_tokenizer import ImageTrainConfig


@dataclass
class TextTokenizerConfig:
    """SentencePiece BPE over raw text (Kudo & Richardson 2018), lossless by construction."""

    vocab_size: int = 8000
    """Number of text pieces, byte-fallback pieces included (the unified vocab adds specials after them)."""
    model_type: str = "bpe"
    """SentencePiece model type: 'bpe' or 'unigram'."""
    character_coverage: float = 0.9995
    """Share of characters covered by pieces; the rest fall back to UTF-8 byte pieces."""
    split_digits: bool = True
    """Split every digit into its own piece (LLaMA, Chameleon), so numbers tokenize uniformly."""
    max_sentence_length: int = 16384
    """Longest input line in bytes used for training; longer lines are skipped by SentencePiece."""
    input_sentence_size: int = 2_000_000
    """At most this many lines are sampled from the corpus for training (0 means all)."""
    max_piece_length: int = 16
    """Longest piece in characters."""
    num_threads: int = 2
    """Trainer threads."""
    seed: int = 0
    """Seed of the line sampling, for reproducible tokenizers."""

    def __post_init__(self) -> None:
        check(257 <= self.vocab_size <= 1_000_000, "vocab_size", self.vocab_size,
              "an integer in [257, 1000000] (256 byte pieces plus at least one more)")
        check_choice(self.model_type, "model_type", ("bpe", "unigram"))
        check(0.9 <= self.character_coverage <= 1.0, "character_coverage", self.character_coverage,
              "a number in [0.9, 1.0]")
        check(self.max_sentence_length >= 16, "max_sentence_length", self.max_sentence_length, ">= 16")
        check(self.input_sentence_size >= 0, "input_sentence_size", self.input_sentence_size, ">= 0")
        check(1 <= self.max_piece_length <= 64, "max_piece_length", self.max_piece_length, "in [1, 64]")
        check(self.num_threads >= 1, "num_threads", self.num_threads, ">= 1")


@dataclass
class TokenizerConfig:
    """The modality tokenizers that make up one unified tokenizer bundle."""

    text: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    """Text tokenizer (SentencePiece BPE) and its training."""
    image: ImageTrainConfig = field(default_factory=ImageTrainConfig)
    """Image tokenizer (VQGAN family) and its training."""
    audio: AudioTokenizerRecipe = field(default_factory=AudioTokenizerRecipe)
    """Audio tokenizer (whisper front end + VQ) and its training."""
    n_reserved_specials: int = 16
    """Reserved special ids after the named specials, for routing tokens added later without re-layout."""

    def __post_init__(self) -> None:
        check(0 <= self.n_reserved_specials <= 1024, "n_reserved_specials", self.n_reserved_specials,
              "in [0, 1024]")
