"""`omni model ...`: inspect decoder configs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from omni.cli import Formatter

    p = sub.add_parser("model", help="inspect decoder configs", formatter_class=Formatter)
    msub = p.add_subparsers(dest="model_cmd", metavar="COMMAND", required=True)
    i = msub.add_parser(
        "info",
        help="parameters and training FLOPs per token of a model recipe",
        description="Print the decoder shape of RECIPE (a YAML file with a `model:` mapping, or a "
        "shipped recipe such as models/7b), its parameter count and its training FLOPs per token "
        "(6*N_matmul + causal attention, see omni.model.flops_per_token).",
        formatter_class=Formatter,
    )
    i.add_argument("recipe", metavar="RECIPE", help="recipe file or shipped name (models/tiny, models/20m, ...)")
    i.add_argument("--seq-len", type=int, metavar="T", help="sequence length for the attention FLOPs (default: max_seq_len)")
    i.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of model keys, e.g. n_layers=4")
    i.set_defaults(func=_info)


def load_model_config(recipe: str, overrides=()):
    """The ModelConfig of a recipe's `model:` mapping (overrides are keys of ModelConfig)."""
    import yaml

    from omni.config import load_config, resolve_recipe
    from omni.config.model import ModelConfig
    from omni.errors import ConfigError

    path = resolve_recipe(recipe)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError(f"{path} has no `model:` mapping (a model recipe looks like recipes/models/tiny.yaml)")
    return load_config(ModelConfig, data["model"], overrides=list(overrides))


def _info(args) -> int:
    from omni.errors import OmniError
    from omni.model import count_parameters, flops_per_token

    cfg = load_model_config(args.recipe, args.overrides)
    T = args.seq_len or cfg.max_seq_len
    if T < 1:
        raise OmniError(f"--seq-len must be >= 1, got {T}")
    n = count_parameters(cfg)
    n_emb = cfg.vocab_size * cfg.dim
    f = flops_per_token(cfg, T)

    def human(x: float) -> str:
        for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if x >= scale:
                return f"{x / scale:.2f}{unit}"
        return f"{x:.0f}"

    print(f"recipe          {args.recipe}")
    print(f"shape           {cfg.n_layers} layers x dim {cfg.dim}, {cfg.n_heads} heads ({cfg.n_kv_heads} kv) "
          f"x {cfg.head_dim}, ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}")
    print(f"options         qk_norm={cfg.qk_norm}/{cfg.qk_norm_type} swin_norm={cfg.swin_norm} "
          f"tie_embeddings={cfg.tie_embeddings} rope_theta={cfg.rope_theta:g} z_loss={cfg.z_loss:g}")
    print(f"parameters      {n:,} ({human(n)}); without the embedding {n - n_emb:,} ({human(n - n_emb)})")
    print(f"FLOPs/token     {f:,.0f} ({human(f)}) training (fwd+bwd) at seq_len {T}; forward {f / 3:,.0f}")
    return 0
