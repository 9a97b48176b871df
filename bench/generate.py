"""Generation speed: omni.generate vs transformers' Chameleon generate(), same weights, one run.

    nice -n 19 .venv/bin/python bench/generate.py [--recipe models/20m] [--text-tokens 128] [--grid 16]
                                        [--rounds 3] [--threads 1] [--dtype float32|bfloat16|float16]

Both models are the ~20M recipe holding the SAME weights (omni's Chameleon converter maps one
onto the other), cast to the same ``--dtype``. Measured, as medians (and min..max) of ``--rounds``
interleaved rounds (every call once per round, the order rotated; one warm-up call each first):

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
only when told; ``--no-compile`` leaves both compiled columns out). The ratios put omni compiled
against both.

Same work on both sides: every row makes the same number of new tokens in every column. transformers
is told ``min_new_tokens = max_new_tokens``; omni's text rows are run with ``<eos>`` banned (its
constraint would otherwise let greedy decoding stop early). The bench counts the new tokens of
every call (omni: its ``on_token`` callback; transformers: the output's length) and exits 1 naming
the row and the counts if they differ.

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
from unittest import mock

import torch
from _timing import header, interleaved, spread, table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omni.checkpoint import DTYPES  # noqa: E402  (after the path insert: runs from a checkout)
from omni.generation import generator  # noqa: E402
from omni.generation.processors import ModalityConstraint  # noqa: E402


class NoEosConstraint(ModalityConstraint):
    """omni's constraint with ``<eos>`` banned wherever something else is allowed: text runs to
    ``max_new_tokens``, as transformers' generate() does with ``min_new_tokens = max_new_tokens``."""

    def allowed(self, state, r):
        allow = super().allowed(state, r)
        if allow[state.eos] and int(allow.sum()) > 1:
            allow = allow.clone()
            allow[state.eos] = False
        return allow


