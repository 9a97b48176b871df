"""Needle in a haystack: the items (held out by content, the needle where the depth says), the exact-match
scoring under teacher forcing, the training documents of omni.toy.needles, and `omni eval niah` end to
end (JSON, heatmap PNG, HTML) with its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from omni.toy import needles
from omni.toy import shapes as toy


def test_haystack_sentences_and_magic_numbers_are_held_out_by_content():
    train, val, test = (set(needles.sentences(s)) for s in needles.SPLITS)
    assert len(train) > 1000 and len(val) > 100 and len(test) > 100
    assert not train & test and not train & val and not val & test
    rng = np.random.default_rng(0)
    nums = {s: {needles.magic_number(rng, s) for _ in range(200)} for s in needles.SPLITS}
    assert not nums["train"] & nums["test"] and not nums["train"] & nums["validation"]
    assert all(len(n) == 7 for n in nums["test"])


def test_text_item_puts_the_needle_at_its_depth(real_tokenizer):
    tok = real_tokenizer
    rng = np.random.default_rng(1)
    at = []
    for depth in (0.0, 0.5, 1.0):
        it = needles.text_item(tok, 300, depth, rng, "test")
        assert len(it.ids) == 300 and it.answer_end == 300
        assert tok.decode(it.ids[it.answer_start:], strict=False).text.strip() == it.answer
        needle = tok.encode_text(" " + needles.NEEDLE.format(it.answer))
        assert it.ids[it.needle_at:it.needle_at + len(needle)] == needle
        question = tok.encode_text(needles.QUESTION)
        assert it.ids[it.answer_start - len(question):it.answer_start] == question
        at.append(it.needle_at)
        hay = tok.decode(it.ids[1:it.needle_at] + it.ids[it.needle_at + len(needle):it.answer_start - len(question)],
                         strict=False).text
        assert needles.number_split(it.answer) == "test" and it.answer not in hay
    L = 300 - len(question) - len(tok.encode_text(" 1234567"))
    assert at[0] == 1  # depth 0: right after <bos>
    assert abs(at[1] - L / 2) < 40  # depth 0.5: at the sentence boundary nearest the middle
    assert at[2] + len(needle) == L - 0  # depth 1: just before the question
    with pytest.raises(needles.OmniError, match="cannot hold a text NIAH item"):
        needles.text_item(tok, 20, 0.5, rng)
    with pytest.raises(needles.OmniError, match="outside"):
        needles.text_item(tok, 300, 1.5, rng)


def test_vision_item_hides_an_odd_picture_at_its_depth(real_tokenizer):
    pool = needles.ScenePool(real_tokenizer, "test", grid=4)
    rng = np.random.default_rng(2)
    for depth in (0.0, 0.5, 1.0):
        it = needles.vision_item(pool, 250, depth, rng)
        n = len(it.pictures)
        assert n == (250 - 1 - len(real_tokenizer.encode_text(needles.VISION_QUESTION))
                     - len(real_tokenizer.encode_text(" " + it.answer))) // pool.block_len
        kinds = [sc.pairs[0] for sc in it.pictures]
        needle = round(depth * (n - 1))
        assert [k for k in kinds if k != kinds[needle]] == [kinds[needle - 1 if needle else 1]] * (n - 1)
        assert it.answer == f"{'an' if kinds[needle][0] == 'orange' else 'a'} {kinds[needle][0]} {kinds[needle][1]}"
        assert it.needle_at == 1 + needle * pool.block_len
        assert all(toy.split_of(sc) == "test" and len(sc.objects) == 1 for sc in it.pictures)
        assert real_tokenizer.decode(it.ids[it.answer_start:], strict=False).text.strip() == it.answer
    with pytest.raises(needles.OmniError, match="cannot hold a V-NIAH item"):
        needles.vision_item(pool, 30, 0.5, rng)
    # training documents (depth None) put the needle anywhere alike: no place to learn as a prior
    places = []
    for _ in range(300):
        it = needles.vision_item(pool, 4 * pool.block_len + 30, None, rng)
        kinds = [sc.pairs[0] for sc in it.pictures]
        places.append(next(i for i, k in enumerate(kinds) if kinds.count(k) == 1))
    assert len(it.pictures) == 4 and all(50 <= places.count(i) <= 100 for i in range(4)), np.bincount(places)


class _Oracle(torch.nn.Module):
    """Logits whose argmax at t is ``truth[t + 1]``, except at the positions in ``wrong``."""

    def __init__(self, truth, vocab, wrong=()):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.truth, self.vocab, self.wrong = truth, vocab, set(wrong)

    def forward(self, ids, position_ids=None):
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            for t in range(T - 1):
                nxt = self.truth[b][t + 1] if t + 1 < len(self.truth[b]) else 0
                logits[b, t, (nxt + 1) % self.vocab if t in self.wrong else nxt] = 1.0
        return type("Out", (), {"logits": logits})()


def test_exact_match_needs_every_answer_token(real_tokenizer):
    from omni.eval.niah import score

    rng = np.random.default_rng(3)
    its = [needles.text_item(real_tokenizer, 120 + 10 * i, 0.5, rng) for i in range(3)]  # ragged: padded
    V = real_tokenizer.vocab.size
    assert score(_Oracle([it.ids for it in its], V), real_tokenizer, its) == [True, True, True]
    last = its[0].answer_end - 2  # predicts the last digit
    preds = []
    assert score(_Oracle([it.ids for it in its], V, wrong=[last]), real_tokenizer, its, preds) == [False, True, True]
    assert preds[1] == its[1].ids[its[1].answer_start:] and preds[0][:-1] == its[0].ids[its[0].answer_start:-1]
    before = its[0].answer_start - 2  # predicts a question token: not scored
    assert score(_Oracle([it.ids for it in its], V, wrong=[before]), real_tokenizer, its) == [True, True, True]


def test_training_documents_fit_and_score_only_the_answer(tmp_path, real_tokenizer):
    from omni.config.data import PreprocessConfig
    from omni.data.packing import TokenDataset
    from omni.data.preprocess import preprocess

    real_tokenizer.save(tmp_path / "bundle")
    rc, out, err = run_cli("data", "needles", tmp_path / "raw", "--tokenizer", tmp_path / "bundle", "--docs", "4",
                           "--kinds", ",".join(needles.KINDS), "--max-tokens", "200", "--grid", "4", "--per-shard", "6")
    assert rc == 0 and "(3 shards)" in out, err
    rc, _, err = run_cli("data", "needles", tmp_path / "bad", "--tokenizer", tmp_path / "bundle", "--kinds", "haystack")
    assert rc == 2 and "choose from needle, vniah, album, long_text" in err
    held_out = [s for s in needles.sentences("test") if len(s) > 60]
    summary = preprocess([str(tmp_path / "raw")], tmp_path / "bundle", tmp_path / "tok", PreprocessConfig(),
                         progress=False)
    assert summary["documents"] == 16
    ds = TokenDataset(tmp_path / "tok", real_tokenizer)
    kinds = {}
    for i in range(len(ds)):
        ids, mask = ds.document(i)
        assert len(ids) <= 200 + 2, len(ids)
        text = real_tokenizer.decode(ids.tolist(), strict=False).text
        assert not any(s in text for s in held_out)
        scored = real_tokenizer.decode(ids[mask.astype(bool)].tolist(), strict=False).text
        if "special magic number" in text:
            kinds["needle"] = kinds.get("needle", 0) + 1
            assert scored.strip().rstrip(".").isdigit() and len(scored.strip().rstrip(".")) == 7, scored
        elif needles.VISION_QUESTION.strip() in text:
            kinds["vniah"] = kinds.get("vniah", 0) + 1
            assert toy.parse_caption(scored) and "odd" not in scored
            assert (ids == real_tokenizer.vocab.special("<boi>")).sum() >= needles.MIN_PICTURES
        elif text.startswith(needles.ALBUM_INTRO):
            kinds["album"] = kinds.get("album", 0) + 1
            assert mask[1:].all() and toy.parse_caption(text)  # all but <bos>
        else:
            kinds["long_text"] = kinds.get("long_text", 0) + 1
            assert mask[1:].all()
    assert kinds == {"needle": 4, "vniah": 4, "album": 4, "long_text": 4}


def test_suite_end_to_end_and_refusals(tmp_path, tiny_model_config, real_tokenizer):
    import dataclasses

    from omni.checkpoint import save_checkpoint
    from omni.config.model import RopeConfig
    from omni.model import OmniDecoder

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ck", OmniDecoder(tiny_model_config), tokenizer=real_tokenizer)
    rc, out, err = run_cli("eval", "niah", "--checkpoint", tmp_path / "ck", "--lengths", "100,200", "--depths", "0,1",
                           "niah.items=2", "--out", tmp_path / "text")
    assert rc == 0, err
    m = json.loads(out)
    assert m["lengths"] == [100, 200] and m["depths"] == [0.0, 1.0] and np.shape(m["accuracy"]) == (2, 2)
    assert m["tokens"] == [100.0, 200.0] and m["rope"] == "rope" and m["covered_positions"] == 256
    assert m["split"] == "validation"  # tune there; niah.split=test reports once
    assert (tmp_path / "text" / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in (tmp_path / "text" / "index.html").read_text()
    assert json.loads((tmp_path / "text" / "metrics.json").read_text()) == m

    rc, out, err = run_cli("eval", "niah", "--checkpoint", tmp_path / "ck", "--kind", "vision", "--lengths", "200",
                           "--depths", "0.5", "niah.items=2", "niah.grid=4", "niah.rope.kind=yarn",
                           "niah.rope.factor=2", "niah.rope.original_max_position_embeddings=256")
    assert rc == 0, err
    m = json.loads(out)
    assert m["kind"] == "vision" and m["rope"] == "yarn x2" and m["covered_positions"] == 512

    mrope = dataclasses.replace(tiny_model_config, rope=RopeConfig(kind="mrope"))
    save_checkpoint(tmp_path / "mr", OmniDecoder(mrope), tokenizer=real_tokenizer)
    rc, out, err = run_cli("eval", "niah", "--checkpoint", tmp_path / "mr", "--kind", "vision", "--lengths", "400",
                           "--depths", "1", "niah.items=1", "niah.rope.kind=mrope_plus", "niah.rope.factor=2")
    assert rc == 0, err
    assert json.loads(out)["rope"] == "mrope_plus x2"

    for args, msg in [
        (["--lengths", "512"], "beyond the 256 positions"),
        (["--lengths", "100", "--depths", "0,1.5"], "niah.depths"),
        (["--lengths", "100", "niah.kind=audio"], "niah.kind"),
        (["--lengths", "100", "niah.rope.kind=mrope"], "does not fit this checkpoint"),
        (["--lengths", "8"], "cannot hold a text NIAH item"),
        (["--data", "x"], "takes no --data"),
    ]:
        rc, _, err = run_cli("eval", "niah", "--checkpoint", tmp_path / "ck", *args)
        assert rc == 2 and msg in err and "Traceback" not in err, (args, err)
    rc, _, err = run_cli("eval", "detection", "--checkpoint", tmp_path / "ck", "--lengths", "100")
    assert rc == 2 and "belong to the niah suite" in err
    rc, out, err = run_cli("eval", "niah", "--checkpoint", tmp_path / "ck", "--lengths", "512", "--depths", "0.5",
                           "niah.items=1", "niah.extrapolate=true")
    assert rc == 0, err
