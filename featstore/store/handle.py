"""A feature set's handle on the process's shared LMDB environment (the base of `FeatureStore`).

The environment is opened lazily in the process that reads, and re-opened when the pid changes:
an LMDB environment inherited through fork must not be used (LMDB's rule), and py-lmdb refuses
to open a path twice in one process, so every set of one store shares the process's one
environment record (featstore.store.environments), released by `close()`. Locking is decided
per open (`lock=None`): off for a store whose builds are all complete, on while any is in
progress. Every read runs in `_read_txn()`: the `snapshot` block's pinned transaction, else
a new one.

Example:
    >>> from featstore import FeatureStore
    >>> with FeatureStore("data/") as store:                  # opens on first use, in this pid
    ...     store.manifest["entries"] > 0
    True
"""

from __future__ import annotations

import contextlib
import logging
import os

import lmdb

from featstore.errors import CorruptStoreError, FeatstoreError
from featstore.store.environments import OPEN_ENVS, OpenEnv, forget_inherited, release, store_id
from featstore.store.layout import (check_fingerprint, feature_set_label, features_db, list_feature_sets, open_env,
                                    read_manifest)

__all__ = ["SetHandle"]

logger = logging.getLogger("featstore")


class SetHandle:
    """Opening, the read transaction and closing, for `FeatureStore` (which sets the options
    `path`, `feature_set`, `lock`, `readahead`, `max_readers`, `expected_encoder` and the state
    `_env`, `_db`, `_pid`, `_manifest`, `_locked`, `_rec` in its `__init__`)."""

    @property
    def _where(self) -> str:
        return feature_set_label(self.path, self.feature_set)

    # -- opening -----------------------------------------------------------------------------
    def _open(self, lock: bool) -> lmdb.Environment:
        return open_env(self.path, readonly=True, lock=lock, readahead=self.readahead,
                        max_readers=self.max_readers)

    def _shared_env(self) -> OpenEnv:
        """This process's environment record of the store, opened if needed, with one more
        reference held (the caller releases it)."""
        pid = os.getpid()
        ident = store_id(self.path)
        rec = OPEN_ENVS.get(ident)
        if rec is not None and rec.pid != pid:
            forget_inherited(self.path, rec)
            rec = None
        if rec is None:
            env, locked = self._open_new()
            try:
                rec = OpenEnv(ident, self.path, env, locked)
            except BaseException:
                env.close()
                raise
            OPEN_ENVS[ident] = rec
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
            release(rec)
            raise CorruptStoreError(f"{self._where}: the manifest exists but the sub-database "
                                    f"'{features_db(self.feature_set).decode()}' does not; the store is damaged: "
                                    "restore it or rebuild the set") from None
        except BaseException:
            release(rec)
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
            release(self._rec)
        self._env = self._db = self._pid = self._rec = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()



def _build_complete(env, txn, path: str, feature_set: str) -> bool:
    """Whether the set's manifest says its build is complete (False when it does not read)."""
    try:
        return read_manifest(env, txn, path=path, feature_set=feature_set).get("build", {}).get("state") == "complete"
    except FeatstoreError:
        return False
