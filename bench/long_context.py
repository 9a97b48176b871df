"""Benchmark: prefill and per-token decode at long context, OmniDecoder vs transformers' Chameleon, with peak memory.

Peer: ``transformers.ChameleonForConditionalGeneration`` at the same shape (the ~20M recipe,
recipes/models/20m.yaml) holding the SAME weights (bench/decoder.py's ``build``: omni's Chameleon
converter), inference mode, fp32, both with a KV cache: omni's ``KVCache`` (allocated for the whole
length at its first write) and transformers' ``DynamicCache`` (grown by concatenation).

For each context length T (default 4K, 16K, 32K tokens) and each side, one child process
1. prefills T random tokens (one forward of [1, T] filling the cache), timed;
2. decodes ``--decode`` tokens one at a time (greedy), timed; the per-token median is reported;
3. reports the peak resident memory of the process during prefill and decode above what it held
   before (the weights are resident before): the KV cache, activations, the attention kernel's
   temporaries. A child's allocator returns big blocks on free (MALLOC_MMAP_THRESHOLD_), so the
   resident set follows live memory.
The sides run in interleaved rounds (order rotated) so that load from other work hits both alike;
medians over the rounds are printed with the spread, and the ratio to transformers.

Run alone on the machine: ``.venv/bin/python bench/long_context.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _timing import header, spread, table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HF = "transformers Chameleon"
OMNI = "OmniDecoder"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="models/20m", help="model recipe (default models/20m)")
    p.add_argument("--lengths", default="4096,16384,32768", help="context lengths in tokens (default 4096,16384,32768)")
    p.add_argument("--decode", type=int, default=16, help="tokens decoded after the prefill (default 16)")
    p.add_argument("--rounds", type=int, default=2, help="runs per side and length, interleaved (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--child", nargs=2, metavar=("SIDE", "LENGTH"), help=argparse.SUPPRESS)
    return p.parse_args()


def child(args) -> int:
    """One side at one length: prefill, decode, peak memory; prints one JSON line."""
    import torch
    from decoder import PeakRSS, build

    torch.set_num_threads(args.threads)
    side, T = args.child[0], int(args.child[1])
    cfg, hf, models = build(args.recipe)
    omni, hf = models[OMNI].eval(), hf.eval()
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    steps = []
    with torch.inference_mode(), PeakRSS(interval=0.005) as pk:
        t = time.perf_counter()
        if side == OMNI:
            cache = omni.new_cache(T + args.decode)
            logits = omni(ids, cache=cache).logits[:, -1]
        else:
            out = hf(input_ids=ids, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        prefill = time.perf_counter() - t
        for i in range(args.decode):
            nxt = logits.argmax(-1, keepdim=True)  # [1, 1]
            t = time.perf_counter()
            if side == OMNI:
                logits = omni(nxt, cache=cache).logits[:, -1]
            else:
                pos = torch.tensor([[T + i]])
                out = hf(input_ids=nxt, past_key_values=past, use_cache=True, position_ids=pos,
                         cache_position=pos[0])
                past, logits = out.past_key_values, out.logits[:, -1]
            steps.append(time.perf_counter() - t)
    print(json.dumps({"prefill": prefill, "decode": statistics.median(steps), "mb": pk.delta_mb,
                      "first": int(logits.argmax())}))
    return 0


def run_child(args, side: str, T: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--recipe", args.recipe, "--decode", str(args.decode), "--threads",
           str(args.threads), "--child", side, str(T)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    args = parse_args()
    if args.child:
        return child(args)
    import torch
    import transformers

    lengths = [int(x) for x in args.lengths.split(",")]
    header(__doc__.split("\n")[0], args, torch=torch.__version__, transformers=transformers.__version__)
    sides = [HF, OMNI]
    res: dict = {}
    for T in lengths:
        for r in range(args.rounds):
            for side in sides[r % 2:] + sides[:r % 2]:
                got = run_child(args, side, T)
                res.setdefault((side, T), []).append(got)
                print(f"T={T} round {r} {side}: {got}", flush=True)
    rows = []
    for T in lengths:
        ok = {s: [g for g in res[(s, T)] if "error" in g] == [] for s in sides}
        med = {s: {k: statistics.median(g[k] for g in res[(s, T)]) for k in ("prefill", "decode", "mb")}
               for s in sides if ok[s]}
        for s in sides:
            if not ok[s]:
                rows.append([T, s, "failed: " + res[(s, T)][0]["error"][:60], "", "", "", "", ""])
                continue
            m, ref = med[s], med.get(HF)
            rows.append([T, s, spread([g["prefill"] for g in res[(s, T)]], "{:.2f}"),
                         f"{ref['prefill'] / m['prefill']:.2f}x" if ref else "",
                         spread([g["decode"] * 1e3 for g in res[(s, T)]], "{:.1f}"),
                         f"{ref['decode'] / m['decode']:.2f}x" if ref else "", f"{m['mb']:.0f}",
                         f"{m['mb'] / ref['mb']:.2f}x" if ref and ref["mb"] > 0 else ""])
        same = ok[HF] and ok[OMNI] and res[(HF, T)][0]["first"] == res[(OMNI, T)][0]["first"]
        print(f"T={T}: the first decoded token after {args.decode} steps agrees: {same}")
    table(f"summary (median of {args.rounds} interleaved rounds; fp32, {args.threads} thread(s); "
          "ratios: transformers' time / ours, our memory / transformers')",
          ["tokens", "model", "prefill s (min..max)", "vs HF", "decode ms/token", "vs HF", "peak MiB", "vs HF"], rows,
          left=(1,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
