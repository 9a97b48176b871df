"""Preference tuning math: sigmoid DPO and LongWriter-V's IterDPO pairs (the pieces `train.stage: dpo` builds on).

DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290, Eq. 7): with the
policy's and a frozen reference model's summed log-probabilities of the chosen response y_w and
the rejected one y_l given the same prompt x,

    L = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

The implicit rewards r = beta * (log pi - log ref) of each side, their margin r_w - r_l, and the
share of pairs with a positive margin (accuracy) are what the trainer logs, as TRL's DPOTrainer
does. An optional SFT term adds the chosen side's mean negative log-likelihood per token
(``sft_weight``; RPO, Pang et al. 2024, arXiv 2404.19733).

:class:`DPOTrainer` is ``omni train`` with ``train.stage=dpo``: the datasets hold preference pairs
(``omni data preprocess`` of prompt/chosen/rejected samples, docs/data.md), packed whole by
:class:`omni.data.packing.PairPacker` so the two sides of a pair are pieces of their own (block-
diagonal attention, positions from 0: each side is scored exactly as if alone); only response
tokens are scored (the prompt's targets carry loss mask 0, as in SFT). The reference is a frozen
copy of the ``train.init_from`` weights, reloaded from there on resume; its log-probabilities are
computed on the same packed rows under ``no_grad``.

IterDPO (Zhang et al. 2025, "LongWriter-V", arXiv 2502.14834, Sec. 3.3): a long output is split into
segments and corrected segment by segment; pair i holds the same inputs, the corrected output up
to segment i (chosen) and the original up to segment i (rejected), for every segment i that the
correction changed. Pairs of prefixes make each preference short where the corrections are,
instead of one pair of two whole long outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from omni.errors import OmniError
from omni.train.loop import Trainer  # loop.py imports DPOTrainer only inside train(): no cycle


def token_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(label) of each scored target, 0 elsewhere: ``logits`` [B, T, V], ``labels`` [B, T]
    (already shifted: the target of position t), ``mask`` [B, T] (1 on response tokens, 0 on the
    prompt and padding) -> [B, T] float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    safe = labels.clamp_min(0)  # masked positions may hold IGNORE_INDEX
    return logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask.float()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of the scored targets of each row -> [B] float32 (see :func:`token_logps`)."""
    return token_logps(logits, labels, mask).sum(-1)


