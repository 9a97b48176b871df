"""Real English text that is on every machine offline: Python's pydoc topic pages and, where
Debian's base-files are installed, the license texts under /usr/share/common-licenses.

``python -m omni.toy.text OUT.txt`` writes the corpus to a file.
"""

from __future__ import annotations

import sys
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")


def corpus_texts(licenses: bool = True) -> list[str]:
    """The pydoc topic pages (about 0.5 MB), then the license texts if present."""
    import pydoc_data.topics

    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    if licenses and LICENSES.is_dir():
        for p in sorted(LICENSES.iterdir()):
            if p.is_file() and not p.is_symlink():
                texts.append(p.read_text(encoding="utf-8", errors="replace"))
    return texts


def write_corpus(path: str | Path, licenses: bool = True) -> Path:
    from omni.io import atomic_write_text

    path = Path(path)
    atomic_write_text(path, "\n".join(corpus_texts(licenses)) + "\n")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m omni.toy.text OUT.txt", file=sys.stderr)
        sys.exit(2)
    out = write_corpus(sys.argv[1])
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
