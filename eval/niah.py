"""Needle in a haystack, text and vision (`omni eval niah`): retrieval accuracy over context length x depth.

LongVA (Zhang et al. 2024, "Long Context Transfer from Language to Vision", arXiv 2406.16852)
measures long-context retrieval with a grid: for each context length and each needle depth (the
share of the haystack before the needle), items with the needle there and a question at the end,
scored by exact match of the answer tokens under teacher forcing (every answer token is the
model's argmax given the true prefix), drawn as a heatmap with depth on y and length on x. Text
NIAH hides "The special magic number is NNNNNNN." in real text; V-NIAH hides a picture among
haystack pictures. The items are :mod:`omni.toy.needles`' (held out from training by content).

The position encoding can be swapped at evaluation (``niah.rope``: YaRN or M-RoPE++ scaling on a
checkpoint trained without it, the "train at L, test at 4L" experiment). A length beyond what the
encoding covers (the checkpoint's ``max_seq_len``, times the scaling factor given here) is refused
unless ``niah.extrapolate`` asks to measure plain extrapolation.

Outputs (``--out DIR``): ``metrics.json`` (the grid, per-length means, the mean), ``niah.png``
(the heatmap, matplotlib) and ``index.html`` (the heatmap and the table).
"""

from __future__ import annotations

import dataclasses
import html
import io
from pathlib import Path

import numpy as np

from omni.errors import OmniError


def with_rope(model, rope) -> tuple[int, str]:
    """Evaluate ``model`` with position encoding ``rope`` (a RopeConfig; None: its own). Returns
    (positions the encoding covers, a description). The covered context is the checkpoint's
    ``max_seq_len`` times the new factor over the saved one."""
    from omni.rope import MROPE_KINDS

    saved = model.config.rope
    if rope is None:
        return model.config.max_seq_len, _describe(saved)
    if (saved.kind in MROPE_KINDS) != (rope.kind in MROPE_KINDS):
        fam = MROPE_KINDS if saved.kind in MROPE_KINDS else ("rope", "yarn")
        raise OmniError(f"niah.rope.kind={rope.kind!r} does not fit this checkpoint, trained with {saved.kind!r}: "
                        f"its positions are {'3-D' if saved.kind in MROPE_KINDS else '1-D'}; choose from {', '.join(fam)}")
    cover = int(model.config.max_seq_len * rope.factor / saved.factor)
    model.config = dataclasses.replace(model.config, rope=rope, max_seq_len=cover)
    model.init_buffers()
    return cover, _describe(rope)


def _describe(rope) -> str:
    extra = ""
    if rope.kind == "rope" and rope.scaling != "none":
        extra = f", {rope.scaling} x{rope.factor:g}"
    elif rope.kind in ("yarn", "mrope_plus"):
        extra = f" x{rope.factor:g}"
    return rope.kind + extra


def items(tok, kind: str, length: int, depth: float, n: int, seed: int, split: str, pool=None) -> list:
    """``n`` items (:class:`omni.toy.needles.Item`) of one grid cell, the same for the same arguments."""
    from omni.toy import needles

    rng = np.random.default_rng([seed, length, int(round(depth * 1000))])
    if kind == "text":
        return [needles.text_item(tok, length, depth, rng, split) for _ in range(n)]
    return [needles.vision_item(pool, length, depth, rng) for _ in range(n)]


def score(model, tok, batch: list, predictions: list | None = None) -> list[bool]:
    """Exact match of each item's answer under teacher forcing: one forward over the right-padded
    rows; the argmax at position t - 1 must be ``ids[t]`` for every answer position t.
    ``predictions``, if given, receives each item's argmax answer ids."""
    import torch

    from omni.eval.detection import padded_batch

    ids, positions = padded_batch(model, tok, [torch.tensor(it.ids) for it in batch])
    with torch.inference_mode():
        logits = model(ids, position_ids=positions).logits
    ids = ids.cpu()
    out = []
    for j, it in enumerate(batch):
        pred = logits[j, it.answer_start - 1:it.answer_end - 1].argmax(-1).cpu()
        out.append(bool((pred == ids[j, it.answer_start:it.answer_end]).all()))
        if predictions is not None:
            predictions.append(pred.tolist())
    return out


