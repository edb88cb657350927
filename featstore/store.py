"""The on-disk layout of a store: one LMDB environment directory with named sub-databases.

    <data-root>/vggt_features.lmdb/      LMDB environment (data.mdb, lock.mdb)
        sub-db "features"  key (UTF-8 relative path) -> safetensors blob (featstore.format)
        sub-db "meta"      b"manifest" -> JSON manifest; b"last_build" -> JSON build report

The manifest is rewritten in the same transaction as every batch of entries, so its entry
count and bytes always describe exactly what is committed. See docs/FORMAT.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import struct
from typing import Any

import lmdb

from featstore import __version__
from featstore.errors import (CorruptStoreError, FeatstoreError, FingerprintMismatchError, ManifestError,
                              StoreAlreadyOpenError, StoreNotFoundError)

__all__ = [
    "DEFAULT_STORE_NAME",
    "FORMAT_VERSION",
    "FP8_FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "format_version_for",
    "FEATURES_DB",
    "META_DB",
    "MANIFEST_KEY",
    "LAST_BUILD_KEY",
    "resolve_store_path",
    "is_store",
    "open_env",
    "read_manifest",
    "existing_manifest",
    "new_manifest",
    "check_fingerprint",
    "storage_dtype_of",
    "lmdb_value_offset",
    "truncated_size",
    "utc_now",
]

DEFAULT_STORE_NAME = "vggt_features.lmdb"
FORMAT_VERSION = 1  # stores of unquantised features (bf16, fp16, fp32): unchanged since version 1
# fp8 stores (docs/FORMAT.md §4.1): `features` alone would be misread without its per-token
# scale by a version-1 reader, so they carry version 2, which such readers refuse.
FP8_FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION, FP8_FORMAT_VERSION)
FEATURES_DB = b"features"
META_DB = b"meta"
MANIFEST_KEY = b"manifest"
LAST_BUILD_KEY = b"last_build"
MAX_DBS = 8  # room for more sub-databases (frame index, journal) without a format change


def lmdb_value_offset(env: lmdb.Environment) -> int:
    """How far past a page boundary LMDB puts a large value (one on overflow pages) in `env`.

    The page header is 16 bytes in LMDB 0.9 (data format v1, py-lmdb's default) and 24 bytes in
    LMDB 1.0 (format v3: pages also carry a txnid), so a blob padded for one engine is off by 8
    in the other. Values smaller than about 2 KiB sit on leaf pages at arbitrary addresses.
    """
    version = env.lib_version() if hasattr(env, "lib_version") else lmdb.version()
    return 16 if version[0] == 0 else 24


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_store(path: str | os.PathLike) -> bool:
    """True when `path` is an LMDB environment directory (holds data.mdb)."""
    return os.path.isfile(os.path.join(os.fspath(path), "data.mdb"))


def resolve_store_path(path: str | os.PathLike) -> str:
    """Return the store directory for `path`: the store itself, or a data root holding
    ``vggt_features.lmdb``. Raises StoreNotFoundError naming both places looked at."""
    path = os.fspath(path)
    if is_store(path):
        return path
    beside = os.path.join(path, DEFAULT_STORE_NAME)
    if is_store(beside):
        return beside
    raise StoreNotFoundError(
        f"no featstore database at {path} (nor at {beside}); build one with "
        f"`featstore build --data-root DATA_ROOT`"
    )


def open_env(path: str, *, readonly: bool, lock: bool = True, readahead: bool = True,
             map_size: int | None = None, max_readers: int = 126) -> lmdb.Environment:
    """Open the LMDB environment of a store with featstore's settings.

    `readonly=True` never creates anything. `lock=False` is only safe when no process writes
    the store (a published store): then readers need no slot in the lock table and ranks x
    workers are unlimited.
    """
    kwargs: dict[str, Any] = dict(subdir=True, max_dbs=MAX_DBS, readonly=readonly, lock=lock,
                                  readahead=readahead, max_readers=max_readers, create=not readonly,
                                  meminit=False)
    if map_size is not None:
        kwargs["map_size"] = map_size
    short = truncated_size(path) if is_store(path) else None
    if short is not None:
        raise _truncated_error(path, short)
    try:
        env = lmdb.open(path, **kwargs)
    except lmdb.Error as e:
        if "already open in this process" in str(e):
            raise StoreAlreadyOpenError(
                f"{path}: the store is already open in this process (a StoreWriter or another "
                "handle); close it first, or share the open FeatureStore"
            ) from None
        if readonly and not is_store(path):
            raise StoreNotFoundError(f"no featstore database at {path}") from None
        raise CorruptStoreError(f"{path}/data.mdb: LMDB cannot open it ({e}); is it a featstore database? "
                                f"Run `featstore verify {path}`") from None
    short = truncated_size(path, env)
    if short is not None:
        env.close()
        raise _truncated_error(path, short)
    return env


def _committed_bytes(data: str) -> int | None:
    """Bytes that the committed meta page says data.mdb holds, read with read() (no mmap), or
    None when the meta pages do not parse (LMDB's open then refuses the file by itself).

    64-bit LMDB meta page: 16-byte page header, then magic u32, version u32, address, mapsize,
    two 48-byte MDB_db records (the first one's md_pad is the page size), last_pgno, txnid."""
    try:
        with open(data, "rb") as f:
            head = f.read(2 * 65536)
    except OSError:
        return None
    metas = []
    for psize_guess in (4096, 8192, 16384, 32768, 65536):
        for i in (0, 1):
            base = i * psize_guess
            if len(head) < base + 152:
                continue
            magic, = struct.unpack_from("<I", head, base + 16)
            if magic != 0xBEEFC0DE:
                continue
            psize, = struct.unpack_from("<I", head, base + 40)
            last_pgno, txnid = struct.unpack_from("<QQ", head, base + 136)
            if psize == psize_guess or i == 0:
                metas.append((txnid, last_pgno, psize))
        if len(metas) == 2:
            break
    if not metas:
        return None
    _, last_pgno, psize = max(metas)
    return (last_pgno + 1) * psize


def truncated_size(path: str, env: lmdb.Environment | None = None) -> tuple[int, int] | None:
    """(bytes on disk, bytes its pages need) when the store's data.mdb is shorter than its last
    committed page, else None. The one truncation check (open_env and verify use it).

    Reading a value past the end of the file through the map kills the process with SIGBUS, not
    an exception, so this runs before LMDB maps the file: the meta pages are read with read().
    With `env` (already open) the engine's own page count is used when the meta pages do not
    parse here.
    """
    data = os.path.join(path, "data.mdb")
    try:
        have = os.path.getsize(data)
    except OSError:
        return None
    need = _committed_bytes(data)
    if need is None and env is not None:
        try:
            need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        except lmdb.Error:
            return None
    return (have, need) if need is not None and have < need else None


def _truncated_error(path: str, short: tuple[int, int]) -> CorruptStoreError:
    have, need = short
    return CorruptStoreError(
        f"{os.path.join(path, 'data.mdb')} is truncated: {have} bytes, but its pages run to {need} bytes. The store "
        "is damaged (a copy cut short, a full disk in a copy): restore it from a good copy or rebuild it.")


def existing_manifest(path: str) -> dict | None:
    """The manifest of the store at `path`, or None when there is no store yet: no data.mdb,
    or an empty environment (a first build killed before its first commit)."""
    if not is_store(path):
        return None
    env = open_env(path, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            if is_uninitialised(env, txn):
                return None
        return read_manifest(env, path=path)
    finally:
        env.close()


def is_uninitialised(env: lmdb.Environment, txn: lmdb.Transaction) -> bool:
    """True for an environment that holds no featstore data yet: no sub-database other than
    ours, no manifest and no entries (what a build killed before its first commit leaves)."""
    names = [bytes(k) for k, _ in txn.cursor()]
    if not set(names) <= {FEATURES_DB, META_DB}:
        return False
    if META_DB in names and txn.get(MANIFEST_KEY, db=env.open_db(META_DB, txn=txn, create=False)) is not None:
        return False
    return FEATURES_DB not in names or txn.stat(env.open_db(FEATURES_DB, txn=txn, create=False))["entries"] == 0


def format_version_for(spec) -> int:
    """The format version of a store of `spec`'s features (an EncoderSpec, its dict, or None)."""
    from featstore.dtypes import is_quantised

    storage = spec.get("storage_dtype") if isinstance(spec, dict) else getattr(spec, "storage_dtype", None)
    return FP8_FORMAT_VERSION if is_quantised(storage) else FORMAT_VERSION


def new_manifest(spec=None) -> dict:
    """A first manifest for a store of features computed by `spec` (an EncoderSpec, or None for
    a store without one); the fingerprint is the spec's, the storage dtype is the spec's field."""
    return {
        "format": "featstore",
        "format_version": format_version_for(spec),
        "featstore_version": __version__,
        "created": utc_now(),
        "encoder": spec.to_dict() if spec is not None else {},
        "fingerprint": spec.fingerprint() if spec is not None else None,
        "entries": 0,
        "bytes": 0,
        "build": {"state": "in_progress", "updated": utc_now()},
    }


def read_manifest(env: lmdb.Environment, txn: lmdb.Transaction | None = None, *, path: str = "") -> dict:
    """Read and check the manifest of an open store. Raises ManifestError naming `path`."""
    try:
        meta_db = env.open_db(META_DB, txn=txn, create=False)
    except lmdb.NotFoundError:
        raise ManifestError(f"{path}: not a featstore database (no '{META_DB.decode()}' sub-database)") from None
    if txn is None:
        with env.begin(db=meta_db) as t:
            raw = t.get(MANIFEST_KEY)
            raw = bytes(raw) if raw is not None else None
    else:
        raw = txn.get(MANIFEST_KEY, db=meta_db)
        raw = bytes(raw) if raw is not None else None
    if raw is None:
        raise ManifestError(f"{path}: the store has no manifest")
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: the manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "featstore":
        raise ManifestError(f"{path}: the manifest is not a featstore manifest")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ManifestError(
            f"{path}: store format version {version!r} is not supported by featstore {__version__} "
            f"(supports {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); rebuild the store or install a "
            "matching featstore"
        )
    return manifest


# What to do about a spec mismatch, per caller (the message always lists every differing field).
REBUILD_ADVICE = ("Rebuild the store with the spec training uses, or point training at the matching store.")


def check_fingerprint(manifest: dict, expected, *, path: str = "", advice: str = REBUILD_ADVICE) -> None:
    """Raise FingerprintMismatchError unless the store was built with the `expected` spec.

    Args:
        manifest: the store's manifest.
        expected: the EncoderSpec the caller needs, or its dict (`EncoderSpec.to_dict()`).
        path: the store path, named in the error.
        advice: what the caller can do about it (build: --force or another --store).

    Raises:
        FingerprintMismatchError: naming EVERY differing field with the store's value and the
            expected one (`EncoderSpec.diff`); or, when the fields agree, the two fingerprints
            (a manifest edited by hand, or written by another featstore's spec version).
    """
    from featstore.encoders.spec import EncoderSpec, spec_diff, spec_mismatch_details

    stored = manifest.get("encoder") or {}
    if spec_diff(stored, expected):
        raise FingerprintMismatchError(
            f"{path}: the store was built with a different encoder spec "
            f"({spec_mismatch_details(stored, expected)}). {advice}")
    stored_fp = manifest.get("fingerprint")
    try:
        want_fp = (expected if isinstance(expected, EncoderSpec) else EncoderSpec.from_dict(expected)).fingerprint()
    except FeatstoreError:  # not a complete spec: there is no fingerprint to compare
        return
    if stored_fp is not None and stored_fp != want_fp:
        raise FingerprintMismatchError(
            f"{path}: the store's fingerprint {stored_fp!r} differs from the expected {want_fp!r} "
            f"although the encoder spec fields match (a manifest edited by hand?). {advice}")


def storage_dtype_of(manifest: dict) -> str | None:
    """The dtype name of the stored features: the manifest's encoder spec keeps it (once)."""
    return (manifest.get("encoder") or {}).get("storage_dtype")
