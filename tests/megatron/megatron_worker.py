"""torchrun worker of tests/megatron/test_megatron_parity.py: megatron-core (through the CPU shim)
against a single-process OmniDecoder with the same weights, on gloo.

    python -m torch.distributed.run --standalone --nproc_per_node N megatron_worker.py JOB OUT.json

JOB ``two`` (2 processes): TP=2 forward / loss / gradients for three model variants, 10 training
steps at TP=2, a bf16 smoke run at TP=2, PP=2 with the 1F1B schedule (untied and tied), PP=2 x VP=2
interleaved. JOB ``four`` (4 processes): TP=2 x PP=2 with 1F1B, TP=2 x PP=2 x VP=2 interleaved. Several layouts in one job:
each torchrun pays ~3 s of imports per process; megatron's process groups are rebuilt between
checks. Rank 0 writes one JSON object per check: the measured differences (max abs, and relative:
max abs / max |reference|) and its wall time; the pytest side asserts the tolerances.

Every rank computes the reference itself (same seed, same weights: a few ms for this model).
The ``__main__`` guard matters: megatron's dist_checkpointing spawns a Manager that re-imports it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

TINY = dict(vocab_size=640, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=172, qk_norm="per_head",
            qk_norm_type="layernorm", max_seq_len=256, tie_embeddings=False, z_loss=1e-4)
"""recipes/models/tiny.yaml with z_loss 1e-4 (a visible z term)."""
VARIANTS = {
    "gqa_perhead_layernorm_untied": {},
    "mha_shared_rmsnorm_tied": dict(n_kv_heads=4, qk_norm="shared", qk_norm_type="rmsnorm", tie_embeddings=True),
    "gqa_no_qknorm_untied": dict(qk_norm="none"),
}
SEQ, MICRO = 32, 2
"""Tokens per row and rows per micro-batch."""


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------
def run_config(tp=1, pp=1, vp=1, precision="fp32", **model):
    from omni.config import RunConfig
    from omni.config.model import ModelConfig
    from omni.config.train import ParallelConfig, TrainConfig
    from omni.parallel.megatron.config import Machine, check_megatron

    cfg = RunConfig(model=ModelConfig(**{**TINY, **model}), train=TrainConfig(precision=precision),
                    parallel=ParallelConfig(backend="megatron", tensor=tp, pipeline=pp, virtual_pipeline=vp))
    check_megatron(cfg, world=tp * pp, machine=Machine())
    return cfg


def modality_table(vocab: int):
    """A fixed modality (0..4) per id, so the per-modality sums cover every slot."""
    return torch.randint(0, 5, (vocab,), generator=torch.Generator().manual_seed(11))


def reference(cfg, seed=0):
    """OmniDecoder with random weights; norm weights and biases moved away from 1 / 0, so a head or a
    norm in the wrong place changes the output."""
    from omni.model import OmniDecoder

    torch.manual_seed(seed)
    ref = OmniDecoder(cfg.model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    ref.set_modality_table(modality_table(cfg.model.vocab_size))
    return ref


def batches(vocab: int, n: int, seed: int = 5) -> list[dict]:
    """n micro-batches [MICRO, SEQ]: two packed documents per row (a random split), 10% of the labels
    ignored, loss weights 1 or 0.5 (as SFT masks x modality loss weights)."""
    from omni.model import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (MICRO, SEQ), generator=g)
        labels = torch.randint(0, vocab, (MICRO, SEQ), generator=g)
        labels[torch.rand(MICRO, SEQ, generator=g) < 0.1] = IGNORE_INDEX
        split = torch.randint(SEQ // 4, 3 * SEQ // 4, (MICRO, 1), generator=g)
        doc_ids = (torch.arange(SEQ)[None] >= split).long()
        weight = torch.where(torch.rand(MICRO, SEQ, generator=g) < 0.3, 0.5, 1.0) * (labels != IGNORE_INDEX)
        out.append(dict(ids=ids, labels=labels, doc_ids=doc_ids, weight=weight))
    return out


def global_weight(bs) -> torch.Tensor:
    return torch.stack([b["weight"].sum() for b in bs]).sum().clamp_min(1.0)


def reference_loss(ref, bs):
    """omni's loss of micro-batches bs normalized by their total weight (as omni/train/loop.py does),
    and each micro-batch's DecoderOutput."""
    W = global_weight(bs)
    total, outs = 0.0, []
    for b in bs:
        out = ref(b["ids"], labels=b["labels"], loss_mask=b["weight"], doc_ids=b["doc_ids"])
        total = total + out.loss * (b["weight"].sum().clamp_min(1.0) / W)
        outs.append(out)
    return total, outs


