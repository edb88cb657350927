"""The checks `frames=` and `data_root=` ask of one stored entry, on the batch read path
(`read_into`, `plan_read`) and in `get`.

The frame list an entry was computed on is compared as stored bytes: the record `featstore
build` writes for the wanted list (`_frames_record`) must appear once as the header's `frames`
metadata, so a hit costs a search in the header's bytes, not a JSON parse. Anything else (another
list, or a record written another way) is decoded and compared as a list, so a miss raises
exactly what `get(..., frames=)` raises.

Example:
    >>> from featstore.format.blob import Entry
    >>> from featstore.store.entry_checks import check_frames
    >>> entry = Entry(tensors={}, metadata={"frames": '["a/0.jpg"]'})
    >>> check_frames("a", entry, ["./a/0.jpg"], "S")          # the same list, spelled otherwise
    >>> from featstore.errors import MissingKeyError
    >>> try:
    ...     check_frames("a", entry, ["a/1.jpg"], "S")      # another list: a miss
    ... except MissingKeyError:
    ...     print("a miss")
    a miss
"""

from __future__ import annotations

import json
from typing import Sequence

from featstore.errors import MissingKeyError
from featstore.format.blob import Entry, decode_entry
from featstore.format.keys import normalize_key
from featstore.store.freshness import check_sources

__all__ = ["check_frames", "check_entry"]

# The metadata mark featstore's encoder writes between a header's tensors and its metadata.
_METADATA_MARK = b',"__metadata__":'
_FRAMES_NAME = b'"frames":'


def _frames_record(frames: Sequence[str]) -> bytes:
    r"""The bytes of a `frames` metadata item as `featstore build` writes it for `frames` (the
    list as JSON, `featstore.build.encode.unit_metadata`, then that string in the header's JSON).

    Example:
        >>> _frames_record(["a/0.jpg", "a/1.jpg"])
        b'"frames":"[\\"a/0.jpg\\", \\"a/1.jpg\\"]"'
    """
    listed = json.dumps([normalize_key(f) for f in frames], ensure_ascii=False)
    return _FRAMES_NAME + json.dumps(listed, ensure_ascii=False).encode("utf-8")


def _header_bytes(value) -> bytes | None:
    view = memoryview(value)
    if len(view) < 8:
        return None
    n = int.from_bytes(view[:8], "little")
    return bytes(view[8:8 + n]) if 8 + n <= len(view) else None


def _stores_frames(value, record: bytes) -> bool:
    """Whether the header of `value` holds `record` as its one `frames` metadata item (bytes only).

    True is a verdict: inside a JSON string every quote is escaped, so `"frames":` can only be
    a key, and `record` bounded by `{`/`,` and `,`/`}` is that key's whole value. False means
    "not shown here" (another list, or one written another way): the caller decodes and compares."""
    head = _header_bytes(value)
    cut = -1 if head is None else head.find(_METADATA_MARK)
    if cut < 0:
        return False
    meta = head[cut + len(_METADATA_MARK):]
    at = meta.find(record)
    end = at + len(record)
    return (at > 0 and meta[at - 1:at] in (b"{", b",") and meta[end:end + 1] in (b",", b"}")
            and meta.count(_FRAMES_NAME) == 1)


def _header_metadata(value) -> dict | None:
    """The `__metadata__` of a value's header (one JSON parse of the header, no tensor built),
    or None when it is not a well-formed dict of strings (the caller then decodes in full)."""
    head = _header_bytes(value)
    try:
        meta = json.loads(head).get("__metadata__", {}) if head is not None else None
    except (ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        return None
    return meta


def check_frames(key: str, entry: Entry, frames: Sequence[str], where: str) -> None:
    """MissingKeyError unless `entry` was computed on `frames` (normalised like keys)."""
    wanted = [normalize_key(f) for f in frames]
    if entry.frames != wanted:
        raise MissingKeyError(
            f"key {key!r} in {where} was computed on frames {entry.frames}, but {wanted} "
            "were asked for: the cached context differs (a miss). Rebuild with the same annotations."
        )


def check_entry(kb: bytes, value, wanted: Sequence[str] | None, data_root, where: str) -> None:
    """The checks `frames=` (`wanted`) and `data_root=` ask for, on one entry, without decoding it.

    The frame list is compared as bytes (`_stores_frames`); when that shows no match, the entry
    is decoded and checked as a whole (`check_frames`). With `data_root` only the metadata is
    parsed, for the `sources` record the freshness check compares (`check_sources`)."""
    name = kb.decode()
    if wanted is None or _stores_frames(value, _frames_record(wanted)):
        if data_root is None:
            return
        meta = _header_metadata(value)
        if meta is not None:
            check_sources(name, Entry(tensors={}, metadata=meta), data_root, where)
            return
    entry = decode_entry(value, key=name)
    if wanted is not None:
        check_frames(name, entry, wanted, where)
    if data_root is not None:
        check_sources(name, entry, data_root, where)
