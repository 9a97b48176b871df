"""omni.rope and model.rope: every RoPE variant against its reference (transformers 5.x, megatron-core),
M-RoPE positions against Qwen2-VL's get_rope_index, and the decoder wired to them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from omni import rope
from omni.config import RunConfig, load_config, save_config
from omni.config.model import ModelConfig, RopeConfig
from omni.errors import ConfigError, OmniError
from omni.model import OmniDecoder, rope_cos_sin
from omni.vocab import IMAGE, UnifiedVocab

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _hf_rope_config(head_dim: int, max_position_embeddings: int, **rope_parameters):
    """A transformers config carrying ``rope_parameters`` (what ROPE_INIT_FUNCTIONS read)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                       max_position_embeddings=max_position_embeddings,
                       rope_parameters={"rope_theta": 10000.0, **rope_parameters})


def _document(vocab: UnifiedVocab, rng: np.random.Generator, layout: str) -> list[int]:
    """Ids of a document spelled by ``layout``: t = a text run, i = an image block (full grid),
    a = an audio block, s = a routing special."""
    rows, cols = vocab.image_grid
    ids = [vocab.special("<bos>")]
    for ch in layout:
        if ch == "t":
            ids += rng.integers(0, vocab.text_size, rng.integers(1, 6)).tolist()
        elif ch == "i":
            ids += vocab.block("image", torch.from_numpy(rng.integers(0, vocab.image_codes, (rows, cols))))
        elif ch == "a":
            ids += vocab.block("audio", torch.from_numpy(rng.integers(0, vocab.audio_codes, rng.integers(1, 9))))
        elif ch == "s":
            ids.append(vocab.special("<det>"))
    return ids


def _vocab(grid):
    return UnifiedVocab.default(text_size=100, image_codes=64, audio_codes=16, image_grid=grid)


@pytest.fixture(scope="module")
def qwen2vl():
    """A tiny transformers Qwen2-VL (random init): its get_rope_index and its rotary embedding are the
    references. spatial_merge_size 2: a (1, 2r, 2c) patch grid is an r x c grid of LLM tokens."""
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, embed_dim=8, hidden_size=32, num_heads=2, spatial_merge_size=2, mlp_ratio=1))
    return Qwen2VLModel(cfg).eval()


# ----------------------------------------------------------------------------------------------
# M-RoPE positions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [None, (2, 3), (3, 2)])  # None: the real bundle's 4x4
def test_mrope_positions_equal_qwen2vl_get_rope_index(real_tokenizer, qwen2vl, grid):
    """Interleaved text/image/audio documents: our positions equal transformers' Qwen2-VL get_rope_index.

    The equivalent Qwen2-VL input: its rope index only reads the token TYPE per position
    (mm_token_type_ids: 1 = image token, 0 = text) and each image's grid_thw. Our image codes are
    type 1; <boi>/<eoi> are its <|vision_start|>/<|vision_end|> (text-typed, as ours are ordinary
    positions); audio codes and specials are text to it (1-D). An r x c code grid is grid_thw
    (1, 2r, 2c) with spatial_merge_size 2 (one frame: its temporal row is the block's base).
    Non-square grids check that rows go to height and columns to width.
    """
    vocab = real_tokenizer.vocab if grid is None else _vocab(grid)
    rows, cols = vocab.image_grid
    rng = np.random.default_rng(0)
    for layout in ("titi", "itat", "tiiat", "sitst", "t"):
        ids = _document(vocab, rng, layout)
        ours, nxt = rope.mrope_positions(ids, vocab)

        mods = vocab.modality_table[torch.tensor(ids)]
        n_images = layout.count("i")
        grid_thw = torch.tensor([[1, 2 * rows, 2 * cols]] * n_images) if n_images else None
        ref, delta = qwen2vl.get_rope_index(torch.tensor([ids]), (mods == IMAGE).int()[None], image_grid_thw=grid_thw)
        assert isinstance(ours, np.ndarray) and ours.shape == (3, len(ids))
        np.testing.assert_array_equal(ours, ref[:, 0].numpy(), err_msg=layout)
        assert nxt == int(ref.max()) + 1 == len(ids) + int(delta)


