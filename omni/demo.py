"""`omni demo`: train a whole toy any-to-any model on :mod:`omni.toy.shapes` and show what it learned.

The demo runs the project's real pipeline, stage by stage, into one folder ``DIR``:

1. ``world``: WebDataset shards of toy scenes (``DIR/world/``): image-caption pairs, spoken
   captions synthesized by espeak-ng, and stories ("draw a red circle, then a blue square." and one
   image per object); plus the text the text tokenizer learns from.
2. ``text``: the SentencePiece BPE text tokenizer (``DIR/tokenizers/text``).
3. ``image``: the VQ image tokenizer (``DIR/tokenizers/image``; resumes from its checkpoints).
4. ``audio``: the whisper-VQ audio tokenizer (``DIR/tokenizers/audio``).
5. ``bundle``: the unified tokenizer of the three (``DIR/tokenizer``).
6. ``judge``: the image judge (:mod:`omni.eval.judge`), trained on the toy world's ground truth.
7. ``preprocess``: packed token datasets, one per sample kind (``DIR/tokens/KIND``).
8. ``pretrain``: an OmniDecoder pretrained on their blend (``DIR/model``; resumes from its newest
   checkpoint, which is also written on SIGTERM).
9. ``evaluate``: generations on held-out scenes, judged, into ``DIR/metrics.json`` and
   ``DIR/index.html`` (caption to image, image to caption, text to speech, speech to text, stories).

``DIR/demo_state.json`` records the finished stages: rerunning the same command after an
interruption skips them and continues inside the stage that was cut off. The run's settings are
a :class:`omni.config.RunConfig` (``recipes/demo.yaml``; the small budget adds
``recipes/demo_small.yaml``), saved as ``DIR/config.yaml``; a rerun with other settings is refused.

What is measured (all on held-out scenes; each with the score of a "chance" model that writes a
valid answer for another scene of the same set, which is what ignoring the input gets):

* image to caption: attribute accuracy of the generated captions (:func:`omni.toy.shapes.caption_accuracy`);
* caption to image: the share of generated images in which the judge sees exactly the objects
  the caption names;
* speech to text: attribute accuracy of the transcripts of the spoken captions;
* text to speech: the model's own speech-to-text on the speech it generated (a round trip);
* stories: the share of story steps whose image shows exactly that step's object.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from omni.errors import OmniError

BUDGETS = ("small", "default")
"""``--budget`` choices: ``default`` is recipes/demo.yaml; ``small`` adds recipes/demo_small.yaml (CI)."""
STAGES = ("world", "text", "image", "audio", "bundle", "judge", "preprocess", "pretrain", "evaluate")
"""The stages, in order."""
KINDS = ("caption", "speech", "story")
"""Sample kinds of omni.toy.shapes the model is trained on."""
STATE_FILE = "demo_state.json"
CONFIG_FILE = "config.yaml"


def demo_config(budget: str = "default", overrides: Sequence[str] = ()):
    """The demo's RunConfig: recipes/demo.yaml, recipes/demo_small.yaml for ``small``, then ``overrides``."""
    from omni.config import RunConfig, load_config, resolve_recipe

    if budget not in BUDGETS:
        raise OmniError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
    sources = [resolve_recipe("demo")] + ([resolve_recipe("demo_small")] if budget == "small" else [])
    cfg = load_config(RunConfig, *sources, overrides=list(overrides))
    size = cfg.tokenizer.image.model.image_size
    if size != cfg.demo.canvas:
        raise OmniError(f"demo.canvas={cfg.demo.canvas} must equal tokenizer.image.model.image_size={size}: "
                        "the image tokenizer reads the scenes at their own size")
    return cfg


