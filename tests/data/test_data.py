"""Data pipeline: real shards -> preprocess (2 workers) -> packed sequences -> un-packed documents."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from corpus import mixed_samples, write_shards

from conftest import run_cli
from omni.config.data import DataConfig, PreprocessConfig
from omni.errors import OmniError

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def real_samples():
    return mixed_samples()


@pytest.fixture(scope="module")
def tokenizer(real_tokenizer):
    """The real image and audio tokenizers (tiny, random init): the pipeline meets what users run."""
    return real_tokenizer


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("bundle")
    tokenizer.save(d)
    return d


@pytest.mark.dist
def test_end_to_end_two_workers_unpack_reproduces_every_document(tmp_path, tokenizer, bundle_dir, real_samples):
    from omni.data.packing import BlendedSequences, DocumentPacker, TokenDataset, unpack
    from omni.data.preprocess import encode_sample, preprocess
    from omni.data.samples import parse_sample

    shards = write_shards(real_samples, tmp_path / "raw", per_shard=5)
    summary = preprocess([str(tmp_path / "raw")], bundle_dir, tmp_path / "tok", workers=2, progress=False)
    assert summary["manifest"] and summary["processed"] == len(shards)

    ds = TokenDataset(tmp_path / "tok", tokenizer)
    assert len(ds) == len(real_samples)
    totals = ds.manifest["totals"]
    assert totals["skipped"] == {} and totals["documents"] == len(real_samples)
    assert totals["tokens"]["image"] == (6 + 4 * 2) * 16  # 14 images of 4x4 codes
    assert totals["tokens"]["audio"] > 0 and totals["tokens"]["text"] > 0

    # The stored documents are exactly what tokenizing each sample in-process gives, in shard order.
    cfg = PreprocessConfig()
    expected = []
    for s in real_samples:
        ids, mask, _ = encode_sample(tokenizer, parse_sample(s, cfg.pair_order, cfg.seed), cfg)
        expected.append((ids, mask))
    for i, (ids, mask) in enumerate(expected):
        got_ids, got_mask = ds.document(i)
        assert np.array_equal(got_ids, ids) and np.array_equal(got_mask, mask), i
    # prompt segments carry no loss
    doc_ids, doc_mask = ds.document(len(real_samples) - 1)
    n_prompt = len(tokenizer.encode_text("Describe the picture, then read the caption aloud."))
    assert doc_mask[1 : 1 + n_prompt].sum() == 0 and doc_mask[1 + n_prompt :].all()

    # Pack one full epoch with sequences shorter than most documents, then un-pack.
    seq_len = 128
    packer = DocumentPacker(ds, seq_len, seed=3, vocab=tokenizer.vocab)
    stream = BlendedSequences([packer])
    seqs = []
    while packer.epoch == 0:
        seqs.append(next(stream))
    docs = {k: v for k, v in unpack(seqs).items() if k[1] == 0}  # epoch 0 (the last sequence may start epoch 1)
    assert sorted(docs) == [(0, 0, i) for i in range(len(ds))]
    for (_, _, i), toks in docs.items():
        assert np.array_equal(toks, ds.document(i)[0]), f"document {i} differs after packing"
    v = tokenizer.vocab
    n_split = 0
    for s in seqs:
        assert s.input_ids.shape == (seq_len,) and np.array_equal(s.input_ids[1:], s.labels[:-1])
        for _, _, doc, start, length in s.spans:
            blocks = [(b.start, b.end) for b in v.blocks(ds.document(doc)[0])]  # the grammar's blocks
            for cut in (start, start + length):
                assert not any(a < cut < e for a, e in blocks), "a document was split inside an image/audio block"
            n_split += start > 0
        # positions restart per piece; loss never crosses a piece boundary
        for k in range(1, seq_len):
            if s.doc_ids[k] != s.doc_ids[k - 1]:
                assert s.position_ids[k] == 0 and s.loss_mask[k - 1] == 0
    assert n_split > 0  # the test did exercise splitting


def test_stream_is_deterministic_resumable_and_rank_sharded(tmp_path, tokenizer, bundle_dir, real_samples):
    from omni.data.packing import build_stream
    from omni.data.preprocess import preprocess

    half = len(real_samples) // 2
    for name, part in (("a", real_samples[:half]), ("b", real_samples[half:])):
        write_shards(part, tmp_path / f"raw_{name}", per_shard=8)
        preprocess([str(tmp_path / f"raw_{name}")], bundle_dir, tmp_path / name, progress=False)
    cfg = DataConfig(paths=[str(tmp_path / "a"), str(tmp_path / "b")], weights=[3, 1], seq_len=160, seed=7)

    def take(stream, n):
        return [next(stream) for _ in range(n)]

    ref = take(build_stream(cfg, tokenizer), 24)
    again = take(build_stream(cfg, tokenizer), 24)
    assert all(np.array_equal(x.input_ids, y.input_ids) and x.spans == y.spans for x, y in zip(ref, again))
    assert [s.spans[0][0] for s in ref].count(0) == 18  # weights 3:1 over 24 sequences

    s = build_stream(cfg, tokenizer)
    take(s, 10)
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON round trip (checkpoints)
    resumed = build_stream(cfg, tokenizer)
    resumed.load_state_dict(state)
    assert all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(take(resumed, 14), ref[10:]))

    r0, r1 = build_stream(cfg, tokenizer, rank=0, world=2), build_stream(cfg, tokenizer, rank=1, world=2)
    assert [x.spans for x in take(r0, 12)] == [x.spans for x in ref[0::2]]
    assert [x.spans for x in take(r1, 12)] == [x.spans for x in ref[1::2]]

    batch = build_stream(cfg, tokenizer).next_batch(4)
    assert batch["input_ids"].shape == (4, 160) and batch["loss_mask"].dtype.is_floating_point


def test_broken_samples_are_counted_by_reason(tmp_path, bundle_dir, real_samples):
    good = real_samples * 2  # 44 good samples
    pic = good[0]["png"]
    broken = [
        {"__key__": "bad_img", "png": pic[: len(pic) // 2], "txt": "truncated png"},
        {"__key__": "bad_img2", "jpg": b"definitely not a jpeg", "txt": "garbage"},
        {"__key__": "bad_wav", "wav": b"RIFF\x00\x00garbage", "txt": "undecodable audio"},
        {"__key__": "bad_json", "json": b"{not json", "0.png": pic},
        {"__key__": "missing", "json": json.dumps({"segments": [{"image": "7.png"}]}).encode()},
    ]
    broken += [{"__key__": "bad_utf8", "txt": b"\xff\xfe caf\xe9"}]
    samples = []
    for i, s in enumerate(good):
        samples.append({**s, "__key__": f"{s['__key__']}_{i}"})
        if i % 8 == 7 and broken:
            samples.append(broken.pop())
    samples += broken
    assert len(samples) == 50  # 6 of 50 broken (12%)
    write_shards(samples, tmp_path / "raw", per_shard=10)
    rc, out, err = run_cli("data", "preprocess", "--input", tmp_path / "raw", "--tokenizer", bundle_dir,
                           "--out", tmp_path / "tok", "--quiet")
    # 12% skipped is over data.preprocess.max_skip_fraction (0.1): exit 2 naming each reason's count,
    # after the manifest was written; the same command with a higher limit accepts the folder as it is
    assert rc == 2 and "skipped 12.0% of 50 samples" in err and "2 corrupt_image" in err, err
    assert (tmp_path / "tok" / "manifest.json").is_file()
    rc, out, err = run_cli("data", "preprocess", "--input", tmp_path / "raw", "--tokenizer", bundle_dir,
                           "--out", tmp_path / "tok", "--quiet", "max_skip_fraction=0.2")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert manifest["totals"]["skipped"] == {"bad_json": 1, "bad_text": 1, "corrupt_audio": 1,
                                             "corrupt_image": 2, "missing_member": 1}
    assert manifest["totals"]["documents"] == 44 and manifest["totals"]["samples"] == 50
    logged = [row for n in sorted((tmp_path / "tok" / "shards").glob("*.json"))
              for row in json.loads(n.read_text())["skipped_samples"]]
    assert sorted(k for k, _, _ in logged) == ["bad_img", "bad_img2", "bad_json", "bad_utf8", "bad_wav", "missing"]


def test_truncated_shard_keeps_what_was_read(tmp_path, bundle_dir, real_samples):
    from omni.data.preprocess import preprocess

    (p,) = write_shards(real_samples[:10], tmp_path / "raw", per_shard=10)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    preprocess([str(p)], bundle_dir, tmp_path / "tok", PreprocessConfig(max_skip_fraction=1.0), progress=False)
    m = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert m["totals"]["skipped"] == {"corrupt_shard": 1}
    assert 0 < m["totals"]["documents"] < 10
    # a shard whose every sample is lost writes no document: that fails whatever the limit
    p.write_bytes(data[:700])
    with pytest.raises(OmniError, match="wrote no document"):
        preprocess([str(p)], bundle_dir, tmp_path / "none", PreprocessConfig(max_skip_fraction=1.0), progress=False)
    assert (tmp_path / "none" / "manifest.json").is_file()


def test_a_shard_lost_whole_counts_against_the_skip_limit(tmp_path, bundle_dir, real_samples):
    """A shard unreadable from its start adds no sample to the skipped share; it is counted by shards:
    one lost of three is above max_skip_fraction=0.1 (it used to pass with exit 0)."""
    from omni.data.preprocess import preprocess

    paths = write_shards(real_samples[:12], tmp_path / "raw", per_shard=4)
    assert len(paths) == 3
    paths[0].write_bytes(b"\x00" * 10)  # not a tar at all
    with pytest.raises(OmniError, match=r"lost 1 of 3 shards to corruption \(33.3%\), above data.preprocess"):
        preprocess([str(q) for q in paths], bundle_dir, tmp_path / "tok", PreprocessConfig(), progress=False)
    out = preprocess([str(q) for q in paths], bundle_dir, tmp_path / "ok", PreprocessConfig(max_skip_fraction=0.5),
                     progress=False)
    assert out["documents"] == 8


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.dist
def test_killed_preprocess_resumes_to_identical_output(tmp_path, bundle_dir, real_samples):
    write_shards(real_samples * 3, tmp_path / "raw", per_shard=3)  # 22 shards
    code = "import sys; from omni.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["data", "preprocess", "--input", str(tmp_path / "raw"), "--tokenizer", str(bundle_dir), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run([sys.executable, "-c", code, *args, "--out", str(tmp_path / "full")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert full.returncode == 0, full.stderr

    proc = subprocess.Popen([sys.executable, "-c", code, *args, "--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / "killed" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*.json"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(shards.glob("*.json")))
    assert 3 <= done < 22, f"kill landed at {done} shards: not midway"
    assert not (tmp_path / "killed" / "manifest.json").exists()
    # what a kill between an atomic write's temp file and its rename leaves (the kill above may too)
    (shards / ".00000-part-000.json.x1y2z3.tmp").write_text('{"name": "00000-part-000"')
    rerun = subprocess.run([sys.executable, "-c", code, *args, "--out", str(tmp_path / "killed")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done} already done" in rerun.stdout
    assert _tree(tmp_path / "killed") == _tree(tmp_path / "full")


def test_bad_preprocess_inputs(tmp_path, bundle_dir, real_samples, text_tokenizer):
    import omni

    write_shards(real_samples[:2], tmp_path / "raw", per_shard=2)
    (tmp_path / "notatar.txt").write_text("x")
    cases = [
        (["--input", tmp_path / "none*.tar", "--tokenizer", bundle_dir], "no shard matches"),
        (["--input", tmp_path / "notatar.txt", "--tokenizer", bundle_dir], "not a tar shard"),
        (["--input", tmp_path / "raw", "--tokenizer", tmp_path], "vocab.json is missing"),
        (["--input", tmp_path / "raw", "--tokenizer", bundle_dir, "--rank", "2", "--world", "2"], "0 <= rank < world"),
        (["--input", tmp_path / "raw", "--tokenizer", bundle_dir, "pair_order=sideways"], "'media_first', 'text_first', 'random'"),
    ]
    for extra, needle in cases:
        rc, out, err = run_cli("data", "preprocess", *extra, "--out", tmp_path / "o", "--quiet")
        assert rc == 2 and needle in err and "Traceback" not in err, (extra, err)
    # a dataset made with one bundle is refused under another
    from omni.data.packing import TokenDataset
    from omni.data.preprocess import preprocess

    preprocess([str(tmp_path / "raw")], bundle_dir, tmp_path / "tok", progress=False)
    other = omni.UnifiedTokenizer.build(text_tokenizer)
    with pytest.raises(omni.errors.VocabMismatchError, match="token dataset"):
        TokenDataset(tmp_path / "tok", other)
    # resuming into a folder started with other options is refused
    rc, out, err = run_cli("data", "preprocess", "--input", tmp_path / "raw", "--tokenizer", bundle_dir,
                           "--out", tmp_path / "tok", "--quiet", "pair_order=text_first")
    assert rc == 2 and "other config" in err
    # seq_len shorter than an image block
    with pytest.raises(omni.OmniError, match="they are never split"):
        from omni.data.packing import build_stream

        build_stream(DataConfig(paths=[str(tmp_path / "tok")], seq_len=8), omni.UnifiedTokenizer.load(bundle_dir))


def test_skip_reasons_are_one_list_documented_in_docs_data_md():
    """omni.media.REASONS is the one list of skip reasons (preprocess and the tokenizer trainers);
    docs/data.md's table names exactly those."""
    import re

    from omni.media import REASONS

    table = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text().split("## Bad samples", 1)[1]
    documented = re.findall(r"^\| `(\w+)` \|", table.split("\n## ", 1)[0], re.M)
    assert sorted(documented) == sorted(REASONS)


