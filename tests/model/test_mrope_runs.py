"""M-RoPE positions everywhere the model runs (#24, part 2): packed batches, the trainer (train step,
validation, exact resume), generation (prefill, decode steps, generated image blocks, guidance rows,
Jacobi windows, routing steps, reranking) and checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import omni
from omni.config import RunConfig, load_config
from omni.config.generate import GenerateConfig, SamplingConfig
from omni.config.model import MROPE_KINDS, RopeConfig
from omni.data.packing import BlendedSequences, DocumentPacker
from omni.generation import generator
from omni.model import OmniDecoder
from omni.rope import MRopeCursor, mrope_positions
from omni.vocab import IMAGE, TEXT

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingConfig(temperature=0.0)
KINDS = {
    "rope": {},
    "yarn": {"kind": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "mrope": {"kind": "mrope"},
    "mrope_plus": {"kind": "mrope_plus", "factor": 4.0},
}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _model(cfg, seed: int = 0, vocab=None, **rope_fields) -> OmniDecoder:
    """The tiny decoder with ``model.rope`` = ``rope_fields``, at base 100: every frequency section turns
    fast enough over a 4x4 grid that a position off by one moves the logits well past float noise."""
    torch.manual_seed(seed)
    model = OmniDecoder(dataclasses.replace(cfg, rope_theta=100.0, rope=RopeConfig(**rope_fields))).eval()
    if vocab is not None:
        model.set_modality_table(vocab.modality_table)
    return model


def _document(vocab, rng: np.random.Generator, layout: str) -> list[int]:
    """Ids of a document spelled by ``layout``: t = a text run, i = an image block (full grid),
    a = an audio block."""
    rows, cols = vocab.image_grid
    ids = [vocab.special("<bos>")]
    for ch in layout:
        if ch == "t":
            ids += rng.integers(0, vocab.text_size, rng.integers(2, 14)).tolist()
        elif ch == "i":
            ids += vocab.block("image", torch.from_numpy(rng.integers(0, vocab.image_codes, (rows, cols))))
        elif ch == "a":
            ids += vocab.block("audio", torch.from_numpy(rng.integers(0, vocab.audio_codes, rng.integers(1, 6))))
    return ids + [vocab.special("<eos>")]


class _Documents:
    """What DocumentPacker reads of a TokenDataset, held in memory."""

    def __init__(self, docs: list[list[int]], vocab):
        self.docs = [np.asarray(d, np.int64) for d in docs]
        self.path = Path("in-memory")
        self.manifest = {"totals": {}}
        self.max_block = max(vocab.longest_block(d) for d in self.docs)

    def __len__(self) -> int:
        return len(self.docs)

    def document(self, i: int):
        return self.docs[i], np.ones(len(self.docs[i]), np.uint8)


def _prompt(seed: int = 0, text: str = "a red circle", after: str | None = " and then"):
    """Text, an image, text (``after``; None: none): a prompt whose prefill holds an image block."""
    g = torch.Generator().manual_seed(seed)
    segments = [omni.Text(text), omni.Image(torch.rand(3, 32, 32, generator=g))]
    return omni.Document(segments + ([omni.Text(after)] if after is not None else []))


def _steer(monkeypatch, tok, image_at: int) -> list[torch.Tensor]:
    """Replace the sampler: greedy, except that every row in text mode emits <boi> at sampler call
    ``image_at`` (an image block in the middle of the output) and never elsewhere, and never <eos>
    (the budget ends the output). Records each call's constrained logits [B, V]."""
    seen: list[torch.Tensor] = []
    boi, eos = tok.vocab.special("<boi>"), tok.vocab.special("<eos>")

    def sample(self, logits, state):
        seen.append(logits.clone())
        out = []
        for b, r in enumerate(state.rows):
            row = logits[b].clone()
            if r.mode == "text":
                if len(seen) - 1 == image_at:
                    out.append(boi)
                    continue
                row[[boi, eos]] = float("-inf")
            out.append(int(row.argmax()))
        return torch.tensor(out)

    monkeypatch.setattr(generator.ModalitySampler, "__call__", sample)
    return seen


def _steered_config(tok, image_at: int, after: int, **kw) -> GenerateConfig:
    n = tok.image.tokens_per_image
    return GenerateConfig(max_new_tokens=image_at + n + 2 + after, text=GREEDY, image=GREEDY, allow_audio=False,
                          max_images=2, **kw)


