"""Real text that ships offline, as token datasets: what the training tests train on."""

from __future__ import annotations

from pathlib import Path


def pydoc_topics() -> list[str]:
    """The stdlib's pydoc topic texts, in a fixed order: real text that ships offline."""
    import pydoc_data.topics

    return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]


def write_text_tokens(bundle: Path, out: Path, texts: list[str], prefix: str = "t") -> Path:
    """A token dataset ``out`` of ``texts`` (one document each) made with ``bundle`` through a real
    WebDataset shard and `omni data preprocess`'s function."""
    import webdataset as wds

    from omni.data.preprocess import preprocess

    raw = out.parent / f"{out.name}_raw"
    raw.mkdir(parents=True)
    with wds.TarWriter(str(raw / "text-000.tar")) as w:
        for i, t in enumerate(texts):
            w.write({"__key__": f"{prefix}{i:04d}", "txt": t.encode()})
    preprocess([str(raw)], bundle, out, progress=False)
    return out