@pytest.mark.parametrize("cut", ["inside a member", "at a member boundary", "inside a header"])
def test_shard_cut_off_anywhere_counts_one_corrupt_shard_and_keeps_whole_samples(tmp_path, cut):
    """An interrupted copy: Python's tarfile reads a stream cut at a member boundary or inside a
    header as a shorter, valid archive, and one cut inside a member still hands over the sample it
    broke. The one shard reader counts each as corrupt_shard and keeps only the samples before it."""
    import tarfile

    from omni.media import SkipReport, iter_samples

    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            for ext, data in (("txt", f"caption {i}".encode()), ("bin", bytes(range(256)) * 12)):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        second_bin = [m for m in tar.getmembers() if m.name == "0001.bin"][0]
    data = path.read_bytes()
    end = {"inside a member": second_bin.offset_data + 1000,  # 0001.bin loses its tail
           "at a member boundary": second_bin.offset,  # 0001 has its .txt, not its .bin
           "inside a header": second_bin.offset + 100}[cut]
    path.write_bytes(data[:end])
    report = SkipReport()
    assert [s["__key__"] for s in iter_samples(path, report)] == ["0000"]
    assert dict(report.skipped) == {"corrupt_shard": 1}
    path.write_bytes(data)  # the whole shard: every sample, no skip
    report = SkipReport()
    assert [s["__key__"] for s in iter_samples(path, report)] == ["0000", "0001", "0002"] and not report.skipped


