"""The whisper-VQ audio tokenizer: trained briefly on espeak-ng speech, checked on held-out sentences."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import run_cli
from omni.config import load_config
from omni.config.audio_tokenizer import AudioTokenizerConfig, AudioTokenizerRecipe
from omni.errors import ConfigError, OmniError
from omni.eval.metrics import envelope_correlation
from omni.eval.tokenizers import evaluate_audio_tokenizer
from omni.tokenizers.audio import SAMPLE_RATE, WhisperVQAudioTokenizer
from omni.tokenizers.audio_train import load_clips, train_audio_tokenizer
from omni.toy import speech

# A small tokenizer that trains in ~30-60 s on a shared 2-core CPU (600 steps of 8 two-second windows).
TINY = [
    "tokenizer.n_state=96", "tokenizer.n_layer=2", "tokenizer.chunk_seconds=2.0", "tokenizer.codebook_size=256",
    "tokenizer.decoder_channels=128", "tokenizer.decoder_blocks=3", "tokenizer.decoder_frame_blocks=0",
    "train.steps=600", "train.batch_size=8", "train.num_threads=1", "train.log_every=100",
]
MICRO = [  # for CLI plumbing only: seconds
    "tokenizer.n_state=32", "tokenizer.n_head=2", "tokenizer.n_layer=1", "tokenizer.chunk_seconds=1.0",
    "tokenizer.codebook_size=16", "tokenizer.code_dim=8", "tokenizer.decoder_channels=16",
    "tokenizer.decoder_blocks=1", "tokenizer.decoder_frame_blocks=0", "train.steps=3", "train.batch_size=2",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The models here are tiny: one thread avoids spin-waiting on a shared 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    speech.write_corpus(root, n_train=120, n_heldout=12)
    return root


@pytest.fixture(scope="module")
def trained(speech_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "audio"
    recipe = load_config(AudioTokenizerRecipe, overrides=TINY)
    tok, summary = train_audio_tokenizer(speech_dir / "train", recipe, out=out, progress=False)
    return tok, out, summary


def heldout_waves(n: int) -> list[np.ndarray]:
    """Held-out sentences, synthesized and resampled to 16 kHz."""
    import soxr

    return [soxr.resample(np.asarray(u.synthesize()[0]), speech.ESPEAK_RATE, SAMPLE_RATE)
            for u in speech.corpus(n, "heldout", seed=7)]


@pytest.mark.slow
def test_training_reaches_the_targets_on_heldout_sentences(trained, speech_dir):
    tok, _, summary = trained
    assert summary["steps"] == 600 and summary["data"]["clips"] == 120
    report = evaluate_audio_tokenizer(tok, speech_dir / "heldout")
    assert report["clips"] == 12
    # Decoded speech follows the input: energy envelopes correlate (issue: >= 0.8 on held-out).
    assert report["envelope_correlation"] >= 0.8, report
    assert report["envelope_correlation_min"] >= 0.6, report
    # The decoder learned: at most half the mel L1 of an untrained decoder on the same codes,
    # and clearly better than predicting each mel bin's mean.
    assert report["mel_l1"] <= 0.5 * report["mel_l1_untrained_decoder"], report
    assert report["mel_l1"] < 0.75 * report["mel_l1_mean_baseline"], report
    assert report["codebook_usage"] >= 0.5, report  # ~900 held-out codes over 256 entries
    assert report["tokens_per_second"] == pytest.approx(25, abs=0.5)


def test_sentences_never_heard_round_trip(trained):
    """Other held-out sentences (another seed), at the input's own rate, in stereo."""
    tok, _, _ = trained
    corr = []
    for utt in speech.corpus(3, "heldout", seed=7):
        wave, sr = utt.synthesize()
        stereo = np.stack([wave, 0.5 * wave])  # [2, T] at 22050 Hz
        codes = tok.encode(stereo, sr)
        out, out_sr = tok.decode(codes)
        assert out_sr == SAMPLE_RATE
        import soxr

        ref = soxr.resample(np.asarray(wave), sr, SAMPLE_RATE)
        corr.append(envelope_correlation(0.75 * ref, out.numpy()))
    assert np.mean(corr) >= 0.8, corr


