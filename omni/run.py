"""The one training-run convention of every trainer that takes steps: the decoder's and the image and
audio tokenizers' (the text tokenizer is one SentencePiece call, with its resolved config saved beside it).

A run writes into one folder ``OUT``:

* ``run.yaml``: the resolved config (:data:`RUN_CONFIG`), written when the run starts;
* ``metrics.jsonl``: one JSON row per logged step, ``step`` first (:class:`MetricsLog`; with
  TensorBoard asked for, ``OUT/tensorboard/`` too). A resumed run drops the rows logged after the
  checkpoint it resumes from, so the file reads as one run;
* ``step_000100/``: checkpoints, assembled as ``.step_000100.tmp`` and renamed, ``checksums.json``
  (sha256 of every other file) written last (:func:`write_checkpoint`). A checkpoint is complete
  iff its checksums match (:func:`verify`); ``resume='auto'`` takes the newest such folder and
  passes over a truncated or corrupt one with a warning (:func:`find_resume`).

What a checkpoint holds besides a trainer's own weights: the optimizer state as safetensors with
JSON param groups (:func:`flatten_optimizer_state`), the Python, NumPy and torch RNG states
(:func:`rng_state`), and ``trainer_state.json``. The learning rate is a pure function of the step
(:func:`lr_at`), so resuming needs no scheduler state. Weights and state are safetensors and JSON:
no pickle anywhere.

A leaf of the house: imports only :mod:`omni.errors`, :mod:`omni.io` and :mod:`omni.config`, so
the tokenizer trainers follow the convention without knowing the decoder's world.

Stopping and data parallelism, shared by the trainers: :class:`StopFlag` turns SIGTERM / SIGUSR1 /
SIGINT into "finish this step, save, stop" (:class:`TrainingStopped` tells a caller the run stopped
early), and the few collectives the tokenizer trainers need under torchrun (whose process group the
command line starts with :func:`omni.parallel.dist.init_distributed`): :func:`dp_rank_world`,
:func:`check_global_batch`, :func:`all_reduce`, :func:`average_gradients`, :func:`gather_objects`,
:func:`check_replicas`, :func:`barrier`. Without a process group each is the one-process identity.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from omni.errors import OmniError
from omni.io import atomic_write_bytes, atomic_write_text, sha256_file

RUN_CONFIG = "run.yaml"
"""The resolved config of a run (and of each checkpoint)."""
METRICS = "metrics.jsonl"
"""Logged steps, one JSON object a line."""
CHECKSUMS = "checksums.json"
"""Written last into a checkpoint: sha256 of every other file."""
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
STEP_DIR = re.compile(r"^step_(\d{6,})$")
SCHEDULES = ("cosine", "wsd", "constant")


# --------------------------------------------------------------------------------------------
# Learning rate
# --------------------------------------------------------------------------------------------
def lr_at(step: int, lr: float, steps: int, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr: float = 0.0, decay_fraction: float = 0.2) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr`` over
    ``warmup_steps``, then

    * cosine (Loshchilov & Hutter, "SGDR", 2017) from ``lr`` to ``min_lr`` at ``steps``:
      ``min_lr + (lr - min_lr) (1 + cos(pi t)) / 2``, t the share of the post-warmup steps done;
    * wsd, warmup-stable-decay (Hu et al., "MiniCPM", 2024; Hägele et al. 2024): ``lr`` until the
      last ``decay_fraction`` of the steps, then linear to ``min_lr``;
    * constant: ``lr``.
    """
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps  # reaches lr at the last warmup step
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))
    if schedule != "wsd":
        raise OmniError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    decay_steps = max(1, round(steps * decay_fraction))
    start = steps - decay_steps
    if step < start:
        return lr
    t = min(1.0, (step - start + 1) / decay_steps)
    return lr + (min_lr - lr) * t


