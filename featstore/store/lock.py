"""Claiming a store path for writing: what may become a store, and one build at a time.

`prepare_store_dir` refuses a path that is a file, or a non-empty folder that holds no store
(an image folder given as ``--store`` would otherwise get a data.mdb, and every later scan of
the data root would skip that folder as "a store").

`BuildLock` lets one build write a feature set of a store at a time. The ranks of one torchrun
build share it (rank 0 takes it for all); a second build of the same set started meanwhile is
refused at once, with the pid, host and start time of the build that holds it. Builds of
different sets of one store may run together (LMDB serialises their commits; each writes only
its own set). It is an flock on ``STORE/featstore-build.lock`` (the primary set, "vggt") or
``STORE/featstore-build.NAME.lock`` (set NAME): the kernel drops it when the last process holding the open file
dies, SIGKILL included, so a killed build never blocks the next one; the pid/host/start it
leaves in the file are then reported as taken over. (flock, not a POSIX record lock: closing any
other descriptor of the file in the process would silently drop a record lock.) A forked child
(a decode worker) closes its inherited copy of the descriptor at once: otherwise a worker still
dying after its build was SIGKILLed would hold the lock, and the rerun right after would be
refused. Closing a copy never releases the flock while the build's own descriptor is open.
(On NFS flock is emulated with record locks and needs a working lock daemon; build on local disk.)

`live_build` tells a reader (`featstore verify`) whether a build holds a set's lock now, without
taking it for more than an instant: a build starting in that instant retries its own attempt
(`_ACQUIRE_TRIES`), so a verify never makes a build be refused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import time

from featstore.contract.naming import PRIMARY_FEATURE_SET, check_feature_set
from featstore.errors import FeatstoreError, StoreBusyError
from featstore.store.layout import utc_now

__all__ = ["LOCK_NAME", "STORE_FILES", "lock_name", "prepare_store_dir", "BuildLock", "live_build", "sets_with_lock_files",
           "describe_build", "pid_alive"]

logger = logging.getLogger("featstore")

LOCK_NAME = "featstore-build.lock"  # the primary set's; set NAME's is featstore-build.NAME.lock
_SET_LOCK = re.compile(r"featstore-build\.[a-z0-9_]{1,32}\.lock")
# A refused flock is retried this often, _ACQUIRE_PAUSE_S apart, before a build is refused: a
# `live_build` probe holds a shared lock for microseconds, and must not turn a build away.
_ACQUIRE_TRIES = 3
_ACQUIRE_PAUSE_S = 0.05
# Descriptors of the locks this process holds; a forked child closes its copies (module docstring).
_held: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_held):
        try:
            os.close(fd)  # close only: flock(LOCK_UN) here would release the parent's lock too
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)
# What a store directory holds: LMDB's two files and the build locks. Nothing else is ours.
STORE_FILES = frozenset({"data.mdb", "lock.mdb", LOCK_NAME})


def lock_name(feature_set: str | None = None) -> str:
    """The build lock file of `feature_set` in a store directory (None: the primary set)."""
    if feature_set is None or check_feature_set(feature_set) == PRIMARY_FEATURE_SET:
        return LOCK_NAME
    return f"featstore-build.{feature_set}.lock"


def _ours(name: str) -> bool:
    return name in STORE_FILES or _SET_LOCK.fullmatch(name) is not None


def prepare_store_dir(path: str, *, create: bool = True) -> None:
    """Create the store directory `path` (unless `create` is False), or check that an existing
    one may become a store.

    Raises:
        FeatstoreError: `path` is a file, or a non-empty directory without a data.mdb (not a
            store); the message names the path and what to pass instead.
    """
    if os.path.isdir(path):
        names = os.listdir(path)
        if "data.mdb" not in names and not all(_ours(n) for n in names):
            shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
            raise FeatstoreError(
                f"store path {path} is a folder that holds {len(names)} other entries ({shown}) and no "
                "featstore store: pass a new or empty directory as the store (--store), or an existing store"
            )
        return
    if os.path.lexists(path):
        raise FeatstoreError(f"store path {path} is a file, not a store directory: pass the path of a new "
                             "directory as the store (--store), or an existing store")
    if not create:
        return
    try:
        os.makedirs(path)
    except FileExistsError:  # created meanwhile by another rank: fine
        pass
    except NotADirectoryError:
        raise FeatstoreError(f"store path {path}: a parent of it is a file; pass a path under a directory") from None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (someone else's process counts: it exists).

    Example:
        >>> import os
        >>> from featstore.store.lock import pid_alive
        >>> pid_alive(os.getpid())
        True
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _flock_retrying(fd: int, how: int) -> None:
    """flock(fd, how | LOCK_NB), retried briefly while another holder has it (see _ACQUIRE_TRIES)."""
    for attempt in range(_ACQUIRE_TRIES):
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or attempt == _ACQUIRE_TRIES - 1:
                raise
            time.sleep(_ACQUIRE_PAUSE_S)


def live_build(store_path: str, feature_set: str | None = None) -> dict | None:
    """The build writing `feature_set` (None: the primary set) of the store now: its record
    ``{"pid", "host", "started"}`` (``{}`` when it left none yet), or None when no build holds the
    lock (none ran, it finished, or it was killed: a killed build leaves its record but not the
    lock). Creates nothing: a store on read-only storage, or one without a lock file, has no
    live build.

    Example:
        >>> from featstore.store.lock import BuildLock, live_build
        >>> live_build("data/vggt_features.lmdb") is None
        True
        >>> with BuildLock("data/vggt_features.lmdb"):
        ...     sorted(live_build("data/vggt_features.lmdb"))
        ['host', 'pid', 'started']
    """
    path = os.path.join(store_path, lock_name(feature_set))
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    try:
        try:
            # A shared lock is granted unless a build holds the exclusive one; released at once.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            return BuildLock._read(fd)
        return None
    finally:
        os.close(fd)  # closing drops the shared lock, if taken


def sets_with_lock_files(store_path: str) -> list[str]:
    """The feature sets that have a build lock file in the store directory (a build of each ran
    or runs; `live_build` says which runs), sorted; [] for a folder that cannot be listed."""
    try:
        names = os.listdir(store_path)
    except OSError:
        return []
    return sorted(PRIMARY_FEATURE_SET if n == LOCK_NAME else n[len("featstore-build."):-len(".lock")]
                  for n in names if n == LOCK_NAME or _SET_LOCK.fullmatch(n))


def describe_build(info: dict) -> str:
    """A build lock's record (`live_build`) in words: ``pid N on host H, started T``."""
    return BuildLock._describe(info)


