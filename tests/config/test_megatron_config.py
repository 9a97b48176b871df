"""parallel/megatron/config.py: the megatron backend's layouts are refused before any process group
starts (one line naming the keys), and the FP8 / TransformerConfig mapping is a pure function."""

from __future__ import annotations

import pytest

from conftest import run_cli
from omni.config import RunConfig, load_config
from omni.errors import ConfigError
from omni.parallel.megatron.config import Machine, check_megatron, fp8_kwargs, transformer_config_kwargs

H100 = Machine(te_version="2.9.0", capability=(9, 0))
B200 = Machine(te_version="2.9.0", capability=(10, 0))
A100 = Machine(te_version="2.9.0", capability=(8, 0))
CPU = Machine()  # no GPU, no TE
GPU = Machine(capability=(9, 0))  # a Hopper GPU without Transformer Engine


def _cfg(*overrides: str) -> RunConfig:
    # the tiny shape: 2 layers, 4 heads, 2 kv heads, ffn 172
    return load_config(RunConfig, overrides=["model.n_layers=4", "data.seq_len=64", *overrides])


@pytest.mark.parametrize("overrides, world, machine, needle", [
    (["parallel.tensor=2"], 2, GPU, "parallel.tensor=2 need parallel.backend=megatron"),
    (["train.precision=fp8"], 1, H100, "train.precision=fp8 need parallel.backend=megatron"),
    (["parallel.backend=megatron", "parallel.tensor=3"], 3, GPU, "parallel.tensor=3 must divide model.n_heads=4"),
    (["parallel.backend=megatron", "parallel.tensor=4"], 4, GPU, "model.n_kv_heads=2"),
    (["parallel.backend=megatron", "parallel.pipeline=3"], 3, GPU, "parallel.pipeline=3 must divide model.n_layers=4"),
    (["parallel.backend=megatron", "parallel.pipeline=2", "parallel.virtual_pipeline=4"], 2, GPU, "must divide model.n_layers=4"),
    (["parallel.backend=megatron", "parallel.virtual_pipeline=2"], 1, GPU, "needs parallel.pipeline >= 2"),
    (["parallel.backend=megatron", "parallel.sequence_parallel=true"], 1, H100, "needs parallel.tensor >= 2"),
    (["parallel.backend=megatron", "parallel.tensor=2", "parallel.sequence_parallel=true"], 2, GPU, "needs Transformer Engine"),
    (["parallel.backend=megatron", "parallel.context=2"], 2, GPU, "parallel.context=2 needs Transformer Engine"),
    (["parallel.backend=megatron", "parallel.context=2", "data.seq_len=66"], 2, H100, "multiple of 2 x context = 4"),
    (["parallel.backend=megatron", "parallel.tensor=2"], 3, GPU, "3 processes cannot hold parallel.tensor=2"),
    (["parallel.backend=megatron", "model.swin_norm=true"], 1, GPU, "model.swin_norm=true"),
    (["parallel.backend=megatron"], 1, CPU, "parallel.backend=megatron needs CUDA GPUs"),
    (["parallel.backend=megatron", "train.precision=fp8"], 1, GPU, "needs Transformer Engine"),
    (["parallel.backend=megatron", "train.precision=fp8"], 1, Machine(capability=(9, 0)), "needs Transformer Engine"),
    (["parallel.backend=megatron", "train.precision=fp8"], 1, A100, "compute capability >= 8.9"),
    (["parallel.backend=megatron", "train.precision=fp8", "train.fp8.recipe=mxfp8"], 1, H100, "needs a Blackwell GPU"),
    (["parallel.backend=megatron", "train.precision=fp8", "train.fp8.recipe=blockwise"], 1, B200, "on Blackwell use mxfp8"),
])
def test_bad_layouts_are_refused_naming_the_keys(overrides, world, machine, needle):
    with pytest.raises(ConfigError, match=None) as e:
        check_megatron(_cfg(*overrides), world=world, machine=machine)
    assert needle in str(e.value), str(e.value)


def test_good_layouts_pass():
    check_megatron(_cfg(), world=2, machine=CPU)  # the torch backend, data parallel
    check_megatron(_cfg("parallel.backend=megatron", "parallel.tensor=2", "parallel.pipeline=2"), world=8, machine=GPU)
    check_megatron(_cfg("parallel.backend=megatron", "parallel.pipeline=2", "parallel.virtual_pipeline=2"),
                   world=2, machine=GPU)
    check_megatron(_cfg("parallel.backend=megatron", "train.precision=fp8", "train.fp8.recipe=delayed"), world=1,
                   machine=H100)
    check_megatron(_cfg("parallel.backend=megatron", "train.precision=fp8", "train.fp8.recipe=mxfp8"), world=1,
                   machine=B200)


def test_fp8_recipe_fields_are_a_pure_function_of_the_config():
    assert fp8_kwargs(_cfg().train) == {}
    assert fp8_kwargs(_cfg("train.precision=fp8").train) == {
        "fp8": "hybrid", "fp8_recipe": "tensorwise", "fp8_param": False, "first_last_layers_bf16": False}
    delayed = _cfg("train.precision=fp8", "train.fp8.recipe=delayed", "train.fp8.amax_history_len=16",
                   "train.fp8.amax_compute_algo=most_recent", "train.fp8.format=e4m3", "train.fp8.fp8_params=true")
    assert fp8_kwargs(delayed.train) == {
        "fp8": "e4m3", "fp8_recipe": "delayed", "fp8_param": True, "first_last_layers_bf16": False,
        "fp8_margin": 0, "fp8_amax_history_len": 16, "fp8_amax_compute_algo": "most_recent"}
    with pytest.raises(ConfigError, match="first_last_layers_bf16"):
        _cfg("train.fp8.recipe=delayed", "train.fp8.first_last_layers_bf16=true")


def test_transformer_config_kwargs_build_megatron_config():
    """The mapping is accepted by megatron-core's own TransformerConfig (its __post_init__ checks)."""
    import torch
    from megatron.core.transformer import TransformerConfig

    cfg = _cfg("parallel.backend=megatron", "parallel.tensor=2", "parallel.pipeline=2", "train.precision=bf16")
    kw = transformer_config_kwargs(cfg)
    tc = TransformerConfig(**kw)
    assert (tc.num_query_groups, tc.kv_channels, tc.ffn_hidden_size) == (2, 16, 172)
    assert tc.gated_linear_unit and not tc.add_bias_linear and tc.normalization == "RMSNorm"
    assert tc.params_dtype == torch.bfloat16 and tc.pipeline_dtype == torch.bfloat16
    fp8 = _cfg("parallel.backend=megatron", "train.precision=fp8", "train.fp8.recipe=delayed")
    tc = TransformerConfig(**transformer_config_kwargs(fp8))
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_amax_history_len) == ("hybrid", "delayed", 1024)


def test_cli_refuses_a_bad_layout_before_any_process_group(tmp_path, monkeypatch):
    args = ("train", "recipes/models/tiny.yaml", "--quiet", "data.seq_len=64", "parallel.backend=megatron",
            "parallel.tensor=3", f"train.out={tmp_path / 'run'}")
    rc, _, err = run_cli(*args)  # this machine has no GPU: said first
    assert rc == 2 and "parallel.backend=megatron needs CUDA GPUs" in err and "Traceback" not in err, err
    from omni.parallel.megatron.config import CPU_SHIM_ENV

    monkeypatch.setenv(CPU_SHIM_ENV, "1")  # as under the tests' CPU shim: the layout is checked next
    rc, _, err = run_cli(*args)
    assert rc == 2 and "parallel.tensor=3 must divide model.n_heads=4" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