# --------------------------------------------------------------------------------------------
# Optimizer and RNG state
# --------------------------------------------------------------------------------------------
def flatten_optimizer_state(osd: dict, prefix: str = "") -> tuple[dict, list[dict]]:
    """An optimizer state dict (keyed by parameter index or by FQN) -> (tensors keyed
    ``[prefix/]<param key>/<state key>`` for safetensors, the JSON-ready param groups)."""
    import torch

    tensors = {}
    for key, state in osd["state"].items():
        for name, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{prefix}{'/' if prefix else ''}{key}/{name}"] = t.detach().contiguous().cpu().clone()
    return tensors, osd["param_groups"]


def unflatten_optimizer_state(tensors: dict, groups: list[dict], prefix: str = "") -> dict:
    """The inverse of :func:`flatten_optimizer_state` (keys back to the groups' own parameter keys)."""
    keys = {str(p): p for g in groups for p in g["params"]}
    head = f"{prefix}/" if prefix else ""
    state: dict = {}
    for name, t in tensors.items():
        if not name.startswith(head):
            continue
        key, _, field = name[len(head):].rpartition("/")
        if key in keys:
            state.setdefault(keys[key], {})[field] = t
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict, dict]:
    """(JSON part: Python and NumPy generators, tensor part: torch's CPU and CUDA generators)."""
    import numpy as np
    import torch

    py = random.getstate()
    np_state = np.random.get_state()
    js = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return js, tensors


def set_rng_state(js: dict, tensors: dict) -> None:
    import numpy as np
    import torch

    v, internal, gauss = js["python"]
    random.setstate((v, tuple(internal), gauss))
    n = js["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)


# --------------------------------------------------------------------------------------------
# The run folder: config, metrics
# --------------------------------------------------------------------------------------------
def save_run_config(cfg, out: str | os.PathLike) -> Path:
    """Write the resolved config as ``OUT/run.yaml``."""
    from omni.config import save_config

    path = Path(out) / RUN_CONFIG
    save_config(cfg, path)
    return path


class MetricsLog:
    """``OUT/metrics.jsonl`` (always) and TensorBoard scalars (optional); ``enabled=False`` on
    every rank but the first. Rows logged after ``resume_step`` are dropped when it opens."""

    def __init__(self, out: str | os.PathLike, resume_step: int = 0, tensorboard: bool = False,
                 enabled: bool = True, wandb: dict | None = None):
        out = Path(out)
        self.path = out / METRICS
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop what was logged after the checkpoint we resume from
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln and json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)
        if wandb is not None:
            self.wandb = _wandb_run(out, **wandb)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None and "step" in row:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k.replace("loss_", "loss/"), v, row["step"])
        if self.wandb is not None and "step" in row:
            self.wandb.log({k.replace("loss_", "loss/"): v for k, v in row.items()
                            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)},
                           step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wandb_run(out: Path, project: str, entity: str = "", mode: str = "offline", name: str = "",
               config: dict | None = None):
    """A W&B run writing under ``OUT/wandb``; its id is derived from the run folder, so a resumed
    run continues the same W&B run (``resume="allow"``)."""
    import hashlib

    try:
        import wandb
    except ImportError:
        raise OmniError("train.wandb.enabled=true needs the wandb package: pip install 'omni[wandb]' "
                        "(or set train.wandb.enabled=false)") from None
    run_id = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=project, entity=entity or None, mode=mode, dir=str(out), id=run_id,
                      resume="allow", name=name or out.name, config=config or {})


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def step_dir(out: str | os.PathLike, step: int) -> Path:
    return Path(out) / f"step_{step:06d}"


