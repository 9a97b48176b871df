"""Benchmark: one training step (forward + backward + AdamW) of OmniDecoder vs transformers' Chameleon.

Peer: ``transformers.ChameleonForConditionalGeneration`` (extra ``hf``) at the same shape (the
~20M recipe, recipes/models/20m.yaml), holding the SAME weights (copied with omni's Chameleon
converter), so both compute the same function; the first losses are printed as a check.

In one run it
1. measures the matmul peak of this CPU at the model's own GEMM shapes: a "step" made only of
   the forward, input-grad and weight-grad products of every linear layer and the output head at
   B*T rows (``torch.mm`` into preallocated outputs), timed in the same rounds as the models, so
   that it sees the same load; peak = its FLOPs / its median time;
2. measures the other kernel both models must call: SDPA's causal attention, forward + backward
   at the model's attention shape, once per layer (the flash kernel on a CPU). Matmuls plus
   attention are the floor of a step for any implementation calling these kernels: the bench
   prints the most tokens/s, the highest ratio to transformers and the highest share of the
   peak that floor leaves;
3. times training steps of transformers' Chameleon (eager, its default SDPA attention), OmniDecoder
   eager and OmniDecoder under ``torch.compile`` (inductor's C++ backend), interleaved round by
   round (order rotated) so that load from other processes hits all alike; medians are reported,
   of wall time and (with one thread) of the process's CPU time, which leaves out the time a step
   waited for a core held by another process. All use torch's fused AdamW;
4. reports tokens/s, the ratio to transformers, model FLOP/s (omni.model.flops_per_token: 6N +
   causal attention) as a share of the measured peak, and the peak memory of a step: the highest
   resident set size seen during the step minus the one before it (activations, gradients,
   temporaries; weights and AdamW state are resident before and are the same for all), measured
   in a child process per model whose allocator returns big blocks on free (not timed).

The machine may be shared: use ``nice``, and read the spread (min..max) printed next to each median.
Run: ``nice -n 19 .venv/bin/python bench/decoder.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from _timing import header, interleaved, spread, table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


REF = "matmul peak"
ATTN = "attention kernel"
HF = "transformers Chameleon"
OMNI = "OmniDecoder"
OMNI_C = "OmniDecoder + torch.compile"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="models/20m", help="model recipe (default models/20m)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--rounds", type=int, default=7, help="timed steps per model, interleaved (default 7)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine two OpenMP threads spin-wait on each other)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile run")
    p.add_argument("--memory-of", metavar="NAME", help=argparse.SUPPRESS)  # child: peak memory of one model
    return p.parse_args()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest resident set size seen (sampled every ``interval`` seconds) while the block runs."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def gemm_shapes(cfg, tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every matmul of a training step's linear layers: forward, input grad, weight grad."""
    d = cfg.head_dim
    linears = [(cfg.dim, cfg.n_heads * d), (cfg.dim, cfg.n_kv_heads * d), (cfg.dim, cfg.n_kv_heads * d),
               (cfg.n_heads * d, cfg.dim), (cfg.dim, cfg.ffn_dim), (cfg.dim, cfg.ffn_dim), (cfg.ffn_dim, cfg.dim)]
    shapes = []
    for fin, fout in linears * cfg.n_layers + [(cfg.dim, cfg.vocab_size)]:
        shapes += [(tokens, fin, fout), (tokens, fout, fin), (fout, tokens, fin)]
    return shapes


def attn_flops(cfg, batch: int, seq: int) -> float:
    """FLOPs of causal attention's score and value products in a training step (forward + 2x backward)."""
    return 3 * cfg.n_layers * 2 * 2 * batch * cfg.n_heads * seq * seq * cfg.head_dim / 2


def matmul_step(shapes):
    """A step of matmuls only: every GEMM of a training step, as ``torch.mm`` on preallocated tensors.

    Returns ``(run, flops)``: timing ``run()`` in the same rounds as the model steps gives the
    matmul peak at the model's own shapes under the same load.
    """
    import torch

    bufs = []
    flops = 0.0
    for (M, K, N) in sorted(set(shapes)):
        bufs.append((torch.randn(M, K), torch.randn(K, N), torch.empty(M, N), shapes.count((M, K, N))))
        flops += 2.0 * M * K * N * shapes.count((M, K, N))

    def run():
        for a, b, c, count in bufs:
            for _ in range(count):
                torch.mm(a, b, out=c)

    return run, flops


