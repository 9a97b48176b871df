"""`omni demo`: the whole pipeline on the toy world, end to end at the small budget, killed and resumed."""

from __future__ import annotations

import collections
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.dist]  # the small demo runs as a real process, killed once


def _demo(out: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "omni", "demo", "--out", str(out), "--budget", "small",
                             "--quiet", *extra], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """The small demo, SIGKILLed once pretraining has written a checkpoint, then run again to the end."""
    out = tmp_path_factory.mktemp("demo") / "run"
    p = _demo(out)
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None and not list((out / "model").glob("step_*/checksums.json")):
        time.sleep(0.05)
    assert p.poll() is None, f"the demo ended before pretraining wrote a checkpoint:\n{p.stdout.read()}"
    p.send_signal(signal.SIGKILL)
    first = p.communicate()[0]
    assert "decoder pretraining ..." in first and not (out / "metrics.json").exists()
    p = _demo(out)
    second = p.communicate(timeout=900)[0]
    assert p.returncode == 0, second
    return out, first, second


# The small budget's test-split figures as the README reports them (`omni demo --budget small`,
# 30 scenes), and how far below them a run may land: one scene is 3.3 points, and float reductions
# that differ with the CPU and thread count flip a few greedy captions and sampled images; 15 points
# (4-5 scenes) is well above such flips and well below a collapse to chance (chance is 3-23%).
SMALL_BUDGET = {
    ("image_to_caption", "attribute_accuracy"): 0.950,
    ("caption_to_image", "correct"): 0.233,
    ("speech_to_text", "attribute_accuracy"): 0.544,
}
MARGIN = 0.15


def test_small_demo_writes_page_and_figures_near_the_readme(small_demo):
    out, _, printed = small_demo
    m = json.loads((out / "metrics.json").read_text())
    assert m["budget"] == "small" and m["split"] == "test" and m["eval_scenes"] == 30
    for (task, key), readme in SMALL_BUDGET.items():
        assert m[task][key] >= readme - MARGIN, (task, key, m[task][key], readme)
    # image to caption and speech to text beat chance by far: the same task answered for another
    # scene of the same set
    for task in ("image_to_caption", "speech_to_text"):
        assert m[task]["attribute_accuracy"] > m[task]["chance_attribute_accuracy"] + 0.2, (task, m[task])
    assert m["caption_to_image"]["correct"] > m["caption_to_image"]["chance_correct"] + 0.1, m["caption_to_image"]
    # At this budget the text-to-speech round trip and the stories sit within a few of the 30 scenes
    # of chance, and runs of the same code differ: TTS 28.1% and stories 23.2%
    # on 2026-12-06, 18.9% and 3.6% on 2026-12-07 (chance 22.5% and 5.4%). So they are checked for a
    # collapse well below chance, not for beating it; the default budget's figures are the README's.
    tts = m["text_to_speech"]["roundtrip"]
    assert tts["attribute_accuracy"] >= tts["chance_attribute_accuracy"] - MARGIN, tts
    assert m["story"]["steps_correct"] >= m["story"]["chance_steps_correct"] - MARGIN, m["story"]
    novel = m["compositional"]
    assert novel["split"] == "compositional_test" and novel["scenes"] == 30
    assert novel["novel_pairs"] == ["purple triangle", "green square"]
    i2c = novel["image_to_caption"]
    assert i2c["attribute_accuracy"] > i2c["chance_attribute_accuracy"], i2c
    assert 0 <= i2c["novel_objects_named"] <= 1 and 0 <= novel["caption_to_image"]["novel_objects_drawn"] <= 1
    c2i = m["caption_to_image"]  # best of demo.image_rerank samples; the first sample is kept as a figure too
    assert c2i["rerank"] == 16 and c2i["correct"] >= c2i["correct_first_candidate"] - 0.1, c2i
    assert m["caption_to_image"]["judge_on_real_scenes"] >= 0.95  # the judge itself reads real scenes
    assert m["text_to_speech"]["with_audio"] == 1.0
    assert set(m["seconds"]) >= {"world", "image", "audio", "pretrain", "evaluate", "total"}
    # the routing heads, trained jointly with the decoder, on the same test scenes (three requests each)
    det = m["detection"]
    assert det["n_scenes"] == 30 and det["the_shapes"]["requests"] == 30 and det["every_pair"]["requests"] == 60
    for key in ("the_shapes", "every_pair", "present_pair", "pooled"):  # COCO: AP@[.5:.95] <= AP@0.5
        assert 0 <= det[key]["ap"] <= det[key]["ap50"] <= 1 and 0 <= det[key]["chance_ap50"] < 0.05, (key, det[key])
    gen = m["gen_head"]
    assert gen["n_scenes"] == 30 and gen["guidance"] == 5.0
    per = m["per_item_seconds"]  # each path's wall time per image (request), measured in the same run
    assert per["vq_image_reranked"] == pytest.approx(16 * per["vq_image"]) and per["gen_head_image"] > 0
    assert per["det_head_request"] > 0
    # the printed summary is the metrics file's
    assert f"{m['image_to_caption']['attribute_accuracy']:.1%}" in printed and "index.html" in printed

    page = (out / "index.html").read_text()
    for task in ("caption to image", "image to caption", "text to speech", "speech to text", "story",
                 "novel pairs: caption to image", "novel pairs: image to caption", "&lt;det&gt; head: detection",
                 "&lt;gen&gt; head: caption to image"):
        assert f">{task}</h2>" in page, task
    assert "&lt;det&gt; head, &quot;find the shapes&quot;: AP@0.5" in page  # the summary table's rows
    assets = out / "index_assets"
    n_img, n_wav = len(list(assets.glob("image_*.png"))), len(list(assets.glob("*.wav")))
    # 2 shown per task: caption->image and image->caption, on test and novel-pair scenes (8 images),
    # 2 detection prompts' images, 2 <gen> head images, + stories
    assert n_img >= 8 + 2 + 2 + 3 and n_wav == 4  # text->speech outputs and speech->text prompts
    # each shown request's boxes drawn over its image; more where a generated output routed to <det>
    # itself (a model may emit the routing token anywhere; the head then runs on the image before it)
    n_det = len(list(assets.glob("detect_*.png")))
    assert n_det >= 2 and page.count('class="omni-det"') == n_det
    assert page.count("<img") == n_img + n_det and page.count("<audio") == n_wav
    cfg = (out / "config.yaml").read_text()
    assert "canvas: 32" in cfg and "steps: 1200" in cfg  # the resolved config, small budget included


