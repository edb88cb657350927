"""Check a store: structure, manifest, checksums, plan coverage, source freshness.

Optionally (--recompute N) also compares stored features with features recomputed on the encoder.

A store of several feature sets (docs/FORMAT.md, "Feature sets") is checked set by set, each
against its own manifest, spec and plan (an image encoder's plan is one unit per image);
`--feature-set NAME` restricts the check. Findings of a store with several sets name theirs.

Exit status: 0 clean, 1 problems found (each names its key and what to do), 2 cannot run (no
store, not an LMDB file, unreadable manifest, bad arguments).

Checks, in order (docs/OPERATIONS.md says what each finding means and what to do):
  1. structure   data.mdb is not truncated and passes LMDB's offline structural audit
                 (`lmdb.verify`, py-lmdb >= 3.0), *before* the file is mapped: a truncated
                 map is a SIGBUS, not an exception, once a page past the end is touched
  2. manifest    format version, fingerprint == spec, entry count and bytes == what is stored,
                 build state complete, no failed units in the last build
  3. entries     every value decodes and its CRC-32 (header and tensors) matches; dtype ==
                 storage dtype; shape [frames_kept, grid rows*cols, 2*embed_dim]; entry
                 fingerprint == manifest's
                 (read in parallel threads: zlib's CRC-32 releases the GIL, so this is bound
                 by disk and checksum speed)
  4. sources     with a data root: orphans (a frame file is gone), stale (size/mtime changed;
                 with --deep, content sha256 changed)
  5. plan        with a data root: every unit of the plan is present, with the planned frames
  6. recompute   --recompute N: N random fresh units re-encoded and compared with the stored
                 features (max abs error relative to the tensor's scale, cosine similarity)

The CRC-32 covers the canonical header (every metadata value: frames, sources, grid,
fingerprint) and the tensor bytes, so a flipped byte anywhere in a value is found. Not checked:
a byte of the header's space padding turned into another JSON whitespace character decodes to
the same entry, and is harmless.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import lmdb

from featstore.cli import STORE_HELP, add_annotations_argument, store_path_arg
from featstore.contract.dtypes import is_quantised
from featstore.errors import CorruptEntryError, CorruptStoreError, FeatstoreError, InvalidKeyError, StoreBusyError
from featstore.format.keys import normalize_key
from featstore.build.plan import source_path
from featstore.progress import NO_PROGRESS_HELP
from featstore.store.layout import (DEFAULT_STORE_NAME, META_DB, PRIMARY_FEATURE_SET, check_feature_set, feature_set_label,
                             last_build_key, require_directory, resolve_store_path, storage_dtype_of,
                             truncated_size)

__all__ = ["Finding", "Report", "verify_store", "plan_unit_of", "parse_weights", "PROBLEM_KINDS", "configure_parser",
           "run", "EXAMPLES"]

logger = logging.getLogger("featstore")

# kind -> what it means and what to do; the human summary prints the advice once per kind.
PROBLEM_KINDS: dict[str, str] = {
    "structure": "data.mdb is damaged (truncated, or pages overwritten): nothing in it can be trusted. "
                 "Restore a copy or rebuild (`featstore build --force`)",
    "manifest": "the manifest disagrees with the stored entries (counts, bytes or fingerprint): "
                "rebuild, or `featstore copy` a good replica",
    "build": "the last build did not complete (killed or interrupted): rerun the same "
             "`featstore build` command to resume",
    "failed": "a unit failed in the last build (unreadable image?): fix or remove the source, rerun build",
    "key": "a stored key is not a canonical relative path (NFC, '/', no '..'): the store was not "
           "written by featstore; rebuild",
    "corrupt": "the value does not decode, its checksum does not match (a flipped bit on disk), or its "
               "features hold NaN or infinity: `featstore gc` removes it, then `featstore build` recomputes it",
    "dtype": "the entry's dtype differs from the manifest's storage dtype: rebuild with --force",
    "shape": "the entry's shape does not match its frames, grid or the encoder's channels: rebuild with --force",
    "fingerprint": "the entry was computed by another encoder spec than the manifest's: rebuild with --force",
    "metadata": "the entry lacks the frames/sources metadata that freshness checks need: rebuild it",
    "orphan": "a source frame of the entry is gone from the data root: `featstore gc` removes it",
    "stale": "a source frame changed since the entry was computed: `featstore build` recomputes it "
             "(or `featstore gc` removes it)",
    "missing": "a unit of the plan has no entry: run `featstore build` (training would miss it)",
    "frames": "the entry was computed on another frame list than the plan asks for (training would "
              "miss it): `featstore build` with the same --annotations recomputes it",
    "recompute": "features recomputed on the encoder differ from the stored ones beyond the storage "
                 "dtype's tolerance: check weights/code version; rebuild with --force",
}

_DEFAULT_WORKERS = min(16, 2 * (os.cpu_count() or 1))  # > cores: threads also wait on cold page faults
_CHUNK_ENTRIES = 64  # keys per task: large enough to amortise a transaction, small enough to balance
_MAX_LISTED = 20  # findings per kind in the human summary (JSON lists all)


@dataclass
class Finding:
    """One problem: its kind (a key of PROBLEM_KINDS), the key it concerns, a message, and the
    feature set it concerns (None: the whole store, e.g. a damaged data.mdb)."""

    kind: str
    message: str
    key: str | None = None
    feature_set: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "key": self.key, "message": self.message, "feature_set": self.feature_set}


@dataclass
class Report:
    """What `verify_store` found. `exit_code` is 0 when `problems` is empty, else 1.

    The report of a store covers every feature set verified: `problems`, `entries`,
    `bytes_read`, `recomputed` and `unplanned` are over all of them, and `feature_sets` holds one
    Report per set (its `feature_set` names it). `manifest` is the primary set's when it was
    verified, else the first set's."""

    path: str
    data_root: str | None = None
    feature_set: str | None = None  # the set this report is about; None: the whole store
    manifest: dict | None = None
    checks: list[str] = field(default_factory=list)
    entries: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    workers: int = 0
    problems: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    recomputed: list[dict] = field(default_factory=list)
    unplanned: list[str] = field(default_factory=list)
    """Keys neither the recorded nor the given plan asks for (not a problem; `featstore gc
    --unplanned` removes them)."""
    plan_gaps: list[str] = field(default_factory=list)
    """Why `unplanned` may hold entries of a plan that cannot be planned now (a recorded
    annotation file gone; multi-frame entries under a scan of a store that records no plan):
    gc --unplanned refuses then."""
    seconds: float = 0.0
    feature_sets: dict[str, "Report"] = field(default_factory=dict)
    """Per feature set verified, its own report (the store's report only)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    @property
    def gb_per_s(self) -> float:
        """Entry-pass throughput: value bytes decoded and checksummed per second (1e9 bytes)."""
        return self.bytes_read / self.read_seconds / 1e9 if self.read_seconds > 0 else 0.0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.problems:
            out[f.kind] = out.get(f.kind, 0) + 1
        return out

    def keys_with(self, *kinds: str) -> list[str]:
        """Sorted distinct keys of the findings of `kinds` (e.g. what gc removes); per set:
        ``report.feature_sets[name].keys_with(...)``."""
        return sorted({f.key for f in self.problems if f.kind in kinds and f.key is not None})

    def add(self, kind: str, message: str, key: str | None = None) -> None:
        assert kind in PROBLEM_KINDS, kind
        self.problems.append(Finding(kind, message, key))

    def to_dict(self) -> dict:
        return {
            "path": self.path, "data_root": self.data_root, "ok": self.ok, "exit_code": self.exit_code,
            "checks": self.checks, "entries": self.entries, "bytes_read": self.bytes_read,
            "read_seconds": round(self.read_seconds, 4), "gb_per_s": round(self.gb_per_s, 3),
            "workers": self.workers, "seconds": round(self.seconds, 3), "counts": self.counts(),
            "problems": [f.to_dict() for f in self.problems], "notes": self.notes,
            "recomputed": self.recomputed, "unplanned": len(self.unplanned),
            "fingerprint": (self.manifest or {}).get("fingerprint"),
            "build_state": (self.manifest or {}).get("build", {}).get("state"),
            "feature_sets": {name: sub._set_summary() for name, sub in self.feature_sets.items()},
        }

    def _set_summary(self) -> dict:
        manifest = self.manifest or {}
        return {"feature_set": self.feature_set, "ok": self.ok, "encoder": (manifest.get("encoder") or {}).get("encoder"),
                "fingerprint": manifest.get("fingerprint"), "build_state": (manifest.get("build") or {}).get("state"),
                "entries": self.entries, "bytes_read": self.bytes_read, "counts": self.counts(),
                "unplanned": len(self.unplanned), "recomputed": len(self.recomputed)}

    def _merge(self, sub: "Report", *, labelled: bool) -> None:
        """Add the report of one feature set to this store's report. `labelled`: the store has
        several sets (or this one is not the primary): findings and notes then name the set."""
        name = sub.feature_set
        prefix = f"[{name}] " if labelled else ""
        for f in sub.problems:
            f.feature_set = name
            f.message = prefix + f.message
        sub.notes = [prefix + n for n in sub.notes]
        self.feature_sets[name] = sub
        self.checks += [c for c in sub.checks if c not in self.checks]
        self.problems += sub.problems
        self.notes += sub.notes
        self.entries += sub.entries
        self.bytes_read += sub.bytes_read
        self.read_seconds += sub.read_seconds
        self.recomputed += [dict(r, feature_set=name) for r in sub.recomputed]
        self.unplanned += sub.unplanned
        self.plan_gaps += sub.plan_gaps
        if self.manifest is None or name == PRIMARY_FEATURE_SET:
            self.manifest = sub.manifest

    def summary(self) -> str:
        """A readable multi-line summary: what was checked, then problems grouped by kind."""
        lines = [f"store      {self.path}",
                 f"checked    {', '.join(self.checks)}",
                 f"entries    {self.entries} ({self.bytes_read / 1e9:.3f} GB read in {self.read_seconds:.2f} s, "
                 f"{self.gb_per_s:.2f} GB/s, {self.workers} threads)"]
        if len(self.feature_sets) > 1 or set(self.feature_sets) - {PRIMARY_FEATURE_SET}:
            for name, sub in self.feature_sets.items():
                m = sub._set_summary()
                lines.append(f"set        {name}: {m['encoder']} fingerprint {str(m['fingerprint'])[:16]}, "
                             f"{m['entries']} entries, build {m['build_state']}, "
                             + ("ok" if sub.ok else ", ".join(f"{n} {k}" for k, n in m["counts"].items())))
        for r in self.recomputed:
            lines.append(f"recompute  {r['key']}: max abs err {r.get('max_abs_error', float('nan')):.3g} "
                         f"(rel {r.get('rel_error', float('nan')):.3g}), cosine {r.get('cosine', float('nan')):.6f} "
                         f"{'ok' if r.get('ok') else 'FAIL'}")
        for n in self.notes:
            lines.append(f"note       {n}")
        if self.ok:
            lines.append("result     OK: no problems found")
            return "\n".join(lines)
        counts = self.counts()
        lines.append("result     PROBLEMS: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
        for kind in counts:
            found = [f for f in self.problems if f.kind == kind]
            lines.append(f"[{kind}] {PROBLEM_KINDS[kind]}")
            for f in found[:_MAX_LISTED]:
                lines.append(f"  {f.message}")
            if len(found) > _MAX_LISTED:
                lines.append(f"  ... and {len(found) - _MAX_LISTED} more (--json lists all)")
        return "\n".join(lines)


# -- 1. structure ---------------------------------------------------------------------------

def _check_structure(path: str, report: Report, *, full: bool) -> bool:
    """Return True when data.mdb may be mapped. Reads the file with read(), never mmap."""
    data = os.path.join(path, "data.mdb")
    audit = None
    if full:
        try:
            from lmdb import verify as audit  # py-lmdb >= 3.0: a pure-Python byte walker
        except ImportError:
            report.notes.append("structure: py-lmdb < 3.0 has no lmdb.verify; only the file size was checked")
    if audit is not None:
        try:
            errors = audit.verify(path, subdir=True)
        except audit.VerifyError as e:
            raise CorruptStoreError(f"{data}: not a usable LMDB data file ({e}); restore or rebuild the store") from None
        except OSError as e:
            raise CorruptStoreError(f"{data}: cannot read it ({e.strerror}); check its permissions, or restore the "
                                    "store from a good copy") from None
        report.checks.append("structure")
        for err in errors[:_MAX_LISTED]:
            report.add("structure", f"{data}: {err}")
        if len(errors) > _MAX_LISTED:
            report.add("structure", f"{data}: ... and {len(errors) - _MAX_LISTED} more structural problems")
        return not errors
    report.checks.append("file size")
    return True


def _check_size(path: str, report: Report) -> bool:
    """A data.mdb shorter than its last page is a truncated copy: touching the missing pages
    through the map raises SIGBUS in this process, so refuse before LMDB maps the file."""
    data = os.path.join(path, "data.mdb")
    short = truncated_size(path)
    if short is not None:
        have, need = short
        report.add("structure", f"{data}: truncated: {have} bytes on disk, but its pages need {need} "
                                "(an interrupted copy?)")
        return False
    return True


# -- 3. entries -----------------------------------------------------------------------------

@dataclass
class _Record:
    """What the later checks need from one decoded entry (no tensor data is kept)."""

    key: str
    frames: list | None
    sources: list | None


def _check_chunk(env, db, keys: list[bytes], expect: dict) -> tuple[list[_Record], list[Finding], int]:
    """Decode and checksum the values of `keys` inside one read transaction (a worker thread)."""
    from featstore.format.blob import decode_entry

    records, findings, nbytes = [], [], 0
    with env.begin(db=db, buffers=True) as txn:
        for kb in keys:
            key = kb.decode("utf-8", "backslashreplace")
            value = txn.get(kb)
            if value is None:  # deleted since the key listing (a writer is running)
                continue
            nbytes += len(value)
            try:
                entry = decode_entry(value, key=key, verify=True)
                findings += _check_entry(key, entry, expect)
                meta = entry.metadata
                records.append(_Record(key, _json_list(meta.get("frames")), _json_list(meta.get("sources"))))
            except CorruptEntryError as e:
                findings.append(Finding("corrupt", str(e), key))
            del value  # a view into the map: never used after the transaction ends
    return records, findings, nbytes


def _json_list(text: str | None) -> list | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def _check_scale(key: str, scale, shape: list) -> list[Finding]:
    """An fp8 entry's per-token scale: float32 [F, N, 1], finite and positive (docs/FORMAT.md §4.1)."""
    import torch

    from featstore.format.fp8 import SCALE_TENSOR

    if scale is None:
        return [Finding("shape", f"entry {key!r}: fp8 features without their '{SCALE_TENSOR}' tensor", key)]
    if scale.dtype != torch.float32 or list(scale.shape) != shape[:-1] + [1]:
        return [Finding("shape", f"entry {key!r}: {SCALE_TENSOR} is {list(scale.shape)} "
                                 f"{str(scale.dtype).removeprefix('torch.')}, expected {shape[:-1] + [1]} float32", key)]
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        return [Finding("corrupt", f"entry {key!r}: {SCALE_TENSOR} holds values that are not finite and positive", key)]
    return []


