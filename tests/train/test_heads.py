"""Joint training of the decoder with a task head (VisionLLM v2 routing): toy-world detection documents
("find every red circle" + image + <det> with ground-truth boxes) through preprocessing and packing;
the head's losses are logged and reach the decoder; checkpoints hold the heads beside the decoder and
`omni.load` restores them; a resumed run ends bit-identical; bad head configs are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
HEAD = {"enabled": True, "n_queries": 4, "width": 32, "n_objects": 4, "n_layers": 1, "n_heads": 2, "ffn_dim": 64}


@pytest.fixture(scope="module")
def det_run(tmp_path_factory, real_tokenizer):
    """The tiny real bundle (32 px images, 4x4 codes) and 40 toy scenes' detection documents, preprocessed."""
    from omni.data.preprocess import preprocess
    from omni.toy.shapes import write_shards

    root = tmp_path_factory.mktemp("det")
    real_tokenizer.save(root / "tok")
    write_shards(root / "raw", 40, "train", kinds=("detect",), size=32, scenes_per_shard=20)
    preprocess([str(root / "raw")], root / "tok", root / "tokens", progress=False)
    return root


def _recipe(root: Path, out: Path, heads: dict | None = None, **train) -> Path:
    tiny = yaml.safe_load((ROOT / "recipes" / "models" / "tiny.yaml").read_text())
    cfg = {
        "seed": 3, "model": tiny["model"],
        "data": {"tokenizer": str(root / "tok"), "paths": [str(root / "tokens")], "seq_len": 64, "seed": 5},
        "heads": {"det": HEAD if heads is None else heads},
        "train": {"out": str(out), "steps": 4, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "log_every": 1,
                  "save_every": 100, "tensorboard": False, **train},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_joint_training_logs_head_losses_and_checkpoints_hold_the_heads(tmp_path, det_run):
    import omni
    from omni.decoders.detection import DetectionHead

    out = tmp_path / "run"
    rc, _, err = run_cli("train", str(_recipe(det_run, out)), "--quiet")
    assert rc == 0, err
    rows = _rows(out)
    assert len(rows) == 4 and all(r["routes_det"] > 0 for r in rows)
    for r in rows:
        assert {"det_ce", "det_l1", "det_giou", "grad_norm_heads"} <= set(r) and r["grad_norm_heads"] > 0
    ckpt = out / "step_000004"
    assert (ckpt / "heads.safetensors").is_file() and (ckpt / "heads.yaml").is_file()
    assert not any(k.startswith("heads.") for k in load_file(ckpt / "model.safetensors"))
    model, tok = omni.load(ckpt, device="cpu")
    assert isinstance(model.heads.heads["det"], DetectionHead) and model.heads.queries.n_queries == {"<det>": 4}
    saved = load_file(ckpt / "heads.safetensors")
    for k, v in model.heads.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_the_head_loss_reaches_the_decoder(tmp_path, det_run):
    """One step with the head's loss weighted 0 and one with weight 1, from the same init and data: the
    decoder's weights differ (the head's gradient flows back through the query and image states)."""
    outs = []
    for w in (0.0, 1.0):
        out = tmp_path / f"w{w}"
        rc, _, err = run_cli("train", str(_recipe(det_run, out, steps=1, save_every=1)), "--quiet",
                             f"train.loss_weights.det={w}")
        assert rc == 0, err
        outs.append(load_file(out / "step_000001" / "model.safetensors"))
    changed = [k for k in outs[0] if not torch.equal(outs[0][k], outs[1][k])]
    assert any(".attention.wq." in k for k in changed) and "tok_embeddings.weight" in changed


def test_resume_with_heads_ends_bit_identical(tmp_path, det_run):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli("train", str(_recipe(det_run, whole, save_every=2)), "--quiet")[0] == 0
    rc, _, err = run_cli("train", str(_recipe(det_run, split, save_every=2)), "--quiet", "train.steps=2")
    assert rc == 0, err
    rc, _, err = run_cli("train", str(_recipe(det_run, split, save_every=2)), "--quiet")
    assert rc == 0, err
    for name in ("model.safetensors", "heads.safetensors"):
        assert (whole / "step_000004" / name).read_bytes() == (split / "step_000004" / name).read_bytes(), name
    assert [r["det_giou"] for r in _rows(whole)] == [r["det_giou"] for r in _rows(split)]


def test_bad_head_configs_are_refused(tmp_path, det_run, text_tokenizer):
    recipe = _recipe(det_run, tmp_path / "run")
    cases = [
        (["heads.det.n_queries=0"], "heads.det.n_queries=0 is invalid"),
        (["heads.det.n_queries=3", "data.preprocess.det_queries=3"],
         "heads.det.n_queries=3 but the token datasets carry 4 slots after each <det>"),
        (["heads.det.n_queries=3"], "heads.det.n_queries=3 but data.preprocess.det_queries=4"),
        (["heads.det.kind=x"], "unknown config key 'heads.det.kind'"),
        (["parallel.backend=megatron"], "the task heads run with the plain-PyTorch backend only"),
        (["parallel.backend=megatron", "heads.det.enabled=false"], "the megatron backend does not handle them yet"),
    ]
    for extra, needle in cases:
        rc, _, err = run_cli("train", str(recipe), "--quiet", *extra)
        assert rc == 2 and needle in err and "Traceback" not in err, (extra, err)
    # a head with no <det> document to learn from
    from corpus import write_text_tokens

    import omni

    omni.UnifiedTokenizer.load(det_run / "tok")  # the same bundle, text documents only
    write_text_tokens(det_run / "tok", tmp_path / "text", ["plain text without any routing token"])
    rc, _, err = run_cli("train", str(recipe), "--quiet", f"data.paths=[{tmp_path / 'text'}]")
    assert rc == 2 and "no token dataset of data.paths holds a <det> document" in err, err


GEN = {"enabled": True, "n_queries": 4, "widths": [32], "layers": 1, "head_dim": 32, "cross_dim": 32, "steps": 2}


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory, real_tokenizer):
    """The same bundle and 24 scenes' generation documents (caption, <gen>, the scene), K = 4."""
    from omni.config.data import PreprocessConfig
    from omni.data.preprocess import preprocess
    from omni.toy.shapes import write_shards

    root = tmp_path_factory.mktemp("gen")
    real_tokenizer.save(root / "tok")
    write_shards(root / "raw", 24, "train", kinds=("generate",), size=32)
    preprocess([str(root / "raw")], root / "tok", root / "tokens", PreprocessConfig(gen_queries=4), progress=False)
    return root


