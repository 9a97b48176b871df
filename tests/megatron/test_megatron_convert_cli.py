"""`omni convert from-megatron` / `to-megatron`: megatron-core dist_checkpointing step folders <-> omni
inference checkpoints, read and written with torch.distributed.checkpoint in one process (no GPU,
no megatron model, no process group).

The megatron run is real: `omni train ... parallel.backend=megatron parallel.tensor=2` on 2 gloo
processes under torchrun with the CPU shim (tests/megatron/omni_main_with_shim.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from runs import MAIN, ROOT, make_data, recipe, torchrun
from runs import weights as _weights

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def data(tmp_path_factory, text_tokenizer):
    return make_data(tmp_path_factory.mktemp("megatron_data"), text_tokenizer)


def _recipe(root: Path, out: Path, **train) -> Path:
    """The tiny model on real text (runs.recipe), 3 steps saved at the end."""
    return recipe(root, out, **{"steps": 3, **train})


def _train(recipe_path: Path, *overrides: str) -> None:
    torchrun(2, recipe_path, "parallel.backend=megatron", *overrides)


@pytest.fixture(scope="module")
def megatron_run(data):
    """A TP=2 megatron run of 3 steps (one step folder, the final one: it also holds model.safetensors)."""
    out = data / "tp2"
    _train(_recipe(data, out), "parallel.tensor=2", "parallel.distributed_optimizer=true")
    step = out / "step_000003"
    assert (step / "megatron").is_dir() and (step / "model.safetensors").is_file()
    return step


def _omni(*argv: str, capsys) -> tuple[int, str, str]:
    from omni.cli import main

    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _equal_objects(a: Path, b: Path) -> None:
    """The same ShardedObjects (``_extra_state``), loading to the same values."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    values = []
    for path in (a, b):  # (warns that it reads in a single process: intended)
        reader = FileSystemReader(str(path / "megatron"))
        md = reader.read_metadata().state_dict_metadata
        state = {k: io.BytesIO() for k, v in md.items() if isinstance(v, BytesStorageMetadata) and "optimizer" not in k}
        with pytest.warns(UserWarning, match="single process"):
            dcp.load(state, storage_reader=reader, no_dist=True)
        values.append(state)
    assert values[0] == values[1] and values[0], values