def write_checkpoint(out: str | os.PathLike, step: int, fill: Callable[[Path], None], *, optimizers: dict | None = None,
                     trainer_state: dict | None = None, config=None) -> Path:
    """Write ``OUT/step_XXXXXX`` atomically and return it.

    ``fill(folder)`` writes the trainer's own files (its weights); then come ``optimizer.safetensors``
    (``optimizers``: name -> optimizer state dict), ``rng.safetensors``, ``trainer_state.json``
    (``trainer_state`` + step + param groups + the Python/NumPy RNG), ``run.yaml`` (``config``) and,
    last, ``checksums.json``. The folder is built as ``.step_XXXXXX.tmp`` and renamed.
    """
    from safetensors.torch import save

    final = step_dir(out, step)
    tmp = final.parent / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fill(tmp)
    tensors, groups = {}, {}
    for name, osd in (optimizers or {}).items():
        t, g = flatten_optimizer_state(osd, name)
        tensors.update(t)
        groups[name] = g
    atomic_write_bytes(tmp / OPTIMIZER, save(tensors))
    rng_js, rng_tensors = rng_state()
    atomic_write_bytes(tmp / RNG, save(rng_tensors))
    state = {**(trainer_state or {}), "step": step, "param_groups": groups, "rng": rng_js}
    atomic_write_text(tmp / TRAINER_STATE, json.dumps(state) + "\n")
    if config is not None:
        save_run_config(config, tmp)
    write_checksums(tmp)  # (replacing the inference checkpoint's own, which ``fill`` wrote)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def write_checksums(folder: str | os.PathLike) -> None:
    """``folder/checksums.json``: the sha256 of every other file under ``folder``. Write it last:
    its presence marks the folder complete, and :func:`verify` checks the files against it."""
    folder = Path(folder)
    sums = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder) != Path(CHECKSUMS)}
    atomic_write_text(folder / CHECKSUMS, json.dumps(sums, indent=1) + "\n")


def read_checkpoint(ckpt: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(trainer state, optimizer state dicts by name, RNG tensors) of a verified checkpoint;
    call :func:`set_rng_state` with ``state['rng']`` and the tensors to continue its random streams."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    tensors = load_file(str(ckpt / OPTIMIZER))
    optimizers = {name: unflatten_optimizer_state(tensors, groups, name)
                  for name, groups in state["param_groups"].items()}
    return state, optimizers, load_file(str(ckpt / RNG))


def verify(ckpt: str | os.PathLike) -> str | None:
    """None if ``ckpt`` is complete and intact, else what is wrong."""
    ckpt = Path(ckpt)
    sums_path = ckpt / CHECKSUMS
    if not sums_path.is_file():
        return f"{CHECKSUMS} is missing (the checkpoint was not finished)"
    try:
        sums = json.loads(sums_path.read_text())
    except json.JSONDecodeError:
        return f"{CHECKSUMS} is not valid JSON"
    for rel, want in sums.items():
        p = ckpt / rel
        if not p.is_file():
            return f"{rel} is missing"
        if sha256_file(p) != want:
            return f"{rel} does not match its checksum (truncated or corrupt)"
    return None


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name)))


def find_resume(out: str | os.PathLike, resume: str) -> Path | None:
    """``resume``: 'auto' (the newest intact checkpoint in ``out``; None when there is none at all),
    'none', or a checkpoint path. 'auto' passes over a broken checkpoint with a warning, and refuses
    (OmniError) a folder whose checkpoints are all broken, naming each and why, rather than starting
    over on its own: that is what ``resume='none'`` is for."""
    if resume == "none":
        return None
    if resume != "auto":
        p = Path(resume)
        if p.is_dir() and not (p / CHECKSUMS).exists() and list_checkpoints(p):
            found = newest_intact(p)  # a run folder: its newest intact step
            print(f"resuming from {found} (the newest intact checkpoint of the run folder {p})", file=sys.stderr)
            return found
        problem = verify(p) if p.is_dir() else "no such folder"
        if problem:
            raise OmniError(f"cannot resume from {p}: {problem}")
        return p
    return newest_intact(out)


RESUME_HINT = ("; resume from one by path once repaired, or start over deliberately (--resume none / "
               "--no-resume)")


def newest_intact(out: str | os.PathLike, hint: str = RESUME_HINT) -> Path | None:
    """The newest checkpoint of run folder ``out`` whose checksums match (None when it has none at
    all). Broken ones are passed over with a warning; a folder whose checkpoints are all broken is
    refused (OmniError naming each and why, then ``hint``)."""
    broken = []
    for _, p in reversed(list_checkpoints(out)):
        problem = verify(p)
        if problem is None:
            return p
        warnings.warn(f"skipping checkpoint {p}: {problem}", stacklevel=2)
        broken.append(f"{p.name}: {problem}")
    if broken:
        raise OmniError(f"run folder {out} holds checkpoints but none is intact ({'; '.join(broken)}){hint}")
    return None


