"""VGGT aggregator configs and the in-tree code version: plain data, no torch.

Kept apart from the model module (`featstore.encoders.vggt.model`) so that resolving an encoder spec
(`featstore.encoders.resolve_spec`, training's cache mode) never imports the model code.
"""

from __future__ import annotations

from typing import Any, Dict

__all__ = ["VGGT_1B_CONFIG", "TINY_CONFIG", "TINY_SEED", "TINY_TARGET_SIZE", "CODE_VERSION"]

# Version of the in-tree aggregator's numerics (featstore/encoders/vggt/model.py); enters the spec of
# implementation "featstore". Bump it when a change alters outputs beyond rounding.
CODE_VERSION = "1"

# The official VGGT-1B aggregator config (vggt/models/vggt.py builds Aggregator with these defaults).
VGGT_1B_CONFIG: Dict[str, Any] = dict(
    img_size=518,
    patch_size=14,
    embed_dim=1024,
    depth=24,
    num_heads=16,
    mlp_ratio=4.0,
    num_register_tokens=4,
    qkv_bias=True,
    proj_bias=True,
    ffn_bias=True,
    patch_embed="dinov2_vitl14_reg",
    aa_order=("frame", "global"),
    aa_block_size=1,
    qk_norm=True,
    rope_freq=100,
    init_values=0.01,
)

# The tiny preset: small enough for CPU tests (head_dim 16, divisible by 4 for 2-D RoPE).
TINY_CONFIG: Dict[str, Any] = dict(
    img_size=112, patch_size=14, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0,
    num_register_tokens=4, qkv_bias=True, proj_bias=True, ffn_bias=True, patch_embed="conv",
    aa_order=["frame", "global"], aa_block_size=1, qk_norm=True, rope_freq=100, init_values=0.01,
)
TINY_SEED = 0
TINY_TARGET_SIZE = 112  # 112x84 crops of a 4:3 image: 8x6 patches, fast on CPU
