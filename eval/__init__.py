"""Evaluation (installed as ``omni.eval``): metrics, the tokenizer runners, the any-to-any demo suite, the judge.

* :mod:`omni.eval.metrics`: reconstruction metrics (PSNR, SSIM, codebook usage and perplexity,
  energy envelopes): pure functions of tensors;
* :mod:`omni.eval.tokenizers`: the image- and audio-tokenizer runners (and the evaluator the image
  tokenizer trainer calls every ``eval_every`` steps);
* :mod:`omni.eval.judge`: the image judge of the toy world (which colored shapes a picture shows);
* :mod:`omni.eval.demo`: the any-to-any suite of ``omni demo`` (caption <-> image, speech <-> text,
  stories), judged on scenes disjoint from training by content;
* :mod:`omni.eval.detection`: COCO AP of the ``<det>`` head (pycocotools), its chance row, and the
  detection suite on toy-world scenes;
* :mod:`omni.eval.gen_head`: the images of the ``<gen>`` head for held-out captions, judged;
* :mod:`omni.eval.niah`: needle in a haystack, text and vision (LongVA's V-NIAH), over length x depth;
* :mod:`omni.eval.longwrite`: long output (LongWriter-V's length and quality scores) on toy-world
  stories of N steps, and the corrected stories its IterDPO loop trains on.

:data:`SUITES` names what ``omni eval SUITE --checkpoint DIR [--data ...] [--out DIR] [key=value ...]``
runs; a suite is a function ``fn(checkpoint, data, cfg, out) -> dict`` (``cfg``: an
:class:`omni.config.eval.EvalConfig`), registered by ``'module:function'`` and imported on first use.

May import everything below the command line (core, tokenizers, data, generation, toy); nothing
but the CLI imports it.
"""

from __future__ import annotations

from collections.abc import Callable

from omni.registry import Registry

SUITES = Registry("evaluation suite", "suites", {
    "image-tokenizer": "omni.eval.tokenizers:image_suite",
    "audio-tokenizer": "omni.eval.tokenizers:audio_suite",
    "demo": "omni.eval.demo:demo_suite",
    "detection": "omni.eval.detection:detection_suite",
    "gen-head": "omni.eval.gen_head:gen_head_suite",
    "niah": "omni.eval.niah:niah_suite",
    "longwrite": "omni.eval.longwrite:longwrite_suite",
})
"""Suite name -> ``fn(checkpoint, data, cfg, out) -> dict`` or its 'module:function' path."""


def register_suite(name: str, fn: str | Callable) -> None:
    """Make ``omni eval NAME`` run ``fn`` (a function or 'module:function')."""
    SUITES.register(name, fn)


def suite(name: str) -> Callable:
    """The function of suite ``name``; an unknown name is an OmniError listing the suites."""
    return SUITES.load(name)
