"""The toy-scene judge: reads held-out scenes right, rejects noise, round-trips through safetensors + JSON."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omni.errors import ConfigError, OmniError
from omni.eval.judge import CONFIG, WEIGHTS, Judge, JudgeConfig, degrade, load, noise_images, train_judge
from omni.toy import shapes as toy


@pytest.fixture(scope="module")
def judge():
    return train_judge(n_scenes=300, seed=0)


@pytest.fixture(scope="module")
def heldout():
    """Test-split scene seeds (disjoint by content from the judge's training scenes) of another stream."""
    return toy.scene_seeds(200, "test", seed=1)


def _exact(preds, scenes) -> float:
    return float(np.mean([collections.Counter(p) == collections.Counter(sc.pairs) for p, sc in zip(preds, scenes)]))


def test_reads_heldout_scenes(judge, heldout):
    single = toy.scenes(100, "test", seed=1, n_objects=1)
    assert judge.evaluate(single)["exact"] >= 0.95
    scenes = [toy.scene(s) for s in heldout]
    acc = judge.evaluate(scenes)
    assert acc["exact"] >= 0.9 and {"exact_1", "exact_2", "exact_3"} <= set(acc)
    # what a small image model makes: degraded pixels, or a 32 px image upsampled by the judge
    rng = np.random.default_rng(0)
    assert _exact(judge.predict([degrade(sc.image, rng).astype(np.uint8) for sc in scenes]), scenes) >= 0.9
    x = torch.stack([torch.from_numpy(sc.image).permute(2, 0, 1).float() / 255 for sc in scenes])  # float [B,3,64,64]
    assert _exact(judge.predict(F.interpolate(x, size=32, mode="bilinear", antialias=True)), scenes) >= 0.9
    # read() gives boxes close to the truth, left to right
    for sc, objs in zip(scenes[:50], judge.read([sc.image for sc in scenes[:50]])):
        if [(c, s) for c, s, _ in objs] == sc.pairs:
            assert all(np.abs(np.subtract(b, o.box)).max() <= 1 for (_, _, b), o in zip(objs, sc.objects))


def test_noise_is_rejected(judge):
    noise = noise_images(60, 64, seed=3)
    assert np.mean([p == [] for p in judge.predict(list(noise))]) >= 0.9
    assert np.mean([judge.correct(im, "a red circle") for im in noise]) <= 0.05
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert judge.predict([blank]) == [[]]


def test_correct_compares_the_caption_with_the_image(judge):
    sc = toy.render([("red", "circle"), ("blue", "square")], seed=4)
    assert judge.correct(sc.image, "a red circle and a blue square")
    assert judge.correct(sc.image, "a blue square and a red circle")  # order is not judged
    assert not judge.correct(sc.image, "a red circle")  # one object too few
    assert not judge.correct(sc.image, "a green circle and a blue square")  # wrong color
    assert not judge.correct(sc.image, "a red triangle and a blue square")  # wrong shape
    one = toy.render([("orange", "triangle")], seed=5)
    pixels = torch.from_numpy(one.image).permute(2, 0, 1).float() / 255  # float [3,H,W] in [0,1]
    assert judge.correct(pixels, "an orange triangle") and judge.correct(one.image, "an orange triangle")
    assert not judge.correct(pixels, "an orange square")
    with pytest.raises(OmniError, match="names no object"):
        judge.correct(one.image, "a pink star")


def test_save_load_round_trip_and_bad_folders(judge, tmp_path, heldout):
    d = judge.save(tmp_path / "judge")
    assert sorted(p.name for p in d.iterdir()) == sorted([CONFIG, WEIGHTS])
    assert json.loads((d / CONFIG).read_text())["shapes"] == list(toy.SHAPES)
    again = load(d)
    images = [toy.scene(s).image for s in heldout[:40]] + list(noise_images(10, 64))
    assert again.predict(images) == judge.predict(images)

    with pytest.raises(OmniError, match="not a judge folder: judge.json is missing"):
        Judge.load(tmp_path)
    # weights that do not fit the config
    other = tmp_path / "other"
    Judge(JudgeConfig(hidden=8)).save(other)
    (other / CONFIG).write_text((d / CONFIG).read_text())
    with pytest.raises(OmniError, match="does not fit"):
        Judge.load(other)
    (other / CONFIG).write_text(json.dumps({"colors": ["red", "pink"]}))
    with pytest.raises(ConfigError, match="colors="):
        Judge.load(other)


def test_training_is_deterministic_and_bad_settings_are_refused():
    a, b = train_judge(n_scenes=40, seed=7, steps=20), train_judge(n_scenes=40, seed=7, steps=20)
    for (k, v), (_, w) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert torch.equal(v, w), k
    with pytest.raises(ConfigError, match="shapes=\\['star'\\] is invalid"):
        JudgeConfig(shapes=["star"])
    with pytest.raises(ConfigError, match="size=16 is invalid"):
        JudgeConfig(size=16)
    with pytest.raises(OmniError, match="n_scenes must be >= 1"):
        train_judge(n_scenes=0)
    with pytest.raises(OmniError, match="no images to judge"):
        a.predict([])
