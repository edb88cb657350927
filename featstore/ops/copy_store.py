"""Copy a finished store, compacted, to another path (e.g. local NVMe for training).

The copy is written by LMDB itself (`env.copy(compact=True)`: a consistent snapshot from one
read transaction, free pages dropped, pages renumbered), first into a hidden temporary folder
beside DST and renamed to DST only once it is complete and opens with the same manifest and
entry count, so an interrupted copy never leaves a DST that looks like a store. Every feature
set of the store is copied (LMDB copies the whole environment), and each set's manifest and
entry count are checked in the copy.

It refuses to overwrite: DST must not exist, or be an empty folder. Network file systems are
fine as a source; training should read the copy on local disk (docs/OPERATIONS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import threading
import time

from featstore.arguments import add_output_arguments, add_store_arguments, leading_store, shows_progress
from featstore.contract.naming import feature_set_label
from featstore.errors import FeatstoreError, StoreFullError
from featstore.contract.naming import labelled

__all__ = ["copy_store", "configure_parser", "run", "EXAMPLES"]


def copy_store(src, dst, *, allow_incomplete: bool = False, verify: bool = False, progress: bool = False) -> dict:
    """Write a compacted copy of store `src` at `dst` and check that it opens.

    Args:
        src: the store, or a data root holding ``vggt_features.lmdb``.
        dst: the new store directory; must not exist (or be an empty folder).
        allow_incomplete: copy a store one of whose sets' build is in progress (a consistent
            snapshot of what is committed; the copy says "in_progress" too).
        verify: run `featstore verify` (checksums of every entry) on the copy.
        progress: show the copy's progress (bytes written of the expected size) and the
            verification's on stderr, with an ETA (featstore.progress).

    Returns:
        dict with src, dst, entries (over all sets), feature_sets ({set: entries}), src_bytes /
        dst_bytes (data.mdb sizes), seconds and, with `verify`, the copy's verify report.

    Raises:
        FeatstoreError: DST exists and is not empty, SRC is not a store or its build is in
            progress, the disk is too small (StoreFullError), or the copy does not match.

    Example:
        >>> from featstore.ops.copy_store import copy_store
        >>> copy_store("data/", "local_copy.lmdb")["entries"]  # e.g. /nvme/vggt_features.lmdb
        10
    """
    import lmdb

    from featstore.store.reader import FeatureStore
    from featstore.store.layout import resolve_store_path

    t0 = time.perf_counter()
    src = resolve_store_path(src)
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and not (os.path.isdir(dst) and not os.listdir(dst)):
        raise FeatstoreError(f"{dst} already exists and is not an empty folder; copy refuses to overwrite. "
                             "Remove it first or choose another destination")
    if os.path.realpath(dst).startswith(os.path.realpath(src) + os.sep):
        raise FeatstoreError(f"{dst} is inside the source store {src}; choose a destination outside it")
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise FeatstoreError(f"{parent} (the folder of {dst}) does not exist; create it first")
    stores = _open_sets(src)
    try:
        manifests = {name: s.manifest for name, s in stores.items()}
        for name, manifest in manifests.items():
            state = (manifest.get("build") or {}).get("state")
            if state != "complete" and not allow_incomplete:
                raise FeatstoreError(f"{feature_set_label(src, name)}: its build is {state!r}; finish it (rerun "
                                     "`featstore build`) before copying, or pass --allow-incomplete to copy what is "
                                     "committed")
        counts = {name: len(s) for name, s in stores.items()}
        entries = sum(counts.values())
        src_bytes = os.path.getsize(os.path.join(src, "data.mdb"))
        # A compacted copy holds the values plus B-tree pages: ~ the manifests' bytes rounded up
        # to pages, never more than the source file.
        value_bytes = sum(m.get("bytes", 0) for m in manifests.values())
        need = min(src_bytes, int(value_bytes * 1.05) + (1 << 20))
        free = shutil.disk_usage(parent).free
        if need > free:
            raise StoreFullError(f"{dst}: the copy needs about {need / 1e9:.2f} GB but {parent} has "
                                 f"{free / 1e9:.2f} GB free; free space or copy elsewhere")
        tmp = os.path.join(parent, f".{os.path.basename(dst)}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            try:
                with _watch_size(os.path.join(tmp, "data.mdb"), need, progress):
                    next(iter(stores.values())).copy_to(tmp, compact=True)  # one LMDB file: every set's
            except lmdb.Error as e:
                if "No space" in str(e) or "ENOSPC" in str(e) or "Input/output" in str(e):
                    raise StoreFullError(f"{dst}: copy failed, the disk of {parent} is full or failing ({e}); "
                                         "nothing was written to the destination") from None
                raise FeatstoreError(f"{dst}: LMDB could not copy {src} ({e}); nothing was written to "
                                     "the destination. Run `featstore verify` on the source") from None
            _check_copy(tmp, manifests, counts)
            if os.path.isdir(dst):
                os.rmdir(dst)  # the empty folder the caller made
            os.rename(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        for s in stores.values():
            s.close()
    result = {"src": src, "dst": dst, "entries": entries, "feature_sets": counts, "src_bytes": src_bytes,
              "dst_bytes": os.path.getsize(os.path.join(dst, "data.mdb")),
              "seconds": round(time.perf_counter() - t0, 3)}
    if verify:
        from featstore.ops.verify import verify_store

        report = verify_store(dst, progress=progress)
        result["verify"] = report.to_dict()
        if not report.ok and set(report.counts()) - {"build"}:
            raise FeatstoreError(f"{dst}: the copy does not verify ({report.counts()}); it was left in place "
                                 "for inspection (delete it, run `featstore verify` on the source and copy again; "
                                 "if the source is clean, check the destination's disk):\n" + report.summary())
    return result


@contextlib.contextmanager
def _watch_size(path: str, expected: int, enabled: bool, poll_s: float = 0.5):
    """Progress of a file that LMDB writes in one call (`env.copy`): its size against `expected`,
    polled from a thread while the body runs."""
    from featstore.progress import Progress

    if not enabled:
        yield
        return
    done = threading.Event()
    with Progress(expected, desc="featstore copy", unit="B") as bar:
        def poll() -> None:
            while not done.wait(poll_s):
                try:
                    size = min(os.path.getsize(path), expected)
                except OSError:
                    continue
                if size > bar.n:
                    bar.update(size - bar.n)

        watcher = threading.Thread(target=poll, name="featstore-copy-progress", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()


def _open_sets(path: str) -> dict:
    """{set: FeatureStore} for every feature set of the store at `path` (one shared environment)."""
    from featstore.store.reader import FeatureStore, feature_set_names

    return {name: FeatureStore(path, feature_set=name) for name in feature_set_names(path)}


def _check_copy(path: str, manifests: dict[str, dict], counts: dict[str, int]) -> None:
    """The copy opens and holds the same sets, each with the same manifest and entry count."""
    stores = _open_sets(path)
    try:
        got = {name: s.manifest for name, s in stores.items()}
        n = {name: len(s) for name, s in stores.items()}
    finally:
        for s in stores.values():
            s.close()
    if got != manifests or n != counts:
        differ = sorted(name for name in set(got) | set(manifests)
                        if got.get(name) != manifests.get(name) or n.get(name) != counts.get(name))
        raise FeatstoreError(f"{path}: the copy does not match its source (feature sets {', '.join(differ)}: entries "
                             f"{ {k: n.get(k) for k in differ} } vs { {k: counts.get(k) for k in differ} }, manifests "
                             f"equal: {all(got.get(k) == manifests.get(k) for k in differ)}); the destination was "
                             "not created. Run `featstore verify` on the source, then copy again")


EXAMPLES = """\
Examples:
  # the bundled sample data, after `featstore build --data-root sample_data --encoder vggt-tiny`
  featstore copy sample_data /tmp/vggt_features.lmdb          # SRC may be the data root
  featstore copy --data-root sample_data /tmp/checked.lmdb --verify --json
  # your data
  featstore copy /nfs/data/ /nvme/vggt_features.lmdb
  python -m training.train --data_root /nfs/data --annotations /nfs/data/train.json \\
      --use_vggt_cache --vggt_cache_path /nvme/vggt_features.lmdb --output_dir /ckpt/run
