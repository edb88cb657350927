"""The fp8 codec: per-token scaled float8_e4m3fn features (format version 2, docs/FORMAT.md §4.1).

One entry holds `features` [F, N, C] float8_e4m3fn and `features_scale` [F, N, 1] float32; the
arithmetic lives in `featstore.format.fp8` (quantize_fp8, dequantize_into). Reading dequantises
(code x scale) straight into the caller's output, bfloat16 by default (what the merger takes).

Example:
    >>> import torch
    >>> from featstore.format.codecs import codec_for
    >>> c = codec_for("float8_e4m3fn")
    >>> c.tensors, c.format_version, c.bytes_per_token(2048), c.read_dtype()
    (('features', 'features_scale'), 2, 2052, torch.bfloat16)
    >>> stored = c.encode(torch.randn(1, 4, 8))
    >>> stored["features"].dtype, c.decode(stored).dtype
    (torch.float8_e4m3fn, torch.bfloat16)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Tuple

from featstore.format.codecs.base import (FEATURES, all_finite, check_slot, corrupt_dtype, entry_name, locate,
                                          no_tensor)

__all__ = ["FP8Codec", "FP8_FORMAT_VERSION", "SCALE_TENSOR"]

# `features` alone would be misread without its per-token scale by a version-1 reader, so fp8
# sets carry version 2, which such readers refuse.
FP8_FORMAT_VERSION = 2
SCALE_TENSOR = "features_scale"
_SCALE_BYTES = 4  # one float32 per token: 0.2% of a 2048-channel fp8 row


@dataclass(frozen=True)
class FP8Codec:
    """float8_e4m3fn codes with one float32 scale per token.

    tolerance: rounding costs at most half an ulp, 2^-4 of a value, so at most 0.0625 of the
    token's (hence the tensor's) max; cosine measured 0.9997 on VGGT-1B-shaped features
    (benchmarks/fp8_bench.py). A hard bound: (0.08, 0.999) leaves 1.3x on the error and ~3x on
    1 - cosine.
    """

    name: str = "float8_e4m3fn"
    tolerance: Tuple[float, float] = (8e-2, 0.999)
    format_version: int = FP8_FORMAT_VERSION
    tensors: Tuple[str, ...] = (FEATURES, SCALE_TENSOR)
    read_dtype_name: str = "bfloat16"

    def bytes_per_token(self, channels: int) -> int:
        return int(channels) + _SCALE_BYTES

    def read_dtype(self):
        import torch

        return torch.bfloat16

    def encode(self, features) -> dict:
        """``{"features": codes, "features_scale": scale}`` of unquantised `features` [..., C].

        Raises:
            ValueError: `features` are already float8_e4m3fn (their scale is lost), or hold NaN
                or infinity (fp8 has no infinity; a NaN would be served as a number).
        """
        import torch

        from featstore.format.fp8 import quantize_fp8

        if features.dtype == torch.float8_e4m3fn:
            raise ValueError("features are already float8_e4m3fn without their scale; pass the unquantised features")
        q, scale = quantize_fp8(features)
        return {FEATURES: q, SCALE_TENSOR: scale}

    def decode(self, tensors: Mapping, dtype=None, *, key: str = "", where: str = ""):
        """A new tensor ``codes x scale`` in `dtype` (default bfloat16) from one entry's tensors."""
        import torch

        from featstore.format.fp8 import dequantize

        codes = tensors.get(FEATURES)
        if codes is None:
            raise no_tensor(key, FEATURES, where, have=tensors)
        if codes.dtype != torch.float8_e4m3fn:
            raise corrupt_dtype(key, where, codes.dtype, self.name)
        scale = tensors.get(SCALE_TENSOR)
        if scale is None:
            raise no_tensor(key, SCALE_TENSOR, where, have=tensors)
        self._check_scale_dtype(key, where, scale.dtype)
        return dequantize(codes, scale, dtype or self.read_dtype())

    def decode_into(self, value, out, *, key, memo: dict | None = None, cast: bool = True, where: str = "",
                    out_bytes=None):
        """Dequantise the features of the blob `value` into `out` (bfloat16, float16 or float32),
        in one pass over it (`featstore.format.fp8.dequantize_into`). `cast` is always allowed
        (the codes are never served as they are); `out_bytes` is not needed.

        Raises:
            ValueError: `out` is not the entry's shape. CorruptEntryError: the features are not
                fp8, or the scale is not float32. EntrySchemaError: no `features_scale`.
        """
        import numpy as np
        import torch

        from featstore.format.fp8 import dequantize, dequantize_into

        stored, shape, offset, nbytes = locate(value, FEATURES, key=key, memo=memo, where=where)
        check_slot(key, shape, stored, out, cast=True)
        if stored != torch.float8_e4m3fn:
            raise corrupt_dtype(key, where, stored, self.name)
        scale = self._scale(value, key, where)
        if out.device.type == "cpu" and out.is_contiguous():
            dequantize_into(np.frombuffer(value, np.uint8, nbytes, offset), scale, out)
        else:  # a strided or device `out`: dequantise, then copy into it
            from featstore.format.blob import decode_tensor

            out.copy_(dequantize(decode_tensor(value, FEATURES, key=entry_name(key)), scale, out.dtype))
        return out

    def all_finite(self, t) -> bool:
        return all_finite(t)

    def check_tensors(self, tensors: Mapping, *, key: str) -> list:
        """The scale beside fp8 features: float32 [F, N, 1], finite and positive."""
        import torch

        features, scale = tensors.get(FEATURES), tensors.get(SCALE_TENSOR)
        if scale is None:
            return [("shape", f"entry {key!r}: fp8 features without their '{SCALE_TENSOR}' tensor")]
        want = list(features.shape[:-1]) + [1] if features is not None else None
        if scale.dtype != torch.float32 or (want is not None and list(scale.shape) != want):
            return [("shape", f"entry {key!r}: {SCALE_TENSOR} is {list(scale.shape)} "
                              f"{str(scale.dtype).removeprefix('torch.')}, expected {want} float32")]
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            return [("corrupt", f"entry {key!r}: {SCALE_TENSOR} holds values that are not finite and positive")]
        return []

    def _check_scale_dtype(self, key, where: str, dtype) -> None:
        import torch

        from featstore.errors import CorruptEntryError

        if dtype != torch.float32:
            raise CorruptEntryError(f"entry {entry_name(key)!r} in {where}: {SCALE_TENSOR} is {dtype}, not float32; "
                                    "the entry was not written by featstore: run `featstore verify` and rebuild it")

    def _scale(self, value, key, where: str):
        """The per-token scale of one blob (a small copy)."""
        import numpy as np
        import torch

        dtype, _, offset, nbytes = locate(value, SCALE_TENSOR, key=key, where=where)
        self._check_scale_dtype(key, where, dtype)
        return torch.from_numpy(np.frombuffer(value, np.float32, nbytes // 4, offset).copy())