def _full_positions(ids: torch.Tensor, vocab, kind: str):
    """What a full forward over ``ids`` [T] passes: mrope_positions [3, 1, T] for the M-RoPE kinds."""
    return mrope_positions(ids, vocab)[0][:, None] if KINDS[kind].get("kind") in MROPE_KINDS else None


# ----------------------------------------------------------------------------------------------
# the cursor generation keeps per row
# ----------------------------------------------------------------------------------------------
def test_cursor_continues_exactly_as_the_whole_sequence(real_tokenizer):
    """MRopeCursor: a prefix (ending anywhere, inside an open image block too) then pieces of any size
    get the positions of mrope_positions over the whole sequence, for random streams of text, image
    blocks (closed, unfinished, empty), audio blocks, stray codes and closers, out-of-range ids;
    clones move independently; too many codes are refused as mrope_positions refuses them."""
    v = real_tokenizer.vocab
    rng = np.random.default_rng(0)
    boi, eoi = v.opener("image"), v.closer("image")
    img = v.image_code_to_id(torch.arange(v.image_codes)).numpy()
    aud = v.audio_code_to_id(torch.arange(v.audio_codes)).numpy()
    n = v.image_grid[0] * v.image_grid[1]

    def stream(length: int) -> list[int]:
        out: list[int] = []
        while len(out) < length:
            c = int(rng.integers(0, 7))
            if c == 0:
                out += rng.integers(0, v.text_size, rng.integers(1, 4)).tolist()
            elif c == 1:
                end = eoi if rng.random() < 0.7 else int(rng.integers(0, v.text_size))  # closed, or left unfinished
                out += [boi, *rng.choice(img, rng.integers(0, n + 1)).tolist(), end]
            elif c == 2:
                out += [v.opener("audio"), *rng.choice(aud, rng.integers(0, 4)).tolist(), v.closer("audio")]
            elif c == 3:
                out.append(int(rng.integers(-2, v.size + 3)))
            elif c == 4:
                out.append(eoi)
            elif c == 5:
                out.append(int(rng.choice(img)))
            else:
                out.append(v.special("<pad>"))
        return out

    open_ends = 0
    for _ in range(150):
        seq = stream(60)
        want, nxt = mrope_positions(seq, v)
        cut = int(rng.integers(0, len(seq) + 1))
        head, cursor = MRopeCursor.prefill(seq[:cut], v)
        open_ends += cursor.base is not None
        parts, i = [head], cut
        while i < len(seq):
            k = int(rng.integers(1, 5))
            spare = cursor.clone()
            spare.extend([boi, *img[:3]])  # a clone's moves leave the cursor where it is
            parts.append(cursor.extend(torch.tensor(seq[i:i + k])))
            i += k
        np.testing.assert_array_equal(np.concatenate(parts, 1), want)
        assert cursor.next == nxt
    assert open_ends > 5  # prefixes that end inside an unfinished image block were exercised

    _, cursor = MRopeCursor.prefill([boi, *img[:n].tolist()], v)
    with pytest.raises(omni.OmniError, match="more codes than its 4x4 grid"):
        cursor.extend(img[:1])


