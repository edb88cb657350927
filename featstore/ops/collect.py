"""Remove entries that can never be served correctly: orphan, stale, corrupt.

`featstore gc` runs the same checks as `featstore verify` (no recompute), then deletes:
  orphan   a source frame is gone from the data root
  stale    a source frame changed since the entry was computed (size/mtime; sha256 with --deep)
  corrupt  the value does not decode, fails its checksum, or holds NaN or infinite features
           (`featstore build` skips a present
           entry without reading its tensor bytes, so it would never recompute this one)
and, with --unplanned, entries that neither the plan the set records (the annotation files its
builds used, featstore.build.plan_record) nor --annotations asks for. Before deleting, it says on
stderr what it removes and how many bytes.

Each feature set of the store is collected on its own (its findings, its plan: one unit per
image for an image encoder's set); `--feature-set NAME` restricts gc to some sets.

LMDB reuses freed pages but never shrinks data.mdb: `featstore copy` writes a compacted copy.
Run gc while no build writes the store (it refuses an in-progress store unless --force).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from featstore.arguments import (add_annotations_argument, add_feature_set_filter, add_output_arguments, add_store_arguments,
                           shows_progress, store_path_arg)
from featstore.errors import FeatstoreError
from featstore.contract.naming import labelled, set_note
from featstore.ops.verify import Report, plan_unit_of, verify_store

__all__ = ["GcResult", "collect_garbage", "configure_parser", "run", "EXAMPLES"]

_REMOVABLE = ("orphan", "stale", "corrupt")


@dataclass
class GcResult:
    """What gc found and did: per feature set, the keys by reason (`feature_sets`), and the
    entries removed and value bytes freed (`removed_by_set`, `bytes_freed_by_set`); `keys`,
    `removed` and `bytes_freed` are over all sets."""

    path: str
    feature_sets: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    removed: int = 0
    bytes_freed: int = 0
    dry_run: bool = False
    report: Report | None = None
    removed_by_set: dict[str, int] = field(default_factory=dict)
    bytes_freed_by_set: dict[str, int] = field(default_factory=dict)

    @property
    def keys(self) -> dict[str, list[str]]:
        """Reason -> sorted keys, over every set (a key found in two sets is listed once)."""
        merged: dict[str, set[str]] = {}
        for by_reason in self.feature_sets.values():
            for reason, keys in by_reason.items():
                merged.setdefault(reason, set()).update(keys)
        return {reason: sorted(keys) for reason, keys in merged.items()}

    def to_dict(self) -> dict:
        return {"path": self.path, "dry_run": self.dry_run, "removed": self.removed,
                "bytes_freed": self.bytes_freed, "keys": self.keys,
                "feature_sets": {name: {"keys": keys, "removed": self.removed_by_set.get(name, 0),
                                        "bytes_freed": self.bytes_freed_by_set.get(name, 0)}
                                 for name, keys in self.feature_sets.items()},
                "remaining_problems": self.report.counts() if self.report else {}}


def collect_garbage(store, *, feature_set=None, data_root=None, annotations=None, deep: bool = False,
                    unplanned: bool = False, replace_plan: bool = False, dry_run: bool = False,
                    force: bool = False, workers: int | None = None, progress: bool = False,
                    announce=None) -> GcResult:
    """Find and (unless `dry_run`) delete orphan, stale and corrupt entries of a store, set by set.

    Args:
        store: the store, or a data root holding ``vggt_features.lmdb`` (then also the data root).
        feature_set: the feature set(s) to collect (a name or several); None: every set.
        data_root / annotations / deep / workers: as for `featstore.ops.verify.verify_store`.
        unplanned: also delete entries that neither the set's recorded plan (featstore.build.plan_record)
            nor the given `annotations` ask for. Refused where that cannot be told (a recorded
            annotation file gone; multi-frame entries of a store that records no plan, without
            `annotations`).
        replace_plan: with `annotations`: the given plan replaces the recorded one (written to
            the manifest), and --unplanned removes what the given plan does not ask for.
        dry_run: only report what would be deleted.
        announce: called with one line per set before its entries are deleted (what and how
            many bytes), e.g. `print`; the CLI prints it on stderr.
        force: run even when the store's build is in progress (the build may write again what
            gc deletes; harmless, but usually you want the build to finish first).
        progress: show the checks' progress on stderr, with an ETA (as `verify_store`'s).

    Returns:
        A `GcResult`.

    Raises:
        FeatstoreError: no data root (orphans and staleness need the images), the store is
            damaged (structure problems: restore or rebuild instead), or a build is in progress.

    Example:
        >>> from featstore.ops.collect import collect_garbage
        >>> collect_garbage("data/", dry_run=True).keys        # a fresh build: nothing to remove
        {'orphan': [], 'stale': [], 'corrupt': []}
    """
    if replace_plan and not annotations:
        raise FeatstoreError("--replace-plan needs --annotations: the files whose plan the store should record")
    report = verify_store(store, feature_set=feature_set, data_root=data_root, annotations=annotations, deep=deep,
                          workers=workers, progress=progress, recorded_plan=not replace_plan)
    result = GcResult(path=report.path, dry_run=dry_run, report=report)
    if unplanned and report.plan_gaps:
        raise FeatstoreError(f"{report.path}: gc --unplanned cannot tell which entries no plan needs: "
                             + "; ".join(report.plan_gaps) + ". Pass --annotations with every file training uses "
                             "(and --replace-plan to make that the recorded plan); nothing was removed")
    if report.data_root is None:
        raise FeatstoreError(f"{report.path}: gc needs the data root to tell orphans and stale entries: "
                             "pass --data-root DIR")
    if "structure" in report.counts():
        raise FeatstoreError(f"{report.path}: data.mdb is damaged (`featstore verify` lists how); gc cannot "
                             "repair it: restore a copy or rebuild")
    building = [name for name, sub in report.feature_sets.items() if sub.counts().get("build")]
    if building and not force:
        sets = f" (feature set {', '.join(building)})" if labelled(building) else ""
        raise FeatstoreError(f"{report.path}: its build is in progress (or was killed){sets}; let `featstore build` "
                             "finish first, or pass --force")
    reasons = _REMOVABLE + (("unplanned",) if unplanned else ())
    doomed: dict[str, list[str]] = {}
    for name, sub in report.feature_sets.items():
        keys = {r: sub.keys_with(r) for r in _REMOVABLE}
        if unplanned:
            keys["unplanned"] = list(sub.unplanned)
        result.feature_sets[name] = keys
        doomed[name] = sorted({k for r in reasons for k in keys[r]})
    if dry_run:
        return result
    from featstore.build.plan_record import record_of
    from featstore.store.writer import StoreWriter

    for name, keys in doomed.items():
        if replace_plan:
            _replace_plan(report, name, record_of(report.data_root, annotations, _unit_of_set(report, name)))
        if not keys:
            continue
        if announce is not None:
            reasons_here = ", ".join(f"{len(result.feature_sets[name][r])} {r}" for r in reasons
                                     if result.feature_sets[name][r])
            announce(f"featstore gc: removing {len(keys)} entries ({reasons_here}), "
                     f"{_value_bytes(report.path, name, keys) / 1e6:.1f} MB of values, from "
                     f"{report.path}{set_note(name)}")
        was_complete = (report.feature_sets[name].manifest or {}).get("build", {}).get("state") == "complete"
        # No encoder: the set's manifest spec stays; the store's other sets are not touched.
        writer = StoreWriter(report.path, feature_set=name, handle_signals=False)
        try:
            before = writer.manifest.get("bytes", 0)
            result.removed_by_set[name] = writer.delete(keys)
            result.bytes_freed_by_set[name] = before - writer.manifest.get("bytes", 0)
            # Opening a writer marks the build in progress; gc removes entries, it does not build.
            writer.finish(complete=was_complete)
        finally:
            writer.close()
    result.removed = sum(result.removed_by_set.values())
    result.bytes_freed = sum(result.bytes_freed_by_set.values())
    return result


def _unit_of_set(report: Report, name: str) -> str:
    return plan_unit_of(report.feature_sets[name].manifest or {}, name) or "sequence"


def _value_bytes(path: str, feature_set: str, keys: list[str]) -> int:
    """Sum of the stored value sizes of `keys` (what deleting them frees), from one read transaction."""
    from featstore.store.reader import FeatureStore

    with FeatureStore(path, feature_set=feature_set) as store:
        return sum(len(v) for _, v in store.raw_values(keys) if v is not None)


def _replace_plan(report: Report, name: str, record: dict) -> None:
    """Write `record` as set `name`'s recorded plan (gc --replace-plan)."""
    from featstore.store.writer import StoreWriter

    was_complete = (report.feature_sets[name].manifest or {}).get("build", {}).get("state") == "complete"
    writer = StoreWriter(report.path, feature_set=name, handle_signals=False)
    try:
        writer.finish(complete=was_complete, plan=record, replace_plan=True)
    finally:
        writer.close()


