"""Import a Hugging Face Chameleon checkpoint (ChameleonForConditionalGeneration) as an omni checkpoint.

Chameleon Team, "Chameleon: Mixed-Modal Early-Fusion Foundation Models", 2024
(https://arxiv.org/abs/2405.09818); the Hugging Face port is transformers.models.chameleon.
Only safetensors and config.json are read; transformers is not needed.

Two halves, one module: the decoder and its vocabulary (:func:`convert_decoder`), and the image
tokenizer (:func:`import_chameleon_vqgan`); :func:`convert_chameleon` (``omni convert chameleon``)
joins them with the text tokenizer into a checkpoint folder.

The decoder half:

* Decoder: the weights are copied verbatim under omni's names (see :data:`HF_TO_OMNI`); the
  network is the same function (tests/test_chameleon_parity.py). ``model.vqmodel.*`` is the
  image tokenizer's half.
* Ids: the bundle keeps Chameleon's ids. Its text range is the whole BPE vocabulary, inside which
  8192 ``IMGIMG...Z`` tokens stand for the VQ codes: code i <-> the token "IMGIMG" + each decimal
  digit of i written as a letter (0->A ... 9->J) + "Z" (ChameleonImageVocabularyMapping). The
  config's ``vocabulary_map`` gives their ids, in any order; the bundle stores the code -> id
  table explicitly (UnifiedVocab.image_ids).
* Specials that Chameleon has keep its ids: <bos> = bos_token_id ("<s>"), <eos> = eos_token_id
  ("</s>"), <pad> = pad_token_id or "<pad>", <boi> = "<racm3:break>", <eoi> = "<eoss>" (the
  processor's image start/end tokens).
* The specials Chameleon lacks (<boa>, <eoa>, <det>, <gen>) take Chameleon's reserved tokens
  ``<reservedNNNNN>``, lowest number first; if there are too few, they get new ids after the
  vocabulary, which is then padded to a multiple of 128 with new embedding / head rows set to the
  mean of the existing rows (so the converted model's logits on old ids are unchanged).
* Text: with a tokenizer.json in the Hugging Face folder the bundle's text tokenizer is it
  (kind ``hf-tokenizers``); without one the bundle has no text tokenizer and says so when asked to
  encode text.

The image half (:func:`import_chameleon_vqgan`, into :class:`~omni.tokenizers.image.VQImageTokenizer`):

Chameleon tokenizes a 512x512 image into 32x32 = 1024 codes of an 8192-code book with the
Make-a-Scene VQGAN (https://arxiv.org/abs/2203.13131). transformers ports it as
``ChameleonVQVAE`` (``model.vqmodel`` inside ``ChameleonForConditionalGeneration``): the encoder,
``quant_conv`` and the codebook, but **no pixel decoder**. The import therefore builds a tokenizer
with ``has_decoder=False``: it encodes (codes equal transformers' raw ``image_tokens`` exactly), and
its ``decode`` says why it cannot.

Codes there are the raw codebook indices. Chameleon's language model sees them through its
vocabulary map (``ChameleonImageVocabularyMapping.convert_img2bpe``: code -> the id of the BPE
piece ``IMGIMG<code in letters>Z``); :func:`read_image_token_ids` reads that table, for a
vocabulary that keeps Chameleon's own ids.

Pixels: our tokenizers take [0,1]; the model sees ``x*2-1``, the original Chameleon's
normalization (``img / 255 * 2 - 1``). transformers' ``ChameleonImageProcessor`` rescales by
0.0078 instead of 1/127.5, so its pixel values differ from these in the third decimal.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from omni.errors import OmniError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from omni.config.image_tokenizer import ImageTokenizerConfig
    from omni.config.model import ModelConfig
    from omni.tokenizers.image import VQImageTokenizer

# Hugging Face name (per layer, after "model.layers.{i}.") -> omni name (after "layers.{i}.").
HF_TO_OMNI = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "self_attn.q_norm.weight": "attention.q_norm.weight",
    "self_attn.q_norm.bias": "attention.q_norm.bias",
    "self_attn.k_norm.weight": "attention.k_norm.weight",
    "self_attn.k_norm.bias": "attention.k_norm.bias",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
          "lm_head.weight": "output.weight"}

IMAGE_TOKEN_PREFIX = "IMGIMG"
BOI_NAME, EOI_NAME = "<racm3:break>", "<eoss>"
EXTRA_SPECIALS = ("<boa>", "<eoa>", "<det>", "<gen>")
"""omni specials Chameleon has no token for: placed on its reserved tokens, else appended."""
_RESERVED = re.compile(r"^<reserved(\d+)>$")


def image_code_of(name: str) -> int:
    """'IMGIMGBCZ' -> 12: the letters between the prefix and the final 'Z' are digits A=0 .. J=9."""
    body = name[len(IMAGE_TOKEN_PREFIX):-1]
    if not name.startswith(IMAGE_TOKEN_PREFIX) or not name.endswith("Z") or not body \
            or any(not "A" <= c <= "J" for c in body):
        raise OmniError(f"{name!r} is not a Chameleon image token (IMGIMG + letters A-J + Z)")
    return int("".join(str(ord(c) - ord("A")) for c in body))


def chameleon_model_config(hf: dict) -> ModelConfig:
    """ModelConfig of the decoder described by a Hugging Face ChameleonConfig dict (config.json)."""
    from omni.config.model import ModelConfig

    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or (hf.get("rope_scaling") or {}).get("rope_type", "default") != "default":
        raise OmniError(f"Chameleon config uses RoPE scaling {rope or hf.get('rope_scaling')}; only plain RoPE is imported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise OmniError("Chameleon config has attention_bias/mlp_bias set; omni's decoder has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise OmniError(f"Chameleon config hidden_act={hf.get('hidden_act')!r}; omni's SwiGLU uses 'silu'")
    return ModelConfig(
        vocab_size=int(hf.get("vocab_size", 65536)),
        dim=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=int(hf["num_attention_heads"]),
        n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        ffn_dim=int(hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        qk_norm="per_head",
        qk_norm_type="layernorm",
        qk_norm_eps=1e-5,  # ChameleonLayerNorm hard-codes eps=1e-5
        swin_norm=bool(hf.get("swin_norm", False)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_dropout=float(hf.get("attention_dropout") or 0.0),
        z_loss=1e-5,
    )


def convert_state_dict(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face Chameleon weights -> OmniDecoder weights (same tensors, omni names).

    ``model.vqmodel.*`` (the image tokenizer) is left out; anything else unknown is an error.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, t in hf_state.items():
        if name.startswith("model.vqmodel."):
            continue
        if name in HF_TOP:
            out[HF_TOP[name]] = t
            continue
        m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
        if m and m.group(2) in HF_TO_OMNI:
            out[f"layers.{m.group(1)}.{HF_TO_OMNI[m.group(2)]}"] = t
        else:
            unknown.append(name)
    if unknown:
        raise OmniError(f"unknown Chameleon weights {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if config.tie_embeddings:
        out.pop("output.weight", None)
    return out


def chameleon_vocab(hf: dict, text_size: int | None = None, image_grid: tuple[int, int] | None = None):
    """The UnifiedVocab keeping Chameleon's ids (rules in the module docstring).

    Returns ``(vocab, n_appended)``: ``n_appended`` > 0 when the vocab grew past ``vocab_size``.
    """
    from omni.vocab import PAD_MULTIPLE, UnifiedVocab

    vmap = hf.get("vocabulary_map")
    if not vmap:
        raise OmniError("Chameleon config.json has no vocabulary_map: cannot place image codes and specials")
    vocab_size = int(hf.get("vocab_size", 65536))
    images = {}
    for name, i in vmap.items():
        if name.startswith(IMAGE_TOKEN_PREFIX):
            images[image_code_of(name)] = int(i)
    n_codes = len(images)
    if sorted(images) != list(range(n_codes)):
        missing = sorted(set(range(max(images, default=-1) + 1)) - set(images))
        raise OmniError(f"Chameleon vocabulary_map lacks image codes {missing[:10]}: codes must be 0..N-1")

    def named(name: str, config_key: str | None = None) -> int | None:
        if config_key and hf.get(config_key) is not None:
            return int(hf[config_key])
        return int(vmap[name]) if name in vmap else None

    specials = {"<bos>": named("<s>", "bos_token_id"), "<eos>": named("</s>", "eos_token_id"),
                "<pad>": named("<pad>", "pad_token_id"), "<boi>": named(BOI_NAME), "<eoi>": named(EOI_NAME)}
    lacking = [k for k, v in specials.items() if v is None and k != "<pad>"]
    if lacking:
        raise OmniError(f"Chameleon vocabulary_map lacks the tokens for {lacking} "
                        f"(expected <s>, </s>, {BOI_NAME}, {EOI_NAME})")
    wanted = [k for k, v in specials.items() if v is None] + list(EXTRA_SPECIALS)
    used = set(v for v in specials.values() if v is not None) | set(images.values())
    reserved = sorted((int(_RESERVED.match(n).group(1)), int(i)) for n, i in vmap.items()
                      if _RESERVED.match(n) and int(i) not in used)
    size = vocab_size
    n_appended = 0
    for name in wanted:
        if reserved:
            specials[name] = reserved.pop(0)[1]
        else:
            specials[name] = vocab_size + n_appended
            n_appended += 1
    if n_appended:
        size = -(-(vocab_size + n_appended) // PAD_MULTIPLE) * PAD_MULTIPLE
    vocab = UnifiedVocab(
        size=size,
        text_size=vocab_size if text_size is None else text_size,
        specials=specials,
        image_codes=n_codes,
        image_ids=[images[c] for c in range(n_codes)],
        image_grid=image_grid,
    )
    return vocab, n_appended


def _grow_vocab(state: dict, size: int) -> dict:
    """New embedding / head rows up to ``size``, set to the mean of the existing rows."""
    import torch

    for key in ("tok_embeddings.weight", "output.weight"):
        if key in state and state[key].shape[0] < size:
            w = state[key]
            extra = w.mean(0, keepdim=True).expand(size - w.shape[0], -1)
            state[key] = torch.cat([w, extra], 0)
    return state


def read_hf_checkpoint(hf_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, all tensors) of a Hugging Face folder (single or sharded safetensors)."""
    from safetensors.torch import load_file

    d = Path(hf_dir)
    if not d.is_dir():
        raise OmniError(f"Hugging Face checkpoint folder not found: {d}")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise OmniError(f"{d} holds no config.json: not a Hugging Face checkpoint")
    hf = json.loads(cfg_path.read_text())
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "chameleon":
        raise OmniError(f"{cfg_path}: model_type is {hf.get('model_type')!r}, expected 'chameleon' ({archs})")
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else [p.name for p in sorted(d.glob("*.safetensors"))]
    if not files:
        raise OmniError(f"{d} holds no .safetensors weights (pytorch .bin files are not read: convert them to safetensors)")
    state: dict = {}
    for f in files:
        state.update(load_file(str(d / f)))
    return hf, state


