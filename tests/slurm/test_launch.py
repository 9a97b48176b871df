"""`omni launch slurm`: the rendered script (a golden one for a 4-node x 8-GPU megatron job), bad input
refused before anything is written or submitted, submission through `sbatch --parsable`, and the
requeue decision a stopping job makes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "assets" / "slurm_7b_4x8.sbatch"
GOLDEN_ARGS = [
    "launch", "slurm", "recipes/models/7b.yaml", "--nodes", "4", "--gpus-per-node", "8", "--partition", "batch",
    "--account", "omni", "--time", "04:00:00", "--cpus-per-task", "32", "--container-image",
    "nvcr.io/nvidia/pytorch:25.09-py3", "--container-mounts", "/lustre:/lustre", "--env", "NCCL_DEBUG=WARN",
    "--python", "python3", "--dry-run", "parallel.backend=megatron", "parallel.tensor=8", "parallel.pipeline=4",
    "parallel.distributed_optimizer=true", "train.precision=bf16", "data.seq_len=4096", "data.tokenizer=/lustre/tok",
    "data.paths=[/lustre/tokens]", "train.out=/lustre/runs/7b",
]


def test_golden_dry_run_of_a_4_node_megatron_job(tmp_path):
    """What a cluster gets, checked in: regenerate with `omni <GOLDEN_ARGS> > tests/assets/slurm_7b_4x8.sbatch`
    only when the template is meant to change."""
    rc, out, err = run_cli(*GOLDEN_ARGS)
    assert rc == 0, err
    assert out == GOLDEN.read_text()
    assert subprocess.run(["bash", "-n", str(GOLDEN)]).returncode == 0
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue",
                 "export CUDA_DEVICE_MAX_CONNECTIONS=1", "--container-image=nvcr.io/nvidia/pytorch:25.09-py3",
                 '--nproc-per-node 8', '--node-rank "$SLURM_NODEID"', "scontrol requeue"):
        assert line in out, line
    assert not Path("/lustre/runs/7b").exists()  # a dry run writes nothing


def test_cuda_device_max_connections_only_for_megatron_tp_or_cp(tmp_path):
    base = ["launch", "slurm", "recipes/models/tiny.yaml", "--dry-run", "data.seq_len=64", f"train.out={tmp_path}"]
    for extra, want in ((["parallel.strategy=fsdp"], False), ([], False)):
        rc, out, err = run_cli(*base, *extra)
        assert rc == 0 and ("CUDA_DEVICE_MAX_CONNECTIONS" in out) is want, err


def _fake_sbatch(folder: Path, reply: str = "4242;local", code: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "sbatch"
    exe.write_text(f'#!/bin/sh\necho "$@" >> "{folder}/args"\necho "{reply}"\nexit {code}\n')
    exe.chmod(0o755)
    return folder


def test_bad_input_exits_2_and_submits_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    base = ["launch", "slurm", "recipes/models/tiny.yaml", "data.seq_len=64", f"train.out={out}"]
    bad_template = tmp_path / "bad.j2"
    bad_template.write_text("#!/bin/bash\n{{ no_such_value }}\n")
    cases = [
        ([], "sbatch is not on PATH"),  # PATH below holds no sbatch
        (["--nodes", "0"], "--nodes 0: a job needs at least one node"),
        (["train.no_such_key=1"], "unknown config key 'train.no_such_key'"),
        (["--container-mounts", "/a:/b"], "--container-mounts needs --container-image"),
        (["--template", str(bad_template)], "does not render"),
        (["--env", "1BAD"], "--env '1BAD': expected NAME=VALUE"),
        (["--time", "soon"], "--time 'soon'"),
    ]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for extra, needle in cases:
        rc, _, err = run_cli(*base, *extra)
        assert rc == 2 and needle in err and "Traceback" not in err, (extra, err)
    assert not out.exists()


def test_submission_writes_the_script_and_config_then_calls_sbatch(tmp_path, monkeypatch):
    bin_dir = _fake_sbatch(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "run"
    rc, stdout, err = run_cli("launch", "slurm", "recipes/models/tiny.yaml", "--nodes", "2", "data.seq_len=64",
                              f"train.out={out}")
    assert rc == 0, err
    assert "submitted job 4242" in stdout and f"log {out / 'slurm-4242.out'}" in stdout
    assert (bin_dir / "args").read_text().split() == ["--parsable", str(out / "job.sbatch")]
    assert (out / "run.yaml").is_file() and "#SBATCH --nodes=2" in (out / "job.sbatch").read_text()
    assert json.loads((out / "slurm.json").read_text())["job_id"] == "4242"
    (bin_dir / "args").unlink()
    _fake_sbatch(tmp_path / "bin", reply="sbatch: error: invalid partition", code=1)
    rc, _, err = run_cli("launch", "slurm", "recipes/models/tiny.yaml", "data.seq_len=64", f"train.out={out}")
    assert rc == 2 and "sbatch refused" in err and "invalid partition" in err, err


def test_requeue_decision_stops_when_finished_or_stalled(tmp_path):
    """The job's own decision when it stops: requeue until the run is finished; a run that made no new
    checkpoint in launch.max_requeues requeues in a row stops, saying so."""
    from omni.config import RunConfig, load_config, save_config
    from omni.parallel.slurm import read_state, requeue_decision

    run = tmp_path / "run"
    save_config(load_config(RunConfig, overrides=["train.steps=10", "train.warmup_steps=0"]), run / "run.yaml")

    def ckpt(step):  # an intact checkpoint folder as omni.run writes them
        from omni.run import write_checkpoint

        write_checkpoint(run, step, lambda d: (d / "w").write_text("x"))

    ckpt(3)
    assert requeue_decision(run, "7", max_requeues=2) == (True, "requeueing job 7 (requeue 1, from step 3 of 10)")
    again, why = requeue_decision(run, "7", max_requeues=2)  # no new checkpoint since: one stall
    assert again
    again, why = requeue_decision(run, "7", max_requeues=2)  # two stalls in a row: stop
    assert not again and "2 requeue(s) in a row made no progress (still at step 3 of 10" in why
    ckpt(10)
    assert requeue_decision(run, "7", max_requeues=2) == (False, "the run is finished (step 10 of 10)")
    assert read_state(run)["requeues"] == [3, 3]
    rc, out, _ = run_cli("launch", "status", str(run))
    assert rc == 0 and "requeues 2; checkpoint step 10 of 10" in out
    rc, _, err = run_cli("launch", "status", str(tmp_path))
    assert rc == 2 and "no slurm.json" in err


@pytest.fixture
def shards(tmp_path, text_tokenizer):
    """Three text shards and a text bundle: (shards folder, bundle folder)."""
    import webdataset as wds

    import omni

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(3):
        with wds.TarWriter(str(raw / f"part-{i}.tar")) as w:
            w.write({"__key__": f"k{i}", "txt": f"text number {i}".encode()})
    omni.UnifiedTokenizer.build(text_tokenizer).save(tmp_path / "bundle")
    return raw, tmp_path / "bundle"


def test_preprocess_array_script_and_submission(tmp_path, monkeypatch, shards):
    """--preprocess renders an array of N tasks and a manifest job; both scripts pass `bash -n`; the
    manifest job is submitted with afterok on the array job."""
    raw, bundle = shards
    out = tmp_path / "tokens"
    args = ["launch", "slurm", "--preprocess", "--input", str(raw), "--tokenizer", str(bundle), "--out", str(out),
            "--array", "3", "--cpus-per-task", "4"]
    rc, text, err = run_cli(*args, "--dry-run", "max_skip_fraction=0.5")
    assert rc == 0, err
    array, manifest = text.split("# ---- the manifest job")
    assert "#SBATCH --array=0-2" in array and "--workers 4" in array and "--finalize" not in array
    assert "--array" not in manifest and "--finalize" in manifest
    for script in (array, manifest):
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not out.exists()
    bin_dir = _fake_sbatch(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    rc, text, err = run_cli(*args, "max_skip_fraction=0.5")
    assert rc == 0 and "submitted array job 4242 (3 tasks) and manifest job 4242" in text, err
    calls = (bin_dir / "args").read_text().splitlines()
    assert calls == [f"--parsable {out / 'slurm' / 'preprocess.sbatch'}",
                     f"--parsable --dependency=afterok:4242 --kill-on-invalid-dep=yes {out / 'slurm' / 'manifest.sbatch'}"]
    from omni.config import load_section

    assert load_section("data.preprocess", out / "slurm" / "preprocess.yaml").max_skip_fraction == 0.5


def test_finalize_names_the_shards_not_done(tmp_path, shards):
    """`omni data preprocess --finalize` (the manifest job) refuses while a rank's shards are missing,
    naming them, and writes the one-process manifest once they are done."""
    from omni.data.preprocess import preprocess

    raw, bundle = shards
    out = tmp_path / "tokens"
    base = ["data", "preprocess", "--input", str(raw), "--tokenizer", str(bundle), "--out", str(out), "--quiet"]
    rc, _, err = run_cli(*base, "--finalize")
    assert rc == 2 and "holds no preprocess run" in err, err
    assert run_cli(*base, "--rank", "0", "--world", "2")[0] == 0  # shards 0 and 2; shard 1 is rank 1's
    rc, _, err = run_cli(*base, "--finalize")
    assert rc == 2 and "1 of 3 shard(s) are not done, first: 00001-part-1 (input shard 1)" in err, err
    assert run_cli(*base, "--rank", "1", "--world", "2")[0] == 0  # the last rank writes the manifest itself
    manifest = (out / "manifest.json").read_bytes()
    (out / "manifest.json").unlink()
    rc, text, err = run_cli(*base, "--finalize")
    assert rc == 0 and "3 documents from 3 samples" in text, err
    preprocess([str(raw)], bundle, tmp_path / "one", progress=False)
    assert (out / "manifest.json").read_bytes() == manifest == (tmp_path / "one" / "manifest.json").read_bytes()


def test_launch_modes_refuse_bad_input(tmp_path, monkeypatch, shards):
    raw, bundle = shards
    out = tmp_path / "o"
    pre = ["launch", "slurm", "--preprocess", "--input", str(raw), "--tokenizer", str(bundle), "--out", str(out)]
    tok = ["launch", "slurm", "--tokenizer", "image", "--out", str(out)]
    cases = [
        (pre + ["--array", "0"], "--array 0: a preprocess array needs at least one task"),
        (pre + ["--array", "4"], "--array 4 tasks for 3 input shard(s)"),
        (pre, "--preprocess needs --input SHARDS ..., --tokenizer BUNDLE, --out DIR and --array N"),
        (["launch", "slurm", "--preprocess", "--input", str(raw), "--tokenizer", str(tmp_path / "nope"), "--out",
          str(out), "--array", "1"], "no such tokenizer bundle folder"),
        (["launch", "slurm", "--tokenizer", "video", "--data", str(raw), "--out", str(out)],
         "--tokenizer 'video': one of image, audio"),
        (["launch", "slurm", "recipes/models/tiny.yaml", "--data", str(raw)], "--data: only with --tokenizer"),
        (tok, "--tokenizer image needs --data"),
        (tok + ["--data", str(tmp_path / "missing")], "image data not found"),
        (tok + ["--data", str(raw), "--nodes", "3", "batch_size=8"],
         "tokenizer.image.batch_size=8 is the global batch: it must divide by the 3 processes"),
        (tok + ["--data", str(raw), "no_such_key=1"], "tokenizer.image.no_such_key"),
        (["launch", "slurm", "--tokenizer", "audio", "--data", str(raw), "--eval-data", str(raw), "--out", str(out)],
         "--eval-data: the audio tokenizer trainer takes no eval data"),
        (["launch", "slurm"], "give a RECIPE to train"),
    ]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for args, needle in cases:
        rc, _, err = run_cli(*args, "--dry-run")
        assert rc == 2 and needle in err and "Traceback" not in err, (args, err)
    assert not out.exists()


def test_tokenizer_job_script_runs_the_tokenizer_trainer(tmp_path, monkeypatch, shards):
    """--tokenizer image: the same job script as training (rendezvous, signals, requeue), running
    `omni tokenizer train image` with the saved recipe; the run is recorded as a tokenizer run."""
    raw, _ = shards
    out = tmp_path / "tok"
    args = ["launch", "slurm", "--tokenizer", "image", "recipes/tokenizers/image_vq.yaml", "--data", str(raw),
            "--out", str(out), "--nodes", "2", "batch_size=8", "launch.max_requeues=5"]
    rc, text, err = run_cli(*args, "--dry-run")
    assert rc == 0, err
    assert (f'-m omni "$@"\' omni tokenizer train image --config {out / "launch.yaml"} --data {raw} --out {out} '
            "--quiet &") in text, text
    assert "#SBATCH --signal=B:USR1@120" in text and "scontrol requeue" in text
    bin_dir = _fake_sbatch(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    rc, text, err = run_cli(*args)
    assert rc == 0 and "submitted job 4242" in text, err
    state = json.loads((out / "slurm.json").read_text())
    assert state["kind"] == "tokenizer image" and state["max_requeues"] == 5
    from omni.config import load_section

    assert load_section("tokenizer.image", out / "launch.yaml").batch_size == 8


@pytest.mark.parametrize("cmd", [["launch", "slurm", "--help"], ["launch", "status", "--help"]])
def test_help(cmd):
    rc, out, _ = run_cli(*cmd)
    assert rc == 0 and "usage" in out
