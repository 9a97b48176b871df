"""Rotary position encodings: the math of every ``model.rope.kind``, as pure functions on tensors.

RoPE (Su et al. 2021, RoFormer, https://arxiv.org/abs/2104.09864) rotates frequency pair i of a
head (dims i and i + d/2: the ``rotate_half`` layout of omni.model.apply_rope) by the angle
``position * inv_freq[i]``, ``inv_freq[i] = theta ** (-2i / d)``. Pair 0 turns fastest. Every
variant here only changes ``inv_freq`` (per pair), the positions, or scales cos/sin:

- ``rope`` with ``scaling``:
  'none': the above;
  'linear': position interpolation (Chen et al. 2023, https://arxiv.org/abs/2306.15595), positions
  divided by the factor s, done here as ``inv_freq / s`` (the same angles; transformers' 'linear');
  'ntk': NTK-aware base scaling (bloc97, 2023, "NTK-Aware Scaled RoPE", discussed in the YaRN paper's
  section 3.1): base ``theta * s ** (d / (d - 2))``, which stretches the lowest frequency by s and
  leaves the highest nearly as it was (transformers' 'dynamic' at the length where its ratio is s).
- ``yarn`` (Peng et al. 2023, https://arxiv.org/abs/2309.00071, "NTK-by-parts" + attention
  temperature): pairs that turn more than ``beta_fast`` times over the original context keep their
  frequency, those that turn fewer than ``beta_slow`` times are divided by s, a linear ramp over the
  pair index blends in between; cos and sin are multiplied by the attention factor
  ``0.1 * mscale * ln(s) + 1`` (over the same with ``mscale_all_dim``), as megatron-core's
  ``YarnRotaryEmbedding`` and transformers' ``_compute_yarn_parameters``.
- ``mrope`` (Qwen2-VL, Wang et al. 2024, https://arxiv.org/abs/2409.12191): positions are 3-D
  (time, height, width) and the d/2 pairs are split into three contiguous sections
  ``mrope_section`` (16/24/24 of 64 in Qwen2-VL): pair i takes its angle from the row of its
  section. Transformers 5.x (``Qwen2VLRotaryEmbedding.recomposition_frequencies``) splits the d/2
  frequencies and then concatenates the result with itself, so both rotate_half halves carry the
  same [t | h | w] layout; this module does the same (pair i = dims i and i + d/2, one section).
  The time section holds the HIGHEST frequencies, width the lowest. Text tokens have equal rows
  (p, p, p), which is exactly 1-D RoPE.
- ``mrope_plus``: M-RoPE++ (GIRAFFE, Li et al. 2024, https://arxiv.org/abs/2412.12735), as its
  paper defines it, s = the extension ratio ``factor``: the temporal section is extrapolated
  (``inv_freq`` unchanged), the width section linearly interpolated (``inv_freq / s``) and the height
  section blended YaRN-style from 1 to 1/s over its pairs (its highest frequency keeps theta, its
  lowest gets theta / s, a linear ramp between). The released code
  (github.com/kiaia/GIRAFFE, models/mrope_plus_mokey_patch.py) differs: its width section uses an
  NTK-scaled base and its height a constant mix of linear and NTK (``ntk_factor``); this module
  follows the paper. With s = 1 it is ``mrope`` exactly.

M-RoPE's position ids come from the token ids through the vocabulary's block grammar:
:func:`mrope_positions`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from omni.config.model import MROPE_KINDS
from omni.errors import OmniError
from omni.vocab import IMAGE as _IMAGE

if TYPE_CHECKING:  # pragma: no cover
    from omni.config.model import RopeConfig
    from omni.vocab import UnifiedVocab

QWEN2VL_SECTION = (16, 24, 24)
"""Qwen2-VL's (time, height, width) pairs of its 64 (head_dim 128)."""