class _State:
    """``DIR/demo_state.json``: finished stages with their seconds (written atomically)."""

    def __init__(self, out: Path):
        from omni.io import read_json

        self.path = out / STATE_FILE
        self.data = read_json(self.path, f"{self.path} is unreadable") if self.path.is_file() else {"done": {}}

    def done(self, stage: str) -> bool:
        return stage in self.data["done"]

    def finish(self, stage: str, seconds: float) -> None:
        from omni.io import atomic_write_text

        self.data["done"][stage] = round(seconds, 1)
        atomic_write_text(self.path, json.dumps(self.data, indent=1) + "\n")


def _check_same_run(out: Path, cfg) -> None:
    """Refuse to resume a folder made with other settings (the message names the keys)."""
    from omni.config import RunConfig, load_config, save_config, to_dict

    path = out / CONFIG_FILE
    if not path.is_file():
        save_config(cfg, path)
        return
    old = load_config(RunConfig, path)

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    a, b = dict(flat(to_dict(old))), dict(flat(to_dict(cfg)))
    diff = [k for k in a if a[k] != b.get(k)]
    if diff:
        shown = ", ".join(f"{k} ({a[k]!r} -> {b[k]!r})" for k in diff[:5]) + (" ..." if len(diff) > 5 else "")
        raise OmniError(f"{out} holds a demo run with other settings: {shown}; rerun it with the same "
                        "--budget and overrides, or choose another --out")


