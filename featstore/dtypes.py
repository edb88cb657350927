"""The dtype names an encoder spec may use, and their torch dtypes: the one map featstore uses.

`DTYPE_NAMES` needs no torch (the CLI offers them as choices); `TORCH_DTYPES` imports torch on
first use, so that importing this module stays cheap.

Example:
    >>> from featstore.dtypes import DTYPE_NAMES, torch_dtype
    >>> DTYPE_NAMES
    ('bfloat16', 'float16', 'float32')
    >>> torch_dtype("bfloat16")
    torch.bfloat16
"""

from __future__ import annotations

__all__ = ["DTYPE_NAMES", "TORCH_DTYPES", "torch_dtype"]

# Closed choice of compute and storage dtypes (EncoderSpec.compute_dtype / storage_dtype).
DTYPE_NAMES = ("bfloat16", "float16", "float32")

_TORCH_DTYPES: dict | None = None


def _table() -> dict:
    global _TORCH_DTYPES
    if _TORCH_DTYPES is None:
        import torch

        _TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    return _TORCH_DTYPES


def torch_dtype(name: str):
    """The torch dtype of a spec dtype name; ValueError naming the value and the choices."""
    try:
        return _table()[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}. Found {name!r}") from None


def __getattr__(name: str):
    # TORCH_DTYPES (name -> torch.dtype) is built on first access: no torch import before.
    if name == "TORCH_DTYPES":
        return dict(_table())
    raise AttributeError(f"module 'featstore.dtypes' has no attribute {name!r}")
