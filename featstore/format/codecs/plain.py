"""The plain codec: features stored as they are, in bfloat16, float16 or float32 (format version 1).

Reading casts only when the caller asks for another dtype; a row of the stored dtype is one
byte copy out of the map.

Example:
    >>> import torch
    >>> from featstore.format.codecs import codec_for
    >>> c = codec_for("float16")
    >>> c.tensors, c.format_version, c.bytes_per_token(128), c.read_dtype()
    (('features',), 1, 256, torch.float16)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Tuple

from featstore.format.codecs.base import FEATURES, entry_name, all_finite, check_slot, copy_bytes, locate, no_tensor

__all__ = ["PlainCodec", "FORMAT_VERSION"]

FORMAT_VERSION = 1  # stores of unquantised features (bf16, fp16, fp32): unchanged since version 1
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class PlainCodec:
    """Features stored in the dtype `name` itself.

    Args:
        name: "bfloat16", "float16" or "float32".
        tolerance: (rel, cosine) a recompute is held to: storage rounding costs at most half an
            ulp of a value, i.e. of the tensor's max (bf16 2^-9, fp16 2^-12, fp32 2^-25).
    """

    name: str
    tolerance: Tuple[float, float]
    format_version: int = FORMAT_VERSION
    tensors: Tuple[str, ...] = (FEATURES,)

    @property
    def read_dtype_name(self) -> str:
        return self.name

    def bytes_per_token(self, channels: int) -> int:
        return _ITEMSIZE[self.name] * int(channels)

    def read_dtype(self):
        from featstore.contract.dtypes import torch_dtype

        return torch_dtype(self.name)

    def encode(self, features) -> dict:
        """``{"features": features}``, as given (the encoder returns them in the storage dtype)."""
        return {FEATURES: features}

    def decode(self, tensors: Mapping, dtype=None, *, key: str = "", where: str = ""):
        """`tensors["features"]`, cast to `dtype` when given (else as stored: no copy)."""
        features = tensors.get(FEATURES)
        if features is None:
            raise no_tensor(key, FEATURES, where, have=tensors)
        return features if dtype is None or features.dtype == dtype else features.to(dtype)

    def decode_into(self, value, out, *, key, memo: dict | None = None, cast: bool = False, where: str = "",
                    out_bytes=None, tensor: str = FEATURES):
        """Copy `tensor` (default the features) of the blob `value` into `out`.

        Args:
            value: one stored blob (a buffer; a view into the map is fine: it is only read).
            out: the caller's row, the entry's shape; any dtype when `cast`, else the stored one.
            key: the entry's key (str or bytes), named in errors.
            memo: `tensor_span`'s per-batch memo (one header comparison per entry, no parse).
            cast: whether a stored dtype other than `out.dtype` may be cast (a caller that asked
                for a dtype); else it is a ValueError (an `out` of the wrong dtype is a mistake).
            where: how errors name the store (and set).
            out_bytes: `out`'s bytes as a uint8 numpy array, when the caller keeps one.

        Returns:
            `out`. Raises EntrySchemaError (no such tensor), ValueError (`out` does not fit),
            CorruptEntryError (a malformed blob).
        """
        stored, shape, offset, nbytes = locate(value, tensor, key=key, memo=memo, where=where)
        check_slot(key, shape, stored, out, cast)
        if stored == out.dtype and out.device.type == "cpu" and out.is_contiguous():
            copy_bytes(value, offset, nbytes, out, out_bytes)  # the one copy out of the map
        else:  # the asked-for cast (or a strided / device row), during the one copy
            from featstore.format.blob import decode_tensor

            out.copy_(decode_tensor(value, tensor, key=entry_name(key)))
        return out

    def all_finite(self, t) -> bool:
        return all_finite(t)

    def check_tensors(self, tensors: Mapping, *, key: str) -> list:
        return []  # nothing beside `features`