# ----------------------------------------------------------------------------------------------
# Frequencies
# ----------------------------------------------------------------------------------------------
def base_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """[d/2] fp32: theta ** (-2i / d), pair 0 the fastest. The expression omni.model always used
    (bit for bit: the default kind must not move the goldens)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def ntk_theta(theta: float, factor: float, head_dim: int) -> float:
    """NTK-aware base: theta * s ** (d / (d - 2)). The lowest pair (exponent (d-2)/d) then turns s
    times slower, the highest (exponent 0) not at all."""
    return theta * factor ** (head_dim / (head_dim - 2))


def yarn_correction_range(beta_fast: float, beta_slow: float, head_dim: int, theta: float,
                          original_max_position_embeddings: int) -> tuple[float, float]:
    """(low, high) pair indices of YaRN's ramp: the pair that turns ``beta_fast`` (resp. ``beta_slow``)
    times over the original context, floored (ceiled) and clamped to [0, d - 1], as megatron-core and
    transformers (``truncate=True``) do."""
    def pair(rotations: float) -> float:  # solves L / (2 pi theta^(2i/d)) = rotations for i
        return head_dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    return max(math.floor(pair(beta_fast)), 0), min(math.ceil(pair(beta_slow)), head_dim - 1)


def yarn_inv_freq(head_dim: int, theta: float, factor: float, original_max_position_embeddings: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0, device=None) -> torch.Tensor:
    """[d/2] fp32: YaRN's per-pair blend of extrapolated (inv_freq) and interpolated (inv_freq / s)
    frequencies (transformers' ``_compute_yarn_parameters``, operation for operation)."""
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)  # [d/2]
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    low, high = yarn_correction_range(beta_fast, beta_slow, head_dim, theta, original_max_position_embeddings)
    if low == high:
        high += 0.001  # as both references: no division by zero when the range collapses
    ramp = ((torch.arange(head_dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: pair kept (fast pairs, index < low), 0: interpolated (slow pairs, index > high)
    return interpolation * (1 - keep) + extrapolation * keep


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's eq. (21) temperature term: 0.1 * mscale * ln(s) + 1 (1 for s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(factor: float, mscale: float = 1.0, mscale_all_dim: float = 0.0) -> float:
    """The factor multiplying cos and sin: mscale(s, mscale) / mscale(s, mscale_all_dim), as
    megatron-core's ``_yarn_get_concentration_factor``. (Transformers agrees except for mscale != 1
    with mscale_all_dim = 0, where it ignores mscale and returns 0.1 ln(s) + 1.)"""
    return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))


def default_mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's 16/24/24 proportion of ``head_dim / 2`` pairs: time a quarter (rounded), the rest
    split between height and width (width takes an odd one). 128 -> [16, 24, 24]; 16 -> [2, 3, 3]."""
    half = head_dim // 2
    t = round(half * QWEN2VL_SECTION[0] / sum(QWEN2VL_SECTION))
    h = (half - t) // 2
    return [t, h, half - t - h]


def mrope_section(rope: RopeConfig | None, head_dim: int) -> list[int] | None:
    """The (time, height, width) pairs of an M-RoPE kind (the configured ones or the default), else None."""
    if rope is None or rope.kind not in MROPE_KINDS:
        return None
    return list(rope.mrope_section) if rope.mrope_section is not None else default_mrope_section(head_dim)


def mrope_plus_inv_freq(head_dim: int, theta: float, factor: float, section: Sequence[int],
                        device=None) -> torch.Tensor:
    """[d/2] fp32: M-RoPE++ (paper form). Per section of ``section`` = (t, h, w) pairs:
    time unchanged, width inv_freq / s, height inv_freq * (g + (1 - g) / s) with g a linear ramp
    from 1 (its first, fastest pair) to 0 (its last); one height pair keeps its frequency."""
    inv_freq = base_inv_freq(head_dim, theta, device)
    t, h, _ = section
    inv_s = 1.0 / factor
    scale = torch.ones_like(inv_freq)  # [d/2]
    scale[t + h:] = inv_s  # width: position interpolation
    if h:
        g = 1 - torch.arange(h, device=device, dtype=torch.float32) / max(h - 1, 1)  # 1 .. 0
        # written as 1/s + g (1 - 1/s): exactly 1 where g = 1 or s = 1 (so s = 1 is mrope bit for bit)
        scale[t:t + h] = inv_s + g * (1 - inv_s)
    return inv_freq * scale


def frequencies(rope: RopeConfig | None, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, float]:
    """(inv_freq [d/2] fp32, attention scaling of cos/sin) of ``rope`` (None: plain RoPE)."""
    kind = "rope" if rope is None else rope.kind
    if kind == "yarn":
        inv = yarn_inv_freq(head_dim, theta, rope.factor, rope.original_max_position_embeddings,
                            rope.beta_fast, rope.beta_slow, device)
        return inv, yarn_attention_factor(rope.factor, rope.mscale, rope.mscale_all_dim)
    if kind == "mrope_plus":
        return mrope_plus_inv_freq(head_dim, theta, rope.factor, mrope_section(rope, head_dim), device), 1.0
    scaling = "none" if rope is None else rope.scaling
    if scaling == "ntk":
        return base_inv_freq(head_dim, ntk_theta(theta, rope.factor, head_dim), device), 1.0
    inv = base_inv_freq(head_dim, theta, device)  # rope, mrope: the plain frequencies
    return (inv / rope.factor if scaling == "linear" else inv), 1.0


# ----------------------------------------------------------------------------------------------
# cos / sin
# ----------------------------------------------------------------------------------------------
def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, attention_scaling: float = 1.0,
            section: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] (1-D) or [3, B, T] (M-RoPE: time, height, width rows; needs ``section``)
    -> (cos, sin), each [B, 1, T, d] in ``dtype`` (broadcast over heads), scaled by ``attention_scaling``."""
    pos = positions.float()
    if positions.dim() == 3:
        if section is None or positions.shape[0] != 3:
            raise OmniError(f"3-D positions must be [3, B, T] with an M-RoPE section, got {tuple(positions.shape)}")
        # pair i takes its position from the row of its section: [d/2] row index, rows gathered
        # to [d/2, B, T], pairs moved last -> [B, T, d/2]
        axis = torch.repeat_interleave(torch.arange(3, device=pos.device), torch.tensor(list(section), device=pos.device))
        pos = pos[axis].permute(1, 2, 0)
        freqs = pos * inv_freq  # [B, T, d/2]
    else:
        freqs = pos[..., None] * inv_freq  # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, d]: halves layout (rotate_half)
    cos, sin = emb.cos(), emb.sin()
    if attention_scaling != 1.0:  # YaRN's temperature, in fp32 before the cast (as both references)
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


# ----------------------------------------------------------------------------------------------
# M-RoPE position ids from the block grammar
# ----------------------------------------------------------------------------------------------
def _document_positions(seq: np.ndarray, vocab: UnifiedVocab, out: np.ndarray, start: int) -> int:
    """Fill out [3, len(seq)] with one document's M-RoPE positions from ``start``; return the next."""
    p = start  # the position of the next token: max of all positions so far + 1
    for piece in vocab.scan(seq):
        a = piece.start
        if piece.kind == "image":
            out[:, a] = p  # the opener <boi>: an ordinary 1-D position
            p += 1
            n = piece.stop - a - 1  # codes (fewer than the grid's in an unfinished block)
            if n:
                if vocab.image_grid is None:
                    raise OmniError("the vocab records no image_grid: M-RoPE positions need the (rows, cols) "
                                    "of an image block")
                rows, cols = vocab.image_grid
                if n > rows * cols:
                    raise OmniError(f"image block at position {a} holds {n} codes, more than its "
                                    f"{rows}x{cols} grid")
                k = np.arange(n)
                r, c = k // cols, k % cols  # row-major codes
                out[0, a + 1:piece.stop] = p  # time: the block's base
                out[1, a + 1:piece.stop] = p + r
                out[2, a + 1:piece.stop] = p + c
                p += max(int(r.max()), int(c.max())) + 1  # Qwen2-VL: base + max(rows, cols) for a full grid
            if piece.closed:  # the closer <eoi> continues at max + 1
                out[:, piece.stop] = p
                p += 1
        else:  # text, specials, invalid ids and audio blocks: 1-D, (p, p, p) each
            n = piece.end - a
            out[:, a:piece.end] = p + np.arange(n)
            p += n
    return p


def mrope_positions(ids: Any, vocab: UnifiedVocab, doc_ids: Any = None, start: int = 0):
    """M-RoPE position ids of one sequence: ids [T] (list, numpy or torch) -> (positions [3, T], next).

    Rows are (time, height, width). Text ids, specials, audio codes and the openers/closers are 1-D:
    (p, p, p), p advancing by one. An image block ``<boi> c_1 .. c_N <eoi>`` with grid (rows, cols)
    (``vocab.image_grid``): ``<boi>`` at p, code k at (base, base + k // cols, base + k % cols) with
    base = p + 1, and ``<eoi>`` at max(all positions so far) + 1 (= base + max(rows, cols)), as
    Qwen2-VL's ``get_rope_index`` with a one-frame image. ``doc_ids`` [T] (packed documents,
    contiguous): positions restart at 0 per document. ``start``: the first (or only) document's first
    position, for a continuation of a cached prefix.

    ``next`` is the position of the token after ``ids`` in the last document (max + 1): what
    ``start`` of a continuation takes. A continuation that begins inside an unfinished image block
    needs the block's layout: call again from the block's opener (or the document's start), or
    keep a :class:`MRopeCursor`, which carries it (what generation does).
    Returns a torch long tensor on the device of torch ``ids``, else a numpy int64 array.
    """
    is_torch = isinstance(ids, torch.Tensor)
    seq = ids.detach().cpu().numpy() if is_torch else np.asarray(ids)
    if seq.ndim != 1:
        raise OmniError(f"mrope_positions takes one sequence of ids [T], got shape {seq.shape}")
    T = len(seq)
    out = np.zeros((3, T), dtype=np.int64)
    if doc_ids is None:
        bounds = [0, T]
    else:
        docs = doc_ids.detach().cpu().numpy() if isinstance(doc_ids, torch.Tensor) else np.asarray(doc_ids)
        if docs.shape != seq.shape:
            raise OmniError(f"doc_ids must have the shape of ids {seq.shape}, got {docs.shape}")
        bounds = [0, *(np.flatnonzero(docs[1:] != docs[:-1]) + 1).tolist(), T]
    nxt = start
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        nxt = _document_positions(seq[a:b], vocab, out[:, a:b], start if i == 0 else 0)
    if is_torch:
        return torch.from_numpy(out).to(ids.device), nxt
    return out, nxt


def uses_mrope(model) -> bool:
    """Whether ``model`` (an OmniDecoder) rotates by 3-D positions: ``model.rope.kind`` mrope / mrope_plus."""
    rope = getattr(getattr(model, "config", None), "rope", None)
    return rope is not None and rope.kind in MROPE_KINDS


def batch_positions(rows: Sequence[Any], vocab: UnifiedVocab, length: int, left: bool = False) -> torch.Tensor:
    """M-RoPE positions [3, len(rows), length] of token rows padded to ``length`` (on the right, or on
    the ``left``): each row's :func:`mrope_positions` from 0 where it starts, 0 on the padding (which
    no token attends to)."""
    out = torch.zeros(3, len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        r = r.tolist() if isinstance(r, torch.Tensor) else list(r)
        pos = torch.from_numpy(mrope_positions(np.asarray(r, dtype=np.int64), vocab)[0])  # [3, len(r)]
        if left:
            out[:, i, length - len(r):] = pos
        else:
            out[:, i, :len(r)] = pos
    return out


class MRopeCursor:
    """The M-RoPE position of a growing sequence (a decoding row): :meth:`extend` gives the positions of
    the tokens appended next, equal to :func:`mrope_positions` of the whole sequence at those places.

    Qwen2-VL keeps ``rope_deltas`` (next position minus the token count) per row, since it gets a whole
    image at once; here image codes are generated one by one, so the cursor keeps the block grammar's
    state: the next position (max of all so far + 1) and, inside an open image block, the block's base
    and the codes seen (code k at (base, base + k // cols, base + k % cols); the next position after it
    is base + max(row, col) + 1, so the token after an image block continues at max + 1).
    """

    def __init__(self, vocab: UnifiedVocab, start: int = 0):
        self.vocab = vocab
        self.next = start
        self.base: int | None = None  # inside an open image block: its codes' time position
        self.codes = 0  # codes of the open image block so far
        self._boi = vocab.opener("image")
        self._image = (vocab.modality_table == _IMAGE).numpy()  # [V] bool: image code ids

    @classmethod
    def prefill(cls, ids: Any, vocab: UnifiedVocab, start: int = 0) -> tuple[np.ndarray, MRopeCursor]:
        """(positions [3, T] of ``ids`` (:func:`mrope_positions`, numpy), a cursor that continues after them),
        also when ``ids`` ends inside an unfinished image block."""
        seq = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids, dtype=np.int64)
        pos, nxt = mrope_positions(seq, vocab, start=start)
        cursor = cls(vocab, nxt)
        opens = np.flatnonzero(seq == cursor._boi)
        if len(opens):  # every <boi> starts a block; it is open when only image codes follow it
            j = int(opens[-1])
            tail = seq[j + 1:]
            if cursor._is_code(tail).all():
                cursor.base, cursor.codes = int(pos[0, j]) + 1, len(tail)
        return pos, cursor

    def _is_code(self, ids: np.ndarray) -> np.ndarray:
        ok = (ids >= 0) & (ids < len(self._image))
        return ok & self._image[np.where(ok, ids, 0)]

    def clone(self) -> MRopeCursor:
        """A copy whose state moves independently (the vocab and its tables are shared)."""
        return copy.copy(self)

    def extend(self, ids: Any) -> np.ndarray:
        """The positions [3, n] (int64 numpy) of ``ids`` appended to the sequence; the cursor moves past them."""
        seq = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids, dtype=np.int64)
        seq = seq.reshape(-1)
        out = np.empty((3, len(seq)), dtype=np.int64)
        codes = self._is_code(seq)
        for i, t in enumerate(seq.tolist()):
            if self.base is not None:
                if codes[i]:
                    if self.vocab.image_grid is None:
                        raise OmniError("the vocab records no image_grid: M-RoPE positions need the (rows, cols) "
                                        "of an image block")
                    rows, cols = self.vocab.image_grid
                    k = self.codes
                    if k >= rows * cols:
                        raise OmniError(f"an image block holds more codes than its {rows}x{cols} grid")
                    r, c = divmod(k, cols)
                    out[0, i], out[1, i], out[2, i] = self.base, self.base + r, self.base + c
                    self.codes = k + 1
                    # the max over codes 0..k of max(row, col), + 1
                    self.next = self.base + max(r, min(k, cols - 1)) + 1
                    continue
                self.base = None  # the block ends here (its closer or anything else): 1-D from here
            out[:, i] = self.next
            self.next += 1
            if t == self._boi:
                self.base, self.codes = self.next, 0
        return out


__all__ = [
    "QWEN2VL_SECTION", "base_inv_freq", "ntk_theta", "yarn_correction_range", "yarn_inv_freq", "yarn_mscale",
    "yarn_attention_factor", "default_mrope_section", "mrope_section", "mrope_plus_inv_freq", "frequencies",
    "cos_sin", "mrope_positions", "MRopeCursor",
]
