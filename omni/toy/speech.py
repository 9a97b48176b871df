"""Real speech offline: eSpeak NG through the PyPI package ``espeakng-loader``.

``espeakng-loader`` ships ``libespeak-ng.so`` and its ``espeak-ng-data`` (dictionaries, voices,
variants); we call the C API (``speak_lib.h``) through ctypes:
``espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, ...)`` + ``espeak_SetSynthCallback`` collects the
16-bit samples (22050 Hz), ``espeak_SetVoiceByName("en+f3")`` picks a voice and variant,
``espeak_SetParameter`` sets rate (words per minute) and pitch.

Determinism: eSpeak NG keeps synthesis state in static variables that survive across calls and
even across ``espeak_Terminate`` (pitch-flutter phase, echo buffer, random generator), so two
identical calls in one process differ slightly. Each synthesis therefore runs in a forked child
that initializes the library, seeds its generator (``espeak_ng_SetRandSeed``), synthesizes and
sends the samples back through a pipe; the parent never touches the library. Same arguments give
the same samples in any process and in any call order. Results are cached in memory (read-only
arrays). Where ``os.fork`` does not exist, synthesis runs in-process (then reproducible only for
the same sequence of calls).

The corpus: :func:`sentences` builds varied English sentences from a small seeded grammar and
splits them into train and held-out by a hash of the sentence text, so a sentence's split never
depends on how many were asked for. :func:`corpus` pairs each sentence with a voice, rate and
pitch; :func:`write_corpus` (also ``python -m omni.toy.speech --out DIR``) writes them as wav files
into ``DIR/train`` and ``DIR/heldout``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omni.errors import OmniError

ESPEAK_RATE = 22050
"""eSpeak NG's output sample rate (Hz)."""

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4

VOICES = ("en", "en-us", "en-gb-scotland", "en-029")
"""English accents (voice names of espeak-ng-data/lang)."""
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "Alex", "Andy", "Denis", "Hugo")
"""Voice variants (espeak-ng-data/voices/!v): men's, women's and a few character voices."""


def _library():
    try:
        import espeakng_loader
    except ImportError:  # pragma: no cover - a core dependency
        raise OmniError("speech synthesis needs the espeakng-loader package: pip install espeakng-loader") from None
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    return lib, espeakng_loader.get_data_path()


# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events)
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def _synthesize_here(text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> bytes:
    """Run eSpeak NG in this process; returns int16 samples as bytes, or raises RuntimeError."""
    lib, data_path = _library()
    if lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0) <= 0:
        raise RuntimeError(f"espeak_Initialize failed (data path {data_path})")
    chunks: list[bytes] = []

    def collect(wav, n, _events):
        if n > 0:
            chunks.append(ctypes.string_at(wav, 2 * n))
        return 0  # 0: continue synthesis

    callback = _SYNTH_CALLBACK(collect)  # keep a reference while the library may call it
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise RuntimeError(f"unknown voice {voice!r}")
    lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
    lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
    lib.espeak_SetParameter(_PARAM_RANGE, pitch_range, 0)
    lib.espeak_ng_SetRandSeed(0)
    data = text.encode("utf-8")
    status = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    if status != 0:
        raise RuntimeError(f"espeak_Synth failed with status {status}")
    return b"".join(chunks)


def _synthesize_in_child(*args) -> bytes:
    """:func:`_synthesize_here` in a forked child, so no library state survives between calls."""
    if not hasattr(os, "fork"):  # pragma: no cover - not Linux/macOS
        return _synthesize_here(*args)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: synthesize, write status + payload, exit without running any cleanup
        code = 1
        try:
            os.close(read_fd)
            try:
                payload, ok = _synthesize_here(*args), b"\x00"
            except Exception as e:  # noqa: BLE001 - sent to the parent as a message
                payload, ok = str(e).encode(), b"\x01"
            with os.fdopen(write_fd, "wb") as f:
                f.write(ok + struct.pack("<Q", len(payload)) + payload)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        blob = f.read()
    os.waitpid(pid, 0)
    if len(blob) < 9:
        raise OmniError("espeak-ng synthesis process died without output")
    (n,) = struct.unpack("<Q", blob[1:9])
    payload = blob[9 : 9 + n]
    if blob[:1] != b"\x00":
        raise OmniError(f"espeak-ng: {payload.decode(errors='replace')}")
    return payload


