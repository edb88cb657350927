"""`FeatureStore`: the read side, used by training's DataLoader workers and by `verify`.

The environment is opened lazily in the process that reads, and re-opened when the pid changes:
an LMDB environment inherited through fork must not be used (LMDB's rule), and py-lmdb refuses
to open a path twice in one process. The object pickles as its path and options only, so it
travels to spawn workers too.

A FeatureStore reads ONE feature set of a store (docs/FORMAT.md, "Feature sets"); the objects
for several sets of one store share the process's one environment, and `snapshot()` makes all
of them read from one LMDB read transaction (one consistent state of the store).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import threading
from typing import Iterable, Iterator, Sequence

import lmdb
import numpy as np
import torch

from featstore.contract.dtypes import is_quantised
from featstore.errors import (CorruptEntryError, CorruptStoreError, EntrySchemaError, FeatstoreError,
                              InheritedLockedStoreError, MissingKeyError, StaleEntryError)
from featstore.format.blob import Entry, decode_entry, decode_tensor, tensor_span
from featstore.format.fp8 import FP8_DTYPE, SCALE_TENSOR, dequantize, dequantize_into, read_dtype
from featstore.format.keys import key_kind, key_to_bytes, normalize_key
from featstore.store.layout import (META_DB, PRIMARY_FEATURE_SET, check_feature_set, check_fingerprint, feature_set_label,
                             features_db, list_feature_sets, open_env, read_manifest, resolve_store_path,
                             storage_dtype_of)

__all__ = ["FeatureStore", "StoreView", "StoreSnapshot", "ReadPlan"]

logger = logging.getLogger("featstore")

# The per-process environment registry (featstore.store.environments).
from featstore.store.environments import INHERITED_LOCKED_ENVS as _INHERITED_LOCKED_ENVS  # noqa: F401
from featstore.store.environments import OPEN_ENVS as _OPEN_ENVS
from featstore.store.environments import OpenEnv as _OpenEnv
from featstore.store.environments import forget_inherited as _forget_inherited
from featstore.store.environments import map_range as _map_range  # noqa: F401
from featstore.store.environments import release as _release
from featstore.store.environments import store_id as _store_id


def _stat_frame(root: str, frame: str) -> os.stat_result:
    """stat of the file a frame key names: the plain join first (one syscall), else the file
    stored under another Unicode form of its name (`featstore.build.plan.source_path`)."""
    try:
        return os.stat(os.path.join(root, frame))
    except FileNotFoundError:
        from featstore.build.plan import source_path

        return os.stat(source_path(root, frame))


def _byte_rows(out: torch.Tensor | None):
    """`out` as a writable [rows, bytes] uint8 numpy array sharing its memory, or None when
    that view does not exist (no out yet, not on the CPU, not contiguous)."""
    if out is None or out.device.type != "cpu" or not out.is_contiguous() or out.dim() < 1 or out.requires_grad:
        return None
    return out.reshape(out.shape[0], -1).view(torch.uint8).numpy()


# Keys read on each side of a missing key's place for its error's hint (`_neighbour_keys`).
_HINT_WINDOW = 16


def _neighbour_keys(cur, kb: bytes, n: int) -> list[str]:
    """Up to `n` keys before and `n` from where `kb` sorts, in key order (keys only)."""
    after: list[str] = []
    ok = cur.set_range(kb)
    while ok and len(after) < n:
        after.append(bytes(cur.key()).decode("utf-8", "replace"))
        ok = cur.next()
    before: list[str] = []
    ok = cur.set_range(kb) and cur.prev() if after else cur.last()
    while ok and len(before) < n:
        before.append(bytes(cur.key()).decode("utf-8", "replace"))
        ok = cur.prev()
    return before[::-1] + after


# Read-path defaults, chosen by benchmarks/read_bench.py (docs/BENCHMARKS.md, "Read path").
READAHEAD_DEFAULT = True
PREFETCH_DEFAULT = False

_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


def _prefetch(rec: _OpenEnv, values: Sequence[memoryview]) -> None:
    """Ask the kernel to read exactly the pages of `values` now, asynchronously.

    One posix_fadvise(WILLNEED) per value queues all of a batch's reads at once (the disk sees
    them in parallel) and reads no page outside them; the copy then finds them in the page
    cache. On cached pages it costs a few microseconds per value.
    """
    if _WILLNEED is None or rec.map_addr is None:
        return
    for v in values:
        if len(v) < 8192:  # a page or two: the fault reads it anyway
            continue
        offset = np.frombuffer(v, dtype=np.uint8).ctypes.data - rec.map_addr
        if not 0 <= offset < rec.map_end - rec.map_addr:  # not in the map we know: skip, never guess
            continue
        start = offset & ~4095
        os.posix_fadvise(rec.fd, start, offset + len(v) - start, _WILLNEED)


class FeatureStore:
    """Read-only access to a featstore database.

    Args:
        path: the store directory, or a data root that holds ``vggt_features.lmdb``.
        feature_set: the feature set to read (docs/FORMAT.md, "Feature sets"); None: the primary
            set, "vggt" (the store's original layout). A set the store does not hold raises
            FeatureSetNotFoundError, naming the sets it has, on first use. `feature_sets()`
            lists them.
        lock: LMDB locking. ``None`` (default) decides per open: off for a store whose build
            is complete (no reader slots needed, any number of ranks x workers), on while a
            build of any of the store's feature sets is in progress (readers then never see
            pages a writer reuses).
        readahead: OS readahead on the map (``False`` sets MADV_RANDOM: a cold fault then
            reads only its own 4 KiB page). Default READAHEAD_DEFAULT; see below.
        prefetch: before copying values out (`get`, `read_into`, `get_many`), ask the kernel
            (posix_fadvise WILLNEED) to read exactly each value's pages, all of a batch at
            once. Default PREFETCH_DEFAULT; see below.
        verify_checksums: recompute each value's CRC-32 on read and refuse a mismatch
            (about 2.5 GB/s per core; off by default, `featstore verify` checks whole stores).
        expected_encoder: the `EncoderSpec` the caller needs (e.g. from
            `featstore.encoders.resolve_spec`), or its dict; opening fails with
            FingerprintMismatchError naming every field that differs, with the set's value
            and the expected one.
        max_readers: reader slots when locking is on.

    Why these defaults (benchmarks/read_bench.py, docs/BENCHMARKS.md "Read path"):
    ``readahead=True``: a feature value is one contiguous run of pages (5.6 MB for a VGGT-1B
    frame, >= 128 KiB for small ones), read whole. With ``False`` (MADV_RANDOM) every 4 KiB page
    of a cold value is its own synchronous read: measured 10-14x slower than ``True`` cold, and
    slower than one ``.pt`` file per entry, for both sizes; warm, the two are equal. The common
    ``readahead=False`` recipe is tuned for values of a few hundred bytes in a database
    larger than RAM, where readahead only evicts useful pages.
    ``prefetch=False``: with readahead on, issuing WILLNEED per value gave no measurable cold
    gain on the benchmark disk and costs a few percent warm; it stays available for disks
    with deep queues (NVMe, network block devices), where a batch's reads then overlap.

    Safe by default: `get`, `get_many` and `read_into` return tensors that own their memory
    (writable, valid after `close()`). Zero-copy views are an explicit opt-in with a visible
    lifetime, ``with store.view() as v:``; they are read-only memory valid until the block ends
    (see `view` for what is not guaranteed).

    Example:
        >>> from featstore import FeatureStore
        >>> store = FeatureStore("data/")                     # finds data/vggt_features.lmdb
        >>> store.get("scene_a/000.jpg").features.shape       # [frames, tokens, channels], a copy
        torch.Size([1, 48, 128])
        >>> with store.view() as v:                           # zero-copy until the block ends
        ...     norm = v.get("scene_a/000.jpg").features.float().norm()
        >>> store.read_into(["scene_a/000.jpg", "scene_a/001.jpg"]).shape  # one copy
        torch.Size([2, 1, 48, 128])
        >>> store.feature_sets()                              # the store's sets; this one reads "vggt"
        ['vggt']
        >>> store.close()
    """

    def __init__(self, path: str | os.PathLike, *, feature_set: str | None = None, lock: bool | None = None,
                 readahead: bool | None = None, prefetch: bool | None = None,
                 verify_checksums: bool = False, expected_encoder=None,
                 max_readers: int = 2048):
        self.feature_set = PRIMARY_FEATURE_SET if feature_set is None else check_feature_set(feature_set)
        if lock not in (None, True, False):
            raise ValueError(f"lock must be None, True or False. Found {lock!r}")
        if not isinstance(max_readers, int) or max_readers < 1:
            raise ValueError(f"max_readers must be a positive int. Found {max_readers!r}")
        self.path = resolve_store_path(path)
        self.lock = lock
        self.readahead = READAHEAD_DEFAULT if readahead is None else bool(readahead)
        self.prefetch = PREFETCH_DEFAULT if prefetch is None else bool(prefetch)
        self.verify_checksums = verify_checksums
        self.expected_encoder = expected_encoder
        self.max_readers = max_readers
        self._env: lmdb.Environment | None = None
        self._db = None
        self._pid: int | None = None
        self._manifest: dict | None = None
        self._locked = False
        self._rec: _OpenEnv | None = None

    # -- the set as stored, for the store's tools (verify, info, copy, gc) --------------------
    # Readers use `get` / `read_into`, which check and decode; these give what is stored.
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
        import itertools

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
        from featstore.errors import ManifestError
        from featstore.store.layout import last_build_key

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

    # -- pickling: path and options only ------------------------------------------------------
    def __getstate__(self) -> dict:
        return {"path": self.path, "feature_set": self.feature_set, "lock": self.lock, "readahead": self.readahead,
                "prefetch": self.prefetch, "verify_checksums": self.verify_checksums,
                "expected_encoder": self.expected_encoder, "max_readers": self.max_readers}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        if self.feature_set == PRIMARY_FEATURE_SET:
            return f"FeatureStore({self.path!r})"
        return f"FeatureStore({self.path!r}, feature_set={self.feature_set!r})"

    @property
    def _where(self) -> str:
        return feature_set_label(self.path, self.feature_set)

    # -- opening -----------------------------------------------------------------------------
    def _open(self, lock: bool) -> lmdb.Environment:
        return open_env(self.path, readonly=True, lock=lock, readahead=self.readahead,
                        max_readers=self.max_readers)

    def _shared_env(self) -> _OpenEnv:
        """This process's environment record of the store, opened if needed, with one more
        reference held (the caller releases it)."""
        pid = os.getpid()
        ident = _store_id(self.path)
        rec = _OPEN_ENVS.get(ident)
        if rec is not None and rec.pid != pid:
            _forget_inherited(self.path, rec)
            rec = None
        if rec is None:
            env, locked = self._open_new()
            try:
                rec = _OpenEnv(ident, self.path, env, locked)
            except BaseException:
                env.close()
                raise
            _OPEN_ENVS[ident] = rec
        rec.refs += 1
        return rec

    def _environment(self) -> lmdb.Environment:
        pid = os.getpid()
        if self._env is not None and self._pid == pid:
            return self._env
        # First use in this process (or first after a fork): never touch an inherited env.
        self._env = self._db = self._rec = None
        rec = self._shared_env()
        try:
            env = rec.env
            # Inside a snapshot block the set is looked up in the pinned state of the store.
            self._manifest = read_manifest(env, rec.pinned(), path=self.path, feature_set=self.feature_set)
            if self.expected_encoder is not None:
                check_fingerprint(self._manifest, self.expected_encoder, path=self._where)
            # Outside any transaction: a handle opened inside a read transaction is closed when
            # it ends (LMDB), and a snapshot has opened every set's handle before it began.
            self._db = env.open_db(features_db(self.feature_set), create=False)
        except lmdb.NotFoundError:
            _release(rec)
            raise CorruptStoreError(f"{self._where}: the manifest exists but the sub-database "
                                    f"'{features_db(self.feature_set).decode()}' does not; the store is damaged: "
                                    "restore it or rebuild the set") from None
        except BaseException:
            _release(rec)
            raise
        self._env, self._pid, self._locked, self._rec = env, pid, rec.locked, rec
        logger.debug(f"featstore: opened {self._where} in pid {pid} (lock={'on' if rec.locked else 'off'}, "
                     f"build {self._manifest.get('build', {}).get('state')}, {self._manifest.get('entries')} entries)")
        return env

    def _read_txn(self):
        """The transaction a read runs in: the snapshot block's pinned one (left open), else a
        new read transaction for this read (ended with it). Reads pass `db=` explicitly."""
        env = self._environment()
        pinned = self._rec.pinned()
        if pinned is not None:
            return contextlib.nullcontext(pinned)
        return env.begin(buffers=True)

    def _open_new(self) -> tuple[lmdb.Environment, bool]:
        lock = self.lock
        if lock is not None:
            return self._open(lock=lock), lock
        # Lock unless the manifests say no writer will come: read them under the lock first.
        # The environment is shared by every set's readers, so one set whose build is in
        # progress (a writer may reuse pages) needs the lock for all.
        can_lock = os.access(os.path.join(self.path, "lock.mdb"), os.W_OK)
        env = self._open(lock=can_lock)
        try:
            with env.begin() as txn:
                sets = list_feature_sets(env, txn)
                if not sets:
                    read_manifest(env, txn, path=self.path)  # raises what the store lacks
                complete = all(_build_complete(env, txn, self.path, name) for name in sets)
        except BaseException:
            env.close()
            raise
        if can_lock and complete:
            env.close()
            return self._open(lock=False), False
        return env, can_lock

    def close(self) -> None:
        """Release the environment in this process (closed when no other FeatureStore on the
        same store, of any feature set, uses it). Views become invalid once it closes."""
        if self._rec is not None and self._pid == os.getpid():
            _release(self._rec)
        self._env = self._db = self._pid = self._rec = None

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- metadata ----------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        """The manifest of this store's feature set (JSON dict): format version, encoder spec,
        fingerprint, counts.

        Read afresh at each access (one small read transaction; inside a `snapshot` block, from
        its state), so that it follows a build that is writing the set: entries, bytes and build
        state are those committed now. Each access returns a new dict; keep one to compare."""
        with self._read_txn() as txn:
            self._manifest = read_manifest(self._env, txn, path=self.path, feature_set=self.feature_set)
        return self._manifest

    def feature_sets(self) -> list[str]:
        """The names of the store's feature sets, sorted (works whichever set this object reads,
        also one the store lacks).

        Example:
            >>> from featstore import FeatureStore
            >>> with FeatureStore("data/") as store:
            ...     store.feature_sets()
            ['vggt']
        """
        if self._env is not None and self._pid == os.getpid():
            with self._read_txn() as txn:
                return list_feature_sets(self._env, txn)
        rec = self._shared_env()
        try:
            return list_feature_sets(rec.env, rec.pinned())
        finally:
            _release(rec)

    def snapshot(self) -> "StoreSnapshot":
        """A read scope over one consistent state of the whole store: ``with store.snapshot():``.

        Until the block ends, every read (`get`, `get_many`, `read_into`, `keys`, ``in``,
        ``len``, `manifest`, `view`) by ANY FeatureStore on this store's environment in the
        calling thread (e.g. the objects for the "vggt" set and for a vision set of one file)
        goes through one LMDB read transaction: a build committing meanwhile is not seen, so
        the entries of one sample come from one state. Nested blocks reuse the outer one. Other
        threads and processes are not affected.

        Not guaranteed: consistency against a writer needs locking (the default while a build
        is in progress; a store opened with ``lock=False`` lets a writer reuse the pages the
        block sees). A block kept open while a build writes makes the file grow (like `view`):
        keep it around one sample or batch.

        Returns:
            a `StoreSnapshot` context manager.

        Example:
            >>> from featstore import FeatureStore
            >>> store = FeatureStore("data/")
            >>> with store.snapshot():
            ...     a = store.get("scene_a/000.jpg")       # both from one read transaction
            ...     n = len(store)
            >>> store.close()
        """
        return StoreSnapshot(self)

    def __len__(self) -> int:
        with self._read_txn() as txn:
            return txn.stat(self._db)["entries"]

    def __contains__(self, key) -> bool:
        kb = key_to_bytes(key)
        with self._read_txn() as txn:
            return txn.get(kb, db=self._db) is not None

    def keys(self) -> Iterator[str]:
        """Iterate over all keys in sorted order (one read transaction per 1024 keys; inside a
        `snapshot` block, the block's)."""
        last: bytes | None = None
        while True:
            chunk = []
            with self._read_txn() as txn:
                cur = txn.cursor(db=self._db)
                ok = cur.set_range(last) if last is not None else cur.first()
                if ok and last is not None and bytes(cur.key()) == last:
                    ok = cur.next()
                while ok and len(chunk) < 1024:
                    chunk.append(bytes(cur.key()))
                    ok = cur.next()
            if not chunk:
                return
            yield from (k.decode("utf-8") for k in chunk)
            last = chunk[-1]

    __iter__ = keys

    # -- reads -------------------------------------------------------------------------------
    def _missing(self, key, txn=None) -> MissingKeyError:
        """The error for `key`, absent: it says what the store's keys look like and the nearest
        ones, read in `txn` (the read that missed) around the place `key` would sort."""
        return MissingKeyError(f"key {str(key)!r} is not in the store {self._where}" + self._hint(key, txn))

    def _hint(self, key, txn) -> str:
        # Bounded cost (a miss may be frequent: --vggt_cache_miss compute): keys only, no value
        # page is touched, _HINT_WINDOW keys each side of where `key` would sort.
        if txn is None:
            return ""
        try:
            kb = key_to_bytes(key)
            window = _neighbour_keys(txn.cursor(db=self._db), kb, _HINT_WINDOW)
        except (FeatstoreError, lmdb.Error):
            return ""
        if not window:
            return ": it holds no entries (build it: featstore build)"
        near = difflib.get_close_matches(kb.decode(), window, n=3, cutoff=0.0)
        listing = "featstore info --keys " + (self.path if self.feature_set == PRIMARY_FEATURE_SET
                                               else f"--feature-set {self.feature_set} {self.path}")
        return (f": its keys are {key_kind(window)}; the nearest are {', '.join(map(repr, near))} "
                f"(`{listing}` lists them)")

    def get(self, key, *, copy: bool = True, frames: Sequence[str] | None = None) -> Entry:
        """Return the entry stored under `key`, as tensors that own their memory.

        Safe by default: the tensors are copies, writable and valid after `close()`. For
        zero-copy views into the map use ``with store.view() as v: v.get(key)`` (see `view`).
        An fp8 store's `features` come dequantised to bfloat16, without ``features_scale`` (it
        is applied); `view` shows the stored float8 codes and their scale as they are.

        Args:
            key: relative path of the unit (normalised like every key).
            copy: must be True; zero-copy reads go through `view`, which keeps the views'
                read transaction open for a visible lifetime.
            frames: the ordered frame list the caller wants; a stored entry computed on another
                frame list is a miss (MissingKeyError), never a wrong answer.

        Raises:
            MissingKeyError: `key` is not in the store (or was computed on other `frames`).
            CorruptEntryError: the stored value does not decode (or fails its checksum).

        Example:
            >>> from featstore import FeatureStore
            >>> store = FeatureStore("data/")
            >>> entry = store.get("scene_a/000.jpg")
            >>> entry.features.add_(1).shape  # owned memory: writing into it is fine
            torch.Size([1, 48, 128])
            >>> store.close()
        """
        if not copy:
            raise ValueError(
                f"get({str(key)!r}, copy=False): zero-copy views are read inside "
                "`with store.view() as v: v.get(key)`, which keeps them valid until the block ends"
            )
        return self._get(None, key, copy=True, frames=frames)

    def _get(self, txn, key, *, copy: bool, frames) -> Entry:
        kb = key_to_bytes(key)
        if txn is None:
            with self._read_txn() as own:
                return self._get(own, key, copy=copy, frames=frames)
        value = txn.get(kb, db=self._db)
        if value is None:
            raise self._missing(key, txn)
        if self.prefetch:
            _prefetch(self._rec, (value,))
        entry = self._decode(value, kb, copy=copy)
        if frames is not None:
            self._check_frames(kb.decode(), entry, frames)
        return entry

    def _decode(self, value, kb: bytes, *, copy: bool) -> Entry:
        """Decode one value; copies of an fp8 store's entries carry `features` dequantised to
        bfloat16 (straight from the map, one pass) and no `features_scale` (it is applied)."""
        quantised = copy and is_quantised(storage_dtype_of(self._manifest))
        entry = decode_entry(value, key=kb.decode(), verify=self.verify_checksums, copy=copy and not quantised)
        if not quantised or "features" not in entry.tensors:
            return entry
        codes = entry.tensors.pop("features")
        entry.tensors.pop(SCALE_TENSOR, None)
        if codes.dtype != FP8_DTYPE:
            raise CorruptEntryError(f"entry {kb.decode()!r} in {self._where}: features are {codes.dtype}, but the "
                                    "store holds float8_e4m3fn features (its manifest says so); the entry was not "
                                    "written by featstore: run `featstore verify` and rebuild it")
        features = dequantize(codes, self._scale(value, kb), read_dtype(storage_dtype_of(self._manifest)))
        entry.tensors = {name: t.clone() for name, t in entry.tensors.items()}  # the rest: owned copies
        entry.tensors["features"] = features
        return entry

    def view(self) -> "StoreView":
        """A zero-copy read scope: ``with store.view() as v: feats = v.get(key).features``.

        Inside the block, `StoreView.get` returns tensors that view the store's memory map (no
        copy) through one read transaction that stays open until the block ends, and the
        store's environment stays open even if `close()` is called meanwhile. A build writing
        the store cannot reuse the pages the views show while the block is open (the file
        grows instead, so keep blocks short while a build runs).

        Not guaranteed: the views are read-only memory. Writing into one (``.add_(1)``, an
        in-place op, ``out=``) kills the process with SIGSEGV, and so does touching one after
        the block ended and the store was closed. Copy what you keep (``.clone()``, or
        `read_into` / `get` outside the block).

        Returns:
            a `StoreView` context manager.

        Example:
            >>> from featstore import FeatureStore
            >>> store = FeatureStore("data/")
            >>> with store.view() as v:
            ...     total = v.get("scene_a/000.jpg").features.float().sum()   # read-only, no copy
            >>> store.close()
        """
        return StoreView(self)

    def _check_frames(self, key: str, entry: Entry, frames: Sequence[str]) -> None:
        wanted = [normalize_key(f) for f in frames]
        if entry.frames != wanted:
            raise MissingKeyError(
                f"key {key!r} in {self._where} was computed on frames {entry.frames}, but {wanted} "
                "were asked for: the cached context differs (a miss). Rebuild with the same annotations."
            )

    def _check_sources(self, key: str, entry: Entry, data_root) -> None:
        """Each frame's size and mtime against the entry's record (`sources`): the image a
        training run reads now must be the one the features were computed from. One `stat` a
        frame (a few microseconds; docs/OPERATIONS.md has the measured cost)."""
        if "sources" not in entry.metadata:
            return  # written without a record (StoreWriter.put by hand): nothing to compare against
        frames = entry.frames
        try:
            sources = json.loads(entry.metadata["sources"])
        except ValueError:
            sources = None
        if not isinstance(sources, list) or len(sources) != len(frames):
            raise StaleEntryError(f"key {key!r} in {self._where} has a malformed source record for its frames, so "
                                  "their freshness cannot be checked; rebuild it (featstore build --force)")
        root = os.fspath(data_root)
        for frame, src in zip(frames, sources):
            try:
                st = _stat_frame(root, frame)
            except OSError as e:
                raise StaleEntryError(f"key {key!r} in {self._where}: frame {frame!r} cannot be read now "
                                      f"({e.filename}: {e.strerror}); its features belong to a file that is "
                                      "gone") from None
            if not isinstance(src, dict) or src.get("size") != st.st_size or src.get("mtime_ns") != st.st_mtime_ns:
                raise StaleEntryError(
                    f"key {key!r} in {self._where} is stale: frame {frame!r} changed since the features were "
                    f"computed (size {src.get('size') if isinstance(src, dict) else '?'} -> {st.st_size}, mtime "
                    "changed); rerun featstore build (it recomputes stale entries)")

    def missing(self, keys: Iterable) -> list[str]:
        """The keys of `keys` that have no entry, in the order given, from one read transaction
        (a start-up coverage check: ~1 us a key, no value is read).

        Example:
            >>> from featstore import FeatureStore
            >>> with FeatureStore("data/") as store:
            ...     store.missing(["scene_a/000.jpg", "nope.jpg"])
            ['nope.jpg']
        """
        out = []
        with self._read_txn() as txn:
            cur = txn.cursor(db=self._db)
            for key in keys:
                if not cur.set_key(key_to_bytes(key)):
                    out.append(key)
        return out

    def _no_tensor(self, kb: bytes, value, tensor: str) -> EntrySchemaError:
        return EntrySchemaError(f"entry {kb.decode()!r} in {self._where} has no tensor {tensor!r} "
                               f"(it has {sorted(decode_entry(value, key=kb.decode()).tensors)})")

    @staticmethod
    def _wrong_slot(kb: bytes, shape: tuple, dtype: torch.dtype, out: torch.Tensor) -> ValueError:
        return ValueError(
            f"entry {kb.decode()!r} holds {shape} {dtype} but the output slot is "
            f"{tuple(out.shape[1:])} {out.dtype}; batch only entries of one shape"
        )

    def _values(self, txn, kbs: list[bytes], keys: list) -> list[memoryview]:
        values = []
        for kb, key in zip(kbs, keys):
            value = txn.get(kb, db=self._db)
            if value is None:
                raise self._missing(key, txn)
            values.append(value)
        if self.prefetch:
            _prefetch(self._rec, values)
        return values

    def read_into(self, keys: Iterable, out: torch.Tensor | None = None, *, dtype: torch.dtype | None = None,
                  tensor: str = "features", frames: Sequence[Sequence[str]] | None = None,
                  data_root: str | os.PathLike | None = None, pin_memory: bool = False) -> torch.Tensor:
        """Copy the `tensor` of each key into ``out[i]`` inside one read transaction.

        This is the one copy out of the map: pass `out` in shared or pinned memory (or
        ``pin_memory=True``) and it goes straight to the GPU from there. An fp8 store's features
        are dequantised (code x per-token scale) straight into ``out[i]`` on the way, in the same
        single pass over the output (featstore.format.fp8.dequantize_into).

        Args:
            keys: the keys of one sample or batch (at least one).
            out: a tensor of shape ``[len(keys), *entry_shape]``; allocated when None.
            dtype: the dtype of `out` when it is allocated (else `out.dtype` is used). None: the
                store's read dtype, i.e. the stored dtype, except bfloat16 for an fp8 store's
                features. bfloat16, float16 and float32 are served from a store of any storage
                dtype (a cast, or the dequantisation, during the one copy).
            tensor: which tensor of each entry to copy (default ``"features"``).
            frames: optional per-key frame lists to check (see `get`).
            data_root: when given, each entry's frames must be the files it was computed from:
                their size and mtime (one `stat` each, under `data_root`) equal the entry's
                record, else StaleEntryError names the key and the frame.
            pin_memory: allocate `out` in pinned memory when `out` is None (needs CUDA).

        Returns:
            `out`, filled.

        Raises:
            MissingKeyError: a key is not in the store (StaleEntryError: a frame changed since,
                with `data_root`).
            EntrySchemaError: an entry has no tensor named `tensor` (not a miss), or an fp8
                entry has no ``features_scale``.
            ValueError: `out` does not fit (rows, shape or dtype); nothing is guaranteed about
                the rows of `out` already written when an error is raised.

        Example:
            >>> import torch
            >>> from featstore import FeatureStore
            >>> out = torch.empty(2, 1, 48, 128, dtype=torch.bfloat16).share_memory_()
            >>> with FeatureStore("data/") as store:
            ...     store.read_into(["scene_a/000.jpg", "scene_b/000.jpg"], out) is out
            True
        """
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
        env = self._environment()
        quantised = tensor == "features" and is_quantised(storage_dtype_of(self._manifest))
        # A stored dtype other than out's is cast only when the caller asked for a dtype (an
        # fp8 store's codes are always dequantised); an `out` of another dtype is a mistake.
        cast = dtype is not None or quantised
        if dtype is None and out is None and quantised:
            dtype = read_dtype(storage_dtype_of(self._manifest))
        rows = _byte_rows(out)
        memo: dict = {}  # tensor_span's per-batch memo: one layout, one byte comparison per entry
        checked = None  # the (dtype, shape) of an entry already checked against out's slot
        with self._read_txn() as txn:
            values = self._values(txn, kbs, keys)
            for i, (kb, value) in enumerate(zip(kbs, values)):
                if not self.verify_checksums and (out is None or rows is not None):
                    # Hot path: check the entry's frames by their stored bytes (and its sources
                    # with `data_root`), locate the tensor's bytes (known header layouts not
                    # parsed again) and copy exactly those bytes into row i.
                    if frames is not None or data_root is not None:
                        self._check_entry(kb, value, None if frames is None else frames[i], data_root)
                    try:
                        stored, shape, offset, nbytes = tensor_span(value, tensor, key=kb, memo=memo)
                    except KeyError:
                        raise self._no_tensor(kb, value, tensor) from None
                    if out is None:
                        out = torch.empty((len(keys), *shape), dtype=dtype or stored, pin_memory=pin_memory)
                        rows = _byte_rows(out)
                    if checked != (stored, shape):  # once per batch, not per entry
                        self._check_slot(kb, shape, stored, out, cast, quantised)
                        checked = (stored, shape)
                    if quantised:
                        codes = np.frombuffer(value, np.uint8, nbytes, offset)
                        dequantize_into(codes, self._scale(value, kb), out[i])
                    elif stored == out.dtype:
                        np.copyto(rows[i], np.frombuffer(value, np.uint8, nbytes, offset))  # the one copy
                    else:  # the asked-for cast, during the one copy
                        out[i].copy_(decode_tensor(value, tensor, key=kb.decode()))
                    continue
                name = kb.decode()
                entry = decode_entry(value, key=name, verify=self.verify_checksums)
                if frames is not None:
                    self._check_frames(name, entry, frames[i])
                if data_root is not None:
                    self._check_sources(name, entry, data_root)
                src = entry.tensors.get(tensor)
                if src is None:
                    raise self._no_tensor(kb, value, tensor)
                if out is None:
                    out = torch.empty((len(keys), *src.shape), dtype=dtype or src.dtype, pin_memory=pin_memory)
                self._check_slot(kb, tuple(src.shape), src.dtype, out, cast, quantised)
                if quantised and out[i].is_contiguous() and out.device.type == "cpu":
                    dequantize_into(src.view(torch.uint8).numpy(), self._scale(value, kb), out[i])
                elif quantised:  # a strided or device `out`: dequantise, then copy into it
                    out[i].copy_(dequantize(src, self._scale(value, kb), out.dtype))
                else:
                    out[i].copy_(src)  # the one copy out of the map (the txn keeps `src` valid)
        return out

    def _check_slot(self, kb: bytes, shape: tuple, stored: torch.dtype, out: torch.Tensor, cast: bool,
                    quantised: bool) -> None:
        if tuple(shape) != tuple(out.shape[1:]):
            raise self._wrong_slot(kb, tuple(shape), stored, out)
        if quantised and stored != FP8_DTYPE:
            raise CorruptEntryError(f"entry {kb.decode()!r} in {self._where}: features are {stored}, but the store "
                                    "holds float8_e4m3fn features (its manifest says so); the entry was not "
                                    "written by featstore: run `featstore verify` and rebuild it")
        if stored != out.dtype and not cast:
            raise self._wrong_slot(kb, tuple(shape), stored, out)

    def _scale(self, value, kb: bytes) -> torch.Tensor:
        """The per-token scale of an fp8 entry (a small copy)."""
        try:
            dtype, shape, offset, nbytes = tensor_span(value, SCALE_TENSOR, key=kb.decode())
        except KeyError:
            raise self._no_tensor(kb, value, SCALE_TENSOR) from None
        if dtype != torch.float32:
            raise CorruptEntryError(f"entry {kb.decode()!r} in {self._where}: {SCALE_TENSOR} is {dtype}, not float32; "
                                    "the entry was not written by featstore: run `featstore verify` and rebuild it")
        return torch.from_numpy(np.frombuffer(value, np.float32, nbytes // 4, offset).copy())

    def _check_entry(self, kb: bytes, value, wanted: Sequence[str] | None, data_root) -> None:
        """The checks `frames=` and `data_root=` ask for, on one entry, without decoding it.

        The frame list is compared as bytes: the record `featstore build` writes for `wanted`
        (`_frames_record`) must appear once as the header's `frames` metadata. When it does
        not (another list, or a record written another way), the entry is decoded and checked
        as a whole, so a miss raises exactly what `get(..., frames=)` raises. With `data_root`
        only the metadata is parsed, for the `sources` record the freshness check compares."""
        name = kb.decode()
        if wanted is None or _stores_frames(value, _frames_record(wanted)):
            if data_root is None:
                return
            meta = _header_metadata(value)
            if meta is not None:
                self._check_sources(name, Entry(tensors={}, metadata=meta), data_root)
                return
        entry = decode_entry(value, key=name)
        if wanted is not None:
            self._check_frames(name, entry, wanted)
        if data_root is not None:
            self._check_sources(name, entry, data_root)

    def plan_read(self, keys: Iterable, *, tensor: str = "features", frames: Sequence[Sequence[str]] | None = None,
                  data_root: str | os.PathLike | None = None, missing: str = "raise") -> "ReadPlan":
        """Locate and check the `tensor` of each key inside the current `snapshot()` block,
        copying nothing yet: the first half of a batch read whose output is sized from it.

        A DataLoader worker that lays a whole batch into one buffer (training's batch slots)
        needs the entries' shapes before it can size the buffer, and then wants each feature
        byte copied once, straight into it: `plan_read` gives the shapes (and the misses),
        `ReadPlan.copy_into` the one copy, both from the snapshot's one read transaction.

        Args:
            keys: the keys (entries may differ in shape).
            tensor, frames, data_root: as for `read_into` (the frame lists are compared as
                stored bytes; a list written another way is decoded and compared as a list).
            missing: "raise" (MissingKeyError, or StaleEntryError, for the first key that
                misses, as `read_into` raises) or "skip" (kept in `ReadPlan.errors`; the
                other keys are planned).

        Returns:
            a `ReadPlan`, valid until the snapshot block ends.

        Raises:
            FeatstoreError: not inside a `snapshot()` block of this process and thread.
            EntrySchemaError, CorruptEntryError: as `read_into` (not skipped).

        Example:
            >>> from featstore import FeatureStore
            >>> store = FeatureStore("data/")
            >>> with store.snapshot():
            ...     plan = store.plan_read(["scene_a/000.jpg", "scene_b/000.jpg"])
            ...     out = torch.empty(plan.numel(), dtype=plan.dtype)      # or a shared-memory slot
            ...     a = plan.copy_into(0, out[:plan.numel(0)])               # one copy each
            ...     b = plan.copy_into(1, out[plan.numel(0):])
            >>> plan.shapes
            [(1, 48, 128), (1, 48, 128)]
            >>> store.close()
        """
        if missing not in ("raise", "skip"):
            raise ValueError(f"missing must be 'raise' or 'skip'. Found {missing!r}")
        keys = list(keys)
        if frames is not None and len(frames) != len(keys):
            raise ValueError(f"frames has {len(frames)} lists for {len(keys)} keys; pass one frame list per key")
        kbs = [key_to_bytes(k) for k in keys]
        self._environment()
        txn = self._rec.pinned()
        if txn is None:
            raise FeatstoreError(f"{self._where}: plan_read needs a read scope: call it inside "
                                 "`with store.snapshot():` and copy before the block ends")
        quantised = tensor == "features" and is_quantised(storage_dtype_of(self._manifest))
        errors: list = [None] * len(keys)
        absent = [False] * len(keys)
        values: list = []
        for i, (kb, key) in enumerate(zip(kbs, keys)):  # every key looked up before any is checked
            value = txn.get(kb, db=self._db)
            if value is None:
                errors[i], absent[i] = self._missing(key, txn), True
                if missing == "raise":
                    raise errors[i]
            values.append(value)
        if self.prefetch:
            _prefetch(self._rec, [v for v in values if v is not None])
        spans: list = [None] * len(keys)
        memo: dict = {}
        for i, (kb, value) in enumerate(zip(kbs, values)):
            if value is None:
                continue
            try:
                if self.verify_checksums:
                    decode_entry(value, key=kb.decode(), verify=True)
                if frames is not None or data_root is not None:
                    self._check_entry(kb, value, None if frames is None else frames[i], data_root)
            except MissingKeyError as e:
                if missing == "raise":
                    raise
                errors[i], values[i] = e, None
                continue
            try:
                span = tensor_span(value, tensor, key=kb, memo=memo)
            except KeyError:
                raise self._no_tensor(kb, value, tensor) from None
            if quantised and span[0] != FP8_DTYPE:
                raise CorruptEntryError(f"entry {kb.decode()!r} in {self._where}: features are {span[0]}, but the "
                                        "store holds float8_e4m3fn features (its manifest says so); the entry was "
                                        "not written by featstore: run `featstore verify` and rebuild it")
            spans[i] = span
        dtype = read_dtype(storage_dtype_of(self._manifest)) if quantised else None
        plan = ReadPlan(self, txn, keys, kbs, values, spans, errors, dtype)
        plan.absent = absent
        return plan

    def get_many(self, keys: Iterable) -> list[Entry]:
        """Copies of the entries of `keys`, read in one transaction (entries may differ in shape).

        Raises MissingKeyError naming the first missing key; nothing is returned then."""
        keys = list(keys)
        kbs = [key_to_bytes(k) for k in keys]
        with self._read_txn() as txn:
            values = self._values(txn, kbs, keys)
            return [self._decode(v, kb, copy=True) for kb, v in zip(kbs, values)]

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


class ReadPlan:
    """The located, checked entries of one `FeatureStore.plan_read`, to copy out of the map.

    Attributes:
        keys: the keys, in the order given.
        shapes: each entry's tensor shape ([frames, tokens, channels] for features), None for a
            key that missed (under ``missing="skip"``).
        errors: the MissingKeyError (StaleEntryError, ...) of each key that missed, else None.
        absent: per key, whether it missed because it has no entry at all (`read_into` raises
            those first: it looks every key up before it checks any entry).
        dtype: what `copy_into` writes: the stored dtype, bfloat16 for an fp8 store's features.

    Valid only inside the snapshot block it was planned in: `copy_into` refuses afterwards
    (the views it copies from belong to that block's read transaction).
    """

    def __init__(self, store: FeatureStore, txn, keys, kbs, values, spans, errors, dtype):
        self._store, self._txn, self._kbs, self._values, self._spans = store, txn, kbs, values, spans
        self.keys, self.errors = keys, errors
        self.absent = [False] * len(keys)
        self.shapes = [None if s is None else tuple(s[1]) for s in spans]
        stored = next((s[0] for s in spans if s is not None), None)
        self.dtype = dtype or stored
        self._quantised = dtype is not None

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
        if stored != self.dtype and not self._quantised:
            raise ValueError(f"entry {kb.decode()!r} holds {stored} but the plan's other entries {self.dtype}; "
                             "plan entries of one dtype")
        flat = out.view(count, channels)
        if not self._quantised:
            src = np.frombuffer(value, np.uint8, nbytes, offset).reshape(total, -1)
            dst = flat.view(torch.uint8).numpy()
            if rows is None:
                np.copyto(dst, src)  # the one copy
            else:  # the one copy, gathering rows ("clip": bounds checked above, so unbuffered)
                np.take(src, rows, axis=0, out=dst, mode="clip")
            return out
        # fp8: codes x per-token scale, written once into `out` (a gather first takes the
        # codes' rows, a quarter of the output's bytes for bf16, into a temporary).
        codes = np.frombuffer(value, np.uint8, nbytes, offset).reshape(total, channels)
        scale = store._scale(value, kb).reshape(-1)
        if rows is not None:
            codes, scale = np.take(codes, rows, axis=0), scale[torch.tensor(rows)]
        dequantize_into(codes, scale.reshape(-1, 1), flat)
        return out


def feature_set_names(path: str | os.PathLike) -> list[str]:
    """The feature sets of the store at `path`, sorted; raises what the store lacks (ManifestError,
    StoreNotFoundError, ...) when it holds none (info, copy and merge start from this).

    Example:
        >>> from featstore.store.reader import feature_set_names
        >>> feature_set_names("data/")
        ['vggt']
    """
    probe = FeatureStore(path)
    try:
        names = probe.feature_sets()
        if not names:
            probe.manifest  # raises what the store lacks
        return names
    finally:
        probe.close()


class StoreView:
    """A read transaction whose entries are zero-copy views; see `FeatureStore.view`.

    Entering opens the transaction and holds a reference on the environment (so `close()` of
    the store cannot unmap it); leaving ends both, after which `get` raises FeatstoreError.
    """

    def __init__(self, store: FeatureStore):
        self.store = store
        self._txn = None
        self._rec: _OpenEnv | None = None
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
            _release(rec)
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
            _release(rec)


class StoreSnapshot:
    """One read transaction pinned for every read on a store's environment in this thread;
    see `FeatureStore.snapshot`.

    Entering the outermost block opens the handles of every feature set, begins the
    transaction and holds a reference on the environment (so `close()` of a store inside the
    block cannot unmap it); inner blocks reuse it; leaving the outermost block ends both.
    """

    def __init__(self, store: FeatureStore):
        self.store = store
        self._rec: _OpenEnv | None = None
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
                _release(rec)
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
            _release(rec)


def _build_complete(env, txn, path: str, feature_set: str) -> bool:
    """Whether the set's manifest says its build is complete (False when it does not read)."""
    try:
        return read_manifest(env, txn, path=path, feature_set=feature_set).get("build", {}).get("state") == "complete"
    except FeatstoreError:
        return False
