"""The on-disk layout of a store: one LMDB environment directory with named sub-databases.

    <data-root>/vggt_features.lmdb/      LMDB environment (data.mdb, lock.mdb)
        sub-db "features"       key (UTF-8 relative path) -> safetensors blob (featstore.format.blob)
        sub-db "meta"           b"manifest" -> JSON manifest; b"last_build" -> JSON build report
        sub-db "features.NAME"  the entries of feature set NAME; its manifest and build report
                                are b"manifest.NAME" and b"last_build.NAME" in "meta"

A store holds one or more named **feature sets** (the features of one encoder spec each, e.g.
VGGT's and a vision tower's). The primary set, "vggt", is the original layout (`features`,
`manifest`, `last_build`), so every store written before feature sets existed is a store with
one set. Each set's manifest is rewritten in the same transaction as every batch of that
set's entries, so its entry count and bytes always describe exactly what is committed. See
docs/FORMAT.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import stat
import struct
from typing import Any

import lmdb

from featstore import __version__
from featstore.contract.naming import (DEFAULT_STORE_NAME, FEATURE_SET_NAME, PRIMARY_FEATURE_SET, SHARD_STORES_GLOB,
                                       is_shard_store_name,
                                       build_command_for_set, check_feature_set, default_feature_set,
                                       feature_set_label)
from featstore.format.codecs import FORMAT_VERSION, FP8_FORMAT_VERSION, codec_for, supported_format_versions
from featstore.errors import (CorruptStoreError, FeatstoreError, FeatureSetNotFoundError, FingerprintMismatchError,
                              InvalidFeatureSetError, ManifestError, StoreAlreadyOpenError, StoreNotFoundError,
                              StorePermissionError)

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
    "PRIMARY_FEATURE_SET",
    "MAX_FEATURE_SETS",
    "check_feature_set",
    "default_feature_set",
    "build_command_for_set",
    "features_db",
    "manifest_key",
    "last_build_key",
    "feature_set_label",
    "list_feature_sets",
    "read_manifests",
    "resolve_store_path",
    "is_store",
    "open_env",
    "read_manifest",
    "existing_manifest",
    "new_manifest",
    "check_fingerprint",
    "storage_dtype_of",
    "codec_of",
    "PLAN_FIELD",
    "merge_plan",
    "lmdb_value_offset",
    "truncated_size",
    "utc_now",
]

# A set's format version is its storage codec's (featstore.format.codecs): FORMAT_VERSION (1) for
# plain bf16 / fp16 / fp32 features, FP8_FORMAT_VERSION (2) for fp8 (docs/FORMAT.md §4.1).
SUPPORTED_FORMAT_VERSIONS = supported_format_versions()
FEATURES_DB = b"features"
META_DB = b"meta"
MANIFEST_KEY = b"manifest"
LAST_BUILD_KEY = b"last_build"
_MANIFEST_PREFIX = MANIFEST_KEY + b"."
# LMDB fixes how many named sub-databases one process may open when it opens the environment
# (max_dbs): "meta", one per feature set, and room for later ones (a frame index, a journal).
# Readers with a smaller max_dbs (featstore before feature sets: 8) still open any store: they
# open only `features` and `meta`, and LMDB counts the sub-databases a process opens, not those
# the file holds.
MAX_DBS = 64
MAX_FEATURE_SETS = 32  # the writer refuses more (each set is a sub-database: MAX_DBS bounds them)
def features_db(feature_set: str = PRIMARY_FEATURE_SET) -> bytes:
    """The sub-database holding the entries of `feature_set`: b"features" for the primary set,
    b"features.NAME" for the others."""
    check_feature_set(feature_set)
    return FEATURES_DB if feature_set == PRIMARY_FEATURE_SET else FEATURES_DB + b"." + feature_set.encode()


def manifest_key(feature_set: str = PRIMARY_FEATURE_SET) -> bytes:
    """The "meta" key of `feature_set`'s manifest: b"manifest", or b"manifest.NAME"."""
    check_feature_set(feature_set)
    return MANIFEST_KEY if feature_set == PRIMARY_FEATURE_SET else _MANIFEST_PREFIX + feature_set.encode()