def test_mrope_positions_rules_and_continuation():
    """The rules spelled out on a 2x3 grid, torch in -> torch out, ``start`` and ``next``: a
    continuation from a piece boundary (what a KV cache resumes) equals the positions of the whole."""
    vocab = _vocab((2, 3))
    text = [5, 6]
    ids = [*text, *vocab.block("image", torch.arange(6)), 7, *vocab.block("audio", torch.arange(3))]
    pos, nxt = rope.mrope_positions(torch.tensor(ids), vocab)
    assert isinstance(pos, torch.Tensor) and pos.dtype == torch.long
    # text 0,1; <boi> 2; codes base 3: rows 3,3,3,4,4,4, cols 3,4,5,3,4,5; <eoi> 3 + max(2, 3) = 6; text 7;
    # audio block (<boa>, 3 codes, <eoa>) 8..12
    assert pos[0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8, 9, 10, 11, 12]
    assert pos[1].tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8, 9, 10, 11, 12]
    assert pos[2].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert nxt == 13

    for cut in (2, 10, 11):  # before the image, after its closer, after the text that follows
        head, mid = rope.mrope_positions(ids[:cut], vocab)
        tail, end = rope.mrope_positions(ids[cut:], vocab, start=mid)
        np.testing.assert_array_equal(np.concatenate([head, tail], 1), pos.numpy())
        assert end == nxt

    # an unfinished block (generation mid-image): its codes so far keep their places, next = max + 1
    part, nxt_part = rope.mrope_positions(ids[:7], vocab)  # <boi> and 4 codes
    np.testing.assert_array_equal(part, pos[:, :7].numpy())
    assert nxt_part == 6  # base 3 + max(row 1, col 2) + 1

    with pytest.raises(OmniError, match="more than its 2x3 grid"):
        rope.mrope_positions([vocab.opener("image"), *vocab.image_code_to_id(torch.arange(7)).tolist()], vocab)
    with pytest.raises(OmniError, match="image_grid"):
        rope.mrope_positions(vocab.block("image", torch.arange(6)), _vocab(None))


def test_mrope_positions_restart_per_packed_document():
    """doc_ids: each document's positions start at 0 (``start`` only offsets the first one)."""
    vocab = _vocab((2, 3))
    rng = np.random.default_rng(1)
    docs = [_document(vocab, rng, layout) for layout in ("tit", "iat", "ti")]
    ids = sum(docs, [])
    doc_ids = np.repeat(np.arange(3), [len(d) for d in docs])
    packed, nxt = rope.mrope_positions(ids, vocab, doc_ids=doc_ids, start=4)
    alone = [rope.mrope_positions(d, vocab, start=4 if i == 0 else 0) for i, d in enumerate(docs)]
    np.testing.assert_array_equal(packed, np.concatenate([p for p, _ in alone], 1))
    assert nxt == alone[-1][1]
    assert packed[:, len(docs[0])].tolist() == [0, 0, 0]  # the second document restarts
    assert not np.array_equal(packed, rope.mrope_positions(ids, vocab)[0])  # unpacked they continue
    with pytest.raises(OmniError, match="doc_ids must have the shape"):
        rope.mrope_positions(ids, vocab, doc_ids=doc_ids[:-1])


# ----------------------------------------------------------------------------------------------
# frequencies against the references
# ----------------------------------------------------------------------------------------------
def test_mrope_cos_sin_equal_qwen2vl_rotary_embedding(qwen2vl):
    """3-D positions through our sections equal transformers' Qwen2VLRotaryEmbedding (head_dim 16,
    sections [2, 3, 3]: both rotate_half halves carry the same [t | h | w] layout)."""
    cfg = RopeConfig(kind="mrope", mrope_section=[2, 3, 3])
    positions = torch.randint(0, 500, (3, 2, 9))
    cos, sin = rope_cos_sin(positions, 16, 10000.0, torch.float32, cfg)
    ref_cos, ref_sin = qwen2vl.language_model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(cos[:, 0], ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin[:, 0], ref_sin, rtol=0, atol=0)
    assert rope.default_mrope_section(128) == [16, 24, 24] and rope.default_mrope_section(16) == [2, 3, 3]
    assert rope.mrope_section(RopeConfig(kind="mrope"), 16) == [2, 3, 3]  # null: the default, scaled


