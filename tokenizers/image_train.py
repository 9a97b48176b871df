"""Training of the VQ image tokenizer.

Losses follow VQGAN (Esser et al. 2021, https://arxiv.org/abs/2012.09841): pixel reconstruction
(L1 or L2) + the quantizer's own terms (commitment; LFQ's entropy) + optionally a perceptual
loss (LPIPS, Zhang et al. 2018, https://arxiv.org/abs/1801.03924, from local weight files only)
+ optionally a patch-GAN discriminator (Isola et al. 2017, https://arxiv.org/abs/1611.07004)
with the hinge loss, switched on after ``disc_start`` steps (fixed weight; VQGAN's adaptive
weight is left out). AdamW, linear warm-up then cosine decay to lr/10.

Data (``--data``): folders of image files (searched recursively), WebDataset ``.tar`` shards of
images (each member named ``key.ext``; only image members are read), single image files, globs,
or a named data source such as ``photos:train`` (:data:`omni.media.SOURCES`), all read by
:mod:`omni.media`. Every image is converted to RGB (grayscale repeated; RGBA, LA and
palette images with transparency composited onto white, as Chameleon does). Non-image files,
corrupt or truncated images, unreadable shards and tiny images (shorter side below
``min_image_side``) are skipped; skips and conversions are counted and logged, never fatal.

Training crops: a square of side ``image_size * s`` (``s`` uniform in ``crop_scale``, capped by
the image) at a random position, resized to ``image_size``, randomly flipped. Crops are drawn
from a buffer of decoded images; a dataset that fits the buffer is read once. Batch ``t`` depends
only on (seed, t), so a resumed run draws the same crops it would have drawn.

Output folder, in the run convention of :mod:`omni.run`: ``run.yaml``, ``metrics.jsonl``, the newest
checkpoint ``step_XXXXXX/`` (the tokenizer, the discriminator, both optimizers, RNG states: a
killed run resumes from it), and once finished the tokenizer itself (``model.safetensors``,
``config.yaml``, ``tokenizer.json``) and ``eval.json``. Rerunning a finished run does nothing and
says so (:func:`finished_step`); ``resume=False`` (``--no-resume``) trains it again from scratch.
SIGTERM / SIGUSR1 / SIGINT (a Slurm time limit or preemption, Ctrl-C) finish the current step,
save its checkpoint and stop without the final files (exit 0, 130 for Ctrl-C); rerunning resumes.

Data parallel under torchrun (``python -m omni.parallel.launch --standalone --nproc-per-node N -m
omni tokenizer train image ...``; gloo: the trainer runs on CPUs): ``batch_size`` stays the global
batch (it must divide by N). Every rank reads the same images, draws the same global batch plan of
each step and crops only its own contiguous rows; gradients are averaged with one all-reduce
(:func:`omni.run.average_gradients`, not DDP: the discriminator runs three times per step and the
FSQ entropy term outside the model's forward, which DDP's one-forward-one-backward hooks do not
allow). Rank 0 writes (run.yaml, metrics, checkpoints, the tokenizer, eval.json) and evaluates;
every rank resumes from the same checkpoint. What depends on the whole batch is computed over the
global batch, as one process does: the VQ codebook's EMA counts and sums (vector-quantize-pytorch's
``sync_codebook``), its k-means init (every rank runs it alike on the whole init batch), LFQ's
batch entropy (a mean over the ranks; the library's own is broken, see :func:`_lfq_global_mean`), the FSQ entropy loss and the discriminator with its
BatchNorm (both on the gathered global batch, so their cost is not split), and the logged loss,
PSNR and codes used. Two processes therefore train the weights of one process to float rounding,
except for one path: a dead-code restart samples its new codes from every rank's own vectors
(the library's distributed sampling), so which vectors replace dead codes differs from one
process; it is the same on every rank, and the ranks' identical weights are checked at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omni import run
from omni.config.image_tokenizer import ImageTrainConfig
from omni.errors import OmniError
from omni.media import BadSample, SkipReport, expand_sources, iter_media, read_image
from omni.tokenizers.image import VQImageTokenizer, fsq_entropy_loss

EVAL_FILE = "eval.json"
DISC_FILE = "discriminator.safetensors"


# ------------------------------------------------------------------------------------------
# Reading images (omni.media: one reader, one skip report)
# ------------------------------------------------------------------------------------------
def iter_images(data: str | Sequence[str], report: SkipReport, min_side: int = 1,
                order_seed: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, uint8 [H,W,3])`` for every readable image in ``data``; skips go to ``report``.

    ``order_seed`` shuffles the order of files and shards (not the members inside a shard).
    """
    files = expand_sources(data, "image")
    if order_seed is not None:
        np.random.default_rng(order_seed).shuffle(files)
    for name, item in iter_media(files, "image", report):
        if isinstance(item, bytes):
            try:
                item = read_image(item, report)
            except BadSample as e:
                report.skip(e.reason, name, e.detail)
                continue
        if min(item.shape[:2]) < min_side:
            report.skip("too_small", name, f"{item.shape[1]}x{item.shape[0]}, shorter side < {min_side} px")
            continue
        report.read += 1
        yield name, item


