"""Model checkpoints: one directory with weights, resolved config and tokenizer bundle.

Layout (DESIGN.md)::

    DIR/model.safetensors    OmniDecoder weights (safetensors; names in omni.model's docstring)
    DIR/config.yaml          the resolved ModelConfig (omni.config.save_config)
    DIR/tokenizer/           the UnifiedTokenizer bundle (vocab.json + text/ image/ audio/)
    DIR/meta.json            format, the bundle's identity (fingerprint), parameter count

The directory is written next to its final place and renamed into it, so a reader never sees a
half-written checkpoint; meta.json is written last inside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from omni.errors import OmniError, VocabMismatchError
from omni.io import atomic_write_bytes, atomic_write_text, read_json

if TYPE_CHECKING:  # pragma: no cover
    from omni.bundle import UnifiedTokenizer
    from omni.config.model import ModelConfig
    from omni.model import OmniDecoder

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
META_FILE = "meta.json"
FORMAT_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")
"""The weight dtypes :func:`load` casts to (``dtype=``)."""


def save_checkpoint(directory: str | os.PathLike, model: OmniDecoder, config: ModelConfig | None = None,
                    tokenizer: UnifiedTokenizer | None = None, extra_meta: dict | None = None) -> Path:
    """Write ``model`` (its config unless ``config`` is given) and ``tokenizer`` to ``directory``, atomically."""
    from safetensors.torch import save

    from omni.config import save_config

    config = config if config is not None else model.config
    if tokenizer is None:
        raise OmniError("a checkpoint needs its tokenizer bundle: pass tokenizer=")
    if tokenizer.vocab.size != config.vocab_size:
        raise VocabMismatchError(
            f"model vocab_size {config.vocab_size} != tokenizer bundle vocab size {tokenizer.vocab.size}")
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        # safetensors refuses shared storage; tied weights are one parameter here, saved once.
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
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
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


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


def load(directory: str | os.PathLike, config: ModelConfig | None = None,
         tokenizer: UnifiedTokenizer | None = None, device: str = "cpu", dtype: str | None = None):
    """Load a checkpoint directory -> ``(model, tokenizer)``; the model is in eval mode.

    ``dtype``: cast the weights to one of :data:`DTYPES` (transformers' ``torch_dtype``); default:
    as saved (float32). Half precision halves the bytes a decoding step reads (on a CPU most of its
    time); RMSNorm and LayerNorm still compute in float32 (omni.model), the logits come out in
    ``dtype`` and generation samples from them in float32.

    ``config``: refuse unless the checkpoint was saved with exactly this ModelConfig (the message
    lists the fields that differ). ``tokenizer``: refuse unless the checkpoint was made with this
    same bundle (same ids); by default the checkpoint's own bundle is loaded and returned.
    """
    from omni.bundle import UnifiedTokenizer
    from omni.model import OmniDecoder

    d = Path(directory)
    if dtype is not None and dtype not in DTYPES:
        raise OmniError(f"dtype {dtype!r} is not supported; valid: {', '.join(DTYPES)}")
    if not d.is_dir():
        raise OmniError(f"checkpoint directory not found: {d}")
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
    model = model.to(device, dtype=getattr(torch, dtype) if dtype else None)  # floating tensors only
    return model.eval(), tok