def piece_sums(values: torch.Tensor, doc_ids: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Sums of ``values`` [B, T] over each document piece of packed rows, in row order: ``doc_ids``
    [B, T] (pieces 0, 1, ... of a row; -1 on padding), ``pieces`` the number of pieces of each row
    -> [sum(pieces)]."""
    B, T = doc_ids.shape
    key = doc_ids + torch.arange(B, device=doc_ids.device)[:, None] * T  # piece j of row r -> r * T + j
    valid = doc_ids >= 0
    sums = values.new_zeros(B * T).index_add(0, key[valid], values[valid])
    index = torch.tensor([r * T + j for r, n in enumerate(pieces) for j in range(n)], device=doc_ids.device)
    return sums[index]


@dataclass
class PairLogps:
    """Summed response log-probabilities of the pairs of a packed batch, [P] each."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    """Scored response tokens of each chosen side."""


def pair_logps(logits: torch.Tensor, batch: dict) -> PairLogps:
    """The pairs of a batch of :class:`omni.data.packing.PairPacker` rows (each row: chosen, rejected,
    chosen, rejected, ... pieces) scored by ``logits`` [B, T, V]."""
    dev = logits.device
    labels, mask, doc_ids = (batch[k].to(dev) for k in ("labels", "loss_mask", "doc_ids"))
    pieces = [len(spans) for spans in batch["spans"]]
    assert all(n % 2 == 0 for n in pieces) and all(s[2] % 2 == j % 2 for spans in batch["spans"]
                                                   for j, s in enumerate(spans)), "rows of whole pairs, chosen first"
    seq = piece_sums(token_logps(logits, labels, mask), doc_ids, pieces)  # [2P]
    tokens = piece_sums(mask.float(), doc_ids, pieces)
    return PairLogps(seq[0::2], seq[1::2], tokens[0::2])


@dataclass
class DPOOutput:
    """The loss and what the trainer logs, each a scalar tensor (the loss carries the gradient)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    """Mean beta * (log pi(y_w) - log ref(y_w)) over the pairs."""
    rejected_rewards: torch.Tensor
    """Mean beta * (log pi(y_l) - log ref(y_l))."""
    margin: torch.Tensor
    """Mean chosen minus rejected reward."""
    accuracy: torch.Tensor
    """Share of pairs whose chosen reward exceeds the rejected one."""


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, sft_weight: float = 0.0,
             chosen_tokens: torch.Tensor | None = None) -> DPOOutput:
    """Sigmoid DPO over a batch of pairs (each argument [P], summed response log-probs; the
    reference's carry no gradient). ``sft_weight`` > 0 adds that weight times the chosen side's
    negative log-likelihood per response token (``chosen_tokens`` [P] counts them)."""
    if beta <= 0:
        raise OmniError(f"train.dpo.beta={beta} must be > 0 (the DPO temperature; 0.1 is the usual choice)")
    shapes = {t.shape for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise OmniError(f"dpo_loss expects four [P] tensors of one shape, got {sorted(map(tuple, shapes))}")
    chosen = beta * (policy_chosen - ref_chosen.detach())  # [P]
    rejected = beta * (policy_rejected - ref_rejected.detach())  # [P]
    loss = -F.logsigmoid(chosen - rejected).mean()  # Eq. 7
    if sft_weight > 0:
        if chosen_tokens is None:
            raise OmniError("dpo_loss: sft_weight > 0 needs chosen_tokens (response tokens of each chosen side)")
        loss = loss + sft_weight * (-policy_chosen / chosen_tokens.clamp_min(1)).mean()
    with torch.no_grad():
        return DPOOutput(loss, chosen.mean(), rejected.mean(), (chosen - rejected).mean(),
                         (chosen > rejected).float().mean())


def iterdpo_pairs(original: Sequence, corrected: Sequence,
                  rejected_prefix: str = "original") -> list[tuple[int, list, list]]:
    """IterDPO's prefix pairs of one long output: ``original`` and ``corrected`` are its segments
    (any objects comparable with ``==``; a segment the corrector kept is equal in both). Returns
    ``(i, chosen, rejected)`` for each segment i that the correction changed, in order (none when
    nothing changed): chosen = ``corrected[:i + 1]``; rejected = ``original[:i + 1]`` (``rejected_prefix``
    'original', LongWriter-V's pairs as the issue states them) or ``corrected[:i] + [original[i]]``
    ('corrected': both sides share the corrected prefix and differ in segment i alone, so the
    preference is about that segment only, not also about the earlier ones a previous pair covers)."""
    if len(original) != len(corrected):
        raise OmniError(f"IterDPO needs the original and the corrected output in the same segments: "
                        f"{len(original)} vs {len(corrected)}")
    if rejected_prefix not in ("original", "corrected"):
        raise OmniError(f"rejected_prefix={rejected_prefix!r} is invalid; choose from 'original', 'corrected'")
    before = original if rejected_prefix == "original" else corrected
    return [(i, list(corrected[:i + 1]), [*before[:i], original[i]])
            for i in range(len(original)) if corrected[i] != original[i]]




class DPOTrainer(Trainer):
    """``omni train`` with ``train.stage=dpo`` (see the module docstring). Everything else, the
    schedule, clipping, skipped steps, checkpoints, exact resume, DDP and FSDP2, is :class:`Trainer`'s;
    the loss is a mean over the global batch's pairs, so 2 processes with half the micro-batch
    compute the gradient of 1 process with all of it."""

    def __init__(self, cfg, resume: str = "auto", progress: bool = True):
        super().__init__(cfg, resume, progress)
        self.reference, self.reference_path = self._reference(cfg.train.init_from)

    def _reference(self, source: str):
        """A frozen OmniDecoder with the weights of ``source`` (train.init_from), on this rank's device."""
        from safetensors.torch import load_file

        from omni.checkpoint import WEIGHTS_FILE, resolve_checkpoint
        from omni.model import OmniDecoder

        path = resolve_checkpoint(source)
        ref = OmniDecoder(self.cfg.model).to(self.info.device)
        ref.set_modality_table(self.modality_table.to(self.info.device))
        ref.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        return ref.eval().requires_grad_(False), path

    def summary(self, resume: str) -> str:
        d = self.cfg.train.dpo
        pairs = sum(p.ds.pairs for p in self.stream.packers)
        return (super().summary(resume) + f"\ndpo: {pairs:,} preference pairs, beta {d.beta}, sft_weight "
                f"{d.sft_weight}, reference {self.reference_path} (frozen)")

    def _pair_terms(self, batch: dict) -> tuple[PairLogps, PairLogps]:
        """(policy, reference) log-probs of a batch's pairs; the policy's carry the gradient."""
        dev = self.info.device
        ids = batch["input_ids"].to(dev)
        kw = {"doc_ids": batch["doc_ids"].to(dev), "position_ids": batch["position_ids"].to(dev)}
        policy = pair_logps(self.module(ids, **kw).logits, batch)
        with torch.no_grad():
            ref = pair_logps(self.reference(ids, **kw).logits, batch)
        return policy, ref

    def _loss(self, policy: PairLogps, ref: PairLogps) -> DPOOutput:
        d = self.cfg.train.dpo
        return dpo_loss(policy.chosen, policy.rejected, ref.chosen, ref.rejected, d.beta, d.sft_weight,
                        policy.chosen_tokens)

    @staticmethod
    def _add(sums: torch.Tensor, out: DPOOutput, policy: PairLogps) -> None:
        """Accumulate pair-weighted sums: [pairs, loss, chosen reward, rejected reward, margin,
        accuracy, chosen logps, rejected logps]."""
        p = float(policy.chosen.shape[0])
        values = [out.loss, out.chosen_rewards, out.rejected_rewards, out.margin, out.accuracy,
                  policy.chosen.mean(), policy.rejected.mean()]
        sums[0] += p
        for k, v in enumerate(values):
            sums[1 + k] += float(v.detach()) * p

    @staticmethod
    def _row(sums: torch.Tensor, prefix: str = "") -> dict:
        names = ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy", "logps_chosen", "logps_rejected")
        n = float(sums[0].clamp_min(1.0))
        return {f"{prefix}pairs": int(sums[0]), **{f"{prefix}{k}": float(sums[1 + i]) / n for i, k in enumerate(names)}}

    def train_step(self) -> dict:
        import contextlib

        from omni.parallel.dist import all_reduce_sum
        from omni.run import lr_at

        tc, dev = self.cfg.train, self.info.device
        lr = lr_at(self.step, tc.lr, tc.steps, tc.warmup_steps, tc.schedule, tc.min_lr, tc.decay_fraction)
        for g in self.opt.param_groups:
            g["lr"] = lr
        batches = [self.stream.next_batch(tc.micro_batch_size) for _ in range(tc.grad_accum)]
        # the loss is a mean over the pairs of the whole global batch (every row holds at least one)
        local = sum(len(spans) // 2 for b in batches for spans in b["spans"])
        n_pairs = all_reduce_sum(torch.tensor(float(local), dtype=torch.float64))
        autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if tc.precision == "bf16"
                    else contextlib.nullcontext())
        sums = torch.zeros(8, dtype=torch.float64)
        for i, b in enumerate(batches):
            last = i == len(batches) - 1
            if last and hasattr(self.module, "set_requires_gradient_sync"):
                self.module.set_requires_gradient_sync(True)
            with self._sync_context(last), autocast:
                policy, ref = self._pair_terms(b)
                out = self._loss(policy, ref)  # a mean over this micro-batch's pairs
                share = policy.chosen.shape[0] / float(n_pairs)
                loss = out.loss * share * self.info.world  # DDP / FSDP average the gradients over the ranks
            loss.backward()
            self._add(sums, out, policy)
        all_reduce_sum(sums)
        grad_norm = self._clip()
        row = self._row(sums)
        bad, n_tokens = self._step_or_skip(torch.tensor(row["loss"]), grad_norm, batches)
        return {"step": self.step, **row, "lr": lr, "grad_norm": float(grad_norm), "skipped": bool(bad),
                "skipped_steps": self.skipped_steps, "tokens": n_tokens}

    @torch.no_grad()
    def validate(self) -> dict:
        """DPO's loss, rewards, margin and accuracy on the first ``eval_batches`` micro-batches per process
        of the held-out pairs of data.eval_paths (the same pairs every time)."""
        from omni.data.packing import build_stream
        from omni.parallel.dist import all_reduce_sum

        tc = self.cfg.train
        stream = build_stream(self.cfg.data, self.tok, self.dp_rank, self.dp_world, self.mrope, pairs=True,
                              paths=self.cfg.data.eval_paths)
        sums = torch.zeros(8, dtype=torch.float64)
        self.module.eval()
        try:
            for _ in range(tc.eval_batches):
                policy, ref = self._pair_terms(stream.next_batch(tc.micro_batch_size))
                self._add(sums, self._loss(policy, ref), policy)
        finally:
            self.module.train()
        all_reduce_sum(sums)
        return {"step": self.step, **self._row(sums, "val_")}
