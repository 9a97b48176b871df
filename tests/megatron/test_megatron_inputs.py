"""parallel/megatron/model.py's inputs (packed-document mask, TE's packed sequences) and layers.py's
weight-decay rule for megatron's optimizer; in-process, no process group."""

from __future__ import annotations

import types

import torch

from omni.parallel.megatron.model import (
    attention_mask_from_doc_ids,
    forward_inputs,
    packed_seq_params_from_doc_ids,
)


def test_block_diagonal_causal_mask():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])
    mask = attention_mask_from_doc_ids(doc_ids)  # True = masked out
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    sees = ~mask[0, 0]
    assert sees[2].tolist() == [True, True, True, False, False]  # causal, own document
    assert sees[3].tolist() == [False, False, False, True, False]  # a new document starts over
    assert (~mask[1, 0])[4].tolist() == [False, True, True, True, True]
    assert attention_mask_from_doc_ids(None) is None


def test_packed_seq_params_cover_documents_of_all_rows():
    p = packed_seq_params_from_doc_ids(torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]))
    assert p.qkv_format == "thd"
    assert p.cu_seqlens_q.tolist() == [0, 3, 5, 6, 10] and p.cu_seqlens_q.dtype == torch.int32
    assert p.max_seqlen_q == p.max_seqlen_kv == 4


def test_forward_inputs_of_each_spec():
    """Local spec: the mask; TE spec: one THD sequence of all rows (no mask). Positions are omni's."""
    ids, doc_ids = torch.arange(10).view(2, 5), torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])
    local = forward_inputs(types.SimpleNamespace(omni_te=False), ids, doc_ids)
    assert torch.equal(local["attention_mask"], attention_mask_from_doc_ids(doc_ids))
    assert local["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    te = forward_inputs(types.SimpleNamespace(omni_te=True), ids, doc_ids)
    assert te["input_ids"].tolist() == [list(range(10))] and te["attention_mask"] is None
    assert te["packed_seq_params"].cu_seqlens_kv.tolist() == [0, 3, 5, 6, 10]
    plain = forward_inputs(types.SimpleNamespace(omni_te=False), ids, None)  # one document per row: causal
    assert torch.equal(plain["attention_mask"][0, 0], ~torch.ones(5, 5, dtype=torch.bool).tril())


def test_qk_norms_get_no_weight_decay_in_megatrons_optimizer():
    from megatron.core.optimizer import OptimizerConfig

    from omni.parallel.megatron.layers import NO_WEIGHT_DECAY, no_weight_decay, optimizer_config_overrides

    overrides = optimizer_config_overrides(OptimizerConfig(lr=1e-3, weight_decay=0.1))
    per_head = torch.nn.Parameter(torch.ones(4, 16))
    setattr(per_head, NO_WEIGHT_DECAY, True)
    matrix = torch.nn.Parameter(torch.ones(64, 64))

    def wd_mult(p, name):
        return min([o.get("wd_mult", 1.0) for k, o in overrides.items() if k.matches(p, name)], default=1.0)

    assert wd_mult(per_head, "decoder.layers.0.self_attention.q_layernorm.weight") == 0.0
    assert wd_mult(torch.nn.Parameter(torch.ones(64)), "decoder.final_layernorm.weight") == 0.0
    assert wd_mult(matrix, "decoder.layers.0.mlp.linear_fc1.weight") == 1.0
    assert no_weight_decay("x.q_layernorm.weight", per_head) and not no_weight_decay("x.weight", matrix)
