"""Shared fixtures: the one tiny setup every test builds on.

Everything is built at random init or trained on data that ships offline (the stdlib's pydoc
topics for text). Session-scoped so the suite pays for each artifact once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/doubles.py

os.environ.setdefault("OMP_NUM_THREADS", "2")

def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: without it they are skipped with the reason printed (``-ra``), the only
    skip the suite allows."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: no GPU on this machine (the gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_TEXT_VOCAB = 512
"""Text pieces of the tiny tokenizer every test shares."""


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """Real English text that ships with Python: the pydoc topic pages (about 0.5 MB)."""
    import pydoc_data.topics

    path = tmp_path_factory.mktemp("corpus") / "pydoc_topics.txt"
    path.write_text("\n".join(pydoc_data.topics.topics.values()), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def text_tokenizer(corpus_file):
    from omni.config import TextTokenizerConfig
    from omni.tokenizers.text import train_text_tokenizer

    return train_text_tokenizer([str(corpus_file)], TextTokenizerConfig(vocab_size=TINY_TEXT_VOCAB), progress=False)


@pytest.fixture(scope="session")
def image_double():
    from doubles import MeanColorImageTokenizer

    return MeanColorImageTokenizer()


@pytest.fixture(scope="session")
def audio_double():
    from doubles import EnvelopeAudioTokenizer

    return EnvelopeAudioTokenizer()


@pytest.fixture(scope="session")
def tokenizer(text_tokenizer, image_double, audio_double):
    """A full bundle: real text tokenizer, test-double image and audio tokenizers."""
    from omni.bundle import UnifiedTokenizer

    return UnifiedTokenizer.build(text_tokenizer, image_double, audio_double)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors: they gain nothing from threads, and on a busy
    2-core machine two OpenMP threads spin-wait on each other (measured 10-100x slower steps)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cli(*args: str):
    """Run `omni ARGS` in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from omni.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors and --help
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def tiny_model_config():
    """The one tiny decoder config all tests share (recipes/models/tiny.yaml; vocab fits `tokenizer`)."""
    import yaml

    from omni.config import load_config
    from omni.config.model import ModelConfig

    path = Path(__file__).parent.parent / "recipes" / "models" / "tiny.yaml"
    return load_config(ModelConfig, yaml.safe_load(path.read_text())["model"])


@pytest.fixture(scope="session")
def real_tokenizer(text_tokenizer):
    """A bundle of the real tokenizers at tiny sizes, random init: VQ image (32 px -> 4x4 codes of 64)
    and whisper-VQ audio (25 Hz, 16 codes). Random weights code deterministically, which is all the
    data and generation plumbing needs."""
    from omni.bundle import UnifiedTokenizer
    from omni.config.audio_tokenizer import AudioTokenizerConfig
    from omni.config.image_tokenizer import ImageTokenizerConfig
    from omni.tokenizers.audio import WhisperVQAudioTokenizer
    from omni.tokenizers.image import VQImageTokenizer

    torch_seed()
    image = VQImageTokenizer(ImageTokenizerConfig(
        image_size=32, base_channels=8, channel_multiplier=[1, 2, 2, 2], norm_groups=4, latent_channels=16,
        embed_dim=8, codebook_size=64)).eval()
    audio = WhisperVQAudioTokenizer.from_config(AudioTokenizerConfig(
        n_state=32, n_head=2, n_layer=1, chunk_seconds=1.0, codebook_size=16, code_dim=8, decoder_channels=16,
        decoder_blocks=1, decoder_frame_blocks=0))
    return UnifiedTokenizer.build(text_tokenizer, image, audio)


def torch_seed(seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)

