"""LongWriter-V's length score (eval/longwrite.py) at the paper's break points (Eq. 6)."""

from __future__ import annotations

import pytest

from omni.errors import OmniError
from omni.eval.longwrite import length_score, overall_score


@pytest.mark.parametrize("produced, required, expected", [
    (10, 10, 100.0),   # exactly as asked
    (40, 10, 0.0),     # four times too long: (4 - 1) / 3 = 1
    (25, 10, 50.0),    # 2.5x: 1 - 1.5 / 3
    (50, 10, 0.0),     # beyond: clipped at 0
    (10, 30, 0.0),     # a third of it: (3 - 1) / 2 = 1
    (20, 40, 50.0),    # half: 1 - 1 / 2
    (8, 10, 87.5),     # 1 - 0.25 / 2
    (12, 10, 100.0 * (1 - 0.2 / 3)),
    (0, 10, 0.0),      # nothing written
])
def test_length_score_follows_the_papers_equation(produced, required, expected):
    assert length_score(produced, required) == pytest.approx(expected)


def test_the_paper_not_the_released_code_divisors():
    # too long by 1.5x: the paper's divisor 3 gives 83.3; the released code's 2 would give 75
    assert length_score(15, 10) == pytest.approx(100 * (1 - 0.5 / 3))
    # too short by 1.5x: the paper's divisor 2 gives 75; the code's 3 would give 83.3
    assert length_score(10, 15) == pytest.approx(75.0)
    assert overall_score(80.0, 40.0) == 60.0
    with pytest.raises(OmniError, match="required length"):
        length_score(5, 0)