def _check_entry(key: str, entry, expect: dict) -> list[Finding]:
    from featstore.format.fp8 import all_finite  # torch: imported once verify runs, not for --help

    out = []
    feats = entry.tensors.get("features")
    if feats is None:
        return [Finding("shape", f"entry {key!r}: no 'features' tensor (has {sorted(entry.tensors)})", key)]
    if not all_finite(feats):  # builds refuse them since; another writer, or an older build, did not
        out.append(Finding("corrupt", f"entry {key!r}: its features hold NaN or infinite values", key))
    dtype = str(feats.dtype).removeprefix("torch.")
    if expect["dtype"] and dtype != expect["dtype"]:
        out.append(Finding("dtype", f"entry {key!r}: features are {dtype}, the manifest says {expect['dtype']}", key))
    shape = list(feats.shape)
    if is_quantised(expect["dtype"]):
        out += _check_scale(key, entry.tensors.get("features_scale"), shape)
    meta = entry.metadata
    want = [None, None, expect["channels"]]
    frames = _json_list(meta.get("frames"))
    if frames is not None:
        want[0] = 1 if expect["frames_kept"] == "last" else len(frames)
    grid = _json_list(meta.get("grid"))
    if grid is not None and len(grid) == 2 and all(isinstance(g, int) for g in grid):
        want[1] = grid[0] * grid[1]
    if len(shape) != 3 or any(w is not None and w != s for w, s in zip(want, shape)):
        wanted = "[" + ", ".join("?" if w is None else str(w) for w in want) + "]"
        out.append(Finding("shape", f"entry {key!r}: features shape {shape}, expected {wanted} "
                                    f"([frames_kept, grid rows*cols, channels])", key))
    fp = meta.get("fingerprint")
    if expect["fingerprint"] and fp is not None and fp != expect["fingerprint"]:
        out.append(Finding("fingerprint", f"entry {key!r}: computed with encoder fingerprint {fp[:16]}, "
                                          f"the manifest says {expect['fingerprint'][:16]}", key))
    try:
        if normalize_key(key) != key:
            out.append(Finding("key", f"key {key!r} is not canonical (normalises to {normalize_key(key)!r})", key))
    except InvalidKeyError as e:
        out.append(Finding("key", f"key {key!r}: {e}", key))
    return out