def test_the_global_layout_is_stacked_layers_at_full_size(megatron_run):
    """What megatron-core 0.16.1 writes at TP=2 (the layout omni.megatron_checkpoint's docstring
    describes): layers stacked on a leading axis, every tensor at its global (TP=1) shape."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(megatron_run / "megatron")).read_metadata().state_dict_metadata
    shapes = {k: tuple(v.size) for k, v in md.items() if hasattr(v, "size") and not k.startswith("optimizer.")}
    assert shapes == {
        "embedding.word_embeddings.weight": (1024, 64),  # 640 rows padded to a multiple of 1024
        "output_layer.weight": (1024, 64),
        "decoder.final_layernorm.weight": (64,),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (2, 64),  # local spec, TE's name
        "decoder.layers.self_attention.linear_qkv.weight": (2, (4 + 2 * 2) * 16, 64),
        "decoder.layers.self_attention.q_layernorm.weight": (2, 4, 16),
        "decoder.layers.self_attention.q_layernorm.bias": (2, 4, 16),
        "decoder.layers.self_attention.k_layernorm.weight": (2, 2, 16),
        "decoder.layers.self_attention.k_layernorm.bias": (2, 2, 16),
        "decoder.layers.self_attention.linear_proj.weight": (2, 64, 64),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (2, 64),
        "decoder.layers.mlp.linear_fc1.weight": (2, 2 * 172, 64),  # [gate; up]
        "decoder.layers.mlp.linear_fc2.weight": (2, 64, 172),
    }
    fc1 = sorted(tuple(c.offsets) for c in md["decoder.layers.mlp.linear_fc1.weight"].chunks)
    # TP=2: rank r saved its gate rows at r*86 and its up rows at 172 + r*86 (megatron's swiglu
    # sharded_state_dict splits [gate_r; up_r]): the global tensor is omni's [w1; w3] whole
    assert fc1 == [(i, row, 0) for i in (0, 1) for row in (0, 86, 172, 258)]
    objects = sorted(k for k in md if "_extra_state" in k)
    assert len(objects) == 4 * 2 and "decoder.layers.mlp.linear_fc1._extra_state/shard_1_2" in objects


def test_from_megatron_equals_the_gathered_weights_and_generates(tmp_path, megatron_run, capsys):
    import omni
    from omni.config.generate import GenerateConfig, SamplingConfig

    rc, out, err = _omni("convert", "from-megatron", "--checkpoint", str(megatron_run), "--out",
                         str(tmp_path / "omni"), capsys=capsys)
    assert rc == 0, err
    assert f"wrote {tmp_path / 'omni'}" in out
    # the trainer's own gathered OmniDecoder weights (TP ranks all-gathered in the run): bit for bit
    _equal(_weights(tmp_path / "omni"), _weights(megatron_run))
    meta = json.loads((tmp_path / "omni" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["converted_from"] == "megatron"
    model, tok = omni.load(tmp_path / "omni", device="cpu")
    cfg = GenerateConfig(max_new_tokens=8, allow_images=False, allow_audio=False, text=SamplingConfig(temperature=0.0))
    doc = omni.generate(model, tok, "the", cfg)
    ref_model, _ = omni.load(megatron_run, device="cpu")
    assert doc.text == omni.generate(ref_model, tok, "the", cfg).text
    # --out exists: refused without --force
    rc, _, err = _omni("convert", "from-megatron", "--checkpoint", str(megatron_run), "--out",
                       str(tmp_path / "omni"), capsys=capsys)
    assert rc == 2 and "already exists" in err


def test_from_megatron_refuses_bad_input(tmp_path, megatron_run, capsys):
    import shutil

    rc, _, err = _omni("convert", "from-megatron", "--checkpoint", str(megatron_run.parent), "--out",
                       str(tmp_path / "a"), capsys=capsys)
    assert rc == 2 and f"{megatron_run.parent / 'megatron'}" in err and "missing" in err, err
    assert not (tmp_path / "a").exists()
    # no tokenizer bundle anywhere: the step folder's tokenizer/ gone and run.yaml's data.tokenizer missing
    step = tmp_path / "step"
    shutil.copytree(megatron_run / "megatron", step / "megatron")
    run = yaml.safe_load((megatron_run / "run.yaml").read_text())
    run["data"]["tokenizer"] = str(tmp_path / "nowhere")
    (step / "run.yaml").write_text(yaml.safe_dump(run))
    rc, _, err = _omni("convert", "from-megatron", "--checkpoint", str(step), "--out", str(tmp_path / "b"),
                       capsys=capsys)
    assert rc == 2 and "no tokenizer bundle" in err and str(tmp_path / "nowhere") in err, err
    (step / "run.yaml").unlink()
    rc, _, err = _omni("convert", "from-megatron", "--checkpoint", str(step), "--out", str(tmp_path / "b"),
                       capsys=capsys)
    assert rc == 2 and "run.yaml" in err, err
    assert not (tmp_path / "b").exists()


LOADER = r"""
import json, sys
from pathlib import Path

if __name__ == "__main__":  # dist_checkpointing's spawn Manager re-imports __main__
    sys.path.insert(0, sys.argv[1])
    import shim

    shim.apply()
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from safetensors.torch import load_file

    from omni.config import RunConfig, load_config
    from omni.parallel.megatron.convert import to_megatron
    from omni.parallel.megatron.model import build_model_chunks, initialize_parallel, megatron_state

    ckpt, omni_dir, out = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    dist.init_process_group("gloo")
    cfg = load_config(RunConfig, ckpt / "run.yaml")
    initialize_parallel(cfg)
    (chunk,) = build_model_chunks(cfg)
    loaded = dist_checkpointing.load({"model": chunk.sharded_state_dict()}, str(ckpt / "megatron"))
    chunk.load_state_dict(loaded["model"])
    p = cfg.parallel
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    expected = to_megatron(load_file(str(omni_dir / "model.safetensors")), cfg.model, p.tensor, tp_rank,
                           p.pipeline, pp_rank, te=chunk.omni_te)
    actual = megatron_state(chunk)
    bad = sorted(set(expected) ^ set(actual)) + [k for k in expected if k in actual and not torch.equal(expected[k], actual[k])]
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps({"keys": len(expected), "bad": bad,
                                                                 "layout": [p.tensor, p.pipeline]}))
    dist.barrier()
    dist.destroy_process_group()
