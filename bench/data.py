"""Data pipeline throughput next to what the ~20M decoder consumes, in one run on this machine.

    .venv/bin/python bench/data.py [--samples 96] [--seq-len 1024]

1. Shards of real offline data (scikit-image photos with captions, espeak-ng speech with
   transcripts, Python's pydoc text) are preprocessed with 1 and 2 worker processes through a
   bundle of real tokenizers (SentencePiece trained here; the VQ image and whisper-VQ audio
   tokenizers at their default configs, random init: throughput does not depend on training).
2. The packed, blended loader (omni.data.packing) is timed in sequences/s.
3. The peer: a training step (forward + backward + AdamW) of OmniDecoder at recipes/models/20m.yaml
   on the same sequences, in sequences/s. The ratio says how many times faster the loader is
   than the decoder eats.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_shards(folder: Path, n: int) -> int:
    import pydoc_data.topics

    import soundfile as sf
    import webdataset as wds
    from PIL import Image

    from omni.toy.photos import photos
    from omni.toy.speech import corpus

    pics = photos("all")
    utts = corpus(max(1, n // 3), "train")
    texts = [pydoc_data.topics.topics[k][:2000] for k in sorted(pydoc_data.topics.topics)]
    folder.mkdir(parents=True)
    count = 0
    n_shards = max(4, n // 96)
    for shard in range(n_shards):
        with wds.TarWriter(str(folder / f"bench-{shard:03d}.tar")) as w:
            for i in range(shard, n, n_shards):
                kind = i % 3
                if kind == 0:
                    name, a = pics[i % len(pics)]
                    buf = io.BytesIO()
                    Image.fromarray(a).save(buf, format="PNG")
                    w.write({"__key__": f"s{i:05d}", "png": buf.getvalue(), "txt": f"a photo of {name}".encode()})
                elif kind == 1:
                    u = utts[i % len(utts)]
                    wave, sr = u.synthesize()
                    buf = io.BytesIO()
                    sf.write(buf, wave, sr, format="WAV", subtype="PCM_16")
                    w.write({"__key__": f"s{i:05d}", "wav": buf.getvalue(), "txt": u.text.encode()})
                else:
                    w.write({"__key__": f"s{i:05d}", "txt": texts[i % len(texts)].encode()})
                count += 1
    return count


def make_bundle(folder: Path):
    import omni
    from omni.config import TextTokenizerConfig
    from omni.config.audio_tokenizer import AudioTokenizerConfig
    from omni.config.image_tokenizer import ImageTokenizerConfig
    from omni.tokenizers.audio import WhisperVQAudioTokenizer
    from omni.tokenizers.image import VQImageTokenizer
    from omni.tokenizers.text import train_text_tokenizer
    from omni.toy.text import write_corpus

    corpus = write_corpus(folder / "corpus.txt")
    text = train_text_tokenizer([str(corpus)], TextTokenizerConfig(vocab_size=4000), progress=False)
    image = VQImageTokenizer(ImageTokenizerConfig()).eval()
    audio = WhisperVQAudioTokenizer.from_config(AudioTokenizerConfig())  # eval mode already
    tok = omni.UnifiedTokenizer.build(text, image, audio)
    tok.save(folder / "bundle")
    return tok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1536,
                    help="enough that worker start-up (about 4 s of imports each) amortizes")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3, help="timed decoder steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the loader and decoder (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from omni.config import load_config
    from omni.config.data import DataConfig
    from omni.config.model import ModelConfig
    from omni.data.packing import build_stream
    from omni.data.preprocess import preprocess
    from omni.model import OmniDecoder

    tmp = Path(tempfile.mkdtemp(prefix="omni-bench-data-"))
    try:
        n = make_shards(tmp / "raw", args.samples)
        tok = make_bundle(tmp)
        rates, token_rates = {}, {}
        for workers in (1, 2):
            t0 = time.perf_counter()
            preprocess([str(tmp / "raw")], tmp / "bundle", tmp / f"tok{workers}", workers=workers, progress=False)
            dt = time.perf_counter() - t0
            manifest = json.loads((tmp / f"tok{workers}" / "manifest.json").read_text())
            rates[workers] = n / dt
            token_rates[workers] = manifest["totals"]["tokens"]["total"] / dt
        print(f"preprocess, 1 worker : {rates[1]:8.1f} samples/s  {token_rates[1]:10.0f} tokens/s")
        print(f"preprocess, 2 workers: {rates[2]:8.1f} samples/s  {token_rates[2]:10.0f} tokens/s"
              f"   ({rates[2] / rates[1]:.2f}x of 1 worker)")

        cfg = DataConfig(paths=[str(tmp / "tok1")], seq_len=args.seq_len)
        stream = build_stream(cfg, tok)
        stream.next_batch(4)
        t0 = time.perf_counter()
        n_seq = 0
        while time.perf_counter() - t0 < 3.0:
            stream.next_batch(8)
            n_seq += 8
        loader = n_seq / (time.perf_counter() - t0)
        print(f"loader (packing + blending): {loader:8.1f} sequences/s of {args.seq_len} tokens")

        recipe = yaml.safe_load((ROOT / "recipes" / "models" / "20m.yaml").read_text())["model"]
        mcfg = load_config(ModelConfig, {**recipe, "vocab_size": tok.vocab.size})
        torch.manual_seed(0)
        model = OmniDecoder(mcfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = stream.next_batch(4)

        def step():
            out = model(batch["input_ids"], labels=batch["labels"], loss_mask=batch["valid_mask"],
                        doc_ids=batch["doc_ids"], position_ids=batch["position_ids"])
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        decoder = 4 * args.steps / (time.perf_counter() - t0)
        print(f"peer ({args.threads} thread(s)): OmniDecoder 20m training step: {decoder:8.2f} sequences/s "
              f"({decoder * args.seq_len:.0f} tokens/s, {model.num_parameters() / 1e6:.1f}M parameters)")
        print(f"ratio loader / decoder consumption: {loader / decoder:.1f}x")
        print(f"ratio preprocess (2 workers) / decoder consumption, in tokens: "
              f"{token_rates[2] / (decoder * args.seq_len):.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
