"""`StoreWriter`: the single process that writes a store.

Entries are buffered and committed in batches (by count and by bytes), each batch in one LMDB
write transaction together with the updated manifest, so a crash at any instant loses at most
the open batch and the manifest always describes exactly what is committed. The map grows on
MapFullError; a full disk stops with StoreFullError and keeps every committed batch.
"""

from __future__ import annotations

import errno
import shutil
import json
import os
import signal
import threading
from typing import Mapping

import lmdb
import torch

from featstore.contract.naming import check_feature_set, default_feature_set, feature_set_label
from featstore.contract.spec import EncoderSpec
from featstore.errors import ManifestError, StoreFullError
from featstore.format.blob import align_blob, decode_entry, encode_entry
from featstore.format.codecs.base import FEATURES
from featstore.format.keys import key_to_bytes
from featstore.store.layout import (MAX_FEATURE_SETS, META_DB, PLAN_FIELD, REBUILD_ADVICE, check_fingerprint, codec_of,
                                    features_db, format_version_for, is_uninitialised, last_build_key,
                                    list_feature_sets, lmdb_value_offset, manifest_key, merge_plan, new_manifest,
                                    open_env, read_manifest, utc_now)
from featstore.store.lock import prepare_store_dir

__all__ = ["StoreWriter", "BuildInterrupted"]

DEFAULT_MAP_SIZE = 1 << 30  # grown by doubling on demand; a big map is free (sparse file)


class BuildInterrupted(KeyboardInterrupt):
    """SIGTERM arrived; raised in the main thread so that the open batch is committed."""


