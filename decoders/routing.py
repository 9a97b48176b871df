"""Routing tokens and super-link queries: how the decoder hands hidden states to a task head.

VisionLLM v2 (Wu et al. 2024, https://arxiv.org/abs/2406.08394, Sec. 3.2 "super link"): when a
routing token such as ``<det>`` appears, K learned query embeddings are appended right after it, in
training and in token-by-token generation alike; the decoder's final hidden states at those K
positions condition the task head bound to that token. omni's sequences carry the K positions
explicitly, so training and generation run the same code::

    position    ... t-1      t       t+1 .. t+K    t+K+1
    id          ... <eoi>    <det>   SLOT .. SLOT  <eos>
    input emb.  ... E[<eoi>] E[<det>] q_1 .. q_K    E[<eos>]     q = the head's query embeddings [K, D]
    LM target   ... <det>    (none)  (none) .. <eos>             the slots' own ids are never targets

* ``SLOT`` (``<pad>``) is the id written at the K *slots*; its embedding is never used: the slots'
  input rows are replaced by the query embeddings (:meth:`SuperLinkQueries.splice`, called by the decoder's forward on its input embeddings). Reusing
  ``<pad>`` keeps every bundle's vocabulary as it is.
* The LM loss never scores a prediction *of* a slot: the targets at the routing token and the
  first K-1 slots are ignored (:func:`mask_slot_targets`); the last slot's
  prediction of what follows is scored as usual.
* The query states are the final hidden states at the slots, [K, D] per routing token
  (:meth:`SuperLinkQueries.gather`); in generation, when the model emits the routing token, the
  token and its K queries are fed in one step (:meth:`SuperLinkQueries.step_inputs`), so the KV
  cache holds the query positions and the next tokens attend to them.
* A head that reads an image (detection) reads the codes of the nearest image block before its
  routing token in the same document (:func:`image_context`).
* :class:`RoutingHeads` holds the heads a run enables (``heads.*``) and their queries: the trainer
  adds its losses to the LM loss, a checkpoint saves it beside the decoder (``heads.safetensors`` +
  ``heads.yaml``, :func:`save_heads` / :func:`load_heads`), generation runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from omni.errors import OmniError

SLOT = "<pad>"
"""The special whose id fills the K slot positions after a routing token (omni.vocab.SLOT: this layer
may not import the vocabulary; a test checks they agree)."""
IGNORE_INDEX = -100  # omni.model.IGNORE_INDEX (decoders may not import the model; a test checks they agree)


@dataclass(frozen=True)
class Route:
    """One routing token in a batch: row ``row``, token at position ``token``, its K slots after it."""

    row: int
    token: int
    name: str
    """The routing token, for example ``'<det>'``."""
    n_queries: int

    @property
    def slots(self) -> slice:
        return slice(self.token + 1, self.token + 1 + self.n_queries)


class SuperLinkQueries(nn.Module):
    """K learned query embeddings per routing token (VisionLLM v2's super-link queries).

    ``n_queries`` maps a routing token (``'<det>'``, ``'<gen>'``) to its K; ``token_ids`` maps the
    same names, and ``SLOT``, to their vocabulary ids.
    """

    def __init__(self, dim: int, n_queries: dict[str, int], token_ids: dict[str, int], init_std: float = 0.02):
        super().__init__()
        for name, k in n_queries.items():
            if name not in token_ids:
                raise OmniError(f"routing token {name!r} is not in the vocabulary's specials; known: "
                                f"{', '.join(sorted(token_ids))}")
            if not isinstance(k, int) or k < 1:
                raise OmniError(f"{name} needs at least one super-link query, got n_queries={k!r}")
        if SLOT not in token_ids:
            raise OmniError(f"the vocabulary has no {SLOT} (the slot placeholder)")
        self.n_queries = dict(n_queries)
        self.token_ids = {name: int(token_ids[name]) for name in n_queries}
        self.slot_id = int(token_ids[SLOT])
        # ParameterDict keys may not contain '<' or '>': '<det>' -> 'det'
        self.queries = nn.ParameterDict(
            {_key(name): nn.Parameter(torch.randn(k, dim) * init_std) for name, k in n_queries.items()})

    def find(self, ids: torch.Tensor) -> list[Route]:
        """:func:`find_routes` with this module's routing tokens and K."""
        return find_routes(ids, self.n_queries, self.token_ids, self.slot_id)

    def splicer(self, routes: list[Route]):
        """``splice`` bound to ``routes``: what :meth:`omni.model.OmniDecoder.forward` takes as ``splice``."""
        return lambda embeds: self.splice(embeds, routes)

    def splice(self, embeds: torch.Tensor, routes: list[Route]) -> torch.Tensor:
        """``embeds`` [B, T, D] with each route's slot rows replaced by its query embeddings (a new
        tensor: the gradient reaches both the token embeddings and the queries)."""
        if not routes:
            return embeds
        out = embeds.clone()
        for r in routes:
            out[r.row, r.slots] = self.queries[_key(r.name)].to(out.dtype)
        return out

    def gather(self, hidden: torch.Tensor, routes: list[Route]) -> dict[str, torch.Tensor]:
        """Query states by routing token: name -> [n_routes, K, D] from ``hidden`` [B, T, D], in the
        order of ``routes``."""
        by_name: dict[str, list[Route]] = {}
        for r in routes:
            by_name.setdefault(r.name, []).append(r)
        return {name: _take(hidden, [(r.row, r.slots) for r in rs]) for name, rs in by_name.items()}


    def step_inputs(self, name: str, device=None) -> tuple[torch.Tensor, list[Route]]:
        """What generation feeds in one step after sampling routing token ``name``: ids [1, 1+K] (the
        token, then K slots) and its route (``splice`` gives the slots the K queries)."""
        k, tid = self.n_queries[name], self.token_ids[name]
        return torch.tensor([[tid] + [self.slot_id] * k], device=device), [Route(0, 0, name, k)]


def _take(hidden: torch.Tensor, spans: list[tuple[int, slice]]) -> torch.Tensor:
    """hidden [B, T, D] at ``(row, positions)`` spans of one length N -> [len(spans), N, D], in one
    gather: its backward scatters into one zero tensor, where a gather per span would allocate and
    fill a [B, T, D] gradient each (a tenth of a step's time for a few dozen routes on a CPU)."""
    rows = torch.tensor([b for b, _ in spans], device=hidden.device)  # [R]
    pos = torch.stack([torch.arange(s.start, s.stop, device=hidden.device) for _, s in spans])  # [R, N]
    return hidden[rows[:, None], pos]  # [R, N, D]


def find_routes(ids: torch.Tensor, n_queries: dict[str, int], token_ids: dict[str, int], slot_id: int) -> list[Route]:
    """The routing tokens named in ``n_queries`` (name -> K) in ``ids`` [B, T], by row then position; each
    must be followed by its K slots (``slot_id``) inside the row (a row that cuts them off, or data
    written with another K, is refused)."""
    routes = []
    T = ids.shape[1]
    for name, k in n_queries.items():
        for b, t in (ids == token_ids[name]).nonzero().tolist():
            if t + k > T - 1:  # the slots are t+1 .. t+k
                raise OmniError(f"{name} at position {t} of a {T}-token row has no room for its {k} slots: "
                                "a routed document must not be cut (the packer keeps it whole)")
            got = ids[b, t + 1 : t + 1 + k]
            if not bool((got == slot_id).all()):
                n = int((got == slot_id).long().cumprod(0).sum())
                raise OmniError(f"{name} at position {t} is followed by {n} slot(s) ({SLOT}), the head has "
                                f"n_queries={k}: the data was written for another K, or the routing token "
                                "appears as plain text")
            routes.append(Route(b, t, name, k))
    return sorted(routes, key=lambda r: (r.row, r.token))


def mask_slot_targets(x: torch.Tensor, routes: list[Route], value=IGNORE_INDEX) -> torch.Tensor:
    """``x`` [B, T] indexed by target position (labels, shifted: labels[t] is the target of position t;
    or loss weights) with ``value`` at the routing token and its first K-1 slots, whose targets would be
    the slot placeholder: the LM never scores a prediction of a slot. A new tensor."""
    if not routes:
        return x
    x = x.clone()
    for r in routes:
        x[r.row, r.token : r.token + r.n_queries] = value
    return x


def _key(name: str) -> str:
    return name.strip("<>")


def image_context(ids: torch.Tensor, route: Route, boi_id: int, eoi_id: int,
                  doc_ids: torch.Tensor | None = None) -> slice:
    """Positions of the codes of the nearest complete image block before ``route``'s token in its row
    (and document, given ``doc_ids`` [B, T]): a slice ``boi + 1 .. eoi``. Refused when there is none
    (a ``<det>`` must follow the image it is asked about)."""
    row = ids[route.row, : route.token]
    eois = (row == eoi_id).nonzero().flatten().tolist()
    for eoi in reversed(eois):
        bois = (row[:eoi] == boi_id).nonzero().flatten().tolist()
        if not bois:
            break
        boi = bois[-1]
        if doc_ids is not None and doc_ids[route.row, boi] != doc_ids[route.row, route.token]:
            break  # the image belongs to an earlier document of the packed row
        return slice(boi + 1, eoi)
    raise OmniError(f"{route.name} at position {route.token} has no image before it in its document: put the "
                    "image the request is about before the routing token")


HEADS_WEIGHTS = "heads.safetensors"
HEADS_CONFIG = "heads.yaml"


class RoutingHeads(nn.Module):
    """The heads a run enables (:class:`omni.config.heads.HeadsConfig`) and their super-link queries.

    ``dim``: the decoder's hidden size D; ``token_ids``: the vocabulary's specials by name (routing
    tokens, ``SLOT``, ``<boi>``, ``<eoi>``); ``image_grid``: (h, w) of an image block's codes (what
    the detection head reads).
    """

    def __init__(self, cfg, dim: int, token_ids: dict[str, int], image_grid: tuple[int, int] | None = None,
                 image_tokenizer=None):
        import dataclasses

        from omni.decoders.base import head_class

        super().__init__()
        if not cfg.enabled:
            raise OmniError("no head is enabled (heads.det.enabled=true or heads.gen.enabled=true enables one)")
        self.dim, self.grid = dim, None if image_grid is None else tuple(image_grid)
        self.boi, self.eoi = int(token_ids["<boi>"]), int(token_ids["<eoi>"])
        self.queries = SuperLinkQueries(dim, cfg.enabled, token_ids)
        self.heads = nn.ModuleDict()
        if (cfg.det.enabled or cfg.gen.enabled) and self.grid is None:
            raise OmniError("the task heads read or make image blocks: the tokenizer bundle has no image tokenizer")
        if cfg.det.enabled:
            self.heads["det"] = head_class("detr")(dim, cfg.det)
        if cfg.gen.enabled:
            gen = cfg.gen
            if image_tokenizer is not None:  # a new run: the head diffuses in this tokenizer's latent
                h, w = self.grid
                if h != w:
                    raise OmniError(f"the diffusion head diffuses square latents; the image grid is {h}x{w}")
                gen = dataclasses.replace(gen, dim=dim, channels=image_tokenizer.config.embed_dim, size=h)
                cfg = dataclasses.replace(cfg, gen=gen)
            self.heads["gen"] = head_class("diffusion")(gen)
            if image_tokenizer is not None:
                from omni.decoders.diffusion import LatentStats, code_vectors

                table = code_vectors(image_tokenizer).float()  # [n_codes, E]: normalize by the codebook's spread
                self.heads["gen"].set_latent_stats(LatentStats(table.mean(0), table.std(0).clamp_min(1e-6)))
        self.cfg = cfg  # with the gen head's dimensions resolved: what heads.yaml records

    def find(self, ids: torch.Tensor) -> list[Route]:
        return self.queries.find(ids)

    def image_states(self, hidden: torch.Tensor, ids: torch.Tensor, routes: list[Route],
                     doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states of the image each route reads: [R, N, D], N = h*w."""
        n = self.grid[0] * self.grid[1]
        spans = []
        for r in routes:
            span = image_context(ids, r, self.boi, self.eoi, doc_ids)
            if span.stop - span.start != n:
                raise OmniError(f"{r.name} at position {r.token} reads an image block of {span.stop - span.start} "
                                f"codes; the image tokenizer's grid {self.grid[0]}x{self.grid[1]} has {n}")
            spans.append((r.row, span))
        return _take(hidden, spans)

    def gen_codes(self, ids: torch.Tensor, routes: list[Route], code_of) -> torch.Tensor:
        """The codes [R, h, w] of the image block right after each ``<gen>`` route's slots (what its head
        should make); ``code_of`` maps image ids to codes (the vocabulary's ``id_to_code``)."""
        h, w = self.grid
        out = []
        for r in routes:
            at = r.slots.stop
            block = ids[r.row, at : at + h * w + 2]
            if len(block) != h * w + 2 or int(block[0]) != self.boi or int(block[-1]) != self.eoi:
                raise OmniError(f"{r.name} at position {r.token} is not followed by a whole image block after its "
                                "slots: a <gen> document holds the image its head should make")
            out.append(code_of(block[1:-1]).reshape(h, w))
        return torch.stack(out)

    def gen_latents(self, image_tokenizer, codes: torch.Tensor) -> torch.Tensor:
        """codes [R, h, w] -> the diffusion head's targets: the code vectors [R, E, h, w], normalized."""
        with torch.no_grad():
            z = image_tokenizer.lookup(codes.to(next(image_tokenizer.parameters()).device))
        return self.heads["gen"].latent_stats.normalize(z.float())

    def losses(self, hidden: torch.Tensor, ids: torch.Tensor, routes: list[Route], det_boxes: list[torch.Tensor],
               doc_ids: torch.Tensor | None = None, gen_latents: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The heads' named loss terms for the ``routes`` of a batch (final hidden states [B, T, D]).

        ``det_boxes``: the ground truth of each ``<det>`` route in order, float [n, 4] (x0, y0, x1, y1)
        in [0, 1]; ``gen_latents``: the targets of the ``<gen>`` routes in order, [R, E, h, w]
        (:meth:`gen_latents`). Terms are named by head (``det_ce``, ``det_l1``, ``det_giou``,
        ``gen_diffusion``); {} without routes."""
        from omni.decoders.boxes import xyxy_to_cxcywh

        terms: dict[str, torch.Tensor] = {}
        gen = [r for r in routes if r.name == "<gen>"]
        if gen and "gen" in self.heads:
            if gen_latents is None or len(gen_latents) != len(gen):
                raise OmniError(f"{len(gen)} <gen> routes but {0 if gen_latents is None else len(gen_latents)} targets")
            out = self.heads["gen"](self.queries.gather(hidden, gen)["<gen>"], target=gen_latents.to(hidden.device))
            terms.update(self.heads["gen"].loss(out))
        det = [r for r in routes if r.name == "<det>"]
        if det and "det" in self.heads:
            if len(det_boxes) != len(det):
                raise OmniError(f"{len(det)} <det> routes but ground truth for {len(det_boxes)}")
            out = self.heads["det"](self.queries.gather(hidden, det)["<det>"],
                                    self.image_states(hidden, ids, det, doc_ids), grid=self.grid)
            targets = [xyxy_to_cxcywh(b.to(hidden.device, torch.float32)) for b in det_boxes]
            terms.update(self.heads["det"].loss(out, targets))
        return terms


    @torch.no_grad()
    def predict(self, hidden: torch.Tensor, ids: torch.Tensor, routes: list[Route], threshold: float = 0.5,
                doc_ids: torch.Tensor | None = None) -> list[list[tuple]]:
        """Per ``<det>`` route: [(box (x0, y0, x1, y1) in [0, 1], score), ...] scoring at least
        ``threshold``, highest first (hidden: the final hidden states [B, T, D], float32)."""
        det = [r for r in routes if r.name == "<det>"]
        if not det:
            return []
        out = self.heads["det"](self.queries.gather(hidden, det)["<det>"],
                                self.image_states(hidden, ids, det, doc_ids), grid=self.grid)
        return self.heads["det"].predict(out, threshold)


    @torch.no_grad()
    def make_image(self, hidden: torch.Tensor, route: Route, image_tokenizer, generator=None,
                   guidance: float | None = None, steps: int | None = None) -> torch.Tensor:
        """The codes [h, w] of the image the diffusion head makes for one ``<gen>`` route: a sample in the
        tokenizer's latent, snapped to the nearest code at each cell (an ordinary image block)."""
        return self.make_images(hidden, [route], image_tokenizer, generator, guidance, steps)[0]

    @torch.no_grad()
    def make_images(self, hidden: torch.Tensor, routes: list[Route], image_tokenizer, generator=None,
                    guidance: float | None = None, steps: int | None = None) -> torch.Tensor:
        """:meth:`make_image` for several ``<gen>`` routes in one sampler batch: codes [R, h, w]."""
        from omni.decoders.diffusion import latent_to_codes

        head = self.heads["gen"]
        z = head.sample(self.queries.gather(hidden, routes)["<gen>"], generator, guidance, steps)
        return latent_to_codes(image_tokenizer, z, head.latent_stats)


def save_heads(heads: RoutingHeads, directory) -> None:
    """``directory/heads.safetensors`` (weights) and ``directory/heads.yaml`` (their HeadsConfig)."""
    from pathlib import Path

    from safetensors.torch import save

    from omni.config import save_config
    from omni.io import atomic_write_bytes

    state = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    atomic_write_bytes(Path(directory) / HEADS_WEIGHTS, save(state, metadata={"format": "pt"}))
    save_config(heads.cfg, Path(directory) / HEADS_CONFIG)


def load_heads(directory, dim: int, token_ids: dict[str, int], image_grid=None) -> RoutingHeads | None:
    """The heads saved in ``directory``, or None when it holds none."""
    from pathlib import Path

    from safetensors.torch import load_file

    from omni.config import load_config
    from omni.config.heads import HeadsConfig

    d = Path(directory)
    if not (d / HEADS_CONFIG).is_file():
        return None
    heads = RoutingHeads(load_config(HeadsConfig, d / HEADS_CONFIG), dim, token_ids, image_grid)
    missing, unexpected = heads.load_state_dict(load_file(str(d / HEADS_WEIGHTS)), strict=False)
    if missing or unexpected:
        raise OmniError(f"{d / HEADS_WEIGHTS} does not fit {d / HEADS_CONFIG}: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}")
    return heads


__all__ = ["HEADS_CONFIG", "HEADS_WEIGHTS", "IGNORE_INDEX", "SLOT", "Route", "RoutingHeads", "SuperLinkQueries",
           "find_routes", "image_context", "load_heads", "mask_slot_targets", "save_heads"]
