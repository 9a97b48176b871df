"""Routed samples through the data pipeline: `det` / `gen` JSON segments are parsed, written with their
K slots and their ground-truth boxes (a sidecar the token dataset reads back per document), bad ones
are skipped with a reason, and packing never cuts a routed span (a <det> from its image, a <gen>
from the image it makes)."""

from __future__ import annotations

import json

import numpy as np
from corpus import png_bytes, write_shards

from omni.config.data import PreprocessConfig


def _samples() -> list[dict]:
    rng = np.random.default_rng(0)
    pics = [png_bytes((rng.random((16, 16, 3)) * 255).astype(np.uint8)) for _ in range(4)]
    out = []
    for i in range(6):
        boxes = [[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.9]][: i % 3]  # 0, 1 or 2 boxes (0: nothing matches)
        segs = [{"text": f"find every shape number {i}", "prompt": True}, {"image": "0.png"},
                {"det": {"boxes": boxes, "phrase": "every shape"}}]
        out.append({"__key__": f"det{i}", "json": json.dumps({"segments": segs}).encode(), "0.png": pics[i % 4]})
    for i in range(3):
        segs = [{"text": f"a picture {i}"}, {"gen": "0.png"}, {"text": "done"}]
        out.append({"__key__": f"gen{i}", "json": json.dumps({"segments": segs}).encode(), "0.png": pics[i]})
    bad = [
        ({"segments": [{"text": "no image"}, {"det": {"boxes": []}}]}, "bad0"),
        ({"segments": [{"image": "0.png"}, {"det": {"boxes": [[0.5, 0.5, 0.2, 0.9]]}}]}, "bad1"),
        ({"segments": [{"text": "x"}, {"gen": "9.png"}]}, "bad2"),
    ]
    out += [{"__key__": k, "json": json.dumps(spec).encode(), "0.png": pics[0]} for spec, k in bad]
    return out


def test_routed_samples_keep_their_boxes_and_packing_keeps_spans_whole(tmp_path, real_tokenizer):
    from omni.data.packing import DocumentPacker, TokenDataset
    from omni.data.preprocess import preprocess

    real_tokenizer.save(tmp_path / "bundle")
    write_shards(_samples(), tmp_path / "raw", per_shard=4)
    cfg = PreprocessConfig(det_queries=3, gen_queries=5, max_skip_fraction=0.5)
    summary = preprocess([str(tmp_path / "raw")], tmp_path / "bundle", tmp_path / "tok", cfg, progress=False)
    assert summary["documents"] == 9
    manifest = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert manifest["totals"]["skipped"] == {"bad_json": 2, "missing_member": 1}, manifest["totals"]
    assert sum(e.get("routed", {}).get("<det>", 0) for e in manifest["shards"]) == 6
    assert sum(e.get("routed", {}).get("<gen>", 0) for e in manifest["shards"]) == 3

    ds = TokenDataset(tmp_path / "tok", real_tokenizer)
    v = real_tokenizer.vocab
    det, gen, pad = v.special("<det>"), v.special("<gen>"), v.special("<pad>")
    found = {}
    for i in range(len(ds)):
        ids, mask = ds.document(i)
        if det in ids:
            t = int(np.flatnonzero(ids == det)[0])
            assert ids[t + 1 : t + 4].tolist() == [pad] * 3 and ids[t + 4] != pad
            (boxes,) = ds.det_boxes(i)
            found[len(boxes)] = found.get(len(boxes), 0) + 1
        elif gen in ids:
            t = int(np.flatnonzero(ids == gen)[0])
            assert ids[t + 1 : t + 6].tolist() == [pad] * 5 and ids[t + 6] == v.special("<boi>")
            assert mask[t] == 1 and not mask[t + 6 : t + 24].any()  # <gen> is a target; its image is not
            assert ds.det_boxes(i) == []
    assert found == {0: 2, 1: 2, 2: 2}  # the empty box lists are kept: "nothing matches" is a target too
    with_two = next(i for i in range(len(ds)) if ds.det_boxes(i) and len(ds.det_boxes(i)[0]) == 2)
    np.testing.assert_allclose(ds.det_boxes(with_two)[0], [[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.9]])

    # Packing at a length that forces splits: no routed span is ever cut.
    longest = ds.max_block
    packer = DocumentPacker(ds, seq_len=longest + 7, seed=0, vocab=v)
    for _ in range(40):
        row = packer.next()
        for _, _, doc, start, length in row.spans:
            full, _ = ds.document(doc)
            for s, e in v.routed_spans(full):
                inside = start <= s and e <= start + length
                outside = e <= start or s >= start + length
                assert inside or outside, (doc, start, length, s, e)
