"""`omni train` with train.stage=dpo: preference pairs through preprocess, packing that keeps the two
sides apart, response-only scoring, a frozen reference, exact resume and 2-process parity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from corpus import pydoc_topics, write_text_tokens
from processes import torchrun_train

from conftest import run_cli
from omni.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def _pair(key: str, prompt: str, chosen: str, rejected: str) -> dict:
    doc = {"prompt": [{"text": prompt}], "chosen": [{"text": chosen}], "rejected": [{"text": rejected}]}
    return {"__key__": key, "json": json.dumps(doc).encode()}


def _pairs(topics: list[str], prefix: str) -> list[dict]:
    """Prompt: the start of a topic; chosen: its true continuation; rejected: another topic's text."""
    return [_pair(f"{prefix}{i:03d}", t[:60], t[60:100], topics[(i + 1) % len(topics)][60:100])
            for i, t in enumerate(topics)]


def _write(samples: list[dict], folder: Path) -> Path:
    import webdataset as wds

    folder.mkdir(parents=True)
    with wds.TarWriter(str(folder / "pairs-000.tar")) as w:
        for s in samples:
            w.write(s)
    return folder


@pytest.fixture(scope="module")
def pref_run(tmp_path_factory, text_tokenizer, one_thread):
    """A text bundle; preference datasets (24 training pairs, 8 held-out pairs of other topics, plus
    bad samples among the training ones); a 3-step base checkpoint to start DPO from."""
    import omni
    from omni.data.preprocess import preprocess
    from omni.train.loop import train

    root = tmp_path_factory.mktemp("dpo")
    omni.UnifiedTokenizer.build(text_tokenizer).save(root / "tok")
    topics = [t for t in pydoc_topics() if len(t) > 120]
    bad = [
        {"__key__": "bad-norejected", "json": json.dumps({"prompt": [], "chosen": [{"text": "x"}]}).encode()},
        _pair("bad-same", "Say it.", " the same", " the same"),
        {"__key__": "bad-det", "json": json.dumps({"prompt": [{"text": "find"}], "chosen": [{"text": "a"}],
                                                    "rejected": [{"det": {"boxes": []}}]}).encode()},
    ]
    _write(_pairs(topics[:24], "p") + bad, root / "pairs_raw")
    _write(_pairs(topics[24:32], "h"), root / "heldout_raw")
    from omni.config.data import PreprocessConfig

    preprocess([str(root / "pairs_raw")], root / "tok", root / "pairs", PreprocessConfig(max_skip_fraction=0.2),
               progress=False)
    preprocess([str(root / "heldout_raw")], root / "tok", root / "heldout", progress=False)
    write_text_tokens(root / "tok", root / "text", [t[:400] for t in topics[:24]])
    train(load_config(RunConfig, _recipe(root, root / "base", stage="pretrain", steps=3, init_from="",
                                         paths=[str(root / "text")])), resume="none", progress=False)
    return root


