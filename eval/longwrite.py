"""Long output after LongWriter-V (Zhang et al. 2025, arXiv 2502.14834): length and quality scores,
the toy world's long-story suite (`omni eval longwrite`) and the corrections its IterDPO loop trains on.

MMLongBench-Write scores an output by its length against the required length and by its quality,
and reports S = (S_l + S_q) / 2. The length score is the paper's Eq. 6, with produced length l_v
and required length l_r:

    S_l = 100 * max(0, 1 - (l_v / l_r - 1) / 3)   if l_v > l_r
    S_l = 100 * max(0, 1 - (l_r / l_v - 1) / 2)   otherwise

so writing three times too much, or a third of what was asked, scores 0. LongWriter-V's released
code swaps the two divisors (3 for too short, 2 for too long); this follows the paper.

**The suite** (``omni eval longwrite --checkpoint DIR longwrite.judge=JUDGE_DIR``): for each length N
of ``longwrite.steps``, ``longwrite.prompts`` held-out stories of N steps (:mod:`omni.toy.stories`,
prompt text and pictures disjoint from training by content), each prompt "draw A, then B, then ... ."
generated greedily (image codes at temperature 0, no text or audio, the model stopping by itself,
at most 2N + 2 pictures). The produced length l_v is the number of pictures; S_l = length_score(l_v, N);
S_q = 100 x the share of the N steps whose i-th produced picture the toy world's judge
(:mod:`omni.eval.judge`) reads as exactly that step's object (a missing picture is wrong);
S = (S_l + S_q) / 2. Reported per N and overall, with the mean produced length.
Generation is capped by the checkpoint's positions (``max_seq_len``, recorded as ``max_positions``;
``max_pictures_that_fit`` per bucket): a model whose context cannot hold N pictures is not refused,
its S_l shows it (the demo model has 256 positions: 13 pictures of 4x4 codes after a short prompt).
Outputs (``--out DIR``): metrics.json and index.html (a table per bucket, a few stories with their
pictures, each marked right or wrong).

**IterDPO data** (LongWriter-V Sec. 3.3, :func:`omni.train.dpo.iterdpo_pairs`): :func:`correct_story`
cuts a produced story into N + 1 segments and corrects each with the world's right picture;
:func:`preference_samples` and :func:`write_preference_shards` write the prefix pairs as preference
samples (see :func:`preference_samples` for the format).
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omni.errors import OmniError


def length_score(produced: float, required: float) -> float:
    """S_l in [0, 100] of an output of ``produced`` units (words, steps) where ``required`` were asked."""
    if required <= 0:
        raise OmniError(f"the required length must be > 0, got {required}")
    if produced <= 0:
        return 0.0
    if produced > required:
        return 100.0 * max(0.0, 1.0 - (produced / required - 1.0) / 3.0)
    return 100.0 * max(0.0, 1.0 - (required / produced - 1.0) / 2.0)


def overall_score(length: float, quality: float) -> float:
    """S = (S_l + S_q) / 2, both in [0, 100]."""
    return (length + quality) / 2.0


def score_story(required: Sequence[tuple[str, str]], seen: Sequence[Sequence[tuple[str, str]]],
                produced: int | None = None) -> dict:
    """The scores of one story output: ``required`` the (color, shape) of its N steps, ``seen`` per
    produced picture the pairs the judge reads in it (:meth:`omni.eval.judge.Judge.predict`; the first
    N suffice), ``produced`` the pictures it made (default ``len(seen)``). Returns ``produced`` (l_v),
    ``right`` (per step), ``length_score``, ``quality_score`` and ``overall_score``."""
    produced = len(seen) if produced is None else produced
    right = [i < len(seen) and list(seen[i]) == [tuple(pair)] for i, pair in enumerate(required)]
    s_l = length_score(produced, len(required))
    s_q = 100.0 * sum(right) / len(required)
    return {"produced": produced, "right": right, "length_score": s_l, "quality_score": s_q,
            "overall_score": overall_score(s_l, s_q)}


def generate_stories(model, tok, stories: Sequence, batch_size: int = 8, seed: int = 0) -> tuple[list, list[int]]:
    """Each story's prompt continued greedily with pictures only, the model stopping by itself (at most
    2N + 2 pictures, within the model's positions): (per story the produced pictures as uint8 [H,W,3],
    per story the most pictures the positions left room for)."""
    import dataclasses

    from omni.config.generate import GenerateConfig, SamplingConfig
    from omni.document import Document, Image, Text
    from omni.eval.demo import _to_uint8
    from omni.generation.generator import generate

    block = tok.image.tokens_per_image + 2  # <boi> codes <eoi>
    max_len = model.config.max_seq_len
    greedy = SamplingConfig(temperature=0.0)
    base = GenerateConfig(allow_text=False, allow_audio=False, text=greedy, image=greedy, min_images=0, seed=seed)
    pictures, fits = [], []
    for i in range(0, len(stories), batch_size):
        batch = stories[i:i + batch_size]
        most = 2 * max(len(s) for s in batch) + 2
        cfg = dataclasses.replace(base, max_images=most, max_new_tokens=most * block + 1)
        docs = generate(model, tok, [Document([Text(s.prompt)]) for s in batch], cfg)
        longest = max(len(tok.encode(Document([Text(s.prompt)]))) for s in batch)  # the batch is padded to it
        for doc in docs:
            pictures.append([_to_uint8(seg) for seg in doc.segments if isinstance(seg, Image)])
            fits.append(max(0, max_len - longest) // block)
    return pictures, fits


def _mean(xs) -> float:
    return round(float(np.mean(xs)), 4) if len(xs) else 0.0


def evaluate_longwrite(model, tok, judge, steps: Sequence[int] = (4, 5, 6, 7, 8), prompts: int = 10,
                       split: str = "validation", seed: int = 0, grid: int = 4, order: str = "reading",
                       batch_size: int = 8, examples: list | None = None) -> dict:
    """The suite's figures (module docstring) on ``prompts`` stories of each length in ``steps``, drawn
    at the size of the bundle's image tokenizer. ``examples`` receives per bucket a list of
    (story, produced pictures, score) for every story."""
    from omni.toy.stories import stories as make_stories

    if tok.image is None:
        raise OmniError("the longwrite suite needs a bundle with an image tokenizer")
    if not steps or any(n < 1 for n in steps):
        raise OmniError(f"longwrite.steps={list(steps)} is invalid: give story lengths >= 1")
    size = tok.image.config.image_size
    buckets, every = [], []
    for n in steps:
        sts = make_stories(prompts, [n], split, seed, size=size, grid=grid, order=order)
        pictures, fits = generate_stories(model, tok, sts, batch_size, seed)
        scores = []
        for st, pics in zip(sts, pictures):
            scores.append(score_story(st.steps, judge.predict(pics[:n]) if pics else [], len(pics)))
        if examples is not None:
            examples.append(list(zip(sts, pictures, scores)))
        every += scores
        produced = [s["produced"] for s in scores]
        buckets.append({"steps": n, "stories": len(sts), "produced": _mean(produced), "produced_counts": produced,
                        **{k: _mean([s[k] for s in scores]) for k in ("length_score", "quality_score", "overall_score")},
                        "steps_right": _mean([r for s in scores for r in s["right"]]),
                        "stopped_early": _mean([p < n for p in produced]), "too_long": _mean([p > n for p in produced]),
                        "max_pictures_that_fit": min(fits)})
    overall = {"stories": len(every), "produced": _mean([s["produced"] for s in every]),
               "required": _mean([b["steps"] for b in buckets for _ in range(b["stories"])]),
               **{k: _mean([s[k] for s in every]) for k in ("length_score", "quality_score", "overall_score")}}
    return {"split": split, "steps": list(steps), "prompts_per_length": prompts, "seed": seed, "grid": grid,
            "order": order, "size": size, "max_positions": model.config.max_seq_len,
            "tokens_per_picture": tok.image.tokens_per_image + 2, "buckets": buckets, "overall": overall}


def _img(pixels: np.ndarray, label: str, ok: bool | None) -> str:
    import base64

    from omni.toy.shapes import _png

    color = "#0a0" if ok else "#888" if ok is None else "#d00"
    data = base64.b64encode(_png(pixels)).decode()
    return (f"<figure><img src='data:image/png;base64,{data}' style='border:3px solid {color}' alt='{label}'>"
            f"<figcaption>{html.escape(label)}</figcaption></figure>")


def page(m: dict, title: str, examples: list, show: int = 2) -> str:
    """index.html: the overall scores, then per bucket its table and ``show`` stories with their
    pictures (green: the judge reads the step's object; red: wrong; grey: beyond the N steps)."""
    cols = ("stories", "produced", "length_score", "quality_score", "overall_score", "steps_right", "stopped_early",
            "too_long", "max_pictures_that_fit")
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
    o = m["overall"]
    body = [f"<h1>{html.escape(title)}</h1><p>{m['split']} split, {m['prompts_per_length']} prompts per length, "
            f"{m['max_positions']} positions ({m['tokens_per_picture']} tokens a picture): S_l {o['length_score']:.1f}, "
            f"S_q {o['quality_score']:.1f}, S {o['overall_score']:.1f}, mean length {o['produced']:.2f} of "
            f"{o['required']:.2f} asked</p>"]
    for b, shown in zip(m["buckets"], examples or [[]] * len(m["buckets"])):
        body.append(f"<h2>N = {b['steps']} steps</h2><table><tr>{head}</tr><tr>"
                    + "".join(f"<td>{b[c]:.4g}</td>" for c in cols) + "</tr></table>")
        for st, pics, sc in shown[:show]:
            figs = [_img(p, f"step {i + 1}: " + ("right" if i < len(st) and sc["right"][i] else
                                                 "wrong" if i < len(st) else "extra"),
                         sc["right"][i] if i < len(st) else None) for i, p in enumerate(pics)]
            figs += [f"<figure><div class='miss'></div><figcaption>step {i + 1}: missing (wrong)</figcaption></figure>"
                     for i in range(len(pics), len(st))]
            body.append(f"<p><b>{html.escape(st.prompt)}</b><br>{sc['produced']} pictures: S_l "
                        f"{sc['length_score']:.1f}, S_q {sc['quality_score']:.1f}, S {sc['overall_score']:.1f}</p>"
                        f"<div class='row'>{''.join(figs)}</div>")
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:2em}}"
            "td,th{padding:2px 8px;text-align:right}.row{display:flex;flex-wrap:wrap}figure{margin:4px}"
            "img{width:64px;height:64px;image-rendering:pixelated}.miss{width:64px;height:64px;border:3px dashed #d00}"
            "figcaption{font-size:11px}</style></head><body>" + "".join(body) + "</body></html>")