def last_build_key(feature_set: str = PRIMARY_FEATURE_SET) -> bytes:
    """The "meta" key of `feature_set`'s last build report: b"last_build", or b"last_build.NAME"."""
    check_feature_set(feature_set)
    return LAST_BUILD_KEY if feature_set == PRIMARY_FEATURE_SET else LAST_BUILD_KEY + b"." + feature_set.encode()


def list_feature_sets(env: lmdb.Environment, txn: lmdb.Transaction | None = None) -> list[str]:
    """The feature sets of an open store, sorted: one per manifest key in "meta" (b"manifest" is
    the primary set, b"manifest.NAME" set NAME; keys of other shapes are ignored, as readers
    ignore what they do not know). [] when the store has no "meta" sub-database."""
    try:
        meta_db = env.open_db(META_DB, txn=txn, create=False)
    except lmdb.NotFoundError:
        return []
    if txn is None:
        with env.begin() as t:
            return list_feature_sets(env, t)
    names = []
    cur = txn.cursor(db=meta_db)
    ok = cur.set_range(MANIFEST_KEY)
    while ok:
        key = bytes(cur.key())
        if key == MANIFEST_KEY:
            names.append(PRIMARY_FEATURE_SET)
        elif key.startswith(_MANIFEST_PREFIX):
            name = key[len(_MANIFEST_PREFIX):].decode("utf-8", "replace")
            if FEATURE_SET_NAME.fullmatch(name) and name != PRIMARY_FEATURE_SET:
                names.append(name)
        else:
            break  # keys are sorted: past b"manifest." there are no more manifests
        ok = cur.next()
    return sorted(names)


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


def permission_error(path: str, need: str) -> StorePermissionError:
    """The error for a store path this user may not use: who owns it, its mode, what is needed."""
    try:
        st = os.stat(path)
        owner = f"owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}"
    except OSError:
        owner = "its folder may not be entered"
    return StorePermissionError(
        f"{path}: permission denied ({owner}; this process runs as uid {os.getuid()}): {need}. Run as a user "
        "who has that access, or change the permissions (chmod / chown)"
    )


