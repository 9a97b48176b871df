"""megatron-core ``dist_checkpointing`` (torch_dist) folders <-> omni inference checkpoints, in one
process: no GPU, no megatron model, no process group (``omni convert from-megatron / to-megatron``).

A megatron step folder (omni.train.megatron) holds ``megatron/``: a torch.distributed.checkpoint
(DCP) folder (``.metadata``, ``__R_I.distcp`` shards) plus megatron's ``metadata.json`` (which
backends) and ``common.pt`` (the non-sharded rest: the optimizer's param groups). DCP's metadata
lists every tensor by its GLOBAL key and shape, whatever TP x PP x VP layout wrote it, so reading
it into preallocated full tensors gives the whole model at once (DCP copies each saved shard
into its slice).

The global layout megatron-core 0.16.1 writes (``GPTModel.sharded_state_dict()``, local or TE
spec; checked on a TP=2 run: tests/megatron/test_megatron_convert_cli.py), L layers::

    embedding.word_embeddings.weight                      [Vp, D]        padded rows are zeros
    decoder.layers.self_attention.linear_qkv.layer_norm_weight [L, D]    the attention RMSNorm (*)
    decoder.layers.self_attention.linear_qkv.weight       [L, (H+2K)*d, D]  per query group
    decoder.layers.self_attention.q_layernorm.weight|bias [L, H, d] (per-head) or [L, d]
    decoder.layers.self_attention.k_layernorm.weight|bias [L, K, d] or [L, d]
    decoder.layers.self_attention.linear_proj.weight      [L, D, H*d]
    decoder.layers.mlp.linear_fc1.layer_norm_weight       [L, D]         the MLP RMSNorm (*)
    decoder.layers.mlp.linear_fc1.weight                  [L, 2F, D]     [gate; up], whole
    decoder.layers.mlp.linear_fc2.weight                  [L, D, F]
    decoder.final_layernorm.weight                        [D]
    output_layer.weight                                   [Vp, D]        absent when tied
    decoder.layers.<linear>._extra_state/shard_<i>_<L>    bytes: [None] per layer i (local spec)
    optimizer.*                                           skipped here

(*) the local spec's ``input_layernorm`` / ``pre_mlp_layernorm`` are saved under Transformer
Engine's names (its ``sharded_state_dict_keys_map``), so both specs write the same keys. Layers are
stacked on a leading axis (megatron's ``prepend_axis``; a pipeline stage writes its slice of it),
and each stacked tensor, unstacked, is exactly the layout of ONE rank at TP=1 x PP=1: the TP ranks'
qkv groups and [gate_r; up_r] halves land in their global offsets (gate rows 0..F-1, up F..2F-1).
So the mapping is parallel/megatron/convert.py's ``from_megatron`` / ``to_megatron`` at tp=1, pp=1.
"""

from __future__ import annotations

import io
import os
import shutil
import warnings
from pathlib import Path

import torch

from omni.errors import OmniError

MEGATRON_DIR = "megatron"
"""The dist_checkpointing folder inside a step folder (omni.train.megatron.MEGATRON_DIR)."""
LAYERS = "decoder.layers."
EXTRA_STATE_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
"""The layers' linears that carry a ``_extra_state`` ShardedObject (megatron's loader asks for it)."""
SKIPPED_PREFIXES = ("optimizer.",)


def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


