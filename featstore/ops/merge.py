"""Merge shard stores (one per host, `featstore build --shard I/N`) into one store.

Merged feature set by set (docs/FORMAT.md, "Feature sets"): the shards holding a set must name
the same encoder spec for it (the fields that differ are named). A key of one set in two shards
is kept once when both entries are one computation: the same bytes, or (`equivalent`) the same
metadata (frames, encoder, fingerprint, ...; source files by size and sha256) with features within
the recompute tolerance (`featstore.ops.compare`), as a GPU gives for a unit encoded in batches of
another size (a build resumed under another split of the plan, or rerun after the data grew);
the first shard's entry is kept. Anything else is a conflict and stops the merge before
anything is written. Merging into an existing store keeps the entries no shard holds, and a key
a shard holds takes the shard's entry (a shard rebuilt after its images changed replaces the
stale one), so a rerun, or adding a shard later, is safe.
"""

from __future__ import annotations

import argparse
import json
import sys

from featstore.arguments import add_output_arguments, add_store_arguments, leading_store, shows_progress
from featstore.contract.naming import PRIMARY_FEATURE_SET, feature_set_label
from featstore.errors import FeatstoreError, MergeConflictError
from featstore.contract.naming import set_note
from featstore.store.layout import check_fingerprint, resolve_store_path, utc_now

__all__ = ["merge_stores", "configure_parser", "run", "EXAMPLES"]


def merge_stores(out: str, shards: list[str], *, progress: bool = True) -> dict:
    """Copy every entry of `shards` into the store `out` (created if absent), feature set by set.
    `progress`: show the check and the write of each set on stderr, with an ETA (featstore.progress).

    Every feature set found in any shard is merged into the same set of `out`; the shards that
    hold a set must agree on its encoder spec, and a key of one set with different bytes in two
    shards is a conflict. Everything is checked before anything is written.

    Returns:
        the report: ``merged`` (each shard's path and entries), ``read`` (entries read from all
        shards), ``written`` (entries written into `out`), ``identical`` (entries skipped as
        byte-identical to one already there: a key in two shards, or a rerun), ``equivalent``
        (entries not written because an earlier shard holds the same computation in other bytes,
        see the module docstring), ``entries`` and ``bytes`` of `out` afterwards, all over every
        set; ``feature_sets`` holds the same per set (each also stored as that set's last build
        report in `out`).
    """
    from featstore.store.reader import FeatureStore, feature_set_names  # torch: imported when run, not for `--help`
    from featstore.store.writer import StoreWriter

    if not shards:
        raise FeatstoreError("merge needs at least one shard: pass the shard stores to merge")
    paths = [resolve_store_path(s) for s in shards]
    stores: dict[str, list] = {}  # set -> the FeatureStores of the shards that hold it, in shard order
    try:
        for path in paths:
            for name in feature_set_names(path):
                stores.setdefault(name, []).append(FeatureStore(path, feature_set=name))
        kept_earlier = {name: _check_set(name, stores[name], progress=progress) for name in sorted(stores)}
        per_set = {}
        for name in sorted(stores):
            per_set[name] = _merge_set(out, name, stores[name], progress, StoreWriter, kept_earlier[name])
    finally:
        for group in stores.values():
            for s in group:
                s.close()
    if list(per_set) == [PRIMARY_FEATURE_SET]:
        return dict(per_set[PRIMARY_FEATURE_SET], feature_sets=per_set)
    totals = {k: sum(r[k] for r in per_set.values())
              for k in ("read", "written", "identical", "equivalent", "entries", "bytes")}
    merged = [{"shard": p, "entries": sum(r["entries"] for rep in per_set.values() for r in rep["merged"]
                                          if r["shard"] == p)} for p in paths]
    return {"out": next(iter(per_set.values()))["out"], "merged": merged, **totals, "finished": utc_now(),
            "failed": [], "feature_sets": per_set}