class StoreWriter:
    """Write entries into a store (created if absent).

    Args:
        path: the store directory (created).
        spec: the EncoderSpec (or its dict) whose features the store holds; the manifest
            records it, its fingerprint and (inside it) the storage dtype. An existing store
            built with another spec raises FingerprintMismatchError naming every differing
            field, unless `reset`. None: an existing store keeps its spec (gc, merge tools).
        feature_set: the feature set written (docs/FORMAT.md, "Feature sets"): its own entries,
            manifest and build report; other sets of the store are never touched. Default:
            the set `spec.encoder` was registered to write (`featstore.contract.naming.
            default_feature_set`: the encoder registry records it), or "vggt" (the primary set,
            the store's original layout) without a spec or for an encoder not registered in
            this process. A new name adds the set to an existing store.
        mismatch_advice: what the mismatch error tells the caller to do (build: --force or
            another --store).
        batch_entries / batch_bytes: commit when either is reached. Larger batches commit less
            often (faster); a crash loses at most one open batch.
        map_size: initial LMDB map size; doubled whenever it fills.
        reset: drop all entries of the feature set first (e.g. the encoder spec changed); the
            store's other sets keep theirs.
        handle_signals: in the main thread, turn SIGTERM into BuildInterrupted so that
            ``with StoreWriter(...)`` commits what is done (SIGINT already raises
            KeyboardInterrupt).

    Attributes:
        feature_set: the name of the set this writer writes.
        value_offset: where this LMDB engine puts large values past a page boundary (16 for
            LMDB 0.9, 24 for 1.0); blobs are padded for it. Pass it to `encode_entry` when
            encoding in other threads/processes, or `put` re-pads (one extra copy per blob).
        committed / skipped: entries written / skipped as byte-identical by this writer.

    Example:
        >>> import torch
        >>> from featstore import FeatureStore, StoreWriter
        >>> from featstore.encoders import resolve_spec
        >>> with StoreWriter("written.lmdb", spec=resolve_spec("vggt-tiny")) as w:
        ...     w.put("a.jpg", {"features": torch.zeros(1, 48, 128, dtype=torch.bfloat16)}, {"frames": '["a.jpg"]'})
        ...     w.finish(report={"failed": []})
        >>> with FeatureStore("written.lmdb") as store:
        ...     len(store), store.manifest["encoder"]["storage_dtype"]
        (1, 'bfloat16')
    """

    def __init__(self, path: str | os.PathLike, *, spec=None, feature_set: str | None = None,
                 batch_entries: int = 64, batch_bytes: int = 256 << 20, map_size: int | None = None,
                 reset: bool = False, handle_signals: bool = True, mismatch_advice: str = REBUILD_ADVICE):
        self.path = os.fspath(path)
        if spec is not None and not isinstance(spec, EncoderSpec):
            spec = EncoderSpec.from_dict(spec)
        self.feature_set = check_feature_set(feature_set) if feature_set is not None else default_feature_set(spec)
        self._manifest_key = manifest_key(self.feature_set)
        self._where = feature_set_label(self.path, self.feature_set)
        if not isinstance(batch_entries, int) or batch_entries < 1:
            raise ValueError(f"batch_entries must be a positive int. Found {batch_entries!r}")
        if not isinstance(batch_bytes, int) or batch_bytes < 1:
            raise ValueError(f"batch_bytes must be a positive int. Found {batch_bytes!r}")
        if map_size is not None and (not isinstance(map_size, int) or map_size < 1):
            raise ValueError(f"map_size must be a positive int (bytes) or None. Found {map_size!r}")
        self.batch_entries = batch_entries
        self.batch_bytes = batch_bytes
        prepare_store_dir(self.path)  # never a file, nor a folder of other things (featstore.store.lock)
        existing = os.path.join(self.path, "data.mdb")
        size = map_size or max(DEFAULT_MAP_SIZE, os.path.getsize(existing) if os.path.exists(existing) else 0)
        self.env = open_env(self.path, readonly=False, lock=True, map_size=size, max_readers=2048)
        # Where this environment's engine puts large values: blobs are padded for it so that
        # tensor data lands 64-byte aligned in the map (pass it to encode_entry when encoding
        # elsewhere, or `put` re-pads, which costs one copy of the blob).
        self.value_offset = lmdb_value_offset(self.env)
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_bytes = 0
        self.committed = 0  # entries written by this writer
        self.skipped = 0  # puts skipped because an identical entry was already committed
        try:
            self.manifest = self._write(lambda txn: self._load_or_create_manifest(txn, spec, reset, mismatch_advice))
        except BaseException:
            # e.g. a fingerprint mismatch: do not leave the environment open, or the next
            # open of this store in this process fails with "already open".
            self.env.close()
            raise
        # The set's storage codec: an fp8 set quantises features put as tensors (blobs come
        # already encoded); a plain set stores them as they are.
        self._codec = codec_of(self.manifest)
        self._old_sigterm = None
        # SIGTERM handling: raised as BuildInterrupted, except while a commit runs on the main
        # thread (then it is raised right after the commit) or while closing (then ignored:
        # close is already committing what is done).
        self._committing_main = False
        self._deferred_signal: int | None = None
        self._closing = False
        if handle_signals and threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    # -- setup -------------------------------------------------------------------------------
    def _write(self, body, extra_bytes: int = 0):
        """`body(txn)` in one write transaction, committed; its result. Retried from the start
        when the map is full (grown by doubling, plus `extra_bytes`: what the body will add) or
        another process grew it; a full disk becomes StoreFullError. Every write of this writer
        goes through here: reopening a store whose file fills its map (a store larger than
        DEFAULT_MAP_SIZE opens with a map of its file's size), dropping a set (--force, whose
        freed pages the same transaction cannot reuse) and committing a batch all need room."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return body(txn)
            except lmdb.MapFullError:
                # No transaction is open here (the failed one was aborted): safe to grow the map.
                self.env.set_mapsize(self.env.info()["map_size"] * 2 + 2 * extra_bytes)
            except lmdb.MapResizedError:
                # Another process (a rank writing the same store) grew the map: adopt its size.
                self.env.set_mapsize(0)
            except (lmdb.Error, OSError) as e:
                if _is_disk_full(e, self.path):
                    entries = getattr(self, "manifest", {}).get("entries", 0)
                    raise StoreFullError(
                        f"{self._where}: the disk is full; {entries} entries committed "
                        f"before are kept. Free space (or move the store) and rerun to resume."
                    ) from e
                raise

    def _load_or_create_manifest(self, txn, spec, reset: bool, advice: str) -> dict:
        # The sub-databases and the first manifest are created in ONE transaction: a kill at any
        # instant leaves either an empty environment (treated as new) or a complete store.
        # A new feature set is added the same way to a store that holds others (their
        # sub-databases and meta keys are not touched).
        fresh_env = is_uninitialised(self.env, txn)
        others = list_feature_sets(self.env, txn)
        self._meta = self.env.open_db(META_DB, txn=txn)
        raw = txn.get(self._manifest_key, db=self._meta)
        if raw is None:
            if not fresh_env and not others:
                raise ManifestError(
                    f"{self.path}: this LMDB environment holds data but no featstore manifest; "
                    "it is not a featstore store. Choose another --store path."
                )
            if len(others) >= MAX_FEATURE_SETS:
                raise ManifestError(
                    f"{self.path}: the store already holds {len(others)} feature sets, the most one store "
                    f"may hold ({MAX_FEATURE_SETS}: each is an LMDB sub-database, and LMDB fixes their number "
                    f"when a process opens the store); write {self.feature_set!r} into another store")
            self._features = self.env.open_db(features_db(self.feature_set), txn=txn)
            manifest = new_manifest(spec)
        else:
            self._features = self.env.open_db(features_db(self.feature_set), txn=txn)
            manifest = read_manifest(self.env, txn, path=self.path, feature_set=self.feature_set)
            if spec is not None and not reset:
                check_fingerprint(manifest, spec, path=self._where, advice=advice)
            if reset:
                txn.drop(self._features, delete=False)
                manifest.update(entries=0, bytes=0)
            if spec is not None:
                manifest.update(encoder=spec.to_dict(), fingerprint=spec.fingerprint(),
                                format_version=format_version_for(spec))
                manifest.pop("storage_dtype", None)  # kept once: inside the spec
            manifest["build"] = {"state": "in_progress", "updated": utc_now()}
        txn.put(self._manifest_key, json.dumps(manifest, sort_keys=True).encode(), db=self._meta)
        return manifest

    def _on_sigterm(self, signum, frame):
        if self._closing:
            return
        if self._committing_main:
            self._deferred_signal = signum
            return
        raise BuildInterrupted(f"signal {signum}: committing what is done")

    # -- writing -----------------------------------------------------------------------------
    def put(self, key, tensors: Mapping[str, torch.Tensor] | bytes, metadata: Mapping[str, str] | None = None) -> None:
        """Queue one entry; commit the batch when it is full.

        Args:
            key: the unit's key (normalised; InvalidKeyError before anything is queued).
            tensors: name -> tensor, or a blob already made by `encode_entry` (then `metadata`
                must be None). A blob is checked (header, offsets; not the checksum) so that a
                malformed one is refused here rather than served later, and re-padded if it
                was encoded for another `value_offset`.
            metadata: string metadata (frames, sources, grid, ...) when passing tensors.

        `features` passed as a tensor without the other tensors of the set's codec are encoded
        here (`codec.encode`): an fp8 store's (storage dtype float8_e4m3fn) are quantised, with
        their ``features_scale``.
        """
        kb = key_to_bytes(key)
        if isinstance(tensors, (bytes, bytearray, memoryview)):
            if metadata is not None:
                raise ValueError(f"put({key!r}): metadata must be None when passing an encoded blob "
                                 "(it is inside the blob)")
            decode_entry(tensors, key=kb.decode())
            blob = align_blob(tensors, self.value_offset)
        else:
            codec = self._codec
            if (len(codec.tensors) > 1 and tensors.get(FEATURES) is not None
                    and not all(name in tensors for name in codec.tensors)):
                tensors = {**tensors, **codec.encode(tensors[FEATURES])}
            blob = encode_entry(tensors, metadata, value_offset=self.value_offset)
        self._pending.append((kb, blob))
        self._pending_bytes += len(blob)
        if len(self._pending) >= self.batch_entries or self._pending_bytes >= self.batch_bytes:
            self.commit()

    def commit(self) -> int:
        """Commit the open batch (with the manifest) in one transaction; return entries written."""
        if not self._pending:
            return 0
        batch = sorted(dict(self._pending).items())  # last put of a key wins; LMDB likes key order
        main = threading.current_thread() is threading.main_thread()
        self._committing_main = main
        try:
            written, skipped, self.manifest = self._write(lambda txn: self._commit_once(txn, batch),
                                                          extra_bytes=self._pending_bytes)
            self.skipped += skipped
            self._pending.clear()
            self._pending_bytes = 0
            self.committed += written
        finally:
            if main:
                self._committing_main = False
        if self._deferred_signal is not None and not self._closing:
            signum, self._deferred_signal = self._deferred_signal, None
            raise BuildInterrupted(f"signal {signum}: committing what is done")
        return written

    def _commit_once(self, txn, batch: list[tuple[bytes, bytes]]) -> tuple[int, int, dict]:
        """Put `batch` and the updated manifest in `txn`: (written, skipped as identical, manifest)."""
        written = skipped = 0
        # Read the manifest and the last key inside the transaction: other processes
        # (ranks of a multi-GPU build) may have committed since our last batch.
        manifest = read_manifest(self.env, txn, path=self.path, feature_set=self.feature_set)
        cur = txn.cursor(db=self._features)
        last_key = bytes(cur.key()) if cur.last() else None
        append = last_key is None or batch[0][0] > last_key
        for kb, blob in batch:
            if not append:
                old = txn.get(kb, db=self._features)
                if old is not None:
                    if bytes(old) == blob:
                        skipped += 1
                        continue
                    manifest["bytes"] -= len(old)
            txn.put(kb, blob, db=self._features, append=append)
            manifest["bytes"] += len(blob)
            written += 1
        manifest["entries"] = txn.stat(self._features)["entries"]
        manifest["build"] = dict(manifest.get("build", {}), updated=utc_now())
        txn.put(self._manifest_key, json.dumps(manifest, sort_keys=True).encode(), db=self._meta)
        return written, skipped, manifest

    def delete(self, keys) -> int:
        """Delete entries (commits the open batch first); return how many existed."""
        self.commit()
        keys = list(keys)

        def body(txn):
            removed = 0
            manifest = read_manifest(self.env, txn, path=self.path, feature_set=self.feature_set)
            for key in keys:
                kb = key_to_bytes(key)
                old = txn.get(kb, db=self._features)
                if old is not None:
                    manifest["bytes"] -= len(old)
                    txn.delete(kb, db=self._features)
                    removed += 1
            manifest["entries"] = txn.stat(self._features)["entries"]
            txn.put(self._manifest_key, json.dumps(manifest, sort_keys=True).encode(), db=self._meta)
            return removed, manifest

        removed, self.manifest = self._write(body)
        return removed

    def finish(self, report: dict | None = None, *, complete: bool = True, plan: dict | None = None,
               replace_plan: bool = False) -> None:
        """Commit, record the build report, and mark the build complete (or still in progress).

        `plan`: the build's plan record (`featstore.build.plan_record.record_of`), merged into the
        set's recorded plan (the manifest's "plan", `featstore.store.layout.merge_plan`), or
        replacing it with `replace_plan`."""
        self.commit()

        def body(txn):
            manifest = read_manifest(self.env, txn, path=self.path, feature_set=self.feature_set)
            manifest["build"] = {"state": "complete" if complete else "in_progress", "updated": utc_now()}
            if plan is not None:
                manifest[PLAN_FIELD] = plan if replace_plan else merge_plan(manifest.get(PLAN_FIELD), plan)
            txn.put(self._manifest_key, json.dumps(manifest, sort_keys=True).encode(), db=self._meta)
            if report is not None:
                txn.put(last_build_key(self.feature_set), json.dumps(report, sort_keys=True).encode(), db=self._meta)
            return manifest

        self.manifest = self._write(body)
        self.env.sync(True)

    def close(self) -> None:
        """Commit the open batch and close. The build stays 'in_progress' unless `finish` ran."""
        if self.env is None:
            return
        self._closing = True
        try:
            self.commit()
            self.env.sync(True)
        finally:
            self.env.close()
            self.env = None
            self._closing = False
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception (Ctrl-C, SIGTERM, a failed unit) the open batch is still committed:
        # everything queued was complete, valid entries. A full disk cannot take it; just close.
        try:
            self.close()
        except StoreFullError:
            if exc is None:
                raise
            self.env = None


def _is_disk_full(e: BaseException, path: str) -> bool:
    """Whether a failed commit ran out of room. LMDB reports a short write on a full tmpfs as
    EIO and a file-size limit as EFBIG, so the free space is looked at too."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    text = str(e)
    if any(s in text for s in ("No space left", "ENOSPC", "File too large", "Disk quota exceeded")):
        return True
    if "Input/output error" in text:
        try:
            return shutil.disk_usage(path).free < (64 << 20)
        except OSError:
            return False
    return False
