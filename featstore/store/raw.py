"""Raw access to a feature set, for the store's tools (verify, info, copy, gc, merge): the keys
and values as stored, the last build's report, a copy of the whole file.

Readers use `FeatureStore.get` / `read_into`, which check and decode; these give what is stored.
`FeatureStore` takes them from `RawAccess` (a mixin: it needs the store's `_read_txn`, `_db`,
`_env`, `_environment` and `_where`).

Example:
    >>> from featstore import FeatureStore
    >>> with FeatureStore("data/") as store:
    ...     [k for k, _ in store.raw_items()][:2]
    ['misc/portrait.png', 'misc/rgba.png']
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Iterable, Iterator

from featstore.errors import ManifestError
from featstore.format.keys import key_to_bytes
from featstore.store.layout import META_DB, last_build_key

__all__ = ["RawAccess"]


class RawAccess:
    """The set as stored (a mixin of `FeatureStore`)."""

    def raw_keys(self, limit: int | None = None) -> list[bytes]:
        """The set's keys as stored (bytes, in key order; the first `limit` when given), from one
        read transaction (inside a `snapshot` block, the block's). Keys only: no value's pages
        are touched. A key that is not valid UTF-8 is listed too (`keys()` would refuse it).

        Example:
            >>> from featstore import FeatureStore
            >>> with FeatureStore("data/") as store:
            ...     store.raw_keys(limit=2)
            [b'misc/portrait.png', b'misc/rgba.png']
        """
        with self._read_txn() as txn:
            cursor = txn.cursor(db=self._db).iternext(keys=True, values=False)
            return [bytes(k) for k in itertools.islice(cursor, limit)]

    def raw_values(self, keys: Iterable | None = None) -> Iterator[tuple[bytes, memoryview | None]]:
        """(key, value) pairs as stored, from one read transaction (inside a `snapshot` block,
        the block's): of `keys` (bytes as `raw_keys` gives them, or str) in their order, with
        None for a key the set lacks; or, when `keys` is None, of every entry in key order.

        Not guaranteed: a value is a zero-copy view of the map, valid only until the iteration
        ends (the transaction ends with it); ``bytes(value)`` keeps one. Threads may iterate at
        once, each in its own transaction (verify checksums a store that way).

        Example:
            >>> from featstore import FeatureStore
            >>> with FeatureStore("data/") as store:
            ...     sum(len(v) for _, v in store.raw_values()) == store.manifest["bytes"]
            True
        """
        with self._read_txn() as txn:
            if keys is None:
                for kb, value in txn.cursor(db=self._db):
                    yield bytes(kb), value
                return
            for key in keys:
                kb = key if isinstance(key, bytes) else key_to_bytes(key)
                yield kb, txn.get(kb, db=self._db)

    def last_build(self) -> dict | None:
        """The report of the set's last build (units computed, the ones that failed and why,
        ...), as `featstore info` shows it; None when no build wrote one.

        Raises:
            ManifestError: the stored report is not JSON (the store is damaged).

        Example:
            >>> from featstore import FeatureStore
            >>> with FeatureStore("data/") as store:
            ...     store.last_build()["failed"]
            []
        """
        with self._read_txn() as txn:
            raw = txn.get(last_build_key(self.feature_set), db=self._env.open_db(META_DB, txn=txn, create=False))
            raw = bytes(raw) if raw is not None else None
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ManifestError(f"{self._where}: the last build report is not valid JSON; the store is damaged: "
                                "run `featstore verify`, rebuild the set or restore the store") from None

    def copy_to(self, dst: str | os.PathLike, *, compact: bool = True) -> None:
        """Write a copy of the whole store (every feature set: they share one LMDB file) into
        the existing empty folder `dst`, from one read transaction (LMDB's ``env.copy``; with
        `compact`, free pages are dropped). Raises lmdb.Error as LMDB does (e.g. a full disk);
        `featstore.ops.copy_store` checks and publishes a copy safely."""
        self._environment().copy(os.fspath(dst), compact=compact)

    def raw_items(self, start: str | None = None) -> Iterator[tuple[str, bytes]]:
        """Iterate (key, value bytes) in key order, copying each value (for verify and merge)."""
        last = start.encode("utf-8") if start else None
        skip_first = False
        while True:
            chunk = []
            with self._read_txn() as txn:
                cur = txn.cursor(db=self._db)
                ok = cur.set_range(last) if last is not None else cur.first()
                if ok and skip_first and bytes(cur.key()) == last:
                    ok = cur.next()
                size = 0
                while ok and len(chunk) < 256 and size < (256 << 20):
                    k, v = cur.item()
                    chunk.append((bytes(k), bytes(v)))
                    size += len(v)
                    ok = cur.next()
            if not chunk:
                return
            for k, v in chunk:
                yield k.decode("utf-8"), v
            last, skip_first = chunk[-1][0], True
