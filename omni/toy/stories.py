"""Long stories of the toy world: "draw A, then B, then ... ." with one picture per step, for long output.

LongWriter-V (Zhang et al. 2025, "LongWriter-V: Enabling Ultra-Long and High-Fidelity Generation in
Vision-Language Models", arXiv 2502.14834) measures whether a model writes as much as it is asked
for, and how well. In the toy world the asked-for length is a number of steps: a story of N steps is
the prompt "draw a red circle, then a blue square, then ... ." (the phrase format of the ``story``
kind of :mod:`omni.toy.shapes`) followed by N pictures, picture i showing step i's object alone on
the canvas at its place. Pretraining scenes hold one to three objects, so pretraining never shows a
story longer than three steps; these stories are longer (``steps``: 4 to 8, say).

A story is made from toy-world scenes of one split: the objects of consecutive scenes of
:func:`omni.toy.shapes.scenes` (``parts=True`` for ``train``, as the story kind's shards use, so
each one-object picture is itself a training scene) are chained until N steps; step i's picture is
:meth:`omni.toy.shapes.Scene.alone` of its object. Held out by content twice: the pictures are scenes
of the asked split, and the prompt text has a split of its own, a hash of the text
(:func:`prompt_split`), so :func:`stories` of ``validation`` or ``test`` never returns a prompt that
a ``train`` call could (a candidate whose prompt hashes to another split is skipped).

``omni data stories OUT --steps 4,8 --stories N --split train`` writes them as WebDataset shards
(:func:`write_shards`), the prompt a ``"prompt": true`` segment so a fine-tuning stage trains only
the pictures (and ``<eos>``); ``omni eval longwrite`` (:mod:`omni.eval.longwrite`) generates for
held-out prompts and scores length and quality.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omni.errors import OmniError
from omni.toy import needles, shapes
from omni.toy.needles import _check_split, _hash_split

SPLITS = needles.SPLITS
"""Content splits of the stories (the prompt text and the scenes both)."""


def prompt_of(steps: Sequence[tuple[str, str]]) -> str:
    """"draw a red circle, then a blue square." for ``[(color, shape), ...]`` (the story kind's phrases)."""
    objs = [shapes.Obj(shape, color, (0, 0, 0, 0)) for color, shape in steps]
    return "draw " + ", then ".join(o.phrase for o in objs) + "."


def prompt_split(prompt: str) -> str:
    """The split of a story's prompt text (:data:`SPLITS`): a function of the text alone."""
    return _hash_split(prompt, "story")


@dataclass(frozen=True, eq=False)
class LongStory:
    """A story of N steps: its prompt, the (color, shape) of each step, and where each step's picture comes from."""

    prompt: str
    steps: tuple[tuple[str, str], ...]
    """``(color, shape)`` of step 0, 1, ..., N - 1."""
    parts: tuple[tuple[shapes.Scene, int], ...]
    """Per step, (the scene, the index of the object in it) whose :meth:`~omni.toy.shapes.Scene.alone`
    is the step's picture."""

    def __len__(self) -> int:
        return len(self.steps)

    def picture(self, i: int) -> np.ndarray:
        """The right picture of step ``i``: its object alone on the canvas at its place, uint8 [H,W,3]."""
        sc, k = self.parts[i]
        return sc.alone(k)

    def pictures(self) -> list[np.ndarray]:
        """The right pictures of every step, in order."""
        return [self.picture(i) for i in range(len(self))]


def step_picture(story: LongStory, i: int) -> np.ndarray:
    """The world's right picture of step ``i`` of ``story`` (what a corrector puts in place of a wrong one)."""
    return story.picture(i)


def _check_steps(steps: Sequence[int]) -> list[int]:
    steps = [int(n) for n in steps]
    if not steps or any(n < 1 for n in steps):
        raise OmniError(f"steps={steps} is invalid: give story lengths >= 1 (for example 4,8)")
    return steps


def stories(n: int, steps: int | Sequence[int], split: str = "train", seed: int = 0, size: int = 64, grid: int = 1,
            order: str = "left_to_right",
            novel_pairs: Sequence[tuple[str, str]] = shapes.NOVEL_PAIRS) -> list[LongStory]:
    """The first ``n`` stories of ``split`` in the stream of ``seed``: the same arguments give the same stories.

    The scenes are ``shapes.scenes(..., split, seed, ...)`` drawn at ``size``, ``grid``, ``order``
    (``parts=True`` for ``train``). A candidate story draws its length N from ``steps`` (an int, or a
    list or range of lengths; a seeded rng per candidate) and chains the objects of consecutive scenes
    from the current one until it has N steps (the last scene's objects left over are dropped). It is
    kept when :func:`prompt_split` of its prompt is ``split`` too, and the next candidate starts after
    its scenes; else the next candidate starts one scene later. So stories never share a scene, and
    no held-out prompt text is a training one."""
    _check_split(split)
    lengths = _check_steps([steps] if isinstance(steps, (int, np.integer)) else steps)
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise OmniError(f"number of stories must be an integer >= 0, got {n!r}")
    world = dict(size=size, grid=grid, order=order)
    # scenes one story spends: about N / 2 of its own (two objects a scene), plus one per candidate
    # rejected by the prompt's split (a tenth of them is validation, a tenth test, the rest train)
    kept = 0.8 if split == "train" else 0.1
    stream = shapes.scenes(int(n * (1 / kept + float(np.mean(lengths)) / 2) * 1.2) + 16, split, seed, novel_pairs,
                           parts=split == "train", **world)
    out: list[LongStory] = []
    start, tried = 0, 0
    while len(out) < n:
        if tried > 100 * (n + 10):
            raise OmniError(f"found only {len(out)} of {n} {split} stories in the stream of seed {seed}; ask for fewer")
        want = lengths[int(np.random.default_rng([int(seed), tried, 7]).integers(len(lengths)))]
        tried += 1
        parts, at = [], start
        while len(parts) < want:
            if at == len(stream):
                stream = shapes.scenes(len(stream) * 3 // 2 + 16, split, seed, novel_pairs, parts=split == "train",
                                       **world)
            sc = stream[at]
            at += 1
            parts += [(sc, k) for k in range(len(sc.objects))][:want - len(parts)]
        pairs = tuple((sc.objects[k].color, sc.objects[k].shape) for sc, k in parts)
        prompt = prompt_of(pairs)
        if prompt_split(prompt) == split:
            out.append(LongStory(prompt, pairs, tuple(parts)))
            start = at
        else:
            start += 1
    return out


def sample(story: LongStory, key: str) -> dict:
    """The WebDataset sample of one story (the story kind's format): ``KEY.json`` = the prompt as a
    ``"prompt": true`` text segment and one ``{"image": "i.png"}`` per step, ``KEY.i.png`` each picture."""
    segs: list[dict] = [{"text": story.prompt, "prompt": True}]
    out: dict = {"__key__": key}
    for i in range(len(story)):
        segs.append({"image": f"{i}.png"})
        out[f"{i}.png"] = shapes._png(story.picture(i))
    out["json"] = json.dumps({"segments": segs}).encode()
    return out


def write_shards(out: str | os.PathLike, n: int, steps: int | Sequence[int] = (4, 5, 6, 7, 8), split: str = "train",
                 seed: int = 0, size: int = 64, grid: int = 1, order: str = "left_to_right",
                 novel_pairs: Sequence[tuple[str, str]] = shapes.NOVEL_PAIRS, per_shard: int = 1000,
                 resume: bool = False) -> list[Path]:
    """Write the first ``n`` stories of ``split`` (:func:`stories`) as ``out/stories-SPLIT-000.tar`` ...,
    keys ``SPLIT-story-J``. A shard is written to a temp file and renamed, so one that exists is
    whole; ``resume`` keeps such shards. Returns the shard paths."""
    if per_shard < 1:
        raise OmniError(f"per_shard must be >= 1, got {per_shard}")
    todo = list(enumerate(stories(n, steps, split, seed, size, grid, order, novel_pairs)))
    return shapes.write_tar_shards(out, f"stories-{split}", todo, per_shard, resume,
                                   lambda job: [sample(job[1], f"{split}-story-{job[0]:06d}")])

