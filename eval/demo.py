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
    detect_scenes: int = 0
    """Training scenes written as detection documents for the ``<det>`` head ("find every red circle"
    or "find the shapes", the image, ``<det>`` and the boxes: omni.toy.shapes ``detect``)."""
    generate_scenes: int = 0
    """Training scenes written as generation documents for the ``<gen>`` head (the caption, ``<gen>``
    and the image the diffusion head should make: omni.toy.shapes ``generate``)."""
    caption_weight: float = 0.6
    """Blend weight of the caption documents in pretraining."""
    speech_weight: float = 0.25
    """Blend weight of the speech documents in pretraining."""
    story_weight: float = 0.15
    """Blend weight of the story documents in pretraining."""
    detect_weight: float = 0.0
    """Blend weight of the detection documents (0: none are written; > 0 needs heads.det.enabled)."""
    generate_weight: float = 0.0
    """Blend weight of the generation documents (0: none are written; > 0 needs heads.gen.enabled)."""
    heads_steps: int = 0
    """Steps of the ``heads`` stage: the pretrained decoder trained on, jointly with the ``<det>`` and
    ``<gen>`` heads (``heads.*``), on the whole blend (the pretraining kinds replayed, plus the
    detection and generation documents); 0: no such stage, no heads. Pretraining itself is on the
    caption, speech and story documents alone (VisionLLM v2 trains its decoders in a later stage too)."""
    heads_lr: float = 1e-3
    """Peak learning rate of the heads stage (decoder and heads; 30 warmup steps, cosine to a tenth)."""
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
        for name in ("caption_weight", "speech_weight", "story_weight", "detect_weight", "generate_weight"):
            check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        check(self.heads_steps >= 0, "heads_steps", self.heads_steps, ">= 0 (0: no heads stage)")
        check(self.heads_lr > 0, "heads_lr", self.heads_lr, "> 0")
        for kind in ("detect", "generate"):
            n = getattr(self, f"{kind}_scenes")
            check(n >= (1 if getattr(self, f"{kind}_weight") > 0 else 0), f"{kind}_scenes", n,
                  f">= 1 when {kind}_weight > 0 (>= 0 otherwise)")
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

    def blend(self, stage: str = "heads") -> list[tuple[str, int, float]]:
        """(kind, training scenes, blend weight) of the sample kinds a stage trains on, those of positive
        weight: 'pretrain' the caption, speech and story kinds; 'heads' (the world: everything) all five."""
        kinds = ("caption", "speech", "story") + (("detect", "generate") if stage == "heads" else ())
        rows = [(k, getattr(self, f"{k}_scenes"), getattr(self, f"{k}_weight")) for k in kinds]
        return [k for k in rows if k[2] > 0]

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
    """The newest checkpoint of the demo's last training stage: ``heads/`` if the run has one, else ``model/``."""
    from omni.run import find_resume

    folder = out / "heads" if (out / "heads").is_dir() else out / "model"
    ckpt = find_resume(folder, "auto")
    if ckpt is None:
        raise OmniError(f"no intact checkpoint in {folder}: rerun the demo to train again")
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
    from omni.document import Audio, Detect, Document, Image, Text
    from omni.eval.detection import evaluate_detection
    from omni.eval.gen_head import evaluate_gen_head
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
        t0 = time.perf_counter()
        docs = run(caps, allow_text=False, allow_audio=False, min_images=1, max_images=1, max_new_tokens=n_img + 2,
                   rerank=N, on_token=lambda b, i: rows.setdefault(b, []).append(i))
        seconds = (time.perf_counter() - t0) / max(len(scs), 1)
        seen = judge.predict(blank_or(docs))  # per image, the sorted [(color, shape)] the judge sees
        ok = [sorted(p) == sorted(sc.pairs) for p, sc in zip(seen, scs)]
        first_ok = [judge.correct(im, c) for im, c in zip(blank_or([tok.decode(rows[i * N]) for i in range(len(scs))]), caps)]
        by_n = {n: [k for k, sc in zip(ok, scs) if len(sc.objects) == n] for n in (1, 2, 3)}
        m = {"correct": float(np.mean(ok)), **{f"correct_{n}_objects": float(np.mean(v)) for n, v in by_n.items() if v},
             "rerank": N, "correct_first_candidate": float(np.mean(first_ok)),
             "chance_correct": float(np.mean([judge.correct(o.image, c) for o, c in zip(_roll(scs), caps)])),
             "judge_on_real_scenes": judge.evaluate(scs)["exact"],
             # the ceiling the image tokenizer sets: the judge on its encode -> decode of the real scenes
             "judge_on_reconstructions": float(np.mean(reconstructed_correct(tok.image, judge, scs))),
             # the batch's wall time per caption (N sampled candidates and their reranking pass) and per
             # candidate; moved to metrics["per_item_seconds"] with the other timings
             "seconds_per_image": seconds, "seconds_per_candidate": seconds / N}
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
    # the routing heads (model.heads): <det> on three requests per scene, <gen> on every caption
    heads = getattr(model, "heads", None)
    det_shown: list = []
    gen_images: list = []
    routed = {}
    if heads is not None and "det" in heads.heads:
        routed["detection"] = evaluate_detection(model, tok, scenes, w.pairs, seed=cfg.seed, examples=det_shown)
    if heads is not None and "gen" in heads.heads:
        routed["gen_head"] = evaluate_gen_head(model, tok, judge, scenes, g.gen_guidance, g.gen_steps, cfg.seed,
                                               images=gen_images)
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
        **routed,
        "model": {"checkpoint": str(_newest_checkpoint(out).relative_to(out)),
                  "parameters": sum(p.numel() for p in model.parameters())},
        "seconds": {**seconds, "evaluate": round(eval_seconds, 1)},
    }
    metrics["seconds"]["total"] = round(sum(v for k, v in metrics["seconds"].items() if k != "total"), 1)
    # wall time per item of each path, measured in this run (apart from the figures: timings vary by run)
    per = {"vq_image_reranked": c2i.pop("seconds_per_image"), "vq_image": c2i.pop("seconds_per_candidate")}
    for d in (novel_c2i,):
        d.pop("seconds_per_image"), d.pop("seconds_per_candidate")
    if "gen_head" in routed:
        per["gen_head_image"] = routed["gen_head"].pop("seconds_per_image")
    if "detection" in routed:
        per["det_head_request"] = routed["detection"].pop("seconds_per_request")
    metrics["per_item_seconds"] = per

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
    shown = [(req, sc, p) for kind, req, sc, p in det_shown if kind != "absent pair"][:2 * k]
    add("<det> head: detection", [Document([Text(req), Image(sc.image)]) for req, sc, _ in shown],
        [Document([Detect([b for b, s in p if s >= g.det_threshold], [s for _, s in p if s >= g.det_threshold],
                          phrase=req.removeprefix("find "))]) for req, _, p in shown])
    add("<gen> head: caption to image", [Document([Text(c)]) for c in captions],
        [Document([Image(im)]) for im in gen_images])
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
    ] + head_rows(m)