def discard_checkpoints(out: str | os.PathLike) -> int:
    """Delete every checkpoint in ``out`` (a run that starts over there, ``--no-resume``): pruning
    keeps the newest steps, so a discarded run's later checkpoints would outlive the new run's."""
    stale = list_checkpoints(out)
    for _, p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def prune(out: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints."""
    for _, p in list_checkpoints(out)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Stopping on a signal
# --------------------------------------------------------------------------------------------
class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT; the loop checks it between steps. A second Ctrl-C (SIGINT)
    aborts at once, without a checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, announce: bool = True) -> None:
        self.signal: int | None = None
        self.announce = announce
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            # Python lets only the main thread install handlers (e.g. train() called from a worker thread)
            warnings.warn("train() runs outside the main thread, so SIGTERM/SIGUSR1/SIGINT cannot be caught: a "
                          "preemption will stop the run without a checkpoint (the steps since the last "
                          "save are lost)", stacklevel=3)
            return self
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError) as e:
                raise OmniError(f"cannot install the {sig.name} handler ({e}): preemption would stop the run "
                                "without a checkpoint") from e
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if signum == signal.SIGINT and self.announce:
            print("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to abort without one)",
                  file=sys.stderr, flush=True)
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class TrainingStopped(Exception):
    """A trainer stopped on a signal after saving ``checkpoint`` (the run is not finished: rerunning
    the same command resumes it). The command line exits with :attr:`exit_code`."""

    def __init__(self, signum: int, checkpoint: Path | None):
        self.signal_name = signal.Signals(signum).name
        self.checkpoint = checkpoint
        super().__init__(f"{self.signal_name}: saved {checkpoint}; rerun the same command to resume")

    @property
    def exit_code(self) -> int:
        """0, or 130 for Ctrl-C: the shell's code for an interrupted command, so `a && b` stops."""
        return 130 if self.signal_name == "SIGINT" else 0


# --------------------------------------------------------------------------------------------
# Data parallelism for the tokenizer trainers (torch.distributed; the identity in one process)
# --------------------------------------------------------------------------------------------
def dp_rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_global_batch(batch_size: int, world: int, key: str = "batch_size") -> int:
    """The rows per process of a global batch of ``batch_size`` over ``world`` data-parallel processes;
    OmniError unless they divide evenly (every rank must compute the same share of the same batch)."""
    if world >= 1 and batch_size % world == 0:
        return batch_size // world
    fits = [n for n in range(1, batch_size + 1) if batch_size % n == 0]
    up = world * math.ceil(batch_size / world)
    raise OmniError(f"{key}={batch_size} is the global batch, split evenly over the data-parallel processes, and "
                    f"{world} processes do not divide it: set {key} to a multiple of {world} (e.g. {up}), or run "
                    f"{', '.join(map(str, fits))} process{'es' if len(fits) > 1 else ''}")


def all_reduce(t, op: str = "sum"):
    """In place over all ranks: ``op`` 'sum', 'mean' or 'max'; returns ``t`` (untouched in one process)."""
    import torch.distributed as dist

    _, world = dp_rank_world()
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= world
    return t


def average_gradients(params) -> None:
    """Replace each gradient by its mean over the ranks: one all-reduce of all of them, flattened.

    Every rank must hold gradients for the same parameters (the same graph on every rank); those
    without one are left out, as an optimizer leaves them."""
    import torch

    _, world = dp_rank_world()
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")  # [sum of numels]
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` in one process)."""
    import torch.distributed as dist

    _, world = dp_rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def check_replicas(module, what: str) -> None:
    """Raise (a bug, not a user error) unless every rank holds bit-identical weights and buffers in ``module``."""
    import hashlib

    import torch

    if dp_rank_world()[1] == 1:
        return
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digests = gather_objects(h.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"the data-parallel ranks hold different {what} weights (sha256 per rank: {digests})")


def barrier() -> None:
    import torch.distributed as dist

    if dp_rank_world()[1] > 1:
        dist.barrier()