# The image half: Chameleon's VQGAN as an encode-only VQImageTokenizer.

PREFIXES = ("model.vqmodel.", "vqmodel.")
"""Where ``ChameleonVQVAE``'s weights sit in a checkpoint of ``ChameleonForConditionalGeneration`` / ``ChameleonModel``."""


def _read_config(d: Path) -> dict:
    path = d / "config.json"
    if not path.is_file():
        raise OmniError(f"{d} is not a Hugging Face checkpoint folder: config.json is missing")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OmniError(f"{path} is not valid JSON: {e}") from None
    if "vq_config" not in cfg:
        raise OmniError(f"{path} has no vq_config: not a Chameleon checkpoint (model_type={cfg.get('model_type')!r})")
    return cfg


def tokenizer_config_from_hf(vq: dict) -> ImageTokenizerConfig:
    """transformers' ``ChameleonVQVAEConfig`` (as a dict) -> our config for the same encoder."""
    from omni.config.image_tokenizer import ImageTokenizerConfig

    if vq.get("in_channels", 3) != 3:
        raise OmniError(f"vq_config.in_channels={vq['in_channels']}: only RGB (3) encoders are supported")
    if vq.get("double_latent", False):
        raise OmniError("vq_config.double_latent=true is not supported (transformers' ChameleonVQVAE cannot run it either)")
    vanilla = vq.get("attn_type", "vanilla") == "vanilla"
    return ImageTokenizerConfig(
        image_size=int(vq.get("resolution", 512)),
        base_channels=int(vq.get("base_channels", 128)),
        channel_multiplier=list(vq.get("channel_multiplier", [1, 1, 2, 2, 4])),
        num_res_blocks=int(vq.get("num_res_blocks", 2)),
        attn_resolutions=list(vq.get("attn_resolutions") or []) if vanilla else [],
        mid_attention=vanilla,
        latent_channels=int(vq.get("latent_channels", 256)),
        embed_dim=int(vq.get("embed_dim", 256)),
        norm_groups=32,  # ChameleonVQVAE's GroupNorms are hard-wired to 32 groups
        dropout=float(vq.get("dropout", 0.0)),
        quantizer="nearest",
        codebook_size=int(vq.get("num_embeddings", 8192)),
        commitment_weight=float(vq.get("beta", 0.25)),
        has_decoder=False,
    )


