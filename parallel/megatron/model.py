"""The OmniDecoder built on megatron-core 0.16.1: a ``GPTModel`` with omni's QK-norm, RoPE base and vocab.

:func:`build_model` returns one model chunk (a ``GPTModel``) for this process's tensor / pipeline /
virtual-pipeline position; :func:`build_model_chunks` all chunks of this pipeline rank (what
megatron's schedules take). The layer spec is megatron-core's local one
(``get_gpt_layer_local_spec``: plain PyTorch attention and norms, runs on CPU) with omni's
:class:`~.layers.QKNorm` as q/k norm; where Transformer Engine is installed the TE spec instead
(fused layers, FP8) with the same QK-norm. The TE path is coded against megatron-core's documented
API but could not run here (no GPU, no TE): it is unverified.

Same function as omni.model.OmniDecoder (parity tests in tests/megatron/): pre-norm RMSNorm blocks,
GQA attention with QK-norm before RoPE, SwiGLU MLP, final RMSNorm, untied or tied output head. The
correspondence of weights is parallel/megatron/convert.py's.

Packed documents (omni's ``doc_ids``): attention is block-diagonal causal, through an explicit
``attention_mask`` [b, 1, s, s] (:func:`attention_mask_from_doc_ids`, megatron's convention: True =
masked out). RoPE positions: megatron rotates token t by position t (0..s-1 of the packed row),
omni by its position inside its document (restarting at 0). Both give the same attention scores:
RoPE is relative, q_t . k_u depends only on t - u, and a block-diagonal mask only pairs tokens of
one document, for which (t - start) - (u - start) = t - u. So no per-document positions are needed
(the parity test checks this to float rounding). Transformer Engine's causal attention ignores an
explicit mask: there the documents go in as a THD sequence with ``packed_seq_params``.
:func:`forward_inputs` builds the right inputs for either spec.
"""

from __future__ import annotations

import dataclasses

import torch

from omni.parallel.megatron.config import probe, transformer_config_kwargs
from omni.parallel.megatron.convert import padded_vocab_size, to_megatron


def use_te() -> bool:
    """Whether this machine has Transformer Engine (found without importing it)."""
    return probe().te_version is not None


def layer_spec(cfg, te: bool | None = None):
    """The transformer layer ModuleSpec: megatron's local spec (``te=False``) or its Transformer
    Engine spec (``te=True``; default: when TE is installed), with omni's QK-norm as q/k norm (none
    for qk_norm='none')."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from omni.parallel.megatron.layers import qk_norm_specs

    te = use_te() if te is None else te
    if te:  # TE's fused norm + linear: the block norms live in linear_qkv / linear_fc1 (layer_norm_weight)
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=False)
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=False)
    q_norm, k_norm = qk_norm_specs(cfg.model)
    if q_norm is None:  # qk_norm='none': the spec's IdentityOp stays
        return spec
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, q_layernorm=q_norm, k_layernorm=k_norm))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))


def build_model(cfg, pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                *, te: bool | None = None):
    """One megatron-core GPTModel chunk for RunConfig ``cfg`` (parallel_state must be initialized:
    :func:`initialize_parallel`).

    pre_process: this chunk holds the embedding (first pipeline stage / chunk); post_process: the final
    norm and output layer (last). vp_stage: the chunk's index on this pipeline rank with the
    interleaved schedule (None without). The vocab is padded (convert.padded_vocab_size); logits
    come out vocab-parallel, [b, s, Vp/TP] when no labels are passed (parallel/megatron/loss.py).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    te = use_te() if te is None else te
    m = cfg.model
    config = TransformerConfig(**transformer_config_kwargs(cfg))
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(cfg, te),
        vocab_size=padded_vocab_size(m.vocab_size, cfg.parallel.tensor),
        max_sequence_length=m.max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,  # logits stay split over TP by vocab: the loss reduces across ranks
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=m.rope_theta,
        vp_stage=vp_stage,
    )
    if pre_process:  # megatron drops out the embedding output with hidden_dropout; omni does not
        model.embedding.embedding_dropout.p = 0.0
    model.omni_te = te  # which state-dict names (convert.to_megatron(te=...)) this chunk has
    return model


def build_model_chunks(cfg, *, te: bool | None = None) -> list:
    """Every model chunk of this pipeline rank: one without virtual pipeline, parallel.virtual_pipeline
    with it (the list megatron's ``get_forward_backward_func()`` schedules take as ``model``)."""
    from megatron.core import parallel_state

    vp = cfg.parallel.virtual_pipeline
    if vp == 1:
        return [build_model(cfg, parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage(),
                            te=te)]
    return [build_model(cfg, parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=i),
                        parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=i), vp_stage=i, te=te)
            for i in range(vp)]


