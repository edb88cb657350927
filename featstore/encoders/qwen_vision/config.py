"""Qwen2.5-VL vision tower configs and the code version: plain data, no torch.

Kept apart from the encoder module (`featstore.encoders.qwen_vision.encoder`) so that resolving a spec
(`featstore.encoders.resolve_spec`, training's cache mode, `featstore build --dry-run`) never
imports torch or the model code.

`spec_config(vision_config)` turns a checkpoint's `config.json` `vision_config` into the spec's
`config`: the fields that decide the numbers of the tower without its merger, with transformers'
defaults filled in for the ones a checkpoint leaves out (the hub's config.json omits rope_theta,
say), plus the normalisation and the token order. How the input image is made from the VGGT
view is the spec's own field `qwen_view` ("crop").
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from featstore.errors import WeightsError

__all__ = ["CODE_VERSION", "IMAGE_MEAN", "IMAGE_STD", "TOKEN_ORDER", "TINY_VISION_CONFIG",
           "TINY_SEED", "TINY_TARGET_SIZE", "DEFAULT_TARGET_SIZE", "VISION_ATTENTION_CHOICES",
           "DEFAULT_VISION_ATTENTION", "spec_config"]

# Version of how featstore runs the tower (encoder.py: patchify, the merger-less forward, the
# un-permutation); enters the spec. Bump it when a change alters outputs beyond rounding.
CODE_VERSION = "qwen-vision-1"

# Qwen2VLImageProcessorPil's defaults (OPENAI_CLIP_MEAN / _STD), which Qwen2.5-VL's
# preprocessor_config.json also names; tests/test_encoder_qwen_vision.py checks them against the processor.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Token order of the stored [N, C]: the image processor's (row-major over merge blocks, each
# block's merge x merge patches row-major), so the merger groups consecutive merge**2 tokens.
TOKEN_ORDER = "merge-blocks"

# The vision config of training.presets.tiny_config() (TRAINING.md's tiny model). window_size 112
# is 4x4 merged tokens: a 224 px image has several windows, a 112 px one a single window.
TINY_VISION_CONFIG: Dict[str, Any] = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
)
TINY_SEED = 0
TINY_TARGET_SIZE = 112  # as vggt-tiny: small enough for tests on two CPU cores
DEFAULT_TARGET_SIZE = 518  # the official VGGT view: 518x392 -> 504x392 Qwen pixels, 252 merged tokens

# How the tower attends (featstore.encoders.qwen_vision.attention; the encoders' vision_attention
# build option and training's --vision_attention): "stock" is transformers' path for the configured
# implementation (sdpa: one call per window), "one_call" one attention call per layer, "auto" (the
# default) one call where torch's varlen kernel runs (CUDA, bf16/fp16: 2.6x the stock forward on an
# H100, docs/BENCHMARKS.md) and the stock per-window calls everywhere else (CPU, float32).
VISION_ATTENTION_CHOICES = ("auto", "stock", "one_call")
DEFAULT_VISION_ATTENTION = "auto"

# Spec fields read from the vision config, in the order the spec lists them.
_FIELDS = ("depth", "hidden_size", "num_heads", "intermediate_size", "hidden_act", "in_channels", "patch_size",
           "spatial_merge_size", "temporal_patch_size", "window_size", "fullatt_block_indexes")


def spec_config(vision_config: Mapping[str, Any], *, source: str = "the vision config") -> Dict[str, Any]:
    """The spec `config` of a Qwen2.5-VL vision config (a checkpoint's config.json `vision_config`).

    Args:
        vision_config: the dict; missing fields take `Qwen2_5_VLVisionConfig`'s defaults.
        source: how errors name where the dict came from.

    Returns:
        {depth, hidden_size, num_heads, intermediate_size, hidden_act, in_channels, patch_size,
        spatial_merge_size, temporal_patch_size, window_size, fullatt_block_indexes, rope_theta,
        image_mean, image_std, token_order}.

    Raises:
        WeightsError: the config cannot be read by transformers, or its patch size is not 14
            (the VGGT view the image derives from has 14 px patches).

    Example:
        >>> from featstore.encoders.qwen_vision.config import TINY_VISION_CONFIG, spec_config
        >>> cfg = spec_config(TINY_VISION_CONFIG)
        >>> cfg["depth"], cfg["hidden_size"], cfg["rope_theta"], cfg["token_order"]
        (2, 32, 10000.0, 'merge-blocks')
    """
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    try:
        cfg = Qwen2_5_VLVisionConfig(**dict(vision_config))
    except Exception as e:
        raise WeightsError(f"{source}: transformers cannot read it as a Qwen2.5-VL vision config: "
                           f"{type(e).__name__}: {e}; pass a Qwen2.5-VL checkpoint (or upgrade transformers: "
                           "featstore needs >= 5.17)") from None
    out: Dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(cfg, name)
        out[name] = [int(v) for v in value] if name == "fullatt_block_indexes" else value
    rope = getattr(cfg, "rope_parameters", None) or {}
    out["rope_theta"] = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    if out["patch_size"] != 14:
        raise WeightsError(f"{source}: patch_size {out['patch_size']!r}; featstore derives the Qwen image from "
                           "the VGGT view of 14 px patches, so the vision tower must use patch_size 14: pass a "
                           "Qwen2.5-VL checkpoint")
    out.update(image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), token_order=TOKEN_ORDER)
    return out
