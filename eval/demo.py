"""The any-to-any suite of ``omni demo``: generate on held-out toy scenes and judge what comes out.

What is measured (all on held-out scenes; each with the score of a "chance" model that writes a
valid answer for another scene of the same set, which is what ignoring the input gets):

* image to caption: attribute accuracy of the generated captions (:func:`omni.toy.shapes.caption_accuracy`);
* caption to image: the share of generated images in which the judge (:mod:`omni.eval.judge`) sees
  exactly the objects the caption names;
* speech to text: attribute accuracy of the transcripts of the spoken captions;
* text to speech: the model's own speech-to-text on the speech it generated (a round trip);
* stories: the share of story steps whose image shows exactly that step's object.

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
from omni.toy.shapes import ORDERS

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
    """Held-out scenes each task is measured on (never seen in training)."""
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
        for name in ("caption_scenes", "speech_scenes", "story_scenes", "judge_scenes", "eval_scenes"):
            check(getattr(self, name) >= 1, name, getattr(self, name), ">= 1")
        for name in ("caption_weight", "speech_weight", "story_weight"):
            check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        check(self.caption_weight + self.speech_weight + self.story_weight > 0, "caption_weight",
              self.caption_weight, "a positive sum of caption_weight, speech_weight and story_weight")
        check(self.show >= 0, "show", self.show, ">= 0")
        check_choice(self.order, "order", ORDERS)
        check(self.image_rerank >= 1, "image_rerank", self.image_rerank, ">= 1 (1: no reranking)")


@dataclass
class DemoRunConfig(RunConfig):
    """`omni demo`'s config: a RunConfig (tokenizers, data, model, train, generate) and the toy world."""

    demo: DemoConfig = field(default_factory=DemoConfig)
    """The toy world of `omni demo` and its held-out suite."""


def demo_suite(checkpoint: Path, data, cfg, out: Path | None = None) -> dict:
    """``omni eval demo --checkpoint DEMO_DIR [--out DIR]``: the suite again on a finished demo folder
    (its own config.yaml, judge and newest checkpoint). metrics.json and index.html go to ``out``;
    without it only the figures are returned (the demo folder's own files are never overwritten)."""
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
        return evaluate_demo(checkpoint, run, budget, {}, log=lambda s: None, dest=Path(out) if out else Path(tmp))


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