def initialize_parallel(cfg, seed: int | None = None) -> None:
    """megatron's process groups for ``cfg.parallel`` (torch.distributed must be initialized) and its
    model-parallel RNG (seed: default cfg.seed). Data parallel is what is left of the world."""
    from megatron.core import parallel_state, tensor_parallel

    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline if p.virtual_pipeline > 1 else None,
        context_parallel_size=p.context,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed if seed is None else seed)


def attention_mask_from_doc_ids(doc_ids: torch.Tensor | None) -> torch.Tensor | None:
    """doc_ids [b, s] (documents contiguous in a packed row) -> megatron's attention_mask [b, 1, s, s],
    bool, True where query t must NOT see key u: u > t (causal) or another document. None -> None
    (megatron then uses its plain causal mask)."""
    if doc_ids is None:
        return None
    s = doc_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()  # [s, s]: u <= t
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [b, s, s]
    return ~(causal & same_doc)[:, None]


def packed_seq_params_from_doc_ids(doc_ids: torch.Tensor):
    """Transformer Engine path (unverified here): the packed documents of all rows of ``doc_ids``
    [b, s] as one THD sequence, for ``GPTModel.forward(packed_seq_params=...)`` with input ids
    flattened to [1, b*s] and ``attention_mask=None``. cu_seqlens [n_docs + 1] int32 are the document
    boundaries (a row boundary is a document boundary too); TE's attention then keeps each document
    to itself and megatron's RoPE restarts positions per document."""
    from megatron.core.packed_seq_params import PackedSeqParams

    b, s = doc_ids.shape
    starts = torch.ones(b, s, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.nonzero(starts.reshape(-1)).squeeze(1)  # flat index of each document's first token
    cu = torch.cat([idx, idx.new_tensor([b * s])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def forward_inputs(model, input_ids: torch.Tensor, doc_ids: torch.Tensor | None) -> dict:
    """Keyword arguments of ``model(**...)`` (a chunk from :func:`build_model`) for ids [b, s] of packed
    documents ``doc_ids`` [b, s]: the one place that knows how each layer spec takes packed documents.

    Local spec: ``attention_mask`` [b, 1, s, s] (block-diagonal causal; None without doc_ids).
    Transformer Engine spec (unverified here): TE's causal attention ignores an explicit mask, so the
    documents go in as one THD sequence: ids flattened to [1, b*s] and ``packed_seq_params`` (cu_seqlens
    of every document of every row). The logits are then [1, b*s, Vp/TP]; loss_sums takes labels and
    weights [b, s] as they are (it flattens both sides). With pipeline parallelism the stages exchange
    [b*s, 1, dim]: the schedule's seq_length / micro_batch_size must be b*s / 1.
    position_ids are passed for the signature only: with RoPE megatron never reads them (the module
    docstring explains why its index positions equal omni's per-document ones here).
    """
    from omni.model import positions_from_doc_ids

    b, s = input_ids.shape
    if doc_ids is None:
        doc_ids = torch.zeros_like(input_ids)
    positions = positions_from_doc_ids(doc_ids)
    if not getattr(model, "omni_te", False):
        return {"input_ids": input_ids, "position_ids": positions, "attention_mask": attention_mask_from_doc_ids(doc_ids)}
    return {"input_ids": input_ids.reshape(1, b * s), "position_ids": positions.reshape(1, b * s),
            "attention_mask": None, "packed_seq_params": packed_seq_params_from_doc_ids(doc_ids)}


def megatron_state(model) -> dict:
    """The chunk's state_dict without the linear layers' ``_extra_state`` entries (what convert uses)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def load_omni_state(model, omni_state: dict, cfg) -> None:
    """Load an OmniDecoder state_dict into this process's chunk ``model`` (TP / PP ranks from
    parallel_state, the chunk from ``model.vp_stage``). Every parameter must be set: only
    ``_extra_state`` may be missing."""
    from megatron.core import parallel_state

    p = cfg.parallel
    state = to_megatron(omni_state, cfg.model, p.tensor, parallel_state.get_tensor_model_parallel_rank(),
                        p.pipeline, parallel_state.get_pipeline_model_parallel_rank(), p.virtual_pipeline,
                        model.vp_stage or 0, te=getattr(model, "omni_te", False))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"omni -> megatron: missing {missing}, unexpected {unexpected}")


__all__ = ["use_te", "layer_spec", "build_model", "build_model_chunks", "initialize_parallel",
           "attention_mask_from_doc_ids", "packed_seq_params_from_doc_ids", "forward_inputs", "megatron_state",
           "load_omni_state"]