@pytest.mark.parametrize("head_dim, theta, factor, original, beta_fast, beta_slow, mscale, mscale_all_dim", [
    (64, 10000.0, 4.0, 2048, 32.0, 1.0, 1.0, 0.0),  # YaRN's defaults
    (128, 500000.0, 8.0, 8192, 32.0, 1.0, 1.0, 0.0),  # a Llama-3-like base
    (16, 10000.0, 2.0, 64, 16.0, 2.0, 1.0, 0.0),  # the tiny head, other betas
    (64, 10000.0, 40.0, 4096, 32.0, 1.0, 0.707, 1.0),  # DeepSeek-style mscale / mscale_all_dim
])
def test_yarn_equals_transformers(head_dim, theta, factor, original, beta_fast, beta_slow, mscale, mscale_all_dim):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = _hf_rope_config(head_dim, int(original * factor), rope_type="yarn", rope_theta=theta, factor=factor,
                         original_max_position_embeddings=original, beta_fast=beta_fast, beta_slow=beta_slow,
                         mscale=mscale, mscale_all_dim=mscale_all_dim)
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    cfg = RopeConfig(kind="yarn", factor=factor, original_max_position_embeddings=original, beta_fast=beta_fast,
                     beta_slow=beta_slow, mscale=mscale, mscale_all_dim=mscale_all_dim)
    inv, attention = rope.frequencies(cfg, head_dim, theta)
    assert torch.equal(inv, ref_inv)
    assert attention == pytest.approx(ref_factor, rel=1e-12)
    plain = rope.base_inv_freq(head_dim, theta)
    assert inv[0] == plain[0] and float(inv[-1]) == pytest.approx(float(plain[-1]) / factor)  # fastest kept, slowest / s
    cos, _ = rope_cos_sin(torch.zeros(1, 1, dtype=torch.long), head_dim, theta, torch.float32, cfg)
    assert float(cos.flatten()[0]) == pytest.approx(attention)  # cos and sin carry the attention factor


def test_yarn_attention_factor_is_megatrons():
    """megatron-core's concentration factor, also where transformers differs (mscale != 1 with
    mscale_all_dim = 0: transformers then ignores mscale)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor,
    )

    for factor, mscale, all_dim in ((4.0, 1.0, 0.0), (4.0, 2.0, 0.0), (40.0, 0.707, 1.0), (1.0, 3.0, 0.0)):
        assert rope.yarn_attention_factor(factor, mscale, all_dim) == _yarn_get_concentration_factor(factor, mscale, all_dim)
    assert rope.yarn_attention_factor(4.0, 2.0, 0.0) != rope.yarn_attention_factor(4.0, 1.0, 0.0)


@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_rope_linear_and_ntk_equal_transformers(factor):
    """'linear' = transformers' linear; 'ntk' = transformers' 'dynamic' at the length where its ratio
    (factor * seq_len / max_len - (factor - 1)) is the factor: seq_len = max_len (2 s - 1) / s."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d, max_len = 32, 4
    lin, scale = rope.frequencies(RopeConfig(scaling="linear", factor=factor), d, 10000.0)
    ref, _ = ROPE_INIT_FUNCTIONS["linear"](_hf_rope_config(d, max_len, rope_type="linear", factor=factor))
    assert torch.equal(lin, ref) and scale == 1.0

    seq_len = int(max_len * (2 * factor - 1) / factor)
    ntk, _ = rope.frequencies(RopeConfig(scaling="ntk", factor=factor), d, 10000.0)
    ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](_hf_rope_config(d, max_len, rope_type="dynamic", factor=factor),
                                             seq_len=seq_len)
    torch.testing.assert_close(ntk, ref, rtol=1e-6, atol=0)
    plain = rope.base_inv_freq(d, 10000.0)
    assert ntk[0] == plain[0] and float(ntk[-1]) == pytest.approx(float(plain[-1]) / factor, rel=1e-5)  # NTK's two ends

    # linear = the plain angles of positions / factor
    positions = torch.arange(0, 64, 8)[None]
    cos, sin = rope_cos_sin(positions, d, 10000.0, torch.float32, RopeConfig(scaling="linear", factor=factor))
    ref_cos, ref_sin = rope_cos_sin(positions / factor, d, 10000.0, torch.float32)
    torch.testing.assert_close((cos, sin), (ref_cos, ref_sin), rtol=1e-6, atol=1e-6)


