"""Encode throughput: our VQImageTokenizer vs transformers' ChameleonVQVAE, same weights, same run.

Builds a random ``ChameleonForConditionalGeneration`` with the chosen VQGAN configuration, saves
it with ``save_pretrained``, imports its image tokenizer with ``import_chameleon_vqgan`` and
times ``encode`` of both on the same batch of real photo crops (scikit-image, offline). Checks
that the codes are identical, then prints images/s for each and the ratio (ours / theirs).

    .venv/bin/python bench/image_tokenizer.py                     # Chameleon's layout, 128 px
    .venv/bin/python bench/image_tokenizer.py --resolution 512 --base-channels 128   # Chameleon's size

Timings on a shared CPU are noisy: compare the ratio, not the absolute figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings


def _time(fn, x, repeats: int) -> float:
    """Median seconds of ``fn(x)`` over ``repeats`` runs, after one warm-up run."""
    fn(x)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--base-channels", type=int, default=64)
    ap.add_argument("--channel-multiplier", type=int, nargs="+", default=[1, 1, 2, 2, 4])
    ap.add_argument("--num-res-blocks", type=int, default=2)
    ap.add_argument("--codebook-size", type=int, default=8192)
    ap.add_argument("--embed-dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args(argv)

    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from omni.chameleon import import_chameleon_vqgan
    from omni.toy.photos import photos, random_crops

    if args.threads:
        torch.set_num_threads(args.threads)
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

    with torch.inference_mode():
        same = torch.equal(ours.encode(x).reshape(-1), hf.encode(pixel_values).image_tokens.long())
        t_ours = _time(ours.encode, x, args.repeats)
        t_hf = _time(lambda p: hf.encode(p).image_tokens, pixel_values, args.repeats)

    grid = ours.grid
    print(f"config: {args.resolution}px -> {grid[0]}x{grid[1]} codes of {args.codebook_size}, base_channels "
          f"{args.base_channels}, multipliers {args.channel_multiplier}, {args.num_res_blocks} res blocks, "
          f"batch {args.batch}, torch threads {torch.get_num_threads()}")
    print(f"codes identical: {same}")
    print(f"omni VQImageTokenizer.encode:       {args.batch / t_ours:8.2f} images/s")
    print(f"transformers ChameleonVQVAE.encode: {args.batch / t_hf:8.2f} images/s")
    print(f"ratio (omni / transformers):        {t_hf / t_ours:8.3f}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