def _to_float(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 255.0  # [3,H,W]


def crop(a: np.ndarray, size: int, side: int, top: int, left: int, flip: bool) -> torch.Tensor:
    """The ``side``-pixel square at (top, left) of uint8 [H,W,3] -> float [3,size,size] in [0,1]."""
    x = _to_float(a[top : top + side, left : left + side])
    if flip:
        x = x.flip(-1)
    if side != size:
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return x.clamp(0, 1)


def crop_params(h: int, w: int, size: int, scale: Sequence[float], rng: np.random.Generator,
                hflip: bool) -> tuple[int, int, int, bool]:
    """(side, top, left, flip) of a random crop of an [h,w] image: the draws of :func:`random_crop`."""
    side = min(h, w, max(1, round(size * rng.uniform(scale[0], scale[1]))))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return side, top, left, bool(hflip and rng.random() < 0.5)


def random_crop(a: np.ndarray, size: int, scale: Sequence[float], rng: np.random.Generator,
                hflip: bool) -> torch.Tensor:
    return crop(a, size, *crop_params(*a.shape[:2], size, scale, rng, hflip))


class CropSampler:
    """Random training crops from a buffer of decoded images (see the module docstring)."""

    def __init__(self, data, cfg: ImageTrainConfig, report: SkipReport):
        self.data, self.cfg, self.report = data, cfg, report
        self.size = cfg.model.image_size
        self.epoch = 0
        self.stream = iter_images(data, report, cfg.min_image_side, order_seed=cfg.seed)
        self.buffer: list[np.ndarray] = []
        for _, a in self.stream:
            self.buffer.append(a)
            if len(self.buffer) >= cfg.buffer_images:
                break
        else:
            self.stream = None  # everything fits: read once
        if not self.buffer:
            raise OmniError(f"no readable images in {data}: {report}")

    def _refresh(self, rng: np.random.Generator, n: int) -> None:
        """Replace ``n`` random buffer slots with the next images of the stream (new epoch at its end)."""
        for _ in range(n):
            a = next(self.stream, None)
            if a is None:
                self.epoch += 1
                self.stream = iter_images(self.data, self.report, self.cfg.min_image_side,
                                          order_seed=self.cfg.seed + self.epoch)
                a = next(self.stream, None)
                if a is None:
                    return
            self.buffer[int(rng.integers(len(self.buffer)))] = a[1]

    def batch(self, step: int, rows: slice = slice(None)) -> torch.Tensor:
        """Rows ``rows`` of the global batch of ``step``: float [rows,3,S,S] in [0,1] (all batch_size rows
        by default); depends only on (seed, step) and the buffer, so every data-parallel rank draws the
        same batch and takes its own rows of it."""
        rng = np.random.default_rng([self.cfg.seed, step])
        if self.stream is not None:
            self._refresh(rng, max(1, self.cfg.batch_size // 4))
        return self.draw(self.cfg.batch_size, rng, rows)

    def draw(self, n: int, rng: np.random.Generator, rows: slice = slice(None)) -> torch.Tensor:
        """Rows ``rows`` of ``n`` random crops of random buffer images: float [rows,3,S,S] in [0,1].
        Every crop's position is drawn (the generator advances as for all ``n``); only ``rows`` are cut."""
        picks = rng.integers(len(self.buffer), size=n)
        params = [crop_params(*self.buffer[i].shape[:2], self.size, self.cfg.crop_scale, rng, self.cfg.hflip)
                  for i in picks]
        keep = range(n)[rows]
        return torch.stack([crop(self.buffer[picks[k]], self.size, *params[k]) for k in keep])


# ------------------------------------------------------------------------------------------
# Perceptual loss and discriminator
# ------------------------------------------------------------------------------------------
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's indices


class PerceptualLoss(nn.Module):
    """LPIPS-VGG (Zhang et al. 2018) from local weights, frozen.

    Hand-written because torchvision is unusable here and the lpips package imports it; the
    module indices equal torchvision's ``vgg16().features`` so its state dict loads by name.
    Without LPIPS's linear layers every channel weighs 1 (plain normalized VGG feature distance).
    """

    def __init__(self, files: Sequence[str]):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)
        chans = (64, 128, 256, 512, 512)
        self.lins = nn.ParameterList([nn.Parameter(torch.ones(1, ch, 1, 1)) for ch in chans])
        # LPIPS's ScalingLayer: [-1,1] input -> roughly ImageNet-normalized
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self._load(files)
        self.requires_grad_(False).eval()

    def _load(self, files: Sequence[str]) -> None:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            p = Path(f)
            if not p.is_file():
                raise OmniError(f"perceptual weight file not found: {p}")
            try:
                if p.suffix == ".safetensors":
                    from safetensors.torch import load_file

                    state.update(load_file(p))
                else:
                    state.update(torch.load(p, map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
                raise OmniError(f"cannot read perceptual weights {p}: {type(e).__name__}: {e}") from None
        feats = {}
        for k, v in state.items():
            if k.startswith("features."):
                feats[k[len("features."):]] = v
            elif k.startswith("net.slice"):  # LPIPS's own checkpoints: net.sliceK.N.weight
                feats[k.split(".", 2)[2]] = v
        missing, _ = self.features.load_state_dict(feats, strict=False)
        if missing:
            raise OmniError(f"perceptual weights lack VGG16 conv weights {missing[:4]}... "
                            f"(expected torchvision's vgg16 'features.N.weight' keys)")
        for i in range(5):
            w = state.get(f"lin{i}.model.1.weight")
            if w is not None:
                self.lins[i].data.copy_(w.reshape(self.lins[i].shape))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # [-1,1] images -> scalar
        x, y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        loss = x.new_zeros(())
        k = 0
        for i, layer in enumerate(self.features):
            x, y = layer(x), layer(y)
            if i in _LPIPS_TAPS:
                nx = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                ny = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                loss = loss + ((nx - ny).pow(2) * self.lins[k]).sum(1).mean()
                k += 1
                if k == len(_LPIPS_TAPS):
                    break
        return loss


class PatchDiscriminator(nn.Module):
    """Patch-GAN (pix2pix's NLayerDiscriminator, as in VQGAN): one real/fake logit per patch."""

    def __init__(self, channels: int = 32, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] in [-1,1] -> [B,1,h',w'] logits
        return self.net(x)


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------
def save_checkpoint(out: Path, tok: VQImageTokenizer, cfg: ImageTrainConfig, step: int,
                    opt: torch.optim.Optimizer, disc: nn.Module | None, dopt, trainer_state: dict | None = None) -> Path:
    """``OUT/step_XXXXXX`` in the run convention (omni.run): the tokenizer as it is (a folder
    ``load_tokenizer`` reads), the discriminator, both optimizers, the RNG states and run.yaml."""
    from safetensors.torch import save

    from omni.io import atomic_write_bytes
    from omni.tokenizers.base import save_tokenizer

    def fill(d: Path) -> None:
        save_tokenizer(tok, d)
        if disc is not None:
            atomic_write_bytes(d / DISC_FILE, save({k: v.detach().contiguous().clone()
                                                    for k, v in disc.state_dict().items()}))

    optimizers = {"opt": opt.state_dict(), **({"dopt": dopt.state_dict()} if dopt is not None else {})}
    path = run.write_checkpoint(out, step, fill, optimizers=optimizers, trainer_state=trainer_state, config=cfg)
    run.prune(out, 1)  # the newest intact checkpoint is all a resume needs; the final tokenizer is OUT itself
    return path


# ------------------------------------------------------------------------------------------
# Data parallelism (the audio trainer's too)
# ------------------------------------------------------------------------------------------
def _codebooks(module: nn.Module) -> list[nn.Module]:
    from vector_quantize_pytorch.vector_quantize_pytorch import Codebook

    return [m for m in module.modules() if isinstance(m, Codebook)]


def sync_codebooks(module: nn.Module, enabled: bool) -> None:
    """Switch vector-quantize-pytorch's cross-rank codebook statistics on or off in every codebook of ``module``
    (and, once on, give LFQ a working distributed batch mean, :func:`_lfq_global_mean`).

    On (the library's ``sync_codebook`` mode): the EMA's per-code counts and vector sums are
    all-reduced, so every rank makes the update one process makes from the global batch, and
    dead-code restarts sample their replacements from all ranks' vectors (the same on every rank).
    The library fixes the mode when a quantizer is built (``sync_codebook=None`` asks, once per
    process and cached, whether a process group exists); set here, it follows the trainer's group
    whatever the order, and :func:`local_codebooks` can lift it for one pass.
    """
    import torch.distributed as dist
    from vector_quantize_pytorch import vector_quantize_pytorch as vqp

    if enabled:  # LFQ's batch entropy: its own distributed mean is broken (see _lfq_global_mean)
        from vector_quantize_pytorch import lookup_free_quantization

        lookup_free_quantization.maybe_distributed_mean = _lfq_global_mean
    for c in _codebooks(module):
        c.use_ddp = enabled
        c.all_reduce_fn = c.kmeans_all_reduce_fn = dist.all_reduce if enabled else vqp.noop
        c.sample_fn = c.replace_sample_fn = vqp.sample_vectors_distributed if enabled else vqp.batched_sample_vectors


def codebooks_pending_init(module: nn.Module) -> bool:
    """Whether a codebook of ``module`` still waits for its k-means init (on its next training pass)."""
    return any(not bool(c.initted) for c in _codebooks(module))


@contextlib.contextmanager
def local_codebooks(module: nn.Module, init_only: bool = False):
    """Within: every codebook of ``module`` learns from this rank's vectors alone, so ranks that all pass
    the same whole batch end as one process does (k-means init included: its random picks come from
    torch's generator, the same on every rank). ``init_only`` also holds back the EMA update and
    dead-code restarts, so the pass runs a pending k-means init and nothing else. Synced again after."""
    cbs = _codebooks(module)
    saved = [(c.ema_update, c.has_dead_code_replacement) for c in cbs]
    sync_codebooks(module, False)
    if init_only:
        for c in cbs:
            c.ema_update = c.has_dead_code_replacement = False
    try:
        yield
    finally:
        for c, (ema, restarts) in zip(cbs, saved):
            c.ema_update, c.has_dead_code_replacement = ema, restarts
        sync_codebooks(module, True)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows [b,...] -> the global batch [world*b,...] in rank order, on every rank; ``t``
    itself in one process.

    For a loss that every rank computes alike on the global batch: the other ranks' rows arrive
    detached, and this rank's rows carry ``world`` times their gradient (straight through: the
    value is unchanged), so :func:`omni.run.average_gradients` then gives one process's gradient,
    (1/world) * sum over ranks of world * d loss / d own rows. (torch.distributed.nn's differentiable
    all_gather would do the same through its backward pass, but it is deprecated.)"""
    import torch.distributed as dist

    rank, world = run.dp_rank_world()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.detach().contiguous())
    parts[rank] = t + (world - 1) * (t - t.detach())  # == t, with world x its gradient
    return torch.cat(parts)


def _lfq_global_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the ranks, for LFQ's batch code distribution; the gradient reaches this
    rank's ``t`` whole (straight through), so averaged gradients are one process's.

    Replaces vector-quantize-pytorch's ``lookup_free_quantization.maybe_distributed_mean`` (1.32):
    it drops the result of torch.distributed.nn's all_reduce (out of place in today's torch) and
    returns this rank's mean divided by the world size, which would skew the batch entropy."""
    import torch.distributed as dist

    world = run.dp_rank_world()[1]
    if world == 1:
        return t
    total = t.detach().clone()
    dist.all_reduce(total)
    return total / world + (t - t.detach())


def rank_rng_state() -> dict:
    """``{'torch_rng_by_rank': [...]}`` for a checkpoint's trainer state: every rank's torch generator,
    which part ways after a dead-code restart (each rank samples its own vectors); ``{}`` in one
    process, whose checkpoints stay as they were. A collective: every rank calls it."""
    _, world = run.dp_rank_world()
    return {} if world == 1 else {"torch_rng_by_rank": run.gather_objects(torch.get_rng_state().tolist())}


def set_rank_rng_state(state: dict) -> None:
    """Give this rank its own torch generator of a checkpoint saved by as many ranks (else leave rank 0's)."""
    rank, world = run.dp_rank_world()
    states = state.get("torch_rng_by_rank") or []
    if world > 1 and len(states) == world:
        torch.set_rng_state(torch.tensor(states[rank], dtype=torch.uint8))


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
def _lr(step: int, cfg: ImageTrainConfig) -> float:
    """The run convention's schedule: warmup, then cosine decay to lr/10."""
    return run.lr_at(step, cfg.lr, cfg.steps, cfg.warmup_steps, "cosine", 0.1 * cfg.lr)


def finished_step(out: Path, ckpt: Path, cfg: ImageTrainConfig, with_eval: bool) -> int | None:
    """The step at which the run in ``out`` finished, or None if it has more to do.

    Finished: its newest intact checkpoint ``ckpt`` reached ``cfg.steps``, ``out`` itself holds the
    tokenizer of that checkpoint (the same fingerprint: a run killed between its last checkpoint and
    the final files, or one continued to more steps, is not finished), and, when an evaluator is
    given, ``eval.json`` holds that step's final eval."""
    from omni.tokenizers.base import TOKENIZER_FILE

    try:
        step = int(json.loads((ckpt / run.TRAINER_STATE).read_text())["step"])
        same = (json.loads((out / TOKENIZER_FILE).read_text())["fingerprint"]
                == json.loads((ckpt / TOKENIZER_FILE).read_text())["fingerprint"])
        evaluated = not with_eval or json.loads((out / EVAL_FILE).read_text()).get("step") == step
    except (OSError, ValueError, KeyError):  # a final file missing or cut short: not finished
        return None
    return step if step >= cfg.steps and same and evaluated else None


def _eval(evaluator, tok: VQImageTokenizer, progress: bool, what: str) -> dict:
    """``evaluator(tok)`` with a progress bar of the crops encoded and decoded so far.

    The evaluator is any callable (:class:`omni.eval.tokenizers.ImageEvaluator` by default) that reads
    its eval set when first called, then encodes and decodes it in batches: forward hooks count the
    crops as they pass, so the bar needs no change to its interface. The bar starts with the first
    batch's encoding, once the set is read (and its reading logged), with the set's size as total
    when the evaluator exposes it (``evaluator.images``); a batch counts once decoded.
    """
    from tqdm import tqdm

    if not progress:
        return evaluator(tok)
    bar = None

    def start(module, args, output) -> None:
        nonlocal bar
        if bar is None:
            images = getattr(evaluator, "images", None)
            bar = tqdm(desc=what, total=None if images is None else len(images), unit="crop", leave=False)

    def count(module, args, output) -> None:
        if bar is not None:
            bar.update(int(output.shape[0]))

    last = tok.decoder if tok.config.has_decoder else tok.encoder
    hooks = [tok.encoder.register_forward_hook(start), last.register_forward_hook(count)]
    try:
        return evaluator(tok)
    finally:
        for h in hooks:
            h.remove()
        if bar is not None:
            bar.close()


def train_image_tokenizer(data, out: str | os.PathLike, cfg: ImageTrainConfig,
                          evaluator: Callable[[VQImageTokenizer], dict] | None = None, resume: bool = True,
                          progress: bool = True, log: Callable[[str], None] = print) -> VQImageTokenizer:
    """Train (or resume) a VQ image tokenizer on ``data`` into ``out``.

    ``evaluator(tok) -> dict`` (for example :class:`omni.eval.tokenizers.ImageEvaluator`) is called
    every ``eval_every`` steps and at the end; its figures are logged, and the last ones written
    to ``out/eval.json``. Without one, the run measures nothing.

    A run in ``out`` that is finished already (:func:`finished_step`) is left as it is: it says so
    and returns the tokenizer of ``out`` without reading data or evaluating again; ``resume=False``
    trains it again from scratch, a larger ``cfg.steps`` continues it.

    Under a torch.distributed process group (torchrun; the command line starts it), call it on every
    rank: data parallel over the ranks, see the module docstring. SIGTERM / SIGUSR1 / SIGINT finish
    the step, save a checkpoint and raise :class:`omni.run.TrainingStopped` (on every rank).
    """
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(data, Path(out), cfg, evaluator, resume, progress, log)
    finally:
        torch.set_num_threads(threads)


def _train(data, out: Path, cfg: ImageTrainConfig, evaluator, resume: bool, progress: bool,
           log: Callable[[str], None]) -> VQImageTokenizer:
    from safetensors.torch import load_file
    from tqdm import tqdm

    from omni.config import load_config, to_dict

    rank, world = run.dp_rank_world()
    b = run.check_global_batch(cfg.batch_size, world)
    rows = slice(rank * b, (rank + 1) * b)  # this rank's rows of every global batch
    main = rank == 0
    if not main:  # rank 0 speaks and writes; the others train alongside
        log, progress = (lambda s: None), False

    out.mkdir(parents=True, exist_ok=True)
    found = run.find_resume(out, "auto" if resume else "none")
    resuming = found is not None
    if resuming:
        saved = load_config(ImageTrainConfig, found / run.RUN_CONFIG)
        if to_dict(saved.model) != to_dict(cfg.model):
            raise OmniError(f"{out} holds a run of another model config; resume it with the same config, "
                            f"or pass another --out (or --no-resume to start over there)")
        done_at = finished_step(out, found, cfg, evaluator is not None)
        if done_at is not None:
            # the decoder trainer's convention: a finished run is not redone (the final eval alone can take minutes)
            log(f"{out} is finished already (step {done_at} of steps={cfg.steps}"
                f"{', final eval in ' + str(out / EVAL_FILE) if evaluator is not None else ''}): nothing to do; "
                "--no-resume trains it again from scratch, a larger steps= continues it")
            return VQImageTokenizer.load(out).eval()

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    tok = VQImageTokenizer(cfg.model)
    start = 0
    if resuming:
        tok = VQImageTokenizer.load(found)
    tok.train()
    if world > 1:
        sync_codebooks(tok, True)

    disc = dopt = perceptual = None
    opt = torch.optim.AdamW(tok.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.disc_weight > 0:
        disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers)
        dopt = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.perceptual_weight > 0:
        perceptual = PerceptualLoss(cfg.perceptual_weights)
    if resuming:
        state, optimizers, rng = run.read_checkpoint(found)
        opt.load_state_dict(optimizers["opt"])
        if disc is not None and "dopt" in optimizers:
            disc.load_state_dict(load_file(found / DISC_FILE))
            dopt.load_state_dict(optimizers["dopt"])
        start = int(state["step"])
        log(f"resuming {out} at step {start}" + ("" if start < cfg.steps else
            f": its training is done (steps={cfg.steps}); writing its final files"))
    run.barrier()  # every rank has read OUT before rank 0 writes there
    if main:
        if not resuming and run.discard_checkpoints(out):
            log(f"starting over in {out}: its earlier checkpoints were discarded")
        run.save_run_config(cfg, out)

    report = SkipReport()
    to_train = start < cfg.steps
    sampler = None
    if to_train:  # a run killed after its last checkpoint needs no training data to finish
        sampler = CropSampler(data, cfg, report)  # every rank reads the same images into its buffer
        log(f"train data: {report}{' (buffer full; more streams in)' if sampler.stream is not None else ''}")
    log(f"model: {tok}")

    metrics = run.MetricsLog(out, resume_step=start, tensorboard=cfg.tensorboard, enabled=main)
    write_log = metrics.write
    # from here on a signal stops the run after its next step (a watcher may signal once it sees the data row)
    stop = run.StopFlag(announce=main).__enter__()
    hook = None
    try:
        if to_train:
            write_log({"event": "data", "train": report.to_json()})

        if not resuming and cfg.model.quantizer == "vq" and cfg.model.kmeans_init:
            # k-means needs more vectors than codes: initialize on a batch of about 4 vectors per code
            n_init = max(cfg.batch_size, math.ceil(4 * tok.codebook_size / tok.tokens_per_image))
            x0 = sampler.draw(n_init, np.random.default_rng([cfg.seed, 2**31]))  # all of it, on every rank
            with torch.no_grad(), (local_codebooks(tok) if world > 1 else contextlib.nullcontext()):
                tok.quantize_latent(tok.encoder(tok._to_model(x0)))

        if resuming:  # continue the random streams of the run (the quantizer's code restarts draw from torch's)
            run.set_rng_state(state["rng"], rng)
            set_rank_rng_state(state)
        recon_fn = F.l1_loss if cfg.recon_loss == "l1" else F.mse_loss
        t_start = time.time()
        bar = tqdm(total=cfg.steps, initial=min(start, cfg.steps), disable=not (progress and to_train),
                   desc="image tokenizer", unit="step")
        fsq_entropy = (cfg.fsq_entropy_weight, cfg.fsq_entropy_temperature) if cfg.fsq_entropy_weight > 0 else None
        seen: dict[str, torch.Tensor] = {}
        if world > 1 and fsq_entropy is not None:
            # Its batch entropy is of the global batch: taken here from the quantizer's input of every rank,
            # not by the model from this rank's rows (see the module docstring).
            hook = tok.quantize.register_forward_pre_hook(lambda module, args: seen.update(z=args[0]))
        saved_at = start

        def save(step: int) -> Path:
            nonlocal saved_at
            extra = rank_rng_state()  # a collective
            if main:
                save_checkpoint(out, tok, cfg, step, opt, disc, dopt, trainer_state=extra or None)
            run.barrier()
            saved_at = step
            return run.step_dir(out, step)

        stopped = 0
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = _lr(step, cfg)
            x = sampler.batch(step, rows)  # [b,3,S,S]
            target = x * 2 - 1
            recon, codes, qloss = tok(x, fsq_entropy if hook is None else None)
            if hook is not None:
                z = gather_rows(seen.pop("z"))  # [B,N,D]: the quantizer input of the global batch
                qloss = qloss + fsq_entropy[0] * fsq_entropy_loss(tok.quantize, z, fsq_entropy[1])
            rec = recon_fn(recon, target)
            loss = rec + cfg.quantizer_loss_weight * qloss
            terms = {"rec": rec.item(), "quant": qloss.item()}
            if perceptual is not None:
                p = perceptual(recon, target)
                loss = loss + cfg.perceptual_weight * p
                terms["perceptual"] = p.item()
            gan_on = disc is not None and step >= cfg.disc_start
            if gan_on:
                # the discriminator sees the global batch on every rank: its BatchNorm statistics are one
                # process's, and so are its weights (no gradient averaging needed: every rank computes alike)
                recon_all = gather_rows(recon)  # [B,3,S,S]
                g_loss = -disc(recon_all).mean()
                loss = loss + cfg.disc_weight * g_loss
                terms["gen"] = g_loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            run.average_gradients(tok.parameters())  # the global batch's gradient (identity in one process)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(tok.parameters(), cfg.grad_clip)
            opt.step()
            if gan_on:  # hinge loss (VQGAN)
                for g in dopt.param_groups:
                    g["lr"] = _lr(step, cfg)
                d_loss = F.relu(1 - disc(gather_rows(target))).mean() + F.relu(1 + disc(recon_all.detach())).mean()
                dopt.zero_grad(set_to_none=True)
                d_loss.backward()
                dopt.step()
                terms["disc"] = d_loss.item()
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                with torch.no_grad():
                    # the batch's mean per-image PSNR, for the log (omni.eval.metrics.psnr's figure)
                    mse = (((recon + 1) / 2).clamp(0, 1) - x).pow(2).flatten(1).mean(1)  # [b]
                    psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).clamp(max=100.0)  # [b]
                loss_value, train_psnr, used = _batch_figures(loss, terms, psnr, codes, tok.codebook_size, world)
                rec_log = {"step": done, "loss": loss_value, **terms, "psnr": train_psnr,
                           "batch_codes_used": used, "lr": opt.param_groups[0]["lr"],
                           "elapsed_s": round(time.time() - t_start, 2)}
                write_log(rec_log)
                bar.set_postfix(loss=f"{loss_value:.4f}", psnr=f"{train_psnr:.2f}")
            if evaluator is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                if main:
                    m = _eval(evaluator, tok, progress, f"eval at step {done}")
                    write_log({"step": done, "event": "eval", **m})
                    bar.write(f"step {done}: eval psnr {m['psnr']:.2f} dB (baseline "
                              f"{m['psnr_mean_color_baseline']:.2f}), usage {m['codebook_usage']:.1%}")
                run.barrier()
            if cfg.save_every and done % cfg.save_every == 0 and done != cfg.steps:
                save(done)
            bar.update(1)
            # every rank stops after the same step: the first signal on any of them
            stopped = int(run.all_reduce(torch.tensor([float(stop.signal or 0)]), "max").item())
            if stopped:
                break
        bar.close()
        run.check_replicas(tok, "image tokenizer")
        if stopped:
            ckpt = save(done) if saved_at != done else run.step_dir(out, done)
            log(f"{signal.Signals(stopped).name}: saved {ckpt}; rerun the same command to resume")
            raise run.TrainingStopped(stopped, ckpt)
        final_step = max(cfg.steps, start)
        if to_train:  # else the newest checkpoint is this state already
            save(final_step)
        m = None
        if evaluator is not None and main:
            log(f"final eval at step {final_step} ...")
            m = _eval(evaluator, tok, progress, "final eval")
            m.update(step=final_step, train_seconds=round(time.time() - t_start, 1))
            write_log({"event": "final_eval", **m})
    finally:
        stop.__exit__()
        metrics.close()
        if hook is not None:
            hook.remove()
    from omni.io import atomic_write_text
    from omni.tokenizers.base import save_tokenizer

    if main:
        save_tokenizer(tok, out)  # OUT itself is the finished tokenizer folder
        if to_train:
            log(f"train data: {report}")
        if m is not None:
            atomic_write_text(out / EVAL_FILE, json.dumps(m, indent=1) + "\n")  # last: it marks the run finished
            log(f"eval ({m.get('eval_on', 'eval data')}): psnr {m.get('psnr', float('nan')):.2f} dB vs mean-color "
                f"baseline {m['psnr_mean_color_baseline']:.2f} dB, ssim {m.get('ssim', float('nan')):.3f}, "
                f"codebook usage {m['codebook_usage']:.1%}, perplexity {m['code_perplexity']:.1f}")
        log(f"wrote {out}: the image tokenizer at step {final_step}{' and ' + EVAL_FILE if m is not None else ''}")
    run.barrier()  # the other ranks return once the run is finished on disk
    return tok.eval()


def _batch_figures(loss: torch.Tensor, terms: dict, psnr: torch.Tensor, codes: torch.Tensor, n_codes: int,
                   world: int) -> tuple[float, float, int]:
    """(loss, mean per-image PSNR, distinct codes) of the global batch; ``terms`` become global means in place.

    One process: this batch's figures. Data parallel: the losses are means of equal shares, so their
    global mean is the mean over the ranks; PSNR sums over images; codes used on any rank count.
    """
    if world == 1:
        return loss.item(), float(psnr.mean()), int(codes.unique().numel())
    sums = torch.tensor([loss.item(), *terms.values(), float(psnr.sum()), psnr.numel()], dtype=torch.float64)
    run.all_reduce(sums)
    for k, v in zip(list(terms), sums[1:-2].tolist()):
        terms[k] = v / world
    used = torch.zeros(n_codes, dtype=torch.int32)
    used[codes.flatten()] = 1  # [n_codes]: which codes this rank's rows use
    run.all_reduce(used, "max")
    return float(sums[0]) / world, float(sums[-2] / sums[-1]), int(used.sum())
