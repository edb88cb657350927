"""`verify_store`: the checks run over a whole store, feature set by feature set.

The structure checks (1) run once, on the file, before LMDB maps it; then each set chosen is
checked (2-6) against its own manifest, spec and plan, into its own `Report`, and the sets'
reports are added into the store's. A set that a build is writing is refused.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import random
import time
from typing import Mapping, Sequence

import lmdb

from featstore.contract.naming import DEFAULT_STORE_NAME, check_feature_set, feature_set_label
from featstore.errors import CorruptStoreError, FeatstoreError, StoreBusyError
from featstore.contract.naming import labelled
from featstore.ops.verify.coverage import check_plan, plan_unit_of
from featstore.ops.verify.entries import read_entries
from featstore.ops.verify.freshness import check_sources
from featstore.ops.verify.manifest import check_manifest
from featstore.ops.verify.recompute import recompute as recompute_units
from featstore.ops.verify.report import Report
from featstore.ops.verify.structure import check_size, check_structure
from featstore.ops.verify.weights import weights_per_set
from featstore.store.layout import require_directory, resolve_store_path

__all__ = ["verify_store", "DEFAULT_WORKERS"]

logger = logging.getLogger("featstore")

DEFAULT_WORKERS = min(16, 2 * (os.cpu_count() or 1))  # > cores: threads also wait on cold page faults


def verify_store(store: str | os.PathLike, *, feature_set: str | Sequence[str] | None = None,
                 data_root: str | os.PathLike | None = None,
                 annotations: Sequence[str] | None = None, deep: bool = False, recompute: int = 0,
                 seed: int | None = None, weights: str | Mapping[str | None, str] | None = None,
                 device: str = "cpu", workers: int | None = None, structure: bool = True,
                 progress: bool = False, log: bool = True, recorded_plan: bool = True) -> Report:
    """Check a store; see `featstore verify --help` (featstore.ops.verify.cli) for the checks.

    Args:
        store: the store directory, or a data root holding ``vggt_features.lmdb`` (then it is
            also the data root unless `data_root` is given).
        feature_set: the feature set(s) to check (a name or several); None: every set of the
            store, each against its own manifest, spec and plan.
        data_root: the images' folder; enables the source and plan checks. Default: none, or
            `store` when it is a data root.
        annotations: training's annotation files; the plan is one unit per sample. Default: the
            plan each set records (featstore.build.plan_record: the files its builds used), else one
            unit per image found under `data_root`. Given ones are checked for coverage; entries
            of the recorded plan are kept out of `unplanned` as well.
        recorded_plan: False ignores the recorded plan (gc --replace-plan).
        deep: also compare each source's sha256 with the one recorded at build time.
        recompute: re-encode this many random fresh units and compare (needs a data root).
        seed: for choosing the recomputed units (default: random; the report notes it).
        weights: for the recompute encoders (`featstore.build.encode.encoder_for_manifest`): a path
            (for the one set verified, or the primary set when several are), or {set name:
            path} (the key None: as a plain path). Sets without weights rebuild their encoder
            without (fine for random-weight encoders).
        device: for the recompute encoders.
        workers: reader threads (default min(16, 2 x CPUs)).
        structure: run LMDB's full structural audit first (py-lmdb >= 3.0; reads every page
            header once). With False only the file size is checked.
        progress: show the progress of the long passes (reading the entries; with `deep`, hashing
            the sources; `recompute`) on stderr, with an ETA: a bar on a terminal, else a line
            every 30 s (featstore.progress).
        log: report the outcome in one line through `logging.getLogger("featstore")` (INFO when
            clean, WARNING otherwise). The CLI passes False: it prints the whole summary itself.

    Returns:
        A `Report` over the sets checked (``report.feature_sets``: one per set);
        ``report.exit_code`` is 0 when clean, else 1.

    Raises:
        FeatstoreError: verification cannot run (no store, not LMDB, unreadable manifest,
            a feature set the store lacks, bad arguments); the message names the path and the fix.

    Example:
        >>> from featstore.ops.verify import verify_store
        >>> report = verify_store("data/", deep=True)         # data/vggt_features.lmdb, fresh build
        >>> report.ok, report.counts(), report.entries
        (True, {}, 10)
    """
    from featstore.store.reader import FeatureStore

    t0 = time.perf_counter()
    given = os.fspath(store)
    path = resolve_store_path(given)
    if data_root is None:
        data_root = _default_data_root(given, path)
    data_root = os.fspath(data_root) if data_root is not None else None
    if recompute < 0:
        raise FeatstoreError(f"--recompute must be >= 0. Found {recompute}")
    if data_root is None and (annotations or recompute or deep):
        raise FeatstoreError("--annotations, --deep and --recompute need the data root: pass --data-root DIR "
                             f"(the folder whose images {path} was built from)")
    if data_root is not None:
        require_directory(data_root, "--data-root", "pass the folder whose images the store was built from")
    if annotations:
        from featstore.build.plan import annotation_sources

        annotation_sources(annotations, data_root)  # every FILE[@IMAGE_DIR][%N] checked before any work
    workers = workers or DEFAULT_WORKERS
    _refuse_live_build(path, feature_set)
    report = Report(path=path, data_root=data_root, workers=workers)

    if not check_structure(path, report, full=structure) or not check_size(path, report):
        report.notes.append("entries not read: mapping a damaged data.mdb can crash the reading process")
        report.seconds = time.perf_counter() - t0
        return report
    probe = FeatureStore(path)
    try:
        try:
            present = probe.feature_sets()
            if not present:
                probe.manifest  # raises what the store lacks (no manifest, not a featstore database)
        except lmdb.Error as e:
            raise CorruptStoreError(f"{path}: LMDB cannot read it ({e}); restore or rebuild the store") from None
        chosen = _chosen_sets(feature_set, present, path)
        per_set_weights = weights_per_set(weights, chosen)
        if recompute and seed is None:
            seed = random.SystemRandom().randrange(1 << 31)  # one seed for every set, noted in each
        for name in chosen:
            sub = Report(path=path, data_root=data_root, feature_set=name, workers=workers)
            fs = FeatureStore(path, feature_set=name)
            try:
                _verify_set(fs, sub, data_root=data_root, annotations=annotations, deep=deep, recompute=recompute,
                            seed=seed, weights=per_set_weights.get(name), device=device, workers=workers,
                            progress=progress, recorded_plan=recorded_plan)
            finally:
                fs.close()
            report.add_set(sub, labelled=labelled(present))
    finally:
        probe.close()
    report.seconds = time.perf_counter() - t0
    found = ", ".join(f"{n} {kind}" for kind, n in sorted(report.counts().items()))
    if log:
        logger.log(logging.INFO if report.ok else logging.WARNING,
                   f"featstore verify: {path}: {'ok' if report.ok else 'problems found (' + found + ')'}, "
                   f"{report.seconds:.1f} s")
    return report


def _verify_set(fs, report: Report, *, data_root, annotations, deep: bool, recompute: int, seed, weights,
                device: str, workers: int, progress: bool, recorded_plan: bool = True) -> None:
    """Checks 2-6 of one feature set (the one `fs`, a FeatureStore, reads), into its own `report`."""
    t0 = time.perf_counter()
    try:
        manifest = fs.manifest
    except lmdb.Error as e:
        raise CorruptStoreError(f"{fs.path}: LMDB cannot read it ({e}); restore or rebuild the store") from None
    report.manifest = manifest
    check_manifest(fs, manifest, report)
    records = read_entries(fs, manifest, workers, progress, report)
    with cf.ThreadPoolExecutor(workers) as pool:
        fresh = set(records)
        if data_root is not None:
            report.checks.append("sources (size, mtime" + (", sha256)" if deep else ")"))
            fresh = check_sources(list(records.values()), data_root, deep, pool, report, progress=progress)
            unit = plan_unit_of(manifest, fs.feature_set)
            if unit is None:
                report.notes.append(f"plan: not checked: encoder {(manifest.get('encoder') or {}).get('encoder')!r} "
                                    "is not registered in this featstore, so its unit kind is unknown")
            else:
                report.checks.append("plan coverage")
                check_plan(records, set(report.keys_with("corrupt")) | set(records), data_root, annotations,
                           report, unit_kind=unit, manifest=manifest if recorded_plan else None)
        else:
            report.notes.append("no data root: coverage, orphans and staleness not checked "
                                "(pass --data-root)")
    if recompute:
        report.checks.append(f"recompute {recompute}")
        if seed is None:
            seed = random.SystemRandom().randrange(1 << 31)
        bad = set(report.keys_with("corrupt", "dtype", "shape", "fingerprint", "frames"))
        candidates = [k for k in fresh if k not in bad and records[k].frames]
        recompute_units(fs, candidates, records, data_root, recompute, seed, weights, device, report,
                        progress=progress)
    report.seconds = time.perf_counter() - t0


def _default_data_root(given: str, resolved: str) -> str | None:
    """The data root implied by STORE: a folder holding vggt_features.lmdb is one."""
    if os.path.realpath(given) != os.path.realpath(resolved) and os.path.basename(resolved) == DEFAULT_STORE_NAME:
        return given
    return None


def _refuse_live_build(path: str, feature_set) -> None:
    """Raise StoreBusyError when a build is writing a set about to be verified (the named ones,
    else any): its entries, counts and build state are changing, and an incomplete state then
    means "still running", not "killed" (the build lock tells the two apart, `live_build`)."""
    from featstore.store.lock import describe_build, live_build, sets_with_lock_files

    if feature_set is None:
        names = sets_with_lock_files(path)
    else:
        names = [feature_set] if isinstance(feature_set, str) else list(feature_set)
    for name in names:
        holder = live_build(path, check_feature_set(name))
        if holder is not None:
            raise StoreBusyError(f"{feature_set_label(path, name)} is being written by a build "
                                 f"({describe_build(holder)}): verify when it finishes")


def _chosen_sets(feature_set, present: list[str], path: str) -> list[str]:
    """The sets to verify: all of the store's, or those named (each must exist)."""
    from featstore.errors import FeatureSetNotFoundError

    if feature_set is None:
        return list(present)
    names = [feature_set] if isinstance(feature_set, str) else list(feature_set)
    for name in names:
        check_feature_set(name)
        if name not in present:
            raise FeatureSetNotFoundError(f"{path}: the store has no feature set {name!r}; it has "
                                          f"{', '.join(map(repr, present))}: pass one of those to --feature-set")
    return sorted(set(names))