def _list_keys(env, db) -> list[bytes]:
    # Keys only: iterating without values never touches the overflow pages of big values.
    with env.begin(db=db) as txn:
        return list(txn.cursor().iternext(keys=True, values=False))


def _chunks(items: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# -- 4./5. sources and plan -----------------------------------------------------------------

def _check_sources(records: list[_Record], data_root: str, deep: bool, pool, report: Report, *,
                   progress: bool = False) -> set[str]:
    """Orphans and stale entries; returns the keys whose sources are fresh. `progress`: show the
    hashing of the source files (--deep reads every one) on stderr."""
    from featstore.build.plan import file_sha256
    from featstore.progress import Progress

    wanted: dict[str, None] = {}
    for r in records:
        for f in r.frames or []:
            wanted.setdefault(f, None)

    def probe(frame: str):
        path = source_path(data_root, frame)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            return {"error": e.strerror}
        out = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if deep:
            try:
                out["sha256"] = file_sha256(path)
            except OSError as e:
                out["error"] = e.strerror
        return out

    with Progress(len(wanted), desc=_progress_desc(report, "sources"), unit="file", enabled=progress and deep) as bar:
        def probed(frame: str):
            try:
                return probe(frame)
            finally:
                bar.update(1)

        current = dict(zip(wanted, pool.map(probed, wanted)))
    fresh, touched = set(), 0
    for r in records:
        if r.frames is None or r.sources is None or len(r.sources) != len(r.frames):
            report.add("metadata", f"entry {r.key!r}: no usable 'frames'/'sources' metadata, so its "
                                   "sources cannot be checked", r.key)
            continue
        gone = [f for f in r.frames if current[f] is None]
        if gone:
            report.add("orphan", f"entry {r.key!r}: source {gone[0]!r} is gone from {data_root}"
                                 + (f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""), r.key)
            continue
        changed = []
        for frame, src in zip(r.frames, r.sources):
            now = current[frame]
            src = src if isinstance(src, dict) else {}
            if "error" in now:
                changed.append(f"{frame!r} unreadable ({now['error']})")
            elif src.get("size") != now["size"]:
                changed.append(f"{frame!r} size {src.get('size')} -> {now['size']}")
            elif deep and src.get("sha256") and src.get("sha256") != now["sha256"]:
                changed.append(f"{frame!r} content sha256 changed")
            elif src.get("mtime_ns") != now["mtime_ns"]:
                if deep and src.get("sha256") == now["sha256"]:
                    touched += 1  # same bytes, new mtime (a copy without -p): not stale
                else:
                    changed.append(f"{frame!r} mtime changed")
        if changed:
            report.add("stale", f"entry {r.key!r}: source {changed[0]}"
                                + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""), r.key)
        else:
            fresh.add(r.key)
    if touched:
        report.notes.append(f"{touched} source file(s) have a new mtime but the same content (--deep): "
                            "not stale, but `featstore build` will recompute them (it compares size/mtime)")
    return fresh


