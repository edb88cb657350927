"""fp8 storage: per-token scaled float8_e4m3fn features and their dequantisation on read.

A store whose spec says ``storage_dtype="float8_e4m3fn"`` keeps, per entry (docs/FORMAT.md §4.1):

    features        [F, N, C] float8_e4m3fn   round(x / scale), |.| <= 448
    features_scale  [F, N, 1] float32         max |x| over the token's C channels / 448

One scale per token (not per tensor) because ViT activations differ in magnitude from token to
token by orders of magnitude (register-like outlier tokens); within a token the floating-point
format itself covers the channels' spread (e4m3 keeps 3 mantissa bits from 448 down to 2^-6,
a ratio of 28672). The scale costs 4 bytes per token: 0.2% of a 2048-channel fp8 row.

Dequantisation (`dequantize_into`) writes straight into the caller's output: each block of
tokens is converted through a 256-entry table (every e4m3 value is exact in bf16, fp16 and
fp32) and multiplied by its scale while the block is still in the CPU cache, so the output is
written to memory once.

Example:
    >>> import torch
    >>> from featstore.format.fp8 import dequantize, quantize_fp8
    >>> x = torch.randn(1, 4, 8)
    >>> q, scale = quantize_fp8(x)
    >>> q.dtype, scale.shape
    (torch.float8_e4m3fn, torch.Size([1, 4, 1]))
    >>> bool(torch.allclose(dequantize(q, scale, torch.float32), x, rtol=0.07, atol=0))
    True
"""

from __future__ import annotations

import numpy as np
import torch

from featstore.contract.dtypes import is_quantised
from featstore.format.codecs import codec_for
from featstore.format.codecs.base import all_finite
from featstore.format.codecs.fp8 import SCALE_TENSOR

__all__ = ["FP8_DTYPE", "FP8_MAX", "SCALE_TENSOR", "is_quantised", "read_dtype", "all_finite", "quantize_fp8",
           "entry_tensors", "dequantize_into", "dequantize"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Tokens per conversion block: 64 x 2048 channels is 256 KiB of bf16 output, which stays in L2
# between the table lookup and the scale multiply (measured: 1 GB/s of bf16 output on one core of
# the 2-core VM, against 0.27 GB/s for torch's own fp8 -> bf16 cast, docs/BENCHMARKS.md).
_BLOCK_TOKENS = 64
_LUTS: dict[torch.dtype, np.ndarray] = {}
_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def read_dtype(storage_dtype: str) -> torch.dtype:
    """The dtype features of a store read back as by default, and the dtype `encode_frames`
    returns for its spec: the storage dtype itself, or bfloat16 (what the merger takes) for fp8,
    which is quantised only when an entry is serialised (the codec's `read_dtype`)."""
    return codec_for(storage_dtype).read_dtype()


def quantize_fp8(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token scaled fp8 of `features` [..., C]: (q [..., C] float8_e4m3fn, scale [..., 1] float32).

    The token's largest |value| maps to 448; an all-zero token gets scale 1 (its q is zero).

    Raises:
        ValueError: `features` holds NaN or infinity (fp8 has no infinity; a NaN would be
            served as a number after the table conversion).
    """
    if not all_finite(features.detach()):
        raise ValueError(f"features of shape {list(features.shape)} hold NaN or infinity; cannot store them as fp8. "
                         "Check the encoder's weights and --compute-dtype (float16 can overflow), or store "
                         "--storage-dtype bfloat16")
    x = features.detach().float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def entry_tensors(features: torch.Tensor, storage_dtype: str) -> dict[str, torch.Tensor]:
    """The tensors of one stored entry: ``{"features": ...}`` in the storage dtype, plus
    ``features_scale`` for an fp8 store (features already fp8 are taken as they are only with
    their scale, so they are refused here). The codec's `encode`."""
    return codec_for(storage_dtype).encode(features)


def _lut(dtype: torch.dtype) -> np.ndarray:
    """The 256 e4m3 values in `dtype`, as the integer bit patterns of that dtype."""
    table = _LUTS.get(dtype)
    if table is None:
        values = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).to(dtype)
        table = _LUTS[dtype] = values.view(_INT_VIEW[dtype]).numpy().copy()
    return table


def dequantize_into(q_bytes: np.ndarray, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``q * scale`` into `out` in one pass over it.

    Args:
        q_bytes: the fp8 codes as uint8, any shape with `out.numel()` elements (a view into the
            map is fine: it is only read).
        scale: [tokens, 1] or [..., 1] float32, one per token of `out`.
        out: a contiguous CPU tensor [..., C] of dtype bfloat16, float16 or float32.

    Returns:
        `out`.
    """
    if out.dtype not in _INT_VIEW:
        raise ValueError(f"fp8 features dequantise to bfloat16, float16 or float32, not {out.dtype}")
    channels = out.shape[-1]
    codes = q_bytes.reshape(-1, channels)
    rows = out.view(-1, channels)
    bits = rows.view(_INT_VIEW[out.dtype]).numpy()
    factors = scale.reshape(-1, 1).to(out.dtype)
    table = _lut(out.dtype)
    for start in range(0, codes.shape[0], _BLOCK_TOKENS):
        stop = start + _BLOCK_TOKENS
        np.take(table, codes[start:stop], out=bits[start:stop])
        rows[start:stop].mul_(factors[start:stop])
    return out


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A new tensor ``q * scale`` in `dtype` (q: float8_e4m3fn [..., C], scale [..., 1])."""
    out = torch.empty(q.shape, dtype=dtype)
    return dequantize_into(q.contiguous().view(torch.uint8).numpy(), scale, out)
