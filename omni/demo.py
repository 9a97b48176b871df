"""`omni demo`: train a whole toy any-to-any model on :mod:`omni.toy.shapes` and show what it learned.

The demo runs the project's real pipeline, stage by stage, into one folder ``DIR``:

1. ``world``: WebDataset shards of toy scenes (``DIR/world/``): image-caption pairs, spoken
   captions synthesized by espeak-ng, stories ("draw a red circle, then a blue square." and one
   image per object), detection documents ("find every red circle", the image, ``<det>`` and the
   boxes) and generation documents (the caption, ``<gen>`` and the image); plus the text the text
   tokenizer learns from.
2. ``text``: the SentencePiece BPE text tokenizer (``DIR/tokenizers/text``).
3. ``image``: the VQ image tokenizer (``DIR/tokenizers/image``; resumes from its checkpoints).
4. ``audio``: the whisper-VQ audio tokenizer (``DIR/tokenizers/audio``).
5. ``bundle``: the unified tokenizer of the three (``DIR/tokenizer``).
6. ``judge``: the image judge (:mod:`omni.eval.judge`), trained on the toy world's ground truth.
7. ``preprocess``: packed token datasets, one per sample kind (``DIR/tokens/KIND``).
8. ``pretrain``: an OmniDecoder pretrained on the caption, speech and story blend (``DIR/model``;
   resumes from its newest checkpoint, which is also written on SIGTERM).
   ``heads``: the pretrained decoder trained on, jointly with its routing heads (the ``<det>`` DETR
   head and the ``<gen>`` diffusion head, their losses added to the LM's), on the whole blend with
   the detection and generation documents (``DIR/heads``, resumable the same way). A stage of its
   own, as VisionLLM v2 trains its decoders after the LLM: trained jointly from the first step, the
   heads' gradients reached the decoder at many times the LM's norm and, clipped together with it,
   left the LM too little to learn from; every task fell toward chance.
9. ``evaluate``: generations on the test split (scenes disjoint from training by content, and a
   compositional set whose color-shape pairs no training sample shows), judged, into
   ``DIR/metrics.json`` and ``DIR/index.html`` (caption to image, image to caption, text to
   speech, speech to text, stories, the ``<det>`` head's COCO AP and the ``<gen>`` head's judged
   images beside the VQ-token path's, each with its seconds per image).

``DIR/demo_state.json`` records the finished stages: rerunning the same command after an
interruption skips them and continues inside the stage that was cut off. The run's settings are
a :class:`omni.eval.demo.DemoRunConfig` (``recipes/demo/default.yaml``; the small budget adds
``recipes/demo/small.yaml``), saved as ``DIR/config.yaml``; a rerun with other settings is refused.
What the last stage measures, and how, is :mod:`omni.eval.demo`'s (also ``omni eval demo``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from omni.errors import OmniError
from omni.eval.demo import CONFIG_FILE, DemoRunConfig, evaluate_demo, summary_lines

BUDGETS = ("small", "default", "large")
"""``--budget`` choices: ``default`` is recipes/demo/default.yaml; ``small`` (CI, a few minutes) and
``large`` (about an hour) add recipes/demo/small.yaml or recipes/demo/large.yaml on top of it."""
STAGES = ("world", "text", "image", "audio", "bundle", "judge", "preprocess", "pretrain", "heads", "evaluate")
"""The stages, in order."""
KINDS = ("caption", "speech", "story", "detect", "generate")
"""Sample kinds of omni.toy.shapes the model can be trained on (``demo.<kind>_weight`` > 0: it is)."""
STATE_FILE = "demo_state.json"


def demo_config(budget: str = "default", overrides: Sequence[str] = ()):
    """The demo's config: recipes/demo/default.yaml, recipes/demo/small.yaml for ``small``, then ``overrides``."""
    from omni.config import load_config, resolve_recipe

    if budget not in BUDGETS:
        raise OmniError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
    sources = [resolve_recipe("demo/default")] + ([resolve_recipe(f"demo/{budget}")] if budget != "default" else [])
    cfg = load_config(DemoRunConfig, *sources, overrides=list(overrides))
    size = cfg.tokenizer.image.model.image_size
    if size != cfg.demo.canvas:
        raise OmniError(f"demo.canvas={cfg.demo.canvas} must equal tokenizer.image.model.image_size={size}: "
                        "the image tokenizer reads the scenes at their own size")
    for kind, head, slots in (("detect", cfg.heads.det, "det_queries"), ("generate", cfg.heads.gen, "gen_queries")):
        weight = getattr(cfg.demo, f"{kind}_weight")
        key = "det" if kind == "detect" else "gen"
        if head.enabled and cfg.demo.heads_steps == 0:
            raise OmniError(f"heads.{key}.enabled=true but demo.heads_steps=0: the heads train in the heads stage; "
                            "give it steps or disable the heads")
        if (weight > 0) != head.enabled:
            raise OmniError(f"demo.{kind}_weight={weight} but heads.{key}.enabled={str(head.enabled).lower()}: the "
                            f"{kind} documents train the {key} head, so set both (a weight > 0 and enabled=true) or "
                            "neither")
        if head.enabled and head.n_queries != getattr(cfg.data.preprocess, slots):
            raise OmniError(f"heads.{key}.n_queries={head.n_queries} must equal data.preprocess.{slots}="
                            f"{getattr(cfg.data.preprocess, slots)}: the token datasets carry that many slots")
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
    from omni.config import load_config, save_config, to_dict

    path = out / CONFIG_FILE
    if not path.is_file():
        save_config(cfg, path)
        return
    old = load_config(DemoRunConfig, path)

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
        "heads": ("routing heads, trained with the decoder", lambda: _heads(out, cfg, progress, log)),
        "evaluate": ("generate and measure", lambda: evaluate_demo(out, cfg, budget, state.data["done"], log)),
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
    # each kind draws its scenes from its own seed stream; all of them from the train split, which
    # shares no scene (by content) with validation or test and no novel pair with any of them
    world = dict(novel_pairs=w.pairs, size=w.canvas, grid=w.grid, order=w.order)
    for kind, n, _ in w.blend("heads" if w.heads_steps else "pretrain"):
        shapes.write_shards(d / kind, n, "train", seed=KINDS.index(kind), kinds=[kind], scenes_per_shard=1000,
                            resume=True, **world)
    lines = []
    for sc in shapes.scenes(w.caption_scenes, "train", seed=0, **world):
        lines += [sc.caption, "draw " + ", then ".join(o.phrase for o in sc.objects) + "."]
    atomic_write_text(d / "text.txt", "\n".join(lines) + "\n")