@pytest.mark.parametrize("seconds", [0.5, 10.0, 45.0])
def test_clip_durations_round_trip_within_one_token(trained, seconds):
    tok, _, _ = trained
    # Held-out speech repeated to the length, so the end of a long clip is speech too.
    parts = heldout_waves(2)
    n = int(seconds * SAMPLE_RATE)
    wave = np.tile(np.concatenate(parts), math.ceil(n / sum(map(len, parts))))[:n]
    codes = tok.encode(torch.from_numpy(wave), SAMPLE_RATE)
    assert codes.dtype == torch.long and codes.dim() == 1
    assert len(codes) == math.ceil(n / tok.samples_per_step)  # nothing truncated, one code per 40 ms
    out, sr = tok.decode(codes)
    assert abs(len(out) / sr - seconds) <= 1 / tok.config.token_rate
    if seconds > 30:  # longer than whisper's window: many chunks, and the last one still decodes to speech
        tail = slice(n - 5 * SAMPLE_RATE, n)
        assert envelope_correlation(wave[tail], out.numpy()[tail]) >= 0.7


def test_save_load_gives_the_same_codes_and_bundles(trained, text_tokenizer, tmp_path):
    from omni.bundle import UnifiedTokenizer
    from omni.document import Audio, Document, Text
    from omni.tokenizers.base import load_tokenizer

    tok, out, _ = trained
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert (out / "metrics.jsonl").is_file() and (out / "run.yaml").is_file()
    loaded = load_tokenizer(out, "audio")
    assert isinstance(loaded, WhisperVQAudioTokenizer) and loaded.fingerprint() == tok.fingerprint()
    wave = heldout_waves(1)[0]
    codes = tok.encode(wave, SAMPLE_RATE)
    assert torch.equal(loaded.encode(wave, SAMPLE_RATE), codes)
    assert torch.equal(loaded.decode_mel(codes), tok.decode_mel(codes))
    assert np.array_equal(loaded.decode(codes)[0].numpy(), tok.decode(codes)[0].numpy())  # deterministic vocoder

    # The audio modality of the unified tokenizer: <boa> codes <eoa>, variable length.
    bundle = UnifiedTokenizer.build(text_tokenizer, audio=loaded)
    bundle.save(tmp_path / "bundle")
    bundle = UnifiedTokenizer.load(tmp_path / "bundle")
    ids = bundle.encode(Document([Text("say:"), Audio(wave, SAMPLE_RATE), Text("done")]))
    v = bundle.vocab
    start = ids.tolist().index(v.special("<boa>"))
    end = ids.tolist().index(v.special("<eoa>"))
    assert end - start - 1 == len(codes)
    assert torch.equal(v.id_to_code(ids[start + 1 : end]), codes)
    doc = bundle.decode(ids)
    assert doc.text == "say:\ndone"  # text runs around a clip read as lines
    (audio,) = doc.audios
    assert audio.sample_rate == SAMPLE_RATE
    assert abs(len(audio.wave) - len(wave)) < tok.samples_per_step


def test_rates_and_residual_codes():
    wave = torch.from_numpy(heldout_waves(1)[0][: SAMPLE_RATE])  # 1 s
    tok = WhisperVQAudioTokenizer.from_config(AudioTokenizerConfig(
        n_state=32, n_head=2, n_layer=1, chunk_seconds=1.6, token_rate=12.5, num_quantizers=2,
        codebook_size=16, code_dim=8, decoder_channels=16, decoder_blocks=1))
    assert tok.tokens_per_second == 25.0 and tok.samples_per_step == 1280
    codes = tok.encode(wave, SAMPLE_RATE)
    assert len(codes) == 2 * math.ceil(SAMPLE_RATE / 1280)  # 13 steps x 2 levels, step-major
    out, sr = tok.decode(codes)
    assert len(out) == 13 * 1280 and sr == SAMPLE_RATE
    with pytest.raises(OmniError, match="not a multiple of num_quantizers=2"):
        tok.decode(codes[:-1])
    with pytest.raises(OmniError, match=r"audio codes must lie in \[0, 16\), got \[0, 16\]"):
        tok.decode(torch.tensor([0, 16]))
    with pytest.raises(OmniError, match="audio clip is empty"):
        tok.encode(torch.zeros(0), SAMPLE_RATE)


