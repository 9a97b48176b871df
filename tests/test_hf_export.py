"""`omni convert to-hf`: an omni checkpoint loads in transformers' ChameleonForConditionalGeneration and
computes omni's logits; what does not map is refused; an imported Chameleon comes back as it was.

transformers' ChameleonForConditionalGeneration sets the logits of every image-code id to the
dtype's minimum in its forward (see tests/test_chameleon_parity.py); the full comparison therefore
runs through ``lm_head(model.model(ids).last_hidden_state)``, and the masked forward is compared on
every other id.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers  # noqa: F401  - the `hf` extra; `make test` installs it, so this never skips

import omni
from conftest import run_cli
from omni.chameleon_export import image_token, unmappable
from omni.checkpoint import save_checkpoint
from omni.config.model import ModelConfig
from omni.model import OmniDecoder

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


def omni_checkpoint(path, config, tokenizer, seed: int = 0):
    """A random-init tiny decoder with random norm weights and biases (so each one matters), saved."""
    torch.manual_seed(seed)
    model = OmniDecoder(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    save_checkpoint(path, model, config, tokenizer)
    return path


def mixed_ids(tok) -> torch.Tensor:
    """[1, T]: <bos> text, an image block, an audio block, <eos>: every kind of id the vocabulary has."""
    v = tok.vocab
    g = torch.Generator().manual_seed(1)
    h, w = v.image_grid
    image = v.block("image", torch.randint(0, v.image_codes, (h * w,), generator=g))
    audio = v.block("audio", torch.randint(0, v.audio_codes, (6,), generator=g))
    ids = torch.cat([tok.encode("Return the value of x, or None."), torch.tensor(image),
                     torch.tensor(audio), torch.tensor([v.special("<eos>"), v.special("<gen>")])])
    assert {int(m) for m in v.modality_table[ids]} == {0, 1, 2, 3}  # text, special, image, audio
    return ids[None]


def load_hf(path):
    from transformers import ChameleonForConditionalGeneration

    model, info = ChameleonForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def raw_logits(hf, ids) -> torch.Tensor:
    return hf.lm_head(hf.model(ids).last_hidden_state)


@pytest.mark.parametrize("variant", ["chameleon", "shared_qk_tied_swin"])
def test_logits_match_transformers(tmp_path, tokenizer, tiny_model_config, variant):
    cfg = dataclasses.replace(tiny_model_config, rope_theta=5000.0)  # not transformers' default
    if variant != "chameleon":  # a shared QK-norm is Chameleon's per-head one with equal rows
        cfg = dataclasses.replace(cfg, qk_norm="shared", tie_embeddings=True, swin_norm=True, dropout=0.1)
    omni_checkpoint(tmp_path / "ckpt", cfg, tokenizer)
    rc, out, err = run_cli("convert", "to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf")
    assert rc == 0, err
    assert "all-zero placeholder" in out and "'test-mean-color' tokenizer, not 'vq-image'" in out
    assert ("dropout=0.1" in out) == (variant != "chameleon")

    hf = load_hf(tmp_path / "hf")
    model, tok = omni.load(tmp_path / "ckpt")
    v = tok.vocab
    assert hf.config.vocab_size == v.size == 640 and hf.config.swin_norm == cfg.swin_norm
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == cfg.tie_embeddings
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == (v.special("<bos>"), v.special("<eos>"))
    # transformers finds the image ids and their codes through vocabulary_map's IMGIMG...Z names
    mapping = hf.model.vocabulary_mapping
    codes = torch.arange(v.image_codes)
    assert sorted(mapping.image_tokens) == sorted(v.image_code_to_id(codes).tolist())
    assert mapping.img2bpe_mapping_tensor.tolist() == v.image_code_to_id(codes).tolist()

    ids = mixed_ids(tok)
    with torch.no_grad():
        ours = model(ids).logits
        theirs = raw_logits(hf, ids)
        masked = hf(ids).logits
    assert ours.abs().max() > 0.1  # not a degenerate comparison
    assert (ours - theirs).abs().max().item() <= TOL
    image = torch.zeros(v.size, dtype=torch.bool)
    image[mapping.image_tokens] = True
    assert (ours[..., ~image] - masked[..., ~image]).abs().max().item() <= TOL
    assert bool((masked[..., image] == torch.finfo(masked.dtype).min).all())
    with torch.no_grad():  # and a weight that matters changes it: the comparison can fail
        model.layers[1].attention.k_norm.bias.add_(0.05)
        assert (model(ids).logits - theirs).abs().max().item() > TOL


def test_text_tokenizer_loads_in_transformers_with_omni_ids(tmp_path, tokenizer, tiny_model_config, corpus_file):
    from transformers import AutoTokenizer

    omni_checkpoint(tmp_path / "ckpt", tiny_model_config, tokenizer)
    rc, out, err = run_cli("convert", "to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf")
    assert rc == 0, err
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    v = tokenizer.vocab
    assert len(hf_tok) == v.size and hf_tok.bos_token_id == v.special("<bos>")
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (v.special("<eos>"), v.special("<pad>"))
    lines = corpus_file.read_text(encoding="utf-8").splitlines()[:400]
    for text in lines + ["  two  spaces\tand a tab ", "digits 1234567890", "accents é ü 日本", ""]:
        ids = tokenizer.encode(text).tolist()  # <bos> + text ids
        assert hf_tok(text).input_ids == ids, text
        assert hf_tok.decode(ids, skip_special_tokens=True) == text
    assert hf_tok.convert_ids_to_tokens(v.image_code_to_id(torch.tensor([12])).tolist()) == [image_token(12)]


def test_chameleon_style_vq_tokenizer_is_exported_for_transformers_image_path(
        tmp_path, text_tokenizer, tiny_model_config):
    """A native omni VQ tokenizer built like Chameleon's VQGAN (nearest codebook, 32-group norms):
    transformers' get_image_tokens gives omni's codes, as ids; the pixel decoder stays in omni."""
    from omni.bundle import UnifiedTokenizer
    from omni.config.image_tokenizer import ImageTokenizerConfig
    from omni.tokenizers.image import VQImageTokenizer

    torch.manual_seed(0)
    image = VQImageTokenizer(ImageTokenizerConfig(
        image_size=16, base_channels=32, channel_multiplier=[1, 2], norm_groups=32, latent_channels=8,
        embed_dim=8, quantizer="nearest", codebook_size=64, attn_resolutions=[16])).eval()
    with torch.no_grad():  # spread the codebook so that random images use many codes
        image.quantize.embedding.weight.normal_(0, 0.3)
    tok = UnifiedTokenizer.build(text_tokenizer, image)
    assert tok.vocab.size == tiny_model_config.vocab_size
    omni_checkpoint(tmp_path / "ckpt", tiny_model_config, tok)
    rc, out, err = run_cli("convert", "to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf")
    assert rc == 0, err
    assert "Chameleon's VQGAN encoder and codebook" in out and "pixel decoder is not exported" in out
    hf = load_hf(tmp_path / "hf")
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        codes = image.encode(x)  # [3, 8, 8]
        theirs = hf.model.get_image_tokens(x * 2 - 1)  # [3, 64] ids
    assert codes.unique().numel() > 4
    assert torch.equal(theirs.long(), tok.vocab.image_code_to_id(codes.reshape(3, -1)))


def test_what_does_not_map_is_listed_and_nothing_written(tmp_path, tokenizer, tiny_model_config):
    cfg = dataclasses.replace(tiny_model_config, qk_norm_type="rmsnorm", qk_norm_eps=1e-6)
    omni_checkpoint(tmp_path / "ckpt", cfg, tokenizer)
    rc, out, err = run_cli("convert", "to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf")
    assert rc == 2 and "does not map onto transformers' ChameleonForConditionalGeneration" in err
    assert "qk_norm_type='rmsnorm'" in err and "mappable: 'layernorm'" in err
    assert "qk_norm_eps=1e-06" in err and "hard-codes eps=1e-05" in err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))

    assert unmappable(tiny_model_config) == []
    none = unmappable(dataclasses.replace(tiny_model_config, qk_norm="none"))
    assert len(none) == 1 and "qk_norm='none'" in none[0]

    @dataclasses.dataclass
    class Later(ModelConfig):  # a field added to ModelConfig after this exporter was written
        norm_type: str = "rmsnorm"

    assert unmappable(Later()) == []  # at its default: the network is unchanged
    later = unmappable(Later(norm_type="layernorm", qk_norm="none"))
    assert len(later) == 2 and "norm_type='layernorm'" in later[1] and "does not know" in later[1]


@pytest.mark.filterwarnings("ignore:imported Chameleon's VQGAN")
def test_imported_chameleon_round_trips_to_its_own_weights(tmp_path):
    from safetensors.torch import load_file
    from test_chameleon_parity import build_hf

    (tmp_path / "hf").mkdir()
    build_hf(tmp_path / "hf", swin_norm=True, tokenizer_json=True)
    rc, _, err = run_cli("convert", "chameleon", "--hf", tmp_path / "hf", "--out", tmp_path / "ckpt")
    assert rc == 0, err
    rc, out, err = run_cli("convert", "to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "back")
    assert rc == 0, err
    assert "Chameleon's VQGAN encoder and codebook" in out and "post_quant_conv (unused by transformers) is zeros" in out

    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(before) == set(after)
    differ = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert differ == ["model.vqmodel.post_quant_conv.weight"]  # the import does not keep it (no decoder)
    a = json.loads((tmp_path / "hf" / "config.json").read_text())
    b = json.loads((tmp_path / "back" / "config.json").read_text())
    assert b["vocabulary_map"] == a["vocabulary_map"] and b["image_token_id"] == a["image_token_id"]
    assert sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) == ["omni_export", "rope_theta",
                                                                          "transformers_version"]
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    hf = load_hf(tmp_path / "back")
    assert hf.config.rope_parameters["rope_theta"] == 5000.0 and hf.config.swin_norm


def test_out_exists_or_checkpoint_missing(tmp_path, tokenizer, tiny_model_config):
    rc, _, err = run_cli("convert", "to-hf", "--checkpoint", tmp_path / "none", "--out", tmp_path / "hf")
    assert rc == 2 and "checkpoint directory not found" in err
    omni_checkpoint(tmp_path / "ckpt", tiny_model_config, tokenizer)
    (tmp_path / "hf").mkdir()
    rc, _, err = run_cli("convert", "to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf")
    assert rc == 2 and "already exists; pass --force" in err
    rc, _, err = run_cli("convert", "to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "ckpt", "--force")
    assert rc == 2 and "is the checkpoint itself" in err
    rc, out, err = run_cli("convert", "to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf", "--force")
    assert rc == 0 and (tmp_path / "hf" / "model.safetensors").is_file(), err
