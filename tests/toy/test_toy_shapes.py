"""The toy shapes world: deterministic scenes, honest captions and boxes, shards the data pipeline reads."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from conftest import run_cli
from omni.errors import OmniError
from omni.toy import shapes as toy


def _grouped(path):
    """The grouped samples of a shard, read the way `omni data preprocess` reads them."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(path, "rb") as f:
        return list(group_by_keys({**m, "__url__": str(path)} for m in tar_file_iterator(f)))


def test_scenes_are_deterministic_for_a_seed_and_vary_across_seeds():
    a, b = toy.scene(123), toy.scene(123)
    assert np.array_equal(a.image, b.image) and a.objects == b.objects and a.caption == b.caption
    assert (a.voice, a.speed, a.pitch) == (b.voice, b.speed, b.pitch)
    assert a.image.dtype == np.uint8 and a.image.shape == (64, 64, 3)
    many = toy.scenes(120, "train", seed=0)
    assert len({sc.image.tobytes() for sc in many}) == 120
    assert {len(sc.objects) for sc in many} == {1, 2, 3}
    assert {o.color for sc in many for o in sc.objects} == set(toy.COLORS)
    assert {o.shape for sc in many for o in sc.objects} == set(toy.SHAPES)
    assert len({sc.voice for sc in many}) > 10 and len({sc.speed for sc in many}) > 10
    # the spoken caption is the same wave for the same scene
    w1, sr = a.speech()
    w2, _ = toy.scene(123).speech()
    assert sr == 22050 and np.array_equal(w1, w2) and w1.size > sr // 4
    # other canvas sizes and restricted names
    small = toy.scene(5, n_objects=3, size=40, colors=["red"], shapes=["square"])
    assert small.image.shape == (40, 40, 3) and small.pairs == [("red", "square")] * 3


def test_captions_name_every_object_left_to_right():
    for sc in toy.scenes(150, "train", seed=1):
        assert toy.parse_caption(sc.caption) == sc.pairs
        centers = [o.box[0] + o.box[2] for o in sc.objects]
        assert centers == sorted(centers)
        assert sc.caption.count(" and ") == (len(sc.objects) > 1) and sc.caption.count(",") == max(0, len(sc.objects) - 2)
    # reading order: by top edge then left edge (the order raster-scanned image codes meet the objects);
    # the same layout as left to right, only named in another order
    moved = 0
    for a, b in zip(toy.scenes(150, "train", seed=1, size=32, grid=4),
                    toy.scenes(150, "train", seed=1, size=32, grid=4, order="reading")):
        assert np.array_equal(a.image, b.image) and sorted(a.pairs) == sorted(b.pairs)
        tops = [(o.box[1], o.box[0]) for o in b.objects]
        assert tops == sorted(tops) and toy.parse_caption(b.caption) == b.pairs
        moved += a.pairs != b.pairs
    assert moved >= 20
    with pytest.raises(OmniError, match="order='diagonal' is invalid: choose from left_to_right, reading"):
        toy.scene(1, order="diagonal")
    sc = toy.render([("blue", "square"), ("orange", "circle"), ("red", "triangle")], seed=3)
    assert sorted(sc.pairs) == [("blue", "square"), ("orange", "circle"), ("red", "triangle")]
    assert "an orange circle" in sc.caption and sc.caption.startswith("a ") and ", " in sc.caption


def test_boxes_lie_inside_the_canvas_and_match_the_drawn_pixels():
    white = np.array(toy.BACKGROUND)
    for sc in toy.scenes(100, "train", seed=2) + [toy.scene(s, n_objects=3, size=32) for s in range(20)]:
        size = sc.image.shape[0]
        covered = np.zeros(sc.image.shape[:2], bool)
        for i, o in enumerate(sc.objects):
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            side = x1 - x0
            assert y1 - y0 == side and toy._size_range(size)[0] <= side <= toy._size_range(size)[1]
            own = (sc.image == np.array(toy.COLORS[o.color])).all(-1)
            own[:, :x0] = own[:, x1:] = False
            own[:y0] = own[y1:] = False
            ys, xs = np.nonzero(own)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == o.box  # the box is tight
            fill = own.sum() / side**2
            expected = {"square": (1.0, 1.0), "circle": (0.7, 0.86), "triangle": (0.45, 0.66)}[o.shape]
            assert expected[0] <= fill <= expected[1], (o, fill)
            # drawn alone, the object has exactly the scene's pixels inside its box
            alone = sc.alone(i)
            assert np.array_equal(alone[y0:y1, x0:x1], sc.image[y0:y1, x0:x1])
            assert (alone[~own] == white).all()
            covered[y0:y1, x0:x1] = True
        assert (sc.image[~covered] == white).all()  # nothing drawn outside the boxes
        for a in sc.objects:  # boxes keep a gap: objects never touch
            for b in sc.objects:
                if a is not b:
                    assert (a.box[2] + toy.GAP <= b.box[0] or b.box[2] + toy.GAP <= a.box[0]
                            or a.box[3] + toy.GAP <= b.box[1] or b.box[3] + toy.GAP <= a.box[1])


