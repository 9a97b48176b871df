"""The ``<gen>`` head on the toy world: `omni eval gen-head --checkpoint DIR gen.judge=JUDGE`.

For each held-out scene (a split disjoint from training by content), the checkpoint reads the
scene's caption followed by ``<gen>`` and its K slots (teacher-forced, as the training documents
are), the diffusion head makes an image from the query states (:meth:`RoutingHeads.make_image`:
a sample in the image tokenizer's latent, snapped to codes, decoded), and the toy world's judge
(:mod:`omni.eval.judge`) says whether it shows exactly the objects the caption names. Reported by
number of objects, beside the chance row (each caption against another scene's real image, as the
demo suite's) and the judge on the real scenes and on their tokenizer round trips (the ceiling),
with the seconds per image.
"""

from __future__ import annotations

import time

import numpy as np

from omni.errors import OmniError


def evaluate_gen_head(model, tok, judge, scenes, guidance: float = 1.0, steps: int = 20, seed: int = 0,
                      images: list | None = None, batch_size: int = 50) -> dict:
    """Judged-correct shares of the images the ``<gen>`` head makes for ``scenes``' captions (see the
    module docstring); ``guidance`` and ``steps`` go to the sampler, ``seed`` to its noise.
    ``images``, if given, receives the images (uint8 [H, W, 3], one per scene). ``batch_size``
    captions share a decoder pass and a sampler batch (the noise, drawn from one seeded generator,
    depends on it)."""
    import torch

    from omni.document import Document, Generate, Text
    from omni.eval.detection import routed_forward

    heads = getattr(model, "heads", None)
    if heads is None or "gen" not in heads.heads:
        raise OmniError("this checkpoint has no diffusion head (train with heads.gen.enabled=true)")
    if tok.image is None:
        raise OmniError("the checkpoint's bundle has no image tokenizer to decode the head's codes")
    k = heads.queries.n_queries["<gen>"]
    g = torch.Generator().manual_seed(seed)
    made = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(scenes), batch_size):  # a batch of captions: one decoder pass, one sampler batch
            rows = [tok.encode(Document([Text(sc.caption), Generate()]), slots={"<gen>": k})
                    for sc in scenes[i:i + batch_size]]
            hidden, _, routes = routed_forward(model, tok, rows)
            codes = heads.make_images(hidden, routes, tok.image, g, guidance, steps)  # [R, h, w]
            pixels = tok.image.decode(codes.to(next(tok.image.parameters()).device)).clamp(0, 1)  # [R, 3, H, W]
            made += list((pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8))
    seconds = (time.perf_counter() - t0) / max(len(scenes), 1)
    if images is not None:
        images += made
    right = [judge.correct(im, sc.caption) for im, sc in zip(made, scenes)]
    rolled = scenes[1:] + scenes[:1]
    chance = [judge.correct(o.image, sc.caption) for o, sc in zip(rolled, scenes)]
    out = {"n_scenes": len(scenes), "correct": float(np.mean(right)), "chance_correct": float(np.mean(chance)),
           "judge_on_real_scenes": judge.evaluate(scenes)["exact"], "seconds_per_image": seconds,
           "guidance": guidance, "steps": steps}
    for name, sel in (("1_object", lambda n: n == 1), ("2_3_objects", lambda n: n > 1)):
        idx = [i for i, sc in enumerate(scenes) if sel(len(sc.objects))]
        if idx:
            out[f"correct_{name}"] = float(np.mean([right[i] for i in idx]))
            out[f"chance_{name}"] = float(np.mean([chance[i] for i in idx]))
    return out


def gen_head_suite(checkpoint, data, cfg, out=None) -> dict:
    """`omni eval gen-head --checkpoint DIR gen.judge=JUDGE_DIR`: :func:`evaluate_gen_head` on
    ``cfg.gen.n_scenes`` scenes of the toy world's ``cfg.gen.split``, at the size of the checkpoint's
    image tokenizer."""
    from omni.eval.judge import judged_suite
    from omni.toy.shapes import scenes

    c = cfg.gen
    model, tok, judge = judged_suite(checkpoint, data, c.judge, "gen-head", "gen.judge", "scenes")
    sc = scenes(c.n_scenes, c.split, c.seed, size=tok.image.config.image_size, grid=c.grid, order=c.order)
    return evaluate_gen_head(model, tok, judge, sc, c.guidance, c.steps, c.seed)
