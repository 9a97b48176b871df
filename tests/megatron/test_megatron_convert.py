"""parallel/megatron/convert.py (pure tensors, no process group): omni -> megatron -> omni is bit-for-bit,
and the megatron layout is the one megatron-core expects (the parity tests load it into real GPTModels)."""

from __future__ import annotations

import pytest
import torch

from omni.config.model import ModelConfig
from omni.model import OmniDecoder
from omni.parallel.megatron.convert import chunk_layers, from_megatron, padded_vocab_size, to_megatron

LAYOUTS = [(2, 2, 1), (1, 2, 2), (2, 1, 1)]
"""(tp, pp, vp)."""


def _model(**kw) -> tuple[ModelConfig, dict]:
    cfg = ModelConfig(**{**dict(vocab_size=640, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=172,
                                 max_seq_len=64), **kw})
    torch.manual_seed(0)
    state = OmniDecoder(cfg).state_dict()
    for v in state.values():  # distinct values everywhere (norms included), so any misplacement shows
        v.copy_(torch.randn_like(v))
    return cfg, state


def _split(state, cfg, tp, pp, vp):
    return {(t, p, v): to_megatron(state, cfg, tp, t, pp, p, vp, v)
            for t in range(tp) for p in range(pp) for v in range(vp)}


@pytest.mark.parametrize("tp,pp,vp", LAYOUTS)
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("qk", [("per_head", "layernorm"), ("shared", "rmsnorm"), ("per_head", "rmsnorm"),
                                ("shared", "layernorm"), ("none", "layernorm")], ids="-".join)
def test_round_trip_is_bit_exact(tp, pp, vp, kv_heads, tied, qk):
    cfg, state = _model(n_kv_heads=kv_heads, tie_embeddings=tied, qk_norm=qk[0], qk_norm_type=qk[1])
    back = from_megatron(_split(state, cfg, tp, pp, vp), cfg, tp, pp, vp)
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(back[k], v), k


def test_layout_of_one_rank():
    """TP=2 x PP=2 rank (1, 1): the megatron names, shapes and where each omni row lands."""
    cfg, s = _model(n_layers=2)
    m = to_megatron(s, cfg, tp=2, tp_rank=1, pp=2, pp_rank=1)
    d, D = cfg.head_dim, cfg.dim
    # the second stage holds layer 1, numbered 0; the final norm and the output layer; no embedding
    assert sorted(m) == sorted([
        "decoder.layers.0.input_layernorm.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.self_attention.q_layernorm.weight", "decoder.layers.0.self_attention.q_layernorm.bias",
        "decoder.layers.0.self_attention.k_layernorm.weight", "decoder.layers.0.self_attention.k_layernorm.bias",
        "decoder.layers.0.self_attention.linear_proj.weight", "decoder.layers.0.pre_mlp_layernorm.weight",
        "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.0.mlp.linear_fc2.weight",
        "decoder.final_layernorm.weight", "output_layer.weight"])
    L = "layers.1.attention."
    qkv = m["decoder.layers.0.self_attention.linear_qkv.weight"]
    # TP rank 1 holds query group 1: q heads 2, 3, then k head 1, then v head 1
    assert qkv.shape == ((2 + 1 + 1) * d, D)
    assert torch.equal(qkv[: 2 * d], s[L + "wq.weight"][2 * d: 4 * d])
    assert torch.equal(qkv[2 * d: 3 * d], s[L + "wk.weight"][d: 2 * d])
    assert torch.equal(qkv[3 * d:], s[L + "wv.weight"][d: 2 * d])
    assert torch.equal(m["decoder.layers.0.self_attention.q_layernorm.weight"], s[L + "q_norm.weight"][2:])
    assert torch.equal(m["decoder.layers.0.self_attention.k_layernorm.bias"], s[L + "k_norm.bias"][1:])
    assert torch.equal(m["decoder.layers.0.self_attention.linear_proj.weight"], s[L + "wo.weight"][:, 2 * d:])
    F = cfg.ffn_dim // 2
    fc1 = m["decoder.layers.0.mlp.linear_fc1.weight"]  # [gate_1; up_1]
    assert torch.equal(fc1[:F], s["layers.1.feed_forward.w1.weight"][F:])
    assert torch.equal(fc1[F:], s["layers.1.feed_forward.w3.weight"][F:])
    assert torch.equal(m["decoder.layers.0.mlp.linear_fc2.weight"], s["layers.1.feed_forward.w2.weight"][:, F:])
    # vocab 640 padded to 1024 (128 x 8, the same at every TP): rank 1 holds rows 512..1023, of which 640.. are zeros
    out = m["output_layer.weight"]
    assert out.shape == (512, D)
    assert torch.equal(out[: 640 - 512], s["output.weight"][512:]) and not out[640 - 512:].any()


def test_tied_embedding_copy_on_the_last_stage():
    cfg, s = _model(tie_embeddings=True)
    assert "output_layer.weight" not in to_megatron(s, cfg, 1, 0, 1, 0)  # one stage: the embedding itself
    last = to_megatron(s, cfg, 1, 0, 2, 1)
    assert torch.equal(last["output_layer.weight"][:640], s["tok_embeddings.weight"])  # + zero padding rows
    assert not last["output_layer.weight"][640:].any()
    split = _split(s, cfg, 1, 2, 1)
    split[(0, 1, 0)]["output_layer.weight"][0, 0] += 1
    with pytest.raises(ValueError, match="differs from the embedding"):
        from_megatron(split, cfg, 1, 2, 1)
    # gradients: the tied weight's gradient is the sum of both copies'
    grads = from_megatron(_split(s, cfg, 1, 2, 1), cfg, 1, 2, 1, tied="sum")
    assert torch.equal(grads["tok_embeddings.weight"], 2 * s["tok_embeddings.weight"])


def test_te_names_of_the_block_norms():
    cfg, s = _model()
    m = to_megatron(s, cfg, 1, 0, 1, 0, te=True)
    assert torch.equal(m["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"],
                       s["layers.0.attention_norm.weight"])
    assert torch.equal(m["decoder.layers.3.mlp.linear_fc1.layer_norm_weight"], s["layers.3.ffn_norm.weight"])
    back = from_megatron({(0, 0, 0): m}, cfg, 1, 1, 1, te=True)
    assert all(torch.equal(back[k], v) for k, v in s.items())


def test_padding_and_chunks():
    # one padded size for TP 1, 2, 4, 8: a checkpoint reshards across them
    assert [padded_vocab_size(640, tp) for tp in (1, 2, 4, 8)] == [1024] * 4
    assert padded_vocab_size(1025, 2) == 2048 and padded_vocab_size(640, 16) == 2048
    assert padded_vocab_size(100, 3, divisible_by=1) == 120
    # interleaved order: chunk (pp_rank, vp_stage) is number vp_stage * pp + pp_rank
    assert [list(chunk_layers(8, 2, 2, p, v)) for v in range(2) for p in range(2)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert list(chunk_layers(8, 2, 2, pp_rank=0, vp_stage=1)) == [4, 5]
    with pytest.raises(ValueError, match="cannot be split"):
        chunk_layers(6, 2, 2, 0, 0)


def test_incomplete_rank_states_are_refused():
    cfg, s = _model()
    split = _split(s, cfg, 2, 2, 1)
    del split[(1, 0, 0)]
    with pytest.raises(ValueError, match=r"missing \[\(1, 0, 0\)\]"):
        from_megatron(split, cfg, 2, 2, 1)