def plan_unit_of(manifest: dict, feature_set: str) -> str | None:
    """The unit kind a set was planned with: the registry's for its encoder (`unit_of`);
    "sequence" for a primary set whose encoder this featstore does not register (as before
    feature sets existed); None (unknown) for another set of an unregistered encoder."""
    from featstore.encoders import available_encoders, unit_of

    name = (manifest.get("encoder") or {}).get("encoder")
    if isinstance(name, str) and name in available_encoders():
        return unit_of(name)
    return "sequence" if feature_set == PRIMARY_FEATURE_SET else None


def _check_plan(records: dict[str, _Record], present: set[str], data_root: str, annotations,
                report: Report, unit_kind: str = "sequence", manifest: dict | None = None) -> None:
    """Coverage against the plan: the given --annotations, else the plan the set records
    (featstore.build.plan_record), else (a store that records none) a scan of the data root. Entries
    outside both the given and the recorded plan are `unplanned`."""
    from featstore.build.plan import plan_units
    from featstore.build.plan_record import (NO_RECORD_NOTE, describe_plan, plan_notes, plan_of_manifest,
                                       recorded_sources)

    record = plan_of_manifest(manifest or {})
    given = list(annotations or [])
    recorded_units = None
    if record is not None:
        sources, gone = recorded_sources(record, data_root)
        report.notes += gone + plan_notes(record, data_root, given)
        report.plan_gaps += gone
        recorded_units = plan_units(data_root, sources, unit=unit_kind) if sources else []
        if record.get("scan"):
            recorded_units += plan_units(data_root, None, unit=unit_kind)
    if given:
        units, how = plan_units(data_root, given, unit=unit_kind), "annotations"
    elif recorded_units is not None:
        units, how = recorded_units, f"the recorded plan ({describe_plan(record)})"
    else:
        units, how = plan_units(data_root, None, unit=unit_kind), "a scan of the data root"
        report.notes.append(NO_RECORD_NOTE)
    planned = set()
    for unit in units:
        if unit.key in planned:
            continue
        planned.add(unit.key)
        rec = records.get(unit.key)
        if rec is None and unit.key in present:
            continue  # stored but undecodable: already reported as corrupt
        if rec is None:
            report.add("missing", f"unit {unit.key!r} ({len(unit.frames)} frame(s)) has no entry", unit.key)
        elif rec.frames is not None and rec.frames != list(unit.frames):
            report.add("frames", f"entry {unit.key!r}: stored for frames {rec.frames}, the plan asks "
                                 f"for {list(unit.frames)}", unit.key)
    keep = planned | {u.key for u in recorded_units or []}
    extra = sorted(k for k in records if k not in keep)
    report.unplanned = extra
    if record is None and not given:
        # A scan plans single frames only: a multi-frame entry comes from annotations nobody named.
        multi = [k for k in extra if records[k].frames is not None and len(records[k].frames) > 1]
        if multi:
            report.plan_gaps.append(f"{len(multi)} unplanned entries hold several frames (e.g. {multi[0]!r}): they "
                                    "were built from annotations, which this store does not record")
    per = ", one per image" if unit_kind == "image" and (given or record) else ""
    report.notes.append(f"plan: {len(planned)} units from {how}{per}")
    if extra:
        report.notes.append(f"{len(extra)} entries are in no recorded or given plan (e.g. {extra[0]!r}); harmless: "
                            "`featstore gc --unplanned --dry-run` lists what gc would remove")


