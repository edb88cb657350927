"""Tiny presets: a random-weight Qwen2.5-VL, an offline byte-level tokenizer and image processor.

`--model_name_or_path qwen2.5-vl-tiny` selects them; any other value is a hub id or a local
checkpoint directory, loaded with `from_pretrained`. The tiny VGGT is featstore's `vggt-tiny`
encoder preset (random aggregator, seed 0, 112 px preprocessing).

The tiny config (TRAINING.md, ~190k parameters, a train step ~0.3 s on 2 CPU cores) keeps
the structural constraints of the real model: sum(mrope_section) == text head_dim / 2, vision
head_dim % 4 == 0, out_hidden_size == text hidden size, special token ids inside the vocabulary
and equal to the tokenizer's.
"""

from __future__ import annotations

import copy
from typing import Any, Dict

from featstore.encoders.qwen_vision.config import TINY_VISION_CONFIG

__all__ = ["TINY_MODEL", "TINY_VGGT", "TINY_VISION", "SPECIAL_TOKENS", "tiny_config", "tiny_tokenizer",
           "image_processor", "is_tiny"]

TINY_MODEL = "qwen2.5-vl-tiny"
TINY_VGGT = "vggt-tiny"
TINY_VISION = "qwen2.5-vl-vision-tiny"  # featstore preset of the tiny tower (random, seed 0)

# Qwen2.5-VL's special tokens, in the order they get ids after the 256 byte symbols.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")

# Image processor bounds: we resize every image ourselves to multiples of 28 (the VGGT grid,
# TRAINING.md "grid rule"); these bounds only need to contain H*W so that `smart_resize` is the
# identity. min == max would NOT force a size.
_MIN_PIXELS = 28 * 28
_MAX_PIXELS = 28 * 28 * 16384


def is_tiny(name: str) -> bool:
    return name == TINY_MODEL


def _byte_symbols() -> list:
    """The 256 byte-level BPE symbols (GPT-2's printable mapping of every byte value)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for _, c in sorted(zip(printable, codes))]


def tiny_tokenizer():
    """A `Qwen2Tokenizer` over the 256 byte symbols plus Qwen's special tokens (no merges).

    Example:
        >>> tok = tiny_tokenizer()
        >>> tok.convert_tokens_to_ids("<|image_pad|>")
        261
    """
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    for t in SPECIAL_TOKENS:
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                                          for t in SPECIAL_TOKENS[1:]]})
    return tok


def tiny_config(tokenizer=None, **overrides: Any):
    """The `Qwen2_5_VLConfig` of the tiny preset (random weights are drawn by the caller).

    Args:
        tokenizer: the tokenizer whose special ids the config must carry (default: tiny_tokenizer()).
        **overrides: top-level config attributes to set (e.g. the merger config).
    """
    from transformers import Qwen2_5_VLConfig

    tok = tokenizer or tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = 8 * ((len(tok) + 7) // 8)  # round up: embedding rows for every id
    text: Dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        # head_dim 16: sum(mrope_section) must be head_dim / 2 = 8
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    # featstore's qwen2.5-vl-vision-tiny encoder runs this same tower (one definition for both).
    vision: Dict[str, Any] = copy.deepcopy(TINY_VISION_CONFIG)
    cfg = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def processor_size(min_pixels=None, max_pixels=None) -> dict:
    """The image processor's `size` bounds: the given ones (--min_pixels/--max_pixels, e.g. a
    recipe's), else bounds that hold any view, so `smart_resize` is the identity."""
    return {"shortest_edge": int(min_pixels or _MIN_PIXELS), "longest_edge": int(max_pixels or _MAX_PIXELS)}


def image_processor(min_pixels=None, max_pixels=None):
    """Qwen's PIL image processor (no torchvision), patch 14, merge 2, the bounds of `processor_size`."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # Always pass size=: in transformers 5.17 min_pixels/max_pixels mutate the class default.
    return Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                    size=processor_size(min_pixels, max_pixels))

