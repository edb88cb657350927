"""Merge shard stores (one per host, `featstore build --shard I/N`) into one store.

Every shard's manifest must name the same encoder spec (the fields that differ are named);
a key present in two shards with different bytes is a conflict and stops the merge before
anything of that key is written. Identical duplicates are kept once.

Example:
  featstore merge data/vggt_features.lmdb /nfs/shard-0.lmdb /nfs/shard-1.lmdb
"""

from __future__ import annotations

import argparse
import sys

from featstore.errors import FeatstoreError
from featstore.store import check_fingerprint, resolve_store_path, utc_now

__all__ = ["MergeConflictError", "merge_stores", "configure_parser", "run"]


class MergeConflictError(FeatstoreError):
    """Two shards hold different values for one key."""


def merge_stores(out: str, shards: list[str], *, progress: bool = True) -> dict:
    """Copy every entry of `shards` into the store `out` (created if absent). Returns a report."""
    from tqdm import tqdm

    from featstore.reader import FeatureStore  # torch: imported when run, not for `--help`
    from featstore.writer import StoreWriter

    if not shards:
        raise FeatstoreError("merge needs at least one shard")
    stores = [FeatureStore(resolve_store_path(s)) for s in shards]
    try:
        first = stores[0].manifest
        for s in stores[1:]:
            check_fingerprint(s.manifest, first["encoder"], path=s.path)
        incomplete = [s.path for s in stores if s.manifest.get("build", {}).get("state") != "complete"]
        if incomplete:
            raise FeatstoreError(f"shards whose build did not complete: {incomplete}; rerun their builds first")
        # Conflicts are found before writing anything: key -> (checksum, shard) over all shards.
        seen: dict[str, tuple[str, str]] = {}
        for s in stores:
            for key, value in s.raw_items():
                checksum = _checksum_of(value, key)
                prior = seen.get(key)
                if prior is not None and prior[0] != checksum:
                    raise MergeConflictError(
                        f"key {key!r} differs between shards {prior[1]} and {s.path}; the shards were built "
                        "from different sources or plans. Rebuild one of them.")
                seen[key] = (checksum, s.path)
        reports = []
        total = sum(s.manifest["entries"] for s in stores)
        with StoreWriter(out, encoder=first["encoder"], fingerprint=first["fingerprint"],
                         storage_dtype=first.get("storage_dtype")) as writer:
            with tqdm(total=total, unit="entry", disable=not progress) as bar:
                for s in stores:
                    for key, value in s.raw_items():
                        writer.put(key, value)
                        bar.update(1)
                    reports.append({"shard": s.path, "entries": s.manifest["entries"]})
            report = {"merged": reports, "entries_written": writer.committed + len(writer._pending),
                      "finished": utc_now(), "failed": []}
            writer.finish(report)
        return report
    finally:
        for s in stores:
            s.close()


def _checksum_of(value: bytes, key: str) -> str:
    from featstore.format import decode_entry

    return decode_entry(value, key=key, verify=True).metadata["checksum"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the merged store (created; existing entries are kept)")
    p.add_argument("shards", nargs="+", help="shard stores to merge")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    report = merge_stores(args.out, args.shards, progress=not args.no_progress)
    print(f"featstore merge: {len(report['merged'])} shards -> {args.out}", file=sys.stderr)
    return 0
