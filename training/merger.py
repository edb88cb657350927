"""The trainable geometry merger: stored VGGT patch tokens -> Qwen LLM-sized image-token offsets.

RMSNorm(C) per patch token -> group 2x2 neighbouring patches (4C) -> Linear(4C, hidden) -> GELU
-> Linear(hidden, LLM hidden). For VGGT-1B, C = 2048, hidden = 4096 (TRAINING.md).

Parameter names follow the published layout of VG-LLM and JanusVLN (`ln_q.weight`,
`mlp.0.weight/bias`, `mlp.2.weight/bias`; RMSNorm eps 1e-6), so a merger they trained loads here
and continues training.

Token order: the grid [h, w] is first trimmed to even sides (the last row / column dropped, as
a 37x28 VGGT-1B grid becomes 36x28), then merged tokens come out row-major over (h/2, w/2), each
from its 2x2 block in (row, col) order: the order of Qwen2.5-VL's own patch merger, so merged
token j lands on Qwen image token j.

Merger order: the patch tokens of a batch as the MLP consumes them, each merged token's four
patches on consecutive rows (`merger_rows`). DataLoader workers copy stored features out of the
store in this order (the one copy, a row gather), so the model runs one norm over all rows of
the batch and one MLP over them seen as [rows / 4, 4C], with no regrouping on the GPU.

Shapes: F frames, h x w patch grid, N = h*w tokens, C channels, M = (h//2)*(w//2) merged tokens.
"""

from __future__ import annotations

import functools
from typing import List, Tuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["GeometryMerger", "RMSNorm", "merged_grid", "group_2x2", "merger_rows"]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, rounded to the input's dtype, then scaled by the
    learned `weight` in that dtype (Qwen2RMSNorm's order: the norm's output is rounded before the
    scale, and the product once more)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # weight.to(dtype): a no-op when weight and input share a dtype (as in VG-LLM / JanusVLN, whose
        # merger is bf16 under --bf16); with float32 weights under bf16 autocast it rounds the weight
        # as their bf16 copy is rounded, so the product is the same number.
        return self.weight.to(dtype) * x32.to(dtype)


def merged_grid(h: int, w: int) -> tuple:
    """(h//2, w//2): the merged grid of an h x w patch grid after trimming to even sides."""
    return h // 2, w // 2


def group_2x2(x: Tensor, h: int, w: int) -> Tensor:
    """[F, h*w, C] -> [F, (h//2)*(w//2), 4C]: trim to even, then each 2x2 block's tokens in
    (row, col) order concatenated, blocks row-major."""
    f, n, c = x.shape
    if n != h * w:
        raise ValueError(f"features have {n} tokens per frame but the grid {h}x{w} has {h * w}")
    hh, ww = merged_grid(h, w)
    x = x.reshape(f, h, w, c)[:, : 2 * hh, : 2 * ww]
    x = x.reshape(f, hh, 2, ww, 2, c).permute(0, 1, 3, 2, 4, 5)  # [F, h/2, w/2, 2, 2, C]
    return x.reshape(f, hh * ww, 4 * c)


@functools.lru_cache(maxsize=256)
def merger_rows(frames: int, h: int, w: int) -> np.ndarray:
    """The token rows of [F, h*w, C] features (seen as [F*h*w, C]) in merger order: the rows
    `group_2x2` concatenates, in its order, so that ``x.reshape(-1, C)[merger_rows(F, h, w)]``
    seen as [F*M, 4C] equals ``group_2x2(x, h, w)`` seen the same way. An odd grid's last row
    and column appear nowhere. Read-only int64 (cached per grid).

    Example:
        >>> merger_rows(1, 2, 3).tolist()   # a 2x3 grid: one merged token, column 2 dropped
        [0, 1, 3, 4]
    """
    hh, ww = merged_grid(h, w)
    index = np.arange(frames * h * w, dtype=np.int64).reshape(frames, h, w)[:, : 2 * hh, : 2 * ww]
    rows = np.ascontiguousarray(index.reshape(frames, hh, 2, ww, 2).transpose(0, 1, 3, 2, 4).reshape(-1))
    rows.flags.writeable = False
    return rows


class GeometryMerger(nn.Module):
    """VGGT patch tokens of one frame grid -> offsets for that image's merged Qwen tokens.

    Args:
        in_channels: C, channels of a stored token (VGGT-1B: 2048).
        out_channels: the LLM hidden size.
        hidden: the MLP's hidden width (default 2 * in_channels: 4096 for VGGT-1B).

    Example:
        >>> m = GeometryMerger(2048, 3584)
        >>> m(torch.randn(2, 28 * 37, 2048), 28, 37).shape   # 2 frames of a 518x392 input
        torch.Size([2, 252, 3584])
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 2 * in_channels
        self.in_channels, self.out_channels, self.hidden = in_channels, out_channels, hidden
        self.ln_q = RMSNorm(in_channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(4 * in_channels, hidden), nn.GELU(), nn.Linear(hidden, out_channels))

    def compute_dtype(self, device_type: str) -> torch.dtype:
        """The dtype the features are cast to before the norm: autocast's when it is on (the dtype
        the MLP computes in), else the merger's weights' dtype.

        VG-LLM and JanusVLN cast the features to the vision tower's dtype (`.to(self.visual.dtype)`,
        bf16 under --bf16, the whole model loaded in bf16) and run the merger in that dtype. A bf16
        merger here does the same; a float32 merger under bf16 autocast (float32 master weights)
        computes the same numbers, since autocast rounds the weights to bf16 as their bf16 copy is.
        """
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.ln_q.weight.dtype

    def _norm(self, features: Tensor) -> Tensor:
        return self.ln_q(features.to(self.compute_dtype(features.device.type)))

    def forward(self, features: Tensor, h: int, w: int) -> Tensor:
        """[F, h*w, C] (any float dtype) -> [F, (h//2)*(w//2), out_channels] in `compute_dtype`."""
        return self.mlp(group_2x2(self._norm(features), h, w))

    def forward_many(self, items: List[Tuple[Tensor, int, int]]) -> List[Tensor]:
        """Several samples' (features [F, h*w, C], h, w) through ONE MLP call -> per sample
        [F, (h//2)*(w//2), out]. The norm and MLP act per token, so this equals calling
        `forward` per sample up to GEMM rounding (a matmul over more rows may block its sums
        differently), with one kernel launch per layer instead of one per sample."""
        if not items:
            return []
        grouped = [group_2x2(self._norm(x), h, w) for x, h, w in items]
        out = self.mlp(torch.cat([g.reshape(-1, g.shape[-1]) for g in grouped]))
        sizes = [g.shape[0] * g.shape[1] for g in grouped]
        return [o.reshape(g.shape[0], g.shape[1], -1) for o, g in zip(out.split(sizes), grouped)]

    def forward_rows(self, rows: Tensor) -> Tensor:
        """Patch tokens in merger order [R, C] (R = 4 x merged tokens, any float dtype; see
        `merger_rows`), all samples and frames of a batch -> [R / 4, out_channels] in
        `compute_dtype`: one norm and one MLP call. Row for row the same numbers as `forward`
        on each sample's [F, h*w, C] and `forward_many` (the norm and the MLP act per token)."""
        if rows.shape[0] % 4:
            raise ValueError(f"merger-order features have {rows.shape[0]} rows, not a multiple of 4 (four patches "
                             "a merged token)")
        normed = self._norm(rows)
        return self.mlp(normed.reshape(rows.shape[0] // 4, 4 * normed.shape[-1]))