# ----------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------
def test_packed_batches_carry_per_document_mrope_positions(real_tokenizer):
    """mrope=True: position_ids [3, B, L], each document piece at its own mrope_positions from 0 (a
    document cut across rows restarts, as its 1-D positions do; a cut never falls inside a block).
    Everything else, and the 1-D stream's batches ([B, L], 0, 1, 2, ... per piece), is unchanged."""
    v = real_tokenizer.vocab
    rng = np.random.default_rng(1)
    docs = [_document(v, rng, layout) for layout in ("tit", "itati", "t", "tiit", "at", "titit", "ti", "iit") * 2]
    L, B = 48, 3
    three = BlendedSequences([DocumentPacker(_Documents(docs, v), L, 1, v, mrope=True)])
    one = BlendedSequences([DocumentPacker(_Documents(docs, v), L, 1, v)])
    cut = images = differs = 0
    for _ in range(8):
        b3, b1 = three.next_batch(B), one.next_batch(B)
        assert b3["position_ids"].shape == (3, B, L) and b3["position_ids"].dtype == torch.int64
        assert b1["position_ids"].shape == (B, L) and b1["position_ids"].dtype == torch.int64
        for k in ("input_ids", "labels", "loss_mask", "valid_mask", "doc_ids"):
            assert torch.equal(b3[k], b1[k]), k
        assert b3["spans"] == b1["spans"]
        for r in range(B):
            at = 0
            for _, _, doc, start, length in b3["spans"][r]:
                n = min(length, L - at)  # the row's last packed token is a label only
                if n == 0:  # a piece that is only that label
                    continue
                piece = docs[doc][start:start + length]
                got = b3["position_ids"][:, r, at:at + n].numpy()
                np.testing.assert_array_equal(got, mrope_positions(piece, v)[0][:, :n])
                assert got[:, 0].tolist() == [0, 0, 0]  # every piece restarts, a cut document's remainder too
                np.testing.assert_array_equal(b1["position_ids"][r, at:at + n].numpy(), np.arange(n))
                ok = v.split_points(docs[doc])
                assert ok[start] and ok[start + length], "a piece cut an image/audio block"
                cut += start > 0
                images += sum(b.kind == "image" and b.closed for b in v.blocks(piece[:n]))
                differs += int((got != got[:1]).any())
                at += length
            pad = b3["doc_ids"][r] < 0
            assert not b3["position_ids"][:, r][:, pad].any() and not b1["position_ids"][r][pad].any()
    assert cut > 3 and images > 10 and differs > 10  # cut documents, image blocks with 2-D rows were packed


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_run(tmp_path_factory, real_tokenizer):
    """The real tiny bundle and token datasets of captioned images (random 32 px pictures, pydoc text):
    ``train`` (10 documents) and ``heldout`` (3)."""
    from corpus import png_bytes, pydoc_topics, write_shards

    from omni.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("mrope_run")
    real_tokenizer.save(root / "tok")
    rng = np.random.default_rng(0)
    topics = pydoc_topics()
    for name, count, first in (("train", 10, 0), ("heldout", 3, 30)):
        samples = [{"__key__": f"{name}{i:03d}", "png": png_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                    "txt": topics[first + i][:160].encode()} for i in range(count)]
        write_shards(samples, root / f"{name}_raw", per_shard=8)
        preprocess([str(root / f"{name}_raw")], root / "tok", root / name, progress=False)
    return root


def _run_config(root: Path, out: Path, kind: str = "mrope") -> RunConfig:
    tiny = yaml.safe_load((ROOT / "recipes" / "models" / "tiny.yaml").read_text())["model"]
    return load_config(RunConfig, {
        "seed": 3,
        "model": {**tiny, "rope": {"kind": kind}},
        "data": {"tokenizer": str(root / "tok"), "paths": [str(root / "train")],
                 "eval_paths": [str(root / "heldout")], "seq_len": 64, "seed": 5},
        "train": {"out": str(out), "steps": 4, "micro_batch_size": 2, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1,
                  "log_every": 1, "save_every": 2, "eval_every": 2, "eval_batches": 1, "tensorboard": False},
    })