# -- 6. recompute ---------------------------------------------------------------------------

def _recompute(store, keys: list[str], records: dict[str, _Record], data_root: str, n: int, seed: int,
               weights: str | None, device: str, report: Report, *, progress: bool = False) -> None:
    from featstore.build.encode import encoder_for_manifest
    from featstore.progress import Progress

    manifest = store.manifest
    spec = manifest.get("encoder") or {}
    chosen = random.Random(seed).sample(sorted(keys), min(n, len(keys)))
    report.notes.append(f"recompute: {len(chosen)} of {len(keys)} fresh entries (seed {seed}) on {device}")
    if not chosen:
        return
    try:
        encoder = encoder_for_manifest(manifest, weights=weights, device=device)
    except FeatstoreError as e:
        if store.feature_set == PRIMARY_FEATURE_SET:
            raise
        # Name the set and how to give it weights: several sets may each need their own.
        raise type(e)(f"feature set {store.feature_set!r}: {e} (pass --weights {store.feature_set}=PATH)") from None
    with Progress(len(chosen), desc=_progress_desc(report, "recompute"), unit="unit", enabled=progress) as bar:
        for key in chosen:
            _recompute_one(store, key, records, data_root, encoder, manifest, spec, report)
            bar.update(1)


def _recompute_one(store, key: str, records: dict[str, _Record], data_root: str, encoder, manifest: dict,
                   spec: dict, report: Report) -> None:
    from featstore.ops.compare import compare_features
    from featstore.build.encode import encode_unit
    from featstore.build.plan import Unit

    unit = Unit(key, tuple(records[key].frames))
    stored = store.get(key, copy=True).features
    try:
        feats, _ = encode_unit(encoder, data_root, unit)
    except FeatstoreError as e:
        report.add("recompute", f"entry {key!r}: cannot recompute ({e})", key)
        return
    result = dict(key=key, **compare_features(stored, feats, storage_dtype_of(manifest) or "bfloat16",
                                              spec.get("compute_dtype")))
    report.recomputed.append(result)
    if not result["ok"]:
        detail = result.get("error") or (
            f"max abs error {result['max_abs_error']:.4g} = {result['rel_error']:.3g} of max |x| "
            f"(tolerance {result['rel_tolerance']:g}), cosine {result['cosine']:.6f} "
            f"(tolerance {result['cosine_tolerance']})")
        report.add("recompute", f"entry {key!r}: {detail}", key)


