"""The <gen> head (omni.decoders.diffusion): loss and gradients, condition dropout, sampling,
classifier-free guidance, the tokenizer-latent round trip and the user errors. Tiny sizes: seconds."""

from __future__ import annotations

import pytest
import torch

from omni.decoders.diffusion import (
    DiffusionHead,
    DiffusionHeadConfig,
    LatentStats,
    code_vectors,
    latent_to_codes,
    to_latent,
)
from omni.errors import ConfigError, OmniError

D, K = 16, 4  # decoder width and super-link slots of the tests


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**kw) -> DiffusionHead:
    torch.manual_seed(0)
    cfg = {"dim": D, "n_queries": K, "channels": 4, "size": 4, "widths": (32, 32), "head_dim": 16,
           "cross_dim": 16, **kw}
    return DiffusionHead(DiffusionHeadConfig(**cfg))


def test_registered_and_routed():
    from omni.decoders.base import head_class

    assert DiffusionHead.kind == "diffusion" and DiffusionHead.routing_token == "<gen>"
    assert head_class("diffusion") is DiffusionHead


@pytest.mark.parametrize("kw", [{}, {"objective": "ddpm"}, {"denoiser": "dit", "widths": (32,)},
                                {"mapper": "resampler", "n_latents": 3}])
def test_loss_is_finite_and_reaches_the_query_states(kw):
    head = tiny(**kw)
    q = torch.randn(3, K, D, requires_grad=True)
    x = torch.randn(3, 4, 4, 4)
    out = head(q, target=x, generator=torch.Generator().manual_seed(1))
    assert out.prediction.shape == out.target.shape == (3, 4, 4, 4)
    losses = head.loss(out, None)
    assert set(losses) == {"gen_diffusion"}
    loss = losses["gen_diffusion"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    # with the condition dropped for every row, no gradient reaches the query states
    head.cfg.cond_dropout = 0.999999
    q2 = torch.randn(3, K, D, requires_grad=True)
    out = head(q2, target=x, generator=torch.Generator().manual_seed(1))
    assert out.dropped.all()
    head.loss(out)["gen_diffusion"].backward()
    assert q2.grad is None or q2.grad.abs().sum() == 0


def test_noise_repeats_draw_new_noise_under_the_same_condition():
    """MAR's batch multiplier: r noised copies of each target, each with its own timestep and noise,
    under that row's one condition (dropped or not for all r); only in training."""
    head = tiny(noise_repeats=3, cond_dropout=0.5)
    q, x = torch.randn(4, K, D, requires_grad=True), torch.randn(4, 4, 4, 4)
    out = head(q, target=x, generator=torch.Generator().manual_seed(2))
    assert out.prediction.shape == out.target.shape == (12, 4, 4, 4) and out.timesteps.shape == (12,)
    assert torch.equal(out.dropped, out.dropped[:4].repeat(3)) and 0 < out.dropped[:4].sum() < 4
    assert len(set(out.timesteps.tolist())) == 12  # a timestep per copy
    # flow: target v = eps - x0, so the copies' noise differs while x0 is the row's own target
    eps = out.target + x.repeat(3, 1, 1, 1)
    assert not torch.allclose(eps[:4], eps[4:8])
    head.loss(out)["gen_diffusion"].backward()
    assert q.grad[~out.dropped[:4]].abs().sum() > 0
    assert head.eval()(q, target=x).prediction.shape[0] == 4  # evaluation: one draw per row


def test_condition_dropout_uses_the_null_at_the_configured_rate():
    head = tiny(cond_dropout=0.25)
    q = torch.randn(2000, K, D)
    drop = torch.rand(2000, generator=torch.Generator().manual_seed(3)) < 0.25
    cond = head.condition(q, drop)
    assert torch.equal(cond[drop], head.null.detach()[None].expand(int(drop.sum()), -1, -1))
    assert not torch.isclose(cond[~drop], head.null.detach()[None]).all((1, 2)).any()
    # forward draws the rows from its generator: seeded, at the configured rate, only in training
    small = tiny(cond_dropout=0.25, widths=(32,), size=2, channels=1)
    qs, xs = torch.randn(2000, K, D), torch.zeros(2000, 1, 2, 2)
    with torch.no_grad():
        a = small(qs, target=xs, generator=torch.Generator().manual_seed(7)).dropped
        b = small(qs, target=xs, generator=torch.Generator().manual_seed(7)).dropped
        assert torch.equal(a, b)
        assert 0.2 < a.float().mean() < 0.3
        assert not small.eval()(qs[:8], target=xs[:8]).dropped.any()


def test_sample_shape_and_determinism():
    head = tiny().eval()
    q = torch.randn(2, K, D)
    a = head.sample(q, generator=torch.Generator().manual_seed(5), steps=3, guidance=2.0)
    b = head.sample(q, generator=torch.Generator().manual_seed(5), steps=3, guidance=2.0)
    c = head.sample(q, generator=torch.Generator().manual_seed(6), steps=3, guidance=2.0)
    assert a.shape == (2, 4, 4, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    ddpm = tiny(objective="ddpm").eval()
    assert ddpm.sample(q, generator=torch.Generator().manual_seed(5), steps=2).shape == (2, 4, 4, 4)
    pix = tiny(channels=3, size=8, unshuffle=2).eval()  # pixel-unshuffled: 8x8x3 <-> 4x4x12
    assert pix.sample(q, generator=torch.Generator().manual_seed(5), steps=2).shape == (2, 3, 8, 8)


def test_guidance_one_is_the_conditional_path_alone():
    head = tiny().eval()
    q = torch.randn(2, K, D)
    calls = []
    inner = head._denoise

    def spy(x, t, cond):
        calls.append(x.shape[0])
        return inner(x, t, cond)

    head._denoise = spy
    g1 = head.sample(q, generator=torch.Generator().manual_seed(5), steps=3, guidance=1.0)
    assert calls == [2, 2, 2]  # one conditional pass per step, no unconditional rows
    # the two-pass guided formula at scale 1 gives the same samples (up to float rounding)
    head._denoise = inner
    assert torch.allclose(g1, _guided(head, q, scale=1.0), atol=1e-5)


def _guided(head, q, scale):
    """Sample with the two-pass CFG formula forced on (what sample() skips at scale 1)."""
    cond = head.condition(q)
    B = cond.shape[0]
    both = torch.cat((head.null[None].expand(B, -1, -1), cond))
    x = torch.randn((B, 4, 4, 4), generator=torch.Generator().manual_seed(5))
    sched = head.sampler(3)
    with torch.no_grad():
        for t in sched.timesteps:
            pred = head._denoise(torch.cat((x, x)), torch.full((2 * B,), float(t)), both)
            u, c = pred.chunk(2)
            x = sched.step(u + scale * (c - u), t, x).prev_sample
    return x


def test_latent_round_trip_gives_the_tokenizers_own_codes():
    from omni.config.image_tokenizer import ImageTokenizerConfig
    from omni.tokenizers.image import VQImageTokenizer

    torch.manual_seed(0)
    tok = VQImageTokenizer(ImageTokenizerConfig(
        image_size=16, base_channels=8, channel_multiplier=[1, 2, 2], norm_groups=4, latent_channels=8,
        embed_dim=8, codebook_size=32, codebook_dim=4, kmeans_init=False)).eval()
    images = torch.rand(4, 3, 16, 16)
    codes = tok.encode(images)
    assert len(code_vectors(tok)) == 32 and len(codes.unique()) > 1
    z = to_latent(tok, images)
    assert z.shape == (4, 8, 4, 4)
    assert torch.equal(latent_to_codes(tok, z), codes)
    stats = LatentStats.of(tok, images)
    zn = to_latent(tok, images, stats)
    assert torch.allclose(zn.mean((0, 2, 3)), torch.zeros(8), atol=1e-5)
    assert torch.equal(latent_to_codes(tok, zn, stats), codes)
    # a slightly perturbed latent still snaps to the same codes; the head keeps the stats in its buffers
    assert torch.equal(latent_to_codes(tok, zn + 1e-3 * torch.randn_like(zn), stats), codes)
    head = tiny(channels=8)
    head.set_latent_stats(stats)
    assert torch.equal(head.latent_stats.mean, stats.mean) and "latent_std" in head.state_dict()


@pytest.mark.parametrize("kw, words", [
    ({"guidance": -1.0}, "guidance=-1.0"), ({"steps": 0}, "steps=0"), ({"cond_dropout": 1.0}, "cond_dropout"),
    ({"denoiser": "vae"}, "denoiser='vae'"), ({"size": 6, "widths": (32, 32, 32)}, "multiple of 4"),
    ({"size": 4, "unshuffle": 3}, "unshuffle=3"), ({"widths": (48,)}, "multiples of"),
    ({"noise_repeats": 0}, "noise_repeats=0"),
])
def test_bad_config_is_refused(kw, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        DiffusionHeadConfig(**{"head_dim": 16, **kw})


def test_bad_calls_are_refused():
    head = tiny().eval()
    with pytest.raises(OmniError, match="K=3 super-link states.*n_queries=4"):
        head.sample(torch.randn(2, 3, D))
    with pytest.raises(OmniError, match=r"\[B, K, D=16\]"):
        head.condition(torch.randn(2, K, D + 1))
    with pytest.raises(ConfigError, match="guidance=-0.5"):
        head.sample(torch.randn(2, K, D), guidance=-0.5)
    with pytest.raises(ConfigError, match="steps=0"):
        head.sample(torch.randn(2, K, D), steps=0)
    with pytest.raises(OmniError, match="target must be"):
        head(torch.randn(2, K, D), target=torch.randn(2, 3, 4, 4))
    with pytest.raises(OmniError, match="config or keyword overrides"):
        DiffusionHead(DiffusionHeadConfig(), dim=8)
