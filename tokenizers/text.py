"""Text tokenizer: SentencePiece BPE with byte fallback and split digits.

Kudo & Richardson, "SentencePiece: A simple and language independent subword tokenizer and
detokenizer for Neural Text Processing", EMNLP 2018 (https://arxiv.org/abs/1808.06226); BPE from
Sennrich et al. 2016. Byte fallback and split digits follow LLaMA and Chameleon.

Round trips are lossless for every Unicode string, by construction:

* the normalizer is ``identity``, no dummy prefix, extra whitespace kept;
* SentencePiece writes a space as U+2581 ("▁") and so cannot tell a typed "▁" from a space.
  :meth:`TextTokenizer.encode` splits the text on "▁" and encodes each typed "▁" as its three
  UTF-8 byte pieces, and :meth:`TextTokenizer.decode` maps pieces to text itself (a normal piece's
  "▁" is a space, byte pieces are UTF-8 bytes), so the two never mix;
* the model has no control pieces of its own (no <s>, </s>, <pad>): the specials live in the
  unified vocabulary, outside the text range, so a user typing "<boi>" gets text pieces.
"""

from __future__ import annotations

import glob
import io
import os
import random
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from omni.config import TextTokenizerConfig, load_config, save_config
from omni.errors import OmniError
from omni.io import atomic_write_bytes

SPACE = "\u2581"  # SentencePiece's visible space, "▁"
MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "config.yaml"


class TextTokenizer:
    """A trained SentencePiece model. Ids are local: 0 .. vocab_size-1 (id 0 is <unk>)."""

    kind = "sentencepiece"
    modality = "text"

    def __init__(self, model_proto: bytes, config: TextTokenizerConfig | None = None):
        import sentencepiece as spm

        self.config = config or TextTokenizerConfig()
        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        n = self.sp.get_piece_size()
        # Per id: the text a normal piece stands for, or None for byte pieces and <unk>.
        self._piece_text: list[str | None] = []
        self._byte_value: list[int] = []
        for i in range(n):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                self._piece_text.append(None)
                self._byte_value.append(int(piece[3:5], 16))  # "<0xE2>" -> 0xE2
            elif self.sp.is_unknown(i) or self.sp.is_control(i):
                self._piece_text.append(None)
                self._byte_value.append(-1)
            else:
                self._piece_text.append(piece.replace(SPACE, " "))
                self._byte_value.append(-1)
        self._space_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE.encode("utf-8")]

    # --- encode / decode -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """str -> local ids. Lossless: ``decode(encode(s)) == s`` for every str ``s``."""
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE)):
            if i:
                ids.extend(self._space_bytes)  # a typed "▁", as its UTF-8 bytes
            if part:
                ids.extend(self.sp.encode(part, out_type=int))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """local ids -> str. Byte pieces are joined and read as UTF-8 (invalid bytes become U+FFFD)."""
        out = io.StringIO()
        pending = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._piece_text):
                raise OmniError(f"text id {i} is out of range [0, {len(self._piece_text)})")
            b = self._byte_value[i]
            if b >= 0:
                pending.append(b)
                continue
            if pending:
                out.write(pending.decode("utf-8", errors="replace"))
                pending.clear()
            text = self._piece_text[i]
            out.write(text if text is not None else "\ufffd")  # <unk>: byte fallback makes it rare
        if pending:
            out.write(pending.decode("utf-8", errors="replace"))
        return out.getvalue()

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    # --- persistence -----------------------------------------------------------------------
    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self._proto).hexdigest()

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        atomic_write_bytes(d / MODEL_FILE, self._proto)
        save_config(self.config, d / CONFIG_FILE)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TextTokenizer:
        d = Path(directory)
        model = d / MODEL_FILE
        if not model.is_file():
            raise OmniError(f"no text tokenizer in {d}: {MODEL_FILE} is missing")
        cfg_path = d / CONFIG_FILE
        cfg = load_config(TextTokenizerConfig, cfg_path) if cfg_path.is_file() else None
        return cls(model.read_bytes(), cfg)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, sha256={self.fingerprint()[:12]})"


# --- training ------------------------------------------------------------------------------
def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files named directly or by glob (``**`` allowed); folders contribute every file inside."""
    files: list[Path] = []
    missing = []
    for pattern in inputs:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            missing.append(pattern)
        for m in matches:
            p = Path(m)
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    if missing:
        raise OmniError(f"no file matches input {', '.join(repr(m) for m in missing)}")
    if not files:
        raise OmniError(f"inputs {list(inputs)} name no files")
    return files


def _lines(files: Sequence[Path], progress: bool) -> Iterator[str]:
    from tqdm import tqdm

    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading corpus", disable=not progress) as bar:
        for f in files:
            with open(f, "rb") as fh:
                for raw in fh:
                    bar.update(len(raw))
                    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    if line.strip():
                        yield line


def train_text_tokenizer(
    inputs: Sequence[str],
    config: TextTokenizerConfig | None = None,
    progress: bool = True,
) -> TextTokenizer:
    """Train SentencePiece on the lines of ``inputs`` (files, folders or globs)."""
    import sentencepiece as spm

    config = config or TextTokenizerConfig()
    files = expand_inputs(inputs)
    lines = list(_lines(files, progress))
    if not lines:
        raise OmniError(f"the corpus is empty: {len(files)} file(s) hold no non-blank line")
    if config.input_sentence_size and len(lines) > config.input_sentence_size:
        # Sample here, with our seed, so the same corpus and config give the same tokenizer.
        lines = random.Random(config.seed).sample(lines, config.input_sentence_size)
    proto = io.BytesIO()
    t0 = time.time()
    if progress:
        print(f"training {config.model_type} tokenizer, vocab_size={config.vocab_size}, "
              f"on {len(lines)} lines from {len(files)} file(s) ...", flush=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=proto,
            vocab_size=config.vocab_size,
            model_type=config.model_type,
            character_coverage=config.character_coverage,
            byte_fallback=True,
            split_digits=config.split_digits,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_by_whitespace=True,
            max_sentence_length=config.max_sentence_length,
            input_sentence_size=0,  # sampled above
            shuffle_input_sentence=False,
            max_sentencepiece_length=config.max_piece_length,
            num_threads=config.num_threads,
            # No control pieces: <bos>/<eos>/<pad> live in the unified vocab, outside the text range.
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            hard_vocab_limit=True,
            minloglevel=2,
        )
    except RuntimeError as e:
        # "INTERNAL: src/trainer_interface.cc(744) [check] Vocabulary size too high ..." -> the sentence.
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        msg = re.sub(r"^[A-Z_]+: \S+\(\d+\) \[.*?\] ", "", msg)
        raise OmniError(
            f"cannot train a text tokenizer with vocab_size={config.vocab_size} on {len(lines)} lines: {msg}"
        ) from None
    if progress:
        print(f"trained in {time.time() - t0:.1f}s", flush=True)
    return TextTokenizer(proto.getvalue(), config)
