"""The image and audio tokenizer trainers data parallel under torchrun (2 gloo processes on CPUs):
the weights of one process with the same global batch, a signal that checkpoints and a rerun that
resumes to the weights of an uninterrupted run, and a batch that does not split over the ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import signal_after_first_step
from safetensors.torch import load_file
from tiny_tokenizers import image_overrides

pytestmark = [pytest.mark.slow, pytest.mark.dist]

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
AUDIO_MICRO = [
    "tokenizer.n_state=32", "tokenizer.n_head=2", "tokenizer.n_layer=1", "tokenizer.chunk_seconds=1.0",
    "tokenizer.codebook_size=16", "tokenizer.code_dim=8", "tokenizer.decoder_channels=16",
    "tokenizer.decoder_blocks=1", "tokenizer.decoder_frame_blocks=0", "train.num_threads=1",
]
"""test_audio_tokenizer.py's MICRO model."""


def omni(*args, nproc: int = 1) -> list[str]:
    """`python -m omni ARGS`, under omni.parallel.launch (torchrun) with ``nproc`` > 1."""
    launch = ["-m", "omni.parallel.launch", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    return [sys.executable, *launch, "-m", "omni", *map(str, args)]


def run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)


def image_args(out: Path, *extra: str) -> list[str]:
    return ["tokenizer", "train", "image", "--data", "photos:heldout", "--out", out, "--quiet", *image_overrides(),
            *extra]


def assert_weights_close(one: Path, two: Path) -> float:
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_image_two_processes_train_the_weights_of_one(tmp_path):
    """vq with k-means init and EMA codebook (synced over the ranks), and the discriminator from
    step 2 (it sees the gathered global batch). Dead-code restarts are off: under torchrun they sample
    from each rank's own vectors, which no one process does (the module docstring of image_train);
    that path still leaves identical weights on every rank, which the trainer checks at the end, as
    the second run here shows."""
    args = ["steps=5", "model.quantizer=vq", "model.dead_code_threshold=0", "disc_weight=0.1", "disc_start=2"]
    one = run(omni(*image_args(tmp_path / "one", *args)))
    assert one.returncode == 0, one.stderr
    two = run(omni(*image_args(tmp_path / "two", *args), nproc=2))
    assert two.returncode == 0, two.stderr[-3000:]
    diff = assert_weights_close(tmp_path / "one", tmp_path / "two")
    print(f"image: max abs weight difference 1 vs 2 processes: {diff:.2e}")
    rows = [json.loads(ln) for ln in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    want = [json.loads(ln)["loss"] for ln in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(ln)]
    assert losses == pytest.approx(want, rel=1e-5)  # the logged loss is the global batch's
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    # rerun under torchrun: finished, says so (rank 0), exits 0
    again = run(omni(*image_args(tmp_path / "two", *args), nproc=2))
    assert again.returncode == 0 and again.stdout.count("finished already") == 1, again.stdout + again.stderr[-2000:]

    restarts = run(omni(*image_args(tmp_path / "restarts", "steps=3", "model.quantizer=vq"), nproc=2))
    assert restarts.returncode == 0, restarts.stderr[-3000:]  # check_replicas: the ranks agree after restarts


def test_audio_two_processes_train_the_weights_of_one(tmp_path, speech_dir):
    """k-means init on the first global batch (every rank runs it alike) and the synced EMA codebook;
    dead-code restarts off, as for the image test."""
    args = ["tokenizer", "train", "audio", "--data", speech_dir, "--quiet", *AUDIO_MICRO, "train.steps=5",
            "train.batch_size=4", "train.log_every=1", "tokenizer.dead_code_threshold=0"]
    one = run(omni(*args, "--out", tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = run(omni(*args, "--out", tmp_path / "two", nproc=2))
    assert two.returncode == 0, two.stderr[-3000:]
    diff = assert_weights_close(tmp_path / "one", tmp_path / "two")
    print(f"audio: max abs weight difference 1 vs 2 processes: {diff:.2e}")
    s1, s2 = (json.loads((tmp_path / d / "train_summary.json").read_text())["final"] for d in ("one", "two"))
    assert s2["mel_l1"] == pytest.approx(s1["mel_l1"], rel=1e-5) and s2["batch_usage"] == s1["batch_usage"]
    assert two.stdout.count("wrote") == 1  # rank 0 alone says it


def test_sigusr1_checkpoints_and_the_rerun_resumes_to_the_uninterrupted_weights(tmp_path):
    """One process: SIGUSR1 after the first logged step finishes the step, saves its checkpoint, says
    so and exits 0 without the final files; the same command again resumes and ends byte-identical
    to an uninterrupted run."""
    from omni.run import verify

    args = ["steps=40", "model.quantizer=vq"]
    rc, stdout, err = signal_after_first_step(omni(*image_args(tmp_path / "stopped", *args)), tmp_path / "stopped",
                                              signal.SIGUSR1)
    assert rc == 0, err
    (ckpt,) = (tmp_path / "stopped").glob("step_*")
    assert f"SIGUSR1: saved {ckpt}; rerun the same command to resume" in stdout and verify(ckpt) is None
    assert int(ckpt.name[5:]) < 40 and not (tmp_path / "stopped" / "model.safetensors").exists()
    resumed = run(omni(*image_args(tmp_path / "stopped", *args)))
    assert resumed.returncode == 0 and f"at step {int(ckpt.name[5:])}" in resumed.stdout, resumed.stderr
    whole = run(omni(*image_args(tmp_path / "whole", *args)))
    assert whole.returncode == 0, whole.stderr
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("stopped", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path):
    """What every torchrun worker sees (WORLD_SIZE=4), refused before any process group starts."""
    r = run(omni(*image_args(tmp_path / "o", "batch_size=6")), env={"WORLD_SIZE": "4", "RANK": "0"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "batch_size=6" in line and "4 processes" in line and "multiple of 4" in line and "1, 2, 3, 6" in line, line
    r = run(omni("tokenizer", "train", "audio", "--data", tmp_path, "--out", tmp_path / "a", "train.batch_size=6"),
            env={"WORLD_SIZE": "4", "RANK": "0"})
    assert r.returncode == 2 and "train.batch_size=6" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    from omni.toy import speech

    root = tmp_path_factory.mktemp("speech")
    speech.write_corpus(root, n_train=4, n_heldout=4)
    return root / "heldout"