def test_mrope_plus_sections_follow_the_paper():
    """s = 1: mrope bit for bit. s = 4: time pairs unchanged, width pairs / s, height pairs ramp
    monotonically from unchanged (its fastest pair) to / s (its slowest); no attention factor."""
    d, theta = 32, 10000.0
    section = [4, 6, 6]
    mrope, _ = rope.frequencies(RopeConfig(kind="mrope", mrope_section=section), d, theta)
    one, _ = rope.frequencies(RopeConfig(kind="mrope_plus", factor=1.0, mrope_section=section), d, theta)
    assert torch.equal(one, mrope) and torch.equal(mrope, rope.base_inv_freq(d, theta))

    s = 4.0
    plus, attention = rope.frequencies(RopeConfig(kind="mrope_plus", factor=s, mrope_section=section), d, theta)
    ratio = plus / mrope
    t, h, _ = section
    assert attention == 1.0
    assert torch.equal(plus[:t], mrope[:t])  # temporal: extrapolation
    torch.testing.assert_close(ratio[t + h:], torch.full((d // 2 - t - h,), 1 / s), rtol=1e-6, atol=0)  # width
    height = ratio[t:t + h]
    assert height[0] == 1.0 and float(height[-1]) == pytest.approx(1 / s, rel=1e-6)
    assert bool((height[1:] < height[:-1]).all())  # strictly from 1 down to 1/s
    torch.testing.assert_close(height, torch.linspace(1, 1 / s, h), rtol=1e-6, atol=1e-6)  # a linear ramp

    # with 3-D positions at s = 1 the cos/sin are mrope's too
    positions = torch.randint(0, 100, (3, 1, 7))
    a = rope_cos_sin(positions, d, theta, torch.float32, RopeConfig(kind="mrope", mrope_section=section))
    b = rope_cos_sin(positions, d, theta, torch.float32, RopeConfig(kind="mrope_plus", mrope_section=section))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_default_rope_is_todays_bit_for_bit():
    """No rope section, RopeConfig() and the formula omni.model always used: the same bits."""
    d, theta = 16, 10000.0
    positions = torch.randint(0, 4000, (2, 11))
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = positions.float()[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    for cfg in (None, RopeConfig()):
        cos, sin = rope_cos_sin(positions, d, theta, torch.bfloat16, cfg)
        assert torch.equal(cos, emb.cos().to(torch.bfloat16)[:, None])
        assert torch.equal(sin, emb.sin().to(torch.bfloat16)[:, None])


# ----------------------------------------------------------------------------------------------
# the decoder
# ----------------------------------------------------------------------------------------------
def _model(cfg, seed=0, **rope_fields):
    torch.manual_seed(seed)
    return OmniDecoder(dataclasses.replace(cfg, rope=RopeConfig(**rope_fields))).eval()


def test_model_mrope_with_1d_positions_equals_rope(tiny_model_config):
    """kind mrope without explicit positions (every token at (p, p, p)) computes 1-D RoPE's function;
    explicit (p, p, p) too; real image positions change it, and a KV cache fed 3-D positions step by
    step equals the full forward."""
    plain, mrope = _model(tiny_model_config), _model(tiny_model_config, kind="mrope")
    ids = torch.randint(0, tiny_model_config.vocab_size, (2, 14))
    p = torch.arange(14)[None].expand(2, 14)
    with torch.no_grad():
        want = plain(ids).logits
        assert torch.equal(mrope(ids).logits, want)
        assert torch.equal(mrope(ids, position_ids=torch.stack([p, p, p])).logits, want)

        pos3 = torch.stack([p, p + (torch.arange(14) % 3), p + (torch.arange(14) % 5)])  # [3, B, T]
        full = mrope(ids, position_ids=pos3).logits
        assert not torch.allclose(full, want, atol=1e-4)
        cache = mrope.new_cache()
        steps = [mrope(ids[:, :9], position_ids=pos3[:, :, :9], cache=cache).logits]
        steps += [mrope(ids[:, t:t + 1], position_ids=pos3[:, :, t:t + 1], cache=cache).logits for t in range(9, 14)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)

        with pytest.raises(OmniError, match="need model.rope.kind 'mrope' or 'mrope_plus'"):
            plain(ids, position_ids=pos3)
        with pytest.raises(OmniError, match=r"must be \[3, B, T\]"):
            mrope(ids, position_ids=pos3[:2])


@pytest.mark.parametrize("fields", [
    {"kind": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    {"kind": "mrope_plus", "factor": 4.0},
    {"scaling": "ntk", "factor": 2.0},
])
def test_model_table_follows_the_kind(tiny_model_config, fields):
    """The precomputed table holds the kind's cos/sin (attention factor included) and matches evaluated
    positions; the kind changes the function."""
    cfg = dataclasses.replace(tiny_model_config, max_seq_len=16)
    model = _model(cfg, **fields)
    cos, sin = rope_cos_sin(torch.arange(16)[None], cfg.head_dim, cfg.rope_theta, torch.float32, model.config.rope)
    assert torch.equal(model.rope_cos, cos[0, 0]) and torch.equal(model.rope_sin, sin[0, 0])
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        table = model(ids).logits
        torch.testing.assert_close(model(ids, position_ids=torch.arange(12)[None]).logits, table, rtol=0, atol=1e-6)
        assert not torch.allclose(table, _model(cfg)(ids).logits, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, needle", [
    ("model.rope.kind=alibi", "model.rope.kind='alibi' is invalid: expected one of 'rope', 'yarn', 'mrope', 'mrope_plus'"),
    ("model.rope.scaling=dynamic", "model.rope.scaling='dynamic' is invalid: expected one of 'none', 'linear', 'ntk'"),
    ("model.rope.factor=0.5", "model.rope.factor=0.5 is invalid: expected >= 1"),
    ("model.rope.factor=2", "model.rope.factor=2.0 is invalid: expected 1.0 with kind 'rope' and scaling 'none'"),
    ("model.rope.kind=yarn", "model.rope.original_max_position_embeddings=None is invalid"),
    ("model.rope.original_max_position_embeddings=512", "used by kind 'yarn' only"),
    ("model.rope.beta_fast=16", "model.rope.beta_fast=16.0 is invalid: expected its default 32.0 with kind 'rope'"),
    ("model.rope.mrope_section=[2,3,3]", "model.rope.mrope_section=[2, 3, 3] is invalid: expected null with kind 'rope'"),
    ("model.rope.nope=1", "unknown config key 'model.rope.nope'"),
])
def test_bad_rope_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, overrides=[override])
    assert needle in str(e.value), str(e.value)


def test_rope_config_cross_checks():
    """Checks that need the model's shape, and the combinations of kind and scaling."""
    with pytest.raises(ConfigError, match=r"model.rope.mrope_section=\[2, 3, 4\] is invalid: expected sections summing "
                                          r"to head_dim / 2 = 8"):
        load_config(RunConfig, overrides=["model.rope.kind=mrope", "model.rope.mrope_section=[2,3,4]"])
    with pytest.raises(ConfigError, match=r"model.rope.mrope_section=\[2, 6\] is invalid: expected 3 non-negative"):
        load_config(RunConfig, overrides=["model.rope.kind=mrope_plus", "model.rope.mrope_section=[2,6]"])
    with pytest.raises(ConfigError, match="model.rope.scaling='linear' is invalid: expected 'none' with kind 'yarn'"):
        load_config(RunConfig, overrides=["model.rope.kind=yarn", "model.rope.scaling=linear",
                                          "model.rope.original_max_position_embeddings=64"])
    with pytest.raises(ConfigError, match="model.rope.beta_fast=1.0 is invalid: expected > beta_slow=1.0"):
        load_config(RunConfig, overrides=["model.rope.kind=yarn", "model.rope.original_max_position_embeddings=64",
                                          "model.rope.beta_fast=1"])
    cfg = load_config(RunConfig, overrides=["model.rope.kind=mrope_plus", "model.rope.factor=4",
                                            "model.rope.mrope_section=[2,3,3]"])
    assert cfg.model.rope == RopeConfig(kind="mrope_plus", factor=4.0, mrope_section=[2, 3, 3])


def test_config_without_rope_loads_as_before_and_rope_round_trips(tmp_path, tiny_model_config):
    """An old config.yaml (no rope section) gives plain RoPE; a rope section survives save/load."""
    old = {f.name: getattr(tiny_model_config, f.name) for f in dataclasses.fields(ModelConfig) if f.name != "rope"}
    assert load_config(ModelConfig, old).rope == RopeConfig()
    cfg = dataclasses.replace(tiny_model_config, rope=RopeConfig(kind="yarn", factor=8.0,
                                                                 original_max_position_embeddings=32, mscale=0.5))
    assert load_config(ModelConfig, save_config(cfg, tmp_path / "config.yaml")) == cfg


def test_backends_that_cannot_carry_a_rope_kind_refuse_it(tiny_model_config):
    """The megatron backend builds plain RoPE and the Chameleon export maps plain RoPE only: both refuse
    another kind instead of silently computing a different function."""
    from omni.chameleon_export import unmappable
    from omni.parallel.megatron.config import Machine, check_megatron

    gpu = Machine(te_version="2.9.0", capability=(9, 0))
    cfg = load_config(RunConfig, overrides=["parallel.backend=megatron", "model.rope.kind=mrope", "data.seq_len=64"])
    with pytest.raises(ConfigError, match="model.rope.kind='mrope' scaling='none' is not wired into parallel.backend=megatron"):
        check_megatron(cfg, world=1, machine=gpu)
    check_megatron(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, rope=RopeConfig())), world=1, machine=gpu)
    assert unmappable(tiny_model_config) == []
    assert any("rope=" in p for p in unmappable(dataclasses.replace(tiny_model_config, rope=RopeConfig(kind="mrope"))))
