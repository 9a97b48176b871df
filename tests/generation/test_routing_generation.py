"""Generation with a routing head (VisionLLM v2): a model with a detection head (``model.heads``) may
emit <det> once its row holds an image; that step feeds the token and its K super-link queries at
once, the cache then holds them (the next logits equal a full forward's), the head's boxes fill the
Detect segment, and a batch with a routed and an unrouted row equals each row alone."""

from __future__ import annotations

import pytest
import torch

import omni
from omni.config.heads import DetectionHeadConfig, HeadsConfig
from omni.decoders.routing import RoutingHeads
from omni.generation import generator
from omni.model import OmniDecoder


@pytest.fixture
def routed_model(tiny_model_config, real_tokenizer):
    torch.manual_seed(0)
    model = OmniDecoder(tiny_model_config).eval()
    model.set_modality_table(real_tokenizer.vocab.modality_table)
    cfg = HeadsConfig(det=DetectionHeadConfig(enabled=True, n_queries=3, width=32, n_objects=4, n_layers=1,
                                              n_heads=2, ffn_dim=64))
    model.heads = RoutingHeads(cfg, tiny_model_config.dim, real_tokenizer.vocab.specials, (4, 4)).eval()
    return model


def _script(monkeypatch, scripts: list[list[str | int]], tok):
    """Replace the sampler: row b emits scripts[b] in order (names of specials or ids); record each
    step's constrained logits [B, V]."""
    seen = []
    v = tok.vocab

    def sample(self, logits, state):
        seen.append(logits.clone())
        step = len(seen) - 1
        out = []
        for script in scripts:
            t = script[min(step, len(script) - 1)]
            out.append(v.special(t) if isinstance(t, str) else t)
        return torch.tensor(out)

    monkeypatch.setattr(generator.ModalitySampler, "__call__", sample)
    return seen


def _prompt(seed: int = 0, text: str = "find every red circle"):
    g = torch.Generator().manual_seed(seed)
    return omni.Document([omni.Text(text), omni.Image(torch.rand(3, 32, 32, generator=g))])


def test_det_step_feeds_the_queries_and_the_head_fills_the_detect_segment(monkeypatch, routed_model, real_tokenizer):
    tok, model = real_tokenizer, routed_model
    word = tok.encode_text(" done")[0]
    seen = _script(monkeypatch, [["<det>", word, "<eos>"]], tok)
    doc = omni.generate(model, tok, _prompt(), max_new_tokens=6, det_threshold=0.0)
    assert [type(s).__name__ for s in doc.segments] == ["Detect", "Text"]
    det = doc.segments[0]
    assert len(det.boxes) == 4 and det.scores == sorted(det.scores, reverse=True)  # threshold 0: all Q queries
    det_id = tok.vocab.special("<det>")
    assert torch.isfinite(seen[0][0, det_id])  # allowed: the prompt holds an image

    # the cache held <det> and its queries: the logits after that step equal a full forward's
    ids = torch.cat([tok.encode(_prompt()), torch.tensor([det_id] + [tok.vocab.special("<pad>")] * 3)])[None]
    routes = model.heads.find(ids)
    with torch.no_grad():
        full = model(ids, splice=model.heads.queries.splicer(routes), return_hidden=True)
        want = model.heads.predict(full.hidden, ids, routes, 0.0)[0]
    allowed = torch.isfinite(seen[1][0])
    torch.testing.assert_close(seen[1][0][allowed], full.logits[0, -1].float()[allowed], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(det.boxes), torch.tensor([b for b, _ in want]))
    assert det.scores == pytest.approx([s for _, s in want])


def test_det_needs_an_image_and_a_head(monkeypatch, routed_model, real_tokenizer, tiny_model_config):
    tok = real_tokenizer
    det_id = tok.vocab.special("<det>")
    seen = _script(monkeypatch, [["<eos>"]], tok)
    omni.generate(routed_model, tok, "find every red circle", max_new_tokens=3)
    assert seen[0][0, det_id] == float("-inf")  # no image to read
    seen.clear()
    plain = OmniDecoder(tiny_model_config).eval()
    plain.set_modality_table(tok.vocab.modality_table)
    omni.generate(plain, tok, _prompt(), max_new_tokens=3)
    assert seen[0][0, det_id] == float("-inf")  # no head


