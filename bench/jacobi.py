"""Speculative Jacobi decoding on a trained checkpoint: codes per forward pass and time per image.

    nice .venv/bin/python bench/jacobi.py --checkpoint runs/demo/model/step_002100 \\
        [--captions "a red circle" ...] [--jacobi 4 8] [--batch 1 9]

How many guesses a pass keeps depends on the model (bench/generate.py uses random weights), so
this measures a real one, e.g. the one `omni demo` trains. Peer: the same model decoding one token
per pass (``jacobi=0``), in the same run; ratios > 1 mean Jacobi is faster. For each of greedy and
sampled codes, with and without classifier-free guidance, and each batch size (the batch advances
by its shortest accepted run), it prints the forward passes of the call (its rows decode in parallel), tokens fed per pass, and the
CPU time of the whole generate() call (median of ``--rounds``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

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
        model, tok = omni.load(args.checkpoint)
    except OmniError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tok.image is None:
        print(f"error: {args.checkpoint} has no image tokenizer: nothing to decode", file=sys.stderr)
        return 2
    n = tok.image.tokens_per_image
    passes: list[int] = []
    model.register_forward_pre_hook(lambda m, a, kw: passes.append(1), with_kwargs=True)

    print(f"{args.checkpoint}: {model.num_parameters() / 1e6:.1f}M parameters, {n} codes per image, "
          f"{args.threads} thread(s), median of {args.rounds}")
    print(f"{'codes':8s} {'CFG':>4s} {'batch':>5s} {'jacobi':>6s} {'passes':>12s} {'codes/pass':>10s} "
          f"{'time s':>8s} {'vs jacobi 0':>11s}")
    for name, sampling in (("greedy", SamplingConfig(temperature=0.0)), ("sampled", SamplingConfig(temperature=1.0))):
        for scale in (1.0, args.cfg_scale):
            for batch in args.batch:
                prompts = [args.captions[i % len(args.captions)] for i in range(batch)]
                base = None
                for j in [0] + args.jacobi:
                    cfg = GenerateConfig(max_new_tokens=n + 2, allow_text=False, allow_audio=False, min_images=1,
                                         max_images=1, cfg_scale=scale, image=sampling, jacobi=j, seed=0)
                    times, counts = [], []
                    for _ in range(args.rounds):
                        passes.clear()
                        t = time.process_time()
                        omni.generate(model, tok, prompts, cfg)
                        times.append(time.process_time() - t)
                        counts.append(len(passes) - 1)  # without the prefill
                    med, p = statistics.median(times), statistics.median(counts)
                    base = base or med
                    print(f"{name:8s} {scale:4g} {batch:5d} {j:6d} {p:12.0f} {(n + 1) / p:10.2f} {med:8.3f} "
                          f"{base / med:10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
