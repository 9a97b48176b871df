"""The decoder's training checkpoints, in the run convention of :mod:`omni.run`.

``OUT/step_000100/`` holds:

* the inference checkpoint of :func:`omni.checkpoint.save_checkpoint` (model.safetensors,
  config.yaml, tokenizer/, meta.json), so ``omni.load(OUT/step_000100)`` works as it is;
* what :func:`omni.run.write_checkpoint` adds for every trainer: ``optimizer.safetensors``
  (AdamW's state tensors keyed ``model/<param fqn>/<state key>``), ``trainer_state.json`` (step,
  param groups, data stream position, counters, the Python and NumPy RNG states),
  ``rng.safetensors`` (torch's CPU and CUDA RNG states), ``run.yaml`` and, last, ``checksums.json``.

Finding, verifying and pruning checkpoints is :mod:`omni.run`'s.
"""

from __future__ import annotations

from pathlib import Path

import torch

from omni.run import read_checkpoint, write_checkpoint


def save_train_checkpoint(out: Path, step: int, model_state: dict, optim_state: dict, model_config, tokenizer,
                          run_config, trainer_state: dict, heads=None, heads_optim: dict | None = None) -> Path:
    """Write ``out/step_XXXXXX`` atomically (call on rank 0 with full state dicts); ``heads`` (the task
    heads, replicated) beside the decoder, their optimizer as the ``heads`` optimizer."""
    from omni.checkpoint import save_checkpoint
    from omni.model import OmniDecoder

    with torch.device("meta"):
        holder = OmniDecoder(model_config)  # save_checkpoint takes a module: give it one holding these tensors
    holder.load_state_dict(model_state, assign=True)
    optimizers = {"model": optim_state, **({"heads": heads_optim} if heads_optim is not None else {})}
    return write_checkpoint(out, step, lambda d: save_checkpoint(d, holder, model_config, tokenizer,
                                                                  extra_meta={"step": step}, heads=heads),
                            optimizers=optimizers, trainer_state=trainer_state, config=run_config)


def load_train_checkpoint(ckpt: Path) -> tuple[dict, dict, dict, dict[str, torch.Tensor]]:
    """(model state, optimizer state, trainer state, rng tensors) of a verified checkpoint."""
    from safetensors.torch import load_file

    state, optimizers, rng = read_checkpoint(ckpt)
    return load_file(str(Path(ckpt) / "model.safetensors")), optimizers["model"], state, rng
