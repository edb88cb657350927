"""The batch read path of `FeatureStore`: `read_into` (a batch into one output, one copy out of
the map per entry) and `plan_read` + `ReadPlan` (locate and check first, copy later, for an
output sized from the entries' shapes: training's batch slots).

What an entry's bytes mean is the set's storage codec's (`featstore.store.layout.codec_of`,
featstore.format.codecs; `reading_codec`). When the codec serves the values as stored (its read
dtype is its storage dtype: bfloat16, float16, float32) and the output is of the stored dtype,
the one copy is the located bytes, and the output's row is checked once per layout of a batch,
not per entry. Otherwise the codec writes into the row: a cast the caller asked for
(`decode_into`), or a conversion in the same single pass (fp8's codes x scale; a gather takes
the rows of each tensor the codec stores, then `decode`). Nothing here knows a dtype by name.

The per-entry work is kept to the copy: frame lists are compared as stored bytes
(featstore.store.entry_checks), and each tensor is located through `tensor_span`'s per-batch
memo (one comparison of header bytes per entry, no parse). `FeatureStore.read_into` and
`FeatureStore.plan_read` are the public entry points; their docstrings say what is guaranteed.

Example:
    >>> import torch
    >>> from featstore import FeatureStore
    >>> store = FeatureStore("data/")
    >>> with store.snapshot():
    ...     plan = store.plan_read(["scene_a/000.jpg"])
    ...     feats = plan.copy_into(0, torch.empty(plan.shapes[0], dtype=plan.dtype))
    >>> bool(torch.equal(feats, store.read_into(["scene_a/000.jpg"])[0]))
    True
    >>> store.close()
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch

from featstore.contract.dtypes import torch_dtype
from featstore.errors import FeatstoreError, MissingKeyError
from featstore.format.blob import decode_entry, tensor_span
from featstore.format.codecs import DEFAULT_CODEC, codec_for
from featstore.format.codecs.base import FEATURES, check_slot, corrupt_dtype, locate, no_tensor
from featstore.format.keys import key_to_bytes
from featstore.store.entry_checks import check_entry, check_frames
from featstore.store.freshness import check_sources
from featstore.store.layout import codec_of
from featstore.store.prefetch import prefetch

if TYPE_CHECKING:
    from featstore.store.reader import FeatureStore

__all__ = ["ReadPlan", "read_into", "plan_read", "reading_codec"]

# A tensor other than the features is read as it is stored: the plain codec copies it (or casts
# it when the caller asked for a dtype) whatever the set's storage codec is.
_AS_STORED = codec_for(DEFAULT_CODEC)


def reading_codec(manifest: dict, tensor: str = FEATURES):
    """(codec, served) for reading `tensor` of a set's entries: the set's storage codec for the
    features (a tensor beside them is read as stored), and the dtype the codec serves them as
    when that is not the stored one: None for a codec whose features read back as stored (a set
    without a spec may hold float32 under the default codec's name), its read dtype for one that
    converts (fp8's codes are always dequantised).

    Example:
        >>> from featstore.store.batch_read import reading_codec
        >>> codec, served = reading_codec({"encoder": {"storage_dtype": "float8_e4m3fn"}})
        >>> codec.name, served
        ('float8_e4m3fn', torch.bfloat16)
        >>> reading_codec({"encoder": {"storage_dtype": "float8_e4m3fn"}}, "depth")[1] is None
        True
    """
    codec = codec_of(manifest) if tensor == FEATURES else _AS_STORED
    return codec, (None if codec.read_dtype_name == codec.name else codec.read_dtype())


def _decoder(codec, tensor: str):
    """The codec's `decode_into` for `tensor` (bound once per batch, not per entry)."""
    return codec.decode_into if tensor == FEATURES else functools.partial(codec.decode_into, tensor=tensor)


def _byte_rows(out: torch.Tensor | None):
    """`out` as a writable [rows, bytes] uint8 numpy array sharing its memory, or None when
    that view does not exist (no out yet, not on the CPU, not contiguous)."""
    if out is None or out.device.type != "cpu" or not out.is_contiguous() or out.dim() < 1 or out.requires_grad:
        return None
    return out.reshape(out.shape[0], -1).view(torch.uint8).numpy()


def _check_decoded(kb: bytes, value, wanted: Sequence[str] | None, data_root, where: str) -> None:
    """Decode one entry with its checksum verified (`verify_checksums=True`), then the checks
    `frames=` and `data_root=` ask for on the decoded entry."""
    name = kb.decode()
    entry = decode_entry(value, key=name, verify=True)
    if wanted is not None:
        check_frames(name, entry, wanted, where)
    if data_root is not None:
        check_sources(name, entry, data_root, where)


def read_into(store: "FeatureStore", keys: Iterable, out: torch.Tensor | None = None, *,
              dtype: torch.dtype | None = None, tensor: str = FEATURES,
              frames: Sequence[Sequence[str]] | None = None, data_root: str | os.PathLike | None = None,
              pin_memory: bool = False) -> torch.Tensor:
    """`FeatureStore.read_into` (its docstring says what is guaranteed)."""
    keys = list(keys)
    if not keys:
        raise ValueError("read_into needs at least one key")
    if frames is not None and len(frames) != len(keys):
        raise ValueError(f"frames has {len(frames)} lists for {len(keys)} keys; pass one frame list per key")
    if out is not None and (out.dim() < 1 or out.shape[0] != len(keys)):
        raise ValueError(f"out has shape {tuple(out.shape)}: it needs one row per key ({len(keys)} keys)")
    if out is not None and dtype is not None and out.dtype != dtype:
        raise ValueError(f"out is {out.dtype} but dtype={dtype} was asked for; pass one of them")
    kbs = [key_to_bytes(k) for k in keys]  # every key checked before any read
    store._environment()
    where = store._where
    codec, served = reading_codec(store._manifest, tensor)
    decode_into = _decoder(codec, tensor)
    # A stored dtype other than out's is cast only when the caller asked for a dtype (a
    # converting codec's values are always converted); an `out` of another dtype is a mistake.
    cast = dtype is not None or served is not None
    verify, checks = store.verify_checksums, frames is not None or data_root is not None
    memo: dict = {}  # tensor_span's per-batch memo: one layout, one byte comparison per entry
    rows = _byte_rows(out)
    checked = None  # the (dtype, shape) of an entry already checked against out's row
    with store._read_txn() as txn:
        values = store._values(txn, kbs, keys)
        for i, (kb, value) in enumerate(zip(kbs, values)):
            if verify:
                _check_decoded(kb, value, None if frames is None else frames[i], data_root, where)
            elif checks:  # the frames by their stored bytes, the sources by the metadata only
                check_entry(kb, value, None if frames is None else frames[i], data_root, where)
            if served is None or out is None:  # (a converting codec locates its tensors itself)
                try:  # tensor_span itself, not `locate`: this is the per-entry hot path
                    stored, shape, offset, nbytes = tensor_span(value, tensor, key=kb, memo=memo)
                except KeyError:
                    raise no_tensor(kb, tensor, where, value=value) from None
            if out is None:
                want = dtype if dtype is not None else served if served is not None else stored
                out = torch.empty((len(keys), *shape), dtype=want, pin_memory=pin_memory)
                rows = _byte_rows(out)
            if served is None and stored == out.dtype and rows is not None:
                # Values as stored, in out's dtype: the one copy is the located bytes (the row
                # checked once per layout of the batch, not per entry).
                if checked != (stored, shape):
                    check_slot(kb, shape, stored, out[i], cast)
                    checked = (stored, shape)
                np.copyto(rows[i], np.frombuffer(value, np.uint8, nbytes, offset))
            else:  # the codec's copy, cast or conversion into the row (it checks the row)
                decode_into(value, out[i], key=kb, memo=memo, cast=cast, where=where)
    return out


def plan_read(store: "FeatureStore", keys: Iterable, *, tensor: str = FEATURES,
              frames: Sequence[Sequence[str]] | None = None, data_root: str | os.PathLike | None = None,
              missing: str = "raise") -> "ReadPlan":
    """`FeatureStore.plan_read` (its docstring says what is guaranteed)."""
    if missing not in ("raise", "skip"):
        raise ValueError(f"missing must be 'raise' or 'skip'. Found {missing!r}")
    keys = list(keys)
    if frames is not None and len(frames) != len(keys):
        raise ValueError(f"frames has {len(frames)} lists for {len(keys)} keys; pass one frame list per key")
    kbs = [key_to_bytes(k) for k in keys]
    store._environment()
    txn = store._rec.pinned()
    if txn is None:
        raise FeatstoreError(f"{store._where}: plan_read needs a read scope: call it inside "
                             "`with store.snapshot():` and copy before the block ends")
    where = store._where
    codec, served = reading_codec(store._manifest, tensor)
    # A converting codec's features are stored in its own dtype; anything else was not written
    # by featstore (checked here, at plan time, so that no copy starts from such an entry).
    stored_as = None if served is None else torch_dtype(codec.name)
    errors: list = [None] * len(keys)
    absent = [False] * len(keys)
    values: list = []
    for i, (kb, key) in enumerate(zip(kbs, keys)):  # every key looked up before any is checked
        value = txn.get(kb, db=store._db)
        if value is None:
            errors[i], absent[i] = store._missing(key, txn), True
            if missing == "raise":
                raise errors[i]
        values.append(value)
    if store.prefetch:
        prefetch(store._rec, [v for v in values if v is not None])
    spans: list = [None] * len(keys)
    memo: dict = {}
    for i, (kb, value) in enumerate(zip(kbs, values)):
        if value is None:
            continue
        try:
            if store.verify_checksums:
                decode_entry(value, key=kb.decode(), verify=True)
            if frames is not None or data_root is not None:
                check_entry(kb, value, None if frames is None else frames[i], data_root, where)
        except MissingKeyError as e:
            if missing == "raise":
                raise
            errors[i], values[i] = e, None
            continue
        span = locate(value, tensor, key=kb, memo=memo, where=where)
        if stored_as is not None and span[0] != stored_as:
            raise corrupt_dtype(kb, where, span[0], codec.name)
        spans[i] = span
    plan = ReadPlan(store, txn, keys, kbs, values, spans, errors, codec=codec, served=served, tensor=tensor,
                    memo=memo, where=where)
    plan.absent = absent
    return plan


class ReadPlan:
    """The located, checked entries of one `FeatureStore.plan_read`, to copy out of the map.

    Attributes:
        keys: the keys, in the order given.
        shapes: each entry's tensor shape ([frames, tokens, channels] for features), None for a
            key that missed (under ``missing="skip"``).
        errors: the MissingKeyError (StaleEntryError, ...) of each key that missed, else None.
        absent: per key, whether it missed because it has no entry at all (`read_into` raises
            those first: it looks every key up before it checks any entry).
        dtype: what `copy_into` writes: the stored dtype, or the codec's read dtype when it
            converts (bfloat16 for an fp8 store's features).

    Valid only inside the snapshot block it was planned in: `copy_into` refuses afterwards
    (the views it copies from belong to that block's read transaction).
    """

    def __init__(self, store: "FeatureStore", txn, keys, kbs, values, spans, errors, *, codec, served, tensor,
                 memo, where):
        self._store, self._txn, self._kbs, self._values, self._spans = store, txn, kbs, values, spans
        self._codec, self._served, self._memo, self._where = codec, served, memo, where
        self._decode_into = _decoder(codec, tensor)
        self.keys, self.errors = keys, errors
        self.absent = [False] * len(keys)
        self.shapes = [None if s is None else tuple(s[1]) for s in spans]
        stored = next((s[0] for s in spans if s is not None), None)
        self.dtype = served if served is not None else stored

    def numel(self, i: int | None = None) -> int:
        """Elements of entry `i` (0 for a miss), or of all entries when `i` is None."""
        if i is None:
            return sum(self.numel(j) for j in range(len(self.keys)))
        shape = self.shapes[i]
        return 0 if shape is None else int(np.prod(shape, dtype=np.int64))

    def copy_into(self, i: int, out: torch.Tensor, rows=None) -> torch.Tensor:
        """Copy entry `i`'s tensor into `out`, the one copy out of the map (an fp8 store's
        codes dequantised on the way).

        Args:
            i: the entry (a planned key, not a miss).
            out: a contiguous CPU tensor of `dtype` with as many elements as the rows copied
                (any shape: it is filled as [rows, channels]); e.g. a view into shared memory.
            rows: None (the whole tensor, in order) or an int64 numpy array of token rows of
                the tensor seen as [frames * tokens, channels], copied in that order (a gather:
                e.g. training's merger order, which also leaves out the rows of an odd grid's
                last row and column).

        Returns:
            `out`.

        Raises:
            FeatstoreError: the snapshot block of the plan has ended.
            ValueError: entry `i` missed, or `out` does not fit.
        """
        store, span = self._store, self._spans[i]
        if store._rec is None or store._rec.pinned() is not self._txn or store._pid != os.getpid():
            raise FeatstoreError(f"{store._where}: this read plan's snapshot block has ended; plan and copy "
                                 "inside one `with store.snapshot():` block")
        if span is None:
            raise ValueError(f"key {self.keys[i]!r} missed ({self.errors[i]}); it has nothing to copy")
        stored, shape, offset, nbytes = span
        channels = shape[-1] if shape else 1
        total = nbytes // stored.itemsize // max(channels, 1)
        count = total if rows is None else len(rows)
        if rows is not None and count and (int(rows.min()) < 0 or int(rows.max()) >= total):
            raise ValueError(f"rows index {total} rows of key {self.keys[i]!r}: values from {int(rows.min())} "
                             f"to {int(rows.max())} lie outside")
        if (out.device.type != "cpu" or not out.is_contiguous() or out.dtype != self.dtype
                or out.numel() != count * channels):
            raise ValueError(f"out is {tuple(out.shape)} {out.dtype} on {out.device}; key {self.keys[i]!r} needs "
                             f"{count} x {channels} {self.dtype} elements, contiguous on the CPU")
        if count == 0:
            return out
        value, kb = self._values[i], self._kbs[i]
        if stored != self.dtype and self._served is None:
            raise ValueError(f"entry {kb.decode()!r} holds {stored} but the plan's other entries {self.dtype}; "
                             "plan entries of one dtype")
        if self._served is None:  # values as stored (dtype checked above): the one copy is their bytes
            src = np.frombuffer(value, np.uint8, nbytes, offset).reshape(total, -1)
            dst = out.view(count, channels).view(torch.uint8).numpy()
            if rows is None:
                np.copyto(dst, src)
            else:  # gathering rows ("clip": bounds checked above, so unbuffered)
                np.take(src, rows, axis=0, out=dst, mode="clip")
            return out
        if rows is None:  # the whole tensor: the codec converts it into `out` in one pass
            self._decode_into(value, out.view(shape), key=kb, memo=self._memo, where=self._where)
            return out
        # A converting codec: gather the rows of each tensor it stores (the codes' rows are a
        # fraction of the output's bytes), then convert them into `out`.
        gathered = {}
        for name in self._codec.tensors:
            dt, _, at, n = span if name == FEATURES else locate(value, name, key=kb, memo=self._memo,
                                                                   where=self._where)
            src = np.frombuffer(value, np.uint8, n, at).reshape(total, -1)
            gathered[name] = torch.from_numpy(np.take(src, rows, axis=0, mode="clip")).view(dt)
        out.view(count, channels).copy_(self._codec.decode(gathered, self.dtype, key=kb.decode(), where=self._where))
        return out
