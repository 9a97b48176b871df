"""Small composable pieces of decoding: the modality state machine, guidance, and per-modality sampling.

Chameleon (Chameleon Team, 2024) decodes with a finite-state machine: in an image block exactly
1024 codes, then a forced end-of-image, and no image is started that cannot finish. This module
does the same for any grid and for audio blocks:

* :class:`DecodeState` tracks each row: text mode, inside an image block (codes so far), inside an
  audio block, or done; images made; new tokens left.
* :class:`ModalityConstraint` masks the logits to what the state allows: in text mode text ids,
  <eos>, and <boi>/<boa> only when the block can still finish; after <boi> exactly N image codes
  then <eoi>; after <boa> audio codes (at least one) up to a bound, then <eoa>. While ``min_images``
  / ``min_audio`` blocks are still owed, nothing is chosen that leaves too few tokens to make them
  (:func:`owed_tokens`, :func:`check_budget`).
* :class:`ClassifierFreeGuidance` mixes conditional and unconditional logits inside blocks
  (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022; for autoregressive image tokens:
  Lumina-mGPT, Emu3, Janus): ``l = c + (s - 1)(c - u)``, which is exactly ``c`` at ``s = 1``.
* :class:`ModalitySampler` applies temperature, top-k and top-p with the settings of each row's
  modality, then samples (greedy at temperature 0) from a seeded generator.

Processors take and return logits [B, V]; nothing here touches the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omni.config.generate import GenerateConfig, SamplingConfig
from omni.errors import OmniError

TEXT_MODE, IMAGE_MODE, AUDIO_MODE, DONE = "text", "image", "audio", "done"
MIN_AUDIO_BLOCK = 3
"""The shortest audio block in tokens: <boa>, one code, <eoa> (what ``min_audio`` reserves per block)."""


def owed_tokens(images: int, audios: int, image_tokens: int | None) -> int:
    """Fewest new tokens that hold ``images`` more image blocks (<boi> + N codes + <eoi> each) and
    ``audios`` more audio blocks (:data:`MIN_AUDIO_BLOCK` each)."""
    return images * ((image_tokens or 0) + 2) + audios * MIN_AUDIO_BLOCK


def check_budget(config: GenerateConfig, max_new_tokens: int, image_tokens: int | None, has_audio: bool,
                 context: str = "") -> None:
    """Refuse, before anything is generated, a ``min_images`` / ``min_audio`` that cannot be met:
    the modality is missing or switched off, or ``max_new_tokens`` (``context``: why fewer are
    available, when the model's context is what limits them) cannot hold the blocks."""
    for n, key, here, allow, what in (
            (config.min_images, "min_images", image_tokens is not None, config.allow_images, "image"),
            (config.min_audio, "min_audio", has_audio, config.allow_audio, "audio")):
        if n and not here:
            raise OmniError(f"{key}={n} needs {what} blocks, but the tokenizer bundle has no {what} tokenizer; "
                            f"set {key}=0")
        switch = "allow_images" if what == "image" else "allow_audio"
        if n and not allow:
            raise OmniError(f"{key}={n} needs {what} blocks, but {switch}=false; set {switch}=true or {key}=0")
    need = owed_tokens(config.min_images, config.min_audio, image_tokens)
    if max_new_tokens >= need:
        return
    parts = []
    if config.min_images:
        parts.append(f"min_images={config.min_images} image block(s) of {image_tokens + 2} tokens "
                     f"(<boi> + {image_tokens} codes + <eoi>)")
    if config.min_audio:
        parts.append(f"min_audio={config.min_audio} audio block(s) of at least {MIN_AUDIO_BLOCK} tokens "
                     "(<boa> + 1 code + <eoa>)")
    budget = f"max_new_tokens={config.max_new_tokens}" + (f" ({context}: {max_new_tokens} left)" if context else "")
    lower = " / ".join(k for k in ("min_images", "min_audio") if getattr(config, k))
    raise OmniError(f"{budget} cannot hold {' and '.join(parts)}: at least {need} new tokens are needed; "
                    f"raise max_new_tokens to {need} or more, or lower {lower}")


@dataclass
class RowState:
    remaining: int
    """New tokens this row may still emit, this step's included."""
    mode: str = TEXT_MODE
    count: int = 0
    """Codes emitted in the open block."""
    images: int = 0
    """Finished images."""
    audios: int = 0
    """Finished audio blocks."""
    tokens: list[int] = field(default_factory=list)
    """Emitted ids."""
    prompt_images: int = 0
    """Image blocks in the prompt (a ``<det>`` reads the last image before it)."""


class DecodeState:
    """Per-row modality state, advanced with every sampled token."""

    def __init__(self, vocab, batch: int, max_new_tokens: int, config: GenerateConfig, image_tokens: int | None):
        self.vocab, self.config = vocab, config
        self.image_tokens = image_tokens  # N codes per image block (None: no image tokenizer)
        self.rows = [RowState(remaining=max_new_tokens) for _ in range(batch)]
        sp = vocab.specials
        self.opens = vocab.openers  # the block grammar: opener id -> block kind ('image'/'audio' = the mode)
        self.boi, self.boa = vocab.opener(IMAGE_MODE), vocab.opener(AUDIO_MODE)
        self.eoi, self.eoa = vocab.closer(IMAGE_MODE), vocab.closer(AUDIO_MODE)
        self.eos, self.pad = sp["<eos>"], sp["<pad>"]

    @property
    def modes(self) -> list[str]:
        return [r.mode for r in self.rows]

    @property
    def finished(self) -> bool:
        return all(r.mode == DONE for r in self.rows)

    def advance(self, tokens: torch.Tensor) -> list[str | None]:
        """Take this step's tokens [B]; returns, per row, the block that just closed ('image'/'audio') or None."""
        closed: list[str | None] = []
        for r, t in zip(self.rows, tokens.tolist()):
            closed.append(None)
            if r.mode == DONE:
                continue
            r.tokens.append(t)
            r.remaining -= 1
            if r.mode == TEXT_MODE:
                if t in self.opens:
                    r.mode, r.count = self.opens[t], 0
                elif t == self.eos:
                    r.mode = DONE
            elif t == self.vocab.closer(r.mode):  # inside a block: its closer ends it
                closed[-1] = r.mode
                if r.mode == IMAGE_MODE:
                    r.images += 1
                else:
                    r.audios += 1
                r.mode = TEXT_MODE
                # max_images reached: stop, unless an audio block is still owed (then <boi> is masked)
                if 0 < self.config.max_images <= r.images and r.audios >= self.config.min_audio:
                    r.mode = DONE
            else:
                r.count += 1
            if r.remaining <= 0 and r.mode != DONE:
                r.mode = DONE
        return closed


class ModalityConstraint:
    """Mask logits [B, V] to the ids each row's state allows (-inf elsewhere).

    ``det`` / ``gen``: the routing token of the detection / diffusion head when the model has that head
    (else None). ``<det>`` is allowed in text once the row holds an image to read (in its prompt or
    made by then); ``<gen>`` when an image block (which the head makes and the row then holds) still
    fits, as ``<boi>`` is. Without a head the model cannot emit its token."""

    def __init__(self, vocab, config: GenerateConfig, has_image: bool, has_audio: bool,
                 det: int | None = None, gen: int | None = None):
        table = vocab.modality_table
        from omni.vocab import AUDIO, IMAGE, TEXT

        self.config, self.has_image, self.has_audio = config, has_image, has_audio
        self.det, self.gen = det, gen
        self.text_ids = table == TEXT
        self.image_ids = table == IMAGE
        self.audio_ids = table == AUDIO

    def owed(self, r: RowState) -> tuple[int, int]:
        """(image blocks, audio blocks) row ``r`` must still make for min_images / min_audio."""
        return max(0, self.config.min_images - r.images), max(0, self.config.min_audio - r.audios)

    def allowed(self, state: DecodeState, r: RowState) -> torch.Tensor:
        """The ids row ``r`` may emit next [V].

        The budget rule of min_images / min_audio: a choice is allowed only when the tokens left
        after it still hold the blocks owed after it (:func:`owed_tokens`). A text token costs one,
        a block its length: an image is <boi> + N codes + <eoi>, an audio block at least
        :data:`MIN_AUDIO_BLOCK` and closed early when the owed blocks need the rest. Since
        :func:`check_budget` checked the start, some choice always stays allowed: when text no
        longer fits, an owed block still does.
        """
        V = self.text_ids.numel()
        cfg = self.config
        n_img = state.image_tokens
        oi, oa = self.owed(r)
        if r.mode == IMAGE_MODE:
            if r.count < n_img:
                return self.image_ids
            return _one_hot(V, state.eoi)
        if r.mode == AUDIO_MODE:
            rest = owed_tokens(oi, max(0, oa - 1), n_img)  # owed once this block closes
            if r.count >= cfg.max_audio_tokens or r.remaining <= 1 + (rest if r.count >= 1 else 0):
                return _one_hot(V, state.eoa)  # the block must close now (one more code leaves too few tokens)
            allow = self.audio_ids.clone()
            allow[state.eoa] = r.count >= 1  # no empty audio block
            return allow
        if r.mode == DONE:
            return _one_hot(V, state.pad)
        need = owed_tokens(oi, oa, n_img)  # tokens the owed blocks take
        R = r.remaining  # this step's token included
        text_fits = R - 1 >= need
        allow = self.text_ids.clone() if cfg.allow_text and text_fits else torch.zeros(V, dtype=torch.bool)
        allow[state.eos] = oi == 0 and oa == 0  # no <eos> while a block is owed
        if self.det is not None and text_fits and r.images + r.prompt_images > 0:
            allow[self.det] = True  # one sampled token: its slots are fed, not sampled
        if (self.has_image and cfg.allow_images and r.images < cfg.max_images
                and R >= n_img + 2 + owed_tokens(max(0, oi - 1), oa, n_img)):
            allow[state.boi] = True  # N codes + <eoi> fit, and so do the blocks still owed after it
            if self.gen is not None and R >= n_img + 3 + owed_tokens(max(0, oi - 1), oa, n_img):
                allow[self.gen] = True  # <gen>, then the head's image block
        if self.has_audio and cfg.allow_audio and R >= MIN_AUDIO_BLOCK + owed_tokens(oi, max(0, oa - 1), n_img):
            allow[state.boa] = True  # one code + <eoa> fit, and so do the blocks still owed after it
        if not allow.any():  # only without check_budget's start (a processor used alone): give up, do not crash
            allow[state.eos] = True
        return allow

    def __call__(self, logits: torch.Tensor, state: DecodeState) -> torch.Tensor:
        mask = torch.stack([self.allowed(state, r) for r in state.rows]).to(logits.device)  # [B, V]
        return logits.masked_fill(~mask, float("-inf"))


def _one_hot(V: int, i: int) -> torch.Tensor:
    m = torch.zeros(V, dtype=torch.bool)
    m[i] = True
    return m


class ClassifierFreeGuidance:
    """``c + (s - 1)(c - u)`` per row, with the image or audio scale of the row's mode (text: none)."""

    def __init__(self, image_scale: float, audio_scale: float):
        self.scales = {IMAGE_MODE: image_scale, AUDIO_MODE: audio_scale}

    @property
    def active(self) -> bool:
        return any(s != 1.0 for s in self.scales.values())

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor, state: DecodeState) -> torch.Tensor:
        s = torch.tensor([self.scales.get(m, 1.0) for m in state.modes], dtype=cond.dtype, device=cond.device)
        return cond + (s - 1.0)[:, None] * (cond - uncond)


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top-k ids, then the smallest set reaching probability top_p (HF's rules); [V] -> [V]."""
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens after the set already reached top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution a sampler draws from: logits [V] -> probabilities [V] (one-hot at temperature 0)."""
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(0, logits.argmax()[None], 1.0)
    return apply_top_k_top_p(logits / temperature, top_k, top_p).softmax(-1)


class ModalitySampler:
    """Sample one token per row with the sampling settings of its modality."""

    def __init__(self, config: GenerateConfig, generator: torch.Generator):
        self.settings = {TEXT_MODE: config.text, IMAGE_MODE: config.image, AUDIO_MODE: config.audio,
                         DONE: SamplingConfig(temperature=0.0)}
        self.generator = generator

    def probs(self, logits: torch.Tensor, mode: str) -> torch.Tensor:
        """The distribution [V] this sampler draws from for one row's logits [V] in ``mode``
        (one-hot at temperature 0): also what speculative decoding compares guesses against."""
        s = self.settings[mode]
        return sampling_probs(logits, s.temperature, s.top_k, s.top_p)

    def __call__(self, logits: torch.Tensor, state: DecodeState) -> torch.Tensor:
        out = torch.empty(logits.shape[0], dtype=torch.long)
        for b, mode in enumerate(state.modes):
            if self.settings[mode].temperature == 0:  # greedy: no draw, the generator is not advanced
                out[b] = int(logits[b].float().argmax())
            else:
                out[b] = int(torch.multinomial(self.probs(logits[b], mode), 1, generator=self.generator))
        return out
