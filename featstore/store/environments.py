"""The per-process registry of open store environments: one LMDB environment per store per
process, shared by every FeatureStore (of any feature set) on it, re-opened after a fork.

py-lmdb refuses to open the same environment twice in one process, and LMDB forbids using an
environment inherited through fork, so a reader looks its store up here by the data file's
identity and the pid (`featstore.store.reader.FeatureStore` opens and releases the records).
"""

from __future__ import annotations

import os
import threading

import lmdb

from featstore.errors import InheritedLockedStoreError

__all__ = ["OPEN_ENVS", "INHERITED_LOCKED_ENVS", "OpenEnv", "store_id", "map_range", "release", "forget_inherited"]

# One environment per store per process, shared by every FeatureStore on it: py-lmdb refuses to
# open the same environment twice in one process. Keyed like py-lmdb's own guard, by the data
# file's (st_dev, st_ino): a store deleted and rebuilt at the same path is a different store.
OPEN_ENVS: dict[tuple, "OpenEnv"] = {}
# Environments inherited through fork whose lock table the parent still uses: closing them in
# the child would clear the parent's reader slots (mdb_env_close clears slots by the opener's
# pid), so they are kept referenced and never touched.
INHERITED_LOCKED_ENVS: list = []


def store_id(path: str) -> tuple:
    """The key of a store in `OPEN_ENVS`: its data file's (device, inode), else its real path."""
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
        return ("ino", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


class OpenEnv:
    """One process's open environment of a store, plus what reads need besides it."""

    def __init__(self, ident: tuple, path: str, env: lmdb.Environment, locked: bool):
        self.ident, self.env, self.locked, self.pid, self.refs = ident, env, locked, os.getpid(), 0
        # Per thread: the read transaction a `snapshot()` block pins (`txn`) and how deeply
        # blocks are nested (`depth`); every FeatureStore on this environment reads through it.
        self.pins = threading.local()
        self.fd = os.open(os.path.join(path, "data.mdb"), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        # For prefetching exact value pages with posix_fadvise: a value's file offset is its
        # address minus the map's base address. (env.info()["map_addr"] is 0 unless LMDB was
        # opened with MDB_FIXEDMAP, so the base comes from /proc/self/maps; None elsewhere.)
        self.map_addr, self.map_end = map_range(self.fd) or (None, None)

    def pinned(self):
        """The read transaction a snapshot block pins in this thread, or None."""
        return getattr(self.pins, "txn", None)

    def close(self) -> None:
        os.close(self.fd)
        self.env.close()


def map_range(fd: int) -> tuple[int, int] | None:
    """[start, end) of this process's mapping of the file open as `fd` (offset 0), or None."""
    st = os.fstat(fd)
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return None
    found = None
    for line in lines:
        # "7f7c6e800000-7f7c7be1c000 r--s 00000000 fe:00 2146723   /path/data.mdb"
        parts = line.split(None, 5)
        if len(parts) < 5 or int(parts[2], 16) != 0 or int(parts[4]) != st.st_ino:
            continue
        major, minor = (int(x, 16) for x in parts[3].split(":"))
        if os.makedev(major, minor) != st.st_dev:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if found is None or end - start > found[1] - found[0]:
            found = (start, end)
    return found


def release(rec: "OpenEnv") -> None:
    """Drop one reference to `rec`; the last one closes the environment and forgets it."""
    rec.refs -= 1
    if rec.refs <= 0 and OPEN_ENVS.get(rec.ident) is rec:
        del OPEN_ENVS[rec.ident]
        rec.close()


def forget_inherited(path: str, rec: "OpenEnv") -> None:
    """Drop an environment this process inherited through fork, so it can be opened afresh."""
    del OPEN_ENVS[rec.ident]
    if rec.locked:
        INHERITED_LOCKED_ENVS.append(rec)
        raise InheritedLockedStoreError(
            f"{path}: this store was opened with locking (its build is in progress) before the "
            "process forked, and LMDB cannot reopen it in the child. Open it only inside the "
            "workers, use the 'spawn' start method, or wait for the build to complete."
        )
    # No lock table: closing only unmaps this child's copy of the map, closes its copies of the
    # fds and frees py-lmdb's "already open" registration. Views the child inherited from the
    # parent become invalid (they must not be used across fork anyway).
    rec.close()
