"""Real data that ships offline: text as token datasets (what the training tests train on), and mixed
WebDataset shards of photos, speech, text and interleaved documents (what the data tests read)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np


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


def png_bytes(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(wave: np.ndarray, sr: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def mixed_samples() -> list[dict]:
    """Photos with captions, speech with transcripts, plain text, interleaved documents."""
    import pydoc_data.topics

    from omni.toy.photos import photos
    from omni.toy.speech import corpus

    pics = [(n, a[::8, ::8].copy()) for n, a in photos("all")[:6]]  # small thumbnails keep it fast
    utts = corpus(4, "train")
    speech = [(u.text, *u.synthesize()) for u in utts]
    texts = [pydoc_data.topics.topics[k][:600] for k in sorted(pydoc_data.topics.topics)[:8]]
    samples = []
    for i, (name, a) in enumerate(pics):
        samples.append({"__key__": f"photo{i:03d}", "png": png_bytes(a), "txt": f"a photo of {name.replace('_', ' ')}".encode()})
    for i, (text, wave, sr) in enumerate(speech):
        samples.append({"__key__": f"speech{i:03d}", "wav": wav_bytes(wave, sr), "txt": text.encode()})
    for i, t in enumerate(texts):
        samples.append({"__key__": f"text{i:03d}", "txt": t.encode()})
    for i in range(4):
        doc = {"segments": [
            {"text": "Describe the picture, then read the caption aloud.", "prompt": True},
            {"image": "0.png"},
            {"text": f"This is {pics[i][0]}."},
            {"audio": "1.wav"},
            {"image": "2.png"},
        ]}
        samples.append({"__key__": f"doc{i:03d}", "json": json.dumps(doc).encode(), "0.png": png_bytes(pics[i][1]),
                        "1.wav": wav_bytes(speech[i][1], speech[i][2]), "2.png": png_bytes(pics[i + 1][1])})
    return samples


def write_shards(samples: list[dict], folder: Path, per_shard: int) -> list[Path]:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(samples), per_shard):
        p = folder / f"part-{s // per_shard:03d}.tar"
        with wds.TarWriter(str(p)) as w:
            for sample in samples[s : s + per_shard]:
                w.write(sample)
        paths.append(p)
    return paths
