"""What a feature set remembers of its plan: the annotation files it was built from.

Without it, `verify` and `gc` could only plan what they were told: `featstore verify sample_data`
on a store built from annotations planned one unit per image, called every image "missing" and
every multi-frame entry "unplanned", and `gc --unplanned` then deleted exactly the entries
training needs. So each build records its plan in the set's manifest (`"plan"`), merged with
what earlier builds of the set recorded:

    {"unit": "sequence", "scan": false,
     "annotations": [{"value": "sample_data/annotations.json", "file": "annotations.json",
                      "image_dir": null, "percent": 100, "size": 2710, "sha256": "9f2c..."}]}

- `file` and `image_dir` are relative to the data root when inside it (so a store copied with
  its data keeps its plan), else absolute; `value` is the argument as given, for messages.
- `scan` is true once a build planned every image under the data root (no annotations).
- `size` and `sha256` name the content planned; a file edited since is said (`plan_notes`) and
  planned as it is now.
- `shard` ([I, N], only with `--shard I/N`, N > 1): the set holds part I of N of that plan
  (`featstore.build.plan.shard_part`), so `verify` checks the coverage of that part only. It is
  kept while later builds of the set plan the same files with the same shard, and dropped when
  the plan changes (then the whole plan is checked) and by `merge` (a merged store holds all
  parts).

`verify`, `gc` and `info` plan the recorded files by default; `--annotations` overrides (a
difference from the record is said in one line) and `gc --unplanned` keeps every entry of the
recorded OR given plan (`--replace-plan` makes the given plan the record). A store built before
plans were recorded has no `"plan"`: today's behaviour, with a note saying how to record one.
Plain data and file hashing: no torch.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from featstore.errors import PlanError
from featstore.build.annotations import AnnotationSource, annotation_sources, prefix_in_root
from featstore.build.plan import file_sha256
from featstore.build.video import DEFAULT_VIDEO_POLICY
from featstore.store.layout import PLAN_FIELD, merge_plan

__all__ = ["PLAN_FIELD", "record_of", "merge_plan", "recorded_sources", "plan_notes", "describe_plan",
           "record_shard", "plan_of_manifest", "NO_RECORD_NOTE"]

NO_RECORD_NOTE = ("this store records no plan (built before featstore recorded one): pass --annotations with the "
                  "files it was built from, or rerun the same `featstore build` (it computes nothing that is "
                  "fresh, and records its plan)")


def _relative(path: str, data_root: str) -> str:
    """`path` relative to `data_root` (POSIX) when inside it, else absolute."""
    root, full = os.path.abspath(data_root), os.path.abspath(path)
    rel = os.path.relpath(full, root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return full
    return rel.replace(os.sep, "/")


def record_of(data_root: str, annotations: Sequence[str | AnnotationSource] | None, unit: str, *,
              video_policy=None, shard: tuple[int, int] = (0, 1)) -> dict:
    """The plan record of one build: its annotation files (hashed) or a scan of the data root,
    and, with annotation files, the video policy (`featstore.build.video`) their video samples
    were planned with ("video_policy", canonical string); for `--shard I/N` with N > 1, the
    part it built ("shard": [I, N]: `featstore.build.plan.shard_part` of the plan).

    Example:
        >>> from featstore.build.plan_record import record_of
        >>> r = record_of("data", ["data/annotations.json"], "sequence")
        >>> r["scan"], r["annotations"][0]["file"], len(r["annotations"][0]["sha256"])
        (False, 'annotations.json', 64)
    """
    root = os.fspath(data_root)
    files = []
    for src in annotation_sources(annotations, root):
        files.append({"value": src.text or src.path, "file": _relative(src.path, root),
                      "image_dir": None if src.image_dir is None else _relative(src.image_dir, root),
                      "percent": src.percent, "size": os.path.getsize(src.path), "sha256": file_sha256(src.path)})
    record = {"unit": unit, "scan": not files, "annotations": files}
    if files:
        from featstore.build.video import parse_video_policy

        record["video_policy"] = parse_video_policy(video_policy).name
    if shard[1] > 1:
        record["shard"] = list(shard)
    return record


def _absolute(path: str, data_root: str) -> str:
    return path if os.path.isabs(path) else os.path.join(data_root, path)


def _source(entry: dict, data_root: str) -> AnnotationSource:
    """The AnnotationSource a recorded file stands for under `data_root` (no re-parsing of its
    value: a recorded file name may hold '@' or '%')."""
    root = os.fspath(data_root)
    image_dir = None if entry.get("image_dir") is None else _absolute(entry["image_dir"], root)
    prefix = "" if image_dir is None else prefix_in_root(image_dir, root)
    if prefix is None:
        raise PlanError(f"the recorded image folder {entry['image_dir']!r} of {entry['file']!r} is not inside the "
                        f"data root {root}: pass --annotations for this data root")
    return AnnotationSource(_absolute(entry["file"], root), image_dir, int(entry.get("percent", 100)), prefix,
                            entry.get("value") or entry["file"])


def recorded_sources(record: dict | None, data_root: str) -> tuple[list[AnnotationSource], list[str]]:
    """(the recorded files that can be planned now, notes on those that cannot: gone files).

    Raises:
        PlanError: a recorded value no longer parses (an image folder gone), as for a given one.
    """
    sources, notes = [], []
    for entry in (record or {}).get("annotations", []):
        if not os.path.isfile(_absolute(entry["file"], data_root)):
            notes.append(f"recorded annotation file {entry['file']!r} (given as {entry.get('value')!r}) is gone: "
                         "its units are not planned")
            continue
        sources.append(_source(entry, data_root))
    return sources, notes


def plan_notes(record: dict | None, data_root: str, given: Sequence[str | AnnotationSource] | None) -> list[str]:
    """One line each for: a recorded file edited since the build, and a given plan that differs
    from the recorded one."""
    notes = []
    for entry in (record or {}).get("annotations", []):
        path = _absolute(entry["file"], data_root)
        if os.path.isfile(path) and (os.path.getsize(path) != entry.get("size") or
                                     file_sha256(path) != entry.get("sha256")):
            notes.append(f"recorded annotation file {entry['file']!r} changed since the build (sha256 "
                         f"{str(entry.get('sha256'))[:12]} -> {file_sha256(path)[:12]}): planned as it is now")
    if given and record is not None:
        want = record_of(data_root, given, record.get("unit", "sequence"))
        key = lambda r: sorted((f["file"], f.get("image_dir"), f.get("percent"), f["sha256"])  # noqa: E731
                               for f in r.get("annotations", []))
        if key(want) != key(record) or bool(record.get("scan")):
            notes.append(f"the --annotations given ({describe_plan(want)}) differ from the plan the store records "
                         f"({describe_plan(record)})")
    return notes


def describe_plan(record: dict | None) -> str:
    """One phrase: 'annotations a.json, b.json@media%3' / 'a scan of the data root' / 'none recorded'.

    Example:
        >>> from featstore.build.plan_record import describe_plan
        >>> describe_plan({"scan": False, "annotations": [{"file": "a.json", "image_dir": "media", "percent": 3}]})
        'annotations a.json@media%3'
        >>> describe_plan({"scan": False, "annotations": [{"file": "a.json"}], "video_policy": "linspace:16"})
        'annotations a.json (video policy linspace:16)'
        >>> describe_plan({"scan": True, "annotations": [], "shard": [0, 2]})
        'a scan of the data root, shard 0/2'
    """
    if record is None:
        return "none recorded"
    parts = [f["file"] + (f"@{f['image_dir']}" if f.get("image_dir") is not None else "")
             + (f"%{f['percent']}" if f.get("percent", 100) != 100 else "") for f in record.get("annotations", [])]
    scan = ["a scan of the data root"] if record.get("scan") else []
    text = " and ".join(([f"annotations {', '.join(parts)}"] if parts else []) + scan) or "nothing"
    if record.get("video_policy") not in (None, DEFAULT_VIDEO_POLICY):  # said only when not VG-LLM's default
        text += f" (video policy {record['video_policy']})"
    if record_shard(record) is not None:
        text += ", shard {}/{}".format(*record_shard(record))
    return text


def record_shard(record: dict | None) -> tuple[int, int] | None:
    """(I, N) when the set holds part I of N of its recorded plan (`featstore build --shard I/N`),
    else None (the whole plan; a merged store).

    Example:
        >>> from featstore.build.plan_record import record_shard
        >>> record_shard({"scan": True, "shard": [1, 4]}), record_shard({"scan": True})
        ((1, 4), None)
    """
    shard = (record or {}).get("shard")
    if isinstance(shard, list) and len(shard) == 2 and all(isinstance(x, int) for x in shard) \
            and 0 <= shard[0] < shard[1]:
        return shard[0], shard[1]
    return None


def plan_of_manifest(manifest: dict[str, Any]) -> dict | None:
    """The set's recorded plan, or None for a store built before plans were recorded."""
    plan = manifest.get(PLAN_FIELD)
    return plan if isinstance(plan, dict) else None
