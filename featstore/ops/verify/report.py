"""What `featstore verify` found: `Finding`s of the kinds in `PROBLEM_KINDS`, gathered in a
`Report` per feature set and one for the store, with its readable summary and its JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from featstore.contract.naming import PRIMARY_FEATURE_SET
from featstore.contract.naming import labelled, set_note

__all__ = ["Finding", "Report", "PROBLEM_KINDS"]

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

MAX_LISTED = 20  # findings per kind in the human summary (JSON lists all)


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
    verified, else the first set's.

    Example:
        >>> from featstore.ops.verify import Report
        >>> report = Report(path="data/vggt_features.lmdb")
        >>> report.add("missing", "unit 'a.jpg' (1 frame(s)) has no entry", "a.jpg")
        >>> report.ok, report.exit_code, report.counts(), report.keys_with("missing")
        (False, 1, {'missing': 1}, ['a.jpg'])
    """

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

    def progress_desc(self, phase: str) -> str:
        """The progress lines' prefix: "featstore verify: entries", with the set of a multi-set store."""
        return f"featstore verify{set_note(self.feature_set, ' [{}]')}: {phase}"

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

    def add_set(self, sub: "Report", *, labelled: bool) -> None:
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
        if self.manifest is None or name == PRIMARY_FEATURE_SET:  # the store's manifest: the primary set's
            self.manifest = sub.manifest

    def summary(self) -> str:
        """A readable multi-line summary: what was checked, then problems grouped by kind."""
        lines = [f"store      {self.path}",
                 f"checked    {', '.join(self.checks)}",
                 f"entries    {self.entries} ({self.bytes_read / 1e9:.3f} GB read in {self.read_seconds:.2f} s, "
                 f"{self.gb_per_s:.2f} GB/s, {self.workers} threads)"]
        if labelled(self.feature_sets):
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
            for f in found[:MAX_LISTED]:
                lines.append(f"  {f.message}")
            if len(found) > MAX_LISTED:
                lines.append(f"  ... and {len(found) - MAX_LISTED} more (--json lists all)")
        return "\n".join(lines)