def evaluate_niah(model, tok, kind: str, lengths, depths, n: int = 10, seed: int = 0, split: str = "validation",
                  batch_size: int = 4, grid: int = 1, examples: list | None = None) -> dict:
    """The grid: ``accuracy[d][l]`` = share of the ``n`` items at depth ``depths[d]`` and length
    ``lengths[l]`` answered exactly; with per-length means and the mean. ``examples`` receives one
    (length, depth, item, the model's answer under teacher forcing, correct) per cell."""
    from omni.toy import needles

    if kind not in ("text", "vision"):
        raise OmniError(f"niah.kind={kind!r} is invalid: choose from text, vision")
    for d in depths:
        needles.check_depth(d)
    pool = needles.ScenePool(tok, split, grid, seed=seed) if kind == "vision" else None
    acc = np.zeros((len(depths), len(lengths)))
    real = np.zeros(len(lengths))
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            cell = items(tok, kind, length, depth, n, seed, split, pool)
            hits, preds = [], []
            for i in range(0, n, batch_size):
                hits += score(model, tok, cell[i:i + batch_size], preds)
            acc[di, li] = float(np.mean(hits))
            real[li] = np.mean([len(it.ids) for it in cell])
            if examples is not None:
                examples.append((length, depth, cell[0], tok.decode(preds[0], strict=False).text.strip(), hits[0]))
    return {"kind": kind, "split": split, "lengths": list(lengths), "depths": list(depths), "items_per_cell": n,
            "tokens": [float(t) for t in real], "accuracy": acc.round(4).tolist(),
            "per_length": acc.mean(0).round(4).tolist(), "mean": round(float(acc.mean()), 4)}


def heatmap_png(m: dict, title: str) -> bytes:
    """LongVA's layout: depth (top 0%) on y, context length on x, accuracy 0..1 red to green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    acc = np.asarray(m["accuracy"])
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(m["lengths"]), 1.0 + 0.55 * len(m["depths"])), dpi=100)
    im = ax.imshow(acc, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(m["lengths"])), [str(n) for n in m["lengths"]])
    ax.set_yticks(range(len(m["depths"])), [f"{d:.0%}" for d in m["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (i, j), v in np.ndenumerate(acc):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def page(m: dict, title: str, examples: list, tok) -> str:
    """The HTML page: the heatmap, the grid as a table, one example per cell (the prompt's end, the
    answer, the model's)."""
    head = "".join(f"<th>{n}</th>" for n in m["lengths"])
    rows = "".join(f"<tr><th>{d:.0%}</th>" + "".join(f"<td>{v:.2f}</td>" for v in r) + "</tr>"
                   for d, r in zip(m["depths"], m["accuracy"]))
    ex = []
    for length, depth, it, said, ok in examples:
        tail = tok.decode(it.ids[max(it.answer_start - 24, 1):it.answer_start], strict=False).text
        ex.append(f"<tr><td>{length}</td><td>{depth:.0%}</td><td>{html.escape(tail)}</td>"
                  f"<td>{html.escape(it.answer)}</td><td>{html.escape(said)}</td><td>{'yes' if ok else 'no'}</td></tr>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:right}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p>mean exact match {m['mean']:.3f} over "
            f"{len(m['lengths'])} lengths x {len(m['depths'])} depths, {m['items_per_cell']} items each "
            f"({html.escape(m['split'])} split)</p><img src='niah.png' alt='heatmap'>"
            f"<h2>accuracy (depth x length)</h2><table><tr><th></th>{head}</tr>{rows}</table>"
            "<h2>one item per cell</h2><table><tr><th>length</th><th>depth</th><th>end of the prompt</th>"
            f"<th>answer</th><th>the model's (teacher-forced argmax)</th><th>right</th></tr>{''.join(ex)}</table></body></html>")


def niah_suite(checkpoint, data, cfg, out: Path | None = None) -> dict:
    """`omni eval niah --checkpoint DIR`: the grid of ``cfg.niah`` on a checkpoint; with ``out``, also
    the heatmap PNG and the HTML page."""
    from omni.checkpoint import load
    from omni.io import atomic_write_bytes, atomic_write_text

    if data:
        raise OmniError("the niah suite makes its items from the toy world and its text; it takes no --data")
    c = cfg.niah
    model, tok = load(checkpoint, device="cpu")
    if c.kind == "vision" and tok.image is None:
        raise OmniError(f"{checkpoint}: its bundle has no image tokenizer, which V-NIAH (niah.kind=vision) needs")
    cover, rope = with_rope(model, c.rope)
    too_long = [n for n in c.lengths if n > cover]
    if too_long and not c.extrapolate:
        raise OmniError(f"niah.lengths {too_long} are beyond the {cover} positions this checkpoint's position encoding "
                        f"({rope}) covers: give lengths <= {cover}, scale it (for example niah.rope.kind=yarn "
                        f"niah.rope.factor={-(-max(too_long) // model.config.max_seq_len)} "
                        f"niah.rope.original_max_position_embeddings={model.config.max_seq_len}), or set "
                        "niah.extrapolate=true to measure plain extrapolation")
    examples: list = []
    m = evaluate_niah(model, tok, c.kind, c.lengths, c.depths, c.items, c.seed, c.split, c.batch_size, c.grid,
                      examples)
    m.update(checkpoint=str(checkpoint), rope=rope, covered_positions=cover)
    if out is not None:
        title = f"{'V-NIAH' if c.kind == 'vision' else 'text NIAH'}: {Path(str(checkpoint)).name}, {rope}"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "niah.png", heatmap_png(m, f"{title} (mean {m['mean']:.2f})"))
        atomic_write_text(out / "index.html", page(m, title, examples, tok))
    return m
