"""Speculative Jacobi decoding of image blocks: several codes per forward pass, same distribution.

Teng et al., "Accelerating Auto-regressive Text-to-Image Generation with Training-free Speculative
Jacobi Decoding", 2024 (https://arxiv.org/abs/2410.01699), as Lumina-mGPT ships it. Jacobi
decoding (Santilli et al. 2023, https://arxiv.org/abs/2305.10427) feeds the last token together
with k guesses of the tokens after it; one forward pass then gives the model's distribution at
all k+1 positions. Guess i is kept when it agrees with the distribution at the position before it
(the rule of speculative sampling, Leviathan et al. 2023, https://arxiv.org/abs/2211.17192:
accept a draft g drawn from q with probability min(1, p(g) / q(g)), else draw from
normalize(max(0, p - q))), so every kept token is an exact sample of p; at temperature 0 a guess is
kept iff it is the argmax, so the output is exactly greedy decoding's. The distributions computed
past the first rejection become the next guesses (the Jacobi iteration), which is what makes long
runs of guesses right once the image's layout settles.

Here it runs inside image blocks (a known number of codes, one constraint: image ids), for all rows
of a batch at once: the rows advance by the shortest accepted run, and a row that accepted more
keeps its next accepted guess as its token at that position (also an exact sample). Text and audio
are decoded a token per step.
"""

from __future__ import annotations

import torch


def speculative_accept(p: torch.Tensor, q: torch.Tensor | None, draft: int,
                       generator: torch.Generator) -> tuple[bool, int]:
    """Keep or replace a draft token (Leviathan et al. 2023, algorithm 1).

    p: [V] the model's distribution at the draft's position; q: [V] the distribution the draft was
    drawn from, or None for a fixed (deterministic) draft, i.e. q = one-hot(draft). Returns
    (accepted, token): token is the draft when accepted, else a draw from max(0, p - q) renormalized,
    so that ``token`` is distributed as p either way.
    """
    q_d = 1.0 if q is None else float(q[draft])
    p_d = float(p[draft])
    if p_d >= q_d or float(torch.rand((), generator=generator)) * q_d < p_d:
        return True, draft
    residual = p.clone()
    if q is None:
        residual[draft] = 0.0
    else:
        residual = (residual - q).clamp_min_(0.0)
    total = float(residual.sum())
    if total <= 0:  # p == q up to rounding: p itself is the residual's limit
        residual, total = p, float(p.sum())
    return False, int(torch.multinomial(residual / total, 1, generator=generator))


class Drafts:
    """Per-row guesses for the next positions, with the distributions they were drawn from."""

    def __init__(self, rows: int):
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.dists: list[list[torch.Tensor]] = [[] for _ in range(rows)]

    def clear(self) -> None:
        for b in range(len(self.tokens)):
            self.tokens[b], self.dists[b] = [], []

    def window(self, last: list[int], k: int) -> tuple[list[list[int]], list[list[torch.Tensor | None]]]:
        """k guesses per row: a copy of the row's last token, the stored guesses, then copies of the
        last of them (fixed drafts: dists None). The first is always a copy: a Jacobi guess for it
        would have been computed after the token that was just rejected, and on the demo model such
        guesses kept being rejected window after window (1.1 codes per pass at k=8, 4.6 with copies)."""
        toks, dists = [], []
        for b, t in enumerate(last):
            have, have_d = [t] + self.tokens[b][:k - 1], [None] + self.dists[b][:k - 1]
            fill = k - len(have)
            toks.append(have + [have[-1]] * fill)
            dists.append(have_d + [None] * fill)
        return toks, dists


def jacobi_window(probs: list[list[torch.Tensor]], drafts: list[list[int]],
                  dists: list[list[torch.Tensor | None]], generator: torch.Generator,
                  store: Drafts) -> tuple[list[list[int]], list[int] | None]:
    """Accept guesses for every row from one forward pass over [last, g_1..g_k].

    probs[b][i]: [V] sampling distribution of the token after feed position i (i = 0..k), row b.
    drafts[b][i], dists[b][i]: guess g_{i+1} and the distribution it came from (None: fixed).
    Returns (accepted, pending): ``accepted`` [m] tokens per row, taken by every row (the guesses
    all rows kept); ``pending``: each row's token at the position after them (an exact sample, not
    yet fed), or None when all k guesses were kept (then position k's distribution is the next
    step's, and the caller samples from it). Guesses for the positions from the second after
    ``pending`` on are drawn into ``store`` (the one right after it is a copy, see :meth:`Drafts.window`).
    """
    rows, k = len(drafts), len(drafts[0])
    kept = []  # per row: (number of guesses accepted, token at that position)
    for b in range(rows):
        n, tok = k, None
        for i in range(k):
            ok, t = speculative_accept(probs[b][i], dists[b][i], drafts[b][i], generator)
            if not ok:
                n, tok = i, t
                break
        kept.append((n, tok))
    m = min(n for n, _ in kept)
    accepted = [drafts[b][:m] for b in range(rows)]
    store.clear()
    if m == k:
        return accepted, None
    # position m: a row that stopped there takes its replacement; a row that went further, its kept guess
    pending = [tok if n == m else drafts[b][m] for b, (n, tok) in enumerate(kept)]
    # Jacobi iteration: the distributions this pass computed after feed positions m+2..k (whose
    # tokens are guessed for feed positions m+3..k+1) give the guesses for those positions
    n = k - m - 1
    if n:
        later = [probs[b][i] for b in range(rows) for i in range(m + 2, k + 1)]
        draws = torch.multinomial(torch.stack(later), 1, generator=generator)[:, 0].tolist()  # one call: [rows * n]
        for b in range(rows):
            store.tokens[b], store.dists[b] = draws[b * n:(b + 1) * n], later[b * n:(b + 1) * n]
    return accepted, pending