EXAMPLES = """\
Examples:
  # the bundled sample data, after `featstore build --data-root sample_data --encoder vggt-tiny`
  featstore gc sample_data --dry-run              # list what would go; change nothing
  featstore gc sample_data                        # remove orphan, stale and corrupt entries
  featstore gc sample_data --unplanned --dry-run  # entries no recorded plan asks for
  # your data
  featstore gc /nvme/vggt_features.lmdb --data-root data/ --annotations data/train.json --unplanned
"""


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_store_arguments(p, "the images' folder (needed unless STORE is the data root): orphans and stale entries "
                        "are found against it")
    add_feature_set_filter(p, "collect")
    add_annotations_argument(p, "training's annotation files: a plan for --unplanned, as for build, kept beside "
                             "the plan the store records. Default: the recorded plan (a store that records none: "
                             "a scan of the data root, one unit per image)", store_may_follow=True)
    p.add_argument("--deep", action="store_true", help="stale also when the content hash (sha256) changed, not "
                   "only size or mtime; reads every source image (default off)")
    p.add_argument("--unplanned", action="store_true", help="also remove entries that neither the plan the store "
                   "records (the annotation files it was built from) nor --annotations asks for (e.g. samples "
                   "dropped from the annotations); check with --dry-run first (default off)")
    p.add_argument("--replace-plan", action="store_true", help="with --annotations: record the given files as the "
                   "store's plan instead of the one its builds recorded, so that --unplanned removes what they do "
                   "not ask for (default off)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed; change nothing")
    p.add_argument("--force", action="store_true", help="run even while the store's build is in progress (or "
                   "after it was killed); usually let the build finish first (default off)")
    add_output_arguments(p, "print one JSON object (every key by reason, per feature set) on stdout instead of the "
                         "listing")


