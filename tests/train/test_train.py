"""`omni train`: schedules, non-finite steps, exact resume after a real kill, 2-process parity, overfitting."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from corpus import pydoc_topics, write_text_tokens
from processes import signal_after_first_step, torchrun_train

from conftest import run_cli
from omni.config import RunConfig, load_config
from omni.errors import OmniError
from omni.run import lr_at

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, text_tokenizer):
    """A text-only bundle and token datasets of real text (the pydoc topics), preprocessed once:
    tokens (60 topics), tokens_small (6 of them, short) and tokens_heldout (12 topics no other holds:
    held out by content)."""
    import omni

    root = tmp_path_factory.mktemp("textrun")
    omni.UnifiedTokenizer.build(text_tokenizer).save(root / "tok")
    topics = pydoc_topics()
    write_text_tokens(root / "tok", root / "tokens", [t[:1200] for t in topics[:60]])
    write_text_tokens(root / "tok", root / "tokens_small", [t[:300] for t in topics[:6]], prefix="s")
    write_text_tokens(root / "tok", root / "tokens_heldout", [t[:1200] for t in topics[60:72]], prefix="h")
    return root


def _recipe(root: Path, out: Path, **train) -> Path:
    """A RunConfig YAML: the shared tiny model over the text dataset."""
    tiny = yaml.safe_load((ROOT / "recipes" / "models" / "tiny.yaml").read_text())
    cfg = {
        "seed": 3,
        "model": tiny["model"],
        "data": {"tokenizer": str(root / "tok"), "paths": [str(root / "tokens")], "seq_len": 64, "seed": 5},
        "train": {"out": str(out), "steps": 8, "micro_batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
                  "log_every": 1, "save_every": 100, "tensorboard": False, **train},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def _omni(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "omni", *args], cwd=ROOT.parent,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw)


def _signal_after_first_step(recipe: Path, out: Path, sig: int) -> tuple[int, str, str]:
    """`omni train RECIPE --quiet`, signalled with ``sig`` once it has logged a step."""
    return signal_after_first_step([sys.executable, "-m", "omni", "train", str(recipe), "--quiet"], out, sig)


def test_schedules():
    """omni.run.lr_at is the one schedule of every trainer (decoder and tokenizers)."""
    cos = dict(lr=1.0, steps=100, warmup_steps=10, schedule="cosine", min_lr=0.1)
    assert lr_at(0, **cos) == pytest.approx(0.1) and lr_at(9, **cos) == pytest.approx(1.0)
    assert lr_at(10, **cos) == pytest.approx(1.0) and lr_at(100, **cos) == pytest.approx(0.1)
    assert lr_at(55, **cos) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    wsd = dict(lr=1.0, steps=100, warmup_steps=10, schedule="wsd", min_lr=0.0, decay_fraction=0.2)
    assert lr_at(50, **wsd) == 1.0 and lr_at(79, **wsd) == 1.0
    assert lr_at(89, **wsd) == pytest.approx(0.5) and lr_at(99, **wsd) == pytest.approx(0.0)
    assert lr_at(5, 1.0, 100, schedule="constant") == 1.0
    with pytest.raises(OmniError, match="unknown schedule 'linear'"):
        lr_at(50, 1.0, 100, schedule="linear")


def test_overfits_real_text(tmp_path, text_run):
    """A tiny model memorizes a small real dataset: the loss falls below 1.0 nat (from ln 640 = 6.5)."""
    from omni.train.loop import train

    recipe = _recipe(text_run, tmp_path / "overfit", steps=120, lr=1e-2, min_lr=1e-3, warmup_steps=10,
                     save_every=1000, log_every=1)
    # six short documents, so memorizing them is possible in 120 steps
    cfg = load_config(RunConfig, recipe, overrides=[f"data.paths=[{text_run / 'tokens_small'}]"])
    train(cfg, resume="none", progress=False)
    losses = _losses(tmp_path / "overfit")
    assert losses[0][1] > 5.0
    assert losses[-1][1] < 1.0, losses[-3:]


@pytest.mark.dist
def test_sigterm_then_resume_equals_one_run_bit_for_bit(tmp_path, text_run):
    straight = _recipe(text_run, tmp_path / "straight", steps=12, save_every=3)
    p = _omni("train", str(straight), "--quiet", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err

    killed = _recipe(text_run, tmp_path / "killed", steps=12, save_every=3)
    p = _omni("train", str(killed), "--quiet", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_dir = tmp_path / "killed"
    deadline = time.time() + 120
    while time.time() < deadline and not (out_dir / "step_000003" / "checksums.json").exists():
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    stdout, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "SIGTERM: saved" in stdout
    stopped = max(int(d.name[5:]) for d in out_dir.glob("step_*"))
    assert 3 <= stopped < 12, f"SIGTERM landed at step {stopped}: not mid-run"
    p = _omni("train", str(killed), "--quiet", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err

    assert _losses(out_dir) == _losses(tmp_path / "straight")
    a = (tmp_path / "straight" / "step_000012" / "model.safetensors").read_bytes()
    b = (out_dir / "step_000012" / "model.safetensors").read_bytes()
    assert a == b
    assert len(list(out_dir.glob("step_*"))) == 3  # keep_last


@pytest.mark.dist
def test_sigkill_resumes_from_last_intact_checkpoint(tmp_path, text_run):
    from omni.train.loop import train

    ref = _recipe(text_run, tmp_path / "ref", steps=8, save_every=2)
    train(load_config(RunConfig, ref), resume="none", progress=False)

    recipe = _recipe(text_run, tmp_path / "run", steps=8, save_every=2)
    p = _omni("train", str(recipe), "--quiet", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out_dir = tmp_path / "run"
    deadline = time.time() + 120
    while time.time() < deadline and not (out_dir / "step_000004" / "checksums.json").exists():
        time.sleep(0.02)
    p.kill()
    p.wait()
    # corrupt the newest checkpoint: resume must pass over it with a warning
    newest = max(out_dir.glob("step_*"))
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match="does not match its checksum"):
        train(load_config(RunConfig, recipe), resume="auto", progress=False)
    assert _losses(out_dir)[-1] == _losses(tmp_path / "ref")[-1]
    assert ((out_dir / "step_000008" / "model.safetensors").read_bytes()
            == (tmp_path / "ref" / "step_000008" / "model.safetensors").read_bytes())


@pytest.mark.dist
def test_sigusr1_saves_a_checkpoint_and_exits_cleanly(tmp_path, text_run):
    """Slurm's preemption warning (--signal=USR1): a real SIGUSR1 finishes the step, writes an intact
    checkpoint, says where, and exits 0."""
    from omni.run import verify

    recipe = _recipe(text_run, tmp_path / "run", steps=500, save_every=1000)
    rc, stdout, err = _signal_after_first_step(recipe, tmp_path / "run", signal.SIGUSR1)
    assert rc == 0, err
    (ckpt,) = (tmp_path / "run").glob("step_*")
    assert f"SIGUSR1: saved {ckpt}" in stdout and verify(ckpt) is None
    assert 1 <= int(ckpt.name[5:]) < 500


def test_outside_the_main_thread_preemption_is_a_named_warning(tmp_path, text_run):
    import threading
    import warnings

    from omni.train.loop import train

    recipe = _recipe(text_run, tmp_path / "run", steps=1, warmup_steps=0)
    caught, failed = [], []

    def run():
        try:
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                train(load_config(RunConfig, recipe), resume="none", progress=False)
            caught.extend(str(w.message) for w in rec)
        except Exception as e:  # noqa: BLE001 - reported below, in the test's own thread
            failed.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert not failed, failed
    assert any("outside the main thread" in m and "without a checkpoint" in m for m in caught), caught
    assert (tmp_path / "run" / "step_000001").is_dir()


def test_no_intact_checkpoint_is_refused_not_silently_restarted(tmp_path, text_run):
    """--resume auto in a folder whose checkpoints are all corrupt exits 2 naming each (it used to start
    over from step 0 and truncate metrics.jsonl with only a warning); --resume none starts over on purpose."""
    from omni.train.loop import train

    recipe = _recipe(text_run, tmp_path / "run", steps=4, save_every=2, keep_last=2)
    train(load_config(RunConfig, recipe), resume="none", progress=False)
    out_dir = tmp_path / "run"
    for ckpt in out_dir.glob("step_*"):
        (ckpt / "model.safetensors").write_bytes(b"cut")
    logged = (out_dir / "metrics.jsonl").read_bytes()
    rc, _, err = run_cli("train", recipe, "--quiet")
    assert rc == 2 and "none is intact" in err, err
    assert "step_000004: model.safetensors does not match its checksum" in err and "step_000002" in err
    assert (out_dir / "metrics.jsonl").read_bytes() == logged  # nothing lost
    rc, stdout, err = run_cli("train", recipe, "--quiet", "--resume", "none", "train.steps=2")
    assert rc == 0, err
    assert "earlier checkpoints" in stdout and sorted(p.name for p in out_dir.glob("step_*")) == ["step_000002"]


def test_non_finite_steps_are_skipped_then_abort(tmp_path, text_run, monkeypatch):
    from omni.model import OmniDecoder
    from omni.train.loop import train

    real = OmniDecoder.forward
    calls = {"n": 0}

    def flaky(self, *a, **kw):
        out = real(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] in (3, 4) or calls["n"] >= 7:  # steps 3-4 bad, then bad forever
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(OmniDecoder, "forward", flaky)
    cfg = load_config(RunConfig, _recipe(text_run, tmp_path / "nan", steps=20, max_bad_steps=3))
    with pytest.raises(OmniError, match="3 steps in a row had a non-finite loss"):
        train(cfg, resume="none", progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["skipped"]] == [3, 4, 7, 8, 9]
    assert rows[-1]["skipped_steps"] == 5


def test_bf16_and_activation_checkpointing(tmp_path, text_run):
    from omni.train.loop import train

    base = _recipe(text_run, tmp_path / "base", steps=3)
    train(load_config(RunConfig, base), resume="none", progress=False)
    ac = _recipe(text_run, tmp_path / "ac", steps=3, activation_checkpointing=True)
    train(load_config(RunConfig, ac), resume="none", progress=False)
    for (s1, l1), (s2, l2) in zip(_losses(tmp_path / "base"), _losses(tmp_path / "ac")):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)
    bf = _recipe(text_run, tmp_path / "bf16", steps=3, precision="bf16")
    train(load_config(RunConfig, bf), resume="none", progress=False)
    assert all(abs(a[1] - b[1]) < 0.1 for a, b in zip(_losses(tmp_path / "base"), _losses(tmp_path / "bf16")))


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(tmp_path, text_run, strategy):
    """torchrun with 2 CPU processes and half the micro-batch: the same loss at every step."""
    from omni.train.loop import train

    one = _recipe(text_run, tmp_path / "one", steps=4, micro_batch_size=4, grad_accum=2)
    train(load_config(RunConfig, one), resume="none", progress=False)
    two = _recipe(text_run, tmp_path / "two", steps=4, micro_batch_size=2, grad_accum=2)
    r = torchrun_train(two, f"parallel.strategy={strategy}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained to step 4") == 1  # only rank 0 prints
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-5)


def test_bad_train_config_exits_2(tmp_path, text_run):
    recipe = _recipe(text_run, tmp_path / "bad")
    for override, needle in [("train.stage=rlhf", "'pretrain', 'sft'"),
                             ("train.min_lr=1.0", "train.min_lr=1.0 is invalid"),
                             ("train.warmup_steps=100", "in [0, steps=8]"),
                             ("data.tokenizer=/nonexistent", "vocab.json is missing"),
                             ("data.tokenizer=null", "data.tokenizer"),
                             ("data.paths=[/nonexistent]", "manifest.json is missing"),
                             ("data.paths=tokens", "data.paths must be a list: data.paths=[a,b]"),
                             # the tiny recipe's model has 256 positions; this used to train silently
                             ("data.seq_len=512", "data.seq_len=512 is longer than model.max_seq_len=256"),
                             ("data.seq_len=100000", "data.seq_len=100000 is longer than model.max_seq_len=256"),
                             ("train.eval_every=2", "data.eval_paths"),
                             (f"data.eval_paths=[{text_run / 'tokens'}]", "held out"),
                             (f"train.out={recipe}/run", "train.out: cannot write into"),
                             ("train.init_from=/nonexistent", "checkpoint directory not found: /nonexistent")]:
        rc, out, err = run_cli("train", recipe, "--quiet", override)
        assert rc == 2 and needle in err and "Traceback" not in err, (override, err)
    bad = tmp_path / "bad"
    assert not bad.exists() or not any(bad.iterdir())  # refused before anything was written


def test_a_dataset_without_documents_is_refused_in_one_line(tmp_path, text_run):
    """A preprocess whose every sample was bad leaves a manifest but no documents: training names it
    (it used to die in megatron with "cannot mmap an empty file")."""
    import webdataset as wds

    from omni.data.preprocess import preprocess

    (tmp_path / "raw").mkdir()
    with wds.TarWriter(str(tmp_path / "raw" / "bad-000.tar")) as w:
        for i in range(3):
            w.write({"__key__": f"b{i}", "png": b"not a png", "txt": b"a caption"})
    with pytest.raises(OmniError):  # nothing was written: preprocess fails too, after its manifest
        preprocess([str(tmp_path / "raw")], text_run / "tok", tmp_path / "empty", progress=False)
    assert (tmp_path / "empty" / "manifest.json").is_file()
    rc, _, err = run_cli("train", _recipe(text_run, tmp_path / "run"), "--quiet",
                         f"data.paths=[{text_run / 'tokens'},{tmp_path / 'empty'}]")
    assert rc == 2 and "Traceback" not in err, err
    assert f"token dataset {tmp_path / 'empty'} holds no documents (3 samples read" in err, err


def test_stage_and_modality_weights_pick_the_scored_targets():
    from omni.train.loop import _target_weights
    from omni.vocab import AUDIO, IMAGE, SPECIAL, TEXT

    table = torch.tensor([TEXT, SPECIAL, IMAGE, AUDIO])
    batch = {"labels": torch.tensor([[0, 1, 2, 3, 2]]),
             "loss_mask": torch.tensor([[0.0, 1, 1, 1, 0]]),  # SFT: the first target is a prompt token
             "valid_mask": torch.tensor([[1.0, 1, 1, 1, 0]])}  # the last target crosses a document boundary
    cfg = load_config(RunConfig, overrides=["train.loss_weights.image=0.5", "train.loss_weights.audio=0"])
    assert _target_weights(batch, cfg, table).tolist() == [[1.0, 1.0, 0.5, 0.0, 0.0]]
    cfg = load_config(RunConfig, overrides=["train.stage=sft"])
    assert _target_weights(batch, cfg, table).tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]


def test_tensorboard_events_and_resume_truncates_metrics(tmp_path, text_run):
    from omni.train.loop import train

    recipe = _recipe(text_run, tmp_path / "tb", steps=4, save_every=2, tensorboard=True, peak_flops=1e12)
    train(load_config(RunConfig, recipe), resume="none", progress=False)
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(ln) for ln in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 and "loss_text" in r for r in rows)
    # resuming from step 2 drops the metrics of steps 3-4 before logging them again
    train(load_config(RunConfig, recipe), resume=str(tmp_path / "tb" / "step_000002"), progress=False)
    assert [s for s, _ in _losses(tmp_path / "tb")] == [1, 2, 3, 4]


def test_validation_loss_on_a_held_out_split_decreases(tmp_path, text_run):
    """train.eval_every + data.eval_paths: the held-out loss is logged (overall and per modality) and falls."""
    from omni.train.loop import train

    recipe = _recipe(text_run, tmp_path / "val", steps=24, log_every=8, eval_every=8, eval_batches=2)
    cfg = load_config(RunConfig, recipe, overrides=[f"data.eval_paths=[{text_run / 'tokens_heldout'}]"])
    train(cfg, resume="none", progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "val" / "metrics.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert [s for s, _ in val] == [8, 16, 24]
    counted = {r["val_tokens"] for r in rows if "val_loss" in r}
    assert len(counted) == 1 and 0 < counted.pop() <= 2 * 4 * 64  # the same sequences every time
    assert all("val_loss_text" in r for r in rows if "val_loss" in r)
    assert val[-1][1] < val[0][1] - 0.3, val  # generalizes: ~5.6 -> ~4.7 nats on unseen topics


def test_held_out_split_shares_no_document_with_training(text_run):
    """The held-out topics are held out by content, not by seed."""
    from omni.data.packing import TokenDataset

    def docs(name):
        ds = TokenDataset(text_run / name)
        return {ds.document(i)[0].tobytes() for i in range(len(ds))}

    held = docs("tokens_heldout")
    assert held and not held & (docs("tokens") | docs("tokens_small"))


def test_init_from_starts_at_step_0_with_the_checkpoint_weights(tmp_path, text_run):
    """train.init_from: fine-tuning from weights only (fresh optimizer, schedule and stream); a run
    folder resolves to its newest intact step, as --resume DIR does."""
    from safetensors.torch import load_file

    from omni.run import find_resume
    from omni.train.loop import Trainer, train

    train(load_config(RunConfig, _recipe(text_run, tmp_path / "base", steps=4, save_every=2)), resume="none",
          progress=False)
    base = tmp_path / "base"
    assert find_resume(tmp_path / "elsewhere", str(base)) == base / "step_000004"
    cfg = load_config(RunConfig, _recipe(text_run, tmp_path / "ft", steps=2, init_from=str(base)))
    t = Trainer(cfg, resume="auto", progress=False)
    assert t.step == 0 and t.initialized_from == base / "step_000004" and not t.opt.state
    want = load_file(str(base / "step_000004" / "model.safetensors"))
    assert all(torch.equal(v, want[k]) for k, v in t.model.state_dict().items())
    assert "start: step 0 with the weights of" in t.summary("auto")
    t.run()
    first = _losses(tmp_path / "ft")[0][1]
    assert first < _losses(base)[0][1] - 0.4  # it starts where the base run ended (~5.9), not at ln(640) = 6.5


def test_resume_under_another_world_size_with_the_same_global_batch(tmp_path, text_run):
    """The stream's position is global, so 1 process x micro-batch 4 may resume as 2 processes x 2:
    the same sequences per step, the same losses (to float summation order). Another global batch is
    refused, naming what to set."""
    import shutil

    from omni.train.loop import train

    one = _recipe(text_run, tmp_path / "one", steps=4, save_every=2)
    train(load_config(RunConfig, one), resume="none", progress=False)
    rc, _, err = run_cli("train", one, "--quiet", "train.micro_batch_size=2", "--resume",
                         str(tmp_path / "one" / "step_000002"))
    assert rc == 2 and "global batch of 4 sequences; this run has 2" in err and "train.grad_accum=2" in err, err

    mixed = _recipe(text_run, tmp_path / "mixed", steps=4, save_every=2, micro_batch_size=2)
    (tmp_path / "mixed").mkdir()
    shutil.copytree(tmp_path / "one" / "step_000002", tmp_path / "mixed" / "step_000002")
    r = torchrun_train(mixed)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data-parallel 2" in r.stdout and "resumed from" in r.stdout
    a, b = dict(_losses(tmp_path / "one")), dict(_losses(tmp_path / "mixed"))
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-5)


@pytest.mark.dist
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, text_run):
    """A real SIGINT (Ctrl-C) finishes the step and saves, like SIGTERM, and exits 130 (interrupted);
    the start-up summary says what the run is and where it starts; a second Ctrl-C aborts at once."""
    from omni.run import verify
    from omni.train.loop import _StopFlag

    recipe = _recipe(text_run, tmp_path / "run", steps=500, save_every=1000)
    rc, stdout, err = _signal_after_first_step(recipe, tmp_path / "run", signal.SIGINT)
    assert rc == 130, err
    (ckpt,) = (tmp_path / "run").glob("step_*")
    assert f"SIGINT: saved {ckpt}" in stdout and verify(ckpt) is None and "Ctrl-C again to abort" in err
    assert "batch: 4 sequences of 64 tokens per step = micro_batch_size 4 x grad_accum 1 x data-parallel 1" in stdout
    assert "start: step 0 from random init (no checkpoint in" in stdout
    rc, stdout, err = run_cli("train", recipe, "--quiet", "train.steps=" + str(int(ckpt.name[5:]) + 1))
    assert rc == 0 and f"resumed from {ckpt} (--resume auto" in stdout, err

    flag = _StopFlag(announce=False)
    with flag:
        flag._handle(signal.SIGINT, None)
        assert flag.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            flag._handle(signal.SIGINT, None)


def test_wandb_offline_logs_the_metrics_rows(tmp_path, text_run):
    """train.wandb: an offline W&B run under OUT/wandb holding the logged steps (no network)."""
    from omni.train.loop import train

    recipe = _recipe(text_run, tmp_path / "wb", steps=2, warmup_steps=0)
    cfg = load_config(RunConfig, recipe, overrides=["train.wandb.enabled=true", "train.wandb.project=omni-test"])
    env = {"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        train(cfg, resume="none", progress=False)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    (run,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    (log,) = run.glob("run-*.wandb")
    # wandb's service process may still be writing its log when finish() returns (seen under load)
    deadline = time.monotonic() + 30
    while b"grad_norm" not in (data := log.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"omni-test" in data and b"loss/text" in data and b"grad_norm" in data


@pytest.mark.dist
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_launcher_stops_cleanly_when_torchrun_is_signalled(tmp_path, text_run, sig):
    """SIGTERM (preemption) or SIGUSR1 (Slurm's time-limit warning) to the launcher (torchrun's agent)
    reaches both workers, which save and stop; the launcher exits 0 without torchrun's SignalException
    traceback."""
    from omni.run import verify

    recipe = _recipe(text_run, tmp_path / "run", steps=500, save_every=1000)
    rc, stdout, err = signal_after_first_step([sys.executable, "-m", "omni.parallel.launch", "--standalone",
                                               "--nproc_per_node", "2", "-m", "omni", "train", str(recipe), "--quiet"],
                                              tmp_path / "run", sig)
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err and f"{sig.name} forwarded to the workers" in err, err[-3000:]
    (ckpt,) = (tmp_path / "run").glob("step_*")
    assert f"{sig.name}: saved {ckpt}" in stdout and verify(ckpt) is None