def require_directory(path: str, what: str, advice: str, error=FeatstoreError) -> None:
    """Raise `error` ("<what> <path> is not a directory; <advice>") unless `path` is a folder;
    StorePermissionError when it may not be reached or listed (a folder above it, or it, lacks
    this user's access: os.path.isdir would only say False)."""
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except PermissionError:
        raise permission_error(path, "a folder above it may not be entered (x access)") from None
    except OSError:
        is_dir = False
    if not is_dir:
        raise error(f"{what} {path} is not a directory; {advice}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise permission_error(path, "listing its images needs read and enter (r-x) access")


def resolve_store_path(path: str | os.PathLike) -> str:
    """Return the store directory for `path`: the store itself, or a data root holding
    ``vggt_features.lmdb``. Raises StoreNotFoundError naming both places looked at, or
    StorePermissionError when one of them exists but may not be looked into."""
    path = os.fspath(path)
    if is_store(path):
        return path
    beside = os.path.join(path, DEFAULT_STORE_NAME)
    if is_store(beside):
        return beside
    for candidate in (path, beside):
        if os.path.isdir(candidate) and not os.access(candidate, os.R_OK | os.X_OK):
            raise permission_error(candidate, "reading a store needs read and enter (r-x) access to its folder")
    # A data root whose hosts each built a part (`featstore build --shard I/N`), not yet merged;
    # training names the store itself (DATA_ROOT/vggt_features.lmdb).
    named_store = os.path.basename(path.rstrip(os.sep)) == DEFAULT_STORE_NAME
    root = (os.path.dirname(path.rstrip(os.sep)) or ".") if named_store else path
    shards = shard_stores_in(root)
    if shards:
        raise StoreNotFoundError(
            f"no featstore database at {path} (nor at {beside}), but shard stores of `featstore build --shard`: "
            f"{', '.join(shards)}; merge them into {os.path.join(root, DEFAULT_STORE_NAME)} with `featstore merge "
            f"--data-root {root} {os.path.join(root, SHARD_STORES_GLOB)}`, or name one of them")
    raise StoreNotFoundError(
        f"no featstore database at {path} (nor at {beside}); build one with "
        f"`featstore build --data-root DATA_ROOT`"
    )


def shard_stores_in(path: str) -> list[str]:
    """The shard stores `featstore build --shard I/N` made in the folder `path` (sorted names;
    [] when it is no readable folder)."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(n for n in names if is_shard_store_name(n) and is_store(os.path.join(path, n)))


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
        if _permission_denied(e):
            raise permission_error(path, "reading needs read access to the folder and data.mdb" if readonly else
                                   "building or changing a store needs write access to its folder and files") from None
        if readonly and not is_store(path):
            raise StoreNotFoundError(f"no featstore database at {path}; build one with `featstore build`, or "
                                     "pass the path of an existing store") from None
        raise CorruptStoreError(f"{path}/data.mdb: LMDB cannot open it ({e}); is it a featstore database? "
                                f"Run `featstore verify {path}`") from None
    short = truncated_size(path, env)
    if short is not None:
        env.close()
        raise _truncated_error(path, short)
    return env


def _permission_denied(e: lmdb.Error) -> bool:
    """py-lmdb reports EACCES as lmdb.Error with the OS's text (no errno attribute)."""
    return "Permission denied" in str(e) or "EACCES" in str(e)


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


def existing_manifest(path: str, feature_set: str = PRIMARY_FEATURE_SET) -> dict | None:
    """The manifest of `feature_set` in the store at `path`, or None when there is no such set
    yet: no data.mdb, an empty environment (a first build killed before its first commit), or a
    store that holds other sets only."""
    check_feature_set(feature_set)
    if not is_store(path):
        return None
    env = open_env(path, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            if is_uninitialised(env, txn):
                return None
            sets = list_feature_sets(env, txn)
            if sets and feature_set not in sets:
                return None
        return read_manifest(env, path=path, feature_set=feature_set)
    finally:
        env.close()


def _is_features_db(name: bytes) -> bool:
    return name == FEATURES_DB or (name.startswith(FEATURES_DB + b".")
                                   and FEATURE_SET_NAME.fullmatch(name[len(FEATURES_DB) + 1:].decode("utf-8", "replace"))
                                   is not None)


def is_uninitialised(env: lmdb.Environment, txn: lmdb.Transaction) -> bool:
    """True for an environment that holds no featstore data yet: no sub-database other than
    ours, no manifest of any feature set and no entries (what a build killed before its first
    commit leaves)."""
    names = [bytes(k) for k, _ in txn.cursor()]
    if not all(n == META_DB or _is_features_db(n) for n in names):
        return False
    if META_DB in names and list_feature_sets(env, txn):
        return False
    return all(txn.stat(env.open_db(n, txn=txn, create=False))["entries"] == 0 for n in names if n != META_DB)


def format_version_for(spec) -> int:
    """The format version of a store of `spec`'s features (an EncoderSpec, its dict, or None):
    its storage codec's (`codec_for(spec.storage_dtype).format_version`)."""
    storage = spec.get("storage_dtype") if isinstance(spec, dict) else getattr(spec, "storage_dtype", None)
    return codec_for(storage).format_version


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


def read_manifest(env: lmdb.Environment, txn: lmdb.Transaction | None = None, *, path: str = "",
                  feature_set: str = PRIMARY_FEATURE_SET) -> dict:
    """Read and check the manifest of `feature_set` (default the primary set) in an open store.

    Raises:
        ManifestError: naming `path` (and the set): not a featstore database, an unreadable
            manifest, an unsupported format version.
        FeatureSetNotFoundError: the store has no such set (the message lists the sets it has).
    """
    key = manifest_key(feature_set)
    where = feature_set_label(path, feature_set)
    try:
        meta_db = env.open_db(META_DB, txn=txn, create=False)
    except lmdb.NotFoundError:
        raise ManifestError(f"{path}: not a featstore database (no '{META_DB.decode()}' sub-database); pass the "
                            "path of a store that `featstore build` wrote") from None
    if txn is None:
        with env.begin() as t:
            return read_manifest(env, t, path=path, feature_set=feature_set)
    raw = txn.get(key, db=meta_db)
    raw = bytes(raw) if raw is not None else None
    if raw is None:
        have = list_feature_sets(env, txn)
        if not have:
            raise ManifestError(f"{path}: the store has no manifest; it is damaged or was not written by featstore: "
                                "restore it from a good copy, or rebuild it")
        raise FeatureSetNotFoundError(
            f"{path}: the store has no feature set {feature_set!r}; it has {', '.join(map(repr, have))}. Open one "
            f"of those (FeatureStore(..., feature_set=NAME), --feature-set NAME), or build this one into the store "
            f"({build_command_for_set(feature_set)})")
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{where}: the manifest is not valid JSON ({e}); the store is damaged: restore it from "
                            "a good copy, or rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "featstore":
        raise ManifestError(f"{where}: the manifest is not a featstore manifest; the store is damaged or was not "
                            "written by featstore: restore it from a good copy, or rebuild it")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ManifestError(
            f"{where}: store format version {version!r} is not supported by featstore {__version__} "
            f"(supports {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); rebuild the store or install a "
            "matching featstore"
        )
    return manifest


def read_manifests(env: lmdb.Environment, txn: lmdb.Transaction | None = None, *, path: str = "") -> dict[str, dict]:
    """{feature set: its manifest} for every set of an open store, in name order, read in one
    transaction. Raises ManifestError like `read_manifest` (a store without any set included)."""
    if txn is None:
        with env.begin() as t:
            return read_manifests(env, t, path=path)
    names = list_feature_sets(env, txn)
    if not names:
        read_manifest(env, txn, path=path)  # raises the error that says what the store lacks
    return {name: read_manifest(env, txn, path=path, feature_set=name) for name in names}


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
    from featstore.contract.spec import EncoderSpec, spec_diff, spec_mismatch_details

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


def codec_of(manifest: dict):
    """The storage codec of a set (`featstore.format.codecs.codec_for` of its storage dtype; the
    plain default for a set written without a spec)."""
    return codec_for(storage_dtype_of(manifest))


PLAN_FIELD = "plan"  # the manifest field of the set's recorded plan (featstore.build.plan_record)


def merge_plan(old: dict | None, new: dict) -> dict:
    """The record after a build of plan `new` into a set that recorded `old`: the union (a file
    planned again replaces its earlier entry, keyed by file, image folder and percent). The
    writer merges it inside the transaction that marks the build complete.

    Example:
        >>> from featstore.store.layout import merge_plan
        >>> a = {"unit": "sequence", "scan": False, "annotations": [{"file": "a.json"}]}
        >>> merge_plan(a, {"unit": "sequence", "scan": True, "annotations": [{"file": "b.json"}]})["annotations"]
        [{'file': 'a.json'}, {'file': 'b.json'}]
    """
    if not old:
        return new
    ident = lambda f: (f["file"], f.get("image_dir"), f.get("percent", 100))  # noqa: E731
    files = {ident(f): f for f in old.get("annotations", [])}
    for f in new.get("annotations", []):
        files[ident(f)] = f
    merged = {"unit": new.get("unit", old.get("unit")), "scan": bool(old.get("scan")) or bool(new.get("scan")),
              "annotations": list(files.values())}
    policy = new.get("video_policy", old.get("video_policy"))  # the last build's: its entries are current
    if policy is not None:
        merged["video_policy"] = policy
    # A part of the plan (`--shard I/N`) stays recorded only while the plan is the one it is a
    # part of: the same files, the same scan, the same part. Otherwise the whole plan is checked.
    same_plan = {ident(f) for f in old.get("annotations", [])} == {ident(f) for f in new.get("annotations", [])} \
        and bool(old.get("scan")) == bool(new.get("scan"))
    if new.get("shard") is not None and same_plan and old.get("shard") == new["shard"]:
        merged["shard"] = new["shard"]
    return merged