def attention_step(cfg, batch: int, seq: int):
    """A step of attention only: SDPA's causal kernel, forward and backward, once per layer, on
    q [B, H, T, d] and k, v [B, K, T, d] laid out as both models make them (transposed views of
    [B, T, heads, d] projections)."""
    import torch
    import torch.nn.functional as F

    B, T, H, K, d = batch, seq, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = torch.randn(B, T, H, d).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, K, d).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, K, d).transpose(1, 2).requires_grad_()
    grad = torch.randn(B, H, T, d)

    def run():
        for _ in range(cfg.n_layers):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)  # [B, H, T, d]
            y.backward(grad)
            q.grad = k.grad = v.grad = None

    return run


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def build(cfg_path: str):
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from omni.chameleon import convert_state_dict
    from omni.commands.model import load_model_config
    from omni.model import OmniDecoder

    cfg = load_model_config(cfg_path)
    hf_cfg = ChameleonConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_seq_len, swin_norm=cfg.swin_norm, tie_word_embeddings=cfg.tie_embeddings,
        vocabulary_map={"<image>": cfg.vocab_size - 1},  # no image codes: nothing for it to mask
        # the VQ-GAN is built by ChameleonModel but takes no part in a text forward: keep it tiny
        vq_config=dict(embed_dim=8, num_embeddings=64, latent_channels=8, resolution=32, base_channels=32,
                       channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[]),
    )
    torch.manual_seed(0)
    hf = ChameleonForConditionalGeneration(hf_cfg).train()
    hf.model.vqmodel.requires_grad_(False)
    state = convert_state_dict(hf.state_dict(), cfg)
    models = {}
    for name in (OMNI, OMNI_C):
        m = OmniDecoder(cfg).train()
        m.load_state_dict(state)
        models[name] = m
    return cfg, hf, models


def make_steps(args, cfg, hf, models, which):
    """name -> a function running one training step (and returning its loss)."""
    import torch

    B, T = args.batch, args.seq
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1))
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    steps = {}
    if REF in which:
        steps[REF], _ = matmul_step(gemm_shapes(cfg, B * T))
    if ATTN in which:
        steps[ATTN] = attention_step(cfg, B, T)
    if HF in which:
        # The same optimizer for all: torch's fused AdamW (one kernel per parameter on CPU).
        opt_hf = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4, fused=True)

        def hf_step():
            # transformers shifts labels itself: labels = the inputs; the last position predicts nothing
            out = hf(input_ids=ids[:, :T], labels=ids[:, :T])
            out.loss.backward()
            opt_hf.step()
            opt_hf.zero_grad(set_to_none=True)
            return out.loss

        steps[HF] = hf_step
    for name in (OMNI, OMNI_C):
        if name not in which:
            continue
        m = models[name]
        fwd = torch.compile(m) if name == OMNI_C else m
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)

        def step(fwd=fwd, opt=opt):
            out = fwd(x, labels=y)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.ce_loss

        steps[name] = step
    return steps


def memory_child(args) -> int:
    """Peak resident memory of one training step of one model, above the resident memory before it."""
    import json

    import torch

    torch.set_num_threads(args.threads)
    cfg, hf, models = build(args.recipe)
    step = make_steps(args, cfg, hf, models, [args.memory_of])[args.memory_of]
    step()
    step()
    with PeakRSS(interval=0.002) as pk:
        step()
    print(json.dumps({"name": args.memory_of, "mb": pk.delta_mb}))
    return 0


def measure_memory(args, name: str) -> float:
    """Run :func:`memory_child` in a fresh process where big tensors come from mmap and go back on free,
    so that the resident set size follows live memory (that would slow the timed steps down)."""
    import json
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--recipe", args.recipe, "--batch", str(args.batch), "--seq", str(args.seq),
           "--threads", str(args.threads), "--memory-of", name]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["mb"]


