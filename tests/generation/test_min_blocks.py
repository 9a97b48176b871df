"""min_images / min_audio are met whatever the model prefers: the budget rule of ModalityConstraint
(issue #20, bug 5) and the up-front check of max_new_tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import omni
from omni.config.generate import GenerateConfig, SamplingConfig
from omni.vocab import AUDIO, IMAGE, TEXT

GREEDY = SamplingConfig(temperature=0.0)
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only spin-wait


def _biased(cfg, seed: int, ids, strength: float = 30.0):
    """A random-init tiny model whose logits get ``strength`` added at ``ids``: a model that all but
    always picks them where the state machine allows them."""
    torch.manual_seed(seed)
    model = omni.OmniDecoder(cfg).eval()
    bias = torch.zeros(cfg.vocab_size)
    bias[ids] = strength
    model.register_forward_hook(lambda m, args, out: dataclasses.replace(out, logits=out.logits + bias.to(out.logits)))
    return model


def _counts(ids: list[int], tok) -> tuple[int, int, list[int]]:
    """(image blocks, audio blocks, audio block lengths) of generated ids; every block well formed."""
    sp, mod = tok.vocab.specials, tok.vocab.modality_table
    n = tok.image.tokens_per_image
    images, audio_lens, cur, kind = 0, [], None, None
    for t in ids:
        if t in (sp["<boi>"], sp["<boa>"]):
            assert cur is None
            cur, kind = [], IMAGE if t == sp["<boi>"] else AUDIO
        elif t in (sp["<eoi>"], sp["<eoa>"]):
            assert cur is not None and kind == (IMAGE if t == sp["<eoi>"] else AUDIO)
            assert bool((mod[cur] == kind).all()) if cur else kind == AUDIO
            if kind == IMAGE:
                assert len(cur) == n
                images += 1
            else:
                assert len(cur) >= 1
                audio_lens.append(len(cur))
            cur = None
        elif cur is not None:
            cur.append(t)
    assert cur is None, "a block was left open"
    return images, len(audio_lens), audio_lens


def _run(model, tok, prompts, cfg):
    rows: dict[int, list[int]] = {}
    docs = omni.generate(model, tok, prompts, cfg, on_token=lambda b, t: rows.setdefault(b, []).append(t))
    return docs, [rows[b] for b in range(len(prompts))]


PROMPTS = ["a red circle and a blue square", "x", "two green triangles"]


def test_min_images_holds_against_a_model_that_wants_audio(tokenizer, tiny_model_config):
    """Bug 5: `min_images=1` wrote 0 images and 3 audio clips: audio blocks used the budget up and an
    image never fitted again. A model that all but always starts audio still makes the image now."""
    sp = tokenizer.vocab.specials
    model = _biased(tiny_model_config, 0, [sp["<boa>"]])
    for seed in range(2):
        cfg = GenerateConfig(max_new_tokens=60, min_images=1, max_audio_tokens=8, seed=seed)
        docs, rows = _run(model, tokenizer, PROMPTS, cfg)
        for doc, ids in zip(docs, rows):
            images, audios, _ = _counts(ids, tokenizer)
            assert len(ids) <= 60
            assert images >= 1 and len(doc.images) == images, ids
            assert audios >= 1  # the model's preference still shows where it leaves room: not vacuous


def test_min_images_holds_against_a_model_that_wants_text(tokenizer, tiny_model_config):
    """Text costs budget too: a model that keeps writing text gets <boi> forced while N + 2 tokens are left."""
    text_ids = (tokenizer.vocab.modality_table == TEXT).nonzero().flatten()
    model = _biased(tiny_model_config, 1, text_ids, strength=20.0)
    n = tokenizer.image.tokens_per_image
    cfg = GenerateConfig(max_new_tokens=n + 2 + 6, min_images=1, seed=3)
    docs, rows = _run(model, tokenizer, PROMPTS, cfg)
    for doc, ids in zip(docs, rows):
        assert _counts(ids, tokenizer)[0] == 1 and len(doc.images) == 1
        assert doc.text  # the text came first, as much as fitted


def test_min_audio_after_max_images_and_budget_exactly_full(tokenizer, tiny_model_config):
    """A model that wants images: max_images reached no longer ends the row while min_audio is owed;
    and two owed images plus an owed audio block in a budget that holds them with 10 tokens to spare,
    from a model that wants long audio blocks: the audio block is closed early so the images fit."""
    sp, mod = tokenizer.vocab.specials, tokenizer.vocab.modality_table
    n = tokenizer.image.tokens_per_image
    model = _biased(tiny_model_config, 2, [sp["<boi>"]])
    cfg = GenerateConfig(max_new_tokens=60, allow_text=False, max_images=1, min_audio=1, max_audio_tokens=5, seed=1)
    docs, rows = _run(model, tokenizer, PROMPTS, cfg)
    for ids in rows:
        images, audios, _ = _counts(ids, tokenizer)
        assert images == 1 and audios >= 1, ids

    audio_ids = torch.cat([(mod == AUDIO).nonzero().flatten(), torch.tensor([sp["<boa>"]])])
    model = _biased(tiny_model_config, 3, audio_ids)
    budget = 2 * (n + 2) + 3 + 10
    for jacobi in (0, 4):
        cfg = GenerateConfig(max_new_tokens=budget, min_images=2, min_audio=1, max_audio_tokens=40, seed=2,
                             image=GREEDY, jacobi=jacobi)
        docs, rows = _run(model, tokenizer, PROMPTS, cfg)
        for ids in rows:
            images, audios, lens = _counts(ids, tokenizer)
            assert len(ids) <= budget and images == 2 and audios >= 1, ids
            assert max(lens) <= 11  # cut short: 40 codes were wanted, the images needed the room


def test_min_blocks_that_cannot_fit_are_refused_up_front(tokenizer, tiny_model_config):
    torch.manual_seed(0)
    model = omni.OmniDecoder(tiny_model_config).eval()
    n = tokenizer.image.tokens_per_image
    calls: list[int] = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    with pytest.raises(omni.OmniError, match=rf"max_new_tokens={n + 1} cannot hold min_images=1 image block\(s\) "
                       rf"of {n + 2} tokens \(<boi> \+ {n} codes \+ <eoi>\): at least {n + 2} new tokens"):
        omni.generate(model, tokenizer, "x", max_new_tokens=n + 1, min_images=1)
    with pytest.raises(omni.OmniError, match=rf"at least {2 * (n + 2) + 2 * 3} new tokens"):
        omni.generate(model, tokenizer, "x", max_new_tokens=40, min_images=2, max_images=2, min_audio=2)
    with pytest.raises(omni.OmniError, match="min_images=1 needs image blocks, but allow_images=false"):
        omni.generate(model, tokenizer, "x", min_images=1, allow_images=False)
    long = "word"
    while len(tokenizer.encode(long)) < 256 - (n + 2) + 1:  # leaves the context too short for one image
        long += " word"
    with pytest.raises(omni.OmniError, match=r"max_new_tokens=200 \(the model's context is 256 tokens"):
        omni.generate(model, tokenizer, long, max_new_tokens=200, min_images=1)
    assert calls == []  # refused before the prefill
    # exactly enough is enough
    doc = omni.generate(model, tokenizer, "x", max_new_tokens=n + 2, min_images=1)
    assert len(doc.images) == 1