"""


def test_to_megatron_round_trips_and_megatron_loads_it_at_another_layout(tmp_path, megatron_run, capsys):
    """omni -> megatron (model only, recorded for TP=1 x PP=2) -> omni is bit for bit; megatron-core's own
    dist_checkpointing.load fills the GPTModel chunks of that layout with exactly those weights."""
    rc, out, err = _omni("convert", "to-megatron", "--checkpoint", str(megatron_run), "--out", str(tmp_path / "mg"),
                         "--pipeline", "2", capsys=capsys)
    assert rc == 0, err
    assert "pipeline=2" in out
    mg = tmp_path / "mg"
    assert (mg / "megatron" / ".metadata").is_file() and (mg / "megatron" / "common.pt").is_file()
    assert json.loads((mg / "megatron" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    run = yaml.safe_load((mg / "run.yaml").read_text())
    assert run["parallel"]["backend"] == "megatron" and run["parallel"]["tensor"] == 1 and run["parallel"]["pipeline"] == 2
    # the same global tensors as megatron's own checkpoint (the run's; optimizer left out)
    from omni.megatron_checkpoint import read_megatron_tensors

    _equal(read_megatron_tensors(mg), read_megatron_tensors(megatron_run))
    _equal_objects(mg, megatron_run)
    rc, _, err = _omni("convert", "from-megatron", "--checkpoint", str(mg), "--out", str(tmp_path / "back"),
                       capsys=capsys)
    assert rc == 0, err
    _equal(_weights(tmp_path / "back"), _weights(megatron_run))

    # megatron-core loads it: TP=1 x PP=2 on 2 gloo processes (the run was saved at TP=2)
    script = tmp_path / "load_megatron.py"
    script.write_text(LOADER)
    (tmp_path / "res").mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(MAIN.parent), str(mg), str(megatron_run), str(tmp_path / "res")],
                       cwd=ROOT.parent, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / "res" / f"rank{rank}.json").read_text())
        assert res["layout"] == [1, 2] and res["keys"] > 0 and res["bad"] == [], res


def test_to_megatron_refuses_a_layout_the_model_does_not_split_into(tmp_path, megatron_run, capsys):
    rc, _, err = _omni("convert", "to-megatron", "--checkpoint", str(megatron_run), "--out", str(tmp_path / "a"),
                       "--tensor", "3", capsys=capsys)
    assert rc == 2 and "--tensor 3 must divide n_heads=4" in err, err
    rc, _, err = _omni("convert", "to-megatron", "--checkpoint", str(megatron_run), "--out", str(tmp_path / "a"),
                       "--pipeline", "4", capsys=capsys)
    assert rc == 2 and "--pipeline 4 must divide n_layers=2" in err, err
    assert not (tmp_path / "a").exists()


def test_from_megatron_reads_a_pipeline_run_with_tied_embeddings_at_any_step(tmp_path, data, capsys):
    """PP=2 (4 layers, 2 a stage; the last stage's output layer is the tied embedding, saved once):
    the final step equals the gathered weights; an earlier step (no omni weights beside it) converts too."""
    out = data / "pp2"
    recipe = _recipe(data, out, steps=2, save_every=1, warmup_steps=1)
    run = yaml.safe_load(recipe.read_text())
    run["model"].update(n_layers=4, tie_embeddings=True)
    recipe.write_text(yaml.safe_dump(run))
    _train(recipe, "parallel.pipeline=2")
    assert not (out / "step_000001" / "model.safetensors").exists()
    for step in ("step_000001", "step_000002"):
        rc, _, err = _omni("convert", "from-megatron", "--checkpoint", str(out / step), "--out", str(tmp_path / step),
                           capsys=capsys)
        assert rc == 0, err
    _equal(_weights(tmp_path / "step_000002"), _weights(out / "step_000002"))
    first = _weights(tmp_path / "step_000001")
    assert "output.weight" not in first and not torch.equal(first["tok_embeddings.weight"],
                                                             _weights(tmp_path / "step_000002")["tok_embeddings.weight"])


def test_the_torch_backend_refuses_a_megatron_checkpoint_naming_the_ways_on(tmp_path, megatron_run, data):
    from conftest import run_cli

    rc, _, err = run_cli("train", _recipe(data, tmp_path / "torch"), "--quiet", "--resume", str(megatron_run))
    assert rc == 2 and "saved by the megatron backend" in err and "omni convert from-megatron" in err, err
