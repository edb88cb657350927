"""Show a store: manifest, entries, bytes, and a summary of stored dtypes and shapes.

Examples:
  featstore info data/                    # finds data/vggt_features.lmdb
  featstore info data/vggt_features.lmdb --json
"""

from __future__ import annotations

import argparse
import collections
import json
import os

from featstore.errors import CorruptEntryError
from featstore.store import LAST_BUILD_KEY, META_DB

__all__ = ["store_info", "configure_parser", "run"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def store_info(path: str, *, max_scan: int = 10000) -> dict:
    """Summarise a store: manifest, counts, file size, last build report, and the
    dtype/shape of the first `max_scan` entries (headers only: one page per value)."""
    from featstore.format import decode_entry  # torch: imported when run, not for `--help`
    from featstore.reader import FeatureStore

    store = FeatureStore(path)
    try:
        manifest = store.manifest
        env = store._environment()
        shapes: collections.Counter = collections.Counter()
        corrupt: list[str] = []
        scanned = 0
        with env.begin(db=store._db, buffers=True) as txn:
            for key, value in txn.cursor():
                if scanned >= max_scan:
                    break
                try:
                    entry = decode_entry(value, key=bytes(key).decode())
                except CorruptEntryError as e:
                    # Summarise, don't stop: `featstore verify` is the tool that judges a store.
                    corrupt.append(str(e))
                    scanned += 1
                    continue
                for name, t in entry.tensors.items():
                    shapes[f"{name} {str(t.dtype).replace('torch.', '')} {list(t.shape)}"] += 1
                scanned += 1
        meta_db = env.open_db(META_DB, create=False)
        with env.begin(db=meta_db) as txn:
            raw = txn.get(LAST_BUILD_KEY)
        return {
            "path": store.path,
            "manifest": manifest,
            "entries": len(store),
            "file_bytes": os.path.getsize(os.path.join(store.path, "data.mdb")),
            "scanned": scanned,
            "shapes": dict(shapes.most_common()),
            "corrupt": corrupt,
            "last_build": json.loads(raw) if raw else None,
        }
    finally:
        store.close()


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", nargs="?", default=".", help="store directory, or a data root holding "
                   "vggt_features.lmdb (default: current directory)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--max-scan", type=int, default=10000, metavar="N",
                   help="read the headers of at most N entries for the shape summary (default 10000)")


def run(args: argparse.Namespace) -> int:
    info = store_info(args.store, max_scan=args.max_scan)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    m = info["manifest"]
    enc = m.get("encoder") or {}
    print(f"store        {info['path']}")
    print(f"format       featstore v{m['format_version']} (written by featstore {m.get('featstore_version')})")
    print(f"build        {m.get('build', {}).get('state')} (updated {m.get('build', {}).get('updated')})")
    print(f"entries      {info['entries']}")
    print(f"bytes        {human_bytes(m.get('bytes', 0))} in values, {human_bytes(info['file_bytes'])} on disk")
    print(f"encoder      {enc.get('encoder', '?')}  fingerprint {str(m.get('fingerprint'))[:16]}")
    print(f"storage      {m.get('storage_dtype')}")
    for key in ("layer", "attention", "frames_kept", "preprocess"):
        if key in enc:
            print(f"  {key:<12} {enc[key]}")
    scanned = info["scanned"]
    suffix = "" if scanned >= info["entries"] else f" (first {scanned} entries)"
    print(f"tensors{suffix}:")
    for shape, count in info["shapes"].items():
        print(f"  {count:>8} x {shape}")
    if info["corrupt"]:
        print(f"corrupt      {len(info['corrupt'])} scanned entries do not decode; run `featstore verify`:")
        for message in info["corrupt"][:5]:
            print(f"  {message}")
    report = info["last_build"]
    if report:
        failed = report.get("failed") or []
        print(f"last build   {report.get('computed', '?')} computed, {len(failed)} failed")
        for f in failed[:10]:
            print(f"  failed: {f.get('key')}: {f.get('error')}")
    return 0
