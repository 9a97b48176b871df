"""Raw WebDataset samples -> omni Documents (with prompt marks for SFT loss masking).

A sample is the group of tar members that share a key (``000123.jpg``, ``000123.txt``, ...).
Recognized samples (the format is documented in docs/data.md):

* plain text: ``.txt``
* a pair: an image (:data:`omni.media.IMAGE_EXTS`) or a clip (``.wav .flac .ogg``) plus its
  ``.txt`` caption or transcript; a lone image or clip is a document of its own
* an interleaved document: ``.json`` with ``{"segments": [...]}``, each segment one of
  ``{"text": str}``, ``{"image": EXT}`` or ``{"audio": EXT}`` naming a member of the same sample
  (``"image": "0.png"`` is member ``KEY.0.png``), and optionally ``"prompt": true`` (no loss on
  its tokens in SFT); and the routing segments ``{"det": {"boxes": [[x0, y0, x1, y1], ...],
  "phrase": str}}`` (the boxes the detection head should find in the image before it, fractions of
  its size; ``[]`` when nothing matches) and ``{"gen": EXT}`` (the image the diffusion head should
  make: it follows ``<gen>`` as an ordinary image block that the language model is not trained to
  write)

Anything else raises :class:`omni.media.BadSample` with one of :data:`omni.media.REASONS`, which the
manifest counts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from omni.document import Audio, Detect, Document, Generate, Image, Text
from omni.errors import OmniError
from omni.media import AUDIO_EXTS, IMAGE_EXTS, TEXT_EXTS, BadSample, read_audio, read_image, read_text


@dataclass
class ParsedSample:
    key: str
    doc: Document
    prompt: list[bool]
    """Per segment of ``doc``: True for prompt segments (masked out of the loss in SFT)."""


def _image(data: bytes) -> Image:
    return Image(read_image(data))


def _audio(data: bytes) -> Audio:
    wave, sr = read_audio(data)
    return Audio(wave, sr)


def _pair_media_first(key: str, order: str, seed: int) -> bool:
    if order == "media_first":
        return True
    if order == "text_first":
        return False
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return digest[0] % 2 == 0


def parse_sample(sample: dict, pair_order: str = "random", seed: int = 0) -> ParsedSample:
    """One grouped WebDataset sample (``{"__key__": ..., EXT: bytes}``) -> a Document."""
    key = sample.get("__key__", "?")
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    if "json" in members:
        try:
            spec = json.loads(members["json"].decode("utf-8"))
            segs = spec["segments"]
            if not isinstance(segs, list) or not segs:
                raise ValueError("'segments' must be a non-empty list")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise BadSample("bad_json", f"{type(e).__name__}: {e}") from None
        doc, prompt = _segments(segs, members, key)
        return ParsedSample(key, doc, prompt)

    exts = set(members)
    images = [e for e in exts if e in IMAGE_EXTS]
    audios = [e for e in exts if e in AUDIO_EXTS]
    texts = [e for e in exts if e in TEXT_EXTS]
    if len(images) + len(audios) > 1 or len(texts) > 1 or not (images or audios or texts):
        raise BadSample("unrecognized_sample", f"members {sorted(exts)}")
    media = _image(members[images[0]]) if images else _audio(members[audios[0]]) if audios else None
    text = Text(read_text(members[texts[0]])) if texts else None
    if media is None:
        segs = [text]
    elif text is None:
        segs = [media]
    else:
        segs = [media, text] if _pair_media_first(key, pair_order, seed) else [text, media]
    return ParsedSample(key, Document(segs), [False] * len(segs))


def _segments(segs: list, members: dict, key: str) -> tuple[Document, list[bool]]:
    """A json segments list -> (Document, per-segment prompt flags)."""
    doc, prompt = Document(), []
    for i, seg in enumerate(segs):
        if not isinstance(seg, dict):
            raise BadSample("bad_json", f"segment {i} is not an object")
        if "text" in seg and isinstance(seg["text"], str):
            doc.segments.append(Text(seg["text"]))
        elif "image" in seg or "audio" in seg:
            kind = "image" if "image" in seg else "audio"
            ref = str(seg[kind]).lower()
            if ref not in members:
                raise BadSample("missing_member", f"segment {i} names {key}.{ref}, which the sample lacks")
            doc.segments.append(_image(members[ref]) if kind == "image" else _audio(members[ref]))
        elif "det" in seg:
            if not any(isinstance(s, Image) for s in doc.segments):
                raise BadSample("bad_json", f"segment {i}: a det segment needs an image before it (the image "
                                "the request is about)")
            try:
                spec = seg["det"]
                doc.segments.append(Detect([tuple(b) for b in spec["boxes"]], phrase=str(spec.get("phrase", ""))))
            except (OmniError, KeyError, TypeError) as e:
                raise BadSample("bad_json", f"segment {i}: det needs {{'boxes': [[x0, y0, x1, y1], ...]}} in "
                                f"[0, 1]: {e}") from None
        elif "gen" in seg:
            ref = str(seg["gen"]).lower()
            if ref not in members:
                raise BadSample("missing_member", f"segment {i} names {key}.{ref}, which the sample lacks")
            doc.segments += [Generate(), _image(members[ref])]
            prompt += [False, True]  # <gen> is predicted; the image is the head's to make
            continue
        else:
            raise BadSample("bad_json", f"segment {i} has none of text/image/audio/det/gen: {seg!r}")
        prompt.append(bool(seg.get("prompt", False)))
    return doc, prompt


@dataclass
class ParsedPair:
    """A preference sample: one prompt and two responses to it (train.stage=dpo)."""

    key: str
    prompt: Document
    chosen: Document
    """The preferred response."""
    rejected: Document
    """The dispreferred response."""
    chosen_ends: bool = True
    """Whether the chosen response is a whole output (``<eos>`` after it) or a prefix (none: IterDPO)."""
    rejected_ends: bool = True
    """The same for the rejected response."""


def is_pair(sample: dict) -> bool:
    """Whether a grouped sample is a preference sample (its json names a 'chosen' response)."""
    try:
        return "chosen" in json.loads(sample["json"].decode("utf-8"))
    except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError):
        return False


def parse_pair(sample: dict) -> ParsedPair:
    """One grouped WebDataset preference sample -> a :class:`ParsedPair`.

    Its ``KEY.json`` holds ``{"prompt": [...], "chosen": [...], "rejected": [...]}``, three segment
    lists of the document format (members named as there; ``prompt`` may be empty), and optionally
    ``"chosen_ends"`` / ``"rejected_ends"`` (default true): false makes that side a prefix of an
    output, written without ``<eos>`` (IterDPO's prefix pairs); a side that ends may be empty (the
    output was ``<eos>`` alone). Routing segments (det, gen) are not preference material; two
    identical responses teach nothing: both are skipped as ``bad_pair``."""
    key = sample.get("__key__", "?")
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    if "json" not in members:
        raise BadSample("bad_pair", f"a preference sample needs KEY.json with prompt/chosen/rejected; members "
                        f"{sorted(members)}")
    try:
        spec = json.loads(members["json"].decode("utf-8"))
        parts = {name: spec[name] for name in ("prompt", "chosen", "rejected")}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise BadSample("bad_pair", f"{type(e).__name__}: {e} (a preference sample's json holds the segment "
                        "lists 'prompt', 'chosen' and 'rejected')") from None
    ends = {name: spec.get(f"{name}_ends", True) for name in ("chosen", "rejected")}
    if not all(isinstance(v, bool) for v in ends.values()):
        raise BadSample("bad_pair", f"chosen_ends / rejected_ends must be true or false, got {ends}")
    docs = {}
    for name, segs in parts.items():
        if not isinstance(segs, list) or (not segs and not ends.get(name, True)):
            raise BadSample("bad_pair", f"'{name}' must be a list of segments (non-empty where it does not end)")
        if any(isinstance(seg, dict) and ("det" in seg or "gen" in seg) for seg in segs):
            raise BadSample("bad_pair", f"'{name}' holds a det/gen routing segment: preference pairs are text, "
                            "images and audio")
        docs[name] = _segments(segs, members, key)[0]
    if ends["chosen"] == ends["rejected"] and _same_segments(parts["chosen"], parts["rejected"], members):
        raise BadSample("bad_pair", "the chosen and the rejected response are the same")
    return ParsedPair(key, docs["prompt"], docs["chosen"], docs["rejected"], ends["chosen"], ends["rejected"])


def _same_segments(a: list, b: list, members: dict) -> bool:
    """Whether two segment lists say the same: equal texts, and media members of equal bytes."""
    def content(segs):
        return [json.dumps({k: (members.get(str(v).lower()) if k in ("image", "audio") else v)
                            for k, v in seg.items() if k != "prompt"}, default=bytes.hex, sort_keys=True)
                if isinstance(seg, dict) else repr(seg) for seg in segs]

    return content(a) == content(b)
