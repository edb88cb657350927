"""Storage codecs: one per storage dtype, found with `codec_for(storage_dtype)`.

A codec (the `Codec` protocol, featstore.format.codecs.base) is everything that depends on how
features are stored: the tensors of an entry (`encode`), the bytes a token costs
(`bytes_per_token`), reading them back into a caller's output (`decode_into`, `decode`), the
validity check (`all_finite`, `check_tensors`), the tolerance a recompute is held to
(`tolerance`), the read dtype, and the format version its sets carry.

    bfloat16, float16, float32   PlainCodec (plain.py)   stored as they are    format version 1
    float8_e4m3fn                FP8Codec (fp8.py)       codes + per-token scale  format version 2

A new codec is one module here and one `register_codec` line below (its name must be a storage
dtype of the spec: `featstore.contract.dtypes.STORAGE_DTYPE_NAMES`). Importing this package needs
no torch; a codec imports it when it touches tensors.

Example:
    >>> from featstore.format.codecs import codec_for
    >>> codec_for("bfloat16").bytes_per_token(2048), codec_for("float8_e4m3fn").bytes_per_token(2048)
    (4096, 2052)
    >>> codec_for("float8_e4m3fn").format_version
    2
"""

from __future__ import annotations

from typing import Dict, Optional

from featstore.format.codecs.base import Codec
from featstore.format.codecs.fp8 import FP8_FORMAT_VERSION, SCALE_TENSOR, FP8Codec
from featstore.format.codecs.plain import FORMAT_VERSION, PlainCodec

__all__ = ["Codec", "register_codec", "codec_for", "codec_names", "supported_format_versions", "DEFAULT_CODEC",
           "RECOMPUTE_TOLERANCES", "FORMAT_VERSION", "FP8_FORMAT_VERSION", "SCALE_TENSOR"]

_CODECS: Dict[str, Codec] = {}
# dtype -> (max |stored - recomputed| / max |stored|, min cosine similarity) that storage
# rounding may cost: each codec's `tolerance` (featstore.ops.compare applies the loosest of it
# and the compute dtype's row). Filled by `register_codec`.
RECOMPUTE_TOLERANCES: Dict[str, tuple] = {}
# The codec of a set whose manifest names no storage dtype (a store written without a spec):
# its features are read as they are stored, like a plain codec's.
DEFAULT_CODEC = "bfloat16"


def register_codec(codec: Codec, *, overwrite: bool = False) -> Codec:
    """Register `codec` under its `name`; refuse a second codec of one name unless `overwrite`."""
    if codec.name in _CODECS and not overwrite:
        raise ValueError(f"codec {codec.name!r} is already registered (pass overwrite=True to replace it)")
    _CODECS[codec.name] = codec
    RECOMPUTE_TOLERANCES[codec.name] = tuple(codec.tolerance)
    return codec


def codec_for(storage_dtype: Optional[str]) -> Codec:
    """The codec of a storage dtype name (a spec's `storage_dtype`, `storage_dtype_of(manifest)`);
    None (a set without a spec) gets the plain `DEFAULT_CODEC`.

    Raises:
        ValueError: no codec stores that dtype (the message lists those that exist).
    """
    try:
        return _CODECS[DEFAULT_CODEC if storage_dtype is None else storage_dtype]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be one of {codec_names()}. Found {storage_dtype!r}") from None


def codec_names() -> list:
    """The storage dtypes a codec is registered for, in registration order."""
    return list(_CODECS)


def supported_format_versions() -> tuple:
    """The format versions of the registered codecs, sorted: what this featstore reads."""
    return tuple(sorted({c.format_version for c in _CODECS.values()}))


register_codec(PlainCodec("float32", tolerance=(1e-4, 0.999999)))  # rows leave ~5x headroom over the rounding
register_codec(PlainCodec("float16", tolerance=(2e-3, 0.99999)))
register_codec(PlainCodec("bfloat16", tolerance=(1e-2, 0.9999)))
register_codec(FP8Codec())