def _recipe(root: Path, out: Path, paths=None, eval_paths=(), **train) -> Path:
    tiny = yaml.safe_load((ROOT / "recipes" / "models" / "tiny.yaml").read_text())
    cfg = {"seed": 3, "model": tiny["model"],
           "data": {"tokenizer": str(root / "tok"), "paths": paths or [str(root / "pairs")],
                    "eval_paths": list(eval_paths), "seq_len": 255, "seed": 5},
           "train": {"out": str(out), "stage": "dpo", "init_from": str(root / "base"), "steps": 6,
                     "micro_batch_size": 2, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 1, "log_every": 1,
                     "save_every": 100, "tensorboard": False, **train}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_preprocess_writes_each_pair_as_two_documents_and_skips_bad_pairs(pref_run):
    from omni.bundle import UnifiedTokenizer
    from omni.data.packing import TokenDataset

    tok = UnifiedTokenizer.load(pref_run / "tok")
    ds = TokenDataset(pref_run / "pairs", tok)
    totals = ds.manifest["totals"]
    assert ds.pairs == 24 and len(ds) == 48
    assert totals["skipped"] == {"bad_pair": 3}
    topics = [t for t in pydoc_topics() if len(t) > 120]
    order = sorted(range(24), key=lambda i: f"p{i:03d}")  # the tar's order is the keys' order
    for j in (0, 5):
        i = order[j]
        (c_ids, c_mask), (r_ids, r_mask) = ds.document(2 * j), ds.document(2 * j + 1)
        prompt = tok.encode_text(topics[i][:60])
        for ids, mask, response in ((c_ids, c_mask, topics[i][60:100]), (r_ids, r_mask, topics[(i + 1) % 24][60:100])):
            n = 1 + len(prompt)  # <bos> and the prompt: no loss
            assert ids[1:n].tolist() == prompt and not mask[:n].any()
            assert ids[n:-1].tolist() == tok.encode_text(response) and mask[n:].all()  # response and <eos>


def test_prefix_sides_get_no_eos_and_an_ended_side_may_be_empty(pref_run, tmp_path):
    """IterDPO's prefix pairs: a side with ``*_ends: false`` is a prefix (no <eos>); a side that ends
    may hold nothing but <eos> (the output stopped at once)."""
    from omni.bundle import UnifiedTokenizer
    from omni.data.packing import TokenDataset
    from omni.data.preprocess import preprocess

    tok = UnifiedTokenizer.load(pref_run / "tok")
    doc = {"prompt": [{"text": "Go on:"}], "chosen": [{"text": " one two"}], "rejected": [],
           "chosen_ends": False, "rejected_ends": True}
    _write([{"__key__": "k0", "json": json.dumps(doc).encode()}], tmp_path / "raw")
    preprocess([str(tmp_path / "raw")], pref_run / "tok", tmp_path / "tokens", progress=False)
    ds = TokenDataset(tmp_path / "tokens", tok)
    (c, cm), (r, rm) = ds.document(0), ds.document(1)
    bos, eos, prompt = tok.vocab.special("<bos>"), tok.vocab.special("<eos>"), tok.encode_text("Go on:")
    assert c.tolist() == [bos, *prompt, *tok.encode_text(" one two")] and cm[-1] == 1  # no <eos>
    assert r.tolist() == [bos, *prompt, eos] and rm.tolist() == [0] * (1 + len(prompt)) + [1]


def test_pair_data_and_stages_must_match(pref_run):
    rc, _, err = run_cli("train", _recipe(pref_run, pref_run / "x1"), "--quiet", "train.stage=pretrain")
    assert rc == 2 and "holds preference pairs" in err and "train.stage=dpo" in err and "Traceback" not in err
    rc, _, err = run_cli("train", _recipe(pref_run, pref_run / "x2", paths=[str(pref_run / "text")]), "--quiet")
    assert rc == 2 and "not preference pairs" in err
    for override, needle in [("train.init_from=''", "train.stage=dpo needs train.init_from"),
                             ("train.dpo.beta=0", "train.dpo.beta=0.0 is invalid"),
                             ("train.stage=ppo", "'pretrain', 'sft', 'dpo'"),
                             ("data.seq_len=40", "pairs are longer than a row"),
                             ("parallel.backend=megatron", "plain-PyTorch backend"),
                             ("heads.det.enabled=true", "without task heads")]:
        rc, _, err = run_cli("train", _recipe(pref_run, pref_run / "x3"), "--quiet", override)
        assert rc == 2 and needle in err and "Traceback" not in err, (override, err)


def test_packed_pairs_are_scored_as_if_alone_and_only_on_responses(pref_run):
    """Rows hold whole pairs (chosen, rejected, ...); each side's log-prob in the packed row equals
    the one of that side run alone; the prompt's targets get no loss and no gradient."""
    from omni.bundle import UnifiedTokenizer
    from omni.data.packing import PairPacker, TokenDataset
    from omni.model import OmniDecoder
    from omni.train.dpo import pair_logps, token_logps

    cfg = load_config(RunConfig, _recipe(pref_run, pref_run / "unused"))
    tok = UnifiedTokenizer.load(pref_run / "tok")
    ds = TokenDataset(pref_run / "pairs", tok)
    packer = PairPacker(ds, 255, 5, tok.vocab)
    rows = [packer.next() for _ in range(3)]
    assert all(len(r.spans) >= 2 and len(r.spans) % 2 == 0 for r in rows)
    assert any(len(r.spans) >= 4 for r in rows)  # several pairs share a row
    torch.manual_seed(0)
    model = OmniDecoder(cfg.model.__class__(**{**vars(cfg.model), "vocab_size": tok.vocab.size})).eval()
    batch = {k: torch.from_numpy(np.stack([getattr(r, k) for r in rows]))
             for k in ("input_ids", "labels", "loss_mask", "doc_ids", "position_ids")}
    batch["spans"] = [r.spans for r in rows]
    logits = model(batch["input_ids"], doc_ids=batch["doc_ids"]).logits.detach().requires_grad_(True)
    packed = pair_logps(logits, batch)
    alone = []
    for r in rows:
        for _, _, doc, _, _ in r.spans:
            ids, mask = ds.document(doc)
            x = torch.tensor(ids)[None]
            with torch.no_grad():
                lg = model(x[:, :-1]).logits
            alone.append(float(token_logps(lg, x[:, 1:], torch.tensor(mask[1:])[None]).sum()))
    assert packed.chosen.tolist() == pytest.approx(alone[0::2], abs=1e-4)
    assert packed.rejected.tolist() == pytest.approx(alone[1::2], abs=1e-4)
    # no loss on the prompt: the DPO loss has no gradient at positions whose target is a prompt token
    (packed.chosen - packed.rejected).sum().backward()
    prompt_targets = (batch["doc_ids"] >= 0) & (batch["loss_mask"] == 0)
    assert prompt_targets.sum() > 100
    assert logits.grad[prompt_targets].abs().max() == 0
    assert logits.grad[batch["loss_mask"] > 0].abs().sum() > 0


def test_dpo_learns_the_preferences_and_the_reference_stays_frozen(pref_run):
    from safetensors.torch import load_file

    from omni.run import find_resume
    from omni.train.dpo import DPOTrainer

    cfg = load_config(RunConfig, _recipe(pref_run, pref_run / "dpo", steps=20, eval_every=20, micro_batch_size=4,
                                         eval_paths=[str(pref_run / "heldout")]))
    t = DPOTrainer(cfg, resume="none", progress=False)
    base = find_resume(pref_run / "elsewhere", str(pref_run / "base"))
    init = load_file(str(base / "model.safetensors"))
    assert "dpo: 24 preference pairs, beta 0.1" in t.summary("none")
    t.run()
    rows = _rows(pref_run / "dpo")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at step 0: margin 0
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-4)
    last = rows[-1]
    assert last["loss"] < 0.45 and last["accuracy"] == 1.0 and last["margin"] > 0.5
    assert {"val_loss", "val_accuracy", "val_margin", "val_pairs"} <= set(last) and last["val_pairs"] >= 8
    # the reference is the starting checkpoint, untouched; the policy moved
    assert all(torch.equal(v, init[k]) for k, v in t.reference.state_dict().items())
    assert any(not torch.equal(v, init[k]) for k, v in t.model.state_dict().items())
    saved = yaml.safe_load((pref_run / "dpo" / "step_000020" / "run.yaml").read_text())
    assert saved["train"]["stage"] == "dpo" and saved["train"]["dpo"]["beta"] == 0.1


