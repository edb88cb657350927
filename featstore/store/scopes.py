"""The read scopes of a `FeatureStore`: `StoreView` (zero-copy views for one block) and
`StoreSnapshot` (one read transaction pinned for every read of the store in this thread).

`FeatureStore.view()` and `FeatureStore.snapshot()` return them; their docstrings say what each
guarantees. Both hold a reference on the process's environment record
(featstore.store.environments), so `close()` of a store inside the block cannot unmap what the
block still reads.

Example:
    >>> from featstore import FeatureStore
    >>> store = FeatureStore("data/")
    >>> with store.snapshot(), store.view() as v:             # views from the snapshot's state
    ...     v.get("scene_a/000.jpg").features.shape
    torch.Size([1, 48, 128])
    >>> store.close()
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

import lmdb

from featstore.errors import FeatstoreError
from featstore.format.blob import Entry
from featstore.store.environments import OpenEnv, release
from featstore.store.layout import META_DB, features_db, list_feature_sets

if TYPE_CHECKING:
    from featstore.store.reader import FeatureStore

__all__ = ["StoreView", "StoreSnapshot"]


class StoreView:
    """A read transaction whose entries are zero-copy views; see `FeatureStore.view`.

    Entering opens the transaction and holds a reference on the environment (so `close()` of
    the store cannot unmap it); leaving ends both, after which `get` raises FeatstoreError.
    """

    def __init__(self, store: FeatureStore):
        self.store = store
        self._txn = None
        self._rec: OpenEnv | None = None
        self._pid: int | None = None
        self._own = False  # whether the transaction is this view's (else a snapshot block's)

    def __enter__(self) -> "StoreView":
        if self._txn is not None:
            raise FeatstoreError(f"{self.store.path}: this view is already open; use a new store.view()")
        env = self.store._environment()
        rec = self.store._rec
        rec.refs += 1  # the map stays mapped until __exit__, whatever close() is called
        try:
            pinned = rec.pinned()  # inside a snapshot block: its transaction, which outlives the view
            self._txn, self._own = (pinned, False) if pinned is not None else (env.begin(buffers=True), True)
        except BaseException:
            release(rec)
            raise
        self._rec, self._pid = rec, os.getpid()
        return self

    def get(self, key, *, frames: Sequence[str] | None = None) -> Entry:
        """The entry under `key` as zero-copy views valid until this block ends (values under
        about 2 KiB, which sit unaligned in the map, are copied). An fp8 store's entries are
        shown as stored: float8 ``features`` and their float32 ``features_scale`` (dequantise
        with featstore.format.fp8.dequantize). Raises like `FeatureStore.get`."""
        if self._txn is None or self._pid != os.getpid():
            raise FeatstoreError(
                f"{self.store.path}: this store view is closed (or was inherited across fork); "
                "read inside `with store.view() as v:` in the process that opened it"
            )
        return self.store._get(self._txn, key, copy=False, frames=frames)

    def __exit__(self, *exc) -> None:
        txn, rec, self._txn, self._rec = self._txn, self._rec, None, None
        if txn is not None and self._pid == os.getpid():
            if self._own:
                txn.abort()
            release(rec)


class StoreSnapshot:
    """One read transaction pinned for every read on a store's environment in this thread;
    see `FeatureStore.snapshot`.

    Entering the outermost block opens the handles of every feature set, begins the
    transaction and holds a reference on the environment (so `close()` of a store inside the
    block cannot unmap it); inner blocks reuse it; leaving the outermost block ends both.
    """

    def __init__(self, store: FeatureStore):
        self.store = store
        self._rec: OpenEnv | None = None
        self._pid: int | None = None

    def __enter__(self) -> "StoreSnapshot":
        if self._rec is not None:
            raise FeatstoreError(f"{self.store.path}: this snapshot is already open; use a new store.snapshot()")
        env = self.store._environment()
        rec = self.store._rec
        pins = rec.pins
        if getattr(pins, "txn", None) is not None:
            pins.depth += 1
        else:
            # A handle opened after a transaction began is unknown to it (LMDB), so every set's
            # handle is opened first: stores of other sets may open inside the block.
            with env.begin() as txn:
                names = list_feature_sets(env, txn)
            env.open_db(META_DB, create=False)
            for name in names:
                try:
                    env.open_db(features_db(name), create=False)
                except lmdb.NotFoundError:
                    pass  # a damaged set: its reader reports it
            rec.refs += 1
            try:
                pins.txn, pins.depth = env.begin(buffers=True), 1
            except BaseException:
                release(rec)
                raise
        self._rec, self._pid = rec, os.getpid()
        return self

    def __exit__(self, *exc) -> None:
        rec, self._rec = self._rec, None
        if rec is None or self._pid != os.getpid():
            return
        pins = rec.pins
        pins.depth -= 1
        if pins.depth == 0:
            txn, pins.txn = pins.txn, None
            txn.abort()
            release(rec)

