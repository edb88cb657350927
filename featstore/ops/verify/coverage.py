"""Check 5, plan coverage (with a data root): every unit of the plan is present, with the
planned frames. The plan: the given annotation files, else the one the set records
(featstore.build.plan_record), else a scan of the data root; an image encoder's set plans one
unit per image. A set built with `--shard I/N` records its part, and only that part's units
are checked against the recorded plan. Entries no plan asks for are `unplanned` (not a problem)."""

from __future__ import annotations

from featstore.contract.naming import PRIMARY_FEATURE_SET
from featstore.ops.verify.entries import Record
from featstore.ops.verify.report import Report

__all__ = ["check_plan", "plan_unit_of"]


def plan_unit_of(manifest: dict, feature_set: str) -> str | None:
    """The unit kind a set was planned with: the registry's for its encoder (`unit_of`);
    "sequence" for a primary set whose encoder this featstore does not register (as before
    feature sets existed); None (unknown) for another set of an unregistered encoder.

    Example:
        >>> from featstore.encoders import resolve_spec
        >>> from featstore.ops.verify import plan_unit_of
        >>> plan_unit_of({"encoder": resolve_spec("qwen2.5-vl-vision-tiny").to_dict()}, "qwen_vision")
        'image'
        >>> plan_unit_of({"encoder": {"encoder": "mine"}}, "vggt"), plan_unit_of({}, "mine")
        ('sequence', None)
    """
    from featstore.encoders import available_encoders, unit_of

    name = (manifest.get("encoder") or {}).get("encoder")
    if isinstance(name, str) and name in available_encoders():
        return unit_of(name)
    return "sequence" if feature_set == PRIMARY_FEATURE_SET else None


def check_plan(records: dict[str, Record], present: set[str], data_root: str, annotations,
               report: Report, unit_kind: str = "sequence", manifest: dict | None = None) -> None:
    """Coverage against the plan: the given `annotations`, else the plan `manifest` records
    (featstore.build.plan_record; None: ignore it), else (a store that records none) a scan of
    the data root. Entries outside both the given and the recorded plan are `unplanned`.
    `present`: every stored key (a key stored but undecodable is corrupt, not missing)."""
    from featstore.build.plan import plan_units, shard_part
    from featstore.build.plan_record import (NO_RECORD_NOTE, describe_plan, plan_notes, plan_of_manifest,
                                             record_shard, recorded_sources)

    record = plan_of_manifest(manifest or {})
    given = list(annotations or [])
    # Video samples are planned with the policy the set was built with (featstore.build.video).
    video = (record or {}).get("video_policy")
    recorded_units = None
    if record is not None:
        sources, gone = recorded_sources(record, data_root)
        report.notes += gone + plan_notes(record, data_root, given)
        report.plan_gaps += gone
        recorded_units = plan_units(data_root, sources, unit=unit_kind, video_policy=video) if sources else []
        if record.get("scan"):
            recorded_units += plan_units(data_root, None, unit=unit_kind)
    if given:
        units, how = plan_units(data_root, given, unit=unit_kind, video_policy=video), "annotations"
    elif recorded_units is not None:
        units, how = recorded_units, f"the recorded plan ({describe_plan(record)})"
    else:
        units, how = plan_units(data_root, None, unit=unit_kind), "a scan of the data root"
        report.notes.append(NO_RECORD_NOTE)
    planned = {unit.key for unit in units}
    shard = record_shard(record)
    # Part I of N (`--shard I/N`): the other parts' units are in other hosts' stores.
    checked = shard_part(units, *shard) if shard is not None and not given else units
    if shard is not None and given:
        report.notes.append(f"this store is shard {shard[0]}/{shard[1]} of its recorded plan: with --annotations "
                            "every unit is checked, so the other parts' units are missing here; leave "
                            "--annotations out to check its part")
    seen = set()
    for unit in checked:
        if unit.key in seen:
            continue
        seen.add(unit.key)
        rec = records.get(unit.key)
        if rec is None and unit.key in present:
            continue  # stored but undecodable: already reported as corrupt
        if rec is None:
            report.add("missing", f"unit {unit.key!r} ({len(unit.frames)} frame(s)) has no entry", unit.key)
        elif rec.frames is not None and rec.frames != list(unit.frames):
            report.add("frames", f"entry {unit.key!r}: stored for frames {rec.frames}, the plan asks "
                                 f"for {list(unit.frames)}", unit.key)
    if checked is not units:
        report.notes.append(f"shard {shard[0]}/{shard[1]}: this store holds part of the plan, so coverage is "
                            f"checked for its {len(seen)} units; verify the merged store (`featstore merge`) for all")
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
