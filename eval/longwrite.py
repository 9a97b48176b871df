"""Long-output scoring after LongWriter-V (Zhang et al. 2025, arXiv 2502.14834): the length score S_l.

MMLongBench-Write scores an output by its length against the required length and by its quality,
and reports S = (S_l + S_q) / 2. The length score is the paper's Eq. 6, with produced length l_v
and required length l_r:

    S_l = 100 * max(0, 1 - (l_v / l_r - 1) / 3)   if l_v > l_r
    S_l = 100 * max(0, 1 - (l_r / l_v - 1) / 2)   otherwise

so writing three times too much, or a third of what was asked, scores 0. LongWriter-V's released
code swaps the two divisors (3 for too short, 2 for too long); this follows the paper.
"""

from __future__ import annotations

from omni.errors import OmniError


def length_score(produced: float, required: float) -> float:
    """S_l in [0, 100] of an output of ``produced`` units (words, steps) where ``required`` were asked."""
    if required <= 0:
        raise OmniError(f"the required length must be > 0, got {required}")
    if produced <= 0:
        return 0.0
    if produced > required:
        return 100.0 * max(0.0, 1.0 - (produced / required - 1.0) / 3.0)
    return 100.0 * max(0.0, 1.0 - (required / produced - 1.0) / 2.0)


def overall_score(length: float, quality: float) -> float:
    """S = (S_l + S_q) / 2, both in [0, 100]."""
    return (length + quality) / 2.0
