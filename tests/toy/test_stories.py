"""Long stories of the toy world (omni.toy.stories): held out by prompt text and by pictures, the lengths
asked for, the step pictures, and the shards `omni data stories` writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from omni.errors import OmniError
from omni.toy import shapes as toy
from omni.toy import stories

WORLD = dict(size=32, grid=4, order="reading")


def _grouped(path):
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(path, "rb") as f:
        return list(group_by_keys({**m, "__url__": str(path)} for m in tar_file_iterator(f)))


def test_stories_are_held_out_by_prompt_text_and_by_pictures():
    # short stories have few distinct prompts (256 of two steps), so a leak would show
    short = {s: stories.stories(400 if s == "train" else 20, [1, 2], s, 0, **WORLD) for s in stories.SPLITS}
    prompts = {s: {st.prompt for st in v} for s, v in short.items()}
    assert len(prompts["train"]) > 100 and len(prompts["validation"]) >= 10 and len(prompts["test"]) >= 10
    assert not prompts["train"] & prompts["validation"] and not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    long = {s: stories.stories(200 if s == "train" else 10, range(4, 9), s, 0, **WORLD) for s in stories.SPLITS}
    train = {st.prompt for st in long["train"]}
    for split, sts in {**short, **long}.items():
        for st in sts:
            assert stories.prompt_split(st.prompt) == split
            assert st.prompt == stories.prompt_of(st.steps)
            for sc, _ in st.parts:
                assert toy.split_of(sc) == split
                if split == "train":  # each picture alone is itself a training scene
                    assert toy.parts_split(sc) == {"train"}
    assert not train & {st.prompt for s in ("validation", "test") for st in long[s]}


def test_lengths_prompts_and_pictures():
    sts = stories.stories(25, range(4, 9), "validation", 3, **WORLD)
    assert {len(st) for st in sts} == {4, 5, 6, 7, 8}
    # the same arguments give the same stories, and the first n never depend on how many were asked for
    assert [st.prompt for st in stories.stories(6, range(4, 9), "validation", 3, **WORLD)] == [st.prompt for st in sts[:6]]
    st = sts[0]
    assert st.prompt.startswith("draw ") and st.prompt.endswith(".") and st.prompt.count(", then ") == len(st) - 1
    assert toy.parse_caption(st.prompt) == list(st.steps)
    for i, (color, shape) in enumerate(st.steps):
        pic = stories.step_picture(st, i)
        assert pic.shape == (32, 32, 3) and pic.dtype == np.uint8
        drawn = {tuple(p) for p in pic.reshape(-1, 3)} - {toy.BACKGROUND}
        assert drawn == {toy.COLORS[color]}  # the step's object alone on the canvas
        sc, k = st.parts[i]
        assert np.array_equal(pic, sc.alone(k)) and (sc.objects[k].color, sc.objects[k].shape) == (color, shape)
    # stories never share a scene
    used = [id(sc) for st in sts for sc in {id(s): s for s, _ in st.parts}.values()]
    assert len(used) == len(set(used))
    with pytest.raises(OmniError, match="steps"):
        stories.stories(2, [0, 4], "train")
    with pytest.raises(OmniError, match="split"):
        stories.stories(2, 4, "compositional_test")


def test_shards_parse_with_the_prompt_marked(tmp_path):
    from omni.data.samples import parse_sample
    from omni.document import Image, Text

    rc, out, err = run_cli("data", "stories", tmp_path / "s", "--steps", "4,6", "--stories", "5", "--per-shard", "2",
                           "--split", "validation")
    assert rc == 0 and "(3 shards)" in out, err
    samples = [s for p in sorted((tmp_path / "s").glob("stories-validation-*.tar")) for s in _grouped(p)]
    want = stories.stories(5, range(4, 7), "validation", 0, **WORLD)
    assert len(samples) == 5
    for s, st in zip(samples, want):
        spec = json.loads(s["json"])
        assert spec["segments"][0] == {"text": st.prompt, "prompt": True}
        parsed = parse_sample(s)
        assert parsed.prompt == [True] + [False] * len(st)
        assert isinstance(parsed.doc.segments[0], Text) and parsed.doc.segments[0].text == st.prompt
        pics = parsed.doc.segments[1:]
        assert len(pics) == len(st) and all(isinstance(p, Image) for p in pics)
        got = (pics[-1].pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(got, st.picture(len(st) - 1))
    for args, msg in [(["--steps", "0,3"], "--steps '0,3' is invalid"), (["--steps", "a"], "LO,HI"),
                      (["--grid", "0"], "grid=0 is invalid")]:
        rc, _, err = run_cli("data", "stories", tmp_path / "bad", *args)
        assert rc == 2 and msg in err and "Traceback" not in err, (args, err)