def setup(cfg, ref):
    """megatron process groups for cfg, this rank's model chunks, loaded with ref's weights."""
    from megatron.core import parallel_state

    from omni.parallel.megatron.model import build_model_chunks, initialize_parallel, load_omni_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    initialize_parallel(cfg, seed=1)
    chunks = build_model_chunks(cfg, te=False)
    for c in chunks:
        load_omni_state(c, ref.state_dict(), cfg)
    return chunks


def forward(model, b):
    """Vocab-parallel logits [MICRO, SEQ, Vp/TP] (or the hidden state on a non-last stage)."""
    from omni.parallel.megatron.model import forward_inputs

    return model(**forward_inputs(model, b["ids"], b["doc_ids"]))  # the block-diagonal causal mask


def sums(cfg, logits, b):
    from omni.parallel.megatron.loss import loss_sums

    return loss_sums(logits, b["labels"], b["weight"], vocab_size=cfg.model.vocab_size, z_loss=cfg.model.z_loss,
                     modality_table=modality_table(cfg.model.vocab_size))


def rank_key(chunk):
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank(),
            chunk.vp_stage or 0)


def gather_omni(cfg, chunks, what: str):
    """All ranks' chunk parameters ('weights') or gradients ('grads'), all-gathered over the world and
    converted back to omni's names with from_megatron."""
    from omni.parallel.megatron.convert import from_megatron

    mine = {}
    for c in chunks:
        mine[rank_key(c)] = {n: (p.detach() if what == "weights" else p.grad).clone()
                             for n, p in c.named_parameters()}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    merged = {k: v for part in every for k, v in part.items()}
    p = cfg.parallel
    return from_megatron(merged, cfg.model, p.tensor, p.pipeline, p.virtual_pipeline,
                         tied="check" if what == "weights" else "sum")


def compare(got: dict, want: dict) -> dict:
    """Per tensor: max |got - want| and that over max |want|; the worst of each, and which tensor."""
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    worst_abs, worst_rel, where = 0.0, 0.0, ""
    for k, w in want.items():
        diff = float((got[k].float() - w.float()).abs().max())
        rel = diff / max(float(w.abs().max()), 1e-30)
        worst_abs = max(worst_abs, diff)
        if rel > worst_rel:
            worst_rel, where = rel, k
    return {"max_abs": worst_abs, "max_rel": worst_rel, "worst": where}