def test_encoder_loads_from_a_whisper_checkpoint(tmp_path):
    import dataclasses

    import whisper
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(n_mels=80, n_audio_ctx=100, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51865, n_text_ctx=8, n_text_state=32, n_text_head=2, n_text_layer=1)
    torch.manual_seed(1)
    model = Whisper(dims)
    path = tmp_path / "tiny-whisper.pt"
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": model.state_dict()}, path)
    assert whisper.load_model(str(path), device="cpu").dims == dims  # the file is whisper's own format

    tok = WhisperVQAudioTokenizer.from_config(AudioTokenizerConfig(
        whisper_checkpoint=str(path), codebook_size=16, code_dim=8, decoder_channels=16))
    c = tok.config
    assert (c.n_state, c.n_head, c.n_layer, c.chunk_seconds) == (32, 2, 1, 2.0)  # the checkpoint's dims
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(tok.model.encoder.state_dict()[k], v), k
    assert len(tok.encode(torch.randn(3 * SAMPLE_RATE) * 0.1, SAMPLE_RATE)) == 75

    with pytest.raises(OmniError, match="whisper_checkpoint not found"):
        WhisperVQAudioTokenizer.from_config(AudioTokenizerConfig(whisper_checkpoint=str(tmp_path / "no.pt")))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(OmniError, match="is not a whisper checkpoint"):
        WhisperVQAudioTokenizer.from_config(AudioTokenizerConfig(whisper_checkpoint=str(tmp_path / "junk.pt")))


def _wav_bytes(wave: np.ndarray, sr: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt)
    return buf.getvalue()


def test_reading_audio_skips_bad_files_with_counts(tmp_path):
    t = np.linspace(0, 1, 44100, endpoint=False)
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    sf.write(d / "stereo.wav", np.stack([tone, tone], 1), 44100)  # stereo 44.1 kHz
    sf.write(d / "sub" / "mono.flac", tone, 44100)
    sf.write(d / "sub" / "clip.ogg", tone, 44100)
    sf.write(d / "empty.wav", np.zeros((0,), np.float32), 16000)
    sf.write(d / "silent.wav", np.zeros(16000, np.float32), 16000)
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage")
    (d / "song.mp3").write_bytes(b"ID3")
    (d / "notes.txt").write_text("not audio, ignored")
    with tarfile.open(d / "shard-000.tar", "w") as tar:
        for name, data in [("a.wav", _wav_bytes(tone, 44100)), ("a.json", b"{}"), ("b.flac", b"junk")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    clips, report = load_clips(d)
    assert report.read == len(clips) == 4  # stereo.wav, mono.flac, clip.ogg, shard's a.wav
    # empty.wav, silent.wav, corrupt.wav and the shard's b.flac; song.mp3 would need ffmpeg
    assert dict(report.skipped) == {"corrupt_audio": 4, "unsupported_format": 1}
    for clip in clips:
        assert clip.wave.ndim == 1 and abs(len(clip.wave) - SAMPLE_RATE) <= 1  # 1 s, mono, 16 kHz
    assert "skipped" in str(report) and "song.mp3" in str(report)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.wav").write_bytes(b"nope")
    with pytest.raises(OmniError, match=r"no usable audio in .*1 corrupt_audio"):
        load_clips(bad)
    with pytest.raises(OmniError, match="audio data not found"):
        load_clips(tmp_path / "missing")


def test_cli_train_and_eval(speech_dir, tmp_path):
    out = tmp_path / "tok"
    rc, stdout, stderr = run_cli("tokenizer", "train", "audio", "--data", speech_dir / "heldout", "--out", out,
                                 "--quiet", *MICRO)
    assert rc == 0, stderr
    assert "wrote" in stdout and (out / "tokenizer.json").is_file()
    report_path = tmp_path / "eval.json"
    rc, stdout, stderr = run_cli("tokenizer", "eval", "audio", "--tokenizer", out, "--data",
                                 speech_dir / "heldout", "--out", report_path, "max_clips=2", "threads=1")
    assert rc == 0, stderr
    report = json.loads(report_path.read_text())
    assert json.loads(stdout) == report
    for key in ("mel_l1", "mel_l1_untrained_decoder", "codebook_usage", "tokens_per_second", "encode_rtf",
                "decode_rtf", "envelope_correlation"):
        assert isinstance(report[key], float), key
    assert report["clips"] == 2


def test_cli_rerun_of_a_finished_run_does_nothing_and_says_so(speech_dir, tmp_path, monkeypatch):
    """Issue #20, friction 13: a finished run is not redone (the rerun used to reload every clip and
    then crash on an empty summary); a run killed after its last checkpoint finishes without training.
    Overrides right after --data are not taken for data (`--data DIR key=value` works)."""
    from omni.tokenizers import audio_train

    out = tmp_path / "tok"
    cmd = ["tokenizer", "train", "audio", "--data", speech_dir / "heldout", *MICRO, "--out", out, "--quiet"]
    rc, stdout, stderr = run_cli(*cmd)
    assert rc == 0, stderr
    summary = out / "train_summary.json"
    first, stamp = summary.read_text(), summary.stat().st_mtime_ns
    assert json.loads(first)["steps"] == 3

    def no_data(*a, **k):
        raise AssertionError("a finished run read its data again")

    monkeypatch.setattr(audio_train, "load_clips", no_data)
    rc, stdout, stderr = run_cli(*cmd)
    assert rc == 0, stderr
    assert "finished already" in stdout and "step 3" in stdout and "wrote" not in stdout, stdout
    assert summary.read_text() == first and summary.stat().st_mtime_ns == stamp
    monkeypatch.undo()

    summary.unlink()  # killed between its last checkpoint and its summary
    rc, stdout, stderr = run_cli(*cmd)
    assert rc == 0, stderr
    assert "resuming" in stdout and "after 3 steps" in stdout and "train mel L1" in stdout, stdout
    assert json.loads(summary.read_text())["final"] == json.loads(first)["final"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["tokenizer.token_rate=30"], "tokenizer.token_rate=30.0 is invalid: expected one of 50.0, 25.0, 12.5"),
        (["tokenizer.chunk_seconds=1.02"], "tokenizer.chunk_seconds=1.02 is invalid"),
        (["tokenizer.codebok_size=8"], "unknown config key 'tokenizer.audio.tokenizer.codebok_size'. Did you mean "
         "'tokenizer.audio.tokenizer.codebook_size'?"),
        (["train.steps=0"], "train.steps=0 is invalid: expected >= 1"),
    ],
)
def test_cli_config_errors(speech_dir, tmp_path, args, message):
    rc, _, stderr = run_cli("tokenizer", "train", "audio", "--data", speech_dir / "heldout", "--out", tmp_path, *args)
    assert rc == 2 and message in stderr, stderr
    assert "Traceback" not in stderr