def _raw_bytes_planner():
    """DCP's save planner that writes an ``io.BytesIO`` value as it is (megatron's MCoreSavePlanner
    does the same: its ShardedObjects are pickled already); the default one pickles it again, and
    megatron's loader would then get a BytesIO where it expects the object list."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    class RawBytesPlanner(DefaultSavePlanner):
        def transform_object(self, write_item, object):
            return object if isinstance(object, io.BytesIO) else super().transform_object(write_item, object)

    return RawBytesPlanner()


def _megatron_dir(step_dir: Path) -> Path:
    if not step_dir.is_dir():
        raise OmniError(f"megatron checkpoint not found: {step_dir}")
    mdir = step_dir / MEGATRON_DIR
    if not (mdir / ".metadata").is_file():
        raise OmniError(f"{step_dir} is not a megatron step folder: {mdir} (a dist_checkpointing folder with "
                        "a .metadata file) is missing")
    backend = mdir / "metadata.json"
    if backend.is_file():
        import json

        kind = json.loads(backend.read_text()).get("sharded_backend")
        if kind != "torch_dist":
            raise OmniError(f"{mdir} is a dist_checkpointing folder of backend {kind!r}; only torch_dist is read")
    return mdir


def read_megatron_tensors(step_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every model tensor of ``STEP/megatron`` at its global key and shape (optimizer state and
    ``_extra_state`` objects left out), read in this process with DCP."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    mdir = _megatron_dir(Path(step_dir))
    reader = FileSystemReader(str(mdir))
    try:
        md = reader.read_metadata()
    except Exception as e:  # a truncated / foreign .metadata
        raise OmniError(f"{mdir}: cannot read its DCP metadata: {e}") from None
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
             if isinstance(v, TensorStorageMetadata) and not k.startswith(SKIPPED_PREFIXES)}
    if not state:
        raise OmniError(f"{mdir} holds no model tensors")
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, ... a single process": intended
        warnings.simplefilter("ignore", UserWarning)
        _dcp().load(state, storage_reader=reader, no_dist=True)
    return state


def unstack_layers(state: dict, n_layers: int) -> dict:
    """``decoder.layers.X`` [L, ...] -> ``decoder.layers.{i}.X`` (the layout of one TP=1 x PP=1 rank)."""
    out = {}
    for k, v in state.items():
        if k.startswith(LAYERS):
            if v.dim() == 0 or v.shape[0] != n_layers:
                raise OmniError(f"megatron tensor {k} has shape {tuple(v.shape)}: expected the {n_layers} layers "
                                "stacked on its first axis (does the checkpoint belong to this model config?)")
            rest = k[len(LAYERS):]
            for i in range(n_layers):
                out[f"{LAYERS}{i}.{rest}"] = v[i]
        else:
            out[k] = v
    return out


def stack_layers(state: dict, n_layers: int) -> dict:
    """Inverse of :func:`unstack_layers`."""
    out, layers = {}, {}
    for k, v in state.items():
        if k.startswith(LAYERS):
            i, rest = k[len(LAYERS):].split(".", 1)
            layers.setdefault(rest, {})[int(i)] = v
        else:
            out[k] = v
    for rest, by_layer in layers.items():
        out[LAYERS + rest] = torch.stack([by_layer[i] for i in range(n_layers)]).contiguous()
    return out


def _run_config(step_dir: Path):
    from omni.config import RunConfig, load_config
    from omni.run import RUN_CONFIG

    path = step_dir / RUN_CONFIG
    if not path.is_file():
        raise OmniError(f"{step_dir} has no {RUN_CONFIG}: the model config of a megatron checkpoint comes from "
                        "the run config saved beside it")
    return load_config(RunConfig, path)


def _tokenizer(step_dir: Path, cfg):
    from omni.bundle import UnifiedTokenizer
    from omni.checkpoint import TOKENIZER_DIR

    candidates = [step_dir / TOKENIZER_DIR]
    if cfg.data.tokenizer:
        candidates.append(Path(cfg.data.tokenizer))
    for c in candidates:
        if c.is_dir():
            return UnifiedTokenizer.load(c)
    raise OmniError(f"no tokenizer bundle for {step_dir}: neither {step_dir / TOKENIZER_DIR} nor run.yaml's "
                    f"data.tokenizer ({cfg.data.tokenizer or 'unset'}) is a folder; an omni checkpoint needs it")


def megatron_to_omni_state(step_dir: str | os.PathLike, model_cfg) -> dict[str, torch.Tensor]:
    """The OmniDecoder state dict (float32) of a megatron step folder, whatever layout saved it."""
    from omni.parallel.megatron.convert import from_megatron

    glob = read_megatron_tensors(step_dir)
    rank = unstack_layers(glob, model_cfg.n_layers)
    te = any(k.endswith("linear_qkv.layer_norm_weight") for k in rank)  # megatron's own names (see above)
    try:
        state = from_megatron({(0, 0, 0): rank}, model_cfg, 1, 1, 1, te=te)
    except KeyError as e:
        raise OmniError(f"{step_dir}: megatron tensor {e} is missing (another model config or layer spec?)") from None
    return {k: v.float().contiguous() for k, v in state.items()}


def from_megatron_checkpoint(step_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """``STEP_DIR`` (a megatron step folder) -> an omni inference checkpoint at ``out``."""
    import json

    from omni.checkpoint import save_checkpoint
    from omni.model import OmniDecoder
    from omni.run import TRAINER_STATE

    step_dir = Path(step_dir)
    _megatron_dir(step_dir)
    cfg = _run_config(step_dir)
    tok = _tokenizer(step_dir, cfg)
    state = megatron_to_omni_state(step_dir, cfg.model)
    with torch.device("meta"):
        holder = OmniDecoder(cfg.model)
    expected = holder.state_dict()
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in state and state[k].shape != expected[k].shape]
    missing = sorted(set(expected) - set(state))
    if shapes or missing:
        raise OmniError(f"{step_dir}: the megatron weights do not fit run.yaml's model: "
                        f"{'; '.join(shapes[:5])}{' missing ' + str(missing[:5]) if missing else ''}")
    holder.load_state_dict(state, assign=True, strict=True)
    meta = {"converted_from": "megatron"}
    ts = step_dir / TRAINER_STATE
    if ts.is_file():
        meta["step"] = json.loads(ts.read_text()).get("step")
    return save_checkpoint(out, holder, cfg.model, tok, extra_meta=meta)


def omni_to_megatron_tensors(omni_state: dict, model_cfg, tensor: int = 1) -> dict[str, torch.Tensor]:
    """The global megatron tensors (stacked layers, TE-style norm names, vocab padded for ``tensor``)."""
    from omni.parallel.megatron.convert import padded_vocab_size, to_megatron

    rank = to_megatron(omni_state, model_cfg, 1, 0, 1, 0, te=True)
    vp = padded_vocab_size(model_cfg.vocab_size, tensor)
    for k in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if k in rank:
            w = rank[k][: model_cfg.vocab_size]
            padded = w.new_zeros(vp, w.shape[1])
            padded[: w.shape[0]] = w
            rank[k] = padded
    return stack_layers(rank, model_cfg.n_layers)


def check_layout(model_cfg, tensor: int, pipeline: int) -> None:
    """OmniError unless the model splits over ``tensor`` x ``pipeline`` (ModelConfig.split_problem)."""
    problem = model_cfg.split_problem(tensor, pipeline, cli=True)
    if problem:
        raise OmniError(problem)
    if model_cfg.swin_norm:
        raise OmniError("swin_norm=true (Chameleon-34B's norm order) has no megatron layout")


def to_megatron_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, tensor: int = 1,
                           pipeline: int = 1) -> Path:
    """An omni checkpoint -> a model-only megatron step folder at ``out``: ``megatron/`` (a torch_dist
    dist_checkpointing folder with megatron's global keys and shapes, loadable at any TP x PP),
    ``run.yaml`` (model, tokenizer, parallel.backend=megatron with ``tensor`` / ``pipeline``) and
    ``tokenizer/``. No optimizer state, no trainer_state.json: start a run from it, don't resume."""
    from safetensors.torch import load_file

    from omni.checkpoint import TOKENIZER_DIR, WEIGHTS_FILE, load_config_of, resolve_checkpoint
    from omni.config import RunConfig
    from omni.config.train import ParallelConfig
    from omni.io import atomic_folder, atomic_write_text
    from omni.run import save_run_config, write_checksums

    src = resolve_checkpoint(checkpoint)
    model_cfg = load_config_of(src)
    check_layout(model_cfg, tensor, pipeline)
    omni_state = load_file(str(src / WEIGHTS_FILE))
    tensors = omni_to_megatron_tensors(omni_state, model_cfg, tensor)
    L = model_cfg.n_layers
    state: dict = dict(tensors)
    for lin in EXTRA_STATE_LINEARS:  # what the local spec's linears save: [None] per layer
        for i in range(L):
            buf = io.BytesIO()
            torch.save([None], buf)
            state[f"{LAYERS}{lin}._extra_state/shard_{i}_{L}"] = buf
    with atomic_folder(Path(out)) as tmp:
        mdir = tmp / MEGATRON_DIR
        mdir.mkdir()
        from torch.distributed.checkpoint import FileSystemWriter

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _dcp().save(state, storage_writer=FileSystemWriter(str(mdir)), planner=_raw_bytes_planner(), no_dist=True)
        # megatron's dist_checkpointing side files: which backends, and the non-sharded state (none)
        atomic_write_text(mdir / "metadata.json", '{"sharded_backend": "torch_dist", "sharded_backend_version": 1, '
                          '"common_backend": "torch", "common_backend_version": 1}')
        torch.save({}, mdir / "common.pt")
        shutil.copytree(src / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
        cfg = RunConfig(model=model_cfg,
                        parallel=ParallelConfig(backend="megatron", tensor=tensor, pipeline=pipeline))
        cfg.data.tokenizer = str(Path(out).resolve() / TOKENIZER_DIR)
        save_run_config(cfg, tmp)
        write_checksums(tmp)
    return Path(out)


__all__ = ["read_megatron_tensors", "megatron_to_omni_state", "from_megatron_checkpoint", "to_megatron_checkpoint",
           "omni_to_megatron_tensors", "check_layout", "unstack_layers", "stack_layers"]
