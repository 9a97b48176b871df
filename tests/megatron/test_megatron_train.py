"""`omni train RECIPE parallel.backend=megatron`: the real CLI under torchrun (gloo, CPU shim) against
the plain-PyTorch backend, and a checkpoint resumed at another tensor x pipeline layout.

Every job is `python -m torch.distributed.run ... tests/megatron/omni_main_with_shim.py train ...`:
the shim redirects megatron-core's CUDA calls, then the same `omni` main runs.
"""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from runs import MAIN, make_data, signal_after_first_step
from runs import recipe as _recipe
from runs import rows as _rows
from runs import torchrun as _torchrun
from runs import weights as _weights

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def data(tmp_path_factory, text_tokenizer):
    return make_data(tmp_path_factory.mktemp("megatron_data"), text_tokenizer)


def _close(a: dict, b: dict, rel: float) -> float:
    worst = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)
    assert worst <= rel, worst
    return worst


def test_tp2_pp2_training_equals_the_torch_backend_and_resumes_at_tp1_pp2(tmp_path, data):
    from omni.config import RunConfig, load_config
    from omni.train.loop import train

    # the plain-PyTorch backend, one process: the reference
    ref = _recipe(data, tmp_path / "torch", steps=10, save_every=5)
    train(load_config(RunConfig, ref), resume="none", progress=False)

    # megatron TP=2 x PP=2 (4 processes, DP=1) with the DistributedOptimizer, through the real CLI
    tp2 = _recipe(data, tmp_path / "tp2", steps=10, save_every=5)
    r = _torchrun(4, tp2, "parallel.backend=megatron", "parallel.tensor=2", "parallel.pipeline=2",
                  "parallel.distributed_optimizer=true")
    assert "megatron-core: tensor 2 x pipeline 2 x data 1, distributed optimizer" in r.stdout
    a, b = _rows(tmp_path / "torch"), _rows(tmp_path / "tp2")
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for s in a:
        for key in ("loss", "ce", "z", "grad_norm", "loss_text"):
            assert b[s][key] == pytest.approx(a[s][key], rel=1e-5, abs=1e-6), (s, key)
    assert a[10]["loss"] < a[1]["loss"] - 0.2  # it trains
    # the final megatron checkpoint holds the gathered OmniDecoder weights: omni.load reads it
    _close(_weights(tmp_path / "tp2" / "step_000010"), _weights(tmp_path / "torch" / "step_000010"), rel=1e-5)
    import omni

    model, _ = omni.load(tmp_path / "tp2" / "step_000010", device="cpu")
    assert model.config.n_layers == 2

    # resume step 5 of the TP=2 x PP=2 run at TP=1 x PP=2 (dist_checkpointing reshards model and optimizer
    # state): steps 6-10 as in the uninterrupted run. Loading the optimizer used to give every
    # parameter one shared Adam step counter (the bias correction of every later step wrong).
    (tmp_path / "pp2").mkdir()
    shutil.copytree(tmp_path / "tp2" / "step_000005", tmp_path / "pp2" / "step_000005")
    pp2 = _recipe(data, tmp_path / "pp2", steps=10, save_every=5)
    r = _torchrun(2, pp2, "parallel.backend=megatron", "parallel.pipeline=2", "parallel.distributed_optimizer=true")
    assert "tensor 1 x pipeline 2 x data 1" in r.stdout and "start: step 5, resumed from" in r.stdout
    c = _rows(tmp_path / "pp2")
    assert sorted(c) == [6, 7, 8, 9, 10]
    for s in (6, 7, 8, 9, 10):
        assert c[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-6, abs=1e-6), s
        assert c[s]["grad_norm"] == pytest.approx(b[s]["grad_norm"], rel=1e-5), s
    _close(_weights(tmp_path / "pp2" / "step_000010"), _weights(tmp_path / "tp2" / "step_000010"), rel=1e-5)


