"""Write the golden files that pin today's numerics: ``tiny_logits.json`` and ``text_losses.json``.

Run from the repository root, and only when a change is MEANT to change the function:

    .venv/bin/python tests/assets/make_goldens.py

``tests/test_goldens.py`` loads this file and recomputes both with the same functions, so a refactor
that changes the numbers (by accident) fails there. Everything both compute runs on one torch thread:
the thread count can change the order of float reductions and with it the last bits.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import torch
import yaml

ASSETS = Path(__file__).resolve().parent
ROOT = ASSETS.parents[1]
TINY = ROOT / "recipes" / "models" / "tiny.yaml"
LOGITS_FILE = ASSETS / "tiny_logits.json"
LOSSES_FILE = ASSETS / "text_losses.json"

N_LOGITS = 8
"""Logits kept per position (the first ids of the vocab): 2 x 24 x 8 = 384 floats per case."""
TRAIN_STEPS = 20


@contextlib.contextmanager
def one_thread():
    """One torch thread inside, the caller's count restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _tiny_model_section() -> dict:
    return yaml.safe_load(TINY.read_text())["model"]


def tiny_logits() -> dict:
    """The tiny decoder at seed 0 on fixed ids: a slice of its logits and its loss, plain and packed.

    The packed case splits each row into documents (``doc_ids``), which takes the block-diagonal
    mask and per-document positions, a different path through attention than plain causal.
    """
    from omni.config import load_config
    from omni.config.model import ModelConfig
    from omni.model import OmniDecoder

    with one_thread(), torch.no_grad():
        cfg = load_config(ModelConfig, _tiny_model_section())
        torch.manual_seed(0)
        model = OmniDecoder(cfg).eval()
        ids = (torch.arange(48) * 7 % cfg.vocab_size).view(2, 24)
        labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)  # shifted; last is not scored
        doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 7 + [2] * 12])
        out = {}
        for name, docs in (("plain", None), ("packed", doc_ids)):
            res = model(ids, labels=labels, doc_ids=docs)
            out[name] = {"logits": res.logits[:, :, :N_LOGITS].flatten().tolist(), "loss": res.loss.item()}
        return out


def text_losses(tmpdir: str | Path) -> list[float]:
    """The losses of the first TRAIN_STEPS steps of the tiny model on real text (the pydoc topics).

    Built as the ``text_run`` fixture and ``_recipe`` of tests/train/test_train.py build theirs: a 512-piece
    SentencePiece tokenizer, 60 topics of at most 1200 characters through WebDataset shards and
    ``preprocess``, seq_len 64, micro-batches of 4. Everything is written under ``tmpdir``.
    """
    import pydoc_data.topics

    import webdataset as wds

    import omni
    from omni.config import RunConfig, TextTokenizerConfig, load_config
    from omni.data.preprocess import preprocess
    from omni.tokenizers.text import train_text_tokenizer
    from omni.train.loop import train

    root = Path(tmpdir)
    topics = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    with one_thread():
        corpus = root / "pydoc_topics.txt"
        corpus.write_text("\n".join(pydoc_data.topics.topics.values()), encoding="utf-8")
        text_tok = train_text_tokenizer([str(corpus)], TextTokenizerConfig(vocab_size=512), progress=False)
        omni.UnifiedTokenizer.build(text_tok).save(root / "tok")
        (root / "raw").mkdir()
        with wds.TarWriter(str(root / "raw" / "text-000.tar")) as w:
            for i, t in enumerate(topics[:60]):
                w.write({"__key__": f"t{i:04d}", "txt": t[:1200].encode()})
        preprocess([str(root / "raw")], root / "tok", root / "tokens", progress=False)
        cfg = {
            "seed": 3,
            "model": _tiny_model_section(),
            "data": {"tokenizer": str(root / "tok"), "paths": [str(root / "tokens")], "seq_len": 64, "seed": 5},
            "train": {"out": str(root / "run"), "steps": TRAIN_STEPS, "micro_batch_size": 4, "lr": 3e-3,
                      "min_lr": 3e-4, "warmup_steps": 2, "log_every": 1, "save_every": 100,
                      "tensorboard": False},
        }
        train(load_config(RunConfig, cfg), resume="none", progress=False)
    rows = [json.loads(ln) for ln in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return [float(r["loss"]) for r in rows]


def main() -> None:
    LOGITS_FILE.write_text(json.dumps(tiny_logits(), indent=1) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        losses = text_losses(tmp)
    LOSSES_FILE.write_text(json.dumps({"steps": TRAIN_STEPS, "losses": losses}, indent=1) + "\n")
    print(f"wrote {LOGITS_FILE.relative_to(ROOT)} and {LOSSES_FILE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