# -- the whole run --------------------------------------------------------------------------

def _default_data_root(given: str, resolved: str) -> str | None:
    """The data root implied by STORE: a folder holding vggt_features.lmdb is one."""
    if os.path.realpath(given) != os.path.realpath(resolved) and os.path.basename(resolved) == DEFAULT_STORE_NAME:
        return given
    return None


def verify_store(store: str | os.PathLike, *, feature_set: str | Sequence[str] | None = None,
                 data_root: str | os.PathLike | None = None,
                 annotations: Sequence[str] | None = None, deep: bool = False, recompute: int = 0,
                 seed: int | None = None, weights: str | Mapping[str | None, str] | None = None,
                 device: str = "cpu", workers: int | None = None, structure: bool = True,
                 progress: bool = False, log: bool = True, recorded_plan: bool = True) -> Report:
    """Check a store; see the module docstring for the checks.

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
    workers = workers or _DEFAULT_WORKERS
    _refuse_live_build(path, feature_set)
    report = Report(path=path, data_root=data_root, workers=workers)

    if not _check_structure(path, report, full=structure) or not _check_size(path, report):
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
        per_set_weights = _weights_per_set(weights, chosen)
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
            report._merge(sub, labelled=len(present) > 1 or name != PRIMARY_FEATURE_SET)
    finally:
        probe.close()
    report.seconds = time.perf_counter() - t0
    found = ", ".join(f"{n} {kind}" for kind, n in sorted(report.counts().items()))
    if log:
        logger.log(logging.INFO if report.ok else logging.WARNING,
                   f"featstore verify: {path}: {'ok' if report.ok else 'problems found (' + found + ')'}, "
                   f"{report.seconds:.1f} s")
    return report


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


def _weights_per_set(weights, chosen: list[str]) -> dict[str, str]:
    """{set: weights} from `verify_store`'s `weights` argument (see there)."""
    if weights is None:
        return {}
    given = {None: weights} if isinstance(weights, (str, os.PathLike)) else dict(weights)
    out: dict[str, str] = {}
    for name, path in given.items():
        if name is None:
            name = chosen[0] if len(chosen) == 1 else PRIMARY_FEATURE_SET
        elif name not in chosen:
            raise FeatstoreError(f"--weights {name}=...: feature set {name!r} is not being verified (verified: "
                                 f"{', '.join(chosen)}); check the name, or select it with --feature-set")
        if name in out and out[name] != os.fspath(path):
            raise FeatstoreError(f"--weights: two weights given for feature set {name!r} ({out[name]} and {path}); "
                                 "give each set's weights once")
        out[name] = os.fspath(path)
    return out


def _progress_desc(report: Report, phase: str) -> str:
    """The progress lines' prefix: "featstore verify: entries", with the set of a multi-set store."""
    where = f" [{report.feature_set}]" if report.feature_set not in (None, PRIMARY_FEATURE_SET) else ""
    return f"featstore verify{where}: {phase}"