def run_demo(out: str | os.PathLike = "runs/demo", budget: str = "default", overrides: Sequence[str] = (),
             progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) every stage into ``out``; returns the metrics written to ``out/metrics.json``."""
    out = Path(out)
    cfg = demo_config(budget, overrides)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_run(out, cfg)
    state = _State(out)
    t_all = time.time()
    steps = {
        "world": ("toy scenes, speech and stories", lambda: _world(out, cfg)),
        "text": ("text tokenizer (SentencePiece BPE)", lambda: _text(out, cfg, progress)),
        "image": ("image tokenizer (VQ)", lambda: _image(out, cfg, progress, log)),
        "audio": ("audio tokenizer (whisper-VQ)", lambda: _audio(out, cfg, progress)),
        "bundle": ("unified tokenizer", lambda: _bundle(out, cfg, log)),
        "judge": ("image judge", lambda: _judge(out, cfg)),
        "preprocess": ("token datasets", lambda: _preprocess(out, cfg, progress)),
        "pretrain": ("decoder pretraining", lambda: _pretrain(out, cfg, progress, log)),
        "evaluate": ("generate and measure", lambda: _evaluate(out, cfg, budget, state, log)),
    }
    for i, name in enumerate(STAGES, 1):
        what, fn = steps[name]
        if state.done(name):
            log(f"[{i}/{len(STAGES)}] {what}: done already ({state.data['done'][name]} s)")
            continue
        log(f"[{i}/{len(STAGES)}] {what} ...")
        t = time.time()
        fn()
        state.finish(name, time.time() - t)
        log(f"[{i}/{len(STAGES)}] {what}: {time.time() - t:.1f} s")
    from omni.io import read_json

    metrics = read_json(out / "metrics.json", f"{out}/metrics.json is unreadable")
    log(f"omni demo finished in {time.time() - t_all:.0f} s this run")
    log(summary_lines(metrics))
    log(f"open {out / 'index.html'}")
    return metrics


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
def _world(out: Path, cfg) -> None:
    from omni.io import atomic_write_text
    from omni.toy import shapes

    d, w = out / "world", cfg.demo
    # each kind draws its scenes from its own seed stream; all of them from the train split
    for k, (kind, n) in enumerate(zip(KINDS, (w.caption_scenes, w.speech_scenes, w.story_scenes))):
        shapes.write_shards(d / kind, n, "train", seed=k, kinds=[kind], scenes_per_shard=1000, size=w.canvas,
                            grid=w.grid, order=w.order, resume=True)
    lines = []
    for sc in shapes.scenes(w.caption_scenes, "train", seed=0, size=w.canvas, grid=w.grid, order=w.order):
        lines += [sc.caption, "draw " + ", then ".join(o.phrase for o in sc.objects) + "."]
    atomic_write_text(d / "text.txt", "\n".join(lines) + "\n")


def _text(out: Path, cfg, progress: bool) -> None:
    from omni.bundle import UnifiedTokenizer
    from omni.tokenizers.text import train_text_tokenizer

    text = train_text_tokenizer([str(out / "world" / "text.txt")], cfg.tokenizer.text, progress=progress)
    UnifiedTokenizer.build(text, n_reserved_specials=cfg.tokenizer.n_reserved_specials).save(out / "tokenizers" / "text")


def _image(out: Path, cfg, progress: bool, log) -> None:
    from omni.tokenizers.image_train import train_image_tokenizer

    train_image_tokenizer([str(out / "world" / "caption")], out / "tokenizers" / "image", cfg.tokenizer.image,
                          resume=True, progress=progress, log=log)


def _audio(out: Path, cfg, progress: bool) -> None:
    from omni.tokenizers.audio_train import train_audio_tokenizer

    train_audio_tokenizer([str(out / "world" / "speech")], cfg.tokenizer.audio, out=out / "tokenizers" / "audio",
                          progress=progress)


def _bundle(out: Path, cfg, log) -> None:
    from omni.bundle import UnifiedTokenizer
    from omni.tokenizers.base import load_tokenizer

    text = UnifiedTokenizer.load(out / "tokenizers" / "text").text
    tok = UnifiedTokenizer.build(text, load_tokenizer(out / "tokenizers" / "image", "image"),
                                 load_tokenizer(out / "tokenizers" / "audio", "audio"),
                                 n_reserved_specials=cfg.tokenizer.n_reserved_specials)
    tok.save(out / "tokenizer")
    log(f"  {tok}")


def _judge(out: Path, cfg) -> None:
    from omni.eval.judge import JudgeConfig, train_judge

    train_judge(n_scenes=cfg.demo.judge_scenes, seed=cfg.seed, cfg=JudgeConfig(size=cfg.demo.canvas)).save(out / "judge")


def _preprocess(out: Path, cfg, progress: bool) -> None:
    from omni.data.preprocess import preprocess

    for kind in KINDS:
        preprocess([str(out / "world" / kind)], out / "tokenizer", out / "tokens" / kind, cfg.data.preprocess,
                   progress=progress)


def train_config(out: Path, cfg):
    """The RunConfig of the pretraining stage: the recipe with this run's paths and vocabulary size."""
    import copy

    from omni.bundle import UnifiedTokenizer

    run = copy.deepcopy(cfg)
    w = cfg.demo
    kinds = [(k, wt) for k, wt in zip(KINDS, (w.caption_weight, w.speech_weight, w.story_weight)) if wt > 0]
    run.data.tokenizer = str(out / "tokenizer")
    run.data.paths = [str(out / "tokens" / k) for k, _ in kinds]
    run.data.weights = [wt for _, wt in kinds]
    run.train.out = str(out / "model")
    run.model.vocab_size = UnifiedTokenizer.load(out / "tokenizer").vocab.size  # set by the bundle
    return run


def _pretrain(out: Path, cfg, progress: bool, log) -> None:
    from omni.run import find_resume
    from omni.train.loop import train

    found = find_resume(out / "model", "auto")
    if found is not None:
        log(f"  resuming pretraining from {found.relative_to(out)}")
    summary = train(train_config(out, cfg), resume="auto", progress=progress)
    if summary["stopped_by"] is not None:  # SIGTERM / SIGUSR1: a checkpoint was written, stop here
        raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
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


def _evaluate(out: Path, cfg, budget: str, state: _State, log) -> None:
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
        "seconds": {**state.data["done"], "evaluate": round(eval_seconds, 1)},
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
    write_page(entries, out / "index.html", title="omni demo", labels=labels, summary=table)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")


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