def head_rows(m: dict) -> list[tuple[str, str, str]]:
    """(task, figure, chance) rows of the routing heads, where the run trained them."""
    rows = []
    if "detection" in m:
        d = m["detection"]
        for key, name in (("the_shapes", '"find the shapes"'), ("every_pair", '"find every <color> <shape>"')):
            rows.append((f"<det> head, {name}: AP@0.5 / AP@[.5:.95]", f"{d[key]['ap50']:.3f} / {d[key]['ap']:.3f}",
                         f"{d[key]['chance_ap50']:.3f} / {d[key]['chance_ap']:.3f}"))
    if "gen_head" in m:
        gh, vq, per = m["gen_head"], m["caption_to_image"], m["per_item_seconds"]
        rows.append((f"<gen> head, caption to image: judged correct ({per['gen_head_image']:.2f} s/image)",
                     f"{gh['correct']:.1%}", f"{gh['chance_correct']:.1%}"))
        if "correct_1_object" in gh:
            rows.append(("<gen> head, one-object captions", f"{gh['correct_1_object']:.1%}", f"{gh['chance_1_object']:.1%}"))
        rows.append((f"VQ tokens, caption to image: first sample ({per['vq_image']:.2f} s/image)",
                     f"{vq['correct_first_candidate']:.1%}", f"{vq['chance_correct']:.1%}"))
    return rows


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
