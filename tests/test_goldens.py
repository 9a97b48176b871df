"""Golden numerics: the tiny decoder's logits and a short text run's losses equal the stored ones.

These pin the function, not just shapes, so a refactor that changes the numbers fails here. The
goldens in tests/assets/ are regenerated, from the repository root, with

    .venv/bin/python tests/assets/make_goldens.py

and only when a change is MEANT to change the function (say so in the commit); never to make this
test pass after a change that should have kept the numbers.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_SCRIPT = Path(__file__).parent / "assets" / "make_goldens.py"


def _load_script():
    """The script itself, so test and goldens are computed by the same code."""
    spec = importlib.util.spec_from_file_location("make_goldens", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


goldens = _load_script()


def _close(actual, expected):
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)


def test_tiny_logits_match_golden():
    expected = json.loads(goldens.LOGITS_FILE.read_text())
    actual = goldens.tiny_logits()
    assert actual.keys() == expected.keys()
    for case in expected:
        _close(actual[case]["logits"], expected[case]["logits"])
        _close(actual[case]["loss"], expected[case]["loss"])


@pytest.mark.slow
def test_text_losses_match_golden(tmp_path):
    expected = json.loads(goldens.LOSSES_FILE.read_text())
    actual = goldens.text_losses(tmp_path)
    assert len(actual) == expected["steps"] == len(expected["losses"])
    _close(actual, expected["losses"])