def test_no_evaluation_scene_or_novel_pair_occurs_in_training(small_demo):
    """Held out by content: every training sample of the demo's shards is re-derived from the scene
    seed in its key and checked (its images are that scene's pixels, its texts its caption or
    story, its scene is of the train split and shows no novel pair); no evaluation scene's pixels
    occur in any training image; no training text names a novel pair."""
    import hashlib

    from omni.config import load_config
    from omni.eval.demo import DemoRunConfig
    from omni.media import SkipReport, iter_samples
    from omni.toy import shapes

    out = small_demo[0]
    w = load_config(DemoRunConfig, out / "config.yaml").demo
    world = dict(size=w.canvas, grid=w.grid, order=w.order)
    novel = set(w.pairs)
    assert novel == {("purple", "triangle"), ("green", "square")}

    def digest(a) -> str:
        return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()

    pixels, texts, n = set(), (out / "world" / "text.txt").read_text().splitlines(), collections.Counter()
    for shard in sorted((out / "world").glob("*/*.tar")):
        for sample in iter_samples(shard, SkipReport()):
            split, seed, kind = sample["__key__"].rsplit("/", 1)[-1].split("-")
            sc = shapes.scene(int(seed, 16), **world)
            assert split == "train" and shapes.split_of(sc, w.pairs) == "train" and not set(sc.pairs) & novel
            images = [np.asarray(PIL.Image.open(io.BytesIO(v)).convert("RGB")) for k, v in sorted(sample.items())
                      if k.endswith("png")]
            want = {"caption": [sc.image], "story": [sc.alone(i) for i in range(len(sc.objects))], "speech": [],
                    "detect": [sc.image], "generate": [sc.image]}[kind]
            assert len(images) == len(want) and all((a == b).all() for a, b in zip(images, want)), sample["__key__"]
            pixels.update(digest(a) for a in images)
            texts += [v.decode() for k, v in sample.items() if k.endswith("txt")]
            texts += [seg["text"] for k, v in sample.items() if k.endswith("json")
                      for seg in json.loads(v)["segments"] if "text" in seg]
            n[kind] += 1
    assert n == {kind: scenes for kind, scenes, _ in w.blend()} and len(n) == 5
    assert all(not set(shapes.parse_caption(t)) & novel for t in texts)
    assert sum(len(shapes.parse_caption(t)) for t in texts) > 5000  # the texts were read
    for split in ("validation", "test", "compositional_validation", "compositional_test"):
        held = shapes.scenes(100, split, novel_pairs=w.pairs, **world)
        assert not {digest(sc.image) for sc in held} & pixels, split
    # nor does any novel object drawn alone anywhere on the canvas occur (the story images)
    lo, hi = shapes._size_range(w.canvas)
    alone = {digest(shapes._draw([(s, c, (x, y, side))], w.canvas)[0]) for c, s in novel
             for side in range(lo, hi + 1, w.grid) for x in range(0, w.canvas - side + 1, w.grid)
             for y in range(0, w.canvas - side + 1, w.grid) if side % w.grid == 0}
    assert len(alone) > 100 and not alone & pixels


