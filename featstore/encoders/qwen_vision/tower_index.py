"""The Qwen2.5-VL vision tower's index tensors for a list of image grids, made on the host.

The tower's forward (transformers' `Qwen2_5_VisionTransformerPretrainedModel.forward`) starts by
computing, from `grid_thw`, the rotary position ids, `cu_seqlens` (one segment per image), the
window permutation and `cu_window_seqlens` (one segment per window), and the longest segment of
each. With `grid_thw` on the GPU that is several host syncs (`.tolist()`, `repeat_interleave`,
`.item()`, a host-made index copied over) and a few dozen small kernels per call; each sync idles
the GPU until the host has launched what follows. The forward takes all of them precomputed as
keyword arguments (transformers' `vision_utils`: each `get_vision_*` pops its key when given).

`tower_index` computes them with those same functions on the host, so the integers are the
tower's own and the features do not change. The build's encoder makes them once per list of
grids (featstore.encoders.qwen_vision.encoder); training's DataLoader workers make them per
batch (training.collate.Collator), and the batch carries them to the GPU with the pixels.

Example:
    >>> from featstore.encoders.qwen_vision.tower_index import TowerWindows, tower_index
    >>> windows = TowerWindows(spatial_merge_size=2, window_size=112, patch_size=14)
    >>> index = tower_index([(1, 28, 36)], windows)      # one 392x504 image: 28x36 patches
    >>> index["cu_seqlens"].tolist(), index["max_seqlen"], index["window_index"].shape
    ([0, 1008], 1008, torch.Size([252]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Union

import torch

__all__ = ["TowerWindows", "tower_index", "INDEX_TENSORS", "INDEX_MAXIMA"]

# The forward's keyword arguments: the tensors, then the two longest segments (ints).
INDEX_TENSORS = ("position_ids", "cu_seqlens", "window_index", "cu_window_seqlens")
INDEX_MAXIMA = ("max_seqlen", "max_window_seqlen")


@dataclass(frozen=True)
class TowerWindows:
    """What the index depends on besides the grids: the vision config's spatial merge, attention
    window (pixels) and patch size. Plain ints, so that it pickles into DataLoader workers."""

    spatial_merge_size: int
    window_size: int
    patch_size: int

    @classmethod
    def of(cls, vision_config) -> "TowerWindows":
        """From transformers' `Qwen2_5_VLVisionConfig` (or any object with those attributes)."""
        return cls(int(vision_config.spatial_merge_size), int(vision_config.window_size),
                   int(vision_config.patch_size))


def tower_index(grids: Union[Sequence[Sequence[int]], torch.Tensor],
                windows: TowerWindows) -> Dict[str, Union[torch.Tensor, int]]:
    """The tower forward's index arguments for images of these grids, on the CPU.

    Args:
        grids: (t, h, w) patch grids, one per image, as `image_grid_thw` rows.
        windows: the tower's merge, window and patch sizes.

    Returns:
        {position_ids [P, 2] int64, cu_seqlens [n + 1] int32, window_index [P / merge^2] int64,
        cu_window_seqlens [windows + 1] int32, max_seqlen int, max_window_seqlen int}: what
        `visual(pixel_values, grid_thw=..., **index)` would otherwise compute itself.
    """
    from transformers import vision_utils

    grid = torch.as_tensor(grids, dtype=torch.int64).reshape(-1, 3)
    cu = vision_utils.get_vision_cu_seqlens(grid)
    window_index, cu_window = vision_utils.get_vision_window_index(
        grid, spatial_merge_size=windows.spatial_merge_size, window_size=windows.window_size,
        patch_size=windows.patch_size)
    return {"position_ids": vision_utils.get_vision_position_ids(grid, windows.spatial_merge_size),
            "cu_seqlens": cu, "window_index": window_index, "cu_window_seqlens": cu_window,
            "max_seqlen": _longest(cu), "max_window_seqlen": _longest(cu_window)}


def _longest(cu: torch.Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0
