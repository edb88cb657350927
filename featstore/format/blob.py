"""Encode and decode one store value: a safetensors blob whose tensor data is 64-byte aligned.

Layout of a value (standard safetensors, so `safetensors.torch.load` reads it too):

    [u64 little-endian N][N bytes of JSON header, space-padded][tensor data]

The header is padded so that, once LMDB stores the value on overflow pages (16 bytes past a
4096-byte page boundary on 64-bit builds), the tensor data starts on a 64-byte boundary of the
map. Tensors are written largest itemsize first, so each one stays aligned to its itemsize.
`__metadata__` (all strings) carries the frame list, source fingerprints, the patch grid and a
CRC-32 of the whole entry (canonical header, then tensor bytes), because LMDB stores no
checksum of values.

Every value is untrusted input when decoding: header length is bounded, the JSON must have the
safetensors shape, dtypes come from a whitelist, offsets must tile the data exactly, and
shape x itemsize must equal the byte count. Each defect raises CorruptEntryError with its own
message. Shapes: features are `[frames_kept, tokens, channels]`.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Mapping

import torch

from featstore.errors import CorruptEntryError

__all__ = [
    "ALIGNMENT",
    "LMDB_VALUE_OFFSET",
    "MAX_HEADER_BYTES",
    "DTYPES",
    "Entry",
    "encode_entry",
    "decode_entry",
    "align_blob",
    "entry_checksum",
    "decode_tensor",
    "tensor_span",
]

ALIGNMENT = 64  # cache line; also what SIMD copies and future torch alignment checks want
LMDB_VALUE_OFFSET = 16  # a large LMDB value starts this far past a page boundary (64-bit build)
MAX_HEADER_BYTES = 1 << 20  # our headers are < 4 KiB; a bigger claim is corruption, not data

# safetensors dtype names -> torch dtypes; anything else is refused when decoding.
DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_CHECKSUM_KEY = "checksum"


@dataclass
class Entry:
    """A decoded value: named tensors (views into the value unless copied) and metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def features(self) -> torch.Tensor:
        """The main tensor, `[frames_kept, tokens, channels]`."""
        return self.tensors["features"]

    @property
    def frames(self) -> list[str]:
        """The ordered frame keys of the encoder call this entry came from (``[]`` if unrecorded).

        Raises:
            CorruptEntryError: the ``frames`` metadata is not a JSON list of strings.
        """
        raw = self.metadata.get("frames", "[]")
        try:
            frames = json.loads(raw)
        except json.JSONDecodeError:
            frames = None
        if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
            raise CorruptEntryError(f"metadata 'frames' is not a JSON list of strings: {raw[:200]!r}")
        return frames


def _header_checksum_text(header: Mapping) -> bytes:
    """The canonical bytes of a header, its checksum left out, that the checksum covers."""
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k != _CHECKSUM_KEY}
    canonical = dict(header, __metadata__=meta)
    return json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def entry_checksum(header: Mapping, data) -> str:
    """Checksum of a whole entry: CRC-32 over the canonical header JSON (checksum left out)
    and then the tensor bytes, so that a flipped byte in the metadata (frames, sources) is
    caught as surely as one in the features."""
    crc = zlib.crc32(_header_checksum_text(header))
    return "crc32:%08x" % (zlib.crc32(data, crc) & 0xFFFFFFFF)


def _as_bytes_view(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)


def encode_entry(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    value_offset: int = LMDB_VALUE_OFFSET,
) -> bytearray:
    """Serialise `tensors` and string `metadata` into one safetensors blob.

    Args:
        tensors: name -> tensor (any device; copied to CPU). Dtypes from `DTYPES` only.
        metadata: extra string metadata; the key ``"checksum"`` is reserved and filled here
            (CRC-32 of the canonical header and the tensor bytes, see `entry_checksum`).
        value_offset: where the value will start relative to a 64-byte boundary in the map;
            the default matches LMDB's overflow pages.

    Returns:
        The blob (a bytearray: one copy of the tensor bytes, none more), ready for `txn.put`.

    Example:
        >>> import torch
        >>> from featstore.format.blob import decode_entry, encode_entry
        >>> blob = encode_entry({"features": torch.zeros(1, 4, 8, dtype=torch.bfloat16)})
        >>> decode_entry(blob).features.shape
        torch.Size([1, 4, 8])
    """
    if not tensors:
        raise ValueError("encode_entry needs at least one tensor")
    if not isinstance(value_offset, int) or value_offset < 0:
        raise ValueError(f"value_offset must be a non-negative int. Found {value_offset!r}")
    for name in tensors:
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} is not allowed (a non-empty str other than '__metadata__')")
    meta = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata {k!r}: keys and values must be str (safetensors rule)")
        meta[k] = v
    # Largest itemsize first keeps every tensor aligned to its own itemsize.
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, object] = {}
    chunks = []
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} is not storable; use one of {sorted(DTYPES)}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        chunks.append(t)
        offset += nbytes
    # The checksum string has a fixed length, so the header's size is known before the
    # checksum is: lay out the whole blob once and copy the tensor bytes into it exactly once.
    header["__metadata__"] = meta
    meta[_CHECKSUM_KEY] = "crc32:00000000"
    prefix_len = len(_padded_prefix(_header_text(header), value_offset))
    blob = bytearray(prefix_len + offset)
    data = memoryview(blob)[prefix_len:]
    if offset:
        out = torch.frombuffer(blob, dtype=torch.uint8)[prefix_len:]
        pos = 0
        for t in chunks:
            src = _as_bytes_view(t)
            out[pos : pos + src.numel()].copy_(src)
            pos += src.numel()
    meta[_CHECKSUM_KEY] = entry_checksum(header, data)
    blob[:prefix_len] = _padded_prefix(_header_text(header), value_offset)
    return blob


