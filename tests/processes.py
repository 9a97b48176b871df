"""Real kills: start a training command, signal it once it has logged a step."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def signal_after_first_step(cmd: list[str], out: Path, sig: int, timeout: float = 180) -> tuple[int, str, str]:
    """Run ``cmd`` (from the repository's parent, one thread a process), send ``sig`` once
    ``out/metrics.jsonl`` holds a row; (exit code, stdout, stderr)."""
    p = subprocess.Popen(cmd, cwd=ROOT.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.02)
    p.send_signal(sig)
    stdout, err = p.communicate(timeout=timeout)
    return p.returncode, stdout, err
