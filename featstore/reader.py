"""`FeatureStore`: the read side, used by training's DataLoader workers and by `verify`.

The environment is opened lazily in the process that reads, and re-opened when the pid changes:
an LMDB environment inherited through fork must not be used (LMDB's rule), and py-lmdb refuses
to open a path twice in one process. The object pickles as its path and options only, so it
travels to spawn workers too.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

import lmdb
import torch

from featstore.errors import FeatstoreError, MissingKeyError
from featstore.format import Entry, decode_entry
from featstore.keys import key_to_bytes
from featstore.store import FEATURES_DB, check_fingerprint, open_env, read_manifest, resolve_store_path

__all__ = ["FeatureStore"]

# One environment per store file per process, shared by every FeatureStore on it: py-lmdb
# refuses to open the same environment twice in one process. realpath -> _OpenEnv.
_OPEN_ENVS: dict[str, "_OpenEnv"] = {}
# Environments inherited through fork whose lock table the parent still uses: closing them in
# the child would clear the parent's reader slots (mdb_env_close clears slots by the opener's
# pid), so they are kept referenced and never touched.
_INHERITED_LOCKED_ENVS: list = []


class _OpenEnv:
    def __init__(self, env: lmdb.Environment, locked: bool):
        self.env, self.locked, self.pid, self.refs = env, locked, os.getpid(), 0


def _release(real: str, rec: "_OpenEnv") -> None:
    rec.refs -= 1
    if rec.refs <= 0 and _OPEN_ENVS.get(real) is rec:
        del _OPEN_ENVS[real]
        rec.env.close()


def _forget_inherited(real: str, rec: "_OpenEnv") -> None:
    """Drop an environment this process inherited through fork, so it can be opened afresh."""
    del _OPEN_ENVS[real]
    if rec.locked:
        _INHERITED_LOCKED_ENVS.append(rec.env)
        raise FeatstoreError(
            f"{real}: this store was opened with locking (its build is in progress) before the "
            "process forked, and LMDB cannot reopen it in the child. Open it only inside the "
            "workers, use the 'spawn' start method, or wait for the build to complete."
        )
    # No lock table: closing only unmaps this child's copy and frees py-lmdb's "already open"
    # registration. Views the child inherited from the parent become invalid.
    rec.env.close()


class FeatureStore:
    """Read-only access to a featstore database.

    Args:
        path: the store directory, or a data root that holds ``vggt_features.lmdb``.
        lock: LMDB locking. ``None`` (default) decides per open: off for a store whose build
            is complete (no reader slots needed, any number of ranks x workers), on while a
            build is in progress (readers then never see pages a writer reuses).
        readahead: OS readahead on the map. On by default: cold reads of feature-sized values
            are several times faster with it (docs/BENCHMARKS.md); the common ``False`` recipe
            is tuned for tiny values.
        verify_checksums: recompute each value's CRC-32 on read and refuse a mismatch
            (about 2.5 GB/s per core; off by default, `featstore verify` checks whole stores).
        expected_encoder: an encoder spec dict; opening fails with FingerprintMismatchError
            naming each field that differs from the store's manifest.
        max_readers: reader slots when locking is on.

    Example:
        >>> store = FeatureStore("data/")                     # finds data/vggt_features.lmdb
        >>> feats = store.get("scene1/000.jpg").features      # [frames, tokens, channels], zero-copy
        >>> batch = store.read_into(["a.jpg", "b.jpg"])      # one copy out of the map
    """

    def __init__(self, path: str | os.PathLike, *, lock: bool | None = None, readahead: bool = True,
                 verify_checksums: bool = False, expected_encoder: dict | None = None,
                 max_readers: int = 2048):
        self.path = resolve_store_path(path)
        self.lock = lock
        self.readahead = readahead
        self.verify_checksums = verify_checksums
        self.expected_encoder = expected_encoder
        self.max_readers = max_readers
        self._env: lmdb.Environment | None = None
        self._db = None
        self._pid: int | None = None
        self._manifest: dict | None = None
        self._locked = False
        self._rec: _OpenEnv | None = None

    # -- pickling: path and options only ------------------------------------------------------
    def __getstate__(self) -> dict:
        return {"path": self.path, "lock": self.lock, "readahead": self.readahead,
                "verify_checksums": self.verify_checksums, "expected_encoder": self.expected_encoder,
                "max_readers": self.max_readers}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return f"FeatureStore({self.path!r})"

    # -- opening -----------------------------------------------------------------------------
    def _open(self, lock: bool) -> lmdb.Environment:
        return open_env(self.path, readonly=True, lock=lock, readahead=self.readahead,
                        max_readers=self.max_readers)

    def _environment(self) -> lmdb.Environment:
        pid = os.getpid()
        if self._env is not None and self._pid == pid:
            return self._env
        self._env = self._db = self._rec = None
        real = os.path.realpath(self.path)
        rec = _OPEN_ENVS.get(real)
        if rec is not None and rec.pid != pid:
            _forget_inherited(real, rec)
            rec = None
        if rec is None:
            rec = _OpenEnv(*self._open_new())
            _OPEN_ENVS[real] = rec
        rec.refs += 1
        try:
            env = rec.env
            self._manifest = read_manifest(env, path=self.path)
            if self.expected_encoder is not None:
                check_fingerprint(self._manifest, self.expected_encoder, path=self.path)
            self._db = env.open_db(FEATURES_DB, create=False)
        except BaseException:
            _release(real, rec)
            raise
        self._env, self._pid, self._locked, self._rec = env, pid, rec.locked, rec
        return env

    def _open_new(self) -> tuple[lmdb.Environment, bool]:
        lock = self.lock
        if lock is not None:
            return self._open(lock=lock), lock
        # Lock unless the manifest says no writer will come: read it under the lock first.
        can_lock = os.access(os.path.join(self.path, "lock.mdb"), os.W_OK)
        env = self._open(lock=can_lock)
        try:
            complete = read_manifest(env, path=self.path).get("build", {}).get("state") == "complete"
        except BaseException:
            env.close()
            raise
        if can_lock and complete:
            env.close()
            return self._open(lock=False), False
        return env, can_lock

    def close(self) -> None:
        """Release the environment in this process (closed when no other FeatureStore on the
        same store uses it). Views returned by `get` become invalid once it closes."""
        if self._rec is not None and self._pid == os.getpid():
            _release(os.path.realpath(self.path), self._rec)
        self._env = self._db = self._pid = self._rec = None

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- metadata ----------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        """The store's manifest (JSON dict): format version, encoder spec, fingerprint, counts."""
        self._environment()
        assert self._manifest is not None
        return self._manifest

    def __len__(self) -> int:
        env = self._environment()
        with env.begin() as txn:
            return txn.stat(self._db)["entries"]

    def __contains__(self, key) -> bool:
        env = self._environment()
        with env.begin(db=self._db, buffers=True) as txn:
            return txn.get(key_to_bytes(key)) is not None

    def keys(self) -> Iterator[str]:
        """Iterate over all keys in sorted order (one read transaction per 1024 keys)."""
        env = self._environment()
        last: bytes | None = None
        while True:
            chunk = []
            with env.begin(db=self._db) as txn:
                cur = txn.cursor()
                ok = cur.set_range(last) if last is not None else cur.first()
                if ok and last is not None and cur.key() == last:
                    ok = cur.next()
                while ok and len(chunk) < 1024:
                    chunk.append(cur.key())
                    ok = cur.next()
            if not chunk:
                return
            yield from (k.decode("utf-8") for k in chunk)
            last = chunk[-1]

    __iter__ = keys

    # -- reads -------------------------------------------------------------------------------
    def _missing(self, key) -> MissingKeyError:
        return MissingKeyError(f"key {str(key)!r} is not in the store {self.path}")

    def get(self, key, *, copy: bool = False, frames: Sequence[str] | None = None) -> Entry:
        """Return the entry stored under `key`.

        Args:
            key: relative path of the unit (normalised like every key).
            copy: return tensors that own their memory instead of views into the map.
            frames: the ordered frame list the caller wants; a stored entry computed on another
                frame list is a miss (MissingKeyError), never a wrong answer.

        Not guaranteed: zero-copy views (``copy=False``) stay valid only while this store stays
        open in this process and nobody writes to it; they are read-only memory (writing into
        them crashes the process). ``copy=True`` or `read_into` give tensors valid forever.
        """
        env = self._environment()
        kb = key_to_bytes(key)
        with env.begin(db=self._db, buffers=True) as txn:
            value = txn.get(kb)
            if value is None:
                raise self._missing(key)
            entry = decode_entry(value, key=kb.decode(), verify=self.verify_checksums,
                                 copy=copy or self._locked)
        if frames is not None:
            self._check_frames(kb.decode(), entry, frames)
        return entry

    def _check_frames(self, key: str, entry: Entry, frames: Sequence[str]) -> None:
        from featstore.keys import normalize_key

        wanted = [normalize_key(f) for f in frames]
        if entry.frames != wanted:
            raise MissingKeyError(
                f"key {key!r} in {self.path} was computed on frames {entry.frames}, but {wanted} "
                "were asked for: the cached context differs (a miss). Rebuild with the same annotations."
            )

    def read_into(self, keys: Iterable, out: torch.Tensor | None = None, *, tensor: str = "features",
                  frames: Sequence[Sequence[str]] | None = None, pin_memory: bool = False) -> torch.Tensor:
        """Copy the `tensor` of each key into ``out[i]`` inside one read transaction.

        This is the one copy out of the map: pass `out` in shared or pinned memory (or
        ``pin_memory=True``) and it goes straight to the GPU from there.

        Args:
            keys: the keys of one sample or batch.
            out: a tensor of shape ``[len(keys), *entry_shape]`` and the stored dtype; allocated
                when None.
            tensor: which tensor of each entry to copy.
            frames: optional per-key frame lists to check (see `get`).
            pin_memory: allocate `out` in pinned memory when `out` is None.

        Returns:
            `out`.
        """
        keys = list(keys)
        env = self._environment()
        with env.begin(db=self._db, buffers=True) as txn:
            for i, key in enumerate(keys):
                kb = key_to_bytes(key)
                value = txn.get(kb)
                if value is None:
                    raise self._missing(key)
                entry = decode_entry(value, key=kb.decode(), verify=self.verify_checksums)
                if frames is not None:
                    self._check_frames(kb.decode(), entry, frames[i])
                src = entry.tensors.get(tensor)
                if src is None:
                    raise MissingKeyError(f"entry {kb.decode()!r} in {self.path} has no tensor {tensor!r}")
                if out is None:
                    out = torch.empty((len(keys), *src.shape), dtype=src.dtype, pin_memory=pin_memory)
                if out.shape[1:] != src.shape or out.dtype != src.dtype:
                    raise ValueError(
                        f"entry {kb.decode()!r} holds {tuple(src.shape)} {src.dtype} but the output slot "
                        f"is {tuple(out.shape[1:])} {out.dtype}; batch only entries of one shape"
                    )
                out[i].copy_(src)
        if out is None:
            raise ValueError("read_into needs at least one key")
        return out

    def get_many(self, keys: Iterable) -> list[Entry]:
        """Copies of the entries of `keys`, read in one transaction (entries may differ in shape)."""
        env = self._environment()
        out = []
        with env.begin(db=self._db, buffers=True) as txn:
            for key in keys:
                kb = key_to_bytes(key)
                value = txn.get(kb)
                if value is None:
                    raise self._missing(key)
                out.append(decode_entry(value, key=kb.decode(), verify=self.verify_checksums, copy=True))
        return out

    def raw_items(self, start: str | None = None) -> Iterator[tuple[str, bytes]]:
        """Iterate (key, value bytes) in key order, copying each value (for verify and merge)."""
        env = self._environment()
        last = start.encode("utf-8") if start else None
        skip_first = False
        while True:
            chunk = []
            with env.begin(db=self._db) as txn:
                cur = txn.cursor()
                ok = cur.set_range(last) if last is not None else cur.first()
                if ok and skip_first and cur.key() == last:
                    ok = cur.next()
                size = 0
                while ok and len(chunk) < 256 and size < (256 << 20):
                    k, v = cur.item()
                    chunk.append((k, v))
                    size += len(v)
                    ok = cur.next()
            if not chunk:
                return
            for k, v in chunk:
                yield k.decode("utf-8"), v
            last, skip_first = chunk[-1][0], True