def _check_set(name: str, group: list, *, progress: bool = False) -> dict[str, set[str]]:
    """One set across the shards that hold it: the same spec, complete builds, no conflicting key.
    Reads and checksums every entry (`progress`: shown on stderr). Returns, per shard path, the
    keys not to write from it: an earlier shard holds an equivalent entry (module docstring)."""
    from featstore.progress import Progress
    first = group[0].manifest
    for s in group[1:]:
        check_fingerprint(s.manifest, first["encoder"], path=feature_set_label(s.path, name),
                          advice=f"Merge only shards built with the same encoder flags: rebuild this shard with "
                                 f"those of {group[0].path} (expected above is its spec)")
    incomplete = [s.path for s in group if s.manifest.get("build", {}).get("state") != "complete"]
    if incomplete:
        raise FeatstoreError(f"shards whose build did not complete{set_note(name)}: {incomplete}; rerun their builds "
                             "first")
    # Conflicts are found before writing anything: key -> (checksum, shard index) over all shards.
    seen: dict[str, tuple[str, int]] = {}
    skip: dict[str, set[str]] = {s.path: set() for s in group}
    total = sum(s.manifest.get("entries", 0) for s in group)
    with Progress(total, desc=f"featstore merge: check {name}", unit="entry", enabled=progress) as bar:
        for i, s in enumerate(group):
            for key, value in s.raw_items():
                checksum = _checksum_of(value, key)
                prior = seen.get(key)
                if prior is None:
                    seen[key] = (checksum, i)
                elif prior[0] != checksum:
                    why = _not_equivalent(group[prior[1]].get(key, copy=True), s.get(key, copy=True), key, first)
                    if why is not None:
                        raise MergeConflictError(
                            f"key {key!r}{set_note(name, ' of feature set {!r}')} differs between shards "
                            f"{group[prior[1]].path} and {s.path} ({why}); the shards were built from different "
                            "sources or plans. Rebuild one of them.")
                    skip[s.path].add(key)  # the same computation: the earlier shard's entry is kept
                bar.update(1)
    return skip


# Metadata compared apart from the rest: the blob's own checksum (it differs with the bytes), and
# the source files, by size and content only (their mtime differs between two copies of the
# data, which hold the same images).
_NOT_COMPARED = ("checksum", "sources")


def _not_equivalent(a, b, key: str, manifest: dict) -> str | None:
    """None when the entries `a` and `b` of `key` (featstore Entries as `FeatureStore.get` gives
    them: an fp8 store's features dequantised) are one computation within rounding: the same
    metadata (frames, encoder, fingerprint, grid, ...; the source files by size and sha256), the
    same tensors' shapes, and features within the recompute tolerance of the set's storage and
    compute dtypes (`compare_features`, as verify --recompute compares); else what differs, in a
    few words."""
    from featstore.ops.compare import compare_features
    from featstore.store.layout import storage_dtype_of

    fields = sorted((set(a.metadata) | set(b.metadata)) - set(_NOT_COMPARED))
    differ = [f for f in fields if a.metadata.get(f) != b.metadata.get(f)]
    if _sources(a.metadata) != _sources(b.metadata):
        differ.append("sources")
    if differ:
        return f"their {', '.join(differ)} differ"
    shapes = {n: tuple(t.shape) for n, t in a.tensors.items()}
    if shapes != {n: tuple(t.shape) for n, t in b.tensors.items()}:
        return "their tensors differ in name or shape"
    c = compare_features(a.features, b.features, storage_dtype_of(manifest) or "bfloat16",
                         (manifest.get("encoder") or {}).get("compute_dtype"))
    if not c["ok"]:
        return f"features beyond rounding: max relative difference {c['rel_error']:.3g}, cosine {c['cosine']:.6f}"
    return None


def _sources(metadata: dict) -> list | None:
    """The entry's source files as (size, sha256), without the mtime (None when unreadable)."""
    from featstore.ops.verify.entries import json_list

    sources = json_list(metadata.get("sources"))
    return None if sources is None else [(s.get("size"), s.get("sha256")) if isinstance(s, dict) else s for s in sources]


