"""Export an omni checkpoint as a Hugging Face transformers Chameleon checkpoint (``omni convert to-hf``).

The reverse of :mod:`omni.chameleon`'s import. The output folder is what
``ChameleonForConditionalGeneration.from_pretrained`` (transformers' port of Chameleon, Chameleon
Team 2024, https://arxiv.org/abs/2405.09818) loads: ``config.json``, ``model.safetensors`` and, as
far as the text tokenizer maps, ``tokenizer.json`` + ``tokenizer_config.json``. Writing it needs
safetensors (and the ``tokenizers`` package for the text tokenizer), not transformers.

What maps (the network is the same function; tests/test_hf_export.py compares logits):

* The decoder: weights renamed by :data:`omni.chameleon.HF_TO_OMNI`, reversed; dim, layers, heads,
  GQA, ffn_dim, norm_eps, rope_theta (plain RoPE), max_seq_len, swin_norm, attention_dropout and
  tie_embeddings (``tie_word_embeddings``) have direct equivalents. A ``shared`` QK-norm (one
  [head_dim] weight for all heads) is written as Chameleon's per-head [heads, head_dim] weights,
  every row equal: the same function.
* What does not map is refused before anything is written, in one :class:`OmniError` listing
  every ModelConfig value without a Chameleon equivalent (:func:`unmappable`): no QK-norm, an
  RMSNorm QK-norm, a QK-norm eps other than 1e-5 (ChameleonLayerNorm hard-codes it), and any
  ModelConfig field this exporter does not know that is set away from its default. Training-only
  settings (residual ``dropout``, ``z_loss``) have no place in a transformers config; they are
  named in the output and inference is unaffected.
* Ids are kept verbatim: ``vocab_size`` is the omni vocabulary's size (padding included) and
  every id means in transformers what it means in omni. ``vocabulary_map`` (transformers'
  name -> id table) names every id: the text tokenizer's pieces, the specials, image code c as
  Chameleon's ``IMGIMG<c in letters A-J>Z`` (so transformers' ``ChameleonImageVocabularyMapping``
  finds the image ids and their codes), audio code c as ``<audio_c>``, padding ids as
  ``<unused_i>``. An imported Chameleon checkpoint therefore gets its own ids, names and
  vocabulary_map back; a native omni vocabulary ([text][specials][image][audio]) keeps its layout.
* Text tokenizer: an imported one (``hf-tokenizers``) is written back as it came. omni's own
  SentencePiece BPE (byte fallback, identity normalizer, no dummy prefix) is converted to an
  equivalent ``tokenizers`` BPE (merges ordered by SentencePiece's piece scores, SentencePiece's
  whitespace pre-split, byte fallback) with the specials as added tokens and ``<bos>`` prepended;
  ``AutoTokenizer`` loads it and gives omni's ids. Two differences: a typed "▁" (U+2581) is a
  space to it (omni encodes it as its UTF-8 bytes), and a typed special name such as "<boi>" is
  that special to it (omni keeps typed specials as text). Other text tokenizer kinds are not
  converted; the output says so.
* Image tokenizer: transformers cannot build ChameleonModel without a ``vqmodel``. When the
  bundle's image tokenizer is Chameleon's VQGAN (a ``vq-image`` tokenizer with the ``nearest``
  quantizer, 32-group GroupNorms and a shared-context encoder, e.g. an imported one), its encoder,
  quant_conv and codebook are exported and ``model.model.get_image_tokens(pixel_values)`` gives
  omni's codes; the pixel decoder is not (transformers' ChameleonVQVAE has none) and
  ``post_quant_conv`` is written as zeros when the tokenizer has none (an import drops it, so
  that is the one tensor a round trip import -> export does not reproduce). Any other image
  tokenizer gets a small all-zero placeholder ``vqmodel``: the logits of image-code ids still
  match, but transformers' pixel path (``pixel_values``, ``get_image_tokens``) does not apply;
  feed image code ids as ``input_ids`` and encode / decode images with omni.
* transformers' ``ChameleonForConditionalGeneration.forward`` sets the logits of every image-code
  id to the dtype's minimum (its released weights do not generate images), so ``generate`` never
  emits image codes; ``lm_head(model.model(ids).last_hidden_state)`` gives the unmasked logits,
  which equal omni's. Audio codes stay ordinary ids: their logits match, but Chameleon has no
  audio tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from omni.chameleon import BOI_NAME, EOI_NAME, HF_TO_OMNI, HF_TOP, IMAGE_TOKEN_PREFIX
from omni.errors import OmniError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from omni.bundle import UnifiedTokenizer
    from omni.config.model import ModelConfig

OMNI_TO_HF = {v: k for k, v in HF_TO_OMNI.items()}
OMNI_TOP = {v: k for k, v in HF_TOP.items()}
CHAMELEON_QK_NORM_EPS = 1e-5
"""ChameleonLayerNorm's eps, hard-coded in transformers."""

