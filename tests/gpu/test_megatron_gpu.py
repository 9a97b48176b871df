"""The megatron backend on a real GPU (marker ``gpu``: skipped, reason printed, without CUDA).

Run on a lent GPU machine by ``bash bench/megatron_gpu.sh`` (after the bench), or there directly with
``python -m pytest -m gpu tests/gpu``. Transformer Engine is optional on such a machine: where it does
not import, the checks that need it are skipped naming that reason; the bf16 training check runs anyway.

(a) the TE-spec GPTModel forward equals the local-spec forward on the same omni weights: bf16, a
    2-layer model, one packed row of two documents; tolerance 3e-2 of the largest logit (bf16's
    rounding, 8e-3 relative per operation, through a dozen differently fused GEMMs and norms);
(b) 20 steps of ``omni train`` (parallel.backend=megatron) on a small model stay finite and the loss
    falls: fp8 tensorwise (needs TE and compute capability >= 8.9), and bf16 (runs without TE);
(c) check_megatron, with probe() of this machine, accepts train.precision=fp8 here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from corpus import pydoc_topics, write_text_tokens

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PARITY_TOL = 3e-2
# dims multiples of 16 (FP8 GEMMs need them): dim 128, ffn 256, head_dim 32
SMALL = {"vocab_size": 640, "dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 256,
         "qk_norm": "per_head", "rope_theta": 10000.0, "max_seq_len": 256, "tie_embeddings": False, "z_loss": 1e-5}


def _te() -> str | None:
    """None when Transformer Engine imports (in a child: the import loads CUDA libraries), else why not."""
    r = subprocess.run([sys.executable, "-c", "import transformer_engine.pytorch"], capture_output=True, text=True,
                       timeout=300)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["import failed"])[-1][:200]


@pytest.fixture(scope="module")
def te_missing():
    return _te()


def _need_te(te_missing):
    if te_missing:
        pytest.skip(f"Transformer Engine missing on this GPU machine ({te_missing})")


PARITY_CHILD = r"""
import json, sys, torch, torch.distributed as dist
from omni.config import RunConfig, load_config
from omni.model import OmniDecoder
from omni.parallel.megatron.model import build_model, forward_inputs, initialize_parallel, load_omni_state
model = json.loads(sys.argv[1])
cfg = load_config(RunConfig, {"model": model, "parallel": {"backend": "megatron"}, "train": {"precision": "bf16"},
                              "data": {"seq_len": 128}})
dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
initialize_parallel(cfg)
torch.manual_seed(0)
state = OmniDecoder(cfg.model).state_dict()
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, cfg.model.vocab_size, (1, 128), generator=g).cuda()
doc_ids = torch.cat([torch.zeros(1, 50), torch.ones(1, 78)], 1).long().cuda()
out = {}
with torch.no_grad():
    for name, te in (("local", False), ("te", True)):
        m = build_model(cfg, te=te).cuda().eval()
        load_omni_state(m, state, cfg)
        out[name] = m(**forward_inputs(m, ids, doc_ids)).float().reshape(1, 128, -1)[..., :cfg.model.vocab_size]
d = (out["te"] - out["local"]).abs().max() / out["local"].abs().max()
print(json.dumps({"max_rel": float(d), "finite": bool(torch.isfinite(out["te"]).all())}))
"""


def test_te_spec_forward_equals_local_spec_on_the_same_weights(te_missing):
    _need_te(te_missing)
    r = subprocess.run([sys.executable, "-c", PARITY_CHILD, json.dumps(SMALL)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["finite"]
    assert res["max_rel"] <= PARITY_TOL, res


@pytest.fixture(scope="module")
def data(tmp_path_factory, text_tokenizer):
    """A text bundle and a token dataset of the pydoc topics (as tests/megatron/test_megatron_train.py)."""
    import omni

    root = tmp_path_factory.mktemp("megatron_gpu")
    omni.UnifiedTokenizer.build(text_tokenizer).save(root / "tok")
    write_text_tokens(root / "tok", root / "tokens", pydoc_topics())
    return root


@pytest.mark.parametrize("precision", ["fp8-tensorwise", "bf16"])
def test_twenty_steps_of_omni_train_stay_finite_and_the_loss_falls(tmp_path, data, te_missing, precision):
    if precision.startswith("fp8"):
        _need_te(te_missing)
        if torch.cuda.get_device_capability(0) < (8, 9):
            pytest.skip("fp8 needs compute capability >= 8.9")
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "seed": 3, "model": SMALL,
        "data": {"tokenizer": str(data / "tok"), "paths": [str(data / "tokens")], "seq_len": 128, "seed": 5},
        "train": {"out": str(out), "steps": 20, "micro_batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
                  "log_every": 1, "save_every": 20, "tensorboard": False}}))
    extra = ["train.precision=fp8", "train.fp8.recipe=tensorwise"] if precision.startswith("fp8") else ["train.precision=bf16"]
    r = subprocess.run([sys.executable, "-m", "omni", "train", str(recipe), "--quiet", "--resume", "none",
                        "parallel.backend=megatron", *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in rows if "loss" in x]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert rows[-1]["skipped_steps"] == 0
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, losses


def test_check_megatron_accepts_fp8_on_this_gpu(te_missing):
    from omni.config import RunConfig, load_config
    from omni.parallel.megatron.config import check_megatron, probe

    machine = probe()
    assert machine.capability is not None
    cfg = load_config(RunConfig, {"model": SMALL, "parallel": {"backend": "megatron"}, "train": {"precision": "bf16"}})
    check_megatron(cfg, world=1, machine=machine)  # bf16 on the megatron backend: any CUDA GPU
    _need_te(te_missing)
    if machine.capability < (8, 9):
        pytest.skip(f"compute capability {machine.capability} < 8.9: fp8 is refused here by design")
    for recipe in ("tensorwise", "delayed"):
        fp8 = load_config(RunConfig, {"model": SMALL, "parallel": {"backend": "megatron"},
                                      "train": {"precision": "fp8", "fp8": {"recipe": recipe}}})
        check_megatron(fp8, world=1, machine=machine)