def _read_vq_weights(d: Path) -> dict:
    """The ``vqmodel`` tensors of a (possibly sharded) safetensors checkpoint, prefix removed."""
    from safetensors import safe_open

    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise OmniError(f"{d} has no model.safetensors (or its index): save the model with "
                        f"save_pretrained(..., safe_serialization=True); pickled weights are not read")
    state = {}
    for name in files:
        with safe_open(str(d / name), framework="pt") as f:
            for key in f.keys():
                for prefix in PREFIXES:
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = f.get_tensor(key)
                        break
    if not state:
        raise OmniError(f"{d}'s weights hold no {PREFIXES[0]}* tensors: not a Chameleon checkpoint with an image tokenizer")
    return state


def import_chameleon_vqgan(hf_dir: str | os.PathLike) -> VQImageTokenizer:
    """Chameleon's VQGAN encoder and codebook from a ``save_pretrained`` folder of
    ``ChameleonForConditionalGeneration`` -> an encode-only :class:`VQImageTokenizer` (eval mode)."""
    from omni.tokenizers.image import VQImageTokenizer

    d = Path(hf_dir)
    if not d.is_dir():
        raise OmniError(f"Chameleon checkpoint folder not found: {d}")
    cfg = tokenizer_config_from_hf(_read_config(d)["vq_config"])
    tok = VQImageTokenizer(cfg)
    state = _read_vq_weights(d)
    # transformers keeps post_quant_conv (decoder side) without a decoder; we have neither.
    state = {k: v for k, v in state.items() if not k.startswith("post_quant_conv.")}
    missing, unexpected = tok.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise OmniError(f"Chameleon's vqmodel weights in {d} do not match its vq_config: "
                        f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    warnings.warn(f"imported Chameleon's VQGAN from {d}: {tok}. transformers' port has no pixel decoder, "
                  f"so this tokenizer encodes images but cannot decode codes", UserWarning, stacklevel=2)
    return tok.eval()


def read_image_token_ids(hf_dir: str | os.PathLike) -> list[int]:
    """Chameleon's vocabulary map: ``ids[c]`` is the language-model id of image code ``c``."""
    d = Path(hf_dir)
    vocab_map = _read_config(d).get("vocabulary_map") or {}
    digits = {chr(ord("A") + i): str(i) for i in range(10)}
    table = {}
    for name, tok_id in vocab_map.items():
        if name.startswith(IMAGE_TOKEN_PREFIX):
            table[int("".join(digits.get(c, c) for c in name[len(IMAGE_TOKEN_PREFIX):-1]))] = int(tok_id)
    if not table:
        raise OmniError(f"{d / 'config.json'} has no vocabulary_map with IMGIMG* image tokens")
    n = max(table) + 1
    if sorted(table) != list(range(n)):
        raise OmniError(f"{d / 'config.json'}: the IMGIMG* tokens do not cover codes 0..{n - 1}")
    return [table[c] for c in range(n)]


# The two halves joined.

def convert_decoder(hf_dir: str | os.PathLike):
    """The lower half: ``(OmniDecoder with Chameleon's weights, hf config dict, vocab, n_appended)``.

    Without the image and text tokenizers; :func:`convert_chameleon` adds those and saves.
    """
    import torch

    from omni.model import OmniDecoder

    hf, hf_state = read_hf_checkpoint(hf_dir)
    cfg = chameleon_model_config(hf)
    vocab, n_appended = chameleon_vocab(hf)
    state = convert_state_dict(hf_state, cfg)
    if n_appended:
        import dataclasses

        cfg = dataclasses.replace(cfg, vocab_size=vocab.size)
        state = _grow_vocab(state, vocab.size)
    with torch.device("meta"):
        model = OmniDecoder(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers()  # the RoPE table
    return model.eval(), hf, vocab, n_appended


def convert_chameleon(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """``omni convert chameleon``: a Hugging Face Chameleon folder -> an omni checkpoint folder."""
    import dataclasses

    from omni.bundle import UnifiedTokenizer
    from omni.checkpoint import save_checkpoint

    model, hf, vocab, n_appended = convert_decoder(hf_dir)
    image = import_chameleon_vqgan(hf_dir)  # the image half (VQ-GAN)
    text, reason = None, None
    tj = Path(hf_dir) / "tokenizer.json"
    if tj.is_file():
        from omni.tokenizers.text_hf import HFTextTokenizer

        text = HFTextTokenizer.from_file(tj)
        if text.vocab_size > int(hf.get("vocab_size", 65536)):
            raise OmniError(f"{tj} has {text.vocab_size} tokens, more than the model's vocab_size {hf.get('vocab_size')}")
    else:
        reason = (f"this bundle was converted from the Chameleon checkpoint {hf_dir} without a tokenizer.json, "
                  "so it has no text tokenizer and cannot encode or decode text; convert a folder holding "
                  "tokenizer.json to get one")
    vocab = dataclasses.replace(vocab, text_size=text.vocab_size if text is not None else vocab.text_size,
                                image_grid=tuple(image.grid))
    tok = UnifiedTokenizer(vocab, text=text, image=image, text_missing_reason=reason)
    return save_checkpoint(out_dir, model, model.config, tok,
                           extra_meta={"converted_from": "chameleon", "appended_specials": n_appended})