def _merge_set(out: str, name: str, group: list, progress: bool, StoreWriter, kept_earlier: dict[str, set[str]]) -> dict:
    from featstore.build.plan_record import PLAN_FIELD, merge_plan
    from featstore.progress import Progress

    first = group[0].manifest
    reports = []
    total = sum(s.manifest["entries"] for s in group)
    with StoreWriter(out, spec=first.get("encoder") or None, feature_set=name) as writer:
        with Progress(total, desc=f"featstore merge: write {name}", unit="entry", enabled=progress) as bar:
            for s in group:
                skip = kept_earlier.get(s.path, set())
                for key, value in s.raw_items():
                    if key not in skip:
                        writer.put(key, value)
                    bar.update(1)
                reports.append({"shard": s.path, "entries": s.manifest["entries"]})
        writer.commit()
        read = sum(r["entries"] for r in reports)
        equivalent = sum(len(keys) for keys in kept_earlier.values())
        report = {"out": writer.path, "merged": reports, "read": read, "written": writer.committed,
                  "identical": read - equivalent - writer.committed, "equivalent": equivalent,
                  "finished": utc_now(), "failed": []}
        if name != PRIMARY_FEATURE_SET:
            report["feature_set"] = name
        plan = None  # the shards' recorded plans, united (one build split in shards records one plan)
        for s in group:
            if s.manifest.get(PLAN_FIELD) is not None:  # without the part: the merged store holds them all
                plan = merge_plan(plan, {k: v for k, v in s.manifest[PLAN_FIELD].items() if k != "shard"})
        writer.finish(report, plan=plan)
        report.update(entries=writer.manifest["entries"], bytes=writer.manifest["bytes"])
    return report


def _checksum_of(value: bytes, key: str) -> str:
    from featstore.format.blob import decode_entry

    return decode_entry(value, key=key, verify=True).metadata["checksum"]


EXAMPLES = """\
Examples:
  # the bundled sample data in two shards, as two hosts would build them, then merged
  featstore build --data-root sample_data --encoder vggt-tiny --shard 0/2
  featstore build --data-root sample_data --encoder vggt-tiny --shard 1/2
  featstore merge /tmp/merged.lmdb \\
      sample_data/vggt_features.shard-0-of-2.lmdb sample_data/vggt_features.shard-1-of-2.lmdb
  # your data
  featstore merge data/vggt_features.lmdb /nfs/shard-0.lmdb /nfs/shard-1.lmdb
  featstore merge --data-root data/ /nfs/shard-*.lmdb     # into data/vggt_features.lmdb
"""


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_store_arguments(p, "merge into DATA_ROOT/vggt_features.lmdb (the store build names there, where training "
                        "looks) instead of OUT",
                        paths=("stores", "[OUT] SHARD", "OUT: the merged store (created; entries no shard holds are kept; "
                               "leave it out with --data-root), then the shard stores to merge"))
    add_output_arguments(p, "print the report (entries per shard, written, identical skipped, per feature set) as one "
                         "JSON object on stdout instead of the summary on stderr")


def run(args: argparse.Namespace) -> int:
    out, shards = leading_store(args.stores, args.data_root)
    if not shards:
        raise FeatstoreError(f"merge takes OUT SHARD [SHARD ...], or --data-root DATA_ROOT SHARD [...]. "
                             f"Found {args.stores}")
    report = merge_stores(out, shards, progress=shows_progress(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    per_shard = " + ".join(str(r["entries"]) for r in report["merged"])
    equivalent = (f", {report['equivalent']} equivalent (in two shards, the same computation within rounding: "
                  "the first shard's kept)") if report["equivalent"] else ""
    print(f"featstore merge: {len(report['merged'])} shards ({per_shard} entries) -> {out}: {report['written']} "
          f"written, {report['identical']} identical skipped{equivalent}; {report['entries']} entries, "
          f"{report['bytes'] / 1e6:.1f} MB in the store", file=sys.stderr)
    return 0