def test_dpo_resume_is_exact(pref_run):
    from safetensors.torch import load_file

    from omni.train.loop import train

    train(load_config(RunConfig, _recipe(pref_run, pref_run / "r_one", steps=4)), resume="none", progress=False)
    train(load_config(RunConfig, _recipe(pref_run, pref_run / "r_two", steps=2, save_every=2)), resume="none",
          progress=False)
    train(load_config(RunConfig, _recipe(pref_run, pref_run / "r_two", steps=4)), resume="auto", progress=False)
    a = load_file(str(pref_run / "r_one" / "step_000004" / "model.safetensors"))
    b = load_file(str(pref_run / "r_two" / "step_000004" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _rows(pref_run / "r_one")] == [r["loss"] for r in _rows(pref_run / "r_two")]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_dpo_two_gloo_processes_match_one_process(pref_run, tmp_path, strategy):
    from omni.train.loop import train

    train(load_config(RunConfig, _recipe(pref_run, tmp_path / "one", steps=3, micro_batch_size=2, grad_accum=2)),
          resume="none", progress=False)
    two = _recipe(pref_run, tmp_path / "two", steps=3, micro_batch_size=1, grad_accum=2)
    r = torchrun_train(two, f"parallel.strategy={strategy}")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for key in ("loss", "margin", "accuracy", "pairs"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-5), key
