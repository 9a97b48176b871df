"""OmniDecoder: KV-cache decoding, packed documents, losses, variants, `omni model info`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import run_cli
from omni.errors import ConfigError, OmniError
from omni.model import IGNORE_INDEX, OmniDecoder, count_parameters, flops_per_token

pytestmark = pytest.mark.usefixtures("one_thread")


def make(cfg, seed=0, **changes):
    torch.manual_seed(seed)
    model = OmniDecoder(dataclasses.replace(cfg, **changes)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a wrong norm placement shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("changes", [{}, {"swin_norm": True, "qk_norm": "shared", "qk_norm_type": "rmsnorm"}])
def test_kv_cache_decode_equals_full_forward(tiny_model_config, changes):
    model = make(tiny_model_config, **changes)
    ids = torch.randint(0, tiny_model_config.vocab_size, (2, 19))
    with torch.no_grad():
        full = model(ids).logits  # [2, 19, V]
        cache = model.new_cache()
        steps = [model(ids[:, :11], cache=cache).logits]  # prefill
        for t in range(11, 15):  # one token per step
            steps.append(model(ids[:, t : t + 1], cache=cache).logits)
        steps.append(model(ids[:, 15:], cache=cache).logits)  # several tokens in one step
    assert cache.length == 19
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_writes_in_place_grows_and_truncates(tiny_model_config):
    """The cache writes each step into its buffers (no copy of the cache per token), doubles them
    when full keeping what they hold, and truncate() drops speculative tokens: decoding on equals
    never having fed them. doc ids keep dense strides (a compiled decode step guards on them)."""
    model = make(tiny_model_config)
    ids = torch.randint(0, tiny_model_config.vocab_size, (1, 12))
    zeros = lambda n: torch.zeros(1, n, dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        ref = model.new_cache(capacity=12)
        model(ids[:, :8], doc_ids=zeros(8), cache=ref)
        assert ref.k[0].shape[2] == 12 and ref.length == 8
        want = model(ids[:, 8:], doc_ids=zeros(4), cache=ref).logits

        cache = model.new_cache()
        model(ids[:, :8], doc_ids=zeros(8), cache=cache)
        assert cache.k[0].shape[2] == 8
        model(ids[:, :5], doc_ids=zeros(5), cache=cache)  # guesses, all rejected: the buffers double
        assert cache.k[0].shape[2] == 16 and cache.length == 13
        cache.truncate(8)
        ptr = cache.k[0].data_ptr()
        got = model(ids[:, 8:], doc_ids=zeros(4), cache=cache).logits
        assert cache.k[0].data_ptr() == ptr and cache.length == 12  # written in place
        cache.truncate(10)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cache.doc_ids.shape == (1, 10) and cache.doc_ids.stride() == (10, 1)


def test_single_document_rows_take_the_causal_kernel(tiny_model_config, monkeypatch):
    """Rows that are each one document without padding (a prefill of one prompt, an unpacked
    batch) attend through SDPA's is_causal path, not an explicit mask, with the same logits as
    the masked path (a packed row's mask with one document); a packed row still gets its
    block-diagonal mask, and so does a step after a filled cache."""
    import torch.nn.functional as F

    model = make(tiny_model_config)
    ids = torch.randint(0, tiny_model_config.vocab_size, (2, 10))
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, attn_mask=None, **kw: seen.append(attn_mask is None) or sdpa(*a, attn_mask=attn_mask, **kw))
    one_doc, packed = torch.zeros(2, 10, dtype=torch.long), torch.tensor([[0] * 4 + [1] * 6] * 2)
    with torch.no_grad():
        for cache in (None, model.new_cache()):
            seen.clear()
            causal = model(ids, doc_ids=one_doc, cache=cache).logits
            assert seen and all(seen)
        seen.clear()
        masked = model(torch.cat([ids, ids], 1), doc_ids=torch.cat([one_doc, one_doc + 1], 1)).logits
        model(ids, doc_ids=packed, cache=model.new_cache())
        model(ids[:, :1], doc_ids=one_doc[:, :1], cache=cache)  # a decode step after the filled cache
        assert seen and not any(seen)
    torch.testing.assert_close(causal, masked[:, :10], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal, masked[:, 10:], atol=1e-5, rtol=1e-5)  # positions restart per document


def test_packed_documents_do_not_see_each_other(tiny_model_config):
    model = make(tiny_model_config)
    V = tiny_model_config.vocab_size
    a, b = torch.randint(0, V, (7,)), torch.randint(0, V, (9,))
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        packed = model(torch.cat([a, b])[None], doc_ids=doc_ids).logits
        a2 = a.clone()
        a2[3] = (a2[3] + 1) % V  # a change inside document A
        changed = model(torch.cat([a2, b])[None], doc_ids=doc_ids).logits
        alone = model(b[None]).logits  # B by itself: positions restart, so its logits are the same
    assert not torch.allclose(changed[:, 3:7], packed[:, 3:7])  # A itself changes ...
    torch.testing.assert_close(changed[:, 7:], packed[:, 7:], atol=0, rtol=0)  # ... B does not
    torch.testing.assert_close(packed[:, 7:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, :7], model(a[None]).logits.detach(), atol=1e-5, rtol=1e-5)


def test_packed_kv_cache_decode(tiny_model_config):
    model = make(tiny_model_config)
    ids = torch.randint(0, tiny_model_config.vocab_size, (1, 12))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        full = model(ids, doc_ids=doc_ids).logits
        cache = model.new_cache()
        out = [model(ids[:, :6], doc_ids=doc_ids[:, :6], cache=cache).logits]
        for t in range(6, 12):
            out.append(model(ids[:, t : t + 1], doc_ids=doc_ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(OmniError, match="pass doc_ids"):
        model(ids[:, :1], cache=cache)


def test_loss_mask_and_z_loss(tiny_model_config):
    model = make(tiny_model_config, z_loss=0.0)
    V = tiny_model_config.vocab_size
    ids = torch.randint(0, V, (2, 10))
    labels = torch.randint(0, V, (2, 10))
    mask = torch.ones(2, 10)
    mask[:, :4] = 0
    with torch.no_grad():
        out = model(ids, labels=labels, loss_mask=mask)
        logits = out.logits.float()
        ce = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, V), labels[:, 4:].reshape(-1))
        torch.testing.assert_close(out.loss, ce)  # only unmasked targets count
        assert out.loss == out.ce_loss  # z-loss off
        other = labels.clone()
        other[:, :4] = (other[:, :4] + 1) % V  # masked targets: anything
        assert model(ids, labels=other, loss_mask=mask).loss == out.loss
        ignored = labels.clone()
        ignored[:, :4] = IGNORE_INDEX  # the same through IGNORE_INDEX
        torch.testing.assert_close(model(ids, labels=ignored).loss, out.loss)
        assert model(ids, labels=labels).loss != out.loss  # and the mask does matter

        model.config.z_loss = 1e-2
        zout = model(ids, labels=labels, loss_mask=mask)
        lse = torch.logsumexp(logits[:, 4:], -1)
        torch.testing.assert_close(zout.z_loss, lse.square().mean())
        torch.testing.assert_close(zout.loss, ce + 1e-2 * lse.square().mean())


def test_loss_by_modality(tiny_model_config, tokenizer):
    from omni.vocab import AUDIO, IMAGE, TEXT

    assert tokenizer.vocab.size == tiny_model_config.vocab_size  # the shared tiny config fits the bundle
    model = make(tiny_model_config)
    model.set_modality_table(tokenizer.vocab.modality_table)
    v = tokenizer.vocab
    text = torch.arange(10, 16)
    image = v.image_code_to_id(torch.arange(4))
    audio = v.audio_code_to_id(torch.arange(3))
    labels = torch.cat([text, image, audio])[None]
    ids = torch.randint(0, v.size, labels.shape)
    with torch.no_grad():
        out = model(ids, labels=labels)
        ce = torch.nn.functional.cross_entropy(out.logits[0].float(), labels[0], reduction="none")
    assert out.tokens_by_modality == {"text": 6, "image": 4, "audio": 3}
    torch.testing.assert_close(out.loss_by_modality["text"], ce[:6].mean())
    torch.testing.assert_close(out.loss_by_modality["image"], ce[6:10].mean())
    torch.testing.assert_close(out.loss_by_modality["audio"], ce[10:].mean())
    mods = torch.tensor([[TEXT] * 6 + [IMAGE] * 4 + [AUDIO] * 3])
    assert model(ids, labels=labels, modality=mods).tokens_by_modality == out.tokens_by_modality


def test_variants_parameters_and_training(tiny_model_config):
    cfg = tiny_model_config
    for changes in [{}, {"tie_embeddings": True}, {"qk_norm": "shared"}, {"qk_norm": "none"},
                    {"qk_norm_type": "rmsnorm"}, {"n_kv_heads": 4}]:
        model = OmniDecoder(dataclasses.replace(cfg, **changes))
        assert model.num_parameters() == count_parameters(model.config), changes
    tied = OmniDecoder(dataclasses.replace(cfg, tie_embeddings=True))
    assert "output.weight" not in tied.state_dict()
    shared = OmniDecoder(dataclasses.replace(cfg, qk_norm="shared")).layers[0].attention.q_norm.weight
    per_head = OmniDecoder(cfg).layers[0].attention.k_norm.weight
    assert shared.shape == (cfg.head_dim,) and per_head.shape == (cfg.n_kv_heads, cfg.head_dim)

    # 6N + causal attention: N = block linears + output head
    d = cfg.head_dim
    n = cfg.n_layers * (2 * cfg.dim * cfg.n_heads * d + 2 * cfg.dim * cfg.n_kv_heads * d + 3 * cfg.dim * cfg.ffn_dim)
    n += cfg.vocab_size * cfg.dim
    assert flops_per_token(cfg, 128) == 6 * n + 6 * cfg.n_layers * cfg.dim * 128

    # a few AdamW steps fit a fixed batch (gradients reach every weight)
    torch.manual_seed(0)
    model = OmniDecoder(dataclasses.replace(cfg, dropout=0.1, attention_dropout=0.1)).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    model.eval()  # dropout off: deterministic
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_config_range_checks(tiny_model_config):
    with pytest.raises(ConfigError, match="n_kv_heads=3 is invalid"):
        dataclasses.replace(tiny_model_config, n_kv_heads=3)
    with pytest.raises(ConfigError, match="qk_norm='both' is invalid: expected one of 'per_head', 'shared', 'none'"):
        dataclasses.replace(tiny_model_config, qk_norm="both")


def test_model_info_cli():
    rc, out, err = run_cli("model", "info", "models/7b")
    assert rc == 0, err
    assert "7,013,666,816" in out and "FLOPs/token" in out
    rc, out, err = run_cli("model", "info", "models/34b")
    assert rc == 0 and "(34.29B)" in out and "swin_norm=True" in out
    rc, out, err = run_cli("model", "info", "models/nope")
    assert rc == 2 and "models/nope" in err and "models/tiny" in err
    rc, out, err = run_cli("model", "info", "models/tiny", "n_heads=3")
    assert rc == 2 and "n_heads=3 is invalid" in err


def test_fused_cross_entropy_gradient():
    from omni.model import CrossEntropyLSE

    x = torch.randn(5, 13, dtype=torch.double, requires_grad=True)
    t = torch.randint(0, 13, (5,))
    assert torch.autograd.gradcheck(lambda x: CrossEntropyLSE.apply(x, t), (x,))
    ce, lse = CrossEntropyLSE.apply(x, t)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(x, t, reduction="none"))
    torch.testing.assert_close(lse, torch.logsumexp(x, -1))


def test_rope_table_equals_evaluated_rope(tiny_model_config):
    """Derived positions read the precomputed RoPE table; explicit positions and positions past
    max_seq_len evaluate cos/sin: all three give the same logits, and a model built on the meta
    device and materialized gets the same table from reset_parameters."""
    from omni.model import rope_cos_sin

    cfg = dataclasses.replace(tiny_model_config, max_seq_len=16)
    model = make(cfg)
    cos, sin = rope_cos_sin(torch.arange(16)[None], cfg.head_dim, cfg.rope_theta, torch.float32)
    assert torch.equal(model.rope_cos, cos[0, 0]) and torch.equal(model.rope_sin, sin[0, 0])
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        table = model(ids).logits
        evaluated = model(ids, position_ids=torch.arange(12)[None]).logits
        torch.testing.assert_close(table, evaluated, rtol=0, atol=1e-6)
        # 12 + 12 > max_seq_len: the second call evaluates positions 12..23 and still matches
        long_ids = torch.randint(0, cfg.vocab_size, (1, 24))
        cache = model.new_cache()
        first = model(long_ids[:, :12], cache=cache).logits
        second = model(long_ids[:, 12:], cache=cache).logits
        full = model(long_ids, position_ids=torch.arange(24)[None]).logits
        torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-5, atol=1e-5)

    with torch.device("meta"):
        lazy = OmniDecoder(cfg)
    lazy.to_empty(device="cpu")
    lazy.reset_parameters()
    assert torch.equal(lazy.rope_cos, model.rope_cos) and torch.equal(lazy.rope_sin, model.rope_sin)
    assert "rope_cos" not in model.state_dict()  # derived, not saved