def test_data_parallel_with_the_distributed_optimizer_equals_one_process(tmp_path, data):
    """DP=2 (ZeRO-1 over 2 ranks, half the micro-batches each) equals megatron on one process."""
    held = f"data.eval_paths=[{data / 'heldout'}]"
    one = _recipe(data, tmp_path / "one", steps=4, save_every=100, eval_every=2, eval_batches=2)
    _torchrun(1, one, "parallel.backend=megatron", held)
    dp2 = _recipe(data, tmp_path / "dp2", steps=4, save_every=100, grad_accum=1, eval_every=2, eval_batches=1)
    r = _torchrun(2, dp2, "parallel.backend=megatron", "parallel.distributed_optimizer=true", held)
    assert "micro_batch_size 2 x grad_accum 1 x data-parallel 2" in r.stdout
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "dp2")
    for s in (1, 2, 3, 4):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-6, abs=1e-6), s
    # validation: the same held-out sequences split over the 2 replicas (1 batch each vs 2 on one)
    for s in (2, 4):
        assert b[s]["val_tokens"] == a[s]["val_tokens"] > 0
        assert b[s]["val_loss"] == pytest.approx(a[s]["val_loss"], rel=1e-6), s
    assert a[4]["val_loss"] < a[2]["val_loss"]

    # train.init_from on the megatron backend (TP=2) starts from the same weights as on the torch backend
    from omni.config import RunConfig, load_config
    from omni.train.loop import train

    init = f"train.init_from={tmp_path / 'one'}"  # a run folder: its newest intact step (4, with omni weights)
    ft_torch = _recipe(data, tmp_path / "ft_torch", steps=1, warmup_steps=0)
    train(load_config(RunConfig, ft_torch, overrides=[init]), resume="none", progress=False)
    ft_tp2 = _recipe(data, tmp_path / "ft_tp2", steps=1, warmup_steps=0)
    r = _torchrun(2, ft_tp2, "parallel.backend=megatron", "parallel.tensor=2", init)
    assert "start: step 0 with the weights of" in r.stdout
    first_torch, first_tp2 = _rows(tmp_path / "ft_torch")[1], _rows(tmp_path / "ft_tp2")[1]
    assert first_tp2["loss"] == pytest.approx(first_torch["loss"], rel=1e-6)
    assert first_torch["loss"] < a[1]["loss"] - 0.05  # not the random init's loss
    _close(_weights(tmp_path / "dp2" / "step_000004"), _weights(tmp_path / "one" / "step_000004"), rel=1e-5)
    assert torch.get_num_threads() >= 1


def test_sigterm_saves_a_megatron_checkpoint_and_the_rerun_resumes(tmp_path, data):
    """Preemption on the megatron backend: SIGTERM to the launcher reaches every rank, which finish the
    step and write a dist checkpoint together; the same command then resumes and finishes."""
    import signal

    from omni.run import verify

    recipe = _recipe(data, tmp_path / "run", steps=400, save_every=1000, warmup_steps=0)
    cmd = [sys.executable, "-m", "omni.parallel.launch", "--standalone", "--nproc_per_node", "2", str(MAIN), "train",
           str(recipe), "--quiet", "parallel.backend=megatron", "parallel.tensor=2"]
    rc, stdout, err = signal_after_first_step(cmd, tmp_path / "run", signal.SIGTERM)
    assert rc == 0, err[-3000:]
    (ckpt,) = (tmp_path / "run").glob("step_*")
    assert f"SIGTERM: saved {ckpt}" in stdout and verify(ckpt) is None and (ckpt / "megatron").is_dir()
    stopped = int(ckpt.name[5:])
    assert 1 <= stopped < 400
    r = _torchrun(2, recipe, "parallel.backend=megatron", "parallel.tensor=2", f"train.steps={stopped + 2}")
    assert f"start: step {stopped}, resumed from {ckpt}" in r.stdout
    assert sorted(_rows(tmp_path / "run"))[-1] == stopped + 2


def test_interleaved_pipeline_checkpoints_resume_without_interleaving(tmp_path, data):
    """PP=2 x VP=2 (the interleaved schedule, 4 layers): its checkpoint holds both chunks per rank and
    resumes at PP=2 without virtual stages with the losses of the uninterrupted run."""
    model = "model.n_layers=4"
    vp = _recipe(data, tmp_path / "vp")
    _torchrun(2, vp, "parallel.backend=megatron", "parallel.pipeline=2", "parallel.virtual_pipeline=2", model)
    (tmp_path / "pp").mkdir()
    shutil.copytree(tmp_path / "vp" / "step_000003", tmp_path / "pp" / "step_000003")
    pp = _recipe(data, tmp_path / "pp")
    r = _torchrun(2, pp, "parallel.backend=megatron", "parallel.pipeline=2", model)
    assert "start: step 3, resumed from" in r.stdout
    a, b = _rows(tmp_path / "vp"), _rows(tmp_path / "pp")
    for s in (4, 5, 6):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-6, abs=1e-6), s
    _close(_weights(tmp_path / "pp" / "step_000006"), _weights(tmp_path / "vp" / "step_000006"), rel=1e-5)