def test_a_batch_with_a_routed_row_equals_each_row_alone(monkeypatch, routed_model, real_tokenizer):
    tok = real_tokenizer
    words = tok.encode_text(" one two three")[:3]
    prompts = [_prompt(0), _prompt(1, "find the shapes in this picture please")]
    scripts = [["<det>", *words, "<eos>"], [*words, "<det>", "<eos>"]]
    seen = _script(monkeypatch, scripts, tok)
    both = omni.generate(routed_model, tok, prompts, max_new_tokens=8, det_threshold=0.0)
    batched = [s.clone() for s in seen]
    for b in range(2):
        alone_seen = _script(monkeypatch, [scripts[b]], tok)
        alone = omni.generate(routed_model, tok, prompts[b], max_new_tokens=8, det_threshold=0.0)
        assert [type(s).__name__ for s in alone.segments] == [type(s).__name__ for s in both[b].segments]
        for x, y in zip(alone.segments, both[b].segments):
            if isinstance(x, omni.Detect):
                torch.testing.assert_close(torch.tensor(x.boxes), torch.tensor(y.boxes), rtol=1e-4, atol=1e-5)
                assert x.scores == pytest.approx(y.scores, abs=1e-5)
        for step, logits in enumerate(alone_seen):
            ok = torch.isfinite(logits[0])
            torch.testing.assert_close(logits[0][ok], batched[step][b][ok], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_page_draws_the_boxes_over_the_image_in_chromium(tmp_path):
    """A Detect after an image: the page shows that image with the boxes drawn on and lists them (the
    Markdown too); headless Chromium's screenshot shows one magenta rectangle per box."""
    import numpy as np
    from browser import screenshot
    from scipy import ndimage

    from omni.generation.page import BOX_RGB, write_page

    image = omni.Image(torch.ones(3, 32, 32) * 0.9)
    boxes = [(0.1, 0.1, 0.4, 0.45), (0.55, 0.5, 0.9, 0.85), (0.6, 0.05, 0.95, 0.3)]
    prompt = omni.Document([omni.Text("find the shapes"), image])
    out = omni.Document([omni.Detect(boxes, scores=[0.9, 0.8, 0.6], phrase="the shapes")])
    page = write_page([(prompt, out)], tmp_path / "det.html")
    text = page.read_text()
    assert "3 boxes for “the shapes”" in text and "(0.55, 0.50, 0.90, 0.85) score 0.80" in text
    md = (tmp_path / "det.md").read_text()
    assert "![detections: 3 boxes" in md and "- (0.10, 0.10, 0.40, 0.45) score 0.90" in md
    a = screenshot(page, tmp_path, "1000,800")
    magenta = (np.abs(a - np.array(BOX_RGB)).max(-1) < 40)
    labels, count = ndimage.label(magenta)
    sizes = np.asarray(ndimage.sum(magenta, labels, range(1, count + 1)))
    assert int((sizes > 50).sum()) == len(boxes), sizes


def test_gen_step_makes_an_image_block_that_enters_the_cache(monkeypatch, tiny_model_config, real_tokenizer):
    """<gen>: the diffusion head samples from the row's query states; its image (snapped to codes) is
    emitted as an ordinary image block, so the document holds Generate, Image and then the text the
    model writes after it, whose logits equal a full forward over the prompt, <gen>, slots and block."""
    from omni.config.heads import DiffusionHeadConfig

    tok = real_tokenizer
    torch.manual_seed(0)
    model = OmniDecoder(tiny_model_config).eval()
    model.set_modality_table(tok.vocab.modality_table)
    cfg = HeadsConfig(gen=DiffusionHeadConfig(enabled=True, n_queries=3, widths=(32,), layers=1, head_dim=32,
                                              cross_dim=32, steps=2))
    model.heads = RoutingHeads(cfg, tiny_model_config.dim, tok.vocab.specials, (4, 4), image_tokenizer=tok.image).eval()
    word = tok.encode_text(" done")[0]
    n = 16 + 2  # the forced image block: <boi>, 4x4 codes, <eoi>
    seen = _script(monkeypatch, [["<gen>"] + [word] * n + [word, "<eos>"]], tok)
    doc = omni.generate(model, tok, "a red circle", max_new_tokens=n + 4, gen_steps=2)
    assert [type(s).__name__ for s in doc.segments] == ["Generate", "Image", "Text"]
    assert torch.isfinite(seen[0][0, tok.vocab.special("<gen>")])  # a head and room for an image: allowed

    prompt = tok.encode(omni.Document([omni.Text("a red circle")]))
    gen_ids = torch.tensor([tok.vocab.special("<gen>")] + [tok.vocab.special("<pad>")] * 3)
    ids = torch.cat([prompt, gen_ids])[None]
    with torch.no_grad():
        routes = model.heads.find(ids)
        hidden = model(ids, splice=model.heads.queries.splicer(routes), return_hidden=True).hidden.float()
        codes = model.heads.make_image(hidden, routes[-1], tok.image, torch.Generator().manual_seed(0), 1.0, 2)
        block = torch.tensor(tok.vocab.block("image", codes))
        full = model(torch.cat([ids[0], block])[None], splice=model.heads.queries.splicer(routes))
    torch.testing.assert_close(doc.segments[1].pixels, tok.image.decode(codes[None])[0].clamp(0, 1))
    ok = torch.isfinite(seen[n + 1][0])  # the step after the block: its logits come from the cache
    torch.testing.assert_close(seen[n + 1][0][ok], full.logits[0, -1].float()[ok], rtol=1e-4, atol=1e-4)