@functools.lru_cache(maxsize=2048)
def _cached(text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
    pcm = np.frombuffer(_synthesize_in_child(text, voice, rate, pitch, pitch_range), dtype=np.int16)
    wave = (pcm.astype(np.float32) / 32768.0)
    wave.setflags(write=False)  # shared by every caller through the cache
    return wave


def synthesize(text: str, voice: str = "en", speed: int = 175, pitch: int = 50,
               pitch_range: int = 50) -> tuple[np.ndarray, int]:
    """Speak ``text``; returns (float32 wave [T] in [-1, 1], sample rate 22050).

    ``voice`` is an espeak-ng voice name, optionally with a variant: "en", "en-us+f3", "en+Alex"
    (see :data:`VOICES`, :data:`VARIANTS`). ``speed`` is in words per minute (80..450), ``pitch``
    and ``pitch_range`` in 0..100 (espeak-ng's scale; 50 is the voice's default). Deterministic;
    the returned array is cached and read-only (copy it to modify).
    """
    if not isinstance(text, str) or not text.strip():
        raise OmniError(f"synthesize needs non-empty text, got {text!r}")
    if not 80 <= int(speed) <= 450:
        raise OmniError(f"speed={speed} is invalid: expected words per minute in [80, 450]")
    for name, v in (("pitch", pitch), ("pitch_range", pitch_range)):
        if not 0 <= int(v) <= 100:
            raise OmniError(f"{name}={v} is invalid: expected an integer in [0, 100]")
    try:
        wave = _cached(text, voice, int(speed), int(pitch), int(pitch_range))
    except OmniError as e:
        if "unknown voice" in str(e):
            raise OmniError(f"{e}; try one of {', '.join(VOICES)}, optionally with +variant "
                            f"({', '.join(VARIANTS)})") from None
        raise
    return wave, ESPEAK_RATE


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------
_SUBJECTS = ("the old sailor", "a young painter", "my neighbour", "the tired farmer", "our teacher",
             "the little girl", "a quiet student", "the baker", "her brother", "the doctor",
             "a clever fox", "the brown dog", "the city council", "a famous singer", "the pilot",
             "his grandmother", "the new engineer", "a busy waiter", "the driver", "my best friend")
_VERBS = ("carried", "painted", "found", "repaired", "sold", "watched", "cleaned", "borrowed",
          "described", "forgot", "opened", "ordered", "counted", "pushed", "measured", "delivered")
_OBJECTS = ("a heavy wooden box", "seven green apples", "the broken window", "an ancient map",
            "the yellow bicycle", "two silver spoons", "a letter from Paris", "the kitchen table",
            "forty paper cups", "the red umbrella", "a bag of flour", "the garden gate",
            "three small kittens", "the evening newspaper", "a bright lantern", "the music box")
_ENDINGS = ("before breakfast", "near the river", "on a rainy Sunday", "after the long meeting",
            "in the dark hallway", "at the busy market", "without saying a word", "late last night",
            "during the storm", "behind the old church", "with great care", "by the harbour",
            "", "", "", "")
_QUESTIONS = ("Did {s} really say that {c}?", "Why would {s} leave {o} {e}?",
              "Have you seen {o} {e}?", "Where did {s} put {o}?")
_CLAUSES = ("the train was late", "it would rain all week", "nobody had noticed",
            "the shop was closed", "the numbers did not add up", "winter came early")


@dataclass(frozen=True)
class Utterance:
    """One corpus item: a sentence and how to speak it."""

    text: str
    voice: str
    speed: int
    pitch: int

    def synthesize(self) -> tuple[np.ndarray, int]:
        return synthesize(self.text, self.voice, self.speed, self.pitch)

    @property
    def name(self) -> str:
        """A stable file name stem."""
        h = hashlib.sha1(f"{self.text}|{self.voice}|{self.speed}|{self.pitch}".encode()).hexdigest()[:12]
        return f"utt_{h}"


def _is_heldout(sentence: str, heldout_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(sentence.encode()).digest()[:8], "big")
    return (h % 10_000) < heldout_fraction * 10_000


def sentences(n: int, split: str = "train", seed: int = 0, heldout_fraction: float = 0.15) -> list[str]:
    """``n`` distinct sentences of ``split`` ('train' or 'heldout'); no sentence is in both splits."""
    if split not in ("train", "heldout"):
        raise OmniError(f"split={split!r} is invalid: expected 'train' or 'heldout'")
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(200 * n + 1000):
        if len(out) >= n:
            break
        s, o, e = rng.choice(_SUBJECTS), rng.choice(_OBJECTS), rng.choice(_ENDINGS)
        kind = rng.random()
        if kind < 0.7:
            text = f"{s} {rng.choice(_VERBS)} {o} {e}".strip() + "."
        elif kind < 0.85:
            text = rng.choice(_QUESTIONS).format(s=s, o=o, e=e, c=rng.choice(_CLAUSES)).replace("  ", " ")
        else:
            text = f"{s} said that {rng.choice(_CLAUSES)}, so {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {o}."
        text = text[0].upper() + text[1:]
        text = text.replace(" ?", "?")
        if text in seen or _is_heldout(text, heldout_fraction) != (split == "heldout"):
            continue
        seen.add(text)
        out.append(text)
    if len(out) < n:
        raise OmniError(f"the toy grammar yields only {len(out)} distinct {split} sentences, asked for {n}")
    return out


def corpus(n: int, split: str = "train", seed: int = 0) -> list[Utterance]:
    """``n`` utterances of ``split`` with varied accent, variant, speed (130..210 wpm) and pitch (25..75)."""
    rng = random.Random(f"{seed}-{split}-voices")
    items = []
    for text in sentences(n, split, seed):
        voice = f"{rng.choice(VOICES)}+{rng.choice(VARIANTS)}"
        items.append(Utterance(text, voice, rng.randrange(130, 211, 5), rng.randrange(25, 76, 5)))
    return items


def write_corpus(out: str | os.PathLike, n_train: int = 300, n_heldout: int = 40, seed: int = 0,
                 sample_rate: int = 16000) -> dict[str, int]:
    """Write ``out/train/*.wav`` and ``out/heldout/*.wav`` (16-bit PCM at ``sample_rate``).

    Existing files are kept (the output is deterministic), so a rerun is cheap. Returns counts.
    """
    import soundfile as sf

    from omni.io import atomic_write_bytes, atomic_write_text

    counts = {}
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        d = Path(out) / split
        d.mkdir(parents=True, exist_ok=True)
        for utt in corpus(n, split, seed):
            path = d / f"{utt.name}.wav"
            if path.is_file():
                continue
            wave, sr = utt.synthesize()
            if sample_rate != sr:
                import soxr

                wave = soxr.resample(wave, sr, sample_rate, quality="HQ")
            buf = io.BytesIO()
            sf.write(buf, np.clip(wave, -1, 1), sample_rate, subtype="PCM_16", format="WAV")
            atomic_write_bytes(path, buf.getvalue())
            atomic_write_text(d / f"{utt.name}.txt", f"{utt.text}\t{utt.voice}\t{utt.speed}\t{utt.pitch}\n")
        counts[split] = n
    return counts


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m omni.toy.speech",
                                description="Write an espeak-ng speech corpus (train / heldout wav files).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=300, help="train utterances (default 300)")
    p.add_argument("--heldout", type=int, default=40, help="held-out utterances (default 40)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    counts = write_corpus(args.out, args.train, args.heldout, args.seed)
    print(f"wrote {counts['train']} train and {counts['heldout']} held-out utterances to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
