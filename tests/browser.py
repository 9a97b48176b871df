"""Headless Chromium (Debian's, installed by `make test`): a page's screenshot as an RGB array."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np


def screenshot(page: Path, work: Path, size: str = "1200,900") -> np.ndarray:
    """int [H, W, 3] of ``page`` rendered at window ``size`` (profile and PNG under ``work``)."""
    from PIL import Image

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    shot = work / "shot.png"
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={work / 'profile'}", "--hide-scrollbars", f"--window-size={size}",
                        f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-2000:]
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)