def diff(a, b) -> dict:
    a, b = a.detach().float(), b.detach().float()
    d = float((a - b).abs().max())
    return {"max_abs": d, "max_rel": d / max(float(b.abs().max()), 1e-30)}


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def check_tp_forward(tp=2) -> dict:
    """TP forward, loss and gradients of each variant vs OmniDecoder on one micro-batch."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import (
        gather_from_tensor_model_parallel_region,
        vocab_parallel_cross_entropy,
    )

    from omni.model import MODALITIES
    from omni.parallel.megatron.layers import param_groups
    from omni.parallel.megatron.loss import vocab_parallel_ce_lse

    out = {}
    for name, overrides in VARIANTS.items():
        cfg = run_config(tp=tp, **overrides)
        ref = reference(cfg)
        (model,) = setup(cfg, ref)
        b = batches(cfg.model.vocab_size, 1)[0]
        V = cfg.model.vocab_size
        ref_total, (ref_out,) = reference_loss(ref, [b])
        ref_total.backward()
        ref_logits = ref(b["ids"], doc_ids=b["doc_ids"]).logits.detach()

        logits = forward(model, b)  # [MICRO, SEQ, Vp/TP]
        full = gather_from_tensor_model_parallel_region(logits.detach())[..., :V]
        s = sums(cfg, logits, b)
        (s.loss / global_weight([b])).backward()
        m = s.means(cfg.model.z_loss)
        r = {"logits": diff(full, ref_logits), "loss": diff(m["loss"], ref_out.loss),
             "ce": diff(m["ce_loss"], ref_out.ce_loss), "z": diff(m["z_loss"], ref_out.z_loss),
             "modalities": sorted(m["loss_by_modality"]) == sorted(ref_out.loss_by_modality),
             "tokens_by_modality_equal": {k: int(s.modality_tokens[i]) for i, k in enumerate(MODALITIES)
                                          if s.modality_tokens[i] > 0} == ref_out.tokens_by_modality}
        r["modality_ce"] = max((diff(m["loss_by_modality"][k], v) for k, v in ref_out.loss_by_modality.items()),
                               key=lambda d: d["max_abs"])
        # our cross entropy against megatron's own (padded columns set to -inf so it skips them too)
        with torch.no_grad():
            vl = logits.shape[-1]
            cols = torch.arange(vl) + parallel_state.get_tensor_model_parallel_rank() * vl
            masked = logits.detach().masked_fill(cols >= V, float("-inf"))
            valid = b["labels"] != -100
            theirs = vocab_parallel_cross_entropy(masked.clone(), b["labels"].masked_fill(~valid, 0))
            ours, _ = vocab_parallel_ce_lse(logits.detach(), b["labels"].masked_fill(~valid, 0), V)
            r["ce_vs_megatron"] = diff(ours, theirs)
        r["grads"] = compare(gather_omni(cfg, [model], "grads"),
                             {n: p.grad for n, p in ref.named_parameters()})
        if cfg.model.qk_norm != "none":
            ssd = model.decoder.layers[0].self_attention.q_layernorm.sharded_state_dict(prefix="q.")
            st = ssd["q.weight"]
            offsets = [None] * dist.get_world_size()
            dist.all_gather_object(offsets, list(st.global_offset))
            r["q_norm_sharded"] = {"global_shape": list(st.global_shape), "global_offsets": offsets}
            no_decay = {id(p) for p in param_groups([model], 0.1)[1]["params"]}
            r["qk_norm_no_decay"] = all(id(p) in no_decay for n, p in model.named_parameters() if "_layernorm" in n
                                        and "self_attention" in n)
        out[name] = r
    return out


def check_tp_training(tp=2, steps=10) -> dict:
    """``steps`` AdamW steps (eps 1e-3, weight decay 0.1 on matrices only) at TP vs OmniDecoder."""
    from omni.parallel.megatron.layers import param_groups

    cfg = run_config(tp=tp)
    ref = reference(cfg)
    (model,) = setup(cfg, ref)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-3)
    opt = torch.optim.AdamW(param_groups([model], 0.1), **kw)
    # omni's side of the same rule: decay matrices (embeddings, linears), not norms (QK-norms included)
    decay = [p for n, p in ref.named_parameters() if p.dim() >= 2 and "norm" not in n]
    rest = [p for n, p in ref.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], **kw)
    losses, ref_losses = [], []
    for b in batches(cfg.model.vocab_size, 2, seed=100) * (steps // 2):  # two batches alternate
        s = sums(cfg, forward(model, b), b)
        (s.loss / global_weight([b])).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(s.means(cfg.model.z_loss)["loss"]))
        total, _ = reference_loss(ref, [b])
        total.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        ref_losses.append(float(total.detach()))
    return {"losses": losses, "ref_losses": ref_losses,
            "loss_max_abs": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "loss_fell": ref_losses[-1] < ref_losses[0],
            "weights": compare(gather_omni(cfg, [model], "weights"), dict(ref.named_parameters()))}


def check_tp_bf16(tp=2) -> dict:
    """train.precision=bf16 (bf16 parameters, as megatron builds them): a smoke check of the dtypes
    through QKNorm and the loss, against omni in fp32 (differences are bf16 rounding)."""
    cfg = run_config(tp=tp, precision="bf16")
    ref = reference(cfg)
    (model,) = setup(cfg, ref)
    b = batches(cfg.model.vocab_size, 1)[0]
    ref_total, _ = reference_loss(ref, [b])
    logits = forward(model, b)
    s = sums(cfg, logits, b)
    (s.loss / global_weight([b])).backward()
    grads = [p.grad for p in model.parameters()]
    return {"param_dtypes": sorted({str(p.dtype) for p in model.parameters()}), "logits_dtype": str(logits.dtype),
            "loss": float(s.means(cfg.model.z_loss)["loss"]), "ref_loss": float(ref_total.detach()),
            "grads_finite": all(bool(torch.isfinite(g).all()) for g in grads),
            "grad_dtypes": sorted({str(g.dtype) for g in grads})}


def check_pipeline(tp=1, pp=2, vp=1, n_micro=4, **model_overrides) -> dict:
    """Losses of n_micro micro-batches and the gradients through get_forward_backward_func()."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = run_config(tp=tp, pp=pp, vp=vp, **model_overrides)
    ref = reference(cfg)
    chunks = setup(cfg, ref)
    # the interleaved schedule's p2p comes from transformer_config_kwargs: overlap_p2p_comm=True,
    # batch_p2p_comm=False (batched p2p with PP=2 on gloo gives wrong losses and gradients, no error)
    assert chunks[0].config.batch_p2p_comm == (vp == 1) and chunks[0].config.overlap_p2p_comm == (vp > 1)
    bs = batches(cfg.model.vocab_size, n_micro)
    W = global_weight(bs)

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        output = forward(model, b)

        def loss_func(logits):
            s = sums(cfg, logits, b)
            # the schedule divides by num_microbatches: undo it, the normalizer is the global weight
            return s.loss / W * n_micro, {"loss": s.means(cfg.model.z_loss)["loss"].detach(), "weight": s.weight}

        return output, loss_func

    t0 = time.perf_counter()
    stats = get_forward_backward_func()(  # every chunk reads every micro-batch from its own iterator
        forward_step_func=forward_step, data_iterator=[iter(bs) for _ in chunks], model=chunks,
        num_microbatches=n_micro, seq_length=SEQ, micro_batch_size=MICRO, forward_only=False)
    step_seconds = time.perf_counter() - t0
    ref_total, ref_outs = reference_loss(ref, bs)
    ref_total.backward()
    # the losses are on the last stage: share them
    last = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    mine = [float(s["loss"]) for s in stats] if last else None
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    got = next(x for x in every if x is not None)
    want = [float(o.loss.detach()) for o in ref_outs]
    total = sum(g * float(b["weight"].sum().clamp_min(1.0)) for g, b in zip(got, bs)) / float(W)
    return {"losses": got, "ref_losses": want, "loss_max_abs": max(abs(a - b) for a, b in zip(got, want)),
            "total_abs": abs(total - float(ref_total.detach())), "step_seconds": round(step_seconds, 3),
            "grads": compare(gather_omni(cfg, chunks, "grads"), {n: p.grad for n, p in ref.named_parameters()})}


JOBS = {
    "two": [
        ("tp2_forward", check_tp_forward),
        ("tp2_training", check_tp_training),
        ("tp2_bf16", check_tp_bf16),
        ("pp2_1f1b", lambda: check_pipeline(pp=2)),
        ("pp2_1f1b_tied", lambda: check_pipeline(pp=2, **VARIANTS["mha_shared_rmsnorm_tied"])),
        ("pp2_vp2_interleaved", lambda: check_pipeline(pp=2, vp=2, n_layers=4)),
    ],
    "four": [
        ("tp2_pp2_1f1b", lambda: check_pipeline(tp=2, pp=2)),
        ("tp2_pp2_vp2_interleaved", lambda: check_pipeline(tp=2, pp=2, vp=2, n_layers=4)),
    ],
}


def main() -> None:
    job, out_path = sys.argv[1], Path(sys.argv[2])
    job, _, only = job.partition(":")  # "two:tp2_forward,pp2_1f1b" runs only those checks
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # shim.py
    import shim

    shim.apply()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for name, fn in JOBS[job]:
        if only and name not in only.split(","):
            continue
        t0 = time.perf_counter()
        results[name] = fn()
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
    if dist.get_rank() == 0:
        out_path.write_text(json.dumps(results, indent=1))
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