def main() -> int:
    args = parse_args()
    if args.memory_of:
        return memory_child(args)
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    from omni.model import flops_per_token

    settings = {k: v for k, v in vars(args).items() if k != "memory_of"}
    header(__doc__.split("\n")[0], settings, torch=torch.__version__, transformers=transformers.__version__)
    cfg, hf, models = build(args.recipe)
    B, T = args.batch, args.seq
    tokens = B * T
    fpt = flops_per_token(cfg, T)
    shapes = gemm_shapes(cfg, tokens)
    mm_flops = sum(2.0 * M * K * N for M, K, N in shapes)
    print(f"recipe {args.recipe} ({models[OMNI].num_parameters() / 1e6:.1f}M parameters), "
          f"batch {B} x seq {T} = {tokens} tokens/step, fp32, {args.threads} thread(s), torch {torch.__version__}")
    print(f"peer: transformers {transformers.__version__} ChameleonForConditionalGeneration "
          f"(attention: {hf.config._attn_implementation}), same weights; all with fused AdamW")
    kernels = [REF, ATTN]  # timed in the rounds, not models
    names = kernels + [HF, OMNI] + ([] if args.no_compile else [OMNI_C])
    steps = make_steps(args, cfg, hf, models, names)

    first = {}
    for name, step in steps.items():  # warm-up (and compilation)
        t = time.perf_counter()
        loss = step()
        step()
        if loss is not None:
            first[name] = float(loss.detach())
        print(f"warm-up {name}: 2 steps in {time.perf_counter() - t:.1f}s", flush=True)
    # Wall time, and CPU time of this process: with one thread the latter leaves out the time the
    # step waited for a core that other processes held, which on a shared machine is most of the noise.
    timed = interleaved(steps, args.rounds)
    models_ = names[len(kernels):]
    mem = {name: measure_memory(args, name) for name in models_}
    print(f"\nFLOPs/token (6N + causal attention, omni.model.flops_per_token): {fpt / 1e6:.1f}M; "
          f"first losses: " + ", ".join(f"{k} {v:.4f}" for k, v in first.items()))

    clocks = [("CPU time", timed.cpu)] if args.threads == 1 else []
    summary = {}  # clock -> rows of the closing table
    for clock, times in clocks + [("wall time", timed.wall)]:
        peak = mm_flops / statistics.median(times[REF])
        print(f"\n[{clock}] matmul peak at the model's {len(set(shapes))} GEMM shapes ({len(shapes)} products "
              f"per step): {peak / 1e9:.1f} GFLOP/s (median over the rounds; "
              f"{mm_flops / min(times[REF]) / 1e9:.1f} in the best round)")
        print(f"{'model':28s} {'step s (min..max)':>21s} {'tokens/s':>9s} {'vs HF':>6s} {'GFLOP/s':>8s} "
              f"{'of peak':>8s} {'step MiB':>9s}")
        ref = statistics.median(times[HF])
        for name in models_:
            med = statistics.median(times[name])
            tps = tokens / med
            achieved = fpt * tps
            print(f"{name:28s} {spread(times[name]):>21s} {tps:9.0f} "
                  f"{ref / med:5.2f}x {achieved / 1e9:8.1f} {achieved / peak:7.0%} {mem[name]:9.0f}")
            summary.setdefault(clock, []).append([name, f"{tps:.0f}", f"{ref / med:.2f}x", f"{achieved / peak:.0%}",
                                                  f"{mem[name]:.0f}"])
        mm_s, attn_s = statistics.median(times[REF]), statistics.median(times[ATTN])
        floor = mm_s + attn_s
        print(f"{'kernel floor (see below)':28s} {floor:7.3f} {'':13s} {tokens / floor:9.0f} {ref / floor:5.2f}x "
              f"{fpt * tokens / floor / 1e9:8.1f} {fpt * tokens / floor / peak:7.0%}")
        summary[clock].append(["kernel floor (matmuls + SDPA)", f"{tokens / floor:.0f}", f"{ref / floor:.2f}x",
                               f"{fpt * tokens / floor / peak:.0%}", ""])
        print(f"kernel floor = the step's matmuls at the measured peak ({mm_s:.3f} s) + SDPA's causal attention "
              f"forward+backward x {cfg.n_layers} layers ({attn_s:.3f} s, "
              f"{attn_flops(cfg, B, T) / attn_s / 1e9:.1f} GFLOP/s): no model calling these kernels steps faster")
    clock = next(iter(summary))
    table(f"summary ({clock}, median of {args.rounds} interleaved rounds; batch {B} x {T} tokens)",
          ["model", "tokens/s", "vs transformers", "of matmul peak", "step MiB"], summary[clock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
