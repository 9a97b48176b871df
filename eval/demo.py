"""The any-to-any suite of ``omni demo``: generate on held-out toy scenes and judge what comes out.

The scenes come from a split of :mod:`omni.toy.shapes` that is disjoint from training by content
(:func:`omni.toy.shapes.split_of`): ``test`` (what ``omni demo`` reports) or ``validation``
(``omni eval demo demo.split=validation``, where recipes are tuned). What is measured (each with
the score of a "chance" model that writes a valid answer for another scene of the same set,
which is what ignoring the input gets):

* image to caption: attribute accuracy of the generated captions (:func:`omni.toy.shapes.caption_accuracy`);
* caption to image: the share of generated images in which the judge (:mod:`omni.eval.judge`) sees
  exactly the objects the caption names;
* speech to text: attribute accuracy of the transcripts of the spoken captions;
* text to speech: the model's own speech-to-text on the speech it generated (a round trip);
* stories: the share of story steps whose image shows exactly that step's object;
* novel pairs: image to caption and caption to image on the compositional split of the same
  side (``compositional_test``), scenes holding a ``demo.novel_pairs`` pair ("a purple
  triangle") that no training sample shows, with the share of those objects named or drawn.

:class:`DemoConfig` (``demo.*`` of recipes/demo/default.yaml) sizes the toy world and this suite;
:class:`DemoRunConfig` is the demo's whole config: a :class:`omni.config.RunConfig` plus ``demo``
(the demo is one command, not a training stage, so its settings are not part of RunConfig).
``omni eval demo --checkpoint runs/demo`` reruns the suite on a finished demo folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omni.config import RunConfig
from omni.config.base import check, check_choice
from omni.errors import OmniError
from omni.toy.shapes import COLORS, ORDERS, SHAPES, parse_caption

CONFIG_FILE = "config.yaml"


@dataclass
class DemoConfig:
    """Sizes of the toy world (omni.toy.shapes) that `omni demo` makes, trains on and evaluates on."""

    canvas: int = 32
    """Scene side in pixels; must equal tokenizer.image.model.image_size (32: 8x8 codes at 4x downsampling)."""
    grid: int = 4
    """Object sides and positions are multiples of this many pixels: with the image tokenizer's
    patch size (4 at 4x downsampling) every object is one fixed pattern of whole patches, which a
    model trained for minutes can learn to draw (1: any pixel)."""
    order: str = "reading"
    """Order objects are named in by captions, speech and stories (omni.toy.shapes.ORDERS):
    'reading' (top edge, then left edge) is the order the model draws them in, row by row of image
    codes, so the caption says which object comes next; 'left_to_right' by box center."""
    caption_scenes: int = 4000
    """Training scenes written as image-caption pairs (both orders: captioning and caption-to-image)."""
    speech_scenes: int = 1500
    """Training scenes written as spoken-caption pairs (wav + transcript: speech-to-text and text-to-speech)."""
    story_scenes: int = 1000
    """Training scenes written as stories: "draw a red circle, then a blue square." + one image per object."""
    caption_weight: float = 0.6
    """Blend weight of the caption documents in pretraining."""
    speech_weight: float = 0.25
    """Blend weight of the speech documents in pretraining."""
    story_weight: float = 0.15
    """Blend weight of the story documents in pretraining."""
    image_rerank: int = 1
    """Caption to image: candidates sampled per caption; the one the model itself reads back as the
    caption best is kept (GenerateConfig.rerank). metrics.json also keeps the first candidate's score."""
    judge_scenes: int = 600
    """Scenes the image judge (omni.eval.judge) is trained on; it reads generated images."""
    eval_scenes: int = 100
    """Distinct scenes of the evaluation split (``test``; ``validation`` with `omni eval demo
    demo.split=validation`) each task is measured on: by content, none is a training scene."""
    compositional_scenes: int = 100
    """Distinct scenes of the compositional split measured for image to caption and caption to
    image: each holds a ``novel_pairs`` pair that no training sample shows."""
    novel_pairs: list[str] = field(default_factory=lambda: ["purple triangle", "green square"])
    """Color-shape pairs kept out of every training scene (image, caption, speech, story, text
    tokenizer corpus) and asked for by the compositional split."""
    stories: list[str] = field(default_factory=lambda: [
        "draw a red circle, then a blue square.",
        "draw a yellow triangle, then a green circle.",
        "draw an orange square, then a purple triangle, then a blue circle.",
    ])
    """Story prompts generated and measured (each "draw A, then B" step must yield an image of it)."""
    show: int = 4
    """Examples per task shown on index.html."""

    def __post_init__(self) -> None:
        check(self.canvas >= 32, "canvas", self.canvas, ">= 32 (three shapes must fit)")
        for name in ("caption_scenes", "speech_scenes", "story_scenes", "judge_scenes", "eval_scenes",
                     "compositional_scenes"):
            check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        for name in ("caption_weight", "speech_weight", "story_weight"):
            check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        check(self.caption_weight + self.speech_weight + self.story_weight > 0, "caption_weight",
              self.caption_weight, "a positive sum of caption_weight, speech_weight and story_weight")
        check(self.show >= 0, "show", self.show, ">= 0")
        check_choice(self.order, "order", ORDERS)
        check(self.image_rerank >= 1, "image_rerank", self.image_rerank, ">= 1 (1: no reranking)")
        pairs = [parse_caption(p) for p in self.novel_pairs]
        check(all(len(p) == 1 for p in pairs) and len(set(map(tuple, pairs))) == len(pairs), "novel_pairs",
              self.novel_pairs, f"distinct '<color> <shape>' pairs (colors: {', '.join(COLORS)}; shapes: "
              f"{', '.join(SHAPES)})")
        check(len(pairs) < len(COLORS) * len(SHAPES), "novel_pairs", self.novel_pairs,
              "fewer pairs than colors times shapes (training needs some)")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """``novel_pairs`` as ``(color, shape)`` tuples."""
        return [parse_caption(p)[0] for p in self.novel_pairs]


