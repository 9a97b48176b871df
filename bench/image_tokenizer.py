"""Encode throughput: our VQImageTokenizer vs transformers' ChameleonVQVAE, same weights, same run.

Peer: transformers' ``ChameleonVQVAE.encode`` (extra ``hf``). Builds a random
``ChameleonForConditionalGeneration`` with the chosen VQGAN configuration, saves it with
``save_pretrained``, imports its image tokenizer with ``import_chameleon_vqgan`` and times
``encode`` of both, float32 weights and input on both sides, on the same batch of real photo crops
(scikit-image, offline; ours takes [0, 1] pixels and maps them to [-1, 1] itself, transformers is
given them mapped). Checks that the codes are identical, then times the two in interleaved rounds
(A B, B A, ... after one warm-up call each) and prints, per side, images/s as the median and
min..max over ``--rounds``, and the ratio of the median times (ours / theirs in speed).

    nice -n 19 .venv/bin/python bench/image_tokenizer.py --threads 1 --rounds 10   # Chameleon's layout, 128 px
    nice -n 19 .venv/bin/python bench/image_tokenizer.py --resolution 512 --base-channels 128   # Chameleon's size

Timings on a shared CPU are noisy: compare the ratio, not the absolute figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings

from _timing import header, interleaved, ratio, spread, table

OURS, HF = "omni VQImageTokenizer.encode", "transformers ChameleonVQVAE.encode"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--base-channels", type=int, default=64)
    ap.add_argument("--channel-multiplier", type=int, nargs="+", default=[1, 1, 2, 2, 4])
    ap.add_argument("--num-res-blocks", type=int, default=2)
    ap.add_argument("--codebook-size", type=int, default=8192)
    ap.add_argument("--embed-dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=5,
                    help="interleaved timed rounds (default 5)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args(argv)

    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from omni.chameleon import import_chameleon_vqgan
    from omni.toy.photos import photos, random_crops

    if args.threads:
        torch.set_num_threads(args.threads)
    header(__doc__.split("\n")[0], args, torch=torch.__version__, torch_threads=torch.get_num_threads())
    torch.manual_seed(0)
    vq = dict(resolution=args.resolution, base_channels=args.base_channels,
              channel_multiplier=args.channel_multiplier, num_res_blocks=args.num_res_blocks,
              num_embeddings=args.codebook_size, embed_dim=args.embed_dim, latent_channels=args.embed_dim,
              attn_resolutions=None, attn_type="vanilla")
    cfg = ChameleonConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, vq_config=vq,
                          vocabulary_map={"<image>": 3})
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF's std-0.02 init gives one code everywhere; use PyTorch's default init
        for m in model.model.vqmodel.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.GroupNorm)):
                m.reset_parameters()
        model.model.vqmodel.quantize.embedding.weight.normal_(0, 0.3)
    hf = model.model.vqmodel
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = import_chameleon_vqgan(d)

    x = random_crops(photos("all"), args.batch, args.resolution, seed=0)  # [B,3,R,R] in [0,1]
    pixel_values = x * 2 - 1

    dtypes = {p.dtype for p in ours.parameters()} | {p.dtype for p in hf.parameters()} | {x.dtype}
    calls = {OURS: lambda: ours.encode(x), HF: lambda: hf.encode(pixel_values).image_tokens}
    with torch.inference_mode():
        same = torch.equal(calls[OURS]().reshape(-1), calls[HF]().long())  # also the warm-up
        times = interleaved(calls, args.rounds).wall

    grid = ours.grid
    print(f"config: {args.resolution}px -> {grid[0]}x{grid[1]} codes of {args.codebook_size}, base_channels "
          f"{args.base_channels}, multipliers {args.channel_multiplier}, {args.num_res_blocks} res blocks, "
          f"batch {args.batch}, weights and input {'/'.join(sorted(str(d) for d in dtypes))}")
    print(f"codes identical: {same}")
    print(f"images/s, median (min..max) of {args.rounds} interleaved round(s):")
    rates = {name: [args.batch / s for s in t] for name, t in times.items()}
    for name, r in rates.items():
        print(f"  {name:36s} {spread(r, '{:.2f}')}")
    print(f"  ratio of median times (transformers / omni: > 1 means omni is faster): {ratio(times[HF], times[OURS]):.3f}")
    table("summary", ["encode", "images/s (median)", "vs transformers"],
          [[name, f"{statistics.median(rates[name]):.2f}", f"{ratio(times[HF], t):.3f}x"]
           for name, t in times.items()] + [["codes identical", str(same), ""]])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
