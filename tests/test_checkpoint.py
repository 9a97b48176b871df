"""Checkpoint directories: layout, round trip through omni.load, refusals that say what differs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import omni
from omni.checkpoint import load_weights, save_checkpoint
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
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "meta.json", "model.safetensors", "tokenizer"]
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
    with pytest.raises(OmniError, match="not a readable safetensors file"):
        omni.load(broken)
    (broken / "meta.json").unlink()
    with pytest.raises(OmniError, match="meta.json is missing"):
        omni.load(broken)