def _header_text(header: Mapping) -> bytes:
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _padded_prefix(text: bytes, value_offset: int) -> bytes:
    """`[u64 N][header padded with spaces]` such that value_offset + 8 + N is 64-byte aligned.

    Spaces are what safetensors itself pads with, so stock readers accept the padding.
    """
    pad = (-(value_offset + 8 + len(text))) % ALIGNMENT
    return struct.pack("<Q", len(text) + pad) + text + b" " * pad


def align_blob(blob, value_offset: int) -> bytes | bytearray:
    """Re-pad the header of an encoded blob for a store whose values start `value_offset`
    bytes past a 64-byte boundary (`featstore.store.layout.lmdb_value_offset(env)`).

    Returns `blob` itself when it is already aligned for that offset (the common case, no
    copy); otherwise a new blob with the same header JSON and tensor bytes (one copy).

    Raises:
        CorruptEntryError: `blob` does not start with a well-formed header.
    """
    view = memoryview(blob).cast("B") if not isinstance(blob, bytes) else memoryview(blob)
    _, data_start = _parse_header(view, None)
    if (value_offset + data_start) % ALIGNMENT == 0:
        return blob if isinstance(blob, (bytes, bytearray)) else bytes(blob)
    text = bytes(view[8:data_start]).rstrip(b" ")
    return b"".join((_padded_prefix(text, value_offset), view[data_start:]))


def _fail(key: str | None, message: str) -> CorruptEntryError:
    where = f"entry {key!r}" if key is not None else "blob"
    return CorruptEntryError(f"{where}: {message}")


class _DuplicateName(Exception):
    pass


def _no_duplicates(pairs: list) -> dict:
    # json.loads keeps the last of duplicate names silently; a duplicated tensor name would
    # hide one tensor's bytes, so it is refused.
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateName(k)
        out[k] = v
    return out


