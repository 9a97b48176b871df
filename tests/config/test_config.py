"""Config machinery: YAML + key=value onto dataclasses, errors that name the key, docs for --help."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from omni.config import RunConfig, TextTokenizerConfig, field_docs, load_config, load_section, save_config
from omni.errors import ConfigError


def _all_dataclasses(cls, seen=None):
    import typing

    seen = seen if seen is not None else set()
    if cls in seen:
        return seen
    seen.add(cls)
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        for cand in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(cand):
                _all_dataclasses(cand, seen)
    return seen


def test_every_field_has_a_docstring():
    missing = [f"{c.__name__}.{f.name}" for c in _all_dataclasses(RunConfig) for f in dataclasses.fields(c)
               if not field_docs(c).get(f.name)]
    assert not missing, f"fields without a one-line docstring: {missing}"


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("seed: 3\ntokenizer:\n  text:\n    vocab_size: 1000\n    model_type: unigram\n")
    cfg = load_config(RunConfig, y, overrides=["tokenizer.text.vocab_size=2000"])
    assert cfg.seed == 3
    assert cfg.tokenizer.text.model_type == "unigram"  # from YAML
    assert cfg.tokenizer.text.vocab_size == 2000  # override wins over YAML
    assert cfg.tokenizer.text.split_digits is True  # default kept
    assert isinstance(cfg.tokenizer.text, TextTokenizerConfig)


@pytest.mark.parametrize(
    "override, needles",
    [
        ("tokenizer.text.vocab_sise=10", ["unknown config key 'tokenizer.text.vocab_sise'", "Did you mean 'tokenizer.text.vocab_size'", "character_coverage"]),
        ("data.paths=tokens", ["data.paths must be a list: data.paths=[a,b]"]),
        ("tokenizr.text.vocab_size=10", ["unknown config key 'tokenizr'", "Valid keys", "tokenizer"]),
        ("tokenizer.text.vocab_size=lots", ["tokenizer.text.vocab_size", "'lots'", "Integer"]),
        ("tokenizer.text.vocab_size=100", ["tokenizer.text.vocab_size=100", "[257, 1000000]"]),
        ("tokenizer.text.model_type=wordpiece", ["tokenizer.text.model_type='wordpiece'", "'bpe', 'unigram'"]),
        ("tokenizer.n_reserved_specials=-1", ["tokenizer.n_reserved_specials=-1", "[0, 1024]"]),
        ("seed", ["not of the form key=value"]),
    ],
)
def test_bad_values_name_the_key_and_the_valid_choices(override, needles):
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, overrides=[override])
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tokenizer: [1, 2\n")
    with pytest.raises(ConfigError, match="could not read config"):
        load_config(RunConfig, bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping"):
        load_config(RunConfig, scalar)


def test_saved_config_reloads_equal(tmp_path):
    cfg = load_config(RunConfig, overrides=["name=x", "tokenizer.text.vocab_size=3000"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(RunConfig, path) == cfg
    assert not list(Path(tmp_path).glob(".*tmp"))  # atomic write left no temp file


def test_load_section_takes_relative_overrides():
    cfg = load_section("tokenizer.text", None, ["vocab_size=4000"])
    assert cfg == TextTokenizerConfig(vocab_size=4000)
    with pytest.raises(ConfigError, match="tokenizer.text.nope"):
        load_section("tokenizer.text", None, ["nope=1"])
    # the full dotted key from the recipe's root names the same field (both forms, every command)
    assert load_section("tokenizer.text", None, ["tokenizer.text.split_digits=false"]).split_digits is False
    assert load_section("generate", None, ["generate.text.temperature=0"]).text.temperature == 0
    with pytest.raises(ConfigError, match="Did you mean 'generate.max_new_tokens'"):  # a relative typo, the full key
        load_section("generate", None, ["max_new_token=5"])


def test_cross_section_checks_name_both_keys():
    from omni.config import check_run

    check_run(load_config(RunConfig, overrides=["data.seq_len=256", "model.max_seq_len=256"]))
    with pytest.raises(ConfigError, match=r"data.seq_len=512 is longer than model.max_seq_len=256"):
        check_run(load_config(RunConfig, overrides=["data.seq_len=512", "model.max_seq_len=256"]))
    with pytest.raises(ConfigError, match=r"train.eval_every=10 needs .* data.eval_paths"):
        check_run(load_config(RunConfig, overrides=["train.eval_every=10"]))
    with pytest.raises(ConfigError, match=r"data.eval_paths=.* not in data.paths .*\['a'\] are in both"):
        load_config(RunConfig, overrides=["data.paths=[a,b]", "data.eval_paths=[a]"])


def test_every_shipped_recipe_loads():
    """litgpt's config-hub test: every YAML under recipes/ is a valid (partial) RunConfig, and those of
    recipes/demo/ valid DemoRunConfigs (the demo's settings are not part of RunConfig)."""
    from omni.config import recipes_dir
    from omni.eval.demo import DemoRunConfig

    root = Path(str(recipes_dir()))
    recipes = sorted(root.rglob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        load_config(DemoRunConfig if path.parent.name == "demo" else RunConfig, path)
    with pytest.raises(ConfigError, match="demo"):  # RunConfig has no demo section
        load_config(RunConfig, root / "demo" / "default.yaml")


def test_resolve_recipe_by_name_lists_choices_when_unknown():
    from omni.config import resolve_recipe

    assert resolve_recipe("tokenizers/text").name == "text.yaml"
    with pytest.raises(ConfigError, match="tokenizers/text"):
        resolve_recipe("no-such-recipe")


def test_stage_recipes_continue_the_demo_model():
    """recipes/stages/ continue a demo checkpoint (train.init_from): their model shapes are the demo's."""
    import yaml

    from omni.config import recipes_dir

    root = Path(str(recipes_dir()))
    demo = yaml.safe_load((root / "demo" / "default.yaml").read_text())["model"]
    shape = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "qk_norm")
    stages = sorted((root / "stages").glob("*.yaml"))
    assert [p.name for p in stages] == ["long_context.yaml", "longwrite_dpo.yaml", "longwrite_sft.yaml", "needles.yaml"]
    for path in stages:
        model = yaml.safe_load(path.read_text())["model"]
        assert {k: model[k] for k in shape} == {k: demo[k] for k in shape}, path
    long = load_config(RunConfig, root / "stages" / "long_context.yaml")
    assert long.model.max_seq_len == long.data.seq_len == 4 * long.model.rope.original_max_position_embeddings
    assert long.model.rope.kind == "yarn" and long.model.rope.factor == 4
    sft, dpo = (load_config(RunConfig, root / "stages" / f"longwrite_{s}.yaml") for s in ("sft", "dpo"))
    assert (sft.train.stage, dpo.train.stage) == ("sft", "dpo")
    # the same room for generation, so `omni eval longwrite` compares the two checkpoints fairly
    assert sft.model.max_seq_len == dpo.model.max_seq_len == dpo.data.seq_len
