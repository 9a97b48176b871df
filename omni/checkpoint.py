"""Model checkpoints: one directory with weights, resolved config and tokenizer bundle.

Layout (docs/architecture.md, "Checkpoints and runs")::

    DIR/model.safetensors    OmniDecoder weights (safetensors; names in omni.model's docstring)
    DIR/config.yaml          the resolved ModelConfig (omni.config.save_config)
    DIR/tokenizer/           the UnifiedTokenizer bundle (vocab.json + text/ image/ audio/)
    DIR/meta.json            format, the bundle's identity (fingerprint), parameter count
    DIR/checksums.json       sha256 of every other file, written last (omni.run's format and verify)

The directory is written next to its final place and renamed into it, so a reader never sees a
half-written checkpoint; :func:`load` checks checksums.json before it reads anything else. A training
run's ``step_XXXXXX/`` folders hold the same files and more (omni.train.checkpointing), so
``omni.load`` takes one of them, or the run folder itself (:func:`resolve_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from omni.errors import OmniError, VocabMismatchError
from omni.io import atomic_folder, atomic_write_bytes, atomic_write_text, read_json

if TYPE_CHECKING:  # pragma: no cover
    from omni.bundle import UnifiedTokenizer
    from omni.config.model import ModelConfig
    from omni.model import OmniDecoder

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
META_FILE = "meta.json"
CHECKSUMS_FILE = "checksums.json"
"""omni.run.CHECKSUMS: the same file name and format, so omni.run.verify checks both kinds of folder."""
FORMAT_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")
"""The weight dtypes :func:`load` casts to (``dtype=``)."""


def save_checkpoint(directory: str | os.PathLike, model: OmniDecoder, config: ModelConfig | None = None,
                    tokenizer: UnifiedTokenizer | None = None, extra_meta: dict | None = None, heads=None) -> Path:
    """Write ``model`` (its config unless ``config`` is given) and ``tokenizer`` to ``directory``, atomically.

    ``heads`` (an :class:`omni.decoders.routing.RoutingHeads`; by default ``model.heads`` when set, as
    :func:`load` sets it): written beside the decoder, ``heads.safetensors`` and ``heads.yaml``."""
    from safetensors.torch import save

    from omni import run
    from omni.config import save_config

    config = config if config is not None else model.config
    if tokenizer is None:
        raise OmniError("a checkpoint needs its tokenizer bundle: pass tokenizer=")
    if tokenizer.vocab.size != config.vocab_size:
        raise VocabMismatchError(
            f"model vocab_size {config.vocab_size} != tokenizer bundle vocab size {tokenizer.vocab.size}")
    final = Path(directory)
    with atomic_folder(final) as tmp:
        heads = heads if heads is not None else getattr(model, "heads", None)
        # safetensors refuses shared storage; tied weights are one parameter here, saved once.
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                 if not k.startswith("heads.")}  # a loaded model's heads: their own file
        if heads is not None:
            from omni.decoders.routing import save_heads

            save_heads(heads, tmp)
        atomic_write_bytes(tmp / WEIGHTS_FILE, save(state, metadata={"format": "pt"}))
        save_config(config, tmp / CONFIG_FILE)
        tokenizer.save(tmp / TOKENIZER_DIR)
        meta = {
            "format": FORMAT_VERSION,
            "kind": "omni-decoder",
            "tokenizer": tokenizer.identity(),
            "num_parameters": sum(v.numel() for v in state.values()),
            **(extra_meta or {}),
        }
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1) + "\n")
        run.write_checksums(tmp)  # last, over every file above: load() verifies them before reading
    return final


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder ``path`` names: itself when it holds ``meta.json``; for a training run
    folder (``step_XXXXXX/`` folders, :func:`omni.run.list_checkpoints`) its newest intact checkpoint
    (:func:`omni.run.verify`), passing over each broken newer one with a warning that names it and why.

    Prints nothing else: a caller that wants to say which step it took compares the result with ``path``
    (:func:`load` does, on stderr). OmniError for a folder that is neither, or a run folder whose
    checkpoints are all broken (each named, with why).
    """
    from omni import run

    d = Path(path)
    if not d.is_dir():
        raise OmniError(f"checkpoint directory not found: {d}")
    if (d / META_FILE).is_file():
        return d
    steps = run.list_checkpoints(d)
    if not steps:
        raise OmniError(f"{d} is neither an omni checkpoint (no {META_FILE}) nor a run folder "
                        "(no step_* folders)")
    return run.newest_intact(d, hint="")


