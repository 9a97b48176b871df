"""Showing a generation while it runs: text streamed as it is decoded, a progress bar per block.

:class:`TerminalStream` plugs into :func:`omni.generation.generator.generate`'s ``on_token``
callback. For one sampled row (one prompt, no reranking) it writes the row's text to ``text_out``
as the tokens arrive, exactly the text the returned Document holds (each run of text ids between
media blocks is decoded whole, as :meth:`omni.bundle.UnifiedTokenizer.decode` does, and only what
is already final is written), and a bar over each image block's N codes (audio: up to
``max_audio_tokens``) on ``progress_out``. For several rows (a batch, or rerank candidates that are
not yet ranked) streaming text would show rows that may be dropped: one bar over all new tokens.
"""

from __future__ import annotations

import sys
from typing import TextIO

from omni.config.generate import GenerateConfig

_HELD = "\ufffd"  # what a partial UTF-8 byte sequence decodes to: wait for its other bytes


class TerminalStream:
    """``on_token(row, id)`` for :func:`~omni.generation.generator.generate`; call :meth:`close` after it."""

    def __init__(self, tok, config: GenerateConfig, rows: int, text_out: TextIO | None = None,
                 progress_out: TextIO | None = None):
        from omni.vocab import TEXT

        self.tok, self.config, self.rows = tok, config, rows
        self.text_out = text_out if text_out is not None else sys.stdout
        self.progress_out = progress_out if progress_out is not None else sys.stderr
        self.is_text = (tok.vocab.modality_table == TEXT).tolist()
        self.openers = tok.vocab.openers  # id -> 'image' / 'audio'
        self.closers = {tok.vocab.closer(k) for k in self.openers.values()}
        self.run: list[int] = []  # text ids since the last block
        self.shown = ""  # the part of the run's text already written
        self.streamed: list[str] = []  # everything written to text_out
        self.line_open = False  # the terminal's line holds streamed text (a bar must start on a new one)
        self.bar = None
        self.counts = {"image": 0, "audio": 0}
        self.total = None
        if rows > 1:
            from tqdm import tqdm

            self.total = tqdm(total=rows * config.max_new_tokens, desc=f"generating {rows} rows", unit="tok",
                              file=self.progress_out, leave=False)

    # --- text -------------------------------------------------------------------------------
    def _write(self, s: str) -> None:
        if s:
            self.text_out.write(s)
            self.text_out.flush()
            self.streamed.append(s)
            self.line_open = not s.endswith("\n")

    def _flush_text(self, final: bool) -> None:
        """Write the run's text decoded so far, past what is shown; hold a trailing partial character
        unless ``final``."""
        if not self.run:
            return
        text = self.tok.decode(self.run).text
        if not final:
            text = text.rstrip(_HELD)
        if text.startswith(self.shown):  # a prefix's decoding is the whole's prefix (SentencePiece)
            self._write(text[len(self.shown):])
            self.shown = text

    @property
    def text(self) -> str:
        """Everything streamed so far."""
        return "".join(self.streamed)

    # --- the callback -----------------------------------------------------------------------
    def on_token(self, row: int, token: int) -> None:
        if self.total is not None:
            self.total.update(1)
            return
        if self.bar is not None:  # inside a block
            if token in self.closers:
                self.bar.close()
                self.bar = None
            else:
                self.bar.update(1)
            return
        if token in self.openers:
            from tqdm import tqdm

            self._flush_text(final=True)
            self.run, self.shown = [], ""
            kind = self.openers[token]
            self.counts[kind] += 1
            if self.line_open:  # the bar starts on its own line (on the same terminal)
                self.text_out.flush()
                self.progress_out.write("\n")
                self.line_open = False
            n = self.tok.image.tokens_per_image if kind == "image" else self.config.max_audio_tokens
            self.bar = tqdm(total=n, desc=f"{kind} {self.counts[kind]}", unit="code", file=self.progress_out,
                            leave=True, bar_format=None if kind == "image" else "{desc}: {n_fmt} codes [{elapsed}]")
        elif self.is_text[token]:
            self.run.append(token)
            self._flush_text(final=False)
        # other specials (<eos>, routing) carry no text; a text run goes on across them

    def close(self) -> None:
        """End the stream: the held-back rest of the text, a newline after it (on ``text_out``, so what
        follows there starts on its own line), bars closed."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.total is not None:
            self.total.close()
            self.total = None
            return
        self._flush_text(final=True)
        if self.streamed and not self.text.endswith("\n"):
            self.text_out.write("\n")
            self.text_out.flush()
            self.line_open = False