@dataclass
class DemoRunConfig(RunConfig):
    """`omni demo`'s config: a RunConfig (tokenizers, data, model, train, generate) and the toy world."""

    demo: DemoConfig = field(default_factory=DemoConfig)
    """The toy world of `omni demo` and its held-out suite."""


def demo_suite(checkpoint: Path, data, cfg, out: Path | None = None) -> dict:
    """``omni eval demo --checkpoint DEMO_DIR [--out DIR] [demo.split=test]``: the suite again on a
    finished demo folder (its own config.yaml, judge and newest checkpoint), on the split
    ``cfg.demo.split`` (validation by default: tune there, report test once). metrics.json and
    index.html go to ``out``; without it only the figures are returned (the demo folder's own files
    are never overwritten)."""
    import tempfile

    from omni.config import load_config
    from omni.io import read_json

    if not (checkpoint / CONFIG_FILE).is_file() or not (checkpoint / "judge").is_dir():
        raise OmniError(f"{checkpoint} is not an `omni demo` folder: it lacks {CONFIG_FILE} or judge/ "
                        "(run `omni demo --out DIR` first)")
    run = load_config(DemoRunConfig, checkpoint / CONFIG_FILE)
    old = checkpoint / "metrics.json"
    budget = read_json(old, "").get("budget", "unknown") if old.is_file() else "unknown"
    if out is not None and Path(out).resolve() == checkpoint.resolve():
        raise OmniError(f"--out {out} is the demo folder itself; choose another folder (its figures stay as they are)")
    with tempfile.TemporaryDirectory() as tmp:
        return evaluate_demo(checkpoint, run, budget, {}, log=lambda s: None, dest=Path(out) if out else Path(tmp),
                             split=cfg.demo.split)


def _newest_checkpoint(out: Path) -> Path:
    from omni.run import find_resume

    ckpt = find_resume(out / "model", "auto")
    if ckpt is None:
        raise OmniError(f"no intact checkpoint in {out / 'model'}: rerun the demo to pretrain again")
    return ckpt


def _texts(docs) -> list[str]:
    from omni.document import Text

    return [" ".join(s.text for s in d.segments if isinstance(s, Text)) for d in docs]