def _config_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    return [f"{f.name} {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
            for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def load_config_of(directory: str | os.PathLike) -> ModelConfig:
    from omni.config import load_config
    from omni.config.model import ModelConfig

    d = Path(directory)
    path = d / CONFIG_FILE
    if not path.is_file():
        raise OmniError(f"{d} is not an omni checkpoint: {CONFIG_FILE} is missing")
    return load_config(ModelConfig, path)


def load_weights(model: OmniDecoder, directory: str | os.PathLike, assign: bool = False) -> None:
    """Load the checkpoint's weights into ``model``; refuse if the configs or weight shapes differ.

    ``assign``: take the file's tensors as the parameters (for a model built on the meta device).
    """
    from safetensors.torch import load_file

    d = Path(directory)
    saved = load_config_of(d)
    diff = _config_diff(saved, model.config)
    if diff:
        raise OmniError(f"checkpoint {d} was saved with another model config (saved vs given): {'; '.join(diff)}")
    path = d / WEIGHTS_FILE
    if not path.is_file():
        raise OmniError(f"{d} is not an omni checkpoint: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError on corrupt files
        raise OmniError(f"{path} is not a readable safetensors file: {e}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape (file vs model) {'; '.join(shapes[:5])}")
        raise OmniError(f"{path} does not fit the model config: {', '.join(parts)}")
    model.load_state_dict(state, strict=True, assign=assign)


def _resolve_device(device):
    """``device`` -> a torch.device: None is CUDA when available, else CPU; anything torch cannot
    name, or CUDA without CUDA, is an OmniError (here, before any file is read)."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OmniError(f"unknown device {device!r}; valid: 'cpu', 'cuda', 'cuda:N', or None "
                        "(CUDA when available, else CPU)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OmniError(f"device {device!r}: CUDA is not available on this machine "
                            "(torch.cuda.is_available() is False); use 'cpu' or None")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OmniError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _resolve_dtype(dtype, torch_dtype) -> str | None:
    """``dtype`` / its transformers alias ``torch_dtype`` (a name in :data:`DTYPES` or a torch.dtype)
    -> the name, or None (as saved)."""
    import torch

    names = []
    for arg, value in (("dtype", dtype), ("torch_dtype", torch_dtype)):
        if value is None:
            names.append(None)
            continue
        name = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
        if name not in DTYPES:
            raise OmniError(f"{arg} {value!r} is not supported; valid: {', '.join(DTYPES)}")
        names.append(name)
    if None not in names and names[0] != names[1]:
        raise OmniError(f"dtype {names[0]!r} and torch_dtype {names[1]!r} disagree: give one "
                        "(torch_dtype is an alias of dtype)")
    return names[0] or names[1]


def load(directory: str | os.PathLike, config: ModelConfig | None = None,
         tokenizer: UnifiedTokenizer | None = None, device=None, dtype=None, *, torch_dtype=None,
         verify: bool = True):
    """Load a checkpoint -> ``(model, tokenizer)``; the model is in eval mode on ``device``. A checkpoint
    with task heads (``heads.yaml``) gets them as ``model.heads`` (an
    :class:`omni.decoders.routing.RoutingHeads`, float32), which generation runs.

    ``directory``: a checkpoint folder, or a training run folder: then its newest intact
    ``step_XXXXXX/`` checkpoint (:func:`resolve_checkpoint`), named in one line on stderr.

    ``verify``: check every file against the checkpoint's ``checksums.json`` before reading any
    (OmniError naming the file that does not match); ``verify=False`` skips the hashing (seconds for
    a large model). A checkpoint without checksums.json (saved before omni wrote them) loads with a
    warning that it cannot be verified.

    ``device``: a torch device or its name ('cpu', 'cuda', 'cuda:1'); None (the default): CUDA when
    ``torch.cuda.is_available()``, else CPU.

    ``dtype`` (alias ``torch_dtype``, as transformers spells it): cast the weights to one of
    :data:`DTYPES`, given by name or as a torch.dtype; default: as saved (float32). Half precision
    halves the bytes a decoding step reads (on a CPU most of its time); RMSNorm and LayerNorm still
    compute in float32 (omni.model), the logits come out in ``dtype`` and generation samples from them
    in float32.

    ``config``: refuse unless the checkpoint was saved with exactly this ModelConfig (the message
    lists the fields that differ). ``tokenizer``: refuse unless the checkpoint was made with this
    same bundle (same ids); by default the checkpoint's own bundle is loaded and returned.
    """
    from omni import run
    from omni.bundle import UnifiedTokenizer
    from omni.model import OmniDecoder

    dtype = _resolve_dtype(dtype, torch_dtype)
    dev = _resolve_device(device)
    given = Path(directory)
    d = resolve_checkpoint(given)
    if d != given:  # a run folder: say which checkpoint it stands for (resolve_checkpoint verified it)
        print(f"omni.load: {given} is a run folder; loading {d.name}, its newest intact checkpoint",
              file=sys.stderr)
    elif verify:
        if (d / CHECKSUMS_FILE).is_file():
            problem = run.verify(d)
            if problem:
                raise OmniError(f"checkpoint {d} is damaged: {problem}; load(..., verify=False) skips this check")
        else:
            warnings.warn(f"checkpoint {d} has no {CHECKSUMS_FILE} (saved by an older omni): its files cannot "
                          "be verified; saving it again adds one", stacklevel=2)
    meta = read_json(d / META_FILE, f"{d} is not an omni checkpoint: {META_FILE} is missing (was it written "
                     "completely?)", FORMAT_VERSION, "checkpoint")
    saved = load_config_of(d)
    if config is not None:
        diff = _config_diff(saved, config)
        if diff:
            raise OmniError(f"checkpoint {d} has another model config (saved vs given): {'; '.join(diff)}")
    own = UnifiedTokenizer.load(d / TOKENIZER_DIR)
    own.check_compatible(meta.get("tokenizer", {}), what=f"the weights of checkpoint {d}")
    if tokenizer is not None:
        tokenizer.check_compatible(own.identity(), what=f"the weights of checkpoint {d}")
    tok = tokenizer if tokenizer is not None else own
    if tok.vocab.size != saved.vocab_size:
        raise VocabMismatchError(
            f"checkpoint {d}: model vocab_size {saved.vocab_size} != tokenizer bundle vocab size {tok.vocab.size}")
    import torch

    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = OmniDecoder(saved)
    load_weights(model, d, assign=True)
    model.init_buffers()  # the RoPE table, not in the file
    model.set_modality_table(tok.vocab.modality_table)
    model = model.to(dev, dtype=getattr(torch, dtype) if dtype else None)  # floating tensors only
    from omni.decoders.routing import load_heads

    grid = tok.vocab.image_grid or (tok.image.grid if tok.image is not None else None)
    heads = load_heads(d, saved.dim, tok.vocab.specials, grid)
    if heads is not None:  # float32 whatever ``dtype``: small, and their losses/boxes want the precision
        model.heads = heads.to(dev).eval()
    return model.eval(), tok
