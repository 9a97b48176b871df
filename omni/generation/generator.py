"""Interleaved text / image / audio generation over OmniDecoder with a KV cache.

``generate(model, tok, prompt)`` encodes the prompt(s), prefills one batched KV cache, then
decodes a token per step for every row: logits -> classifier-free guidance (inside blocks) ->
the modality state machine -> per-modality sampling. Finished image and audio blocks are
decoded by the image and audio tokenizers; the result is a :class:`omni.Document` per prompt.

Batching: prompts of different lengths are left-padded; the padding gets document id -1, so no
prompt token attends to it and positions start at 0 where each prompt starts (the same
block-diagonal mask as packed training). Greedy decoding of a batch equals decoding each prompt
alone.

Classifier-free guidance: every prompt gets a second, unconditional row in the same batch, with
its own cache. Its context is the prompt with every text segment dropped (``<bos>`` and the
prompt's images/audio, if any), followed by the same tokens the conditional row generates; inside
image (audio) blocks the logits become ``c + (s - 1)(c - u)``.

Routing heads (VisionLLM v2): a model loaded with task heads (``model.heads``, :func:`omni.load`) may
emit ``<det>`` once its row holds an image. That step feeds the token and its K super-link queries
at once (other rows feed their token and K padding positions no one attends to), so the cache holds
the queries and what follows attends to them; from then on positions are passed explicitly. The
detection head reads the row's query states and its last image's states (one forward over the
row, the same as the cached ones: tests/decoders/test_routing.py) and its boxes fill the
``Detect`` segment of the returned document. ``<gen>`` (room for an image block left): the diffusion
head samples a latent from the row's query states (``gen_guidance``, ``gen_steps``, seeded), snapped
to codes; that image block is then emitted as if sampled, so it enters the cache as an ordinary image
and the document continues after it.

M-RoPE (``model.rope.kind`` mrope / mrope_plus): every forward gets 3-D (time, height, width)
positions. The prefill takes :func:`omni.rope.mrope_positions` of each prompt (0 where it starts,
as above); then one :class:`omni.rope.MRopeCursor` per row (the unconditional rows' too) gives the
positions of the tokens each step feeds, following the same grammar: a generated image's codes go
row by row to (base, base + row, base + col) and the token after the block continues at max + 1
(Qwen2-VL's ``rope_deltas``, kept as the grammar's state since codes come one at a time). A Jacobi
window's guesses get the positions they would have, and the cursors keep only the accepted ones; a
routing step's slots are 1-D like any special, its padding positions are never attended to.
Anything that reads a full row again (the routing heads' states, reranking) passes
``mrope_positions`` of it, so it sees the cached function.

Reranking (``rerank: N``): every prompt is sampled N times (rows ``i * N + k``, which is what
``on_token`` / ``on_segment`` see), then each candidate is scored by the same model reading the
other way: ``<bos>`` + the candidate's image/audio blocks + the prompt's text + ``<eos>``, summing
log p over the text and ``<eos>``. The best candidate per prompt is returned (the first on ties;
a prompt without text keeps its first candidate).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from omni.config.generate import GenerateConfig
from omni.document import Detect, Document, Text
from omni.errors import OmniError
from omni.generation.jacobi import Drafts, jacobi_window
from omni.generation.processors import (
    IMAGE_MODE,
    ClassifierFreeGuidance,
    DecodeState,
    ModalityConstraint,
    ModalitySampler,
    check_budget,
)
from omni.rope import MRopeCursor, batch_positions, mrope_positions, uses_mrope


def _unconditional(doc: Document) -> Document:
    return Document([s for s in doc.segments if not isinstance(s, Text)])


def _left_pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, L] left-padded with ``pad``, and doc ids [B, L]: -1 on padding, 0 on the prompt."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    doc = torch.full((len(rows), L), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = r
        doc[i, L - len(r):] = 0
    return ids, doc


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_decoder(model):
    """``torch.compile(model)`` for decode steps, made once per model and kept while it lives.

    Dynamic shapes, so a growing cache, other batch sizes and Jacobi windows reuse the graphs
    instead of recompiling per length. On a CPU inductor's C++ wrapper calls the kernels (the
    Python wrapper costs about a millisecond a step at the ~20M size).
    """
    fn = _COMPILED.get(model)
    if fn is None:
        options = {"cpp_wrapper": True} if next(model.parameters()).device.type == "cpu" else None
        fn = _COMPILED[model] = torch.compile(model, dynamic=True, options=options)
    return fn


@torch.inference_mode()
def generate(
    model,
    tok,
    prompt: Document | str | list[Document | str],
    config: GenerateConfig | None = None,
    on_token: Callable[[int, int], None] | None = None,
    on_segment: Callable[[int, object], None] | None = None,
    **overrides,
) -> Document | list[Document]:
    """Continue ``prompt`` (one or a list); returns the generated Document(s).

    ``config`` (or keyword overrides such as ``max_new_tokens=64, cfg_scale=3.0``) sets sampling
    and stopping. ``on_token(row, id)`` is called for every new token, ``on_segment(row, segment)``
    for every finished image or audio block.
    """
    import dataclasses

    config = config or GenerateConfig()
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(GenerateConfig)}
        if unknown:
            raise OmniError(f"unknown generation settings {sorted(unknown)}; valid: "
                            f"{', '.join(f.name for f in dataclasses.fields(GenerateConfig))}")
        config = dataclasses.replace(config, **overrides)
    single = not isinstance(prompt, list)
    prompts = [prompt] if single else list(prompt)
    prompts = [Document([Text(p)]) if isinstance(p, str) else p for p in prompts]
    if not prompts:
        raise OmniError("generate needs at least one prompt")
    n = config.rerank
    rows, found = _sample(model, tok, [p for p in prompts for _ in range(n)], config, on_token, on_segment)
    if n > 1:
        best = rerank_scores(model, tok, prompts, rows, n).argmax(1).tolist()  # [P]
        rows = [rows[i * n + k] for i, k in enumerate(best)]
        found = [found[i * n + k] for i, k in enumerate(best)]
    eos = tok.vocab.special("<eos>")
    docs = [tok.decode([t for t in r if t != eos]) for r in rows]
    for doc, dets in zip(docs, found):  # the head's boxes into the <det> segments, in order
        for seg, (boxes, scores) in zip((x for x in doc.segments if isinstance(x, Detect)), dets):
            seg.boxes, seg.scores = boxes, scores
    return docs[0] if single else docs


@torch.inference_mode()
def rerank_scores(model, tok, prompts: list[Document], rows: list[list[int]], n: int) -> torch.Tensor:
    """[P, n] log p(prompt text, <eos> | <bos>, candidate's media blocks) for candidates
    ``rows[i * n + k]`` of prompt ``i``; all zeros for a prompt without text (nothing to explain)."""
    v = tok.vocab
    sp = v.specials
    seqs, spans = [], []
    for j, r in enumerate(rows):
        text = tok.encode_text(prompts[j // n].text) if prompts[j // n].text else []
        # keep whole blocks only: an unfinished one explains nothing
        media = [t for b in v.blocks(r) if b.closed for t in r[b.start:b.end]]
        seq = [sp["<bos>"]] + media + text + [sp["<eos>"]]
        seqs.append(torch.tensor(seq))
        spans.append((1 + len(media), len(seq)) if text else (len(seq), len(seq)))
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), sp["<pad>"], dtype=torch.long)  # right-padded: causal rows ignore it
    for j, s in enumerate(seqs):
        ids[j, :len(s)] = s
    positions = batch_positions(seqs, v, L) if uses_mrope(model) else None  # each row's own 3-D positions
    device = next(model.parameters()).device
    scores = torch.zeros(len(seqs))
    for c in range(0, len(seqs), 64):  # [64, L, V] logits at a time
        pos = None if positions is None else positions[:, c:c + 64].to(device)
        logp = model(ids[c:c + 64].to(device), position_ids=pos).logits.float().log_softmax(-1).cpu()  # [b, L, V]
        for j in range(c, min(c + 64, len(seqs))):
            a, e = spans[j]  # target positions a..e-1 are predicted at a-1..e-2
            scores[j] = logp[j - c, a - 1:e - 1].gather(-1, ids[j, a:e, None]).sum()
    return scores.reshape(len(prompts), n)


def _sample(model, tok, prompts: list[Document], config: GenerateConfig, on_token,
            on_segment) -> tuple[list[list[int]], list[list[tuple]]]:
    """The generated ids of every prompt (the decoding loop of the module docstring), and per prompt
    the (boxes, scores) of each ``<det>`` it emitted."""
    v = tok.vocab
    max_len = getattr(model.config, "max_seq_len", None) or 1 << 30
    cond = [tok.encode(p) for p in prompts]
    for i, ids in enumerate(cond):
        if len(ids) >= max_len:
            if config.prompt_overflow == "error":
                raise OmniError(f"prompt {i} has {len(ids)} tokens; the model's context is {max_len} "
                                f"(max_seq_len), leaving no room to generate. Shorten it or set "
                                f"prompt_overflow=truncate")
            cond[i] = _truncate(ids, max_len // 2, v)
    guidance = ClassifierFreeGuidance(config.cfg_scale, config.audio_cfg_scale)
    rows = cond + ([tok.encode(_unconditional(p)) for p in prompts] if guidance.active else [])
    B = len(prompts)
    ids, doc = _left_pad(rows, v.special("<pad>"))
    device = next(model.parameters()).device
    ids, doc = ids.to(device), doc.to(device)
    max_new = min(config.max_new_tokens, max_len - ids.shape[1])

    n_image = tok.image.tokens_per_image if tok.image is not None else None
    check_budget(config, max_new, n_image, tok.audio is not None,
                 context=f"the model's context is {max_len} tokens (max_seq_len) and the longest prompt "
                 f"takes {ids.shape[1]}" if max_new < config.max_new_tokens else "")
    state = DecodeState(v, B, max_new, config, n_image)
    heads = getattr(model, "heads", None)
    # routing id -> (name, K) of the heads the model has
    routing = {} if heads is None else {heads.queries.token_ids[n]: (n, k) for n, k in heads.queries.n_queries.items()}
    for r, prompt_ids in zip(state.rows, cond):
        r.prompt_images = sum(b.closed and b.kind == IMAGE_MODE for b in v.blocks(prompt_ids.tolist()))
    found: list[list[tuple]] = [[] for _ in range(B)]
    forced: list[list[int]] = [[] for _ in range(B)]  # ids a row must emit next: the image a <gen> head made
    ids_of = {n: i for i, (n, _) in routing.items()}
    constraint = ModalityConstraint(v, config, tok.image is not None, tok.audio is not None,
                                    det=ids_of.get("<det>"), gen=ids_of.get("<gen>") if tok.image is not None else None)
    sampler = ModalitySampler(config, torch.Generator().manual_seed(config.seed))

    def emit(nxt: torch.Tensor) -> None:  # nxt [B]: advance every row's state, stream
        done_before = [r.mode == "done" for r in state.rows]
        closed = state.advance(nxt)
        for b in range(B):
            if not done_before[b]:
                if on_token is not None:
                    on_token(b, int(nxt[b]))
                if closed[b] and on_segment is not None:
                    on_segment(b, _last_block(tok, state.rows[b].tokens))

    cache = model.new_cache(capacity=ids.shape[1] + max_new + config.jacobi)  # never grows while decoding
    cursors, prefill_positions = None, None  # M-RoPE: a position cursor per row (module docstring)
    if uses_mrope(model):
        prefill_positions, cursors = _mrope_prefill(rows, ids.shape[1], v)
        prefill_positions = prefill_positions.to(device)
    # Everything after the forward (guidance, the state machine, sampling) runs on the CPU: one
    # [B, V] copy a step, and the seeded CPU generator draws the same tokens on any device.
    logits = model(ids, doc_ids=doc, cache=cache,
                   position_ids=prefill_positions).logits[:, -1].float().cpu()  # prefill: [B or 2B, V]
    step = compiled_decoder(model) if config.compile else model
    drafts, pending = Drafts(B), None
    explicit = False  # positions passed explicitly: once a routing step fed padding between tokens
    while True:
        if pending is None:
            step_logits = guidance(logits[:B], logits[B:], state) if guidance.active else logits
            nxt = sampler(constraint(step_logits, state), state)  # [B]
        else:  # chosen by the last Jacobi window, not fed yet
            nxt, pending = torch.tensor(pending), None
        for b in range(B):
            if forced[b]:  # the diffusion head's image block enters as if sampled (the state machine counts it)
                nxt[b] = forced[b].pop(0)
        done_before = [r.mode == "done" for r in state.rows]
        emit(nxt)
        if state.finished:
            break
        route = {b: routing[int(t)] for b, t in enumerate(nxt.tolist()) if t in routing and not done_before[b]}
        if route:
            logits = _routing_step(model, heads, nxt, route, cache, guidance.active, v, cursors)
            explicit = True
            for b, (name, _) in route.items():
                hidden, row_ids, r = _route_states(model, heads, cond[b], state.rows[b].tokens, routing, device,
                                                   v if cursors is not None else None)
                if name == "<det>":
                    (pred,) = heads.predict(hidden, row_ids, [r], config.det_threshold)
                    found[b].append(([x for x, _ in pred], [sc for _, sc in pred]))
                else:  # seeded per prompt row and image: the same inputs make the same picture
                    g = torch.Generator().manual_seed(config.seed * 1_000_003 + b * 1009 + state.rows[b].images)
                    codes = heads.make_image(hidden, r, tok.image, g, config.gen_guidance, config.gen_steps)
                    forced[b] = v.block("image", codes.cpu())
            continue
        w = 0 if any(forced) else _jacobi_width(state, config.jacobi)
        if w:
            guesses, dists = drafts.window(nxt.tolist(), w)
            feed = torch.cat([nxt[:, None], torch.tensor(guesses)], 1)  # [B, 1 + w]
        else:
            drafts.clear()
            feed = nxt[:, None]  # [B, 1]
        feed = torch.cat([feed, feed]) if guidance.active else feed  # the unconditional rows follow
        past = cache.length
        new_doc = torch.zeros(feed.shape, dtype=torch.long, device=device)
        positions = _next_positions(cache, feed.shape[1]) if explicit else None
        if cursors is not None:  # M-RoPE: every row's cursor moves past its fed tokens (a window: see below)
            before = [c.clone() for c in cursors] if w else None
            positions = _mrope_feed(cursors, feed).to(device)
        raw = step(feed.to(device), doc_ids=new_doc, cache=cache,
                   position_ids=positions).logits.float().cpu()  # [B or 2B, 1 + w, V]
        if not w:
            logits = raw[:, -1]
            continue
        # the sampling distribution after each fed position, as the plain step would draw from it
        window = raw
        if guidance.active:
            window = torch.stack([guidance(raw[:B, i], raw[B:, i], state) for i in range(w + 1)], 1)  # [B, 1 + w, V]
        allowed = torch.stack([constraint.allowed(state, r) for r in state.rows]).to(window.device)  # [B, V]
        window = window.masked_fill(~allowed[:, None], float("-inf"))  # image codes at every position (see w)
        probs = [[sampler.probs(window[b, i], IMAGE_MODE) for i in range(w + 1)] for b in range(B)]  # [B][1 + w]
        accepted, pending = jacobi_window(probs, guesses, dists, sampler.generator, drafts)
        for j in range(len(accepted[0])):
            emit(torch.tensor([row[j] for row in accepted]))
        assert not state.finished, "a Jacobi window never reaches the end of a block"
        if pending is None:  # every guess kept: the last position's logits are the next step's
            logits = raw[:, -1]
        else:  # keep the fed tokens that were accepted (the window's first token and len(accepted[0]) guesses)
            cache.truncate(past + 1 + len(accepted[0]))
            if cursors is not None:  # ... and so do the cursors
                cursors = before
                _mrope_feed(cursors, feed[:, :1 + len(accepted[0])])

    return [list(r.tokens) for r in state.rows], found


def _next_positions(cache, T: int) -> torch.Tensor:
    """Positions [rows, T] of the next T fed tokens: each row's real (non-padding) tokens so far onward."""
    start = (cache.doc_ids >= 0).sum(1)  # [rows]
    return start[:, None] + torch.arange(T, device=start.device)[None]


def _mrope_prefill(rows: list[torch.Tensor], L: int, vocab) -> tuple[torch.Tensor, list[MRopeCursor]]:
    """M-RoPE positions [3, len(rows), L] of the left-padded prompts ``rows`` (each from 0 where it
    starts; 0 on the padding, which no one attends to) and a cursor per row that continues after it."""
    positions = torch.zeros(3, len(rows), L, dtype=torch.long)
    cursors = []
    for i, r in enumerate(rows):
        pos, cursor = MRopeCursor.prefill(r, vocab)
        positions[:, i, L - len(r):] = torch.from_numpy(pos)
        cursors.append(cursor)
    return positions, cursors


def _mrope_feed(cursors: list[MRopeCursor], feed: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
    """M-RoPE positions [3, rows, T] of ``feed`` [rows, T]: row i's cursor moves past its first
    ``lengths[i]`` tokens (all by default); the positions after those (padding no one attends to)
    repeat the last one."""
    rows, T = feed.shape
    out = torch.empty(3, rows, T, dtype=torch.long)
    for i, cursor in enumerate(cursors):
        n = T if lengths is None else lengths[i]
        pos = torch.from_numpy(cursor.extend(feed[i, :n]))
        out[:, i, :n] = pos
        out[:, i, n:] = pos[:, -1:]
    return out


def _routing_step(model, heads, nxt: torch.Tensor, route: dict, cache, cfg_rows: bool, vocab,
                  cursors: list[MRopeCursor] | None = None) -> torch.Tensor:
    """Feed this step's tokens, with the K slots (their queries spliced in) after each routing token and
    K padding positions (document -1: never attended to) after the others; the next logits [rows, V]:
    at the last slot of a routed row, at the token of the others. ``cursors`` (M-RoPE): the rows'
    position cursors, moved past the token and its slots."""
    from omni.decoders.routing import Route

    B = len(nxt)
    K = max(k for _, k in route.values())
    feed = torch.full((B, 1 + K), vocab.special("<pad>"), dtype=torch.long)
    docs = torch.full((B, 1 + K), -1, dtype=torch.long)
    feed[:, 0], docs[:, 0] = nxt, 0
    last = torch.zeros(B, dtype=torch.long)
    routes = []
    for b, (name, k) in route.items():
        feed[b, 1:1 + k], docs[b, 1:1 + k] = heads.queries.slot_id, 0
        last[b] = k
        routes.append(Route(b, 0, name, k))
    if cfg_rows:  # the unconditional rows feed the same
        feed, docs, last = torch.cat([feed, feed]), torch.cat([docs, docs]), torch.cat([last, last])
        routes += [Route(r.row + B, 0, r.name, r.n_queries) for r in routes]
    device = next(model.parameters()).device
    if cache.doc_ids is None:  # a prefill without padding: every cached token is the row's
        cache.doc_ids = torch.zeros(feed.shape[0], cache.length, dtype=torch.long, device=device)
    if cursors is not None:  # the token and its slots (1-D, as every special) are the row's, the rest padding
        positions = _mrope_feed(cursors, feed, (last + 1).tolist()).to(device)
    else:
        positions = _next_positions(cache, 1 + K)
    out = model(feed.to(device), doc_ids=docs.to(device), cache=cache, position_ids=positions,
                splice=heads.queries.splicer(routes))
    return out.logits[torch.arange(feed.shape[0], device=device), last.to(device)].float().cpu()


def _route_states(model, heads, prompt_ids: torch.Tensor, generated: list[int], routing: dict, device,
                  mrope_vocab=None):
    """(final hidden states [1, T, D] float32, ids [1, T], route) of the routing token that ends
    ``generated``: one forward over the row (the prompt, then the generated tokens with the slots fed
    after each routing token), equal to the cached states (tests/decoders/test_routing.py).
    ``mrope_vocab`` (an M-RoPE model): the row's 3-D positions are passed, as the cache had them."""
    seq = prompt_ids.tolist()
    for t in generated:
        seq.append(t)
        if t in routing:
            seq += [heads.queries.slot_id] * routing[t][1]
    ids = torch.tensor([seq], device=device)
    routes = heads.find(ids)
    positions = None
    if mrope_vocab is not None:
        positions = torch.from_numpy(mrope_positions(seq, mrope_vocab)[0])[:, None].to(device)  # [3, 1, T]
    hidden = model(ids, splice=heads.queries.splicer(routes), position_ids=positions,
                   return_hidden=True).hidden.float()
    return hidden, ids, routes[-1]


def _jacobi_width(state: DecodeState, k: int) -> int:
    """Guesses to feed this step: up to ``k`` while every row is inside an image block, so that all
    window positions are image codes (0: decode one token)."""
    if k <= 0 or state.image_tokens is None or any(r.mode != IMAGE_MODE for r in state.rows):
        return 0
    left = min(min(state.image_tokens - r.count, r.remaining) for r in state.rows)  # codes still to emit
    return max(0, min(k, left - 1))


def _truncate(ids: torch.Tensor, keep: int, vocab) -> torch.Tensor:
    """<bos> + about the last ``keep - 1`` tokens, cut where no image/audio block is split."""
    ok = vocab.split_points(ids.numpy())
    start = len(ids) - keep + 1
    while start < len(ids) and not ok[start]:
        start += 1
    return torch.cat([ids[:1], ids[start:]])


def _last_block(tok, tokens: list[int]):
    """The image or audio segment of the block that ``tokens`` just closed."""
    block = tok.vocab.blocks(tokens)[-1]
    return tok.decode(tokens[block.start:block.end]).segments[0]
