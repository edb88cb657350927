"""Check 4, sources (with a data root): orphans (a frame file of the entry is gone) and stale
entries (a frame's size or mtime changed since the entry was computed; with `deep`, its
content sha256)."""

from __future__ import annotations

import os

from featstore.format.frame_ref import frame_file
from featstore.format.keys import source_path
from featstore.ops.verify.entries import Record
from featstore.ops.verify.report import Report

__all__ = ["check_sources"]


def check_sources(records: list[Record], data_root: str, deep: bool, pool, report: Report, *,
                  progress: bool = False) -> set[str]:
    """Orphans and stale entries; returns the keys whose sources are fresh. `pool`: the thread
    pool that stats (and with `deep`, hashes) the files. `progress`: show the hashing of the
    source files (--deep reads every one) on stderr."""
    from featstore.build.plan import file_sha256
    from featstore.progress import Progress

    wanted: dict[str, None] = {}  # frame references; the frames of one video share a file (stat'd per frame)
    for r in records:
        for f in r.frames or []:
            wanted.setdefault(f, None)

    def probe(frame: str):
        path = source_path(data_root, frame_file(frame))  # a container video's frame: the video file
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

    with Progress(len(wanted), desc=report.progress_desc("sources"), unit="file", enabled=progress and deep) as bar:
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
