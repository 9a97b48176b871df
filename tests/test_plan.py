"""`omni model plan` (omni/plan.py) against published figures; pure arithmetic, no GPU.

Sources (each test names the one it checks against):

- [MLM-DO] Megatron-LM, docs/user-guide/features/dist_optimizer.md (NVIDIA/Megatron-LM; formerly the
  README's "Distributed Optimizer" section): bytes per parameter, `bf16` parameters with `fp32`
  gradients: 18 without, 6 + 12/d with the distributed optimizer.
- [K22] Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  arXiv:2205.05198: Table 2 (activation bytes per layer), section 4.2 (GPT-3: 5as/h = 80, selective
  recomputation saves 70% of the activation memory; MT-NLG: 65%) and the abstract ("reduces
  activation memory by 5x").
- [N21] Narayanan et al. 2021, arXiv:2104.04473, section 2.2: bubble (p-1)/m, interleaved (p-1)/(v m).
- [MB] NVIDIA-NeMo/Megatron-Bridge, docs/performance-summary-archive.md, "25.11 NeMo Container",
  Pre-Training Performance (and "25.09" for the second H100 row): LLAMA3_8B, 8 GPUs, GBS 128,
  sequence length 8192, TP = PP = CP = 1, Tokens / sec / GPU and Model TFLOP / sec / GPU.
- [TT] pytorch/torchtitan, docs/performance.md at commit 1ea476e9f (2024-04-24): Llama 3 8B with FSDP
  on 64 A100 80GB, local batch 1, seq_len 8192 (train_configs/llama3_8b.toml of that commit):
  2973 WPS / 58.2% MFU (selective op AC), 2904 WPS / 56.8% MFU (selective layer AC). Its MFU uses
  torchtitan/utils.py of that commit: 6 * (all parameters) + 12 * l * h * q * t per token, and
  312e12 FLOP/s for the A100.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_cli
from omni.config.model import ModelConfig
from omni.errors import ConfigError
from omni.model import count_parameters, flops_per_token
from omni.plan import (
    GIB,
    GPUS,
    Layout,
    Training,
    bytes_per_parameter,
    candidate_layouts,
    in_flight_microbatches,
    korthikanti_layer_bytes,
    layer_activation_bytes,
    layer_activation_terms,
    make_plan,
    parameters,
    pipeline_bubble,
    step_time,
    suggest,
)

# Llama 3 8B's shape (torchtitan's ModelArgs "8B" of [TT]: dim 4096, 32 layers, 32 heads, 8 KV heads,
# SwiGLU width 14336 from ffn_dim_multiplier 1.3 / multiple_of 1024, vocab 128256, untied, no QK-norm).
LLAMA3_8B = ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                        qk_norm="none", rope_theta=500000.0, max_seq_len=8192, tie_embeddings=False)


def _recipe(name: str) -> ModelConfig:
    from omni.commands.model import load_model_config

    return load_model_config(f"models/{name}")


# ----------------------------------------------------------------------------------------------
# [MLM-DO] weights + gradients + optimizer per parameter: exact
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 4, 8, 64, 512])
def test_megatron_distributed_optimizer_bytes_per_parameter(d):
    # [MLM-DO] table, row "bf16 parameters, fp32 gradients": 18 | 6 + 12/d
    assert bytes_per_parameter(False, d) == 18
    assert bytes_per_parameter(True, d) == 6 + 12 / d


@pytest.mark.parametrize("dist", [True, False])
def test_plan_memory_follows_the_megatron_table(dist):
    cfg = _recipe("7b")
    plan = make_plan(cfg, 16, GPUS["h100"], Layout(tensor=2), Training(seq_len=4096, distributed_optimizer=dist))
    (m,) = plan.memory
    d = plan.data_parallel
    assert d == 8
    per_param = (m.weights + m.gradients + m.optimizer) / m.parameters
    assert per_param == pytest.approx(6 + 12 / d if dist else 18, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# [K22] Table 2: GPT-3 175B, s=2048, h=12288, a=96, t=8, b=1
# ----------------------------------------------------------------------------------------------

S, H, A, T = 2048, 12288, 96, 8
SBH = S * 1 * H


@pytest.mark.parametrize("t, sp, recompute, coefficient", [
    (1, False, "none", 34 + 5 * A * S / H),                   # no parallelism: sbh(34 + 5as/h) = 114 sbh
    (T, False, "none", 10 + 24 / T + 5 * A * S / (H * T)),   # tensor parallel: 23 sbh
    (T, True, "none", 34 / T + 5 * A * S / (H * T)),         # tensor + sequence parallel: 14.25 sbh
    (T, False, "selective", 10 + 24 / T),                    # tensor parallel + selective: 13 sbh
    (T, True, "selective", 34 / T),                          # tensor + sequence + selective: 4.25 sbh
    (1, False, "full", 2),                                   # full recompute: 2 sbh
])
def test_korthikanti_table2_gpt3(t, sp, recompute, coefficient):
    got = korthikanti_layer_bytes(S, 1, H, A, t, sp, recompute)
    assert got == pytest.approx(coefficient * SBH, rel=0.01)  # within 1% (exact in fact)


def test_korthikanti_published_savings():
    # [K22] section 4.2: 5as/h = 80 for GPT-3; selective recomputation saves 70% (GPT-3) and 65%
    # (MT-NLG 530B: s=2048, h=20480, a=128) of the activation memory.
    assert 5 * A * S / H == 80
    gpt3 = 1 - korthikanti_layer_bytes(S, 1, H, A, 1, False, "selective") / korthikanti_layer_bytes(S, 1, H, A)
    mtnlg = 1 - (korthikanti_layer_bytes(2048, 1, 20480, 128, 1, False, "selective")
                 / korthikanti_layer_bytes(2048, 1, 20480, 128))
    assert gpt3 == pytest.approx(0.70, abs=0.01)
    assert mtnlg == pytest.approx(0.65, abs=0.01)
    # abstract: sequence parallelism + selective recomputation "reduces activation memory by 5x"
    # (over tensor parallelism alone, t = 8)
    ratio = korthikanti_layer_bytes(S, 1, H, A, T) / korthikanti_layer_bytes(S, 1, H, A, T, True, "selective")
    assert 5 <= ratio < 6


# ----------------------------------------------------------------------------------------------
# [K22] adapted to omni's block (FlashAttention, SwiGLU, GQA, QK-norm, RMSNorm, no dropout)
# ----------------------------------------------------------------------------------------------


def test_omni_block_activation_count():
    cfg = _recipe("7b")  # h=4096, F=11008, 32 heads = 32 KV heads of 128, per-head QK-norm
    a = layer_activation_terms(cfg)
    h, F = 4096, 11008
    # replicated: 2 norm inputs + QKV and fc1 inputs, 2h each = 8h ([K22]'s 10h less 2 dropout masks)
    assert a.replicated == 8 * h
    # sharded: QK-norm inputs (2h + 2h) + flash Q, K, V (6h) + O (2h) + SwiGLU 8F
    assert a.sharded == 4 * h + 6 * h + 2 * h + 8 * F
    assert a.attention_stats == 4 * 32
    assert a.replicated + a.sharded + a.attention_stats == 170_112  # bytes per token and layer
    tokens = 4096
    none = layer_activation_bytes(cfg, tokens)
    assert none == 170_112 * tokens
    # FlashAttention: no s^2 term, so the bytes are linear in the tokens
    assert layer_activation_bytes(cfg, 2 * tokens) == 2 * none
    # tensor + sequence parallel divide everything by t ([K22] Table 2, row 3)
    assert layer_activation_bytes(cfg, tokens, 4, True) == pytest.approx(none / 4, rel=1e-12)
    # tensor parallel without SP: the replicated part stays whole ([K22] Table 2, row 2)
    assert layer_activation_bytes(cfg, tokens, 4, False) == pytest.approx(
        tokens * (a.replicated + (a.sharded + a.attention_stats) / 4), rel=1e-12)
    # selective recomputation drops only flash's softmax statistics
    assert none - layer_activation_bytes(cfg, tokens, 1, False, "selective") == tokens * 4 * 32
    # full recomputation keeps the block input, 2h per token ([K22] Table 2, last row), /t with SP
    assert layer_activation_bytes(cfg, tokens, 1, False, "full") == 2 * h * tokens
    assert layer_activation_bytes(cfg, tokens, 4, True, "full") == 2 * h * tokens / 4


def test_gqa_and_qk_norm_terms():
    mha = _recipe("7b")
    import dataclasses

    gqa = dataclasses.replace(mha, n_kv_heads=8)
    noqk = dataclasses.replace(mha, qk_norm="none")
    kv_less = (32 - 8) * 128
    # K and V shrink to K*d: flash's K and V (4 B per element) and the k QK-norm input (2 B)
    assert layer_activation_terms(mha).sharded - layer_activation_terms(gqa).sharded == 6 * kv_less
    assert layer_activation_terms(mha).sharded - layer_activation_terms(noqk).sharded == 2 * 4096 + 2 * 4096


# ----------------------------------------------------------------------------------------------
# [N21] pipeline bubble; [K22] 4.2.3 / Megatron-LM in-flight micro-batches
# ----------------------------------------------------------------------------------------------


def test_pipeline_bubble_and_in_flight():
    assert pipeline_bubble(8, 1, 64) == 7 / 64
    assert pipeline_bubble(8, 2, 64) == 7 / 128
    assert pipeline_bubble(1, 1, 16) == 0
    assert in_flight_microbatches(1, 1, 32) == 1
    assert in_flight_microbatches(4, 1, 32) == 4
    assert in_flight_microbatches(4, 1, 2) == 2          # fewer micro-batches than stages
    assert in_flight_microbatches(4, 2, 32) == 4 * (1 + 3 / 8)  # Megatron-LM's interleaved factor


def test_first_stage_holds_p_microbatches_of_its_layers():
    # [K22] 4.2.3: with 1F1B the first stage keeps p micro-batches of L/p layers: L layers' worth.
    cfg = _recipe("7b")
    tr = Training(seq_len=4096, global_batch=64)
    one = make_plan(cfg, 8, GPUS["h100"], Layout(tensor=2), tr)
    pp = make_plan(cfg, 8, GPUS["h100"], Layout(tensor=2, pipeline=4), tr)
    assert pp.memory[0].activation_blocks == pytest.approx(one.memory[0].activation_blocks, rel=1e-12)
    assert pp.memory[1].activation_blocks == pytest.approx(one.memory[0].activation_blocks / 4, rel=1e-12)
    assert pp.bubble == pytest.approx(3 / pp.microbatches)
    assert pp.step_seconds == pytest.approx(one.step_seconds * (1 + pp.bubble), rel=1e-12)


def test_parameters_per_stage():
    cfg = _recipe("7b")
    p1 = parameters(cfg, Layout())
    assert p1.total == count_parameters(cfg) == 7_013_666_816
    assert p1.first_rank == p1.total
    p4 = parameters(cfg, Layout(tensor=2, pipeline=4))
    assert p4.first_stage == p4.embedding + 8 * p4.per_layer
    assert p4.last_stage == 8 * p4.per_layer + cfg.dim + p4.output
    assert p4.first_stage + 2 * 8 * p4.per_layer + p4.last_stage == p4.total
    import dataclasses

    tied = parameters(dataclasses.replace(cfg, tie_embeddings=True), Layout(pipeline=2))
    assert tied.output == 0 and tied.last_stage == 16 * tied.per_layer + cfg.dim + tied.embedding


# ----------------------------------------------------------------------------------------------
# Throughput against published tables
# ----------------------------------------------------------------------------------------------


def test_llama3_8b_parameter_count():
    # Llama 3 8B: 8.03B parameters (the "8B" of Meta's model card; 8,030,261,248 counted)
    assert count_parameters(LLAMA3_8B) == 8_030_261_248


@pytest.mark.parametrize("gpu, tokens_per_gpu, model_tflops, micro_batch", [
    ("h100", 14451, 744, 1),   # [MB] 25.11, DGX-H100, FP8-CS, FSDP 8, MBS 1
    ("h100", 14079, 725, 1),   # [MB] 25.09, DGX-H100 (BF16/FP8 column absent), FSDP 8, MBS 1
    ("b200", 30624, 1576, 2),  # [MB] 25.11, DGX-B200, FP8-CS, MBS 2
])
def test_megatron_bridge_llama3_8b_flops_per_token(gpu, tokens_per_gpu, model_tflops, micro_batch):
    # Megatron-Bridge's Model TFLOP/s divided by its tokens/s is its FLOPs per token; omni's count
    # (6 N_matmul incl. the output layer + causal attention) must match it: tolerance 1%.
    published = model_tflops * 1e12 / tokens_per_gpu
    ours = flops_per_token(LLAMA3_8B, 8192)
    assert ours == pytest.approx(published, rel=0.01)
    # Through the whole plan: at the published model-FLOP rate (as an MFU of the FP8 dense peak),
    # the plan's tokens/s per GPU is the published one within 1%.
    g = GPUS[gpu]
    mfu = model_tflops * 1e12 / g.peak("fp8")
    assert model_tflops * 1e12 < g.peak("fp8")  # the datasheet peak bounds the measurement
    plan = make_plan(LLAMA3_8B, 8, g, Layout(), Training(seq_len=8192, micro_batch=micro_batch, global_batch=128,
                                                         precision="fp8", mfu=mfu))
    assert plan.tokens_per_second / 8 == pytest.approx(tokens_per_gpu, rel=0.01)


@pytest.mark.parametrize("wps, mfu", [(2973, 0.582), (2904, 0.568)])
def test_torchtitan_llama3_8b_a100(wps, mfu):
    # [TT]'s MFU counts 6 x all parameters (embedding included) + full (non-causal) attention.
    n = count_parameters(LLAMA3_8B)
    c = LLAMA3_8B
    tt_flops = 6 * n + 12 * c.n_layers * c.n_heads * c.head_dim * 8192
    assert GPUS["a100"].bf16_flops == 312e12  # torchtitan's A100 peak, NVIDIA's datasheet figure
    # the plan's throughput arithmetic, at [TT]'s MFU and FLOP count: [TT]'s WPS within 1%
    secs = step_time(tt_flops * 8192, 1, GPUS["a100"].peak("bf16"), mfu)
    assert 8192 / secs == pytest.approx(wps, rel=0.01)
    # omni's count differs by exactly the embedding, the norms (6 FLOPs per parameter counted by
    # torchtitan) and the upper (masked) half of causal attention:
    ours = flops_per_token(c, 8192)
    norms = c.n_layers * 2 * c.dim + c.dim
    assert tt_flops - ours == 6 * c.vocab_size * c.dim + 6 * norms + 6 * c.n_layers * c.dim * 8192
    # so the same run is MFU 0.843 x torchtitan's in omni's convention (58.2% -> 49.1%)
    assert ours / tt_flops == pytest.approx(0.843, abs=0.001)
    assert wps * ours / 312e12 == pytest.approx(mfu * ours / tt_flops, rel=0.01)


def test_gpu_table():
    # NVIDIA datasheets, dense (half the "with sparsity" figures); see omni/plan.py
    assert (GPUS["h100"].bf16_flops, GPUS["h100"].fp8_flops, GPUS["h100"].memory_gib) == (989e12, 1979e12, 80)
    assert (GPUS["h200"].bf16_flops, GPUS["h200"].fp8_flops, GPUS["h200"].memory_gib) == (989e12, 1979e12, 141)
    assert (GPUS["b200"].bf16_flops, GPUS["b200"].fp8_flops, GPUS["b200"].memory_gib) == (2250e12, 4500e12, 180)
    assert (GPUS["a100"].bf16_flops, GPUS["a100"].fp8_flops, GPUS["a100"].memory_gib) == (312e12, None, 80)
    with pytest.raises(ConfigError, match="FP8"):
        GPUS["a100"].peak("fp8")


# ----------------------------------------------------------------------------------------------
# Suggestion and CLI
# ----------------------------------------------------------------------------------------------


def test_candidate_order_tp_in_node_then_pp():
    got = [(x.tensor, x.pipeline) for x in candidate_layouts(_recipe("7b"), 32)]
    assert got == [(1, 1), (2, 1), (4, 1), (8, 1), (8, 2), (8, 4)]
    # 34b: 64 heads / 8 KV heads; 48 layers
    got = [(x.tensor, x.pipeline) for x in candidate_layouts(_recipe("34b"), 16)]
    assert got == [(1, 1), (2, 1), (4, 1), (8, 1), (8, 2)]


def test_suggest_7b_on_8_h100():
    s = suggest(_recipe("7b"), 8, GPUS["h100"], Training(seq_len=4096))
    assert s.plan is not None and s.plan.fits
    assert (s.plan.layout.tensor, s.plan.layout.pipeline) == (2, 1)  # TP=1 needs ~74 GiB > 72 budget
    assert not s.tried[0].fits and s.tried[0].peak.total / GIB > 72
    assert "smallest model-parallel layout" in s.reason


def test_cli_plan_7b_8xh100():
    rc, out, err = run_cli("model", "plan", "7b", "--gpus", "8", "--gpu", "h100")
    assert rc == 0, err
    assert "TP=2 PP=1" in out and "(suggested)" in out and "fits" in out
    assert "weights (bf16, 2 B)" in out and "optimizer (Adam fp32, 12 B / 4)" in out
    assert "tokens/s" in out
    rc, out, err = run_cli("model", "plan", "models/1b", "--gpus", "1", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["fits"] and d["layout"]["tensor"] == 1 and d["layout"]["pipeline"] == 1
    assert d["flops_per_token"] == flops_per_token(_recipe("1b"), 4096)
    assert math.isclose(d["tokens_per_second"] * d["flops_per_token"], 0.40 * 989e12, rel_tol=1e-9)


def test_cli_plan_given_layout_and_no_fit():
    rc, out, err = run_cli("model", "plan", "7b", "--gpus", "16", "--tensor", "2", "--pipeline", "2",
                           "--virtual-pipeline", "2", "--global-batch", "64")
    assert rc == 0, err
    assert "first stage" in out and "last stage" in out and "pipeline bubble (P-1)/(V m) = 0.031" in out
    rc, out, err = run_cli("model", "plan", "34b", "--gpus", "4", "--gpu", "h200")
    assert rc == 1 and "DOES NOT FIT" in out and "no layout fits" in out


@pytest.mark.parametrize("args, message", [
    (["--tensor", "3"], "--tensor 3 must divide n_heads=32"),
    (["--pipeline", "5"], "--pipeline 5 must divide n_layers=32"),
    (["--gpu", "v100"], "unknown GPU 'v100'"),
    (["--gpus", "6", "--tensor", "4"], "--gpus 6 is not a multiple of tensor x pipeline x context"),
    (["--gpu", "a100", "--precision", "fp8"], "needs FP8 tensor cores"),
    (["--recompute", "some"], "--recompute 'some'"),
    (["--tensor", "2", "--global-batch", "6"], "--global-batch 6 is not a multiple"),
])
def test_cli_plan_bad_input(args, message):
    argv = ["model", "plan", "7b", "--gpus", "8", *args]
    if "--gpus" in args:
        argv = ["model", "plan", "7b", *args]
    rc, out, err = run_cli(*argv)
    assert rc == 2, (out, err)
    assert message in err and len(err.strip().splitlines()) == 1
