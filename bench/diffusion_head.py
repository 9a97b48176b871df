"""Calibration of the <gen> diffusion head (omni.decoders.diffusion) on the toy world: which space, which denoiser.

Stand-in conditioning (no decoder): the caption's (color, shape) objects, in the scene's reading
order, as K = 4 states [K, D=128] (3 object slots: color + shape + slot embeddings, an empty slot its
own embedding; 1 count slot), mixed by one transformer encoder layer; trained with the head. Each
arm trains the head on toy-world TRAIN scenes (32 px, the demo's grid and order) for the same
wall-clock budget, then samples the captions of held-out TEST scenes (omni.toy.shapes splits by
content; the script asserts that no test scene's key is among the training scenes') and the demo's
image judge scores them: the share judged correct, 1-object captions apart from 2-3-object ones,
with steps/s and seconds per image. Arms (``--arms``):

* ``latent``: the demo image tokenizer's quantized latent (8 x 8 x 16 code vectors, normalized per
  channel), UNet, flow matching; samples snapped to codes and decoded by the tokenizer.
* ``latent-dit``: the same with a DiT (Transformer2DModel, adaLN-single).
* ``latent-ddpm``: the same UNet with a linear-beta DDPM and DPM-Solver++.
* ``pixel``: pixels in [-1, 1], pixel-unshuffled to 16 x 16 x 12 (as shared/notes/heads-calibration.md), UNet, flow.

The image tokenizer and the judge are trained first with the project's own functions at
recipes/demo/default.yaml (omni.demo's stages 3 and 6) into ``--cache``, once; their seconds are
printed (a cached run prints the seconds of the run that made them).

    nice -n 19 .venv/bin/python bench/diffusion_head.py --arms latent,pixel --budget 360 --pixel-budget 150

Timings on a shared CPU are noisy; the budget is wall-clock, so a busy machine trains fewer steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ARMS = {
    "latent": dict(space="latent", head=dict(denoiser="unet", widths=(64, 128), objective="flow")),
    "latent-dit": dict(space="latent", head=dict(denoiser="dit", widths=(128,), layers=4, objective="flow")),
    "latent-ddpm": dict(space="latent", head=dict(denoiser="unet", widths=(64, 128), objective="ddpm")),
    "pixel": dict(space="pixel", head=dict(denoiser="unet", widths=(64, 64, 128), objective="flow", channels=3,
                                           size=32, unshuffle=2)),
}
K, D = 4, 128


def prepare(cache: str | Path, log=print):
    """The demo's image tokenizer and judge, trained with the project's own functions at
    recipes/demo/default.yaml into ``cache`` (reused when there); -> (tokenizer, judge, seconds by stage)."""
    from omni.demo import demo_config
    from omni.eval.judge import Judge, JudgeConfig, train_judge
    from omni.eval.tokenizers import ImageEvaluator
    from omni.tokenizers.image import VQImageTokenizer
    from omni.tokenizers.image_train import train_image_tokenizer
    from omni.toy import shapes

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    cfg = demo_config("default")
    w = cfg.demo
    times_path = cache / "times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    world = cache / "world" / "caption"
    if "world" not in times:  # the demo's caption shards (its stage 1, captions only)
        t = time.time()
        shapes.write_shards(world, w.caption_scenes, "train", seed=0, kinds=["caption"], scenes_per_shard=1000,
                            resume=True, novel_pairs=w.pairs, size=w.canvas, grid=w.grid, order=w.order)
        times["world"] = round(time.time() - t, 1)
        times_path.write_text(json.dumps(times))
    if "image" not in times:  # the demo's stage 3
        t = time.time()
        data = [str(world)]
        train_image_tokenizer(data, cache / "tokenizer", cfg.tokenizer.image,
                              ImageEvaluator(None, cfg.tokenizer.image, train_data=data, log=log), resume=True,
                              progress=False, log=log)
        times["image"] = round(time.time() - t, 1)
        times_path.write_text(json.dumps(times))
    if "judge" not in times:  # the demo's stage 6
        t = time.time()
        train_judge(n_scenes=w.judge_scenes, seed=cfg.seed, cfg=JudgeConfig(size=w.canvas)).save(cache / "judge")
        times["judge"] = round(time.time() - t, 1)
        times_path.write_text(json.dumps(times))
    return VQImageTokenizer.load(cache / "tokenizer"), Judge.load(cache / "judge"), times


class PairEncoder(nn.Module):
    """Stand-in for the decoder's <gen> states: a scene's (color, shape) objects -> [K, D]."""

    def __init__(self, colors, shapes):
        super().__init__()
        self.colors, self.shapes = list(colors), list(shapes)
        self.color = nn.Embedding(len(self.colors) + 1, D)  # last: empty slot
        self.shape = nn.Embedding(len(self.shapes) + 1, D)
        self.slot = nn.Parameter(torch.randn(K, D) * 0.02)
        self.count = nn.Embedding(4, D)
        self.mix = nn.TransformerEncoderLayer(D, 4, 2 * D, 0.0, batch_first=True, norm_first=True)

    def ids(self, pairs_list) -> torch.Tensor:
        """Per scene its pairs (reading order) -> long [B, 3, 2] (empty slots: the extra index) and counts [B]."""
        out = torch.empty(len(pairs_list), K - 1, 2, dtype=torch.long)
        out[..., 0], out[..., 1] = len(self.colors), len(self.shapes)
        for b, pairs in enumerate(pairs_list):
            for i, (c, s) in enumerate(pairs):
                out[b, i, 0], out[b, i, 1] = self.colors.index(c), self.shapes.index(s)
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, 3, 2] -> [B, K, D]
        n = (ids[..., 0] < len(self.colors)).sum(1)  # [B]
        objs = self.color(ids[..., 0]) + self.shape(ids[..., 1])  # [B, 3, D]
        x = torch.cat((objs, self.count(n)[:, None]), 1) + self.slot  # [B, K, D]
        return self.mix(x)


def images_of(scenes) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.stack([sc.image for sc in scenes])).permute(0, 3, 1, 2).float() / 255


def run_arm(name, spec, args, tok, judge, train, test, stats, log=print) -> dict:
    from omni.decoders.diffusion import DiffusionHead, DiffusionHeadConfig, latent_to_codes, to_latent
    from omni.toy import shapes

    torch.manual_seed(args.seed)
    hcfg = dict(dim=D, n_queries=K, channels=tok.config.embed_dim, size=tok.grid[0], cross_dim=64)
    hcfg.update(spec["head"])
    head = DiffusionHead(DiffusionHeadConfig(**hcfg))
    enc = PairEncoder(shapes.COLORS, shapes.SHAPES)
    latent = spec["space"] == "latent"
    if latent:
        head.set_latent_stats(stats)
        x_all = torch.cat([to_latent(tok, train["images"][i:i + 512], stats) for i in range(0, len(train["images"]), 512)])
    else:
        x_all = train["images"] * 2 - 1
    ids_all = train["ids"]
    n_head = sum(p.numel() for p in head.parameters())
    params = list(head.parameters()) + list(enc.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema_head = copy.deepcopy(head).eval()
    ema_enc = copy.deepcopy(enc).eval()
    g = torch.Generator().manual_seed(args.seed)
    budget = args.pixel_budget if spec["space"] == "pixel" and args.pixel_budget else args.budget
    head.train(), enc.train()
    t0, step, losses = time.time(), 0, []
    while time.time() - t0 < budget:
        idx = torch.randint(0, len(x_all), (args.batch,), generator=g)
        lr = args.lr * min(1.0, (step + 1) / 100)
        for group in opt.param_groups:
            group["lr"] = lr
        out = head(enc(ids_all[idx]), target=x_all[idx], generator=g)
        loss = head.loss(out)["gen_diffusion"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for m_ema, m in ((ema_head, head), (ema_enc, enc)):
                for pe, p in zip(m_ema.parameters(), m.parameters()):
                    pe.lerp_(p, 1 - d)
        losses.append(loss.item())
        if step % 200 == 0:
            log(f"  [{name}] step {step}, {time.time() - t0:.0f} s, loss {sum(losses[-200:]) / 200:.4f}")
    train_s = time.time() - t0
    row = dict(arm=name, params=n_head, steps=step, train_s=train_s, steps_per_s=step / train_s,
               loss=sum(losses[-100:]) / max(1, len(losses[-100:])))
    for guidance in args.guidance:
        right = {1: [], 23: []}
        t = time.time()
        gen = torch.Generator().manual_seed(args.seed + 1)
        shown = []
        for i in range(0, len(test["scenes"]), 50):
            chunk = test["scenes"][i:i + 50]
            with torch.no_grad():
                q = ema_enc(ema_enc.ids([sc.pairs for sc in chunk]))
                s = ema_head.sample(q, generator=gen, guidance=guidance, steps=args.steps)
                imgs = tok.decode(latent_to_codes(tok, s, stats)) if latent else ((s + 1) / 2).clamp(0, 1)
            shown += list(imgs[:10]) if i == 0 else []  # ten 1-object scenes (they come first)
            for sc, im in zip(chunk, imgs):
                right[1 if len(sc.objects) == 1 else 23].append(judge.correct(im, sc.caption))
        sec = (time.time() - t) / len(test["scenes"])
        row[f"g{guidance:g}"] = dict(one=sum(right[1]) / len(right[1]), multi=sum(right[23]) / len(right[23]),
                                     all=(sum(right[1]) + sum(right[23])) / len(test["scenes"]), s_per_image=sec)
        log(f"  [{name}] guidance {guidance:g}: {row[f'g{guidance:g}']}")
        if args.save_images:
            from PIL import Image

            grid = (torch.cat(shown, -1).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()  # a row of samples
            Image.fromarray(grid).save(Path(args.cache) / f"{name}_g{guidance:g}.png")
    return row


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _timing import header, table

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", default="latent,pixel", help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--budget", type=float, default=360, help="training seconds per arm (wall clock)")
    ap.add_argument("--pixel-budget", type=float, default=0, help="training seconds of the pixel arm (0: --budget)")
    ap.add_argument("--cache", default="/tmp/diffhead/cache", help="where the tokenizer and judge are trained")
    ap.add_argument("--train-scenes", type=int, default=10000)
    ap.add_argument("--test-per-count", type=int, default=60, help="test scenes with 1, 2 and 3 objects, each")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-images", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    header("diffusion head: space and denoiser, toy world, stand-in conditioning", args)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from omni.decoders.diffusion import LatentStats, latent_to_codes
    from omni.demo import demo_config
    from omni.toy import shapes

    t = time.time()
    tok, judge, times = prepare(args.cache)
    print(f"tokenizer + judge (demo recipe): {times} s when trained; ready in {time.time() - t:.1f} s this run")
    w = demo_config("default").demo
    world = dict(novel_pairs=w.pairs, size=w.canvas, grid=w.grid, order=w.order)
    train_scenes = shapes.scenes(args.train_scenes, "train", seed=0, **world)
    keys = {shapes.scene_key(sc) for sc in train_scenes}
    test = [sc for n in (1, 2, 3) for sc in shapes.scenes(args.test_per_count, "test", seed=1, n_objects=n, **world)]
    assert not any(shapes.scene_key(sc) in keys for sc in test), "a test scene is among the training scenes"
    assert all(shapes.split_of(sc, w.pairs) == "test" for sc in test)
    enc = PairEncoder(shapes.COLORS, shapes.SHAPES)
    train = dict(images=images_of(train_scenes), ids=enc.ids([sc.pairs for sc in train_scenes]))
    stats = LatentStats.of(tok, train["images"])
    # ceilings: the judge on the real test images and on their tokenizer round trip
    real = images_of(test)
    with torch.no_grad():
        recon = tok.decode(latent_to_codes(tok, tok.lookup(tok.encode(real))))
    ceil = {}
    for what, ims in (("real", real), ("tokenizer round trip", recon)):
        r = [judge.correct(im, sc.caption) for im, sc in zip(ims, test)]
        n1 = args.test_per_count
        ceil[what] = (sum(r[:n1]) / n1, sum(r[n1:]) / (len(r) - n1), sum(r) / len(r))
    print(f"{len(train_scenes)} train scenes ({len(keys)} distinct), {len(test)} test scenes (none in train); "
          f"judge on test scenes: {ceil}", flush=True)
    rows = [run_arm(a, ARMS[a], args, tok, judge, train, dict(scenes=test), stats) for a in args.arms.split(",")]
    print("RESULT " + json.dumps(rows))
    base = rows[0]
    head_ = ["arm", "params", "train s", "steps", "steps/s", "loss", "guidance", "1 obj", "2-3 obj", "all",
             "s/image", "steps/s vs first", "s/image vs first"]
    out = []
    for what, (a, b, c) in ceil.items():
        out.append([what, "", "", "", "", "", "", f"{a:.1%}", f"{b:.1%}", f"{c:.1%}", "", "", ""])
    for r in rows:
        for gk in [k for k in r if k.startswith("g")]:
            e, e0 = r[gk], base.get(gk, base[next(k for k in base if k.startswith("g"))])
            out.append([r["arm"], f"{r['params'] / 1e6:.2f}M", f"{r['train_s']:.0f}", r["steps"],
                        f"{r['steps_per_s']:.2f}", f"{r['loss']:.4f}", gk[1:], f"{e['one']:.1%}", f"{e['multi']:.1%}",
                        f"{e['all']:.1%}", f"{e['s_per_image']:.4f}", f"{r['steps_per_s'] / base['steps_per_s']:.2f}x",
                        f"{e['s_per_image'] / e0['s_per_image']:.2f}x"])
    table("held-out TEST captions judged correct (EMA weights, " + f"{args.steps} sampler steps)", head_, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
