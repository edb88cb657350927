"""The batch a DataLoader worker hands the model: `ModelInputs`, the one statement of its keys.

`training.data.Collator` builds it (in a worker, straight into a shared-memory batch slot,
training.batch_slots), the Trainer moves it to the device, pops the cache counters
(`training.trainer.STAT_KEYS`) and calls ``model(**batch)``;
`training.model.Qwen2_5_VLWithGeometry.forward` takes it as ``**inputs: Unpack[ModelInputs]``.
A TypedDict, not a dataclass: the Trainer, accelerate's device placement, DeepSpeed's input
cast (floating tensors to its dtype) and the pin-memory thread all walk dicts of tensors, so the
batch keeps their behaviour while its keys are stated once, here.

Shapes: B samples, L tokens (padded), P image patches of the batch, I images, T Qwen image
tokens (P / 4), R stored patch rows in merger order, C channels of a stored token.

Example:
    >>> from training.batch import ModelInputs, GEOMETRY_KEYS
    >>> sorted(GEOMETRY_KEYS)[:2]
    ['vggt_feature_frames', 'vggt_features']
"""

from __future__ import annotations

from typing import TypedDict

from torch import Tensor

__all__ = ["ModelInputs", "GEOMETRY_KEYS", "TOWER_INDEX_KEYS", "TOWER_MAXIMA_KEY", "SOURCE_NONE", "SOURCE_FEATURES",
           "SOURCE_FRAMES"]

# `vggt_source` values: where a sample's geometry comes from.
SOURCE_NONE, SOURCE_FEATURES, SOURCE_FRAMES = 0, 1, 2


class ModelInputs(TypedDict, total=False):
    """What the worker hands the model (every key optional: a text-only batch is plain Qwen).

    Stock Qwen2.5-VL keys:
        input_ids [B, L] int64; labels [B, L] int64 (-100: not supervised); attention_mask
        [B, L] int64; mm_token_type_ids [B, L] int64 (1 on `<|image_pad|>`: 3-D mRoPE needs it);
        pixel_values [P, D] (float32, or the dtype training sets as `pixel_dtype`);
        image_grid_thw [I, 3] int64 (absent when no sample has an image).

    Cached vision tower (`--use_vision_cache`, instead of pixel_values):
        vision_features [P, C_vis]: the tower's output per patch, in the store's read dtype.

    The vision tower's index, with pixel_values when the collator knows the tower's windows
    (`Collator(..., tower_windows=...)`; featstore.encoders.qwen_vision.tower_index): made in
    the worker, so the tower's forward computes none of it and never waits for the GPU:
        vision_position_ids [P, 2] int64; vision_cu_seqlens [I + 1] int32;
        vision_window_index [P / 4] int64; vision_cu_window_seqlens [W + 1] int32;
        vision_max_seqlens [2] int64, kept on the host (the longest image, the longest window).

    Geometry (per sample, batch order):
        vggt_source [B] int64: SOURCE_NONE (no image), SOURCE_FEATURES (rows in
            vggt_features), SOURCE_FRAMES (frames in vggt_frames, encoded online).
        vggt_grid [B, 2] int64: the VGGT patch grid (h, w); vggt_images [B] int64: images.
        vggt_features [R, C]: the SOURCE_FEATURES samples' stored features in merger order
            (`training.merger.merger_rows`: each merged token's four patches on consecutive
            rows; an odd grid's last row and column left out), F*4*(h//2)*(w//2) rows each, in
            the store's read dtype (an fp8 store's dequantised to bfloat16); float32 [0] if none.
        vggt_feature_frames [B] int64: F, feature frames of each SOURCE_FEATURES sample.
        vggt_frames: the SOURCE_FRAMES samples' [S, 3, H, W] frames, flattened (uint8 when the
            preprocessing is exact in 8 bits, else float32); vggt_frame_count [B] int64: S.

    Counters (0-d int64, popped by the Trainer before the model sees the batch):
        cache_hits, cache_misses, cache_computed.
    """

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    mm_token_type_ids: Tensor
    pixel_values: Tensor
    image_grid_thw: Tensor
    vision_features: Tensor
    vision_position_ids: Tensor
    vision_cu_seqlens: Tensor
    vision_window_index: Tensor
    vision_cu_window_seqlens: Tensor
    vision_max_seqlens: Tensor
    vggt_source: Tensor
    vggt_grid: Tensor
    vggt_images: Tensor
    vggt_features: Tensor
    vggt_feature_frames: Tensor
    vggt_frames: Tensor
    vggt_frame_count: Tensor
    cache_hits: Tensor
    cache_misses: Tensor
    cache_computed: Tensor


# The geometry keys: a batch carries all of them or none.
GEOMETRY_KEYS = ("vggt_source", "vggt_grid", "vggt_images", "vggt_features", "vggt_feature_frames", "vggt_frames",
                 "vggt_frame_count")

# The vision tower's index (tower_index's tensors, in its order) and its maxima: all or none.
TOWER_INDEX_KEYS = ("vision_position_ids", "vision_cu_seqlens", "vision_window_index", "vision_cu_window_seqlens")
TOWER_MAXIMA_KEY = "vision_max_seqlens"