def longwrite_suite(checkpoint, data, cfg, out: Path | None = None) -> dict:
    """`omni eval longwrite --checkpoint DIR longwrite.judge=JUDGE_DIR`: :func:`evaluate_longwrite` with
    ``cfg.longwrite``; with ``out``, also index.html."""
    from omni.eval.judge import judged_suite
    from omni.io import atomic_write_text

    c = cfg.longwrite
    model, tok, judge = judged_suite(checkpoint, data, c.judge, "longwrite", "longwrite.judge", "stories")
    examples: list = []
    m = evaluate_longwrite(model, tok, judge, c.steps, c.prompts, c.split, c.seed, c.grid, c.order, c.batch_size,
                           examples)
    m["checkpoint"] = str(checkpoint)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "index.html", page(m, f"LongWriter-V stories: {Path(str(checkpoint)).name}", examples,
                                                   c.show))
    return m


# ---------------------------------------------------------------------------------------------
# IterDPO: corrected stories and preference samples
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One segment of a story output: a picture (its PNG bytes), or the end of the output (``png`` None)."""

    png: bytes | None = None

    @property
    def is_end(self) -> bool:
        return self.png is None


END = Step()
"""The end of an output (``<eos>``)."""


def correct_story(story, produced_pictures: Sequence[np.ndarray], judge,
                  render: Callable | None = None) -> tuple[list[Step], list[Step]]:
    """(original, corrected) segments of one produced story of N steps, N + 1 each, for
    :func:`omni.train.dpo.iterdpo_pairs`.

    Segment i < N is step i's picture: originally the i-th produced picture, or :data:`END` when the
    output stopped before step i; corrected, the produced picture if the judge reads exactly step i's
    object in it, else the world's right picture ``render(story, i)`` (default
    :func:`omni.toy.stories.step_picture`). Segment N is where the output should end: originally the
    first picture drawn beyond the N steps, or :data:`END`; corrected, always :data:`END`. So a story
    that stopped early at step k gets a pair for every step from k on, and one drawn past its N steps
    a pair that ends it after step N."""
    from omni.toy.shapes import _png
    from omni.toy.stories import step_picture

    render = render or step_picture
    n = len(story.steps)
    seen = judge.predict(list(produced_pictures[:n])) if len(produced_pictures) else []
    original, corrected = [], []
    for i, pair in enumerate(story.steps):
        if i < len(produced_pictures):
            orig = Step(_png(np.asarray(produced_pictures[i], dtype=np.uint8)))
            right = list(seen[i]) == [tuple(pair)]
        else:
            orig, right = END, False
        original.append(orig)
        corrected.append(orig if right else Step(_png(np.asarray(render(story, i), dtype=np.uint8))))
    original.append(Step(_png(np.asarray(produced_pictures[n], dtype=np.uint8))) if len(produced_pictures) > n else END)
    corrected.append(END)
    return original, corrected


def _side(steps: Sequence[Step], tag: str, members: dict) -> tuple[list[dict], bool]:
    """A side's segments up to its first END (``{"image": "TAGj.png"}`` each, the PNG put in
    ``members``), and whether it ends there."""
    segs = []
    for j, s in enumerate(steps):
        if s.is_end:
            return segs, True
        segs.append({"image": f"{tag}{j}.png"})
        members[f"{tag}{j}.png"] = s.png
    return segs, False


def preference_samples(story, pairs: Sequence[tuple[int, list, list]], key: str) -> list[dict]:
    """WebDataset preference samples of one story's IterDPO pairs (``iterdpo_pairs(*correct_story(...))``),
    keys ``KEY-I`` (I: the corrected segment).

    ``KEY.json`` = ``{"prompt": [{"text": PROMPT}], "chosen": [...], "rejected": [...], "chosen_ends": bool,
    "rejected_ends": bool}``, segments as in docs/data.md: ``{"image": "c0.png"}`` names the member
    ``KEY.c0.png`` (``r0.png`` ... on the rejected side). A side holds its pictures up to its first
    :data:`END`; ``*_ends`` says whether the output ends there (``<eos>`` after it) or is a prefix cut at
    segment I (no ``<eos>``). So the rejected side of a pair whose original stopped early ends where
    the original ended (it may hold no picture: ``<eos>`` alone), and the chosen side of the pair at
    segment N (a story drawn past its N steps) ends after the N corrected pictures, its rejected side
    being the original N pictures and its first extra one, cut there."""
    import json

    out = []
    for i, chosen, rejected in pairs:
        members: dict = {}
        c_segs, c_ends = _side(chosen, "c", members)
        r_segs, r_ends = _side(rejected, "r", members)
        spec = {"prompt": [{"text": story.prompt}], "chosen": c_segs, "rejected": r_segs, "chosen_ends": c_ends,
                "rejected_ends": r_ends}
        out.append({"__key__": f"{key}-{i}", "json": json.dumps(spec).encode(), **members})
    return out


def write_preference_shards(out: str | os.PathLike, samples: Sequence[dict], per_shard: int = 1000,
                            stem: str = "preferences", resume: bool = False) -> list[Path]:
    """Write preference samples (:func:`preference_samples`) as ``out/STEM-000.tar`` ..., ``per_shard``
    samples a shard (each written to a temp file and renamed). Returns the shard paths."""
    from omni.toy.shapes import write_tar_shards

    if per_shard < 1:
        raise OmniError(f"per_shard must be >= 1, got {per_shard}")
    return write_tar_shards(out, stem, list(samples), per_shard, resume, lambda s: [s])


def iterdpo_samples(model, tok, judge, stories: Sequence, key: str, batch_size: int = 16, seed: int = 0,
                    rejected_prefix: str = "original") -> tuple[list[dict], dict]:
    """IterDPO's data from one policy: each story's prompt continued as the suite does (greedy, the
    model stopping by itself), corrected (:func:`correct_story`), its prefix pairs
    (:func:`omni.train.dpo.iterdpo_pairs`) as preference samples (keys ``KEY-J-I``). Returns (the
    samples, a summary: stories, pairs, stories corrected, pairs per corrected segment, and the sampled
    outputs' mean length, S_l, S_q and S). ``rejected_prefix``: see :func:`omni.train.dpo.iterdpo_pairs`."""
    from omni.train.dpo import iterdpo_pairs

    pictures, _ = generate_stories(model, tok, stories, batch_size, seed)
    samples, scores, at = [], [], {}
    for j, (st, pics) in enumerate(zip(stories, pictures)):
        n = len(st.steps)
        scores.append(score_story(st.steps, judge.predict(pics[:n]) if pics else [], len(pics)))
        pairs = iterdpo_pairs(*correct_story(st, pics, judge), rejected_prefix=rejected_prefix)
        for i, _, _ in pairs:
            at[i] = at.get(i, 0) + 1
        samples += preference_samples(st, pairs, f"{key}-{j:06d}")
    summary = {"stories": len(stories), "pairs": len(samples), "rejected_prefix": rejected_prefix,
               "stories_corrected": sum(not all(s["right"]) or s["produced"] != len(st.steps)
                                        for s, st in zip(scores, stories)),
               "pairs_at_segment": {str(i): at[i] for i in sorted(at)},
               "produced": _mean([s["produced"] for s in scores]),
               **{k: _mean([s[k] for s in scores]) for k in ("length_score", "quality_score", "overall_score")}}
    return samples, summary
