"""A real Slurm: a two-node cluster on this machine (tests/slurm/cluster.py) runs a two-node job, a
requeued job runs again with ``SLURM_RESTART_COUNT`` set, and ``--signal=B:USR1@N`` reaches the batch
script before its time limit (which then requeues itself, the preemption path a training job uses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import local_cluster, missing

pytestmark = [pytest.mark.slow, pytest.mark.dist]

DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why:
        pytest.fail(f"{why} (the test set-up installs them: make system-deps)")
    with local_cluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def _wait_for(path: Path, text: str, cluster, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = path.read_text() if path.exists() else ""
        if text in got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout:.0f} s: {got!r}\n{cluster.logs()}")


def test_two_node_job(cluster, tmp_path):
    out = tmp_path / "out.txt"
    job = _script(tmp_path / "job.sh", "srun bash -c 'echo node=$SLURM_NODEID of=$SLURM_NNODES'\n")
    job_id = cluster.sbatch("-N", "2", "--ntasks-per-node", "1", "-o", str(out), str(job))
    info = cluster.wait_state(job_id, DONE, timeout=30)
    assert info["JobState"] == "COMPLETED", (info, out.read_text() if out.exists() else "", cluster.logs())
    assert sorted(line for line in out.read_text().splitlines()) == ["node=0 of=2", "node=1 of=2"]


def test_scontrol_requeue_runs_the_job_again(cluster, tmp_path):
    log = tmp_path / "runs.log"
    job = _script(
        tmp_path / "job.sh",
        f'echo "restart=${{SLURM_RESTART_COUNT:-0}}" >> {log}\n'
        f'if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then sleep 300; fi\n',
    )
    job_id = cluster.sbatch("-N", "1", "--requeue", "-o", str(tmp_path / "out-%j.txt"), str(job))
    _wait_for(log, "restart=0", cluster)
    cluster.run("scontrol", "requeue", job_id)
    # A requeued job waits cred_expire (10 s here, see cluster.py) before it may start again.
    info = cluster.wait_state(job_id, DONE, timeout=40)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert log.read_text().split() == ["restart=0", "restart=1"]


def test_signal_before_time_limit_then_self_requeue(cluster, tmp_path):
    """``--signal=B:USR1@58`` with ``--time=1``: the batch shell gets USR1 (slurmctld looks at time limits
    about every 30 s, so within 2-32 s), its trap requeues the job itself, and the second run sees restart 1."""
    log = tmp_path / "runs.log"
    job = _script(
        tmp_path / "job.sh",
        f'n=${{SLURM_RESTART_COUNT:-0}}\necho "start restart=$n" >> {log}\n'
        f'if [ "$n" != 0 ]; then exit 0; fi\n'
        f"trap 'echo \"usr1 restart=$n\" >> {log}; scontrol requeue $SLURM_JOB_ID; exit 0' USR1\n"
        f"for i in $(seq 600); do sleep 0.2; done\n",
    )
    job_id = cluster.sbatch(
        "-N", "1", "--requeue", "--time=1", "--signal=B:USR1@58", "-o", str(tmp_path / "out-%j.txt"), str(job)
    )
    _wait_for(log, "start restart=0", cluster)
    _wait_for(log, "usr1 restart=0", cluster, timeout=50)
    # A requeued job waits cred_expire (10 s here, see cluster.py) before it may start again.
    info = cluster.wait_state(job_id, DONE, timeout=40)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert log.read_text().splitlines() == ["start restart=0", "usr1 restart=0", "start restart=1"]


def _train_setup(tmp_path, text_tokenizer, steps: int, save_every: int):
    """A text bundle, tokens and a tiny-model recipe; (recipe, client env, repo root)."""
    import os
    import sys

    import yaml
    from corpus import pydoc_topics, write_text_tokens

    import omni

    root = Path(__file__).resolve().parents[2]
    omni.UnifiedTokenizer.build(text_tokenizer).save(tmp_path / "tok")
    write_text_tokens(tmp_path / "tok", tmp_path / "tokens", [t[:1000] for t in pydoc_topics()[:30]])
    tiny = yaml.safe_load((root / "recipes" / "models" / "tiny.yaml").read_text())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "seed": 3, "model": tiny["model"],
        "data": {"tokenizer": str(tmp_path / "tok"), "paths": [str(tmp_path / "tokens")], "seq_len": 64, "seed": 5},
        "train": {"steps": steps, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "log_every": 1,
                  "save_every": save_every, "tensorboard": False}}))
    return recipe, root, os.pathsep.join([str(Path(sys.executable).parent)])


def _omni_cli(cluster, root, bin_dir, *args):
    import os
    import subprocess
    import sys

    env = {**cluster.env, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}{os.pathsep}{cluster.env['PATH']}"}
    return subprocess.run([sys.executable, "-m", "omni", *args], cwd=root.parent, env=env, capture_output=True,
                          text=True, timeout=120)


def _submit_and_wait_for_a_step(cluster, root, bin_dir, out: Path, *launch_args) -> str:
    """`omni launch slurm ARGS`; the job id, once ``out/metrics.jsonl`` holds a row (the run is mid-way)."""
    r = _omni_cli(cluster, root, bin_dir, "launch", "slurm", *launch_args)
    assert r.returncode == 0, r.stderr
    job = r.stdout.split("submitted job ")[1].split()[0]
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.1)
    return job


def _local_torchrun(root, recipe, out):
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "omni", "train", str(recipe), "--quiet", f"train.out={out}"],
                       cwd=root.parent, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


def _losses(run):
    return [(row["step"], row["loss"]) for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_omni_launch_slurm_trains_on_two_nodes_like_local_torchrun(cluster, tmp_path, text_tokenizer):
    """`omni launch slurm --nodes 2 --gpus-per-node 0` (one gloo process per node, a c10d rendezvous on
    the first node) trains the tiny recipe; its losses equal a local 2-process torchrun of the recipe;
    the finished job does not requeue itself, and `omni launch status` reports it."""
    recipe, root, bin_dir = _train_setup(tmp_path, text_tokenizer, steps=4, save_every=2)
    r = _omni_cli(cluster, root, bin_dir, "launch", "slurm", str(recipe), "--nodes", "2", "--gpus-per-node", "0",
                  f"train.out={tmp_path / 'slurm_run'}")
    assert r.returncode == 0, r.stderr
    job = r.stdout.split("submitted job ")[1].split()[0]
    info = cluster.wait_state(job, DONE, timeout=240)
    log = (tmp_path / "slurm_run" / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "the run is finished (step 4 of 4)" in log and info.get("Restarts") == "0", log[-3000:]
    _local_torchrun(root, recipe, tmp_path / "local_run")
    assert _losses(tmp_path / "slurm_run") == _losses(tmp_path / "local_run")
    r = _omni_cli(cluster, root, bin_dir, "launch", "status", str(tmp_path / "slurm_run"))
    assert r.returncode == 0 and f"job {job}:" in r.stdout and "checkpoint step 4 of 4" in r.stdout, r.stdout + r.stderr


def test_preempted_job_checkpoints_requeues_and_ends_bit_identical(cluster, tmp_path, text_tokenizer):
    """USR1 to the batch shell mid-run (`scancel --signal=USR1 --batch`, the time-limit warning): the
    trainers on both nodes checkpoint, the job requeues itself, resumes with --resume auto, and its
    final weights equal an uninterrupted local run's byte for byte; `omni launch status` shows the requeue."""
    recipe, root, bin_dir = _train_setup(tmp_path, text_tokenizer, steps=40, save_every=1000)
    out = tmp_path / "slurm_run"
    job = _submit_and_wait_for_a_step(cluster, root, bin_dir, out, str(recipe), "--nodes", "2", f"train.out={out}")
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = cluster.wait_state(job, DONE, timeout=300)
    log = (out / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", log[-4000:]
    assert "got SIGUSR1" in log and "requeueing job" in log and "the run is finished (step 40 of 40)" in log, log[-4000:]
    # the trainers saved on the signal and the requeued job went on from there (not from step 0)
    assert "SIGUSR1: saved" in log, log[-4000:]
    (resumed_at,) = json.loads((out / "slurm.json").read_text())["requeues"]
    assert 0 < resumed_at < 40 and f"from step {resumed_at} of 40" in log, log[-4000:]
    _local_torchrun(root, recipe, tmp_path / "local_run")
    final = out / "step_000040" / "model.safetensors"
    assert final.read_bytes() == (tmp_path / "local_run" / "step_000040" / "model.safetensors").read_bytes()
    r = _omni_cli(cluster, root, bin_dir, "launch", "status", str(out))
    assert r.returncode == 0 and "requeues 1;" in r.stdout, r.stdout + r.stderr


def _tree(root: Path, leave_out: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in leave_out}


def test_preprocess_array_of_3_tasks_equals_one_process(cluster, tmp_path, real_tokenizer):
    """`omni launch slurm --preprocess --array 3`: three array tasks (task i = rank i of 3) tokenize
    5 shards of photos, speech, text and interleaved documents, the afterok job writes the manifest,
    and the token dataset is byte-identical to a one-process `omni data preprocess`."""
    from corpus import mixed_samples, write_shards

    from omni.data.preprocess import preprocess

    root, bin_dir = Path(__file__).resolve().parents[2], str(Path(sys.executable).parent)
    write_shards(mixed_samples(), tmp_path / "raw", per_shard=5)
    real_tokenizer.save(tmp_path / "bundle")
    out = tmp_path / "array"
    r = _omni_cli(cluster, root, bin_dir, "launch", "slurm", "--preprocess", "--input", str(tmp_path / "raw"),
                  "--tokenizer", str(tmp_path / "bundle"), "--out", str(out), "--array", "3")
    assert r.returncode == 0, r.stderr
    array_job, manifest_job = r.stdout.split("submitted array job ")[1].split()[0], r.stdout.split("manifest job ")[1].split()[0]
    info = cluster.wait_state(manifest_job, DONE, timeout=120)
    logs = "\n".join(p.read_text() for p in sorted((out / "slurm").glob("*.out")))
    assert info["JobState"] == "COMPLETED", logs[-4000:]
    assert sorted(p.name for p in (out / "slurm").glob("preprocess-*.out")) == [
        f"preprocess-{array_job}_{i}.out" for i in range(3)]
    for i, shards in ((0, 2), (1, 2), (2, 1)):
        assert f"rank {i}/3: {shards} shard(s) processed" in (out / "slurm" / f"preprocess-{array_job}_{i}.out").read_text()
    preprocess([str(tmp_path / "raw")], tmp_path / "bundle", tmp_path / "one", progress=False)
    assert _tree(out, leave_out=("slurm", "slurm.json")) == _tree(tmp_path / "one")
    assert f"wrote {out / 'manifest.json'}" in (out / "slurm" / f"manifest-{manifest_job}.out").read_text()
    r = _omni_cli(cluster, root, bin_dir, "launch", "status", str(out))
    assert r.returncode == 0 and "shards done 5 of 5; manifest written" in r.stdout, r.stdout + r.stderr


def test_image_tokenizer_on_two_nodes_requeued_by_scontrol_resumes_bit_identical(cluster, tmp_path):
    """`omni launch slurm --tokenizer image --nodes 2`: the image tokenizer trains data-parallel, one
    process per node; `scontrol requeue` mid-run (Slurm sends TERM to every task and puts the job back
    in the queue): the trainers checkpoint, the job runs again, resumes from that checkpoint and
    finishes, with weights byte-identical to an uninterrupted local 2-process run."""
    from tiny_tokenizers import image_overrides

    root, bin_dir = Path(__file__).resolve().parents[2], str(Path(sys.executable).parent)
    args = [*image_overrides(), "steps=60", "model.quantizer=vq"]
    out = tmp_path / "slurm_tok"
    job = _submit_and_wait_for_a_step(cluster, root, bin_dir, out, "--tokenizer", "image", "--data", "photos:heldout",
                                      "--out", str(out), "--nodes", "2", *args)
    cluster.run("scontrol", "requeue", job)
    info = cluster.wait_state(job, DONE, timeout=240)
    log = (out / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", log[-4000:]
    assert "SIGTERM: saved" in log and "resuming" in log and "at step 0" not in log, log[-4000:]
    r = subprocess.run([sys.executable, "-m", "omni.parallel.launch", "--standalone", "--nproc-per-node", "2", "-m",
                        "omni", "tokenizer", "train", "image", "--data", "photos:heldout", "--out",
                        str(tmp_path / "local"), "--quiet", *args], cwd=root.parent, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "local" / "model.safetensors").read_bytes()
    r = _omni_cli(cluster, root, bin_dir, "launch", "status", str(out))
    assert r.returncode == 0 and "tokenizer image job" in r.stdout and "(finished)" in r.stdout, r.stdout + r.stderr