"""


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_store_arguments(p, "copy DATA_ROOT/vggt_features.lmdb (the store build made there) instead of SRC",
                        paths=("paths", "[SRC] DST", "SRC: the store, or a data root holding vggt_features.lmdb "
                               "(leave it out with --data-root); DST: the new store directory (must not exist, or "
                               "be empty)"))
    p.add_argument("--allow-incomplete", action="store_true",
                   help="copy even while the build is in progress (a snapshot of what is committed; the copy "
                   "says in_progress too). Default: refused, finish the build first")
    p.add_argument("--verify", action="store_true", help="verify every entry's checksum in the copy (reads it "
                   "once more; default off: the copy is checked for its manifests and entry counts only)")
    add_output_arguments(p, "print one JSON object (paths, entries per feature set, sizes, seconds, the verify "
                         "report) on stdout instead of the summary line")


def run(args: argparse.Namespace) -> int:
    src, rest = leading_store(args.paths, args.data_root)
    if src is None or len(rest) != 1:
        raise FeatstoreError(f"copy takes SRC DST, or --data-root DATA_ROOT DST. Found {args.paths} "
                             f"with --data-root {args.data_root}")
    result = copy_store(src, rest[0], allow_incomplete=args.allow_incomplete, verify=args.verify,
                        progress=shows_progress(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        sets = result["feature_sets"]
        per_set = f" ({', '.join(f'{k} {v}' for k, v in sets.items())})" if labelled(sets) else ""
        print(f"featstore copy: {result['entries']} entries{per_set} {result['src']} -> {result['dst']} "
              f"({result['src_bytes'] / 1e6:.1f} MB -> {result['dst_bytes'] / 1e6:.1f} MB compacted, "
              f"{result['seconds']:.1f} s)" + (", verified" if args.verify else ""))
    return 0
