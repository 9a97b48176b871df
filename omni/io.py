"""Small file helpers: atomic writes (temp file + rename) and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete the temp files :func:`atomic_write_bytes` leaves when a process is killed between
    writing and renaming one; call only when nothing writes in ``folder`` any more. Returns how many."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink()
    return len(stale)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike, missing: str, format_version: int | None = None, what: str = "file") -> dict:
    """A JSON file written by omni; ``missing`` is the message when it is absent. With
    ``format_version``, its "format" key must match. Any problem is an OmniError naming the file."""
    import json

    from omni.errors import OmniError

    path = Path(path)
    if not path.is_file():
        raise OmniError(missing)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OmniError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise OmniError(f"{path} is not a JSON object")
    if format_version is not None and data.get("format") != format_version:
        raise OmniError(f"{path}: unsupported {what} format {data.get('format')!r} (this omni reads {format_version})")
    return data


def check_writable(folder: str | os.PathLike, what: str) -> Path:
    """Create ``folder`` (and its parents) and write a probe file in it, so an output that cannot be
    written fails in one line (OmniError naming ``what`` and the reason) before any work starts."""
    from omni.errors import OmniError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise OmniError(f"{what}: cannot write into {folder}: {reason}"
                        f"{f' ({e.filename})' if e.filename and str(e.filename) != str(folder) else ''}") from None
    return folder


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike):
    """Build a folder in a temp sibling (yielded) and rename it onto ``final`` when the block ends,
    replacing an older one; on any error the temp folder is removed and ``final`` is untouched. A
    reader never sees a half-written folder."""
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        yield tmp
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
