"""Chameleon import: a small random Hugging Face Chameleon and its omni conversion compute the same logits.

transformers' ChameleonForConditionalGeneration sets the logits of every image-code id
(IMGIMG...Z tokens) to the dtype's minimum in its forward, since the released weights do not
generate images; omni's decoder does not mask them. The comparison is therefore over all other
ids, which is every column the Hugging Face model actually computes.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers  # noqa: E402,F401  - the `hf` extra; `make test` installs it, so this never skips

import omni  # noqa: E402
from conftest import run_cli
from omni.chameleon import chameleon_vocab, convert_decoder, image_code_of  # noqa: E402
from omni.errors import OmniError  # noqa: E402

V, N_IMAGE = 256, 64


pytestmark = pytest.mark.usefixtures("one_thread")


def image_token(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"


def vocabulary_map(n_reserved: int = 6, seed: int = 0) -> dict[str, int]:
    """Chameleon-like: <s>/<pad>/</s>/<unk> first, image tokens scattered, a few reserved tokens."""
    rng = random.Random(seed)
    names = {0: "<s>", 1: "<pad>", 2: "</s>", 3: "<unk>"}
    free = list(range(4, V))
    rng.shuffle(free)
    for c in range(N_IMAGE):
        names[free.pop()] = image_token(c)
    for name in ["<racm3:break>", "<eoss>", "<image>"] + [f"<reserved{8700 + r:05d}>" for r in range(n_reserved)]:
        names[free.pop()] = name
    for i in free:
        names[i] = f"t{i}"
    return {n: i for i, n in names.items()}


def build_hf(path, swin_norm: bool, n_reserved: int = 6, tokenizer_json: bool = False):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vmap = vocabulary_map(n_reserved)
    cfg = ChameleonConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,  # GQA
        swin_norm=swin_norm, vocabulary_map=vmap, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, max_position_embeddings=128,
        vq_config=dict(embed_dim=8, num_embeddings=N_IMAGE, latent_channels=8, resolution=32, base_channels=32,
                       channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[]),
    )
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random norm weights and biases, so every one of them matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    if tokenizer_json:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel(vocab=vmap, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        tok.save(str(path / "tokenizer.json"))
    return model


def compare(hf_model, omni_model, ids):
    keep = torch.ones(V, dtype=torch.bool)
    keep[hf_model.model.vocabulary_mapping.image_tokens] = False  # masked by transformers (see above)
    with torch.no_grad():
        a = hf_model(ids).logits[..., keep]
        b = omni_model(ids).logits[..., :V][..., keep]
    assert a.abs().max() > 0.1  # not a degenerate comparison
    return (a - b).abs().max().item()


@pytest.mark.parametrize("swin_norm", [False, True])
def test_logits_match_transformers(tmp_path, swin_norm):
    hf = build_hf(tmp_path, swin_norm)
    model, _, vocab, appended = convert_decoder(tmp_path)
    assert appended == 0 and model.config.swin_norm == swin_norm and model.config.n_kv_heads == 2
    ids = torch.randint(0, V, (2, 24))
    assert compare(hf, model, ids) <= 1e-4
    with torch.no_grad():  # and a weight that matters changes it: the test can fail
        model.layers[1].attention.k_norm.bias.add_(0.05)
    assert compare(hf, model, ids) > 1e-4


def test_vocab_keeps_chameleon_ids(tmp_path):
    vmap = vocabulary_map()
    assert image_code_of("IMGIMGBCZ") == 12 and image_code_of("IMGIMGAZ") == 0
    with pytest.raises(OmniError, match="not a Chameleon image token"):
        image_code_of("IMGIMGxZ")
    vocab, appended = chameleon_vocab({"vocab_size": V, "vocabulary_map": vmap, "bos_token_id": 0,
                                       "eos_token_id": 2, "pad_token_id": 1})
    assert appended == 0 and vocab.size == V
    assert vocab.image_ids == [vmap[image_token(c)] for c in range(N_IMAGE)]
    sp = vocab.specials
    assert (sp["<bos>"], sp["<eos>"], sp["<pad>"]) == (0, 2, 1)
    assert (sp["<boi>"], sp["<eoi>"]) == (vmap["<racm3:break>"], vmap["<eoss>"])
    # the specials Chameleon lacks take its reserved tokens, lowest number first
    assert [sp[k] for k in ("<boa>", "<eoa>", "<det>", "<gen>")] == [vmap[f"<reserved{8700 + r:05d}>"] for r in range(4)]
    codes = torch.tensor([0, 7, 63])
    assert vocab.id_to_code(vocab.image_code_to_id(codes)).tolist() == codes.tolist()


def test_too_few_reserved_tokens_appends_ids(tmp_path):
    hf = build_hf(tmp_path, swin_norm=False, n_reserved=1)
    model, _, vocab, appended = convert_decoder(tmp_path)
    assert appended == 3 and vocab.size == 384 and model.config.vocab_size == 384
    assert [vocab.specials[k] for k in ("<eoa>", "<det>", "<gen>")] == [256, 257, 258]
    assert compare(hf, model, torch.randint(0, V, (1, 16))) <= 1e-4  # the old ids are unaffected


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:imported Chameleon's VQGAN")
def test_convert_cli_end_to_end(tmp_path):
    hf = build_hf(tmp_path / "hf", swin_norm=True, tokenizer_json=True)
    rc, out, err = run_cli("convert", "chameleon", "--hf", tmp_path / "hf", "--out", tmp_path / "ckpt")
    assert rc == 0, err
    model, tok = omni.load(tmp_path / "ckpt")
    assert tok.text.kind == "hf-tokenizers" and tok.vocab.specials["<boi>"] == hf.config.vocabulary_map["<racm3:break>"]
    ids = tok.encode("t10 t11 t200")  # Chameleon's own ids, after <s>
    assert ids.tolist() == [0, 10, 11, 200] and tok.decode(ids).text == "t10 t11 t200"
    assert compare(hf, model, torch.randint(0, V, (1, 16))) <= 1e-4
    # the image half: codes land on Chameleon's IMGIMG ids, inside <racm3:break> ... <eoss>
    assert tok.image.codebook_size == N_IMAGE and tok.vocab.image_grid == tuple(tok.image.grid)
    h, w = tok.image.grid
    ids = tok.encode(omni.Document([omni.Image(torch.rand(3, *tok.image.image_size))]), bos=False)
    vmap = hf.config.vocabulary_map
    assert ids[0] == vmap["<racm3:break>"] and ids[-1] == vmap["<eoss>"] and len(ids) == h * w + 2
    assert set(ids[1:-1].tolist()) <= {vmap[image_token(c)] for c in range(N_IMAGE)}
    rc, out, err = run_cli("convert", "chameleon", "--hf", tmp_path / "hf", "--out", tmp_path / "ckpt")
    assert rc == 2 and "already exists; pass --force" in err

    (tmp_path / "hf" / "tokenizer.json").unlink()  # without tokenizer.json: no text side, said so
    rc, out, err = run_cli("convert", "chameleon", "--hf", tmp_path / "hf", "--out", tmp_path / "ckpt", "--force")
    assert rc == 0, err
    _, tok = omni.load(tmp_path / "ckpt")
    with pytest.raises(OmniError, match="without a tokenizer.json, so it has no text tokenizer"):
        tok.encode("hello")


def test_convert_cli_errors(tmp_path):
    rc, _, err = run_cli("convert", "chameleon", "--hf", tmp_path / "none", "--out", tmp_path / "o")
    assert rc == 2 and "Hugging Face checkpoint folder not found" in err
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rc, _, err = run_cli("convert", "chameleon", "--hf", tmp_path / "llama", "--out", tmp_path / "o")
    assert rc == 2 and "model_type is 'llama', expected 'chameleon'" in err
