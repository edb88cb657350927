"""Show a store: each feature set's manifest, entries, bytes, dtypes and shapes; or its keys.

Every feature set of the store is shown (name, encoder, fingerprint, entries, bytes, build
state, what its keys are, the last build's counts and failures); `--json` lists them under
"feature_sets". It reads only the manifest and entry headers: quick on any store; `featstore
verify` checks it. `--keys` lists the keys instead, one per line in key order (a build with
--annotations keys multi-frame samples by their "id", single images by their path), streamed
from a cursor: any store size, `--limit N` for the first N.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import sys
from typing import Iterator

from featstore.arguments import add_output_arguments, add_store_arguments, store_path_arg
from featstore.errors import CorruptEntryError, FeatstoreError, FeatureSetNotFoundError
from featstore.format.keys import key_kind
from featstore.contract.naming import labelled
from featstore.contract.naming import PRIMARY_FEATURE_SET
from featstore.store.layout import resolve_store_path, storage_dtype_of

__all__ = ["store_info", "iter_keys", "configure_parser", "run", "EXAMPLES"]


_KIND_SAMPLE = 64  # the first keys that say what a set's keys are (`featstore.format.keys.key_kind`)
_SHOWN_KEYS = 3  # of them, shown in the summary


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def store_info(path: str, *, max_scan: int = 10000) -> dict:
    """Summarise a store: per feature set, its manifest, counts, last build report, and the
    dtype/shape of its first `max_scan` entries (headers only: one page per value).

    Returns:
        ``feature_sets``: one dict per set, in name order (name, encoder, fingerprint, entries,
        bytes, state, manifest, scanned, shapes, corrupt, last_build); ``path`` and
        ``file_bytes`` of the store; and, as before feature sets existed, the fields of the
        primary set ("vggt"; else the first set) at the top level.
    """
    from featstore.store.reader import FeatureStore, feature_set_names  # torch: imported when run, not for `--help`

    sets = []
    for name in feature_set_names(path):
        store = FeatureStore(path, feature_set=name)
        try:
            sets.append(_set_info(store, max_scan))
        finally:
            store.close()
    main = next((s for s in sets if s["name"] == PRIMARY_FEATURE_SET), sets[0])
    store_path = resolve_store_path(path)
    return {
        "path": store_path,
        "manifest": main["manifest"],
        "entries": main["entries"],
        "file_bytes": os.path.getsize(os.path.join(store_path, "data.mdb")),
        "scanned": main["scanned"],
        "shapes": main["shapes"],
        "corrupt": main["corrupt"],
        "last_build": main["last_build"],
        "feature_sets": sets,
    }


def iter_keys(path: str, *, feature_set: str | None = None, limit: int | None = None) -> Iterator[str]:
    """The keys of one feature set of a store in key order, streamed (one read transaction per
    1024 keys, never the whole list in memory).

    Args:
        path: the store, or a data root holding ``vggt_features.lmdb``.
        feature_set: the set (default: "vggt", else the store's only set).
        limit: at most this many keys (None: all).

    Example:
        >>> from featstore.ops.info import iter_keys
        >>> list(iter_keys("data/", limit=2))
        ['misc/portrait.png', 'misc/rgba.png']
    """
    from featstore.store.reader import FeatureStore

    store = FeatureStore(path, feature_set=_keys_set(path, feature_set))
    try:
        yield from itertools.islice(store.keys(), limit)
    finally:
        store.close()


def _keys_set(path: str, feature_set: str | None) -> str:
    """The set `--keys` lists: the one named, else the primary set, else the store's only one."""
    from featstore.store.reader import feature_set_names

    if feature_set is not None:
        return feature_set
    names = feature_set_names(path)
    if PRIMARY_FEATURE_SET in names:
        return PRIMARY_FEATURE_SET
    if len(names) == 1:
        return names[0]
    raise FeatureSetNotFoundError(f"{path}: the store has no feature set {PRIMARY_FEATURE_SET!r} and several others "
                                  f"({', '.join(map(repr, names))}): pass --feature-set NAME with --keys")


def _set_info(store, max_scan: int) -> dict:
    from featstore.format.blob import decode_entry

    with store.snapshot():  # the manifest, the counts and the scan from one state of the store
        manifest = store.manifest
        shapes: collections.Counter = collections.Counter()
        corrupt: list[str] = []
        scanned = 0
        # Values are views of the snapshot's transaction; only their headers are parsed.
        for key, value in itertools.islice(store.raw_values(), max_scan):
            scanned += 1
            try:
                entry = decode_entry(value, key=key.decode())
            except CorruptEntryError as e:
                # Summarise, don't stop: `featstore verify` is the tool that judges a store.
                corrupt.append(str(e))
                continue
            for name, t in entry.tensors.items():
                shapes[f"{name} {str(t.dtype).replace('torch.', '')} {list(t.shape)}"] += 1
        first_keys = [k.decode("utf-8", "replace") for k in store.raw_keys(limit=_KIND_SAMPLE)]
        last_build = store.last_build()
        entries = len(store)
    return {
        "name": store.feature_set,
        "encoder": (manifest.get("encoder") or {}).get("encoder"),
        "fingerprint": manifest.get("fingerprint"),
        "entries": entries,
        "bytes": manifest.get("bytes", 0),
        "state": (manifest.get("build") or {}).get("state"),
        "manifest": manifest,
        "scanned": scanned,
        "shapes": dict(shapes.most_common()),
        "corrupt": corrupt,
        "last_build": last_build,
        "key_kind": key_kind(first_keys) if first_keys else None,
        "first_keys": first_keys[:_SHOWN_KEYS],
    }


EXAMPLES = """\
Examples:
  # the bundled sample data, after `featstore build --data-root sample_data --encoder vggt-tiny`
  featstore info sample_data                      # finds sample_data/vggt_features.lmdb
  featstore info sample_data/vggt_features.lmdb --json
  featstore info --data-root sample_data --max-scan 100
  featstore info sample_data --keys --limit 3      # the first 3 keys, one per line
  featstore info sample_data --keys --json         # {"keys": [...], ...}
  # your data
  featstore info /nvme/vggt_features.lmdb
"""


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_store_arguments(p, "the images' folder: the store is DATA_ROOT/vggt_features.lmdb (instead of STORE)")
    add_output_arguments(p, "print one JSON object (every manifest field, the last build reports) on stdout instead "
                         "of the text summary; for scripts", progress=False)
    p.add_argument("--keys", action="store_true", help="list the keys of one feature set instead of the summary, "
                   "one per line in key order (streamed: any store size); with --json, one object {\"keys\": [...]}")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="with --keys: the first N keys only "
                   "(default: all)")
    p.add_argument("--feature-set", metavar="NAME", help="with --keys: the feature set whose keys are listed "
                   "(default: 'vggt', or the store's only set)")
    p.add_argument("--max-scan", type=int, default=10000, metavar="N",
                   help="read the headers of at most N entries for the shape summary (default 10000); lower it "
                   "for a quicker look at a huge store on slow storage")