def test_splits_are_disjoint_by_content_and_fixed_by_it():
    world = dict(size=32, grid=4)  # the demo's world: few distinct objects, so content repeats often
    by_split = {sp: toy.scenes(150, sp, **world) for sp in toy.SPLITS}
    keys = {sp: {toy.scene_key(sc) for sc in scs} for sp, scs in by_split.items()}
    for a in toy.SPLITS:
        assert all(toy.split_of(sc) == a for sc in by_split[a])
        for b in toy.SPLITS:
            assert a == b or not keys[a] & keys[b], (a, b)
    # evaluation sets count a scene once; training streams repeat one-object scenes
    ones = {sp: [toy.scene_key(sc) for sc in toy.scenes(120, sp, n_objects=1, **world)] for sp in ("train", "test")}
    assert len(set(ones["test"])) == 120 and len(set(ones["train"])) < 120
    novel = set(toy.NOVEL_PAIRS)
    for sp, scs in by_split.items():
        assert all(bool(set(sc.pairs) & novel) == sp.startswith("compositional") for sc in scs), sp
    # a scene's split never depends on the count, nor on its seed: same content, same split
    assert [sc.seed for sc in toy.scenes(40, "train", **world)] == [sc.seed for sc in by_split["train"][:40]]
    seen: dict = {}
    for k in range(3000):
        sc = toy.scene(k, n_objects=1, **world)
        key = toy.scene_key(sc)
        if key in seen:
            assert toy.split_of(sc) == seen[key][0] and (sc.image == seen[key][1]).all()  # same key, same pixels
        seen[key] = (toy.split_of(sc), sc.image)
    assert len({k for k, (sp, _) in seen.items() if sp == "test"}) > 50  # one-object test scenes exist
    # about a tenth of the novel-free scenes is validation, a tenth test
    share = collections.Counter(toy.split_of(toy.scene(k)) for k in range(2000))
    assert 0.06 < share["test"] / 2000 < 0.14 and 0.06 < share["validation"] / 2000 < 0.14
    # a story shows each object alone: its training scenes' objects alone are training scenes too
    assert any(toy.parts_split(sc) != {"train"} for sc in by_split["train"])
    assert all(toy.parts_split(sc) == {"train"} for sc in toy.scenes(100, "train", parts=True, **world))
    # other novel pairs move other scenes out of training
    mine = [("red", "circle")]
    assert all(("red", "circle") not in sc.pairs for sc in toy.scenes(100, "train", novel_pairs=mine, **world))
    assert all(("red", "circle") in sc.pairs for sc in toy.scenes(20, "compositional_test", novel_pairs=mine, **world))


def test_parse_caption_round_trips_and_accuracy_is_defined_on_multisets():
    for color in toy.COLORS:
        for shape in toy.SHAPES:
            sc = toy.render([(color, shape)], seed=1)
            assert toy.parse_caption(sc.caption) == [(color, shape)]
    assert toy.parse_caption("Two RED circles, an orange square; the sky is blue.") == [
        ("red", "circle"), ("orange", "square")]
    assert toy.parse_caption("") == [] and toy.parse_caption("a pink circle and a red star") == []

    truth = ["a red circle and a blue square", "a green triangle", [("yellow", "circle")], "a red square"]
    pred = ["a blue square and a red circle",  # order does not matter: exact
            "a green square",  # right count and color, wrong shape
            "a yellow circle and a yellow circle",  # one too many
            "a blue square"]  # right count and shape, wrong color
    acc = toy.caption_accuracy(pred, truth)
    assert acc == {"exact": 0.25, "count": 0.75, "colors": 0.5, "shapes": 0.5,
                   "precision": 3 / 6, "recall": 3 / 5,
                   # one-to-one matching: 1, green right of (green, triangle), one of two slots, color wrong
                   "attributes": (1 + 1 / 2 + 2 / 4 + 1 / 2) / 4}
    scenes = toy.scenes(10, "test")
    assert toy.caption_accuracy([sc.caption for sc in scenes], scenes)["exact"] == 1.0
    with pytest.raises(OmniError, match="2 predicted captions for 1 scenes"):
        toy.caption_accuracy(["a", "b"], ["a red circle"])


