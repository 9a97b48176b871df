"""Mel-to-wave of the audio tokenizer: omni's torch Griffin-Lim and NNLS vs librosa's, step by step, float32 input.

Peer: librosa (``librosa.griffinlim``, ``librosa.util.nnls``), on the same clips in the same run.
Held-out espeak-ng sentences (offline) are resampled to 16 kHz; three rows, each timed on both
sides in interleaved rounds (median and min..max over ``--rounds``; a warm-up call first, so
librosa's numba compilation and omni's first-call set-up are not counted):

(a) Griffin-Lim alone, from the SAME linear magnitude spectrogram (float32, |whisper's STFT| of
    the clip: n_fft 400, hop 160, periodic Hann window, centred with reflect padding): omni's
    ``omni.tokenizers.audio.griffin_lim`` (torch.stft/istft) vs ``librosa.griffinlim`` with the
    same settings (``pad_mode="reflect"``, momentum 0.99, ``--iters`` iterations, float32 in,
    complex64 arithmetic through scipy.fft). Same algorithm (fast Griffin-Lim); what differs is
    the implementation and the random initial phases (each side's own RNG, seed 0).
(b) the mel -> linear inversion of whisper's log-mel (non-negative least squares against whisper's
    mel filters), on each side as its mel-to-wave uses it. The algorithms differ: omni starts from
    the clipped pseudo-inverse and runs 10 multiplicative updates (Lee & Seung) in float64 (its own
    code casts), timed by running ``mel_to_wave`` with its Griffin-Lim call stubbed out; librosa
    runs ``librosa.util.nnls`` (L-BFGS-B from the same clipped start; given float32, but scipy's
    L-BFGS-B works in float64). Quality: the relative residual |filters @ spectrum - mel power| /
    |mel power| (what both minimize).
(c) end to end, log-mel -> wave: ``omni.tokenizers.audio.mel_to_wave`` vs librosa's nnls +
    griffinlim (float32 mel in); differs by (b)'s algorithm and (a)'s implementation.

Quality of the waves: correlation of the energy envelopes with the input clip, and the L1 between
the re-analysed log-mel of the output and the input's.

    nice -n 19 .venv/bin/python bench/audio_tokenizer.py --clips 5 --rounds 5 --threads 1

Timings on a shared CPU are noisy: compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from unittest import mock

from _timing import header, interleaved, ratio, spread, table

OURS, THEIRS = "omni", "librosa"
ROWS = {
    "a": ("(a) Griffin-Lim alone", "same |STFT| in, float32 both; implementations and initial phases differ"),
    "b": ("(b) mel -> linear NNLS", "omni: pinv + 10 multiplicative updates, float64; librosa: L-BFGS-B, float64"),
    "c": ("(c) end to end", "(b)'s algorithms + (a)'s implementations; float32 mel in"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=5, help="held-out sentences (default 5)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--iters", type=int, default=32, help="Griffin-Lim iterations, both sides (default 32)")
    args = ap.parse_args(argv)

    import librosa
    import numpy as np
    import soxr
    import torch
    import whisper.audio

    import omni.tokenizers.audio as audio
    from omni.eval.metrics import envelope_correlation
    from omni.tokenizers.audio import HOP, N_FFT, NNLS_ITERS, SAMPLE_RATE, griffin_lim, log_mel, mel_to_wave
    from omni.toy import speech

    torch.set_num_threads(args.threads)
    header(__doc__.split("\n")[0], args, torch=torch.__version__, librosa=librosa.__version__,
           numpy=np.__version__, omni_nnls_iters=NNLS_ITERS)
    basis = whisper.audio.mel_filters("cpu", 80).numpy()  # float32 [80, 201]

    clips = [soxr.resample(np.asarray(u.synthesize()[0], dtype=np.float32), speech.ESPEAK_RATE, SAMPLE_RATE)
             for u in speech.corpus(args.clips, "heldout", seed=3)]
    clips = [c.astype(np.float32) for c in clips]
    mels = [log_mel(torch.from_numpy(c), 80) for c in clips]  # float32 [80, F]
    window = torch.hann_window(N_FFT)
    # (a)'s input: |whisper's STFT| [201, F+1], float32, the same array for both sides
    mags = [torch.stft(torch.from_numpy(c), N_FFT, HOP, window=window, return_complex=True).abs() for c in clips]
    seconds = sum(len(c) for c in clips) / SAMPLE_RATE

    def gl_ours(mag, length):
        return griffin_lim(mag, args.iters, length=length).numpy()

    def gl_theirs(mag, length):
        return librosa.griffinlim(mag.numpy(), n_iter=args.iters, hop_length=HOP, win_length=N_FFT, n_fft=N_FFT,
                                  window="hann", center=True, pad_mode="reflect", momentum=0.99,
                                  length=length, random_state=0)

    def nnls_ours(mel):
        """omni's mel_to_wave up to its Griffin-Lim call: -> magnitude [201, F+1]."""
        got = []
        with mock.patch.object(audio, "griffin_lim", lambda mag, *a, **k: got.append(mag) or torch.zeros(0)):
            mel_to_wave(mel, args.iters)
        return got[0]

    def nnls_theirs(mel):
        power = np.power(np.float32(10.0), 4.0 * mel.numpy() - 4.0)  # float32 [80, F]
        mag = np.sqrt(np.maximum(librosa.util.nnls(basis, power), 0))
        return torch.from_numpy(np.concatenate([mag, mag[:, -1:]], axis=1))  # [201, F+1] like omni's

    def e2e_ours(mel):
        return mel_to_wave(mel, args.iters)

    def e2e_theirs(mel):
        return gl_theirs(nnls_theirs(mel), mel.shape[1] * HOP)

    sides = {
        "a": {OURS: lambda: [gl_ours(m, len(c)) for m, c in zip(mags, clips)],
              THEIRS: lambda: [gl_theirs(m, len(c)) for m, c in zip(mags, clips)]},
        "b": {OURS: lambda: [nnls_ours(m) for m in mels], THEIRS: lambda: [nnls_theirs(m) for m in mels]},
        "c": {OURS: lambda: [e2e_ours(m) for m in mels], THEIRS: lambda: [e2e_theirs(m) for m in mels]},
    }
    calls = {(row, side): fn for row, fns in sides.items() for side, fn in fns.items()}
    outs = {key: fn() for key, fn in calls.items()}  # warm-up (numba compiles here); its outputs are judged
    times = interleaved(calls, args.rounds).wall

    def wave_quality(waves) -> str:
        env = np.mean([envelope_correlation(c, w) for c, w in zip(clips, waves)])
        l1 = np.mean([(log_mel(torch.from_numpy(np.asarray(w, dtype=np.float32)), 80) - m).abs().mean().item()
                      for w, m in zip(waves, mels)])
        return f"envelope corr {env:.3f}, mel L1 {l1:.4f}"

    def fit_quality(mags_) -> str:
        res = [np.linalg.norm(basis.astype(np.float64) @ (m[:, :-1].double().numpy() ** 2) - p) / np.linalg.norm(p)
               for m, p in zip(mags_, (np.power(10.0, 4.0 * mel.double().numpy() - 4.0) for mel in mels))]
        return f"mel fit residual {np.mean(res):.4f}"

    rows = []
    print(f"\n{seconds:.1f} s of audio in {len(clips)} clips; seconds per pass over all clips, "
          f"median (min..max) of {args.rounds} interleaved round(s)")
    for row, (title, differs) in ROWS.items():
        print(f"{title}: differs: {differs}")
        for side in (OURS, THEIRS):
            t = times[row, side]
            q = fit_quality(outs[row, side]) if row == "b" else wave_quality(outs[row, side])
            print(f"  {side:8s} {spread(t)} s  RTF {statistics.median(t) / seconds:.4f}  {q}")
        r = ratio(times[row, THEIRS], times[row, OURS])
        print(f"  librosa time / omni time: {r:.2f}x")
        rows.append([title, f"{statistics.median(times[row, OURS]) / seconds:.4f}",
                     f"{statistics.median(times[row, THEIRS]) / seconds:.4f}", f"{r:.2f}x", differs])
    table(f"summary (real-time factor = seconds per second of audio, median; {args.threads} torch thread(s))",
          ["row", "omni RTF", "librosa RTF", "librosa/omni", "what differs"], rows, left=(0, 4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
