"""Configuration: one dataclass per component, nested into :class:`RunConfig`.

YAML recipes under ``recipes/`` map 1:1 onto these dataclasses; CLI overrides are dotted
``key=value``. See :mod:`omni.config.base` for loading, validation and saving. Not in RunConfig:
:class:`omni.config.eval.EvalConfig` (``omni eval``) and the demo's ``DemoRunConfig`` (``omni.eval.demo``).
May import only :mod:`omni.errors` and :mod:`omni.io` (tests/test_layers.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omni.config.base import (
    check,
    check_choice,
    describe,
    field_docs,
    help_text,
    load_config,
    save_config,
    to_dict,
)
from omni.config.data import DataConfig, PreprocessConfig
from omni.config.generate import GenerateConfig, SamplingConfig
from omni.config.heads import HeadsConfig
from omni.config.launch import LaunchConfig
from omni.config.model import ModelConfig
from omni.config.tokenizer import TextTokenizerConfig, TokenizerConfig
from omni.config.train import LossWeights, ParallelConfig, TrainConfig, WandbConfig


@dataclass
class RunConfig:
    """Everything one run needs; a recipe YAML is a (partial) RunConfig."""

    name: str = "omni"
    """Run name, used in output paths and logs."""
    seed: int = 0
    """Global seed."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizers of the unified vocabulary."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preprocessing and the blended training stream."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The decoder (omni.model.OmniDecoder)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Data parallelism of the plain-PyTorch backend."""
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    """Task heads behind routing tokens (VisionLLM v2), saved with the decoder's checkpoints."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Sampling and stopping of `omni generate`."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """Requeueing under `omni launch slurm`."""


def check_run(cfg: RunConfig) -> None:
    """The checks that span sections of a RunConfig (each section checks its own keys); training
    calls this before it starts anything."""
    from omni.errors import ConfigError

    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than model.max_seq_len={cfg.model.max_seq_len}: "
                          f"the model has positions for {cfg.model.max_seq_len} tokens; lower data.seq_len or "
                          "raise model.max_seq_len")
    if cfg.heads.enabled and cfg.parallel.backend == "megatron":
        raise ConfigError("heads.* with parallel.backend=megatron: the task heads run with the plain-PyTorch backend "
                          "only (on megatron they would sit on the last pipeline stage: planned); use "
                          "parallel.backend=torch")
    if cfg.heads.det.enabled and cfg.heads.det.n_queries != cfg.data.preprocess.det_queries:
        raise ConfigError(f"heads.det.n_queries={cfg.heads.det.n_queries} but data.preprocess.det_queries="
                          f"{cfg.data.preprocess.det_queries}: the data carries K slots after each <det>, one per "
                          "super-link query; set both alike")
    if cfg.heads.gen.enabled and cfg.heads.gen.n_queries != cfg.data.preprocess.gen_queries:
        raise ConfigError(f"heads.gen.n_queries={cfg.heads.gen.n_queries} but data.preprocess.gen_queries="
                          f"{cfg.data.preprocess.gen_queries}: the data carries K slots after each <gen>, one per "
                          "super-link query; set both alike")
    if cfg.train.stage == "dpo":
        if not cfg.train.init_from:
            raise ConfigError("train.stage=dpo needs train.init_from: the checkpoint (an SFT run) that is both the "
                              "starting policy and the frozen reference of DPO")
        if cfg.parallel.backend == "megatron" or cfg.heads.enabled:
            raise ConfigError("train.stage=dpo runs on the plain-PyTorch backend without task heads: set "
                              "parallel.backend=torch and leave heads.* disabled")
    if cfg.train.eval_every and not cfg.data.eval_paths:
        raise ConfigError(f"train.eval_every={cfg.train.eval_every} needs held-out token datasets: set "
                          "data.eval_paths=[DIR,...] (or train.eval_every=0)")


def load_section(section: str, recipe=None, overrides=(), cls=None):
    """Load ``recipe`` (a RunConfig YAML) with ``overrides`` and return its ``section``.

    Override keys are relative to ``section`` or full dotted keys from the recipe's root.

    ``load_section("tokenizer.text", "recipes/tokenizers/text.yaml", ["vocab_size=4000"])`` gives
    the TextTokenizerConfig of that recipe with vocab_size changed. Error messages name full keys.
    """
    # a key may be written relative to the section (`text.temperature=0`) or in full, from the
    # root of the recipe (`generate.text.temperature=0`); both name the same field
    full = [o if o.startswith(section + ".") else f"{section}.{o}" for o in overrides]
    cfg = load_config(cls or RunConfig, recipe, overrides=full)
    for part in section.split("."):
        cfg = getattr(cfg, part)
    return cfg


def recipes_dir():
    """The folder of shipped recipes (package data ``omni.recipes``)."""
    from importlib.resources import files

    return files("omni.recipes")


def resolve_recipe(name_or_path: str):
    """A recipe file: an existing path, or a shipped recipe named like ``tokenizers/text``."""
    from pathlib import Path

    from omni.errors import ConfigError

    p = Path(name_or_path)
    if p.is_file():
        return p
    root = Path(str(recipes_dir()))
    for cand in (root / name_or_path, root / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    shipped = sorted(str(q.relative_to(root).with_suffix("")) for q in root.rglob("*.yaml"))
    raise ConfigError(f"recipe {name_or_path!r} is neither a file nor a shipped recipe; shipped: {', '.join(shipped)}")


__all__ = [
    "DataConfig",
    "GenerateConfig",
    "HeadsConfig",
    "LaunchConfig",
    "SamplingConfig",
    "LossWeights",
    "ModelConfig",
    "ParallelConfig",
    "TrainConfig",
    "PreprocessConfig",
    "RunConfig",
    "TextTokenizerConfig",
    "TokenizerConfig",
    "WandbConfig",
    "check",
    "check_choice",
    "check_run",
    "describe",
    "field_docs",
    "help_text",
    "load_config",
    "load_section",
    "recipes_dir",
    "resolve_recipe",
    "save_config",
    "to_dict",
]