MAPPED_FIELDS = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size",
    "norm_eps": "rms_norm_eps", "rope_theta": "rope_parameters.rope_theta",
    "max_seq_len": "max_position_embeddings", "swin_norm": "swin_norm", "tie_embeddings": "tie_word_embeddings",
    "attention_dropout": "attention_dropout", "init_std": "initializer_range",
}
"""ModelConfig field -> its ChameleonConfig key."""
CHECKED_FIELDS = ("qk_norm", "qk_norm_type", "qk_norm_eps")
"""Fields that map for some values only (:func:`unmappable`)."""
TRAINING_FIELDS = ("dropout", "z_loss")
"""Training-only fields: no ChameleonConfig key, no effect on inference."""
CHAMELEON_SPECIAL_NAMES = {"<bos>": "<s>", "<eos>": "</s>", "<pad>": "<pad>", "<boi>": BOI_NAME, "<eoi>": EOI_NAME}
"""Chameleon's names of omni's specials (used for an imported checkpoint whose text tokenizer is missing)."""
SPACE = "\u2581"


def image_token(code: int) -> str:
    """12 -> 'IMGIMGBCZ': Chameleon's name of image code ``code`` (inverse of :func:`omni.chameleon.image_code_of`)."""
    return IMAGE_TOKEN_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(int(code))) + "Z"


# ------------------------------------------------------------------------------------------------
# The decoder
# ------------------------------------------------------------------------------------------------
def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def unmappable(config: ModelConfig) -> list[str]:
    """Every ModelConfig value that has no ChameleonForConditionalGeneration equivalent (empty: it maps)."""
    c = config
    problems = []
    if c.qk_norm == "none":
        problems.append("qk_norm='none' (Chameleon always applies a LayerNorm per head to queries and keys; "
                        "mappable: 'per_head', 'shared')")
    else:
        if c.qk_norm_type != "layernorm":
            problems.append(f"qk_norm_type={c.qk_norm_type!r} (Chameleon's QK-norm is a LayerNorm with weight "
                            f"and bias; mappable: 'layernorm')")
        if c.qk_norm_eps != CHAMELEON_QK_NORM_EPS:
            problems.append(f"qk_norm_eps={c.qk_norm_eps!r} (transformers' ChameleonLayerNorm hard-codes "
                            f"eps={CHAMELEON_QK_NORM_EPS})")
    known = set(MAPPED_FIELDS) | set(CHECKED_FIELDS) | set(TRAINING_FIELDS)
    for f in dataclasses.fields(c):
        value, default = getattr(c, f.name), _default(f)
        if f.name not in known and value != default:
            problems.append(f"{f.name}={value!r} (a ModelConfig field this export does not know, set away from "
                            f"its default {default!r}: no Chameleon equivalent is known)")
    return problems


def training_only(config: ModelConfig) -> list[str]:
    """Training-only values that are not carried (nonzero ones)."""
    return [f"{name}={getattr(config, name)!r}" for name in TRAINING_FIELDS if getattr(config, name)]


def hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """OmniDecoder weights -> ChameleonForConditionalGeneration's (without ``model.vqmodel.*``)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, t in state.items():
        t = t.detach()
        if name in OMNI_TOP:
            out[OMNI_TOP[name]] = t
            continue
        m = re.match(r"^layers\.(\d+)\.(.+)$", name)
        if not (m and m.group(2) in OMNI_TO_HF):
            unknown.append(name)
            continue
        key = m.group(2)
        if config.qk_norm == "shared" and key.startswith(("attention.q_norm.", "attention.k_norm.")):
            heads = config.n_heads if key.startswith("attention.q_norm.") else config.n_kv_heads
            t = t.expand(heads, config.head_dim)  # one weight for all heads = equal per-head rows
        out[f"model.layers.{m.group(1)}.{OMNI_TO_HF[key]}"] = t
    if unknown:
        raise OmniError(f"omni weights without a Chameleon name: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return {k: v.contiguous().cpu() for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# The vocabulary
# ------------------------------------------------------------------------------------------------
def token_names(tok: UnifiedTokenizer, chameleon_names: bool = False) -> tuple[list[str], dict[str, int]]:
    """``(names, aliases)``: a distinct name for every id of the bundle's vocabulary, and extra
    name -> id entries transformers needs (an image id whose text-piece name is not its IMGIMG name).

    Text ids are named by the text tokenizer; ids it does not name get: specials their omni names
    (Chameleon's with ``chameleon_names``), image codes ``IMGIMG...Z``, audio codes ``<audio_c>``,
    other text ids (a bundle without a text tokenizer) ``<text_i>``, padding ``<unused_i>``.
    """
    v = tok.vocab
    names: list[str | None] = [None] * v.size
    if tok.text is not None:
        for i in range(min(v.text_size, tok.text.vocab_size)):
            names[i] = tok.text.id_to_piece(i)
    used = {n for n in names if n is not None}
    aliases: dict[str, int] = {}

    def name(i: int, want: str) -> None:
        if names[i] is not None:
            return
        n, k = want, 1
        while n in used:  # a generated name that a text piece already has
            n, k = f"{want[:-1]}_{k}>" if want.endswith(">") else f"{want}_{k}", k + 1
        names[i] = n
        used.add(n)

    for special, i in v.specials.items():
        name(i, CHAMELEON_SPECIAL_NAMES.get(special, special) if chameleon_names else special)
    import torch

    image_ids = v.image_code_to_id(torch.arange(v.image_codes)).tolist() if v.image_codes else []
    for c, i in enumerate(image_ids):
        name(i, image_token(c))
        if names[i] != image_token(c):
            aliases[image_token(c)] = i
    audio_ids = v.audio_code_to_id(torch.arange(v.audio_codes)).tolist() if v.audio_codes else []
    for c, i in enumerate(audio_ids):
        name(i, f"<audio_{c}>")
    for i in range(v.size):  # text ids the bundle cannot name (no text tokenizer), then padding
        name(i, f"<text_{i}>" if i < v.text_size else f"<unused_{i}>")
    return names, aliases  # type: ignore[return-value]


def sentencepiece_to_tokenizers(text, names: list[str], special_ids: list[int], bos_id: int) -> str:
    """omni's SentencePiece BPE (:class:`omni.tokenizers.text.TextTokenizer`) as a ``tokenizers`` JSON
    over the whole vocabulary ``names`` (ids 0 .. len-1), the ``special_ids`` as added special tokens."""
    from omni.tokenizers.text_hf import _tokenizers

    tk = _tokenizers()
    sp = text.sp
    n = sp.get_piece_size()

    def normal(i: int) -> bool:
        return not (sp.is_byte(i) or sp.is_unknown(i) or sp.is_control(i) or sp.is_unused(i))

    vocab = {nm: i for i, nm in enumerate(names)}
    pieces = {sp.id_to_piece(i): i for i in range(n) if normal(i)}
    # SentencePiece's BPE merges the adjacent pair whose concatenation is the piece with the highest
    # score; as merge rules: every split of a piece into two pieces, ranked by the piece's score.
    merges = []
    for piece, i in pieces.items():
        splits = sorted((pieces[piece[:k]], pieces[piece[k:]], piece[:k], piece[k:]) for k in range(1, len(piece))
                        if piece[:k] in pieces and piece[k:] in pieces)
        merges += [(-sp.get_score(i), i, a, b, left, right) for a, b, left, right in splits]
    merges.sort()
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    t = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk,
                                   byte_fallback=True))
    t.normalizer = tk.normalizers.Replace(" ", SPACE)
    # SentencePiece's split_by_whitespace with whitespace-only pieces: a word starts at the first
    # "▁" of a run and runs to the next run.
    t.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(f"[^{SPACE}]+|{SPACE}+[^{SPACE}]*"), behavior="isolated")
    t.decoder = tk.decoders.Sequence([tk.decoders.Replace(SPACE, " "), tk.decoders.ByteFallback(),
                                      tk.decoders.Fuse()])
    t.add_special_tokens([tk.AddedToken(names[i], special=True, normalized=False) for i in sorted(special_ids)])
    bos = names[bos_id]
    t.post_processor = tk.processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1",
                                                         special_tokens=[(bos, bos_id)])
    return t.to_str()


def _text_files(tok: UnifiedTokenizer, names: list[str], max_len: int) -> tuple[dict[str, bytes], str]:
    """(tokenizer files for the output folder, a line saying what was written)."""
    text = tok.text
    if text is None:
        return {}, "no text tokenizer written: the checkpoint's bundle has none"
    sp_ids = tok.vocab.specials
    if text.kind == "hf-tokenizers":
        import tempfile

        from omni.tokenizers.text_hf import HF_FILE

        with tempfile.TemporaryDirectory() as tmp:  # its own file, byte for byte
            text.save(tmp)
            data = (Path(tmp) / HF_FILE).read_bytes()
        line = "tokenizer.json: the bundle's Hugging Face tokenizer, as it was imported (ids unchanged)"
    elif text.kind == "sentencepiece" and hasattr(text, "sp"):
        try:
            data = sentencepiece_to_tokenizers(text, names, list(sp_ids.values()), sp_ids["<bos>"]).encode()
        except OmniError as e:
            return {}, f"no text tokenizer written: {e}"
        line = ("tokenizer.json: omni's SentencePiece BPE as a `tokenizers` BPE (same ids, <bos> prepended; "
                "differs only on a typed '\u2581', which it reads as a space, and on typed special names "
                "such as '<boi>', which it reads as those specials)")
    else:
        return {}, (f"no text tokenizer written: a {text.kind!r} text tokenizer has no transformers form here "
                    f"(convertible: 'sentencepiece', 'hf-tokenizers'); tokenize with omni")
    special = {"bos_token": names[sp_ids["<bos>"]], "eos_token": names[sp_ids["<eos>"]],
               "pad_token": names[sp_ids["<pad>"]]}
    if "<unk>" in names[:tok.vocab.text_size]:
        special["unk_token"] = "<unk>"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "clean_up_tokenization_spaces": False, **special}
    return {"tokenizer.json": data,
            "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode(),
            "special_tokens_map.json": (json.dumps(special, indent=2) + "\n").encode()}, line


# ------------------------------------------------------------------------------------------------
# The image tokenizer
# ------------------------------------------------------------------------------------------------
def chameleon_vq_mismatch(image) -> list[str]:
    """Why the image tokenizer is not a Chameleon VQGAN that transformers' ChameleonVQVAE can run (empty: it is)."""
    if image is None:
        return ["the bundle has no image tokenizer"]
    from omni.tokenizers.image import VQImageTokenizer

    if not isinstance(image, VQImageTokenizer):
        return [f"it is a {image.kind!r} tokenizer, not 'vq-image'"]
    c = image.config
    why = []
    if c.quantizer != "nearest":
        why.append(f"quantizer={c.quantizer!r} (Chameleon's is 'nearest')")
    if c.norm_groups != 32:
        why.append(f"norm_groups={c.norm_groups} (ChameleonVQVAE's GroupNorms have 32 groups)")
    if c.local_encoder:
        why.append("local_encoder=True (Chameleon's encoder convolves across patches)")
    if not c.mid_attention and c.attn_resolutions:
        why.append("attn_resolutions without mid_attention (transformers' attn_type switches both)")
    return why


def _placeholder_vq(n_codes: int, image_size: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """The smallest ChameleonVQVAE transformers builds (one 32-channel level), all weights zero."""
    import torch

    ch, latent, embed = 32, 8, 8
    cfg = {"embed_dim": embed, "num_embeddings": max(n_codes, 1), "double_latent": False,
           "latent_channels": latent, "resolution": image_size, "in_channels": 3, "base_channels": ch,
           "channel_multiplier": [1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
           "attn_type": "none"}
    shapes = {"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,),
              "encoder.norm_out.weight": (ch,), "encoder.norm_out.bias": (ch,),
              "encoder.conv_out.weight": (latent, ch, 3, 3), "encoder.conv_out.bias": (latent,),
              "quant_conv.weight": (embed, latent, 1, 1), "quant_conv.bias": (embed,),
              "post_quant_conv.weight": (latent, embed, 1, 1), "post_quant_conv.bias": (latent,),
              "quantize.embedding.weight": (max(n_codes, 1), embed)}
    for block in ("down.0.block.0", "mid.block_1", "mid.block_2"):
        for norm in ("norm1", "norm2"):
            shapes[f"encoder.{block}.{norm}.weight"] = shapes[f"encoder.{block}.{norm}.bias"] = (ch,)
        for conv in ("conv1", "conv2"):
            shapes[f"encoder.{block}.{conv}.weight"], shapes[f"encoder.{block}.{conv}.bias"] = (ch, ch, 3, 3), (ch,)
    return cfg, {k: torch.zeros(s) for k, s in shapes.items()}


def vq_export(image, n_codes: int) -> tuple[dict, dict[str, torch.Tensor], str]:
    """``(vq_config, vqmodel weights without the prefix, a line saying what they are)``."""
    import torch

    why = chameleon_vq_mismatch(image)
    if why:
        size = int(image.image_size[0]) if image is not None and hasattr(image, "image_size") else 512
        cfg, state = _placeholder_vq(n_codes, size)
        return cfg, state, (
            f"model.vqmodel is an all-zero placeholder: the image tokenizer is not Chameleon's VQGAN "
            f"({'; '.join(why)}). Image-code logits match, but transformers' pixel path (pixel_values, "
            f"get_image_tokens) does not apply: feed image code ids (vocabulary_map's IMGIMG...Z) as input_ids "
            f"and encode / decode images with omni")
    c = image.config
    cfg = {"embed_dim": c.embed_dim, "num_embeddings": c.codebook_size, "double_latent": False,
           "latent_channels": c.latent_channels, "resolution": c.image_size, "in_channels": 3,
           "base_channels": c.base_channels, "channel_multiplier": list(c.channel_multiplier),
           "num_res_blocks": c.num_res_blocks, "attn_resolutions": list(c.attn_resolutions),
           "dropout": c.dropout, "attn_type": "vanilla" if c.mid_attention else "none"}
    if c.commitment_weight != 0.25:
        cfg["beta"] = c.commitment_weight
    state = {}
    for k, t in image.state_dict().items():
        if k.startswith(("encoder.", "quant_conv.", "quantize.", "post_quant_conv.")):
            state[k] = t.detach().contiguous().cpu()
        elif not k.startswith("decoder."):
            raise OmniError(f"image tokenizer weight {k!r} has no place in transformers' ChameleonVQVAE")
    line = ("model.vqmodel is the image tokenizer (Chameleon's VQGAN encoder and codebook): "
            "model.model.get_image_tokens(pixel_values) gives omni's codes as ids (pixels in [-1, 1], x*2-1 of "
            "omni's [0, 1])")
    if "post_quant_conv.weight" not in state:
        dt = state["quant_conv.weight"].dtype
        state["post_quant_conv.weight"] = torch.zeros(c.latent_channels, c.embed_dim, 1, 1, dtype=dt)
        state["post_quant_conv.bias"] = torch.zeros(c.latent_channels, dtype=dt)
        line += "; post_quant_conv (unused by transformers) is zeros: the tokenizer has none"
    if c.has_decoder:
        line += "; the pixel decoder is not exported (transformers' ChameleonVQVAE has none): decode with omni"
    return cfg, state, line


# ------------------------------------------------------------------------------------------------
# The whole export
# ------------------------------------------------------------------------------------------------
def hf_config(config: ModelConfig, tok: UnifiedTokenizer, vocabulary_map: dict[str, int], vq_config: dict,
              dtype: str, omni_export: dict) -> dict:
    """config.json of ChameleonForConditionalGeneration for ``config`` and the bundle's ids."""
    c, sp = config, tok.vocab.specials
    return {
        "architectures": ["ChameleonForConditionalGeneration"],
        "model_type": "chameleon",
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "initializer_range": c.init_std,
        "rms_norm_eps": c.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(c.rope_theta)},
        "rope_theta": float(c.rope_theta),  # transformers < 5 reads this key
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": c.attention_dropout,
        "model_parallel_size": 1,
        "swin_norm": c.swin_norm,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": sp["<bos>"],
        "eos_token_id": sp["<eos>"],
        "pad_token_id": sp["<pad>"],
        "use_cache": True,
        "dtype": dtype,
        "vocabulary_map": vocabulary_map,
        "image_token_id": vocabulary_map.get("<image>"),  # the processor's placeholder; an imported Chameleon's
        "vq_config": {"model_type": "chameleon_vqgan", **vq_config},
        "omni_export": omni_export,
    }


@dataclasses.dataclass
class Export:
    """What :func:`export_to_hf` wrote."""

    path: Path
    notes: list[str]
    """One line per thing a user should know: what maps, what was not carried, what transformers can do with it."""


def export_to_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Export:
    """``omni convert to-hf``: an omni checkpoint folder -> a transformers Chameleon folder (replacing ``out_dir``).

    Refuses (OmniError, nothing written) when the decoder does not map (:func:`unmappable`).
    """
    from safetensors.torch import save

    from omni.checkpoint import META_FILE, load, load_config_of
    from omni.io import atomic_folder, atomic_write_bytes, atomic_write_text

    d = Path(checkpoint)
    if not d.is_dir():
        raise OmniError(f"checkpoint directory not found: {d}")
    final = Path(out_dir)
    if final.resolve() == d.resolve():
        raise OmniError(f"--out {final} is the checkpoint itself: write the export to another folder")
    config = load_config_of(d)
    problems = unmappable(config)
    if problems:
        raise OmniError(f"{d} does not map onto transformers' ChameleonForConditionalGeneration; no Chameleon "
                        f"equivalent for: {'; '.join(problems)}. Nothing was written")
    model, tok = load(d, device="cpu")
    try:
        meta = json.loads((d / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        meta = {}
    imported = meta.get("converted_from") == "chameleon"
    v = tok.vocab

    notes = []
    state = hf_state_dict(model.state_dict(), config)
    dtype = str(state["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    line = (f"decoder: {len(state)} tensors ({dtype}) as ChameleonForConditionalGeneration"
            f"{', swin_norm' if config.swin_norm else ''}{', tied embeddings' if config.tie_embeddings else ''}")
    if config.qk_norm == "shared":
        line += "; the shared QK-norm is written per head (equal rows)"
    notes.append(line)
    dropped = training_only(config)
    if dropped:
        notes.append(f"not carried (training only, no transformers config key; inference unaffected): {', '.join(dropped)}")

    names, aliases = token_names(tok, chameleon_names=imported and tok.text is None)
    vocabulary_map = {n: i for i, n in enumerate(names)}
    vocabulary_map.update(aliases)
    notes.append(f"ids kept verbatim: vocab_size {v.size} (text {v.text_size}, {v.n_specials} specials, "
                 f"{v.image_codes} image codes, {v.audio_codes} audio codes); vocabulary_map names every id, image code "
                 f"c as IMGIMG<c in letters A-J>Z")
    files, text_line = _text_files(tok, names, config.max_seq_len)
    notes.append(text_line)
    if v.image_codes:
        notes.append("transformers' ChameleonForConditionalGeneration sets image-code logits to the dtype's minimum "
                     "(generate() never emits image codes); lm_head(model.model(ids).last_hidden_state) gives the "
                     "raw logits, equal to omni's")
    if v.audio_codes:
        notes.append("audio codes stay ordinary ids named <audio_c> (their logits match); Chameleon has no audio "
                     "tokenizer, so transformers cannot encode or decode audio")

    vq_config, vq_state, vq_line = vq_export(tok.image, v.image_codes)
    notes.append(vq_line)
    for k, t in vq_state.items():
        state[f"model.vqmodel.{k}"] = t

    with atomic_folder(final) as tmp:
        omni_export = {"source": str(d), "tokenizer_fingerprint": tok.fingerprint, "notes": notes}
        cfg = hf_config(config, tok, vocabulary_map, vq_config, dtype, omni_export)
        atomic_write_bytes(tmp / "model.safetensors", save(state, metadata={"format": "pt"}))
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
        atomic_write_text(tmp / "config.json", json.dumps(cfg, indent=2) + "\n")
    return Export(final, notes)
