"""Real kills: start a training command, signal it once it has logged a step."""

from __future__ import annotations

import os
import subprocess
import sys
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


def torchrun_train(recipe: Path, *overrides: str, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node NPROC -m omni train RECIPE --quiet OVERRIDES` (gloo on
    CPU, one thread a process), from the repository's parent; its output captured as text."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                           "-m", "omni", "train", str(recipe), "--quiet", *overrides],
                          cwd=ROOT.parent, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
