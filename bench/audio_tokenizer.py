"""Mel-to-wave of the audio tokenizer: our torch Griffin-Lim + NNLS vs librosa's, same mel, same run.

Synthesizes held-out espeak-ng sentences (offline), computes whisper's log-mel, and inverts it
with ``omni.tokenizers.audio.mel_to_wave`` (multiplicative-update NNLS + torch Griffin-Lim) and
with librosa (``librosa.util.nnls`` + ``librosa.griffinlim``, the same 32 iterations). Prints the
real-time factor of each (after a warm-up call, so librosa's numba compilation is not counted),
the ratio, and the quality of both: correlation of energy envelopes with the input and the L1
between the re-analysed log-mel of the output and the input's.

    .venv/bin/python bench/audio_tokenizer.py --clips 5 --threads 1

Timings on a shared CPU are noisy: compare the ratio, not the absolute figures.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=32)
    args = ap.parse_args(argv)

    import librosa
    import numpy as np
    import soxr
    import torch
    import whisper.audio

    from omni.eval.metrics import envelope_correlation
    from omni.tokenizers.audio import HOP, N_FFT, SAMPLE_RATE, log_mel, mel_to_wave
    from omni.toy import speech

    torch.set_num_threads(args.threads)
    basis = whisper.audio.mel_filters("cpu", 80).numpy().astype(np.float64)

    def ours(mel):
        return mel_to_wave(mel, args.iters)

    def theirs(mel):
        power = np.power(10.0, 4.0 * mel.double().numpy() - 4.0)
        mag = np.sqrt(np.maximum(librosa.util.nnls(basis, power), 0))
        mag = np.concatenate([mag, mag[:, -1:]], axis=1)
        return librosa.griffinlim(mag, n_iter=args.iters, hop_length=HOP, win_length=N_FFT, n_fft=N_FFT,
                                  length=mel.shape[1] * HOP, random_state=0).astype(np.float32)

    clips = [soxr.resample(np.asarray(u.synthesize()[0]), speech.ESPEAK_RATE, SAMPLE_RATE)
             for u in speech.corpus(args.clips, "heldout", seed=3)]
    mels = [log_mel(torch.from_numpy(c), 80) for c in clips]
    seconds = sum(len(c) for c in clips) / SAMPLE_RATE
    rows = {}
    for name, fn in (("omni (torch NNLS-MU + Griffin-Lim)", ours), ("librosa (nnls + griffinlim)", theirs)):
        fn(mels[0])  # warm-up: imports, numba compilation
        t0 = time.perf_counter()
        outs = [fn(m) for m in mels]
        rtf = (time.perf_counter() - t0) / seconds
        env = np.mean([envelope_correlation(c, o) for c, o in zip(clips, outs)])
        l1 = np.mean([(log_mel(torch.from_numpy(o), 80) - m).abs().mean().item() for o, m in zip(outs, mels)])
        rows[name] = rtf
        print(f"{name:38s} RTF {rtf:.4f}  envelope corr {env:.3f}  re-analysed mel L1 {l1:.4f}")
    a, b = rows.values()
    print(f"speed ratio (librosa time / omni time): {b / a:.2f}x  [{seconds:.1f} s of audio, {args.threads} thread(s)]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