def check_counts(made: dict[tuple, set[int]], cases: dict) -> None:
    """Exit 1 unless, for every row, every column (omni and transformers) made the row's token count."""
    for name, (_, key, n) in cases.items():
        omni_n = sorted({c for k, v in made.items() if k[:2] == ("omni", name) for c in v})
        hf_n = sorted({c for k, v in made.items() if k[:2] == ("hf", key) for c in v})
        if omni_n != [n] or hf_n != [n]:
            sys.exit(f"bench/generate.py: row {name!r}: omni made {omni_n} new tokens, transformers made "
                     f"{hf_n} (both should make {n}): the two stacks would be timed on different work")


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
    ap.add_argument("--no-compile", action="store_true",
                    help="leave out the compiled columns of both stacks (no compilation: a quick check)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    header(__doc__.split("\n")[0], args, torch=torch.__version__, transformers=transformers.__version__)
    with mock.patch.object(generator, "ModalityConstraint", NoEosConstraint):  # see the module docstring
        return run(args)


def run(args) -> int:
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

    def omni_gen(doc, config) -> int:
        """omni.generate's new tokens (of the one prompt)."""
        count = []
        omni.generate(model, tok, doc, config, on_token=lambda row, token: count.append(token))
        return len(count)

    def omni_text(compile=False):
        return omni_gen(prompt_doc, GenerateConfig(
            max_new_tokens=args.text_tokens, text=greedy, allow_images=False, allow_audio=False, compile=compile))

    # the long-context row: a prompt of --long-prompt tokens (the story text repeated), then text
    long_ids = torch.cat([ids, ids[1:].repeat(args.long_prompt // (len(ids) - 1) + 1)])[:args.long_prompt]
    long_doc = tok.decode(long_ids[1:].tolist())
    long_new = 64

    def omni_long(compile=False):
        return omni_gen(long_doc, GenerateConfig(
            max_new_tokens=long_new, text=greedy, allow_images=False, allow_audio=False, compile=compile))

    def omni_image(scale, jacobi=0, compile=False):
        return omni_gen(prompt_doc, GenerateConfig(
            max_new_tokens=n_block, allow_text=False, min_images=1, max_images=1, cfg_scale=scale, image=greedy,
            jacobi=jacobi, compile=compile))

    passes = []
    hook = model.register_forward_pre_hook(lambda m, a: passes.append(1))
    omni_image(1.0, args.jacobi)
    hook.remove()  # not carried into the timed calls
    jacobi_passes = len(passes) - 1  # without the prefill

    from transformers import CompileConfig

    static = CompileConfig(dynamic=False)
    static._compile_all_devices = True  # generate() compiles only on CUDA unless told otherwise

    def hf_gen(n, scale=None, compiled=False, prompt=ids):
        extra = dict(cache_implementation="static", compile_config=static) if compiled else {}
        with torch.inference_mode():
            out = hf.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              guidance_scale=scale, pad_token_id=0, **extra)
        return out.shape[1] - len(prompt)  # new tokens

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
    compiled = (False,) if args.no_compile else (False, True)
    made: dict[tuple, set[int]] = {}  # call -> the counts of new tokens it made

    def counted(key, fn):
        def call():
            made.setdefault(key, set()).add(fn())
        return call

    runs = {("omni", name, c): counted(("omni", name, c), lambda f=f, c=c: f(c))
            for name, (f, _, _) in cases.items() for c in compiled}
    # not the long row compiled: its cache size is one more set of static graphs, and alternating
    # with them slowed transformers' other compiled rows 2-3x (measured); its eager column stays
    runs |= {("hf", key, c): counted(("hf", key, c), lambda f=f, c=c: f(c)) for key, f in hf_calls.items()
             for c in compiled if not (key == "long" and c)}
    t0 = time.perf_counter()
    for fn in runs.values():  # warm-up, and the compilations of both stacks
        fn()
    warm = time.perf_counter() - t0
    check_counts(made, cases)  # before the timed rounds: fail fast
    times = interleaved(runs, args.rounds).wall  # a busy moment of the machine hits every column
    check_counts(made, cases)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor_s, weight_bytes = weight_read_floor(model)
    print(f"{args.recipe}: {model.num_parameters() / 1e6:.1f}M parameters, vocab {tok.vocab.size}, "
          f"{args.dtype}, {args.threads} thread(s), {args.rounds} interleaved rounds (warm-up and compiling: {warm:.0f} s); "
          f"new tokens per row checked equal in every column")
    print("seconds per call, median (min..max); eager = plain PyTorch, compiled = torch.compile "
          "(omni: compile=True; transformers: static cache + compile_config)")
    columns = [("omni", False, "omni eager"), ("omni", True, "omni compiled"), ("hf", False, "HF eager"),
               ("hf", True, "HF compiled")]
    print(f"{'':32s} {'tokens':>6s}" + "".join(f" {title:>23s}" for _, _, title in columns))
    for name, (_, key, n) in cases.items():
        keys = [(side, name if side == "omni" else key, c) for side, c, _ in columns]
        print(f"{name:32s} {n:6d}" + "".join(f" {spread(times[k]) if k in times else '-':>23s}" for k in keys))
    per_token = med["omni", "text decode", not args.no_compile] / args.text_tokens
    print(f"weight-read floor of one token: the matrix-vector products of every linear layer and the head "
          f"({weight_bytes / 1e6:.0f} MB): {floor_s * 1e3:.2f} ms ({weight_bytes / floor_s / 1e9:.1f} GB/s); "
          f"omni {'eager' if args.no_compile else 'compiled'} text decoding: {per_token * 1e3:.2f} ms per token "
          f"({floor_s / per_token:.0%} of it is the floor)")
    hf_token = med["hf", "text", False] / args.text_tokens
    print(f"transformers eager text decoding: {hf_token * 1e3:.2f} ms per token: with one token per pass "
          f"over these weights through torch's matrix-vector kernels, nothing beats it by more than "
          f"{hf_token / floor_s:.2f}x (its time / the floor)")
    print(f"Jacobi {args.jacobi}: {n_block - 1} tokens of the block in {jacobi_passes} passes "
          f"({(n_block - 1) / jacobi_passes:.2f} tokens per pass; random weights: how many guesses hold "
          f"depends on the model, see the README)")
    best = False if args.no_compile else True  # omni's column the ratios are of
    rows = []
    for name, (_, key, n) in cases.items():
        ours, hf_eager, hf_comp = med["omni", name, best], med["hf", key, False], med.get(("hf", key, True))
        rows.append([name, n, f"{n / med['omni', name, False]:.1f}", f"{n / ours:.1f}" if best else "-",
                     f"{n / hf_eager:.1f}", f"{n / hf_comp:.1f}" if hf_comp else "-",
                     f"{hf_eager / med['omni', name, False]:.2f}x", f"{hf_eager / ours:.2f}x" if best else "-",
                     f"{hf_comp / ours:.2f}x" if hf_comp else "-"])
    table(f"summary: tokens/s (median of {args.rounds} rounds) and ratios of median times (> 1: omni faster)",
          ["row", "tokens", "omni eager", "omni comp", "HF eager", "HF comp", "eager/eager", "comp/HF eager",
           "comp/comp"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