def test_shards_are_read_by_parse_sample_and_by_omni_data_preprocess(tmp_path, real_tokenizer):
    from omni.data.samples import parse_sample
    from omni.document import Audio, Detect, Generate, Image, Text

    paths = toy.write_shards(tmp_path / "raw", 5, "train", scenes_per_shard=3)
    assert [p.name for p in paths] == ["shapes-train-000.tar", "shapes-train-001.tar"]
    samples = [s for p in paths for s in _grouped(p)]
    assert len(samples) == 5 * len(toy.KINDS)
    by_kind = collections.defaultdict(list)
    for s in samples:
        by_kind[s["__key__"].rsplit("-", 1)[1]].append(s)
    seeds = toy.scene_seeds(5, "train", parts=True)  # the story kind keeps scenes whose objects alone are train too
    for s, seed in zip(by_kind["caption"], seeds):
        sc = toy.scene(seed)
        doc = parse_sample(s, pair_order="media_first").doc
        assert [type(x) for x in doc.segments] == [Image, Text] and doc.segments[1].text == sc.caption
        assert np.allclose(doc.segments[0].pixels.permute(1, 2, 0).numpy() * 255, sc.image)  # png is lossless
    for s in by_kind["speech"]:
        doc = parse_sample(s, pair_order="text_first").doc
        assert [type(x) for x in doc.segments] == [Text, Audio] and doc.segments[1].sample_rate == 16000
    for s, seed in zip(by_kind["story"], seeds):
        sc = toy.scene(seed)
        doc = parse_sample(s).doc
        assert [type(x) for x in doc.segments] == [Text] + [Image] * len(sc.objects)
        assert doc.segments[0].text == "draw " + ", then ".join(o.phrase for o in sc.objects) + "."
        assert toy.parse_caption(doc.segments[0].text) == sc.pairs
    for s in by_kind["spoken"]:
        assert [type(x) for x in parse_sample(s).doc.segments] == [Audio, Image]
    for s, seed in zip(by_kind["detect"], seeds):  # request, image, the boxes that answer it
        sc = toy.scene(seed)
        doc = parse_sample(s).doc
        assert [type(x) for x in doc.segments] == [Text, Image, Detect]
        request, det = doc.segments[0].text, doc.segments[2]
        want = [o for o in sc.objects if request == "find the shapes" or request == f"find every {o.color} {o.shape}"]
        assert det.boxes == [tuple(v / 64 for v in o.box) for o in want] and det.phrase == request[5:]
    for s, seed in zip(by_kind["generate"], seeds):  # the caption, <gen>, the scene as the image it makes
        doc = parse_sample(s).doc
        assert [type(x) for x in doc.segments] == [Text, Generate, Image]
        assert doc.segments[0].text == toy.scene(seed).caption

    # only the kinds asked for; test shards hold the test split's scenes
    held = toy.write_shards(tmp_path / "held", 2, "test", kinds=["caption"])
    keys = [s["__key__"] for s in _grouped(held[0])]
    assert keys == [f"test-{s:x}-caption" for s in toy.scene_seeds(2, "test")]

    bundle = real_tokenizer.save(tmp_path / "bundle")
    rc, out, err = run_cli("data", "preprocess", "--input", tmp_path / "raw", "--tokenizer", bundle,
                           "--out", tmp_path / "tok", "--quiet")
    assert rc == 0, err
    totals = json.loads((tmp_path / "tok" / "manifest.json").read_text())["totals"]
    assert totals["skipped"] == {} and totals["documents"] == 5 * len(toy.KINDS)
    n_images = 5 * 4 + sum(len(toy.scene(s).objects) for s in seeds)  # caption, spoken, detect, generate + story
    assert totals["tokens"]["image"] == n_images * 16  # 4x4 codes each
    assert totals["tokens"]["audio"] > 0


