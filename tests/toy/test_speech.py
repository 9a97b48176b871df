"""espeak-ng speech through espeakng-loader (omni.toy.speech): deterministic, varied, split cleanly."""

from __future__ import annotations

import numpy as np
import pytest

from omni.errors import OmniError
from omni.toy import speech


def test_synthesize_is_real_speech_and_deterministic():
    text = "The quick brown fox jumps over the lazy dog."
    wave, sr = speech.synthesize(text, "en+f3")
    assert sr == speech.ESPEAK_RATE == 22050
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 1.5 < len(wave) / sr < 5.0  # a sentence, not a blip
    assert 0.05 < np.abs(wave).max() <= 1.0
    assert not wave.flags.writeable  # cached arrays are shared, so read-only
    # eSpeak NG keeps state across calls in a process; every call runs in a fresh child, so the
    # same arguments give the same samples whatever was synthesized before.
    speech._cached.cache_clear()
    speech.synthesize("Something else entirely, said first.", "en-us+m3", speed=300)
    speech._cached.cache_clear()
    again, _ = speech.synthesize(text, "en+f3")
    np.testing.assert_array_equal(wave, again)


def median_f0(wave: np.ndarray, sr: int) -> float:
    """Median autocorrelation pitch (Hz) of the loud 40 ms frames."""
    n = int(0.04 * sr)
    frames = wave[: len(wave) // n * n].reshape(-1, n).astype(np.float64)
    energy = (frames**2).mean(1)
    lo, hi = sr // 400, sr // 60  # lags of 400 Hz .. 60 Hz
    f0 = []
    for f in frames[energy > 0.3 * energy.max()]:
        f = f - f.mean()
        ac = np.correlate(f, f, "full")[n - 1 :]
        f0.append(sr / (lo + int(np.argmax(ac[lo:hi]))))
    return float(np.median(f0))


def test_speed_and_pitch_change_the_sound():
    text = "A quiet student measured the garden gate with great care."
    slow, sr = speech.synthesize(text, "en", speed=120)
    fast, _ = speech.synthesize(text, "en", speed=300)
    assert len(fast) < 0.6 * len(slow)

    low, _ = speech.synthesize(text, "en", pitch=10)
    high, _ = speech.synthesize(text, "en", pitch=90)
    assert median_f0(high, sr) > 1.3 * median_f0(low, sr)


def test_every_listed_voice_and_variant_speaks():
    for voice in speech.VOICES:
        assert len(speech.synthesize("Hello.", voice)[0]) > 1000, voice
    for variant in speech.VARIANTS:
        assert len(speech.synthesize("Hello.", f"en+{variant}")[0]) > 1000, variant


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"text": ""}, "non-empty text"),
        ({"text": "hi", "voice": "xx-nowhere"}, "unknown voice 'xx-nowhere'; try one of en, en-us"),
        ({"text": "hi", "speed": 10}, r"speed=10 is invalid: expected words per minute in \[80, 450\]"),
        ({"text": "hi", "pitch": 101}, r"pitch=101 is invalid"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(OmniError, match=match):
        speech.synthesize(**kwargs)


def test_corpus_splits_are_disjoint_stable_and_varied():
    train = speech.sentences(200, "train")
    held = speech.sentences(40, "heldout")
    assert len(set(train)) == 200 and len(set(held)) == 40
    assert not set(train) & set(held)
    assert speech.sentences(50, "train") == train[:50]  # asking for more never moves a sentence
    assert speech.sentences(40, "heldout", seed=1) != held  # the seed varies the sentences
    assert not set(speech.sentences(40, "heldout", seed=1)) & set(speech.sentences(300, "train"))
    utts = speech.corpus(40, "train")
    assert [u.text for u in utts] == train[:40]
    assert len({u.voice for u in utts}) >= 10
    assert len({u.speed for u in utts}) >= 5 and len({u.pitch for u in utts}) >= 5
    assert utts == speech.corpus(40, "train")
    with pytest.raises(OmniError, match="split='test' is invalid"):
        speech.sentences(3, "test")


def test_write_corpus_writes_16khz_wavs(tmp_path):
    import soundfile as sf

    counts = speech.write_corpus(tmp_path, n_train=3, n_heldout=2)
    assert counts == {"train": 3, "heldout": 2}
    wavs = sorted((tmp_path / "train").glob("*.wav"))
    assert len(wavs) == 3 and len(list((tmp_path / "heldout").glob("*.wav"))) == 2
    wave, sr = sf.read(wavs[0])
    assert sr == 16000 and wave.ndim == 1 and np.abs(wave).max() > 0.05
    text = wavs[0].with_suffix(".txt").read_text().split("\t")[0]
    assert text in speech.sentences(3, "train")
    assert speech.main(["--out", str(tmp_path), "--train", "3", "--heldout", "2"]) == 0  # rerun: files kept
