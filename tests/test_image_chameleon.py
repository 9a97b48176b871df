"""Chameleon's VQGAN imported from a Hugging Face checkpoint gives exactly transformers' codes."""

from __future__ import annotations

import pytest
import torch

from omni.errors import OmniError

N_CODES = 64


def _vocabulary_map(n_text: int = 8) -> dict[str, int]:
    """A Chameleon-style vocabulary map: a few text pieces, then IMGIMG<code in letters>Z pieces."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 3}
    vocab.update({f"t{i}": 4 + i for i in range(n_text - 4)})
    for c in range(N_CODES):
        name = "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(c)) + "Z"
        vocab[name] = n_text + N_CODES - 1 - c  # reversed, so ids and codes differ
    return vocab


@pytest.fixture(scope="module")
def chameleon_dir(tmp_path_factory):
    """A tiny random ChameleonForConditionalGeneration saved with save_pretrained (safetensors)."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    torch.manual_seed(0)
    vq = dict(embed_dim=16, num_embeddings=N_CODES, latent_channels=32, resolution=32, base_channels=32,
              channel_multiplier=[1, 2, 2], num_res_blocks=1, attn_resolutions=[16], attn_type="vanilla")
    cfg = ChameleonConfig(vocab_size=8 + N_CODES, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, vq_config=vq,
                          vocabulary_map=_vocabulary_map())
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF's init (std 0.02) makes every code the same; use PyTorch's default init
        for m in model.model.vqmodel.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.GroupNorm)):
                m.reset_parameters()
        model.model.vqmodel.quantize.embedding.weight.normal_(0, 0.3)
    d = tmp_path_factory.mktemp("chameleon")
    model.save_pretrained(d)
    return d, model


def _photos(n: int = 6):
    from omni.toy.photos import photos, random_crops

    return random_crops(photos("all"), n, 32, seed=3)  # [n,3,32,32] in [0,1]


def test_codes_equal_transformers(chameleon_dir):
    from omni.chameleon import import_chameleon_vqgan, read_image_token_ids

    d, model = chameleon_dir
    with pytest.warns(UserWarning, match="no pixel decoder"):
        tok = import_chameleon_vqgan(d)
    assert tok.grid == (8, 8) and tok.codebook_size == N_CODES and tok.config.has_decoder is False

    x = _photos()
    with torch.no_grad():
        ours = tok.encode(x)  # [B,8,8]
        pixel_values = x * 2 - 1  # Chameleon's normalization of [0,1] images
        theirs = model.model.vqmodel.encode(pixel_values, return_dict=True).image_tokens  # raw indices [B*64]
        bpe = model.model.get_image_tokens(pixel_values)  # [B,64] after the vocabulary map
    assert torch.equal(ours.reshape(-1), theirs.long())
    assert ours.unique().numel() > 8  # a real comparison, not a constant code
    # get_image_tokens = vocabulary map applied to the raw codes, row-major
    table = torch.tensor(read_image_token_ids(d))
    assert torch.equal(table[ours.reshape(len(x), -1)], bpe.long())
    assert not torch.equal(ours.reshape(len(x), -1), bpe.long())


def test_import_encodes_through_the_bundle_and_refuses_decode(chameleon_dir, text_tokenizer):
    from omni.bundle import UnifiedTokenizer
    from omni.chameleon import import_chameleon_vqgan
    from omni.document import Document, Image

    d, _ = chameleon_dir
    with pytest.warns(UserWarning):
        tok = import_chameleon_vqgan(d)
    bundle = UnifiedTokenizer.build(text_tokenizer, tok)
    ids = bundle.encode(Document([Image(torch.rand(3, 50, 40))]))
    assert len(ids) == 1 + 1 + 64 + 1  # <bos> <boi> 8x8 codes <eoi>
    with pytest.raises(OmniError, match="no pixel decoder"):
        tok.decode(torch.zeros(1, 8, 8, dtype=torch.long))


def test_import_errors_name_the_problem(tmp_path):
    from omni.chameleon import import_chameleon_vqgan

    with pytest.raises(OmniError, match="not found"):
        import_chameleon_vqgan(tmp_path / "missing")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(OmniError, match="no vq_config"):
        import_chameleon_vqgan(tmp_path)
