"""Text tokenizer over a Hugging Face ``tokenizers`` file (tokenizer.json), for imported checkpoints.

Hugging Face tokenizers (https://github.com/huggingface/tokenizers) run the BPE of models such as
Chameleon (Chameleon Team 2024, https://arxiv.org/abs/2405.09818), whose ids an imported bundle
keeps. Same interface as :class:`omni.tokenizers.text.TextTokenizer`; ids are the file's own ids.
Needs the ``hf`` extra (the ``tokenizers`` package ships with ``transformers``).

Unlike the SentencePiece tokenizer this one does not guarantee lossless round trips (that depends
on the file's normalizer and decoder), and the file's own added tokens (Chameleon's ``<s>``,
``<racm3:break>`` ...) are matched in text as the file defines them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from omni.errors import OmniError
from omni.io import atomic_write_bytes, sha256_bytes

HF_FILE = "hf_tokenizer.json"
"""File name inside the tokenizer folder (``tokenizer.json`` there is omni's own description)."""


def _tokenizers():
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - depends on the environment
        raise OmniError("the Hugging Face text tokenizer needs the `tokenizers` package: pip install 'omni[hf]'") from None
    return tokenizers


class HFTextTokenizer:
    """A tokenizer.json. Ids are 0 .. vocab_size-1, added tokens included."""

    kind = "hf-tokenizers"
    modality = "text"

    def __init__(self, data: bytes):
        tokenizers = _tokenizers()
        try:
            self.tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise OmniError(f"not a valid Hugging Face tokenizer.json: {e}") from None
        self._data = data

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HFTextTokenizer:
        p = Path(path)
        if not p.is_file():
            raise OmniError(f"tokenizer file not found: {p}")
        return cls(p.read_bytes())

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """str -> ids, without the file's post-processor specials (<bos> is the bundle's business)."""
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise OmniError(f"text id {bad[0]} is out of range [0, {n})")
        return self.tok.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(int(i))

    def fingerprint(self) -> str:
        return sha256_bytes(self._data)

    def save(self, directory: str | os.PathLike) -> None:
        atomic_write_bytes(Path(directory) / HF_FILE, self._data)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> HFTextTokenizer:
        p = Path(directory) / HF_FILE
        if not p.is_file():
            raise OmniError(f"no Hugging Face text tokenizer in {directory}: {HF_FILE} is missing")
        return cls(p.read_bytes())

    def __repr__(self) -> str:
        return f"HFTextTokenizer(vocab_size={self.vocab_size}, sha256={self.fingerprint()[:12]})"