def _rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_mrope_training_feeds_3d_positions_and_resumes_exactly(tmp_path, image_run, real_tokenizer):
    """A tiny mrope model trains on the image datasets: every forward (train steps and validation) gets
    the batch's mrope_positions [3, B, L] per document; resuming from step 2 gives steps 3-4 (losses,
    validation, final weights) bit for bit."""
    from safetensors.torch import load_file

    from omni.train.loop import Trainer

    v = real_tokenizer.vocab
    out = tmp_path / "run"
    cfg = _run_config(image_run, out)
    trainer = Trainer(cfg, resume="none", progress=False)
    calls = []
    trainer.model.register_forward_pre_hook(
        lambda m, args, kw: calls.append((m.training, args[0].clone(), kw["doc_ids"].clone(), kw["position_ids"].clone())),
        with_kwargs=True)
    trainer.run()
    assert sum(t for t, *_ in calls) == 4 and sum(not t for t, *_ in calls) == 2  # 4 steps, 2 validations
    images = 0
    for _, ids, docs, pos in calls:
        assert pos.shape == (3, *ids.shape)
        for r in range(ids.shape[0]):
            real = docs[r] >= 0
            want = mrope_positions(ids[r][real], v, doc_ids=docs[r][real])[0]
            assert torch.equal(pos[:, r][:, real], want)
            images += int((pos[1, r] != pos[0, r]).any())
    assert images >= 4  # image blocks were laid out in 2-D, not only text

    rows = _rows(out)
    weights = load_file(str(out / "step_000004" / "model.safetensors"))
    assert {r["step"] for r in rows if "val_loss" in r} == {2, 4}
    Trainer(cfg, resume=str(out / "step_000002"), progress=False).run()
    again = _rows(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(rows[2:], again[2:]):
        assert (a["loss"], a.get("val_loss")) == (b["loss"], b.get("val_loss")), (a, b)
    resumed = load_file(str(out / "step_000004" / "model.safetensors"))
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_generation_equals_a_full_forward(monkeypatch, real_tokenizer, tiny_model_config, kind):
    """Greedy decoding of text -> image -> text after a prompt holding an image: every step's logits
    equal a full forward over the final tokens (with mrope_positions for the M-RoPE kinds, which
    differ from 1-D ones after an image: the comparison can fail)."""
    tok = real_tokenizer
    v, n = tok.vocab, tok.image.tokens_per_image
    model = _model(tiny_model_config, 1, v, **KINDS[kind])
    image_at, after = 3, 4
    seen = _steer(monkeypatch, tok, image_at)
    generated: list[int] = []
    omni.generate(model, tok, _prompt(), _steered_config(tok, image_at, after),
                  on_token=lambda b, t: generated.append(t))

    mods = v.modality_table[torch.tensor(generated)]
    assert len(generated) == image_at + n + 2 + after
    assert generated[image_at] == v.special("<boi>") and generated[image_at + n + 1] == v.special("<eoi>")
    assert bool((mods[:image_at] == TEXT).all() and (mods[image_at + 1:image_at + 1 + n] == IMAGE).all()
                and (mods[image_at + n + 2:] == TEXT).all())
    prompt = tok.encode(_prompt())
    ids = torch.cat([prompt, torch.tensor(generated)])
    with torch.no_grad():
        full = model(ids[None], position_ids=_full_positions(ids, v, kind)).logits[0]
    assert len(seen) == len(generated)
    P = len(prompt)
    for s, logits in enumerate(seen):  # call s: after the prompt (s = 0) or generated token s - 1
        ok = torch.isfinite(logits[0])
        torch.testing.assert_close(logits[0][ok], full[P - 1 + s][ok], rtol=1e-4, atol=1e-4, msg=f"step {s}")
    if kind in MROPE_KINDS:
        with torch.no_grad():
            flat = model(ids[None]).logits[0]
        assert (flat[P + image_at:] - full[P + image_at:]).abs().max() > 1e-2


def _generate_rows(model, tok, prompts, cfg, seen) -> tuple[dict[int, list[int]], list[torch.Tensor]]:
    seen.clear()
    rows: dict[int, list[int]] = {}
    omni.generate(model, tok, prompts, cfg, on_token=lambda b, t: rows.setdefault(b, []).append(t))
    return rows, [s.clone() for s in seen]


@pytest.mark.parametrize("extra", [{}, {"cfg_scale": 3.0}], ids=["plain", "guidance"])
def test_mrope_batched_equals_one_by_one(monkeypatch, real_tokenizer, tiny_model_config, extra):
    """Left-padded prompts of different lengths (text only, text-image-text, an image alone), an image
    generated in the middle, with and without the unconditional rows of guidance: each row's tokens
    and every step's logits equal those of its prompt alone."""
    tok = real_tokenizer
    model = _model(tiny_model_config, 2, tok.vocab, kind="mrope")
    g = torch.Generator().manual_seed(5)
    prompts = ["a", _prompt(1, "a much longer prompt about a blue square"),
               omni.Document([omni.Image(torch.rand(3, 32, 32, generator=g))])]
    seen = _steer(monkeypatch, tok, 2)
    cfg = _steered_config(tok, 2, 3, **extra)
    batched, batched_seen = _generate_rows(model, tok, prompts, cfg, seen)
    for b, p in enumerate(prompts):
        alone, alone_seen = _generate_rows(model, tok, p, cfg, seen)
        assert alone[0] == batched[b]
        assert len(alone_seen) == len(batched_seen)
        for s, (x, y) in enumerate(zip(alone_seen, batched_seen)):
            ok = torch.isfinite(x[0])
            torch.testing.assert_close(x[0][ok], y[b][ok], rtol=1e-4, atol=1e-4, msg=f"row {b} step {s}")


@pytest.mark.parametrize("accepting", [False, True], ids=["rejected", "accepted"])
def test_mrope_jacobi_windows_equal_token_by_token(monkeypatch, real_tokenizer, tiny_model_config, accepting):
    """Jacobi windows inside a generated image (batched, with guidance): the same tokens as one token per
    pass, and the text steps after the image get the same logits, so the cursors kept exactly the
    accepted guesses. ``accepting``: image rows of the head zeroed (every code ties, guesses are kept:
    whole windows accepted, fewer passes); else nearly every guess is rejected."""
    tok = real_tokenizer
    model = _model(tiny_model_config, 3, tok.vocab, kind="mrope")
    if accepting:
        with torch.no_grad():
            model.output.weight[tok.vocab.modality_table == IMAGE] = 0.0
    widths: list[int] = []
    model.register_forward_pre_hook(lambda m, args, kw: widths.append(args[0].shape[1]), with_kwargs=True)
    prompts = ["a", _prompt(2, "two shapes side by side")]
    after = 3
    seen = _steer(monkeypatch, tok, 1)
    cfg = _steered_config(tok, 1, after, cfg_scale=3.0)
    plain, plain_seen = _generate_rows(model, tok, prompts, cfg, seen)
    plain_passes = len(widths)
    widths.clear()
    fast, fast_seen = _generate_rows(model, tok, prompts, dataclasses.replace(cfg, jacobi=4), seen)
    assert fast == plain
    assert 5 in widths  # windows of the last token + 4 guesses ran
    if accepting:
        assert len(widths) < plain_passes - 6
    for x, y in zip(plain_seen[-after:], fast_seen[-after:]):  # the text after the image
        ok = torch.isfinite(x)
        torch.testing.assert_close(x[ok], y[ok], rtol=1e-4, atol=1e-4)


def _script(monkeypatch, scripts: list[list[str | int]], tok) -> list[torch.Tensor]:
    """Replace the sampler: row b emits scripts[b] in order; record each step's constrained logits."""
    seen: list[torch.Tensor] = []
    v = tok.vocab

    def sample(self, logits, state):
        seen.append(logits.clone())
        step = len(seen) - 1
        return torch.tensor([v.special(s[min(step, len(s) - 1)]) if isinstance(s[min(step, len(s) - 1)], str)
                             else s[min(step, len(s) - 1)] for s in scripts])

    monkeypatch.setattr(generator.ModalitySampler, "__call__", sample)
    return seen


def test_mrope_routing_step_equals_a_full_forward(monkeypatch, real_tokenizer, tiny_model_config):
    """<det> with its K slots (1-D, as specials) fed at once by an mrope model, next to a row that is not
    routed (padding in the same step): the logits after the step equal a full forward with
    mrope_positions over prompt + <det> + slots, the boxes are the head's on that forward's states, and
    the batch equals each row alone."""
    from omni.config.heads import DetectionHeadConfig, HeadsConfig
    from omni.decoders.routing import RoutingHeads

    tok = real_tokenizer
    v = tok.vocab
    model = _model(tiny_model_config, 0, v, kind="mrope")
    cfg = HeadsConfig(det=DetectionHeadConfig(enabled=True, n_queries=3, width=32, n_objects=4, n_layers=1,
                                              n_heads=2, ffn_dim=64))
    model.heads = RoutingHeads(cfg, tiny_model_config.dim, v.specials, v.image_grid).eval()
    words = tok.encode_text(" one two three")[:3]
    prompts = [_prompt(0, "find every red circle", None), _prompt(1, "find the shapes in this picture please", None)]
    scripts = [["<det>", *words, "<eos>"], [*words, "<det>", "<eos>"]]
    seen = _script(monkeypatch, scripts, tok)
    both = omni.generate(model, tok, prompts, max_new_tokens=8, det_threshold=0.0)
    batched = [s.clone() for s in seen]
    for b in range(2):
        alone_seen = _script(monkeypatch, [scripts[b]], tok)
        alone = omni.generate(model, tok, prompts[b], max_new_tokens=8, det_threshold=0.0)
        for x, y in zip(alone.segments, both[b].segments):
            if isinstance(x, omni.Detect):
                torch.testing.assert_close(torch.tensor(x.boxes), torch.tensor(y.boxes), rtol=1e-4, atol=1e-5)
        for step, logits in enumerate(alone_seen):
            ok = torch.isfinite(logits[0])
            torch.testing.assert_close(logits[0][ok], batched[step][b][ok], rtol=1e-4, atol=1e-4)

    det, slot = v.special("<det>"), v.special("<pad>")
    ids = torch.cat([tok.encode(prompts[0]), torch.tensor([det] + [slot] * 3)])
    routes = model.heads.find(ids[None])
    with torch.no_grad():
        full = model(ids[None], splice=model.heads.queries.splicer(routes), return_hidden=True,
                     position_ids=mrope_positions(ids, v)[0][:, None])
        flat = model(ids[None], splice=model.heads.queries.splicer(routes))
        want = model.heads.predict(full.hidden, ids[None], routes, 0.0)[0]
    ok = torch.isfinite(batched[1][0])
    torch.testing.assert_close(batched[1][0][ok], full.logits[0, -1][ok], rtol=1e-4, atol=1e-4)
    assert (flat.logits[0, -1] - full.logits[0, -1]).abs().max() > 1e-2  # 1-D positions would differ
    got = both[0].segments[[type(s).__name__ for s in both[0].segments].index("Detect")]
    torch.testing.assert_close(torch.tensor(got.boxes), torch.tensor([box for box, _ in want]), rtol=1e-4, atol=1e-5)


def test_mrope_rerank_scores_read_3d_positions(real_tokenizer, tiny_model_config):
    """Reranking scores a candidate (its image blocks, then the prompt's text) with the positions the
    model was trained with: equal to a full forward with mrope_positions, not to a 1-D one."""
    tok = real_tokenizer
    v = tok.vocab
    model = _model(tiny_model_config, 4, v, kind="mrope")
    prompts = [omni.Document([omni.Text("a blue square")])]
    g = torch.Generator().manual_seed(0)
    image = tok.encode(omni.Image(torch.rand(3, 32, 32, generator=g)), bos=False).tolist()
    rows = [tok.encode_text(" here") + image, image + image + tok.encode_text(" more text")]
    scores = generator.rerank_scores(model, tok, prompts, rows, 2)[0]
    text = tok.encode_text("a blue square")
    for k, r in enumerate(rows):
        media = [t for b in v.blocks(r) if b.closed for t in r[b.start:b.end]]
        seq = torch.tensor([v.special("<bos>"), *media, *text, v.special("<eos>")])
        a = 1 + len(media)
        with torch.no_grad():
            logp3 = model(seq[None], position_ids=mrope_positions(seq, v)[0][:, None]).logits[0].log_softmax(-1)
            logp1 = model(seq[None]).logits[0].log_softmax(-1)
        want3, want1 = (float(lp[a - 1:-1].gather(-1, seq[a:, None]).sum()) for lp in (logp3, logp1))
        assert abs(want3 - float(scores[k])) < 1e-4 and abs(want1 - float(scores[k])) > 1e-3, (want3, want1, scores)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def test_checkpoint_keeps_the_rope_settings(tmp_path, real_tokenizer, tiny_model_config):
    """A mrope_plus model's rope settings (kind, factor, sections) are written with its checkpoint and
    omni.load builds the same function: equal logits for the same 3-D positions."""
    from omni.checkpoint import save_checkpoint

    v = real_tokenizer.vocab
    rope = dict(kind="mrope_plus", factor=4.0, mrope_section=[2, 3, 3])
    model = _model(tiny_model_config, 6, v, **rope)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer=real_tokenizer)
    assert yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())["rope"]["kind"] == "mrope_plus"
    loaded, tok = omni.load(tmp_path / "ckpt", device="cpu")
    assert loaded.config.rope == RopeConfig(**rope) and loaded.config == model.config
    ids = tok.encode(_prompt())
    pos = mrope_positions(ids, v)[0][:, None]
    with torch.no_grad():
        want = model(ids[None], position_ids=pos).logits
        assert torch.equal(loaded(ids[None], position_ids=pos).logits, want)
        plain = _model(tiny_model_config, 6, v, kind="mrope", mrope_section=[2, 3, 3])  # same weights, factor 1
        assert not torch.allclose(plain(ids[None], position_ids=pos).logits, want, atol=1e-4)