def _verify_set(fs, report: Report, *, data_root, annotations, deep: bool, recompute: int, seed, weights,
                device: str, workers: int, progress: bool, recorded_plan: bool = True) -> None:
    """Checks 2-6 of one feature set (the store's `fs.feature_set`), into its own `report`."""
    path = fs.path
    t0 = time.perf_counter()
    try:
        manifest = fs.manifest
        env, db = fs._environment(), fs._db
    except lmdb.Error as e:
        raise CorruptStoreError(f"{path}: LMDB cannot read it ({e}); restore or rebuild the store") from None
    report.manifest = manifest
    _check_manifest(manifest, env, report)
    records = _read_entries(env, db, manifest, workers, progress, report)
    with cf.ThreadPoolExecutor(workers) as pool:
        fresh = set(records)
        if data_root is not None:
            report.checks.append("sources (size, mtime" + (", sha256)" if deep else ")"))
            fresh = _check_sources(list(records.values()), data_root, deep, pool, report, progress=progress)
            unit = plan_unit_of(manifest, fs.feature_set)
            if unit is None:
                report.notes.append(f"plan: not checked: encoder {(manifest.get('encoder') or {}).get('encoder')!r} "
                                    "is not registered in this featstore, so its unit kind is unknown")
            else:
                report.checks.append("plan coverage")
                _check_plan(records, set(report.keys_with("corrupt")) | set(records), data_root, annotations,
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
        _recompute(fs, candidates, records, data_root, recompute, seed, weights, device, report, progress=progress)
    report.seconds = time.perf_counter() - t0


def _check_manifest(manifest: dict, env, report: Report) -> None:
    feature_set = report.feature_set or PRIMARY_FEATURE_SET
    report.checks.append("manifest")
    enc = manifest.get("encoder") or {}
    if enc:
        try:
            from featstore.encoders import EncoderSpec

            fp = EncoderSpec.from_dict(enc).fingerprint()
        except FeatstoreError as e:
            report.add("manifest", f"manifest: the encoder spec does not parse ({e})")
        else:
            if fp != manifest.get("fingerprint"):
                report.add("manifest", f"manifest: fingerprint {str(manifest.get('fingerprint'))[:16]} is not "
                                       f"the fingerprint of its encoder spec ({fp[:16]})")
    state = (manifest.get("build") or {}).get("state")
    if state != "complete":
        report.add("build", f"build state is {state!r} (last update {(manifest.get('build') or {}).get('updated')}); "
                            "rerun `featstore build` with the same arguments to resume")
    meta_db = env.open_db(META_DB, create=False)
    with env.begin(db=meta_db) as txn:
        raw = txn.get(last_build_key(feature_set))
    if raw is not None:
        try:
            last = json.loads(bytes(raw))
        except ValueError:
            report.add("manifest", "the last build report is not valid JSON")
            return
        for f in (last.get("failed") or []) if isinstance(last, dict) else []:
            if isinstance(f, dict):
                report.add("failed", f"unit {f.get('key')!r} failed in the last build: {f.get('error')}", f.get("key"))


def _read_entries(env, db, manifest: dict, workers: int, progress: bool, report: Report) -> dict[str, _Record]:
    from featstore.progress import Progress

    report.checks.append("entries (decode, crc32, dtype, shape)")
    enc = manifest.get("encoder") or {}
    config = enc.get("config") or {}
    embed, hidden = config.get("embed_dim"), config.get("hidden_size")
    # VGGT stores frame-attention || global-attention outputs (2 * embed_dim); Qwen's vision tower
    # its hidden states (hidden_size); an encoder with neither field gets no channel check.
    channels = 2 * embed if isinstance(embed, int) else hidden if isinstance(hidden, int) else None
    expect = {"dtype": storage_dtype_of(manifest), "fingerprint": manifest.get("fingerprint"),
              "frames_kept": enc.get("frames_kept", "all"), "channels": channels}
    keys = _list_keys(env, db)
    records: dict[str, _Record] = {}
    t0 = time.perf_counter()
    bar = Progress(manifest.get("bytes") or None, desc=_progress_desc(report, "entries"), unit="B", enabled=progress)
    try:
        with cf.ThreadPoolExecutor(workers, thread_name_prefix="featstore-verify") as pool:
            futures = [pool.submit(_check_chunk, env, db, chunk, expect) for chunk in _chunks(keys, _CHUNK_ENTRIES)]
            for fut in cf.as_completed(futures):
                recs, findings, nbytes = fut.result()
                for r in recs:
                    records[r.key] = r
                report.problems.extend(findings)
                report.bytes_read += nbytes
                bar.update(nbytes)
    finally:
        bar.close()
    report.read_seconds = time.perf_counter() - t0
    report.entries = len(keys)
    report.problems.sort(key=lambda f: (f.kind, f.key or ""))  # threads finish in any order
    if manifest.get("entries") != len(keys):
        report.add("manifest", f"manifest: says {manifest.get('entries')} entries, the store holds {len(keys)}")
    if manifest.get("bytes") != report.bytes_read:
        report.add("manifest", f"manifest: says {manifest.get('bytes')} value bytes, the store holds {report.bytes_read}")
    return records


# -- command line ---------------------------------------------------------------------------

EXAMPLES = """\
Examples:
  # the bundled sample data, after `featstore build --data-root sample_data --encoder vggt-tiny`
  featstore verify sample_data                    # the store beside the data: every check
  featstore verify sample_data --deep --recompute 2 --json
  featstore verify sample_data/vggt_features.lmdb --data-root sample_data --feature-set vggt
  # your data
  featstore verify /nvme/vggt_features.lmdb --data-root data/ --annotations data/train.json
  featstore verify data/ --deep --recompute 16 --weights /ckpt/model.safetensors --json
  featstore verify data/ --feature-set qwen_vision --recompute 4 \\
      --weights qwen_vision=/ckpt/Qwen2.5-VL-3B
"""


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", nargs="?", default=None, metavar="STORE", help=STORE_HELP)
    p.add_argument("--data-root", help="the images' folder: enables the orphan/stale/coverage checks (default: "
                   "STORE when it is a data root, else none and those checks are skipped)")
    add_annotations_argument(p, "training's annotation files: the plan is one unit per sample (as for build). "
                             "Default: the plan the store records (the files it was built from; a store that "
                             "records none: a scan of the data root, one unit per image)", store_may_follow=True)
    p.add_argument("--deep", action="store_true", help="also hash every source file (sha256) to find content "
                   "changes that kept size and mtime (reads every image; default: size and mtime only)")
    p.add_argument("--recompute", type=int, default=0, metavar="N",
                   help="re-encode N random fresh units and compare with the stored features (default 0: none); "
                   "checks weights and code versions, needs the data root and, for real encoders, --weights")
    p.add_argument("--seed", type=int, help="seed for choosing the recomputed units (default: random, noted in "
                   "the report); pass it to recheck the same units")
    p.add_argument("--feature-set", action="append", metavar="NAME", help="check only this feature set "
                   "(repeat for several; default: every set of the store)")
    p.add_argument("--weights", action="append", metavar="[NAME=]PATH",
                   help="weights for --recompute (as given to build): PATH for the selected set (the one "
                   "--feature-set names, else 'vggt'), NAME=PATH for set NAME; repeat for several sets "
                   "(default: none, fine for the random-weight tiny encoders)")
    p.add_argument("--device", default="cpu", help="device for --recompute: cpu (default), cuda or cuda:N")
    p.add_argument("--workers", type=int, default=_DEFAULT_WORKERS,
                   help="reader threads checksumming entries in parallel (default: min(16, 2 x CPU count)); "
                   "more than the cores help on cold or network storage, where threads wait on reads")
    p.add_argument("--no-structure", action="store_true", help="skip LMDB's structural audit of data.mdb "
                   "(only its size is checked then); saves one read of the whole file on a huge store")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (also when it cannot run) "
                   "instead of the readable summary; for scripts and monitoring")


