"""Unified vocabulary: id layout, Document encode/decode, malformed ids, bundles and fingerprints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import omni
from conftest import run_cli
from omni.errors import DecodeError, OmniError, VocabMismatchError
from omni.vocab import AUDIO, IMAGE, SPECIAL, TEXT, UNUSED, UnifiedVocab


def test_default_layout_is_text_specials_image_audio_padded():
    v = UnifiedVocab.default(text_size=1000, image_codes=8192, audio_codes=1024, n_reserved_specials=16)
    assert v.specials["<bos>"] == 1000 and len(v.specials) == 9 + 16
    assert v.image_offset == 1000 + 25 and v.audio_offset == 1025 + 8192
    assert v.size % 128 == 0 and v.size - 128 < 1025 + 8192 + 1024 <= v.size
    mod = v.modality_table
    assert mod[:1000].eq(TEXT).all() and mod[1000:1025].eq(SPECIAL).all()
    assert mod[1025:1025 + 8192].eq(IMAGE).all() and mod[9217:10241].eq(AUDIO).all()
    assert mod[10241:].eq(UNUSED).all()
    assert v.image_code_to_id(torch.tensor([0, 8191])).tolist() == [1025, 9216]
    assert v.id_to_code(torch.tensor([1025, 9217, 5])).tolist() == [0, 0, -1]


def test_block_grammar_reads_and_writes_blocks():
    """The one grammar (UnifiedVocab.scan/blocks/split_points/longest_block/block) that decoding,
    packing, preprocessing and generation call: every kind of piece, and the three views agree."""
    v = UnifiedVocab.default(text_size=10, image_codes=4, audio_codes=4, n_reserved_specials=0, image_grid=(2, 1))
    sp = v.specials
    img, aud = v.block("image", torch.tensor([[3], [1]])), v.block("audio", torch.tensor([0, 2, 2]))
    assert img == [sp["<boi>"], v.image_offset + 3, v.image_offset + 1, sp["<eoi>"]]
    ids = [1, 2, *img, 5, sp["<bos>"], *aud, v.image_offset, sp["<eoa>"], v.size + 5, v.size - 1, sp["<boa>"], 4]
    pieces = list(v.scan(ids))
    assert [(p.kind, p.start, p.stop, p.closed) for p in pieces] == [
        ("text", 0, 2, False), ("image", 2, 5, True), ("text", 6, 7, False), ("special", 7, 8, False),
        ("audio", 8, 12, True), ("invalid", 13, 14, False), ("invalid", 14, 15, False), ("invalid", 15, 16, False),
        ("invalid", 16, 17, False), ("audio", 17, 18, False), ("text", 18, 19, False)]
    problems = [p.problem for p in pieces if p.kind == "invalid"]
    assert "image code id" in problems[0] and "<eoa> at position 14 closes no block" in problems[1]
    assert "out of range" in problems[2] and "padding id" in problems[3]
    blocks = v.blocks(ids)
    assert [(b.kind, b.start, b.end) for b in blocks] == [("image", 2, 6), ("audio", 8, 13), ("audio", 17, 18)]
    ok = v.split_points(np.array(ids))
    inside = {k for b in blocks for k in range(b.start + 1, b.end)}  # cuts that would split a block
    assert [k for k in range(len(ids) + 1) if not ok[k]] == sorted(inside | set(range(18, len(ids) + 1)))
    assert v.longest_block(np.array(ids)) == len(aud) == 5
    assert v.position_ids(3, start=2).tolist() == [2, 3, 4]


def test_layout_is_data_explicit_code_table_inside_text_range():
    """Chameleon keeps its image codes as a permutation inside its BPE vocabulary."""
    specials = {n: 90 + i for i, n in enumerate(omni.vocab.NAMED_SPECIALS)}
    table = [50, 10, 30, 20]  # code c -> id table[c], unordered
    v = UnifiedVocab(size=128, text_size=100, specials=specials, image_codes=4, image_ids=table, image_grid=(2, 2))
    assert v.modality_table[[10, 20, 30, 50]].eq(IMAGE).all()
    assert v.modality_table[11] == TEXT
    assert v.id_to_code(torch.tensor(table)).tolist() == [0, 1, 2, 3]
    assert UnifiedVocab.from_json(json.loads(json.dumps(v.to_json()))).to_json() == v.to_json()
    with pytest.raises(OmniError, match="both special and image"):
        UnifiedVocab(size=128, text_size=100, specials=specials, image_codes=1, image_ids=[90])


def test_document_round_trip_with_every_modality(tokenizer):
    wave = torch.sin(torch.linspace(0, 400, 16000)) * torch.linspace(0, 1, 16000)
    doc = omni.Document([omni.Text("a red circle "), omni.Image(torch.rand(3, 16, 16)),
                         omni.Text("and its sound"), omni.Audio(wave, 16000)])
    ids, mod = tokenizer.encode(doc, eos=True, return_modality=True)
    v = tokenizer.vocab
    assert ids[0] == v.specials["<bos>"] and ids[-1] == v.specials["<eos>"]
    assert (mod == IMAGE).sum() == 16  # one 4x4 grid
    boi = ids.tolist().index(v.specials["<boi>"])
    assert ids[boi + 17] == v.specials["<eoi>"]
    assert (mod == AUDIO).sum() == len(tokenizer.audio.encode(wave, 16000))
    out = tokenizer.decode(ids)
    assert [type(s).__name__ for s in out] == ["Text", "Image", "Text", "Audio"]
    assert out.segments[0].text == "a red circle " and out.segments[2].text == "and its sound"
    # image: decode(encode(x)) is the double's quantization of x
    codes = tokenizer.image.encode(doc.segments[1].pixels[None])
    assert torch.equal(out.images[0].pixels, tokenizer.image.decode(codes)[0])
    assert out.audios[0].sample_rate == tokenizer.audio.sample_rate


def test_routing_segments_encode_with_their_slots_and_packing_keeps_them_whole(tokenizer):
    """Detect / Generate encode as the routing token and K slots (<pad>); decoding gives the segments
    back; the packer's split points never cut a <det> from the image before it, or a <gen> from the
    image after it (routed spans), and the longest unsplittable piece counts them."""
    v = tokenizer.vocab
    img = omni.Image(torch.rand(3, 16, 16))
    doc = omni.Document([omni.Text("find every red circle"), img, omni.Detect([(0.1, 0.2, 0.5, 0.6)]),
                         omni.Text(" now draw"), omni.Generate(), img])
    ids = tokenizer.encode(doc, bos=False, slots={"<det>": 3, "<gen>": 2}).tolist()
    det, gen, pad = v.specials["<det>"], v.specials["<gen>"], v.specials["<pad>"]
    t_det, t_gen = ids.index(det), ids.index(gen)
    assert ids[t_det + 1 : t_det + 4] == [pad] * 3 and ids[t_det + 4] != pad
    assert ids[t_gen + 1 : t_gen + 3] == [pad] * 2 and ids[t_gen + 3] == v.specials["<boi>"]
    out = tokenizer.decode(ids)
    assert [type(s).__name__ for s in out] == ["Text", "Image", "Detect", "Text", "Generate", "Image"]
    boi = ids.index(v.specials["<boi>"])
    spans = v.routed_spans(ids)
    assert spans == [(boi, t_det + 4), (t_gen, t_gen + 3 + 18)]  # an image block is 16 codes + 2
    ok = v.split_points(ids)
    assert not ok[boi + 1 : t_det + 4].any() and ok[t_det + 4]
    assert not ok[t_gen + 1 : t_gen + 21].any() and ok[t_gen]
    assert v.longest_block(ids) == t_det + 4 - boi
    assert tokenizer.encode(omni.Detect(), bos=False).tolist() == [det] + [pad] * 4  # default K (VisionLLM v2)
    with pytest.raises(OmniError, match="need 0 <= x0 < x1 <= 1"):
        omni.Detect([(0.5, 0.1, 0.2, 0.3)])


def test_images_of_other_sizes_and_modes_are_converted(tokenizer):
    from PIL import Image as PILImage

    rgb = (np.random.default_rng(0).random((30, 50, 3)) * 255).astype(np.uint8)
    for im in (PILImage.fromarray(rgb), PILImage.fromarray(rgb).convert("L"),
               PILImage.fromarray(rgb).convert("RGBA"), PILImage.fromarray(rgb).convert("P"), rgb, rgb[..., 0]):
        x = omni.Image(im)
        assert x.pixels.shape[0] == 3 and x.pixels.dtype == torch.float32
        ids = tokenizer.encode(omni.Document([x]), bos=False)
        assert len(ids) == 16 + 2
    # the one resize rule: cover the target, center-crop the longer side
    wide = torch.zeros(3, 16, 48)
    wide[:, :, 16:32] = 1.0  # white center third
    assert torch.allclose(tokenizer.image.preprocess(wide), torch.ones(3, 16, 16))


def test_bad_images_and_audio_are_clear_errors():
    with pytest.raises(OmniError, match=r"lie in \[0, 1\]"):
        omni.Image(torch.full((3, 4, 4), 2.0))
    with pytest.raises(OmniError, match="shape"):
        omni.Image(torch.zeros(5, 4, 4, 4))
    with pytest.raises(OmniError, match=r"\[T\] or \[C,T\]"):
        omni.Audio(torch.zeros(1, 2, 3), 16000)
    stereo = omni.Audio(np.stack([np.ones(10), -np.ones(10)]).astype(np.float32), 8000)
    assert stereo.wave.shape == (10,) and stereo.wave.abs().max() == 0


def _malformed(tokenizer):
    v = tokenizer.vocab
    sp = v.specials
    img = v.image_code_to_id(torch.arange(16)).tolist()
    aud = v.audio_code_to_id(torch.tensor([3, 4])).tolist()
    text = tokenizer.encode_text("ok")
    return {
        "short image block": (text + [sp["<boi>"]] + img[:15] + [sp["<eoi>"]] + text, "has 15 codes; an image needs exactly 16"),
        "unclosed image": (text + [sp["<boi>"]] + img, "is not closed"),
        "unclosed audio": ([sp["<boa>"]] + aud + text, "audio block opened at position 0 is not closed"),
        "out of range": (text + [v.size + 5] + text, f"id {v.size + 5} at position {len(text)} is out of range"),
        "negative": ([-1] + text, "out of range"),
        "stray code": (text + img[:1] + text, "outside a block"),
        "padding id": (text + [v.size - 1], "padding id"),
        "stray eoi": ([sp["<eoi>"]] + text, "closes no block"),
    }


def test_malformed_ids_strict_raises_lenient_keeps_the_rest(tokenizer):
    for name, (ids, needle) in _malformed(tokenizer).items():
        with pytest.raises(DecodeError, match=needle.replace("(", r"\(").replace("[", r"\[")):
            tokenizer.decode(ids)
        doc = tokenizer.decode(ids, strict=False)
        assert doc.dropped and needle in doc.dropped[0], name
        assert "ok" in doc.text, name  # the well-formed text survives


def test_lenient_decode_never_crashes_on_random_ids(tokenizer):
    g = torch.Generator().manual_seed(0)
    v = tokenizer.vocab
    special_ids = torch.tensor(list(v.specials.values()))
    for _ in range(200):
        ids = torch.randint(-3, v.size + 3, (40,), generator=g)
        # sprinkle block markers so blocks of every shape occur
        mask = torch.rand(40, generator=g) < 0.2
        ids[mask] = special_ids[torch.randint(0, 9, (int(mask.sum()),), generator=g)]
        tokenizer.decode(ids, strict=False)


def test_bundle_save_load_and_fingerprint(tmp_path, tokenizer, text_tokenizer, image_double):
    tokenizer.save(tmp_path / "b")
    again = omni.UnifiedTokenizer.load(tmp_path / "b")
    assert again.fingerprint == tokenizer.fingerprint
    assert again.vocab.to_json() == tokenizer.vocab.to_json()
    ids = tokenizer.encode("same ids")
    assert torch.equal(again.encode("same ids"), ids)
    again.check_compatible(tokenizer.identity())

    other = omni.UnifiedTokenizer.build(text_tokenizer, image_double)  # no audio: another layout
    with pytest.raises(VocabMismatchError, match="audio tokenizer test-envelope .* vs none"):
        other.check_compatible(tokenizer.identity(), what="checkpoint runs/x")
    # a tokenizer file changed behind the bundle's back is refused at load
    (tmp_path / "b" / "image" / "config.json").write_text('{"grid": 4, "cell": 4, "levels": 3}')
    with pytest.raises(VocabMismatchError, match="image tokenizer files changed"):
        omni.UnifiedTokenizer.load(tmp_path / "b")


def test_missing_or_broken_bundle(tmp_path):
    with pytest.raises(OmniError, match="vocab.json is missing"):
        omni.UnifiedTokenizer.load(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(OmniError, match="not valid JSON"):
        omni.UnifiedTokenizer.load(tmp_path)


def test_cli_bundle_encode_decode_and_refusal(tmp_path, text_tokenizer, image_double, audio_double):
    from omni.tokenizers.base import save_tokenizer

    save_tokenizer(text_tokenizer, tmp_path / "text")
    save_tokenizer(image_double, tmp_path / "image")
    save_tokenizer(audio_double, tmp_path / "audio")
    rc, out, err = run_cli("tokenizer", "bundle", "--text", tmp_path / "text", "--image", tmp_path / "image",
                           "--audio", tmp_path / "audio", "--out", tmp_path / "full")
    assert rc == 0, err
    rc, _, err = run_cli("tokenizer", "bundle", "--text", tmp_path / "full", "--out", tmp_path / "textonly")
    assert rc == 0, err  # a bundle works as --text: its text/ folder is taken
    # one way to set a thing: the config key (tokenizer.n_reserved_specials), no flag of its own
    rc, _, err = run_cli("tokenizer", "bundle", "--text", tmp_path / "full", "--out", tmp_path / "r4",
                         "n_reserved_specials=4")
    assert rc == 0, err
    assert omni.UnifiedTokenizer.load(tmp_path / "r4").vocab.n_specials == 9 + 4
    rc, _, err = run_cli("tokenizer", "bundle", "--text", tmp_path / "full", "--out", tmp_path / "bad",
                         "n_reserved_specials=-1")
    assert rc == 2 and "n_reserved_specials=-1 is invalid" in err
    rc, _, err = run_cli("tokenizer", "bundle", "--text", tmp_path / "full", "--out", tmp_path / "bad",
                         "--reserved-specials", "4")
    assert rc == 2 and "unrecognized arguments" in err

    from PIL import Image as PILImage

    PILImage.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "black.png")
    rc, out, err = run_cli("tokenizer", "encode", "--tokenizer", tmp_path / "full", "a black square:",
                           f"@image:{tmp_path / 'black.png'}", "--out", tmp_path / "ids.json")
    assert rc == 0, err
    rc, out, err = run_cli("tokenizer", "decode", tmp_path / "ids.json", "--tokenizer", tmp_path / "full")
    assert rc == 0 and out.splitlines() == ["a black square:", "[image (3, 16, 16)]"], (out, err)

    rc, out, err = run_cli("tokenizer", "decode", tmp_path / "ids.json", "--tokenizer", tmp_path / "textonly")
    assert rc == 2 and "made with another tokenizer bundle" in err and "image tokenizer" in err

    # malformed ids: strict decoding is a clear error (exit 2), --lenient keeps the rest
    ids = json.loads((tmp_path / "ids.json").read_text())
    ids["ids"] = ids["ids"][:-3]  # cut the image block short, drop <eoi>
    (tmp_path / "cut.json").write_text(json.dumps(ids))
    rc, out, err = run_cli("tokenizer", "decode", tmp_path / "cut.json", "--tokenizer", tmp_path / "full")
    assert rc == 2 and "image block opened at position" in err and "is not closed" in err
    rc, out, err = run_cli("tokenizer", "decode", tmp_path / "cut.json", "--tokenizer", tmp_path / "full", "--lenient")
    assert rc == 0 and out.strip() == "a black square:" and "dropped: image block" in err

    (tmp_path / "junk.png").write_bytes(b"not an image")
    for args, needle in [
        (["bundle", "--text", tmp_path / "nope", "--out", tmp_path / "x"], "tokenizer folder not found"),
        (["bundle", "--text", tmp_path / "image", "--out", tmp_path / "x"], "holds the image tokenizer, expected the text"),
        (["encode", "--tokenizer", tmp_path / "full", "@image:" + str(tmp_path / "junk.png")], "cannot read image"),
        (["encode", "--tokenizer", tmp_path / "full", "@audio:" + str(tmp_path / "junk.png")], "cannot read audio"),
        (["encode", "--tokenizer", tmp_path / "full", "@image:/nonexistent.png"], "image file not found"),
        (["decode", tmp_path / "black.png", "--tokenizer", tmp_path / "full"], "is not an ids file"),
    ]:
        rc, out, err = run_cli("tokenizer", *args)
        assert rc == 2 and needle in err and "Traceback" not in err, (args, err)


def test_transparency_is_composited_onto_white():
    from PIL import Image as PILImage

    clear = np.zeros((5, 6, 4), np.uint8)  # fully transparent black
    for x in (PILImage.fromarray(clear, "RGBA"), clear, PILImage.fromarray(clear, "RGBA").convert("LA")):
        assert torch.equal(omni.Image(x).pixels, torch.ones(3, 5, 6))
    half = np.full((2, 3, 4), 255, np.uint8)
    half[..., :3] = 0
    half[..., 3] = 0  # transparent over white -> white; opaque black stays black
    half[0, 0, 3] = 255
    px = omni.Image(half).pixels
    assert px[:, 0, 0].tolist() == [0, 0, 0] and px[:, 1, 1].tolist() == [1, 1, 1]
