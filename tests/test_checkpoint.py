"""Checkpoint directories: layout, round trip through omni.load, refusals that say what differs."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

import omni
from omni.checkpoint import _resolve_device, load_weights, resolve_checkpoint, save_checkpoint
from omni.errors import OmniError, VocabMismatchError
from omni.model import OmniDecoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_config, tokenizer):
    torch.manual_seed(0)
    model = OmniDecoder(tiny_model_config).eval()
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "run", model, tiny_model_config, tokenizer)
    return path, model


def test_round_trip(saved, tokenizer):
    path, model = saved
    assert sorted(p.name for p in path.iterdir()) == ["checksums.json", "config.yaml", "meta.json",
                                                      "model.safetensors", "tokenizer"]
    assert not list(path.parent.glob(".*"))  # no temp dirs left behind
    meta = json.loads((path / "meta.json").read_text())
    assert meta["tokenizer"]["fingerprint"] == tokenizer.fingerprint
    assert meta["num_parameters"] == model.num_parameters()

    loaded, tok = omni.load(path)
    assert tok.fingerprint == tokenizer.fingerprint and loaded.config == model.config
    ids = tok.encode("def f(x): return x")[None]
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    out = loaded(ids[:, :-1], labels=ids[:, 1:])  # the bundle's modality table came along
    assert set(out.tokens_by_modality) <= {"text", "special"} and out.tokens_by_modality["text"] > 0


def test_load_in_half_precision(saved):
    path, model = saved
    half, tok = omni.load(path, dtype="bfloat16")
    floating = [t for t in [*half.parameters(), *half.buffers()] if t.is_floating_point()]
    assert floating and all(t.dtype == torch.bfloat16 for t in floating)
    assert half.modality_table.dtype == torch.long  # integer buffers keep their type
    ids = tok.encode("def f(x): return x")[None]
    ref, got = model(ids).logits, half(ids).logits
    assert got.dtype == torch.bfloat16
    # the same function to bf16 precision: logits within a few bf16 steps of float32's, same ranking
    torch.testing.assert_close(got.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0)
    assert (got.float().argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    cache = half.new_cache()
    half(ids, cache=cache)
    assert cache.k[0].dtype == torch.bfloat16  # the KV cache, half the bytes too
    doc = omni.generate(half, tok, "def f", max_new_tokens=12, allow_images=False, allow_audio=False, seed=1)
    assert isinstance(doc, omni.Document)
    with pytest.raises(OmniError, match="dtype 'int8' is not supported; valid: float32, bfloat16, float16"):
        omni.load(path, dtype="int8")


def test_overwrite_is_whole(saved, tiny_model_config, tokenizer):
    path, _ = saved
    other = OmniDecoder(dataclasses.replace(tiny_model_config, tie_embeddings=True))
    target = path.parent / "tied"
    save_checkpoint(target, OmniDecoder(tiny_model_config), tokenizer=tokenizer)
    save_checkpoint(target, other, tokenizer=tokenizer)  # replaces the previous one entirely
    loaded, _ = omni.load(target)
    assert loaded.config.tie_embeddings and loaded.output is None
    torch.testing.assert_close(loaded.tok_embeddings.weight, other.tok_embeddings.weight)


def test_refusals(saved, tiny_model_config, tokenizer, text_tokenizer, image_double):
    path, _ = saved
    with pytest.raises(OmniError, match=r"another model config \(saved vs given\): n_layers 2 vs 3"):
        omni.load(path, config=dataclasses.replace(tiny_model_config, n_layers=3))
    with pytest.raises(OmniError, match="n_layers 2 vs 3"):
        load_weights(OmniDecoder(dataclasses.replace(tiny_model_config, n_layers=3)), path)

    from omni.bundle import UnifiedTokenizer

    no_audio = UnifiedTokenizer.build(text_tokenizer, image_double)  # other ids
    with pytest.raises(VocabMismatchError, match="another tokenizer bundle: audio tokenizer test-envelope [0-9a-f]+ vs none"):
        omni.load(path, tokenizer=no_audio)
    smaller = dataclasses.replace(tiny_model_config, vocab_size=512)
    with pytest.raises(VocabMismatchError, match="vocab_size 512 != tokenizer bundle vocab size 640"):
        save_checkpoint(path.parent / "bad", OmniDecoder(smaller), tokenizer=tokenizer)

    with pytest.raises(OmniError, match="checkpoint directory not found"):
        omni.load(path.parent / "missing")
    broken = path.parent / "broken"
    save_checkpoint(broken, OmniDecoder(tiny_model_config), tokenizer=tokenizer)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(OmniError, match="model.safetensors does not match its checksum"):
        omni.load(broken)
    with pytest.raises(OmniError, match="not a readable safetensors file"):
        omni.load(broken, verify=False)
    (broken / "meta.json").unlink()
    with pytest.raises(OmniError, match=r"neither an omni checkpoint \(no meta.json\) nor a run folder"):
        omni.load(broken)


def _flip_last_byte(path):
    """Corrupt a file the way a bad disk or a cut copy does: the format still parses, one value is wrong."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte lies in the tensor data, after the safetensors header
    path.write_bytes(bytes(data))