def _text(out: Path, cfg, progress: bool) -> None:
    from omni.bundle import UnifiedTokenizer
    from omni.tokenizers.text import train_text_tokenizer

    text = train_text_tokenizer([str(out / "world" / "text.txt")], cfg.tokenizer.text, progress=progress)
    UnifiedTokenizer.build(text, n_reserved_specials=cfg.tokenizer.n_reserved_specials).save(out / "tokenizers" / "text")


def _image(out: Path, cfg, progress: bool, log) -> None:
    from omni.eval.tokenizers import ImageEvaluator
    from omni.tokenizers.image_train import train_image_tokenizer

    data = [str(out / "world" / "caption")]
    train_image_tokenizer(data, out / "tokenizers" / "image", cfg.tokenizer.image,
                          ImageEvaluator(None, cfg.tokenizer.image, train_data=data, log=log), resume=True,
                          progress=progress, log=log)


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

    workers = min(len(os.sched_getaffinity(0)), 4)  # one process per core: the same shards as one process
    for kind, _, _ in cfg.demo.blend("heads" if cfg.demo.heads_steps else "pretrain"):
        preprocess([str(out / "world" / kind)], out / "tokenizer", out / "tokens" / kind, cfg.data.preprocess,
                   progress=progress, workers=workers)


def train_config(out: Path, cfg, stage: str = "pretrain"):
    """The RunConfig of a training stage, the recipe with this run's paths and vocabulary size:
    'pretrain' (the decoder alone, on the caption, speech and story documents, into ``out/model``) or
    'heads' (from pretraining's last checkpoint, the decoder and its heads on every kind, into
    ``out/heads``: ``demo.heads_steps`` steps at ``demo.heads_lr``)."""
    import copy
    import dataclasses

    from omni.bundle import UnifiedTokenizer
    from omni.config import RunConfig
    from omni.config.heads import HeadsConfig

    run = RunConfig(**{f.name: copy.deepcopy(getattr(cfg, f.name)) for f in dataclasses.fields(RunConfig)})
    kinds = cfg.demo.blend(stage)
    run.data.tokenizer = str(out / "tokenizer")
    run.data.paths = [str(out / "tokens" / k) for k, _, _ in kinds]
    run.data.weights = [wt for _, _, wt in kinds]
    run.model.vocab_size = UnifiedTokenizer.load(out / "tokenizer").vocab.size  # set by the bundle
    if stage == "pretrain":
        run.heads = HeadsConfig()  # none: the heads train in their own stage
        run.train.out = str(out / "model")
        return run
    d = cfg.demo
    run.train.init_from = str(out / "model")
    run.train.out = str(out / "heads")
    run.train.steps, run.train.lr, run.train.min_lr = d.heads_steps, d.heads_lr, d.heads_lr / 10
    run.train.warmup_steps = min(30, d.heads_steps)
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


def _heads(out: Path, cfg, progress: bool, log) -> None:
    from omni.run import find_resume
    from omni.train.loop import train

    if not cfg.demo.heads_steps:
        log("  no heads stage (demo.heads_steps=0)")
        return
    found = find_resume(out / "heads", "auto")
    if found is not None:
        log(f"  resuming the heads stage from {found.relative_to(out)}")
    summary = train(train_config(out, cfg, "heads"), resume="auto", progress=progress)
    if summary["stopped_by"] is not None:
        raise KeyboardInterrupt
