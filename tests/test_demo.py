"""`omni demo`: the whole pipeline on the toy world, end to end at the small budget, killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_small_demo_writes_page_and_figures_above_chance(small_demo):
    out, _, printed = small_demo
    m = json.loads((out / "metrics.json").read_text())
    assert m["budget"] == "small" and m["eval_scenes"] == 30
    # each figure beats the same task answered for another scene of the held-out set
    for task in ("image_to_caption", "speech_to_text"):
        assert m[task]["attribute_accuracy"] > m[task]["chance_attribute_accuracy"] + 0.08, (task, m[task])
    tts = m["text_to_speech"]["roundtrip"]
    assert tts["attribute_accuracy"] > tts["chance_attribute_accuracy"], tts
    assert m["caption_to_image"]["correct"] > m["caption_to_image"]["chance_correct"], m["caption_to_image"]
    assert m["story"]["steps_correct"] > m["story"]["chance_steps_correct"], m["story"]
    c2i = m["caption_to_image"]  # best of demo.image_rerank samples; the first sample is kept as a figure too
    assert c2i["rerank"] == 16 and c2i["correct"] >= c2i["correct_first_candidate"] - 0.1, c2i
    assert m["caption_to_image"]["judge_on_real_scenes"] >= 0.95  # the judge itself reads real scenes
    assert m["text_to_speech"]["with_audio"] == 1.0
    assert set(m["seconds"]) >= {"world", "image", "audio", "pretrain", "evaluate", "total"}
    # the printed summary is the metrics file's
    assert f"{m['image_to_caption']['attribute_accuracy']:.1%}" in printed and "index.html" in printed

    page = (out / "index.html").read_text()
    for task in ("caption to image", "image to caption", "text to speech", "speech to text", "story"):
        assert f">{task}</h2>" in page, task
    assets = out / "index_assets"
    n_img, n_wav = len(list(assets.glob("*.png"))), len(list(assets.glob("*.wav")))
    # 2 shown per task: caption->image (2 prompts' outputs) + image->caption (2 prompts) + stories
    assert n_img >= 4 + 3 and n_wav == 4  # text->speech outputs and speech->text prompts
    assert page.count("<img") == n_img and page.count("<audio") == n_wav
    cfg = (out / "config.yaml").read_text()
    assert "canvas: 32" in cfg and "steps: 1200" in cfg  # the resolved config, small budget included


def test_killed_demo_resumes_where_it_stopped(small_demo):
    out, first, second = small_demo
    for stage in ("toy scenes", "text tokenizer", "image tokenizer", "audio tokenizer", "token datasets"):
        assert f"{stage}" in first and "done already" in next(ln for ln in second.splitlines() if stage in ln)
    # the cut-off stage runs again, from the checkpoint the killed run wrote
    assert "decoder pretraining ..." in second and "resuming pretraining from model/step_" in second
    steps = [json.loads(ln)["step"] for ln in (out / "model" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 1200
    state = json.loads((out / "demo_state.json").read_text())
    assert list(state["done"]) == ["world", "text", "image", "audio", "bundle", "judge", "preprocess",
                                   "pretrain", "evaluate"]


def test_finished_demo_reruns_in_seconds_and_refuses_other_settings(small_demo):
    out, _, _ = small_demo
    rc, printed, _ = run_cli("demo", "--out", out, "--budget", "small", "--quiet")
    assert rc == 0 and printed.count("done already") == 9
    rc, _, err = run_cli("demo", "--out", out, "--budget", "default", "--quiet")
    assert rc == 2 and "holds a demo run with other settings" in err and "tokenizer.image.steps (400 -> 800)" in err


def test_eval_demo_suite_reproduces_the_demo_figures(small_demo, tmp_path):
    """`omni eval demo` is the demo's last stage as a suite: on the finished folder it gives the same
    figures (run as the demo runs, in a process of its own with the same threads)."""
    out, _, _ = small_demo
    r = subprocess.run([sys.executable, "-m", "omni", "eval", "demo", "--checkpoint", str(out), "--out",
                        str(tmp_path / "again")], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    first, again = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "again"))
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    assert (tmp_path / "again" / "index.html").is_file()
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
    rc, _, err = run_cli("demo", "--budget", "huge")
    assert rc == 2 and "invalid choice: 'huge'" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