def test_tokenizer_refusal_skips_but_a_bug_stops_the_run_naming_the_sample(tmp_path, bundle_dir, monkeypatch):
    """OmniError / ValueError from a tokenizer: the content was refused, the sample is a counted
    tokenize_error. Any other exception is a programming error: the run stops with its traceback
    and the sample's key instead of turning every sample into a skip and exiting 0."""
    from omni.bundle import UnifiedTokenizer
    from omni.data.preprocess import preprocess
    from omni.errors import OmniError

    samples = [{"__key__": f"s{i}", "txt": text.encode()} for i, text in enumerate(["fine", "refuse me", "fine too"])]
    write_shards(samples, tmp_path / "raw", per_shard=3)
    real = UnifiedTokenizer.encode

    def refusing(self, doc, *a, **kw):
        if "refuse" in doc.text:
            raise OmniError("content refused")
        return real(self, doc, *a, **kw)

    monkeypatch.setattr(UnifiedTokenizer, "encode", refusing)
    preprocess([str(tmp_path / "raw")], bundle_dir, tmp_path / "ok", PreprocessConfig(max_skip_fraction=0.5),
               progress=False)
    m = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert m["totals"]["skipped"] == {"tokenize_error": 1} and m["totals"]["documents"] == 2

    def buggy(self, doc, *a, **kw):
        if "refuse" in doc.text:
            return 1 / 0
        return real(self, doc, *a, **kw)

    monkeypatch.setattr(UnifiedTokenizer, "encode", buggy)
    with pytest.raises(RuntimeError, match=r"preprocessing sample 's1' of .*part-000.tar failed with ZeroDivisionError"):
        preprocess([str(tmp_path / "raw")], bundle_dir, tmp_path / "bug", progress=False)
    assert not (tmp_path / "bug" / "manifest.json").exists()