def test_command_line_writes_shards_and_previews(tmp_path):
    assert toy.main([str(tmp_path / "out"), "--scenes", "3", "--heldout", "1", "--kinds", "caption,story",
                     "--preview", "2"]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(f"shapes-{sp}-000.tar" for sp in toy.SPLITS)
    assert len(list((out / "preview").glob("*.png"))) == 2
    assert len(_grouped(out / "shapes-train-000.tar")) == 6
    assert toy.main([str(tmp_path / "bad"), "--scenes", "2", "--kinds", "caption,video"]) == 2


@pytest.mark.parametrize("call, message", [
    (lambda: toy.render([("pink", "circle")]), "unknown color 'pink'; choose from red, green"),
    (lambda: toy.render([("red", "star")]), "unknown shape 'star'; choose from circle, square, triangle"),
    (lambda: toy.scene(0, colors=["red", "teal"]), "unknown color 'teal'"),
    (lambda: toy.scene(0, n_objects=0), "n_objects=0 is invalid: a scene has 1 to 3 objects"),
    (lambda: toy.scene(0, n_objects=4), "n_objects=4 is invalid: a scene has 1 to 3 objects"),
    (lambda: toy.render([]), "a scene has 1 to 3 objects, asked for 0"),
    (lambda: toy.render([("red", "circle")] * 4), "a scene has 1 to 3 objects, asked for 4"),
    (lambda: toy.scene(0, size=16), "canvas size 16 is too small: expected an integer >= 32"),
    (lambda: toy.scene(-1), "seed -1 is invalid"),
    (lambda: toy.scene_seeds(3, "heldout"), "split='heldout' is invalid: choose from train, validation, test, "
                                            "compositional_validation, compositional_test"),
    (lambda: toy.scenes(-1), "number of scenes must be an integer >= 0, got -1"),
    (lambda: toy.write_shards("/nonexistent-never", 1, kinds=["video"]), "unknown sample kind 'video'; choose from caption"),
])
def test_bad_input_is_refused_with_a_clear_message(call, message):
    with pytest.raises(OmniError, match=message):
        call()


def test_grid_snaps_sides_and_positions_to_whole_patches():
    for seed in range(40):
        sc = toy.scene(seed, size=32, grid=4)
        for o in sc.objects:
            x0, y0, x1, y1 = o.box
            assert x0 % 4 == 0 and y0 % 4 == 0 and x1 % 4 == 0 and y1 % 4 == 0, o
            assert x1 - x0 in (8, 12) and y1 - y0 in (8, 12), o
        assert np.array_equal(toy.scene(seed, size=32, grid=1).image, toy.scene(seed, size=32).image)
    assert not np.array_equal(toy.scene(3, size=32, grid=4).image, toy.scene(3, size=32).image)
    with pytest.raises(OmniError, match="grid=7 is invalid for a 32px canvas"):
        toy.scene(0, size=32, grid=7)  # no multiple of 7 between the sides 8 and 12
    with pytest.raises(OmniError, match="grid=0 is invalid"):
        toy.write_shards("unused", 1, size=32, grid=0)


def test_detection_requests_cover_all_present_and_absent_pairs():
    """The detection kind's requests: "find the shapes" about DETECT_ALL of the time, else a pair, absent
    about DETECT_ABSENT of those (no box), never a compositional pair; the same key, the same request."""
    reqs = [toy.detection_request(toy.scene(s), f"k{s}") for s in toy.scene_seeds(300, "train")]
    every = [r for r in reqs if r[0] == "find the shapes"]
    absent = [r for r in reqs if r[0] != "find the shapes" and not r[2]]
    assert 0.3 < len(every) / len(reqs) < 0.5 and 0.2 < len(absent) / (len(reqs) - len(every)) < 0.45
    assert all(r[2] for r in every)
    assert not any(toy.parse_caption(r[1]) and tuple(toy.parse_caption(r[1])[0]) in toy.NOVEL_PAIRS for r in reqs)
    sc = toy.scene(toy.scene_seeds(1, "train")[0])
    assert toy.detection_request(sc, "key") == toy.detection_request(sc, "key")
