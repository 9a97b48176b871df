"""Speculative Jacobi decoding on a trained checkpoint: codes per forward pass and time per image.

    nice -n 19 .venv/bin/python bench/jacobi.py --checkpoint runs/demo/model/step_002100 \\
        [--captions "a red circle" ...] [--jacobi 4 8] [--batch 1 9] [--rounds 3]

How many guesses a pass keeps depends on the model (bench/generate.py uses random weights), so
this measures a real one, e.g. the one `omni demo` trains. Peer: the same model decoding one token
per pass (``jacobi=0``), same weights, dtype (as saved) and prompts, in the same run; ratios > 1
mean Jacobi is faster. For each of greedy and sampled codes, with and without classifier-free
guidance, and each batch size (the batch advances by its shortest accepted run), the settings
``jacobi=0`` and each ``--jacobi`` value are timed in interleaved rounds (A B, B A, ...; one
warm-up call each first), and it prints the forward passes of the call (its rows decode in
parallel), codes per pass, and the CPU time of the whole generate() call: median (min..max) of
``--rounds``, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from _timing import header, interleaved, ratio, spread, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CAPTIONS = ["a red circle", "a blue square above a green triangle",
            "a yellow triangle left of a red square and a blue circle"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="an omni checkpoint directory with an image tokenizer")
    ap.add_argument("--captions", nargs="+", default=CAPTIONS)
    ap.add_argument("--jacobi", type=int, nargs="+", default=[4, 8], help="guesses per pass to compare (default 4 8)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 9], help="prompts per call (default 1 9)")
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import omni
    from omni.config.generate import GenerateConfig, SamplingConfig
    from omni.errors import OmniError

    try:
        model, tok = omni.load(args.checkpoint, device="cpu")  # the figures are CPU times
    except OmniError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tok.image is None:
        print(f"error: {args.checkpoint} has no image tokenizer: nothing to decode", file=sys.stderr)
        return 2
    n = tok.image.tokens_per_image
    passes: list[int] = []
    model.register_forward_pre_hook(lambda m, a, kw: passes.append(1), with_kwargs=True)

    header(__doc__.split("\n")[0], args, torch=torch.__version__,
           model=f"{model.num_parameters() / 1e6:.1f}M parameters, {next(model.parameters()).dtype}",
           codes_per_image=n)
    print(f"CPU time per generate() call, median (min..max) of {args.rounds} interleaved round(s)")
    print(f"{'codes':8s} {'CFG':>4s} {'batch':>5s} {'jacobi':>6s} {'passes':>7s} {'codes/pass':>10s} "
          f"{'time s (min..max)':>24s} {'vs jacobi 0':>11s}")
    rows = []
    for name, sampling in (("greedy", SamplingConfig(temperature=0.0)), ("sampled", SamplingConfig(temperature=1.0))):
        for scale in (1.0, args.cfg_scale):
            for batch in args.batch:
                prompts = [args.captions[i % len(args.captions)] for i in range(batch)]
                counts: dict[int, list[int]] = {}

                def call(j, prompts=prompts, sampling=sampling, scale=scale, counts=counts):
                    cfg = GenerateConfig(max_new_tokens=n + 2, allow_text=False, allow_audio=False, min_images=1,
                                         max_images=1, cfg_scale=scale, image=sampling, jacobi=j, seed=0)
                    passes.clear()
                    omni.generate(model, tok, prompts, cfg)
                    counts.setdefault(j, []).append(len(passes) - 1)  # without the prefill

                calls = {j: (lambda j=j: call(j)) for j in [0] + args.jacobi}
                for fn in calls.values():  # warm-up
                    fn()
                counts.clear()
                times = interleaved(calls, args.rounds).cpu
                for j, t in times.items():
                    p = statistics.median(counts[j])
                    r = ratio(times[0], t)
                    print(f"{name:8s} {scale:4g} {batch:5d} {j:6d} {p:7.0f} {(n + 1) / p:10.2f} "
                          f"{spread(t):>24s} {r:10.2f}x", flush=True)
                    if j:
                        rows.append([f"{name}, CFG {scale:g}, batch {batch}, jacobi {j}", f"{(n + 1) / p:.2f}",
                                     f"{statistics.median(t):.3f}", f"{statistics.median(times[0]):.3f}", f"{r:.2f}x"])
    table("summary (CPU time per call, median)", ["case", "codes/pass", "jacobi s", "jacobi 0 s", "speed-up"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