def test_cli_data_errors(tmp_path):
    rc, _, stderr = run_cli("tokenizer", "train", "audio", "--data", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert rc == 2 and "audio data not found" in stderr
    (tmp_path / "only_bad").mkdir()
    (tmp_path / "only_bad" / "a.mp3").write_bytes(b"x")
    rc, _, stderr = run_cli("tokenizer", "train", "audio", "--data", tmp_path / "only_bad", "--out", tmp_path / "o")
    assert rc == 2 and "no usable audio" in stderr and "1 unsupported_format" in stderr
    rc, _, stderr = run_cli("tokenizer", "eval", "audio", "--tokenizer", tmp_path / "nowhere", "--data", tmp_path)
    assert rc == 2 and "tokenizer folder not found" in stderr


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="n_head=3 is invalid: expected a positive divisor of n_state=128"):
        AudioTokenizerConfig(n_head=3)
    with pytest.raises(ConfigError, match="n_mels=64 is invalid: expected one of 80, 128"):
        AudioTokenizerConfig(n_mels=64)


@pytest.mark.dist
def test_killed_training_resumes_to_the_weights_of_an_uninterrupted_run(speech_dir, tmp_path):
    """SIGKILL after a checkpoint, the same command again: the run convention of omni.run (newest intact
    step_XXXXXX, optimizer + window-sampler + global RNG states) gives bit-identical weights."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[2]
    args = [*MICRO[:-2], "train.steps=400", "train.batch_size=2", "train.num_threads=1", "train.save_every=20",
            "train.log_every=1"]

    def cmd(out):
        return [sys.executable, "-m", "omni", "tokenizer", "train", "audio", "--data", str(speech_dir / "heldout"),
                "--out", str(out), "--quiet", *args]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd(tmp_path / "killed"), cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not list((tmp_path / "killed").glob("step_*/checksums.json")):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "killed" / "train_summary.json").exists(), "the run finished before the kill"
    resumed = subprocess.run(cmd(tmp_path / "killed"), cwd=root, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    at = int(resumed.stdout.split("resuming", 1)[1].split("at step", 1)[1].split()[0])
    assert 20 <= at < 400 and at % 20 == 0  # it went on from the killed run's newest checkpoint
    whole = subprocess.run(cmd(tmp_path / "whole"), cwd=root, env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr

    a, b = load_file(tmp_path / "killed" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 401))  # rows after the checkpoint were dropped and logged again once
    assert [p.name for p in (tmp_path / "killed").glob("step_*")] == ["step_000400"]
    assert (tmp_path / "killed" / "run.yaml").is_file()