def test_killed_demo_resumes_where_it_stopped(small_demo):
    out, first, second = small_demo
    for stage in ("toy scenes", "text tokenizer", "image tokenizer", "audio tokenizer", "token datasets"):
        assert f"{stage}" in first and "done already" in next(ln for ln in second.splitlines() if stage in ln)
    # the cut-off stage runs again, from the checkpoint the killed run wrote
    assert "decoder pretraining ..." in second and "resuming pretraining from model/step_" in second
    steps = [json.loads(ln)["step"] for ln in (out / "model" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 1200
    # then the heads stage: from pretraining's last checkpoint, the decoder with both heads on every kind
    rows = [json.loads(ln) for ln in (out / "heads" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 150 and all(r["routes_det"] > 0 and r["routes_gen"] > 0 for r in rows)
    assert f"init_from: {out / 'model'}" in (out / "heads" / "run.yaml").read_text()
    state = json.loads((out / "demo_state.json").read_text())
    assert list(state["done"]) == ["world", "text", "image", "audio", "bundle", "judge", "preprocess",
                                   "pretrain", "heads", "evaluate"]


def test_finished_demo_reruns_in_seconds_and_refuses_other_settings(small_demo):
    out, _, _ = small_demo
    rc, printed, _ = run_cli("demo", "--out", out, "--budget", "small", "--quiet")
    assert rc == 0 and printed.count("done already") == 10
    rc, _, err = run_cli("demo", "--out", out, "--budget", "default", "--quiet")
    assert rc == 2 and "holds a demo run with other settings" in err and "tokenizer.image.steps (400 -> 1600)" in err


def test_eval_demo_suite_reproduces_the_demo_figures(small_demo, tmp_path):
    """`omni eval demo` is the demo's last stage as a suite: on the finished folder it gives the same
    figures (run as the demo runs, in a process of its own with the same threads)."""
    out, _, _ = small_demo
    def suite(dest, *overrides):
        r = subprocess.run([sys.executable, "-m", "omni", "eval", "demo", "--checkpoint", str(out), "--out",
                            str(dest), *overrides], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"},
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        return json.loads((dest / "metrics.json").read_text())

    first, again = json.loads((out / "metrics.json").read_text()), suite(tmp_path / "again", "demo.split=test")
    timings = ("seconds", "per_item_seconds")
    assert {k: v for k, v in again.items() if k not in timings} == {k: v for k, v in first.items() if k not in timings}
    assert (tmp_path / "again" / "index.html").is_file()
    # by default the suite measures the validation split, where a recipe is tuned
    val = suite(tmp_path / "val")
    assert val["split"] == "validation" and val["compositional"]["split"] == "compositional_validation"
    assert val["eval_scenes"] == 30 and val["image_to_caption"] != first["image_to_caption"]
    before = (out / "metrics.json").read_bytes()
    rc, _, err = run_cli("eval", "demo", "--checkpoint", out, "--out", out)
    assert rc == 2 and "is the demo folder itself" in err and (out / "metrics.json").read_bytes() == before
    rc, _, err = run_cli("eval", "demo", "--checkpoint", tmp_path)
    assert rc == 2 and "is not an `omni demo` folder" in err


def test_bad_demo_settings_exit_2_naming_the_key(tmp_path):
    rc, _, err = run_cli("demo", "--out", tmp_path / "a", "demo.canvas=16")
    assert rc == 2 and "demo.canvas=16 is invalid" in err
    rc, _, err = run_cli("demo", "--out", tmp_path / "b", "demo.canvas=48")
    assert rc == 2 and "must equal tokenizer.image.model.image_size=32" in err
    rc, _, err = run_cli("demo", "--out", tmp_path / "c", "demo.nope=1")
    assert rc == 2 and "demo.nope" in err
    rc, _, err = run_cli("demo", "--out", tmp_path / "d", "demo.novel_pairs=[pink star]")
    assert rc == 2 and "demo.novel_pairs=['pink star'] is invalid: expected distinct '<color> <shape>' pairs" in err
    rc, _, err = run_cli("eval", "demo", "--checkpoint", tmp_path, "demo.split=train")
    assert rc == 2 and "demo.split='train' is invalid: expected one of 'validation', 'test'" in err
    rc, _, err = run_cli("demo", "--budget", "huge")
    assert rc == 2 and "invalid choice: 'huge'" in err
    rc, _, err = run_cli("demo", "--out", tmp_path / "e", "heads.det.enabled=false")
    assert rc == 2 and "demo.detect_weight=0.3 but heads.det.enabled=false" in err
    rc, _, err = run_cli("demo", "--out", tmp_path / "f", "heads.gen.n_queries=8")
    assert rc == 2 and "heads.gen.n_queries=8 must equal data.preprocess.gen_queries=16" in err
    rc, _, err = run_cli("demo", "--out", tmp_path / "g", "demo.detect_scenes=0")
    assert rc == 2 and "demo.detect_scenes=0 is invalid: expected >= 1 when detect_weight > 0" in err
    rc, _, err = run_cli("demo", "--out", tmp_path / "h", "demo.heads_steps=0")
    assert rc == 2 and "heads.det.enabled=true but demo.heads_steps=0" in err
    assert not any((tmp_path / d).exists() for d in "abdefgh")


def test_every_budget_trains_both_heads_and_large_trains_longest(monkeypatch):
    """The three budgets load; each trains the <det> and <gen> heads on their documents, and the
    large one trains longer, on more scenes, than the default, which trains longer than the small."""
    from omni.demo import BUDGETS, demo_config, train_config

    cfgs = {b: demo_config(b) for b in BUDGETS}
    for b, c in cfgs.items():
        assert c.heads.enabled == {"<det>": 4, "<gen>": 16}, b
        assert [k for k, _, _ in c.demo.blend()] == ["caption", "speech", "story", "detect", "generate"], b
        assert [k for k, _, _ in c.demo.blend("pretrain")] == ["caption", "speech", "story"], b
    for stage in ("pretrain", "heads"):
        steps = [cfgs[b].train.steps if stage == "pretrain" else cfgs[b].demo.heads_steps
                 for b in ("small", "default", "large")]
        assert steps == sorted(steps) and len(set(steps)) == 3, stage
    assert cfgs["large"].demo.detect_scenes > cfgs["default"].demo.detect_scenes
    # the stages' RunConfigs: pretraining without heads into model/, the heads stage from it into heads/
    import types

    from omni.bundle import UnifiedTokenizer

    out = Path("/nonexistent/demo")  # no bundle there: only its vocabulary size is read
    monkeypatch.setattr(UnifiedTokenizer, "load", staticmethod(lambda path: types.SimpleNamespace(
        vocab=types.SimpleNamespace(size=1000))))
    pre, heads = train_config(out, cfgs["default"]), train_config(out, cfgs["default"], "heads")
    assert pre.heads.enabled == {} and pre.train.out == str(out / "model") and pre.train.steps == 1250
    assert [Path(p).name for p in pre.data.paths] == ["caption", "speech", "story"]
    assert heads.heads.enabled == {"<det>": 4, "<gen>": 16} and heads.train.init_from == str(out / "model")
    assert heads.train.out == str(out / "heads") and heads.train.steps == 400 and heads.train.lr == 1e-3
    assert len(heads.data.paths) == 5 and heads.data.weights[3:] == [0.3, 0.2]


def test_long_context_stage_and_niah_on_the_demo_checkpoints(small_demo, tmp_path):
    """The README's long-context commands at a few steps: `omni data needles` with the demo's bundle, the
    long-context stage (recipes/stages/long_context.yaml: 1024 tokens, YaRN x4) from the demo's decoder,
    and `omni eval niah` on both checkpoints (JSON, heatmap PNG, HTML); the stage's checkpoint keeps
    its rope settings through omni.load."""
    from omni.checkpoint import load
    from omni.config import recipes_dir

    out, _, _ = small_demo
    tok = out / "tokenizer"
    rc, _, err = run_cli("data", "needles", tmp_path / "raw", "--tokenizer", tok, "--kinds", "needle,long_text",
                         "--docs", "12", "--max-tokens", "1023", "--min-tokens", "512")
    assert rc == 0, err
    rc, _, err = run_cli("data", "preprocess", "--input", tmp_path / "raw", "--tokenizer", tok, "--out",
                         tmp_path / "long", "--quiet")
    assert rc == 0, err
    recipe = Path(str(recipes_dir())) / "stages" / "long_context.yaml"
    rc, _, err = run_cli("train", recipe, "--quiet", f"data.tokenizer={tok}", f"data.paths=[{tmp_path / 'long'}]",
                         f"train.init_from={out / 'model'}", f"train.out={tmp_path / 'stage'}", "train.steps=3",
                         "train.save_every=3", "train.warmup_steps=1")
    assert rc == 0, err
    model, _ = load(tmp_path / "stage", device="cpu")
    assert model.config.max_seq_len == 1024 and model.config.rope.kind == "yarn" and model.config.rope.factor == 4

    rc, _, err = run_cli("eval", "niah", "--checkpoint", out / "model", "--lengths", "256,1024", "--depths", "0,1",
                         "niah.items=2")
    assert rc == 2 and "beyond the 256 positions" in err  # the demo's decoder was trained at 256, unscaled
    for ck, kind, lengths in [(out / "model", "text", "128,256"), (tmp_path / "stage", "text", "256,1024"),
                              (tmp_path / "stage", "vision", "1024")]:
        dest = tmp_path / f"niah_{ck.name}_{kind}"
        rc, stdout, err = run_cli("eval", "niah", "--checkpoint", ck, "--kind", kind, "--lengths", lengths,
                                  "--depths", "0,0.5,1", "niah.items=2", "niah.grid=4", "--out", dest)
        assert rc == 0, err
        m = json.loads((dest / "metrics.json").read_text())
        assert np.shape(m["accuracy"]) == (3, len(lengths.split(","))) and 0 <= m["mean"] <= 1
        assert (dest / "niah.png").stat().st_size > 1000 and "heatmap" in (dest / "index.html").read_text()
    assert m["rope"] == "yarn x4" and m["covered_positions"] == 1024 and m["tokens"][0] > 900


def test_long_output_loop_on_the_demo_checkpoints(small_demo, tmp_path):
    """The README's long-output commands at a few steps, on the demo's decoder and judge: `omni data
    stories` -> the long-output SFT stage -> `omni data iterdpo` (its own stories of training prompts,
    corrected) -> the DPO stage (recipes/stages/longwrite_*.yaml) -> `omni eval longwrite` on held-out
    prompts (JSON and HTML)."""
    from omni.checkpoint import load
    from omni.config import recipes_dir

    out, _, _ = small_demo
    tok, stages = out / "tokenizer", Path(str(recipes_dir())) / "stages"

    def ok(*args):
        rc, stdout, err = run_cli(*args)
        assert rc == 0, (args, err)
        return stdout

    ok("data", "stories", tmp_path / "sft_raw", "--stories", "16", "--steps", "4,5")
    ok("data", "preprocess", "--input", tmp_path / "sft_raw", "--tokenizer", tok, "--out", tmp_path / "sft_tokens", "--quiet")
    few = ["train.steps=3", "train.save_every=3", "train.warmup_steps=1", "train.log_every=1", f"data.tokenizer={tok}"]
    ok("train", stages / "longwrite_sft.yaml", "--quiet", *few, f"data.paths=[{tmp_path / 'sft_tokens'},{out / 'tokens' / 'story'}]", "data.weights=[0.8,0.2]",
       f"train.init_from={out / 'model'}", f"train.out={tmp_path / 'sft'}")
    ok("data", "iterdpo", tmp_path / "pref_raw", "--checkpoint", tmp_path / "sft", "--judge", out / "judge",
       "--stories", "6", "--steps", "4,5", "--rejected-prefix", "corrected")
    summary = json.loads((tmp_path / "pref_raw" / "iterdpo.json").read_text())
    assert summary["stories"] == 6 and summary["pairs"] >= 1  # 3 steps of SFT: not every story right
    ok("data", "preprocess", "--input", tmp_path / "pref_raw", "--tokenizer", tok, "--out", tmp_path / "pref", "--quiet")
    ok("train", stages / "longwrite_dpo.yaml", "--quiet", *few, f"data.paths=[{tmp_path / 'pref'}]",
       f"train.init_from={tmp_path / 'sft'}", f"train.out={tmp_path / 'dpo'}")
    rows = [json.loads(ln) for ln in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["margin"] == pytest.approx(0.0, abs=1e-3)  # starts at the reference
    model, _ = load(tmp_path / "dpo", device="cpu")
    assert model.config.max_seq_len == 1280
    ok("eval", "longwrite", "--checkpoint", tmp_path / "dpo", f"longwrite.judge={out / 'judge'}", "longwrite.steps=[4,6]",
       "longwrite.prompts=2", "--out", tmp_path / "lw")
    m = json.loads((tmp_path / "lw" / "metrics.json").read_text())
    assert [b["steps"] for b in m["buckets"]] == [4, 6] and m["max_positions"] == 1280
    assert 0 <= m["overall"]["overall_score"] <= 100 and "N = 6 steps" in (tmp_path / "lw" / "index.html").read_text()