def _media(docs, cls) -> list[list]:
    return [[s for s in d.segments if isinstance(s, cls)] for d in docs]


def _roll(xs: list) -> list:
    """Each item moved to the next scene: a valid answer for another scene (the chance baseline)."""
    return xs[1:] + xs[:1]


def _to_uint8(img) -> np.ndarray:
    return (img.pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def evaluate_demo(out: Path, cfg, budget: str, seconds: dict, log=print, dest: Path | None = None,
                  split: str = "test") -> dict:
    """Generate on the ``split`` scenes of ``cfg.demo`` ('test' or 'validation', plus the
    compositional scenes of that split) with the newest checkpoint in ``out/model``, judge it with
    ``out/judge``, and write ``DEST/metrics.json`` and ``DEST/index.html`` (``dest`` defaults to
    ``out``); returns the metrics. ``seconds``: what each stage of the run took."""
    import dataclasses

    from omni.checkpoint import load
    from omni.document import Audio, Document, Image, Text
    from omni.eval.judge import Judge
    from omni.generation.generator import generate
    from omni.generation.page import write_page
    from omni.io import atomic_write_text
    from omni.toy import shapes

    w, g = cfg.demo, cfg.generate
    model, tok = load(_newest_checkpoint(out))
    judge = Judge.load(out / "judge")
    world = dict(seed=0, novel_pairs=w.pairs, size=w.canvas, grid=w.grid, order=w.order)
    scenes = shapes.scenes(w.eval_scenes, split, **world)
    novel = shapes.scenes(w.compositional_scenes, f"compositional_{split}", **world)
    captions = [sc.caption for sc in scenes]
    n_img = tok.vocab.image_grid[0] * tok.vocab.image_grid[1]
    greedy = dataclasses.replace(g.text, temperature=0.0)

    def run(prompts, on_token=None, **kw):
        return generate(model, tok, prompts, dataclasses.replace(g, **kw), on_token=on_token)

    only_text = dict(allow_images=False, allow_audio=False, text=greedy, max_new_tokens=48)

    def blank_or(docs):
        return [_to_uint8(m[0]) if m else np.full((w.canvas, w.canvas, 3), 255, np.uint8) for m in _media(docs, Image)]

    def to_caption(scs, novel=False):
        """image -> caption: (generated documents, metrics)."""
        docs = run([Document([Image(sc.image)]) for sc in scs], **only_text)
        return docs, caption_metrics(_texts(docs), scs, novel)

    def to_image(scs, novel=False):
        """caption -> image, best of N (rerank); the callback sees every candidate (rows i*N+k), so
        the first one is scored too: (generated documents, metrics)."""
        caps, N, rows = [sc.caption for sc in scs], w.image_rerank, {}
        docs = run(caps, allow_text=False, allow_audio=False, min_images=1, max_images=1, max_new_tokens=n_img + 2,
                   rerank=N, on_token=lambda b, i: rows.setdefault(b, []).append(i))
        seen = judge.predict(blank_or(docs))  # per image, the sorted [(color, shape)] the judge sees
        ok = [sorted(p) == sorted(sc.pairs) for p, sc in zip(seen, scs)]
        first_ok = [judge.correct(im, c) for im, c in zip(blank_or([tok.decode(rows[i * N]) for i in range(len(scs))]), caps)]
        by_n = {n: [k for k, sc in zip(ok, scs) if len(sc.objects) == n] for n in (1, 2, 3)}
        m = {"correct": float(np.mean(ok)), **{f"correct_{n}_objects": float(np.mean(v)) for n, v in by_n.items() if v},
             "rerank": N, "correct_first_candidate": float(np.mean(first_ok)),
             "chance_correct": float(np.mean([judge.correct(o.image, c) for o, c in zip(_roll(scs), caps)])),
             "judge_on_real_scenes": judge.evaluate(scs)["exact"],
             # the ceiling the image tokenizer sets: the judge on its encode -> decode of the real scenes
             "judge_on_reconstructions": float(np.mean(reconstructed_correct(tok.image, judge, scs)))}
        if novel:  # the novel-pair objects the judge sees in the images
            m["novel_objects_drawn"] = _novel_share(seen, scs, w.pairs)
        return docs, m

    def caption_metrics(pred, scs, novel=False):
        acc = shapes.caption_accuracy(pred, scs)
        chance = shapes.caption_accuracy([sc.caption for sc in _roll(scs)], scs)
        m = {"attribute_accuracy": acc["attributes"], "exact": acc["exact"],
             "chance_attribute_accuracy": chance["attributes"], "chance_exact": chance["exact"]}
        if novel:  # the novel-pair objects the captions name
            m["novel_objects_named"] = _novel_share([shapes.parse_caption(p) for p in pred], scs, w.pairs)
        return m

    t = time.time()
    cap_docs, i2c = to_caption(scenes)
    img_docs, c2i = to_image(scenes)
    novel_cap_docs, novel_i2c = to_caption(novel, novel=True)
    novel_img_docs, novel_c2i = to_image(novel, novel=True)
    # speech -> text
    waves = [sc.speech() for sc in scenes]
    stt_docs = run([Document([Audio(np.array(wv), sr)]) for wv, sr in waves], **only_text)
    # text -> speech, judged by the model's own speech-to-text
    tts_docs = run(captions, allow_text=False, allow_images=False, min_audio=1, max_new_tokens=g.max_audio_tokens + 2)
    tts_audio = _media(tts_docs, Audio)
    back = run([Document([a[0]]) if a else Document([Text("")]) for a in tts_audio], **only_text)
    # stories: the split's scenes told as "draw A, then B." -> one image per step
    story_prompts = ["draw " + ", then ".join(o.phrase for o in sc.objects) + "." for sc in scenes]
    most = max(len(sc.objects) for sc in scenes)
    story_docs = run(story_prompts, allow_text=False, allow_audio=False, min_images=most, max_images=most,
                     max_new_tokens=most * (n_img + 2) + 1)
    story_ok, story_chance = [], []
    for sc, doc in zip(scenes, story_docs):
        imgs = [_to_uint8(m) for m in _media([doc], Image)[0]]
        for i, pair in enumerate(sc.pairs):
            story_ok.append(i < len(imgs) and judge.predict([imgs[i]])[0] == [pair])
    for sc, other in zip(scenes, _roll(scenes)):
        for i, pair in enumerate(sc.pairs):
            story_chance.append(i < len(other.objects) and judge.predict([other.alone(i)])[0] == [pair])
    eval_seconds = time.time() - t

    metrics = {
        "budget": budget,
        "split": split,
        "eval_scenes": len(scenes),
        "image_to_caption": i2c,
        "caption_to_image": c2i,
        "speech_to_text": caption_metrics(_texts(stt_docs), scenes),
        "text_to_speech": {"roundtrip": caption_metrics(_texts(back), scenes),
                           "with_audio": float(np.mean([bool(a) for a in tts_audio]))},
        "story": {"steps_correct": float(np.mean(story_ok)), "chance_steps_correct": float(np.mean(story_chance))},
        "compositional": {"split": f"compositional_{split}", "scenes": len(novel), "novel_pairs": list(w.novel_pairs),
                          "image_to_caption": novel_i2c, "caption_to_image": novel_c2i},
        "model": {"checkpoint": str(_newest_checkpoint(out).relative_to(out)),
                  "parameters": sum(p.numel() for p in model.parameters())},
        "seconds": {**seconds, "evaluate": round(eval_seconds, 1)},
    }
    metrics["seconds"]["total"] = round(sum(v for k, v in metrics["seconds"].items() if k != "total"), 1)

    # the page: a few examples per task, then the stories of the recipe
    k = w.show
    stories = run(list(w.stories), allow_text=False, allow_audio=False, min_images=most, max_images=most,
                  max_new_tokens=most * (n_img + 2) + 1) if w.stories else []
    entries, labels = [], []

    def add(label, prompts, outs):
        for p, o in list(zip(prompts, outs))[:k]:
            entries.append((p, o))
            labels.append(label)

    add("caption to image", [Document([Text(c)]) for c in captions], img_docs)
    add("image to caption", [Document([Image(sc.image)]) for sc in scenes], cap_docs)
    add("text to speech", [Document([Text(c)]) for c in captions], tts_docs)
    add("speech to text", [Document([Audio(np.array(wv), sr)]) for wv, sr in waves], stt_docs)
    add("novel pairs: caption to image", [Document([Text(sc.caption)]) for sc in novel], novel_img_docs)
    add("novel pairs: image to caption", [Document([Image(sc.image)]) for sc in novel], novel_cap_docs)
    for p, o in zip(w.stories, stories):
        entries.append((Document([Text(p)]), o))
        labels.append("story")
    table = [(f"{split} split figure", "model", "chance")] + summary_table(metrics)
    dest = Path(dest) if dest is not None else out
    dest.mkdir(parents=True, exist_ok=True)
    write_page(entries, dest / "index.html", title="omni demo", labels=labels, summary=table)
    atomic_write_text(dest / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    return metrics


def reconstructed_correct(image_tokenizer, judge, scenes) -> list[bool]:
    """Per scene, whether the judge reads exactly its caption in the image tokenizer's encode ->
    decode of its real image: the ceiling the tokenizer sets on caption to image."""
    import torch

    x = torch.stack([torch.from_numpy(sc.image).permute(2, 0, 1).float() / 255 for sc in scenes])  # [B,3,H,W]
    with torch.no_grad():
        rec = image_tokenizer.decode(image_tokenizer.encode(x))  # [B,3,H,W] in [0,1]
    return [judge.correct((r * 255).round().byte().permute(1, 2, 0).numpy(), sc.caption) for r, sc in zip(rec, scenes)]


def _novel_share(seen: list[list[tuple[str, str]]], scenes, pairs) -> float:
    """Of the novel-pair objects the scenes hold, the share that ``seen`` (per scene, the pairs a
    caption names or an image shows) matches one to one (multiset intersection); 0.0 if none."""
    import collections

    novel = set(pairs)
    hit = total = 0
    for got, sc in zip(seen, scenes):
        want = collections.Counter(p for p in sc.pairs if p in novel)
        hit += sum((collections.Counter(got) & want).values())
        total += sum(want.values())
    return hit / total if total else 0.0


def summary_table(metrics: dict) -> list[tuple[str, str, str]]:
    """(task, figure, chance) rows of the headline figures."""
    m = metrics
    c = m["compositional"]

    def row(name, d, key, chance):
        return name, f"{d[key]:.1%}", f"{d[chance]:.1%}"

    return [
        row("image to caption: attribute accuracy", m["image_to_caption"], "attribute_accuracy", "chance_attribute_accuracy"),
        row("caption to image: judged correct", m["caption_to_image"], "correct", "chance_correct"),
        row("speech to text: attribute accuracy", m["speech_to_text"], "attribute_accuracy", "chance_attribute_accuracy"),
        row("text to speech: round-trip attribute accuracy", m["text_to_speech"]["roundtrip"], "attribute_accuracy",
            "chance_attribute_accuracy"),
        row("story: steps judged correct", m["story"], "steps_correct", "chance_steps_correct"),
        row("novel pairs, image to caption: attribute accuracy", c["image_to_caption"], "attribute_accuracy",
            "chance_attribute_accuracy"),
        row("novel pairs, caption to image: judged correct", c["caption_to_image"], "correct", "chance_correct"),
    ]


def summary_lines(metrics: dict) -> str:
    rows = summary_table(metrics)
    width = max(len(r[0]) for r in rows)
    c = metrics["compositional"]
    lines = [f"{metrics['split']} split: {metrics['eval_scenes']} scenes; novel pairs "
             f"({', '.join(c['novel_pairs'])}): {c['scenes']} scenes of {c['split']}",
             f"{'figure':<{width}}  {'model':>7}  {'chance':>7}"]
    lines += [f"{a:<{width}}  {b:>7}  {c:>7}" for a, b, c in rows]
    lines.append(f"total time {metrics['seconds']['total']:.0f} s")
    return "\n".join(lines)
