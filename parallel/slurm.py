"""Slurm: the sbatch script of `omni launch slurm`, and the requeue decision a job makes when it stops.

:func:`render` fills a Jinja2 template (``recipes/slurm/train.sbatch.j2``, or the user's) from a
:class:`SlurmJob` and the run's config: one srun task per node, each running
``python -m omni.parallel.launch`` (torchrun's arguments; a signal to it reaches the trainers) with a
c10d rendezvous on the first node, then ``omni train <run.yaml> --resume auto``. Slurm's
``--signal=B:USR1@lead`` and preemption's TERM reach the trainers, which checkpoint; the job then
asks :func:`requeue_decision` whether to requeue itself.

:func:`requeue_decision` reads the run folder: a finished run (its newest intact checkpoint is the
last step) is not requeued; otherwise the job requeues unless ``launch.max_requeues`` requeues in a
row brought no new checkpoint (a run that keeps failing), which it says. Its bookkeeping lives in
``RUN/slurm.json`` (job id, requeues, the step each requeue started from), which
`omni launch status` reads too.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from omni.errors import OmniError
from omni.io import atomic_write_text

STATE_FILE = "slurm.json"
"""The run folder's Slurm bookkeeping."""
SCRIPT_FILE = "job.sbatch"
"""The rendered script, beside run.yaml in the run folder."""


@dataclass
class SlurmJob:
    """What `omni launch slurm` asks of Slurm (its command-line flags)."""

    nodes: int = 1
    gpus_per_node: int = 0
    """0: CPU processes with gloo, 1 per node (what the tests use)."""
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = ""
    cpus_per_task: int = 0
    container_image: str = ""
    container_mounts: str = ""
    env: list[tuple[str, str]] = field(default_factory=list)
    job_name: str = "omni"
    python: str = "python"
    """The interpreter on the compute nodes (the submitting one's path by default)."""

    def check(self) -> None:
        if self.nodes < 1:
            raise OmniError(f"--nodes {self.nodes}: a job needs at least one node")
        if self.gpus_per_node < 0:
            raise OmniError(f"--gpus-per-node {self.gpus_per_node}: must be >= 0 (0: CPU processes with gloo)")
        if self.container_mounts and not self.container_image:
            raise OmniError("--container-mounts needs --container-image (pyxis mounts into a container)")
        if self.time and not all(part.isdigit() for part in self.time.replace("-", ":").split(":")):
            raise OmniError(f"--time {self.time!r}: expected [D-]HH:MM:SS, for example 04:00:00")


def parse_env(pairs: list[str]) -> list[tuple[str, str]]:
    """``--env K=V`` flags -> [(K, V)]; a malformed one is refused naming it."""
    out = []
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.isidentifier():
            raise OmniError(f"--env {p!r}: expected NAME=VALUE, for example --env NCCL_DEBUG=INFO")
        out.append((key, value))
    return out


def _template(name: str, template: str | Path | None) -> tuple[str, str]:
    """(text, where) of the shipped ``recipes/slurm/NAME`` or the user's ``--template``."""
    from omni.config import recipes_dir

    if template is None:
        return (Path(str(recipes_dir())) / "slurm" / name).read_text(), f"recipes/slurm/{name}"
    path = Path(template)
    if not path.is_file():
        raise OmniError(f"--template {path}: no such file")
    return path.read_text(), str(path)


def _render(text: str, where: str, values: dict) -> str:
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["quote"] = lambda v: shlex.quote(str(v))
    try:
        return env.from_string(text).render(**values)
    except jinja2.TemplateError as e:
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise OmniError(f"the template {where} does not render{line}: {e}; it may use: "
                        f"{', '.join(sorted(values))}") from None


def _common(job: SlurmJob) -> dict:
    """The template values every script uses: the #SBATCH request and the container."""
    return {"job_name": job.job_name, "nodes": job.nodes, "gpus_per_node": job.gpus_per_node,
            "procs_per_node": job.gpus_per_node or 1, "cpus_per_task": job.cpus_per_task, "time": job.time,
            "partition": job.partition, "account": job.account, "qos": job.qos, "omp_threads": 1, "env": job.env,
            "container_image": job.container_image, "container_mounts": job.container_mounts,
            "python": job.python}