def test_a_rank_whose_every_shard_is_corrupt_exits_2_naming_reasons_and_keys(tmp_path, bundle_dir, real_samples):
    """Issue #20, bug 2: every shard of a Slurm array task unreadable: the task used to exit 0 with
    "0 documents from 0 samples" (only the rank writing the manifest checked the run). Now the rank
    fails itself, naming each reason's count and the first keys; a run with no readable shard at
    all names them too."""
    bad = tmp_path / "raw" / "part-000.tar"
    write_shards(real_samples[:4], tmp_path / "raw", per_shard=2)  # part-000 (rank 0), part-001 (rank 1)
    bad.write_bytes(b"not a tar archive at all" * 40)
    common = ["data", "preprocess", "--input", tmp_path / "raw", "--tokenizer", bundle_dir, "--out",
              tmp_path / "tok", "--quiet", "--world", "2"]
    rc, out, err = run_cli(*common, "--rank", "0")
    assert rc == 2, (out, err)
    assert "rank 0/2" in err and "wrote no document" in err and "1 corrupt_shard (part-000.tar; first: " in err, err
    assert "manifest.json is not written yet" in err and len(err.strip().splitlines()) == 1
    rc, out, err = run_cli(*common, "--rank", "0")  # the rerun of the failed task fails again
    assert rc == 2 and "1 corrupt_shard (part-000.tar; first: " in err, err
    rc, out, err = run_cli(*common, "--rank", "1")  # the good rank writes the manifest; the run lost half its shards
    assert rc == 2 and "lost 1 of 2 shards to corruption" in err, err
    assert (tmp_path / "tok" / "manifest.json").is_file()
    rc, out, err = run_cli(*common, "--rank", "1", "max_skip_fraction=0.5")  # accepted with a higher limit
    assert rc == 0, err

    for i in (1, 2):  # a single-rank run over shards that are all unreadable
        (tmp_path / "raw" / f"part-00{i}.tar").write_bytes(b"")
    (tmp_path / "raw" / "part-001.tar").write_bytes(b"\0" * 100)
    rc, out, err = run_cli("data", "preprocess", "--input", tmp_path / "raw" / "part-000.tar", "--input",
                           tmp_path / "raw" / "part-001.tar", tmp_path / "raw" / "part-002.tar", "--tokenizer",
                           bundle_dir, "--out", tmp_path / "all_bad", "--quiet")
    assert rc == 2 and "wrote no document: 0 samples read from 3 shard(s)" in err, err
    assert "3 corrupt_shard (part-000.tar, part-001.tar, part-002.tar; first: " in err, err


