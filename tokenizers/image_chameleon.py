"""Import Chameleon's image tokenizer from a Hugging Face checkpoint into :class:`VQImageTokenizer`.

Chameleon (Chameleon Team, "Chameleon: Mixed-Modal Early-Fusion Foundation Models", 2024,
https://arxiv.org/abs/2405.09818) tokenizes a 512x512 image into 32x32 = 1024 codes of an
8192-code book with the Make-a-Scene VQGAN (https://arxiv.org/abs/2203.13131). transformers
ports it as ``ChameleonVQVAE`` (``model.vqmodel`` inside ``ChameleonForConditionalGeneration``):
the encoder, ``quant_conv`` and the codebook, but **no pixel decoder**. The import therefore
builds a tokenizer with ``has_decoder=False``: it encodes (codes equal transformers' raw
``image_tokens`` exactly), and its ``decode`` says why it cannot.

Codes here are the raw codebook indices. Chameleon's language model sees them through its
vocabulary map (``ChameleonImageVocabularyMapping.convert_img2bpe``: code -> the id of the BPE
piece ``IMGIMG<code in letters>Z``); :func:`read_image_token_ids` reads that table, for a
vocabulary that keeps Chameleon's own ids.

Pixels: our tokenizers take [0,1]; the model sees ``x*2-1``, the original Chameleon's
normalization (``img / 255 * 2 - 1``). transformers' ``ChameleonImageProcessor`` rescales by
0.0078 instead of 1/127.5, so its pixel values differ from these in the third decimal.

Only safetensors and config.json are read; transformers is not needed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from omni.config.image_tokenizer import ImageTokenizerConfig
from omni.errors import OmniError
from omni.tokenizers.image import VQImageTokenizer

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
        if name.startswith("IMGIMG"):
            table[int("".join(digits.get(c, c) for c in name[len("IMGIMG"):-1]))] = int(tok_id)
    if not table:
        raise OmniError(f"{d / 'config.json'} has no vocabulary_map with IMGIMG* image tokens")
    n = max(table) + 1
    if sorted(table) != list(range(n)):
        raise OmniError(f"{d / 'config.json'}: the IMGIMG* tokens do not cover codes 0..{n - 1}")
    return [table[c] for c in range(n)]
