"""Training checkpoints: everything to continue a run bit for bit, written atomically.

``OUT/step_000100/`` holds:

* the inference checkpoint of :func:`omni.checkpoint.save_checkpoint` (model.safetensors,
  config.yaml, tokenizer/, meta.json), so ``omni.load(OUT/step_000100)`` works as it is;
* ``optimizer.safetensors``: AdamW's state tensors, keyed ``<param fqn>/<state key>``;
* ``trainer_state.json``: step, optimizer hyper-parameters, data stream position, counters, the
  Python and NumPy RNG states; ``rng.safetensors``: torch's CPU (and CUDA) RNG states;
* ``run.yaml``: the resolved RunConfig;
* ``checksums.json`` (written last): sha256 of every other file.

The folder is assembled as ``.step_000100.tmp`` and renamed, so a complete checkpoint is one
whose checksums all match; ``--resume auto`` takes the newest such folder and passes over a
truncated or corrupt one with a warning. Weights are safetensors, state is JSON: no pickle.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from omni.errors import OmniError
from omni.io import atomic_write_bytes, atomic_write_text, sha256_file

STEP_DIR = re.compile(r"^step_(\d{6,})$")
CHECKSUMS = "checksums.json"


def step_dir(out: Path, step: int) -> Path:
    return out / f"step_{step:06d}"


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part: python + numpy, tensor part: torch CPU and CUDA generators)."""
    py = random.getstate()
    np_state = np.random.get_state()
    js = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return js, tensors


def set_rng_state(js: dict, tensors: dict[str, torch.Tensor]) -> None:
    v, internal, gauss = js["python"]
    random.setstate((v, tuple(internal), gauss))
    n = js["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)


def flatten_optimizer_state(osd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """A full (FQN-keyed) optimizer state dict -> (tensors for safetensors, JSON param groups)."""
    tensors = {}
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{fqn}/{key}"] = t.detach().contiguous().cpu()
    return tensors, osd["param_groups"]


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[str, dict] = {}
    for name, t in tensors.items():
        fqn, _, key = name.rpartition("/")
        state.setdefault(fqn, {})[key] = t
    return {"state": state, "param_groups": groups}


def save_train_checkpoint(out: Path, step: int, model_state: dict, optim_state: dict, model_config, tokenizer,
                          run_config, trainer_state: dict) -> Path:
    """Write ``out/step_XXXXXX`` atomically (call on rank 0 with full state dicts)."""
    from safetensors.torch import save

    from omni.checkpoint import save_checkpoint
    from omni.config import save_config
    from omni.model import OmniDecoder

    final = step_dir(out, step)
    tmp = out / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    with torch.device("meta"):
        holder = OmniDecoder(model_config)  # save_checkpoint takes a module: give it one holding these tensors
    holder.load_state_dict(model_state, assign=True)
    save_checkpoint(tmp, holder, model_config, tokenizer, extra_meta={"step": step})
    tensors, groups = flatten_optimizer_state(optim_state)
    atomic_write_bytes(tmp / "optimizer.safetensors", save(tensors))
    rng_js, rng_tensors = rng_state()
    atomic_write_bytes(tmp / "rng.safetensors", save(rng_tensors))
    state = {**trainer_state, "step": step, "param_groups": groups, "rng": rng_js}
    atomic_write_text(tmp / "trainer_state.json", json.dumps(state) + "\n")
    save_config(run_config, tmp / "run.yaml")
    sums = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    atomic_write_text(tmp / CHECKSUMS, json.dumps(sums, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def verify(ckpt: Path) -> str | None:
    """None if ``ckpt`` is complete and intact, else what is wrong."""
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


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def find_resume(out: Path, resume: str) -> Path | None:
    """``resume``: 'auto' (newest intact checkpoint in ``out``, or None), 'none', or a checkpoint path."""
    if resume == "none":
        return None
    if resume != "auto":
        p = Path(resume)
        problem = verify(p) if p.is_dir() else "no such folder"
        if problem:
            raise OmniError(f"cannot resume from {p}: {problem}")
        return p
    for _, p in reversed(list_checkpoints(out)):
        problem = verify(p)
        if problem is None:
            return p
        warnings.warn(f"skipping checkpoint {p}: {problem}", stacklevel=2)
    return None


def load_train_checkpoint(ckpt: Path) -> tuple[dict, dict, dict, dict[str, torch.Tensor]]:
    """(model state, optimizer state, trainer state, rng tensors) of a verified checkpoint."""
    from safetensors.torch import load_file

    model_state = load_file(str(ckpt / "model.safetensors"))
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    optim = unflatten_optimizer_state(load_file(str(ckpt / "optimizer.safetensors")), trainer_state["param_groups"])
    rng = load_file(str(ckpt / "rng.safetensors"))
    return model_state, optim, trainer_state, rng


def prune(out: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints."""
    for _, p in list_checkpoints(out)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
