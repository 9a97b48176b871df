"""Shared by the megatron CLI tests: the shared data (:func:`make_data`), a tiny recipe
on real text, a torchrun job of the real `omni` CLI through the CPU shim (omni_main_with_shim.py),
and readers of what a run wrote. (Not a conftest.py: a second module named conftest would shadow
tests/conftest.py for `from conftest import run_cli`.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/corpus.py
from corpus import pydoc_topics, write_text_tokens  # noqa: E402
from processes import signal_after_first_step  # noqa: E402, F401  (re-exported)

ROOT = Path(__file__).resolve().parents[2]
MAIN = Path(__file__).resolve().parent / "omni_main_with_shim.py"


def recipe(root: Path, out: Path, **train) -> Path:
    """The tiny model (z_loss 1e-4) over ``root``'s bundle and tokens; 6 steps saved every 3."""
    tiny = yaml.safe_load((ROOT / "recipes" / "models" / "tiny.yaml").read_text())
    cfg = {
        "seed": 3,
        "model": {**tiny["model"], "z_loss": 1e-4},
        "data": {"tokenizer": str(root / "tok"), "paths": [str(root / "tokens")], "seq_len": 64, "seed": 5},
        # Adam's eps 1e-3: with 1e-8 the first steps magnify 1e-7 gradient differences (float summation
        # order across TP ranks) into 1e-5 weight differences (../shared/notes/megatron-core-on-cpu.md)
        "train": {"out": str(out), "steps": 6, "micro_batch_size": 2, "grad_accum": 2, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 2, "eps": 1e-3, "log_every": 1, "save_every": 3, "tensorboard": False, **train},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(n: int, recipe_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`omni train RECIPE --quiet OVERRIDES` on ``n`` gloo processes (the shim applied first)."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                        str(MAIN), "train", str(recipe_path), "--quiet", *overrides], cwd=ROOT.parent,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def rows(out: Path) -> dict[int, dict]:
    """metrics.jsonl of run folder ``out`` by step."""
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def weights(path: Path) -> dict:
    """The OmniDecoder weights of checkpoint folder ``path``."""
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def make_data(root: Path, text_tokenizer) -> Path:
    """root/tok (a text bundle), root/tokens (40 pydoc topics), root/heldout (10 other topics: held
    out by content). Each test module wraps it in its own ``data`` fixture."""
    import omni

    omni.UnifiedTokenizer.build(text_tokenizer).save(root / "tok")
    topics = pydoc_topics()
    write_text_tokens(root / "tok", root / "tokens", [t[:1000] for t in topics[:40]])
    write_text_tokens(root / "tok", root / "heldout", [t[:1000] for t in topics[40:50]], prefix="h")
    return root