class BuildLock:
    """Exclusive right to build `feature_set` (None: the primary set) of the store at
    `store_path`, held until `release` (or exit).

    Example:
        >>> from featstore.store.lock import BuildLock
        >>> with BuildLock("data/vggt_features.lmdb"):
        ...     pass  # plan, compute and commit; a second build meanwhile gets StoreBusyError
    """

    def __init__(self, store_path: str, feature_set: str | None = None):
        name = lock_name(feature_set)
        self.path = os.path.join(store_path, name)
        self._set = "" if name == LOCK_NAME else f" (feature set {feature_set!r})"  # how messages name it
        self._fd: int | None = None

    def acquire(self) -> "BuildLock":
        """Take the lock, or raise StoreBusyError naming the build that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            _flock_retrying(fd, fcntl.LOCK_EX)
        except OSError as e:
            holder = self._read(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise StoreBusyError(
                f"{os.path.dirname(self.path)}{self._set} is being written by another build ({self._describe(holder)}); "
                "wait for it to finish and rerun this command (it then finds those units fresh), "
                "or build into another --store"
            ) from None
        left = self._read(fd)
        if left:  # the previous holder ended without releasing: it was killed
            alive = left.get("host") == socket.gethostname() and pid_alive(int(left.get("pid", 0)))
            logger.warning(f"featstore: taking over the build lock of {self._describe(left)}, which "
                           f"{'no longer holds it' if alive else 'is no longer running'} (killed?); "
                           "its committed entries are kept and resumed from")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": utc_now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        _held.add(fd)
        return self

    def release(self) -> None:
        """Clear the holder's record and drop the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _held.discard(fd)
        try:
            os.ftruncate(fd, 0)  # an empty file: released cleanly (a killed holder leaves its record)
        finally:
            os.close(fd)  # closing drops the flock

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            raw = os.pread(fd, 4096, 0)
            info = json.loads(raw) if raw.strip() else {}
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _describe(info: dict) -> str:
        if not info:
            return "pid unknown"
        return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"

    def __enter__(self) -> "BuildLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