def run(args: argparse.Namespace) -> int:
    result = collect_garbage(store_path_arg(args.store, args.data_root), feature_set=args.feature_set,
                             data_root=args.data_root, annotations=args.annotations, deep=args.deep,
                             unplanned=args.unplanned, replace_plan=args.replace_plan, dry_run=args.dry_run,
                             force=args.force, progress=shows_progress(args),
                             announce=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    named = labelled(result.feature_sets)
    total = 0
    for name, by_reason in result.feature_sets.items():
        prefix = f"[{name}] " if named else ""
        for reason, keys in by_reason.items():
            total += len(keys)
            for k in keys[:50]:
                print(f"  {prefix}{reason:<9} {k}")
            if len(keys) > 50:
                print(f"  {prefix}{reason:<9} ... and {len(keys) - 50} more (--json lists all)")
    by_reason: dict[str, int] = {}
    for keys in result.feature_sets.values():
        for reason, ks in keys.items():
            by_reason[reason] = by_reason.get(reason, 0) + len(ks)
    counts = ", ".join(f"{n} {r}" for r, n in by_reason.items())
    verb = "would remove" if result.dry_run else "removed"
    if result.dry_run:
        print(f"featstore gc: {verb} {total} entries ({counts}) from {result.path}")
    else:
        print(f"featstore gc: {verb} {result.removed} entries ({counts}), {result.bytes_freed / 1e6:.1f} MB of "
              f"values from {result.path}. data.mdb keeps its size (LMDB reuses the pages); "
              "`featstore copy` writes a compacted copy.", file=sys.stdout)
    rest = {k: v for k, v in (result.report.counts() if result.report else {}).items() if k not in _REMOVABLE}
    if rest:
        print(f"featstore gc: other findings remain ({rest}); run `featstore verify` for details")
    return 0