def evaluate_demo(out: Path, cfg, budget: str, seconds: dict, log=print, dest: Path | None = None) -> dict:
    """Generate on the held-out scenes of ``cfg.demo`` with the newest checkpoint in ``out/model``,
    judge it with ``out/judge``, and write ``DEST/metrics.json`` and ``DEST/index.html`` (``dest``
    defaults to ``out``); returns the metrics. ``seconds``: what each stage of the run took."""
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
    scenes = shapes.scenes(w.eval_scenes, "heldout", seed=0, size=w.canvas, grid=w.grid, order=w.order)
    captions = [sc.caption for sc in scenes]
    n_img = tok.vocab.image_grid[0] * tok.vocab.image_grid[1]
    greedy = dataclasses.replace(g.text, temperature=0.0)

    def run(prompts, on_token=None, **kw):
        return generate(model, tok, prompts, dataclasses.replace(g, **kw), on_token=on_token)

    only_text = dict(allow_images=False, allow_audio=False, text=greedy, max_new_tokens=48)
    t = time.time()
    # image -> caption
    cap_docs = run([Document([Image(sc.image)]) for sc in scenes], **only_text)
    cap_pred = _texts(cap_docs)
    # caption -> image
    # best of N (rerank); the callback sees every candidate (rows i*N+k): the first one is scored too
    N = w.image_rerank
    rows: dict[int, list[int]] = {}
    img_docs = run(captions, allow_text=False, allow_audio=False, min_images=1, max_images=1,
                   max_new_tokens=n_img + 2, rerank=N, on_token=lambda b, i: rows.setdefault(b, []).append(i))
    first_docs = [tok.decode(rows[i * N]) for i in range(len(captions))]

    def blank_or(docs):
        return [_to_uint8(m[0]) if m else np.full((w.canvas, w.canvas, 3), 255, np.uint8) for m in _media(docs, Image)]

    gen_images = blank_or(img_docs)
    img_ok = [judge.correct(im, c) for im, c in zip(gen_images, captions)]
    first_ok = [judge.correct(im, c) for im, c in zip(blank_or(first_docs), captions)]
    real_ok = [judge.correct(sc.image, c) for sc, c in zip(_roll(scenes), captions)]
    # speech -> text
    waves = [sc.speech() for sc in scenes]
    stt_docs = run([Document([Audio(np.array(wv), sr)]) for wv, sr in waves], **only_text)
    stt_pred = _texts(stt_docs)
    # text -> speech, judged by the model's own speech-to-text
    tts_docs = run(captions, allow_text=False, allow_images=False, min_audio=1, max_new_tokens=g.max_audio_tokens + 2)
    tts_audio = _media(tts_docs, Audio)
    back = run([Document([a[0]]) if a else Document([Text("")]) for a in tts_audio], **only_text)
    tts_pred = _texts(back)
    # stories: held-out scenes told as "draw A, then B." -> one image per step
    story_prompts = ["draw " + ", then ".join(o.phrase for o in sc.objects) + "." for sc in scenes]
    steps = [sc.pairs for sc in scenes]
    most = max(len(s) for s in steps)
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

    def caption_metrics(pred):
        acc = shapes.caption_accuracy(pred, scenes)
        chance = shapes.caption_accuracy(_roll(captions), scenes)
        return {"attribute_accuracy": acc["attributes"], "exact": acc["exact"],
                "chance_attribute_accuracy": chance["attributes"], "chance_exact": chance["exact"]}

    by_n = {n: [ok for ok, sc in zip(img_ok, scenes) if len(sc.objects) == n] for n in (1, 2, 3)}
    metrics = {
        "budget": budget,
        "eval_scenes": len(scenes),
        "image_to_caption": caption_metrics(cap_pred),
        "caption_to_image": {
            "correct": float(np.mean(img_ok)),
            **{f"correct_{n}_objects": float(np.mean(v)) for n, v in by_n.items() if v},
            "rerank": N,
            "correct_first_candidate": float(np.mean(first_ok)),
            "chance_correct": float(np.mean(real_ok)),
            "judge_on_real_scenes": judge.evaluate(scenes)["exact"],
        },
        "speech_to_text": caption_metrics(stt_pred),
        "text_to_speech": {"roundtrip": caption_metrics(tts_pred),
                           "with_audio": float(np.mean([bool(a) for a in tts_audio]))},
        "story": {"steps_correct": float(np.mean(story_ok)), "chance_steps_correct": float(np.mean(story_chance))},
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
    for p, o in zip(w.stories, stories):
        entries.append((Document([Text(p)]), o))
        labels.append("story")
    table = [("held-out figure", "model", "chance")] + summary_table(metrics)
    dest = Path(dest) if dest is not None else out
    dest.mkdir(parents=True, exist_ok=True)
    write_page(entries, dest / "index.html", title="omni demo", labels=labels, summary=table)
    atomic_write_text(dest / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    return metrics


def summary_table(metrics: dict) -> list[tuple[str, str, str]]:
    """(task, figure, chance) rows of the headline figures."""
    m = metrics
    return [
        ("image to caption: attribute accuracy", f"{m['image_to_caption']['attribute_accuracy']:.1%}",
         f"{m['image_to_caption']['chance_attribute_accuracy']:.1%}"),
        ("caption to image: judged correct", f"{m['caption_to_image']['correct']:.1%}",
         f"{m['caption_to_image']['chance_correct']:.1%}"),
        ("speech to text: attribute accuracy", f"{m['speech_to_text']['attribute_accuracy']:.1%}",
         f"{m['speech_to_text']['chance_attribute_accuracy']:.1%}"),
        ("text to speech: round-trip attribute accuracy",
         f"{m['text_to_speech']['roundtrip']['attribute_accuracy']:.1%}",
         f"{m['text_to_speech']['roundtrip']['chance_attribute_accuracy']:.1%}"),
        ("story: steps judged correct", f"{m['story']['steps_correct']:.1%}",
         f"{m['story']['chance_steps_correct']:.1%}"),
    ]


def summary_lines(metrics: dict) -> str:
    rows = summary_table(metrics)
    width = max(len(r[0]) for r in rows)
    lines = [f"{'held-out figure':<{width}}  {'model':>7}  {'chance':>7}"]
    lines += [f"{a:<{width}}  {b:>7}  {c:>7}" for a, b, c in rows]
    lines.append(f"total time {metrics['seconds']['total']:.0f} s")
    return "\n".join(lines)
