"""Routing tokens and super-link queries (omni.decoders.routing) on the tiny decoder: slots found and
checked, query embeddings spliced in, their hidden states gathered, slot targets never scored, the
gradient of a head loss reaching the decoder and the queries, and generation's one-step feed of the
routing token and its queries equal to the full forward (the cache holds them; later tokens attend
to them)."""

from __future__ import annotations

import pytest
import torch

from omni.decoders.routing import IGNORE_INDEX, SLOT, SuperLinkQueries, image_context, mask_slot_targets
from omni.errors import OmniError
from omni.model import OmniDecoder

K = 4


@pytest.fixture(scope="module")
def vocab(text_tokenizer):
    import omni

    return omni.UnifiedTokenizer.build(text_tokenizer).vocab


@pytest.fixture
def model(tiny_model_config):
    torch.manual_seed(0)
    return OmniDecoder(tiny_model_config).eval()


def _queries(model, vocab, k=K):
    torch.manual_seed(1)
    return SuperLinkQueries(model.config.dim, {"<det>": k, "<gen>": 2}, vocab.specials, init_std=1.0)


def _routed(vocab, prefix=(5, 6, 7, 8), after=(9,), k=K):
    """ids [1, T]: text, <det>, K slots, more text."""
    s = vocab.specials
    return torch.tensor([[*prefix, s["<det>"], *[s[SLOT]] * k, *after]])


def test_routing_agrees_with_the_model_and_the_vocabulary():
    """decoders sit below the core and may not import it: their copies of its constants must agree."""
    from omni.model import IGNORE_INDEX as MODEL_IGNORE
    from omni.vocab import SLOT as VOCAB_SLOT

    assert IGNORE_INDEX == MODEL_IGNORE and SLOT == VOCAB_SLOT


def test_routes_are_found_and_bad_slots_refused(model, vocab):
    q = _queries(model, vocab)
    ids = torch.cat([_routed(vocab), _routed(vocab, prefix=(3, 4, 5, 6))])
    routes = q.find(ids)
    assert [(r.row, r.token, r.name, r.slots) for r in routes] == [(0, 4, "<det>", slice(5, 9)),
                                                                   (1, 4, "<det>", slice(5, 9))]
    with pytest.raises(OmniError, match=r"followed by 3 slot\(s\) \(<pad>\), the head has n_queries=4"):
        q.find(_routed(vocab, k=3))
    with pytest.raises(OmniError, match="has no room for its 4 slots"):
        q.find(_routed(vocab, after=())[:, :-1])
    with pytest.raises(OmniError, match="at least one super-link query"):
        SuperLinkQueries(8, {"<det>": 0}, vocab.specials)
    with pytest.raises(OmniError, match="not in the vocabulary's specials"):
        SuperLinkQueries(8, {"<find>": 4}, vocab.specials)


def test_slot_targets_are_never_scored(model, vocab):
    q = _queries(model, vocab)
    ids = _routed(vocab)
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE_INDEX)], dim=1)
    out = mask_slot_targets(labels, q.find(ids))
    # the routing token (4) and slots 1..K-1 (5..7) would predict a slot; slot K (8) predicts the 9
    assert out[0, 4:8].tolist() == [IGNORE_INDEX] * 4 and out[0, 8].item() == 9
    assert out[0, :4].tolist() == labels[0, :4].tolist() and labels[0, 4].item() != IGNORE_INDEX


def test_head_loss_sends_gradients_into_the_decoder_and_the_queries(model, vocab):
    model.train()
    q = _queries(model, vocab)
    ids = _routed(vocab)
    routes = q.find(ids)
    out = model(ids, splice=q.splicer(routes), return_hidden=True)
    states = q.gather(out.hidden, routes)["<det>"]  # [1, K, D]
    assert states.shape == (1, K, model.config.dim)
    states.pow(2).mean().backward()  # a stand-in head loss
    assert q.queries["det"].grad.abs().sum() > 0
    assert model.layers[0].attention.wq.weight.grad.abs().sum() > 0
    assert model.tok_embeddings.weight.grad[5].abs().sum() > 0  # the text before <det>
    assert q.queries["gen"].grad is None  # no <gen> in the row


def test_gather_takes_each_routes_slots_in_route_order():
    """One gather for all routes (rows and positions mixed) equals indexing each route alone."""
    from omni.decoders.routing import Route

    hidden = torch.randn(3, 20, 8)
    routes = [Route(2, 3, "<det>", 4), Route(0, 10, "<det>", 4), Route(1, 0, "<gen>", 2), Route(0, 1, "<det>", 4)]
    q = SuperLinkQueries(8, {"<det>": 4, "<gen>": 2}, {"<det>": 1, "<gen>": 2, SLOT: 0})
    got = q.gather(hidden, routes)
    assert torch.equal(got["<det>"], torch.stack([hidden[r.row, r.slots] for r in routes if r.name == "<det>"]))
    assert torch.equal(got["<gen>"], hidden[1, 1:3][None])


def test_generation_step_feeds_the_queries_once_and_later_tokens_attend_to_them(model, vocab):
    q = _queries(model, vocab)
    ids = _routed(vocab)
    routes = q.find(ids)
    with torch.no_grad():
        full = model(ids, splice=q.splicer(routes), return_hidden=True)
        cache = model.new_cache()
        model(ids[:, :4], cache=cache)  # the prompt
        step_ids, step_routes = q.step_inputs("<det>")  # the model emitted <det>
        assert step_ids.tolist() == ids[:, 4:9].tolist()
        step = model(step_ids, splice=q.splicer(step_routes), cache=cache, return_hidden=True)
        nxt = model(ids[:, 9:], cache=cache)
        torch.testing.assert_close(step.hidden[:, 1:], q.gather(full.hidden, routes)["<det>"])
        torch.testing.assert_close(nxt.logits[:, -1], full.logits[:, -1])
        assert cache.length == ids.shape[1]
        # other query embeddings, same ids: the token after the slots sees the difference
        q.queries["det"].mul_(-1)
        other = model(ids, splice=q.splicer(routes))
    assert (other.logits[:, -1] - full.logits[:, -1]).abs().max() > 1e-4


def test_image_context_is_the_nearest_block_of_the_same_document(vocab):
    s = vocab.specials
    boi, eoi, det, pad = s["<boi>"], s["<eoi>"], s["<det>"], s[SLOT]
    codes = [1, 2, 3, 4]  # image_context reads only where the block opens and closes
    row = [7, boi, *codes, eoi, 8, boi, *codes, eoi, 9, det, *[pad] * K]
    ids = torch.tensor([row])
    q = SuperLinkQueries(8, {"<det>": K}, s)
    (route,) = q.find(ids)
    assert image_context(ids, route, boi, eoi) == slice(9, 13)  # the second block
    docs = torch.tensor([[0] * 8 + [1] * (len(row) - 8)])
    assert image_context(ids, route, boi, eoi, docs) == slice(9, 13)
    docs = torch.tensor([[0] * 14 + [1] * (len(row) - 14)])  # <det> in a document without an image
    with pytest.raises(OmniError, match="no image before it in its document"):
        image_context(ids, route, boi, eoi, docs)
    no_image = torch.tensor([[7, 8, det, *[pad] * K]])
    with pytest.raises(OmniError, match="no image before it"):
        image_context(no_image, q.find(no_image)[0], boi, eoi)
