"""Generation speed: omni.generate vs transformers' Chameleon generate(), same weights, one run.

    nice .venv/bin/python bench/generate.py [--recipe models/20m] [--text-tokens 128] [--grid 16]
                                            [--threads 1] [--dtype float32|bfloat16|float16]

Both models are the ~20M recipe holding the SAME weights (omni's Chameleon converter maps one
onto the other). Measured, as medians of ``--rounds`` interleaved rounds:

1. text decoding: a 16-token prompt, ``--text-tokens`` greedy new tokens -> decode tokens/s;
   and 64 new tokens after a ``--long-prompt``-token prompt (the call, prefill included: where the
   cache is long, a step's cost is the cache as well as the weights);
2. one image block (``<boi>`` + grid*grid codes + ``<eoi>``) without guidance, and
3. with classifier-free guidance (scale 3);
4. and 5. the same two with speculative Jacobi decoding (``jacobi``, ``--jacobi`` guesses per pass;
   greedy, so the ids are those of 2. and 3.). transformers' generate() has no counterpart for it.

Each in four columns: omni eager and with ``compile=True`` (the decode steps through
torch.compile), transformers' generate() as it runs by default on a CPU (eager, dynamic cache)
and with its static cache + ``compile_config`` (which it applies on CUDA by itself and on a CPU
only when told). The ratios put omni compiled against both.

transformers masks image-code logits in Chameleon's forward for the released weights, so its
generate() cannot emit image codes: its "image block" is the same number of new tokens
(``min_new_tokens = max_new_tokens``), the same model work. Its guidance is generate()'s
``guidance_scale`` (a second, unconditional forward per step). omni's image time also includes
decoding the block to pixels with the image tokenizer (random init; the decoder is timed, not
judged). Ratios > 1 mean omni is faster.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omni.checkpoint import DTYPES  # noqa: E402  (after the path insert: runs from a checkout)


def build(recipe: str, grid: int, context: int = 2048):
    import tempfile

    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    import omni
    from omni.chameleon import convert_state_dict
    from omni.commands.model import load_model_config
    from omni.config import TextTokenizerConfig
    from omni.config.image_tokenizer import ImageTokenizerConfig
    from omni.tokenizers.image import VQImageTokenizer
    from omni.tokenizers.text import train_text_tokenizer
    from omni.toy.text import write_corpus

    corpus = write_corpus(Path(tempfile.mkdtemp()) / "corpus.txt")
    text = train_text_tokenizer([str(corpus)], TextTokenizerConfig(vocab_size=4000), progress=False)
    image = VQImageTokenizer(ImageTokenizerConfig(image_size=grid * 8, codebook_size=1024)).eval()
    tok = omni.UnifiedTokenizer.build(text, image)
    cfg = load_model_config(recipe, [f"vocab_size={tok.vocab.size}", f"max_seq_len={max(context, grid * grid + 512)}"])
    hf_cfg = ChameleonConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_seq_len, swin_norm=cfg.swin_norm, tie_word_embeddings=cfg.tie_embeddings,
        vocabulary_map={"<image>": cfg.vocab_size - 1},
        vq_config=dict(embed_dim=8, num_embeddings=64, latent_channels=8, resolution=32, base_channels=32,
                       channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[]),
    )
    torch.manual_seed(0)
    hf = ChameleonForConditionalGeneration(hf_cfg).eval()
    model = omni.OmniDecoder(cfg).eval()
    model.load_state_dict(convert_state_dict(hf.state_dict(), cfg))
    model.set_modality_table(tok.vocab.modality_table)
    return tok, model, hf


def weight_read_floor(model, rounds: int = 30) -> tuple[float, int]:
    """(seconds, bytes): one [1, in] x [in, out] product per linear weight and the output head, the
    least a one-token decoding step must do; median over ``rounds``."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights += [model.head_weight] if model.output is None else []  # a tied head
    xs = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights]
    times = []
    with torch.inference_mode():
        for _ in range(rounds + 3):
            t0 = time.perf_counter()
            for w, x in zip(weights, xs):
                torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[3:]), sum(w.numel() * w.element_size() for w in weights)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="models/20m")
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--grid", type=int, default=16, help="image code grid side (16: 256 codes per image)")
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--jacobi", type=int, default=8, help="guesses per pass for the Jacobi rows (default 8)")
    ap.add_argument("--long-prompt", type=int, default=3000,
                    help="prompt length of the long-context row (text decoding after it; default 3000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=DTYPES,
                    help="both models' weights (bfloat16: as Chameleon's weights ship, transformers' torch_dtype)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import omni
    from omni.config.generate import GenerateConfig, SamplingConfig

    tok, model, hf = build(args.recipe, args.grid, args.long_prompt + args.text_tokens + 64)
    model.to(getattr(torch, args.dtype))
    hf.to(getattr(torch, args.dtype))
    greedy = SamplingConfig(temperature=0.0)
    prompt = "A short story about a red circle and a blue square, told in"
    ids = tok.encode(prompt)[:16]
    prompt_doc = tok.decode(ids[1:].tolist())
    n_block = args.grid * args.grid + 2

    def omni_text(compile=False):
        return omni.generate(model, tok, prompt_doc, GenerateConfig(
            max_new_tokens=args.text_tokens, text=greedy, allow_images=False, allow_audio=False, compile=compile))

    # the long-context row: a prompt of --long-prompt tokens (the story text repeated), then text
    long_ids = torch.cat([ids, ids[1:].repeat(args.long_prompt // (len(ids) - 1) + 1)])[:args.long_prompt]
    long_doc = tok.decode(long_ids[1:].tolist())
    long_new = 64

    def omni_long(compile=False):
        return omni.generate(model, tok, long_doc, GenerateConfig(
            max_new_tokens=long_new, text=greedy, allow_images=False, allow_audio=False, compile=compile))

    def omni_image(scale, jacobi=0, compile=False):
        return omni.generate(model, tok, prompt_doc, GenerateConfig(
            max_new_tokens=n_block, allow_text=False, min_images=1, max_images=1, cfg_scale=scale, image=greedy,
            jacobi=jacobi, compile=compile))

    passes = []
    model.register_forward_pre_hook(lambda m, a: passes.append(1))
    omni_image(1.0, args.jacobi)
    jacobi_passes = len(passes) - 1  # without the prefill

    from transformers import CompileConfig

    static = CompileConfig(dynamic=False)
    static._compile_all_devices = True  # generate() compiles only on CUDA unless told otherwise

    def hf_gen(n, scale=None, compiled=False, prompt=ids):
        extra = dict(cache_implementation="static", compile_config=static) if compiled else {}
        with torch.inference_mode():
            return hf.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               guidance_scale=scale, pad_token_id=0, **extra)

    cfg = f"CFG {args.cfg_scale:g}"
    jac = f"Jacobi {args.jacobi}"
    # case: (omni call taking compile=, transformers' key, new tokens)
    cases = {
        "text decode": (omni_text, "text", args.text_tokens),
        f"text after {args.long_prompt} tokens": (omni_long, "long", long_new),
        "image block": (lambda c: omni_image(1.0, compile=c), "image", n_block),
        f"image block, {cfg}": (lambda c: omni_image(args.cfg_scale, compile=c), "cfg", n_block),
        f"image block, {jac}": (lambda c: omni_image(1.0, args.jacobi, compile=c), "image", n_block),
        f"image block, {cfg}, {jac}": (lambda c: omni_image(args.cfg_scale, args.jacobi, compile=c), "cfg", n_block),
    }
    hf_calls = {"text": lambda c: hf_gen(args.text_tokens, compiled=c),
                "long": lambda c: hf_gen(long_new, compiled=c, prompt=long_ids), "image": lambda c: hf_gen(n_block, compiled=c),
                "cfg": lambda c: hf_gen(n_block, args.cfg_scale, compiled=c)}
    runs = {("omni", name, c): (lambda f=f, c=c: f(c)) for name, (f, _, _) in cases.items() for c in (False, True)}
    # not the long row compiled: its cache size is one more set of static graphs, and alternating
    # with them slowed transformers' other compiled rows 2-3x (measured); its eager column stays
    runs |= {("hf", key, c): (lambda f=f, c=c: f(c)) for key, f in hf_calls.items() for c in (False, True)
             if not (key == "long" and c)}
    t0 = time.perf_counter()
    for fn in runs.values():  # warm-up, and the compilations of both stacks
        fn()
    warm = time.perf_counter() - t0
    times: dict[tuple, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):  # interleaved, so a busy moment of the machine hits every column
        for key, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor_s, weight_bytes = weight_read_floor(model)
    print(f"{args.recipe}: {model.num_parameters() / 1e6:.1f}M parameters, vocab {tok.vocab.size}, "
          f"{args.dtype}, {args.threads} thread(s), median of {args.rounds} interleaved rounds (warm-up and compiling: {warm:.0f} s)")
    print("seconds per call (tokens/s); eager = plain PyTorch, compiled = torch.compile "
          "(omni: compile=True; transformers: static cache + compile_config)")
    print(f"{'':32s} {'omni eager':>17s} {'omni compiled':>17s} {'HF eager':>17s} {'HF compiled':>17s}"
          f"   ratios: {'eager/eager':>11s} {'comp/HF eager':>13s} {'comp/comp':>9s}")
    for name, (_, key, n) in cases.items():
        cols = [med["omni", name, False], med["omni", name, True], med["hf", key, False], med.get(("hf", key, True))]
        cells = " ".join(f"{t:7.3f} ({n / t:6.1f})" if t else f"{'-':>16s}" for t in cols)
        comp = f"{cols[3] / cols[1]:8.2f}x" if cols[3] else f"{'-':>9s}"
        print(f"{name:32s} {cells}   {cols[2] / cols[0]:10.2f}x {cols[2] / cols[1]:12.2f}x {comp}")
    per_token = med["omni", "text decode", True] / args.text_tokens
    print(f"weight-read floor of one token: the matrix-vector products of every linear layer and the head "
          f"({weight_bytes / 1e6:.0f} MB): {floor_s * 1e3:.2f} ms ({weight_bytes / floor_s / 1e9:.1f} GB/s); "
          f"omni compiled text decoding: {per_token * 1e3:.2f} ms per token ({floor_s / per_token:.0%} of it is the floor)")
    hf_token = med["hf", "text", False] / args.text_tokens
    print(f"transformers eager text decoding: {hf_token * 1e3:.2f} ms per token: with one token per pass "
          f"over these weights through torch's matrix-vector kernels, nothing beats it by more than "
          f"{hf_token / floor_s:.2f}x (its time / the floor)")
    print(f"Jacobi {args.jacobi}: {n_block - 1} tokens of the block in {jacobi_passes} passes "
          f"({(n_block - 1) / jacobi_passes:.2f} tokens per pass; random weights: how many guesses hold "
          f"depends on the model, see the README)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