def _parse_header(view: memoryview, key: str | None) -> tuple[dict, int]:
    """Return (header dict, offset of the data section). Bounds first, then JSON."""
    if len(view) < 8:
        raise _fail(key, f"truncated: {len(view)} bytes, less than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", view, 0)
    if n > MAX_HEADER_BYTES:
        raise _fail(key, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit "
                         "(featstore headers are a few KiB; this is corruption)")
    if 8 + n > len(view):
        raise _fail(key, f"truncated: header claims {n} bytes but only {len(view) - 8} follow")
    text = bytes(view[8 : 8 + n])
    try:
        header = json.loads(text.decode("utf-8"))
        # json.loads keeps the last of duplicate names silently. Checking every object with an
        # object_pairs_hook costs ~25% of a small read, so count first and only re-parse with
        # the hook when the count of tensor entries does not add up.
        if isinstance(header, dict) and text.count(b'"data_offsets"') != len(header) - ("__metadata__" in header):
            json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateName as e:
        raise _fail(key, f"header names {e.args[0]!r} twice") from None
    except RecursionError:
        raise _fail(key, "header JSON is nested too deeply to be a safetensors header") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise _fail(key, f"header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise _fail(key, f"header is a JSON {type(header).__name__}, not an object")
    return header, 8 + n


_Spec = tuple  # (name, dtype, shape, start, end)


def _check_tensor_specs(header: dict, data_len: int, key: str | None) -> list[_Spec]:
    """Validate each tensor's header entry, then that the tensors tile the data exactly."""
    specs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(key, f"tensor {name!r}: header entry must have exactly dtype, shape, data_offsets")
        dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise _fail(key, f"tensor {name!r}: unknown dtype {info['dtype']!r} (allowed: {sorted(DTYPES)})")
        shape, offs = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail(key, f"tensor {name!r}: shape {shape!r} is not a list of non-negative ints")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise _fail(key, f"tensor {name!r}: data_offsets {offs!r} is not a pair of ints")
        start, end = offs
        if not 0 <= start <= end:
            raise _fail(key, f"tensor {name!r}: data_offsets {offs} are not 0 <= begin <= end")
        itemsize = dtype.itemsize
        if math.prod(shape) * itemsize != end - start:
            raise _fail(key, f"tensor {name!r}: shape {shape} x {itemsize} bytes != {end - start} bytes at {offs}")
        if start % itemsize:
            # We write the largest itemsize first, so this never happens to our own blobs.
            raise _fail(key, f"tensor {name!r}: data offset {start} is not a multiple of its "
                             f"{itemsize}-byte itemsize (misaligned)")
        specs.append((name, dtype, shape, start, end))
    specs.sort(key=lambda s: (s[3], s[4]))
    # A blob cut short still tiles its (claimed) data contiguously: report that as truncation,
    # before the per-tensor range check would report it as a bad offset.
    tiled = all(a[4] == b[3] for a, b in zip(specs, specs[1:])) and (not specs or specs[0][3] == 0)
    if tiled and specs and specs[-1][4] > data_len:
        raise _fail(key, f"truncated: the tensors need {specs[-1][4]} data bytes but only "
                         f"{data_len} follow the header")
    for name, _, _, start, end in specs:
        if end > data_len:
            raise _fail(key, f"tensor {name!r}: data_offsets [{start}, {end}] lie outside the "
                             f"{data_len} data bytes")
    cursor = 0
    for name, _, _, start, end in specs:
        if start < cursor:
            raise _fail(key, f"tensor {name!r}: data_offsets [{start}, {end}] overlap the previous tensor")
        if start > cursor:
            raise _fail(key, f"tensor {name!r}: gap of {start - cursor} bytes before it")
        cursor = end
    if cursor != data_len:
        raise _fail(key, f"{data_len - cursor} trailing bytes after the last tensor")
    return specs


_readonly_warning_swallowed = False


def _frombuffer_quiet(view: memoryview, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    """`torch.frombuffer` without its warning about read-only buffers (the map is read-only by
    design). torch emits that warning once per process, so only the first read-only buffer
    needs the (not thread-safe, ~µs) `catch_warnings`; every other warning is left alone."""
    global _readonly_warning_swallowed
    if _readonly_warning_swallowed or not view.readonly:
        return torch.frombuffer(view, dtype=dtype, count=count, offset=offset)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        t = torch.frombuffer(view, dtype=dtype, count=count, offset=offset)
    _readonly_warning_swallowed = True
    return t


def _byte_view(value) -> memoryview:
    view = memoryview(value)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _validated_layout(view: memoryview, key: str | None) -> tuple[dict, int, list]:
    """Full validation of a blob's header: (header, data start, tensor specs sorted by offset)."""
    header, data_start = _parse_header(view, key)
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _fail(key, "__metadata__ must map strings to strings")
    specs = _check_tensor_specs(header, len(view) - data_start, key)
    if not specs:
        raise _fail(key, "holds no tensor")
    return header, data_start, specs


def _tensors(view: memoryview, data_start: int, specs, *, copy: bool) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, dtype, shape, start, end in specs:
        offset = data_start + start
        if end == start:  # torch.frombuffer refuses empty buffers
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        t = None
        if not copy and dtype != torch.bool:
            t = _frombuffer_quiet(view, dtype, (end - start) // dtype.itemsize, offset)
            # A value at an address that is not a multiple of the itemsize (small values sit
            # at odd addresses on LMDB leaf pages) must not be used as `dtype`: copy it instead.
            if t.data_ptr() % dtype.itemsize:
                t = None
        if t is None:
            raw = _frombuffer_quiet(view, torch.uint8, end - start, offset).clone()
            t = raw.ne(0) if dtype == torch.bool else raw.view(dtype)
        tensors[name] = t.view(shape)
    return tensors


# Tensor layouts of headers already validated in full, keyed by the header's tensor part (the
# bytes before `,"__metadata__":`, where featstore's encoder puts it) and the data length.
# Entries of one store share a handful of layouts; a hit skips JSON parsing and the checks,
# which dominate the read of small entries. Everything served on a hit is determined by the
# key (dtypes, shapes, offsets tiling exactly the data length), so it is as checked as a miss.
_LAYOUTS: dict[tuple[bytes, int], list] = {}
_MAX_LAYOUTS = 1024
_METADATA_MARK = b',"__metadata__":'


def _layout_key(view: memoryview) -> tuple[tuple[bytes, int] | None, int]:
    """(cache key or None, data start) from the length prefix, without parsing JSON."""
    if len(view) < 8:
        return None, 0
    (n,) = struct.unpack_from("<Q", view, 0)
    if n > MAX_HEADER_BYTES or 8 + n > len(view):
        return None, 0
    head = bytes(view[8 : 8 + n])
    cut = head.find(_METADATA_MARK)
    # A tensor described after the metadata would escape the prefix: never cache that shape.
    if cut <= 0 or b'"data_offsets"' in head[cut:]:
        return None, 0
    return (head[:cut], len(view) - 8 - n), 8 + n


def tensor_span(value, name: str = "features", *, key: str | bytes | None = None,
                memo: dict | None = None) -> tuple[torch.dtype, tuple, int, int]:
    """Where one tensor of a blob lies: (dtype, shape, byte offset in the value, byte count).

    The hot path of `FeatureStore.read_into`, which then copies exactly those bytes. Same
    guarantees as `decode_entry` for that tensor (dtype whitelist, offsets inside the value and
    tiling it exactly, shape x itemsize == bytes), with the metadata left unparsed; a header
    layout validated before is recognised by its bytes and not parsed again (see `_LAYOUTS`).

    Args:
        value: the blob.
        name: the tensor.
        key: the store key (str or its UTF-8 bytes), named in error messages only.
        memo: a dict the caller keeps over a batch: the answer for the last layout of each
            (header length, value length) is kept there with the header bytes it came from, so
            that the next value of the same layout costs one comparison of those bytes (the
            tensor part of the header and the metadata mark), not a parse nor a copy.

    Raises:
        CorruptEntryError: the blob is malformed (names `key` and the defect).
        KeyError: the blob has no tensor `name`.
    """
    view = _byte_view(value)
    if memo is not None and len(view) >= 8:
        (n,) = struct.unpack_from("<Q", view, 0)
        hit = memo.get((n, len(view), name))
        if hit is not None and view[8 : 8 + len(hit[0])] == hit[0]:
            return hit[1]
    if isinstance(key, bytes):
        key = key.decode("utf-8", "backslashreplace")
    cache_key, data_start = _layout_key(view)
    specs = _LAYOUTS.get(cache_key) if cache_key is not None else None
    if specs is None:
        _, data_start, specs = _validated_layout(view, key)
        if cache_key is not None and len(_LAYOUTS) < _MAX_LAYOUTS:
            _LAYOUTS[cache_key] = specs
    for spec_name, dtype, shape, start, end in specs:
        if spec_name == name:
            span = dtype, tuple(shape), data_start + start, end - start
            if memo is not None and cache_key is not None:
                # Only layouts `_LAYOUTS` accepts (every tensor before the metadata) are memoised.
                memo[(data_start - 8, len(view), name)] = (cache_key[0] + _METADATA_MARK, span)
            return span
    raise KeyError(name)


def decode_tensor(value, name: str = "features", *, key: str | None = None) -> torch.Tensor:
    """Zero-copy view of one tensor of a blob (see `tensor_span` for what is checked)."""
    dtype, shape, offset, nbytes = tensor_span(value, name, key=key)
    spec = (name, dtype, list(shape), offset, offset + nbytes)
    return _tensors(_byte_view(value), 0, [spec], copy=False)[name]


def decode_entry(
    value,
    *,
    key: str | None = None,
    verify: bool = False,
    copy: bool = False,
) -> Entry:
    """Decode a blob into tensors that view `value` (zero-copy) unless `copy=True`.

    Args:
        value: bytes, bytearray or memoryview (e.g. from an LMDB ``buffers=True`` transaction).
        key: the store key, named in error messages.
        verify: recompute the CRC-32 of the canonical header and the tensor bytes and compare
            it with the stored one.
        copy: return tensors that own their memory (safe after the transaction ends).

    Returns:
        An `Entry`. Not guaranteed: views over an LMDB map are valid only while the read
        transaction that produced `value` is open and the environment is open; they are
        read-only memory, so writing into them crashes the process. Misaligned values (small
        values on LMDB leaf pages) are copied rather than viewed.

    Raises:
        CorruptEntryError: the blob is malformed or its checksum does not match; the message
            names `key` and the defect.
    """
    view = _byte_view(value)
    header, data_start, specs = _validated_layout(view, key)
    meta = header.get("__metadata__", {})
    if verify:
        stored = meta.get(_CHECKSUM_KEY)
        if stored is None:
            raise _fail(key, "has no checksum in its metadata; cannot verify it")
        actual = entry_checksum(header, view[data_start:])
        if actual != stored:
            raise _fail(key, f"checksum mismatch (stored {stored}, computed {actual}): the value is corrupt")
    tensors = _tensors(view, data_start, specs, copy=copy)
    return Entry(tensors=tensors, metadata=dict(meta))
