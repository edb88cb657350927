"""The dtype names an encoder spec may use, and their torch dtypes: the one map featstore uses.

`DTYPE_NAMES` (compute and storage) and `STORAGE_DTYPE_NAMES` (storage only: adds fp8, stored
with a per-token scale, featstore.format.fp8) need no torch (the CLI offers them as choices); `TORCH_DTYPES` imports torch on
first use, so that importing this module stays cheap.

Example:
    >>> from featstore.contract.dtypes import DTYPE_NAMES, torch_dtype
    >>> DTYPE_NAMES
    ('bfloat16', 'float16', 'float32')
    >>> torch_dtype("bfloat16")
    torch.bfloat16
"""

from __future__ import annotations

__all__ = ["DTYPE_NAMES", "STORAGE_DTYPE_NAMES", "QUANTISED_DTYPE_NAMES", "TORCH_DTYPES", "torch_dtype", "is_quantised"]

# Closed choice of compute dtypes (EncoderSpec.compute_dtype), also storable as they are.
DTYPE_NAMES = ("bfloat16", "float16", "float32")
# Closed choice of storage dtypes (EncoderSpec.storage_dtype): fp8 is stored with a per-token
# scale beside it and read back dequantised (featstore.format.fp8, docs/FORMAT.md §4.1).
QUANTISED_DTYPE_NAMES = ("float8_e4m3fn",)
STORAGE_DTYPE_NAMES = DTYPE_NAMES + QUANTISED_DTYPE_NAMES


def is_quantised(storage_dtype) -> bool:
    """Whether a spec's storage dtype name stores scaled fp8 (features + features_scale)."""
    return storage_dtype in QUANTISED_DTYPE_NAMES

_TORCH_DTYPES: dict | None = None


def _table() -> dict:
    global _TORCH_DTYPES
    if _TORCH_DTYPES is None:
        import torch

        _TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                         "float8_e4m3fn": torch.float8_e4m3fn}
    return _TORCH_DTYPES


def torch_dtype(name: str):
    """The torch dtype of a spec dtype name; ValueError naming the value and the choices."""
    try:
        return _table()[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {list(STORAGE_DTYPE_NAMES)}. Found {name!r}") from None


def __getattr__(name: str):
    # TORCH_DTYPES (name -> torch.dtype) is built on first access: no torch import before.
    if name == "TORCH_DTYPES":
        return dict(_table())
    raise AttributeError(f"module 'featstore.contract.dtypes' has no attribute {name!r}")