def _gen_recipe(root: Path, out: Path, **train) -> Path:
    path = _recipe(root, out, heads={"enabled": False}, **train)
    cfg = yaml.safe_load(path.read_text())
    cfg["heads"]["gen"] = GEN
    cfg["data"]["preprocess"] = {"gen_queries": 4}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_diffusion_head_trains_on_gen_documents_and_resumes_bit_identical(tmp_path, gen_run):
    """heads.gen: the head diffuses in the image tokenizer's latent (its size and channels come from the
    bundle), its loss is logged, it is saved with its latent statistics, and a resumed run ends with the
    weights of an uninterrupted one."""
    import omni
    from omni.decoders.diffusion import DiffusionHead

    whole, split = tmp_path / "whole", tmp_path / "split"
    rc, _, err = run_cli("train", str(_gen_recipe(gen_run, whole, save_every=2)), "--quiet")
    assert rc == 0, err
    rows = _rows(whole)
    assert all(r["routes_gen"] > 0 and r["gen_diffusion"] > 0 for r in rows) and "det_ce" not in rows[0]
    assert run_cli("train", str(_gen_recipe(gen_run, split, save_every=2)), "--quiet", "train.steps=2")[0] == 0
    assert run_cli("train", str(_gen_recipe(gen_run, split, save_every=2)), "--quiet")[0] == 0
    for name in ("model.safetensors", "heads.safetensors"):
        assert (whole / "step_000004" / name).read_bytes() == (split / "step_000004" / name).read_bytes(), name
    model, tok = omni.load(whole, device="cpu")
    head = model.heads.heads["gen"]
    assert isinstance(head, DiffusionHead) and (head.cfg.size, head.cfg.channels) == (4, 8)  # 4x4 codes of dim 8
    assert head.latent_std.min() > 0 and not torch.equal(head.latent_std, torch.ones_like(head.latent_std))