def test_corrupt_weights_are_refused(saved, tmp_path):
    path, model = saved
    bad = shutil.copytree(path, tmp_path / "bad")
    _flip_last_byte(bad / "model.safetensors")
    with pytest.raises(OmniError, match=r"checkpoint .*bad is damaged: model.safetensors does not match its "
                                        r"checksum .*verify=False"):
        omni.load(bad)
    loaded, _ = omni.load(bad, verify=False)  # opted out: loads, one weight differs
    diffs = [k for k, v in loaded.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert len(diffs) == 1


def test_checkpoint_without_checksums_loads_with_a_warning(saved, tmp_path):
    path, model = saved
    old = shutil.copytree(path, tmp_path / "old")
    (old / "checksums.json").unlink()  # as saved before checkpoints carried checksums
    with pytest.warns(UserWarning, match=r"old has no checksums.json .*cannot be verified"):
        loaded, _ = omni.load(old)
    torch.testing.assert_close(loaded.tok_embeddings.weight, model.tok_embeddings.weight, atol=0, rtol=0)


def test_load_a_run_folder_takes_its_newest_intact_step(tmp_path, tiny_model_config, tokenizer, capsys):
    run = tmp_path / "run"
    torch.manual_seed(1)
    older = OmniDecoder(tiny_model_config)
    save_checkpoint(run / "step_000001", older, tokenizer=tokenizer)
    save_checkpoint(run / "step_000002", OmniDecoder(tiny_model_config), tokenizer=tokenizer)
    assert resolve_checkpoint(run) == run / "step_000002"
    assert resolve_checkpoint(run / "step_000001") == run / "step_000001"  # a checkpoint is itself
    capsys.readouterr()

    _flip_last_byte(run / "step_000002" / "model.safetensors")
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_000002: model.safetensors does not match"):
        loaded, _ = omni.load(run)
    assert capsys.readouterr().err == f"omni.load: {run} is a run folder; loading step_000001, its newest intact checkpoint\n"
    torch.testing.assert_close(loaded.tok_embeddings.weight, older.tok_embeddings.weight, atol=0, rtol=0)

    (run / "step_000001" / "checksums.json").unlink()
    with pytest.warns(UserWarning), pytest.raises(OmniError, match=(
            r"run folder .*run holds checkpoints but none is intact \(step_000002: model.safetensors does not "
            r"match its checksum .*; step_000001: checksums.json is missing")):
        omni.load(run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OmniError, match=r"empty is neither an omni checkpoint \(no meta.json\) nor a run folder "
                                        r"\(no step_\* folders\)"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(OmniError, match="checkpoint directory not found"):
        resolve_checkpoint(tmp_path / "missing")


def test_device_and_dtype_arguments(saved, monkeypatch):
    path, _ = saved
    model, _ = omni.load(path, torch_dtype=torch.bfloat16)  # transformers' spelling, a torch.dtype
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    model, _ = omni.load(path, dtype="float16", torch_dtype="float16")  # both, agreeing
    assert model.tok_embeddings.weight.dtype == torch.float16
    with pytest.raises(OmniError, match="dtype 'float16' and torch_dtype 'bfloat16' disagree"):
        omni.load(path, dtype="float16", torch_dtype=torch.bfloat16)
    with pytest.raises(OmniError, match=r"torch_dtype torch.int8 is not supported; valid: float32, bfloat16, float16"):
        omni.load(path, torch_dtype=torch.int8)

    with pytest.raises(OmniError, match=r"unknown device 'gpu'; valid: 'cpu', 'cuda', 'cuda:N', or None"):
        omni.load(path, device="gpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert omni.load(path)[0].tok_embeddings.weight.device.type == expected  # device=None: CUDA when there is one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _resolve_device(None) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _resolve_device(None) == torch.device("cpu")
    with pytest.raises(OmniError, match="device 'cuda': CUDA is not available on this machine"):
        _resolve_device("cuda")
