"""`FeatureStore`: the read side, used by training's DataLoader workers and by `verify`.

The environment is opened lazily in the process that reads, and re-opened when the pid changes
(featstore.store.handle: an LMDB environment inherited through fork must not be used). The
object pickles as its path and options only, so it travels to spawn workers too.

A FeatureStore reads ONE feature set of a store (docs/FORMAT.md, "Feature sets"); the objects
for several sets of one store share the process's one environment, and `snapshot()` makes all
of them read from one LMDB read transaction (one consistent state of the store).

The batch read path (`read_into`, `plan_read`) is featstore.store.batch_read, the read scopes
(`view`, `snapshot`) featstore.store.scopes, the raw access for the store's tools
featstore.store.raw, the frame and freshness checks featstore.store.entry_checks and
featstore.store.freshness; FeatureStore's methods are the public entry points to them.
"""

from __future__ import annotations

import difflib
import os
from typing import Iterable, Iterator, Sequence

import lmdb
import torch

from featstore.errors import FeatstoreError, MissingKeyError
from featstore.format.blob import Entry, decode_entry
from featstore.format.codecs.base import FEATURES
from featstore.format.keys import key_kind, key_to_bytes
from featstore.store import batch_read
from featstore.store.batch_read import ReadPlan, reading_codec
from featstore.store.entry_checks import check_frames
from featstore.store.environments import OpenEnv, release
from featstore.store.handle import SetHandle
from featstore.store.layout import (PRIMARY_FEATURE_SET, check_feature_set, list_feature_sets, read_manifest,
                                    resolve_store_path)
from featstore.store.prefetch import PREFETCH_DEFAULT, READAHEAD_DEFAULT, prefetch
from featstore.store.raw import RawAccess
from featstore.store.scopes import StoreSnapshot, StoreView

__all__ = ["FeatureStore", "StoreView", "StoreSnapshot", "ReadPlan", "feature_set_names"]

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



class FeatureStore(SetHandle, RawAccess):
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
        self._rec: OpenEnv | None = None

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
            release(rec)

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
            prefetch(self._rec, (value,))
        entry = self._decode(value, kb, copy=copy)
        if frames is not None:
            check_frames(kb.decode(), entry, frames, self._where)
        return entry

    def _decode(self, value, kb: bytes, *, copy: bool) -> Entry:
        """Decode one value. Copies carry `features` as the set's storage codec serves them:
        as stored, or converted straight from the map in one pass (an fp8 store's codes
        dequantised to bfloat16, without the `features_scale` the codec applied)."""
        name = kb.decode()
        codec, served = reading_codec(self._manifest)
        entry = decode_entry(value, key=name, verify=self.verify_checksums, copy=copy and served is None)
        if not copy or served is None:
            return entry  # as stored: copies, or views for `view`
        stored = entry.tensors
        features = codec.decode(stored, key=name, where=self._where) if FEATURES in stored else None
        entry.tensors = {n: t.clone() for n, t in stored.items() if n not in codec.tensors}  # the rest: owned
        if features is not None:
            entry.tensors[FEATURES] = features
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


    def _values(self, txn, kbs: list[bytes], keys: list) -> list[memoryview]:
        values = []
        for kb, key in zip(kbs, keys):
            value = txn.get(kb, db=self._db)
            if value is None:
                raise self._missing(key, txn)
            values.append(value)
        if self.prefetch:
            prefetch(self._rec, values)
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
        return batch_read.read_into(self, keys, out, dtype=dtype, tensor=tensor, frames=frames, data_root=data_root,
                                    pin_memory=pin_memory)

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
        return batch_read.plan_read(self, keys, tensor=tensor, frames=frames, data_root=data_root, missing=missing)

    def get_many(self, keys: Iterable) -> list[Entry]:
        """Copies of the entries of `keys`, read in one transaction (entries may differ in shape).

        Raises MissingKeyError naming the first missing key; nothing is returned then."""
        keys = list(keys)
        kbs = [key_to_bytes(k) for k in keys]
        with self._read_txn() as txn:
            values = self._values(txn, kbs, keys)
            return [self._decode(v, kb, copy=True) for kb, v in zip(kbs, values)]


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
