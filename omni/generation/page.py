"""Write generated documents as an HTML page and a Markdown file with an assets folder.

``write_page(entries, "out.html")`` writes ``out.html``, ``out.md`` and ``out_assets/`` (PNG
images, 16-bit WAV audio). Each entry is a prompt Document and its generated Document; every
segment appears in order: text as paragraphs, images as ``<img class="omni-image">`` in a
framed box, audio as ``<audio controls>``, and a ``Detect`` (the ``<det>`` head's answer) as the
image it was asked about (the last one before it, in the prompt or the output) with its boxes
drawn on, listed with their scores beneath (the Markdown lists them too).
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from omni.document import Audio, Detect, Document, Image, Text
from omni.errors import OmniError
from omni.io import atomic_write_text

CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #111; background: #fff; }
section { border-top: 1px solid #ddd; padding: 1rem 0; }
h2 { font-size: 1rem; color: #555; margin: 0.5rem 0; }
p { white-space: pre-wrap; margin: 0.4rem 0; }
.omni-image { display: inline-block; width: 160px; height: 160px; border: 6px solid #1f4fd8;
              margin: 8px; image-rendering: pixelated; object-fit: contain; background: #fff; }
audio { display: block; margin: 8px 0; }
table { border-collapse: collapse; margin: 1rem 0; }
td, th { border: 1px solid #ddd; padding: 0.3rem 0.6rem; text-align: left; }
h2.omni-label { font-size: 1.1rem; color: #111; }
figure.omni-det { display: inline-block; margin: 0; }
figure.omni-det figcaption { font-size: 0.85rem; color: #333; max-width: 20rem; }
"""
BOX_RGB = (255, 0, 255)
"""The color the detection boxes are drawn in (magenta: no toy-world object has it)."""
DET_SIDE = 160
"""Side in pixels of the image a Detect is drawn on (the page shows images at 160 px)."""


def _save_image(img: Image, path: Path) -> None:
    from PIL import Image as PILImage

    a = (img.pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(a).save(path)


def _save_audio(aud: Audio, path: Path) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), aud.wave.clamp(-1, 1).numpy(), aud.sample_rate, subtype="PCM_16")


def _save_detections(img: Image, det: Detect, path: Path) -> None:
    """``img`` upscaled (nearest) to DET_SIDE px with ``det``'s boxes drawn on, 2 px wide."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    a = (img.pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    pic = PILImage.fromarray(a).resize((DET_SIDE, DET_SIDE), PILImage.NEAREST)
    draw = ImageDraw.Draw(pic)
    for x0, y0, x1, y1 in det.boxes:
        draw.rectangle([x0 * DET_SIDE, y0 * DET_SIDE, x1 * DET_SIDE - 1, y1 * DET_SIDE - 1], outline=BOX_RGB, width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    pic.save(path)


def _box_lines(det: Detect) -> list[str]:
    scores = det.scores if det.scores is not None else [None] * len(det.boxes)
    return [f"({x0:.2f}, {y0:.2f}, {x1:.2f}, {y1:.2f})" + ("" if s is None else f" score {s:.2f}")
            for (x0, y0, x1, y1), s in zip(det.boxes, scores)]


def write_page(entries: list[tuple[Document | None, Document]], out_html: str | os.PathLike,
               title: str = "omni generations", labels: list[str] | None = None,
               summary: list[tuple[str, ...]] | None = None) -> Path:
    """Write the HTML page, the Markdown twin and the assets; returns the HTML path.

    ``labels``: a heading per entry (default: its number). ``summary``: rows of a table shown
    first (the first row is the header).
    """
    out_html = Path(out_html)
    assets = out_html.parent / f"{out_html.stem}_assets"
    if labels is not None and len(labels) != len(entries):
        raise OmniError(f"{len(labels)} labels for {len(entries)} entries")
    body, md = [], [f"# {title}\n"]
    if summary:
        head, *rows = summary
        body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
        body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows]
        body.append("</table>")
        md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    counter = {"image": 0, "audio": 0}

    counter["detect"] = 0
    last_image: list[Image] = []  # the image a Detect reads: the last one before it in its entry

    def render(doc: Document) -> tuple[list[str], list[str]]:
        h, m = [], []
        for seg in doc.segments:
            if isinstance(seg, Image):
                last_image[:] = [seg]
            if isinstance(seg, Text):
                h.append(f"<p>{html.escape(seg.text)}</p>")
                m.append(seg.text)
            elif isinstance(seg, Image):
                name = f"image_{counter['image']:03d}.png"
                counter["image"] += 1
                _save_image(seg, assets / name)
                rel = f"{assets.name}/{name}"
                h.append(f'<img class="omni-image" src="{rel}" alt="generated image {counter["image"]}">')
                m.append(f"![image {counter['image']}]({rel})")
            elif isinstance(seg, Audio):
                name = f"audio_{counter['audio']:03d}.wav"
                counter["audio"] += 1
                _save_audio(seg, assets / name)
                rel = f"{assets.name}/{name}"
                h.append(f'<audio controls src="{rel}"></audio>')
                m.append(f"[audio {counter['audio']}]({rel})")
            elif isinstance(seg, Detect):
                what = f"{len(seg.boxes)} box{'es' if len(seg.boxes) != 1 else ''}" + (
                    f" for “{seg.phrase}”" if seg.phrase else "")
                lines = _box_lines(seg)
                if last_image:
                    name = f"detect_{counter['detect']:03d}.png"
                    counter["detect"] += 1
                    _save_detections(last_image[0], seg, assets / name)
                    rel = f"{assets.name}/{name}"
                    h.append(f'<figure class="omni-det"><img class="omni-image" src="{rel}" alt="detections: {what}">'
                             f"<figcaption>{html.escape(what)}<br>{'<br>'.join(html.escape(x) for x in lines)}"
                             "</figcaption></figure>")
                    m.append(f"![detections: {what}]({rel})")
                else:
                    h.append(f"<p>detections: {html.escape(what)}<br>{'<br>'.join(html.escape(x) for x in lines)}</p>")
                m.append(f"detections: {what}" + "".join(f"\n- {x}" for x in lines))
        return h, m

    for i, (prompt, out) in enumerate(entries):
        last_image.clear()
        label = labels[i] if labels is not None else str(i + 1)
        body += ["<section>", f"<h2 class=\"omni-label\">{html.escape(label)}</h2>"] if labels is not None else ["<section>"]
        md.append(f"## {label}\n")
        if prompt is not None:
            ph, pm = render(prompt)
            body += ["<h2>prompt</h2>", *ph, "<h2>output</h2>"]
            md += ["**prompt**\n", *[x + "\n" for x in pm], "**output**\n"]
        oh, om = render(out)
        body += oh
        md += [x + "\n" for x in om]
        body.append("</section>")
    page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n" + "\n".join(body)
            + "\n</body></html>\n")
    atomic_write_text(out_html, page)
    atomic_write_text(out_html.with_suffix(".md"), "\n".join(md))
    return out_html