def test_cli_prints_skip_reasons_with_counts_and_first_keys(tmp_path, bundle_dir, real_samples):
    """Issue #20, friction 14: a run that skips a few samples lists each reason's count and first
    keys on stdout (with --quiet too), not only in manifest.json."""
    pic = real_samples[0]["png"]
    samples = [{**s, "__key__": f"{s['__key__']}_{i}"} for i, s in enumerate(real_samples * 2)]  # 44 good
    samples[5:5] = [{"__key__": "bad_img", "png": pic[: len(pic) // 2], "txt": "truncated png"}]
    samples[30:30] = [{"__key__": "bad_img2", "jpg": b"not a jpeg", "txt": "garbage"},
                      {"__key__": "bad_utf8", "txt": b"\xff\xfe caf\xe9"}]
    write_shards(samples, tmp_path / "raw", per_shard=16)
    rc, out, err = run_cli("data", "preprocess", "--input", tmp_path / "raw", "--tokenizer", bundle_dir,
                           "--out", tmp_path / "tok", "--quiet")
    assert rc == 0, err
    assert "44 documents from 47 samples" in out, out
    assert "  bad_text: 1 (bad_utf8)" in out and "  corrupt_image: 2 (bad_img, bad_img2)" in out, out
    assert "wrote " in out and "manifest.json: 44 documents from 47 samples" in out, out