def render(job: SlurmJob, cfg, run_dir: Path, template: str | Path | None = None,
           command: list[str] | None = None) -> str:
    """The sbatch script (``recipes/slurm/train.sbatch.j2``) for RunConfig ``cfg`` in ``run_dir``.

    ``command``: the arguments of ``python -m omni`` each node's processes run; by default
    ``train RUN_DIR/run.yaml --resume auto --quiet`` (a tokenizer run passes its own).
    """
    job.check()
    text, where = _template("train.sbatch.j2", template)
    p = cfg.parallel
    mega = p.backend == "megatron"
    run_yaml = str(run_dir / "run.yaml")
    command = command or ["train", run_yaml, "--resume", "auto", "--quiet"]
    values = {
        **_common(job),
        "log": str(run_dir / "slurm-%j.out"), "signal_lead": cfg.launch.signal_lead,
        # one CUDA queue for megatron's TP / CP communication overlap; never with FSDP2
        "cuda_device_max_connections": mega and (p.tensor > 1 or p.context > 1),
        "omni_args": shlex.join(command), "run_yaml": run_yaml, "run_dir": str(run_dir),
    }
    return _render(text, where, values)


def render_preprocess(job: SlurmJob, out: Path, command: list[str], array: int | None,
                      template: str | Path | None = None) -> str:
    """The script of one preprocess job (``recipes/slurm/preprocess.sbatch.j2``): with ``array`` N, an
    array of N single-task jobs (task i = rank i of N, read by `omni data preprocess` from Slurm's
    array variables); without, the one job that writes the manifest (``command`` ends in ``--finalize``)."""
    job.check()
    if array is not None and array < 1:
        raise OmniError(f"--array {array}: a preprocess array needs at least one task")
    text, where = _template("preprocess.sbatch.j2", template)
    logs = out / "slurm"
    values = {**_common(job), "array": array or 0,
              "log": str(logs / ("preprocess-%A_%a.out" if array else "manifest-%j.out")),
              "omni_args": shlex.join(command), "out": str(out)}
    return _render(text, where, values)


# --------------------------------------------------------------------------------------------
# Requeueing
# --------------------------------------------------------------------------------------------
def read_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(run_dir: Path, state: dict) -> None:
    atomic_write_text(Path(run_dir) / STATE_FILE, json.dumps(state, indent=1) + "\n")


KINDS = ("train", "tokenizer image", "tokenizer audio")
"""What a requeued job runs: `omni train`, or `omni tokenizer train image|audio`."""
RECIPE_FILE = "launch.yaml"
"""A tokenizer run's resolved recipe (a RunConfig), beside the trainer's own run.yaml."""


def progress(run_dir: Path) -> tuple[int, int, bool]:
    """(the newest intact checkpoint's step or 0, the run's steps, finished?) of a launched run.

    A decoder run is finished at its last step's checkpoint; a tokenizer run when its trainer's
    ``finished_step`` says so (the final tokenizer and its eval written too)."""
    from omni.config import RunConfig, load_config, load_section
    from omni.run import RUN_CONFIG, list_checkpoints, verify

    run_dir = Path(run_dir)
    kind = read_state(run_dir).get("kind", "train")
    done, newest = next(((s, p) for s, p in reversed(list_checkpoints(run_dir)) if verify(p) is None), (0, None))
    if kind == "train":
        steps = load_config(RunConfig, run_dir / RUN_CONFIG).train.steps
        return done, steps, done >= steps
    if kind == "tokenizer image":
        from omni.tokenizers.image_train import finished_step

        cfg = load_section("tokenizer.image", run_dir / RECIPE_FILE)
        return done, cfg.steps, newest is not None and finished_step(run_dir, newest, cfg, True) is not None
    if kind == "tokenizer audio":
        from omni.tokenizers.audio_train import finished_step

        steps = load_section("tokenizer.audio", run_dir / RECIPE_FILE).train.steps
        return done, steps, newest is not None and finished_step(run_dir, newest, steps) is not None
    raise OmniError(f"{run_dir / STATE_FILE}: unknown kind {kind!r}; one of {', '.join(KINDS)}")


def requeue_decision(run_dir: Path, job_id: str, max_requeues: int) -> tuple[bool, str]:
    """(requeue?, why) for the job that just stopped; records the requeue in ``slurm.json``."""
    run_dir = Path(run_dir)
    done, steps, finished = progress(run_dir)
    state = read_state(run_dir)
    if finished:
        state.update(job_id=job_id, finished_step=done)
        write_state(run_dir, state)
        return False, f"the run is finished (step {done} of {steps})"
    history = state.get("requeues", [])  # the step each requeue restarted from
    stalled = 0
    for step in reversed(history):
        if step != done:
            break
        stalled += 1
    if stalled >= max_requeues:
        return False, (f"not requeueing: {stalled} requeue(s) in a row made no progress (still at step {done} of "
                       f"{steps}; launch.max_requeues={max_requeues}); see the log, fix, and resubmit")
    history.append(done)
    state.update(job_id=job_id, requeues=history)
    write_state(run_dir, state)
    return True, f"requeueing job {job_id} (requeue {len(history)}, from step {done} of {steps})"