def run(args: argparse.Namespace) -> int:
    path = store_path_arg(args.store, args.data_root)
    if args.limit is not None and args.limit < 0:
        raise FeatstoreError(f"--limit must be >= 0. Found {args.limit}")
    if (args.limit is not None or args.feature_set is not None) and not args.keys:
        raise FeatstoreError("--limit and --feature-set select what --keys lists: add --keys")
    if args.keys:
        return _print_keys(path, args.feature_set, args.limit, as_json=args.json)
    info = store_info(path, max_scan=args.max_scan)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"store        {info['path']}")
    sets = info["feature_sets"]
    named = labelled(s["name"] for s in sets)
    for one in sets:
        _print_set(one, info["file_bytes"], named)
    if named:
        print(f"file         {human_bytes(info['file_bytes'])} on disk, {len(sets)} feature set(s): "
              + ", ".join(f"{s['name']} ({s['entries']} entries, {s['state']})" for s in sets))
    return 0


def _print_keys(path: str, feature_set: str | None, limit: int | None, *, as_json: bool) -> int:
    """Write the keys to stdout as they are read: one per line, or one JSON object whose "keys"
    array is written key by key (valid JSON, never built in memory)."""
    keys = iter_keys(path, feature_set=feature_set, limit=limit)
    out = sys.stdout
    if not as_json:
        for key in keys:
            out.write(key + "\n")
        return 0
    name = _keys_set(path, feature_set)
    out.write(f'{{"path": {json.dumps(resolve_store_path(path))}, "feature_set": {json.dumps(name)}, "keys": [')
    count = 0
    for key in keys:
        out.write((", " if count else "") + json.dumps(key))
        count += 1
    out.write(f'], "listed": {count}, "limit": {json.dumps(limit)}}}\n')
    return 0


def _print_set(info: dict, file_bytes: int, labelled: bool) -> None:
    m = info["manifest"]
    enc = m.get("encoder") or {}
    if labelled:
        print(f"feature set  {info['name']}")
    print(f"format       featstore v{m['format_version']} (written by featstore {m.get('featstore_version')})")
    print(f"build        {m.get('build', {}).get('state')} (updated {m.get('build', {}).get('updated')})")
    print(f"entries      {info['entries']}")
    on_disk = "" if labelled else f", {human_bytes(file_bytes)} on disk"
    print(f"bytes        {human_bytes(m.get('bytes', 0))} in values{on_disk}")
    print(f"encoder      {enc.get('encoder', '?')}  fingerprint {str(m.get('fingerprint'))[:16]}")
    print(f"storage      {storage_dtype_of(m)}")
    for key in ("layer", "attention", "frames_kept", "reference_frame", "preprocess"):  # reference_frame: when "last"
        if key in enc:
            print(f"  {key:<12} {enc[key]}")
    from featstore.build.plan_record import describe_plan, plan_of_manifest

    record = plan_of_manifest(m)
    print(f"plan         {describe_plan(record)}" + ("" if record is not None else
          " (built before featstore recorded plans: rerun the same `featstore build` to record it)"))
    if info["first_keys"]:
        print(f"keys         {info['key_kind']}; first {', '.join(map(repr, info['first_keys']))}"
              + (", ..." if info["entries"] > len(info["first_keys"]) else "") + " (--keys lists them)")
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