def parse_weights(values: Sequence[str] | None) -> dict[str | None, str] | None:
    """`--weights` values -> {set name: path}; a plain PATH is under None (the selected set).
    ``NAME=PATH`` names a set unless the whole value is an existing path (a file whose name
    holds '='); write such a path ``./NAME=...`` to be sure.

    Example:
        >>> from featstore.ops.verify import parse_weights
        >>> parse_weights(["/ckpt/vggt.safetensors", "qwen_vision=/ckpt/vision.safetensors"])
        {None: '/ckpt/vggt.safetensors', 'qwen_vision': '/ckpt/vision.safetensors'}
    """
    if not values:
        return None
    out: dict[str | None, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if sep and rest and not os.path.exists(value) and re.fullmatch(r"[a-z0-9_]{1,32}", name):
            key, path = name, rest
        else:
            key, path = None, value
        if key in out:
            which = "two plain --weights PATHs" if key is None else f"two --weights for feature set {key!r}"
            raise FeatstoreError(f"{which} ({out[key]} and {path}); give each set's weights once, as NAME=PATH")
        out[key] = path
    return out


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise FeatstoreError(f"--workers must be >= 1. Found {args.workers}")
    store = store_path_arg(args.store, args.data_root)
    try:
        report = verify_store(store, feature_set=args.feature_set, data_root=args.data_root,
                              annotations=args.annotations, deep=args.deep, recompute=args.recompute,
                              seed=args.seed, weights=parse_weights(args.weights),
                              device=args.device, workers=args.workers, structure=not args.no_structure,
                              progress=not args.no_progress and not args.json, log=False)
    except (FeatstoreError, lmdb.Error) as e:
        if not args.json:
            raise  # the CLI prints it (and translates lmdb.Error), exit 2
        print(json.dumps({"path": store, "ok": False, "exit_code": 2, "error": str(e)}, indent=2))
        print(f"featstore verify: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.summary())
    return report.exit_code
