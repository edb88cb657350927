"""Which planned units a build computes: the split of the plan into fresh / missing / stale
against one feature set of the store (docs/BUILD.md, "Freshness and resume").

An entry is fresh when its frame list equals the unit's, its fingerprint the spec's, and every
frame's size and mtime (ns) those recorded when it was computed; anything else is stale, an
absent entry missing. Only each entry's metadata is read, never its feature bytes (that would
read the whole store on every resume). A store of another spec is refused first, naming every
differing field, unless --force (then every unit is stale).
"""

from __future__ import annotations

import json
import os

from featstore.build.options import BuildContext
from featstore.build.plan import Unit
from featstore.format.frame_ref import frame_file
from featstore.format.keys import source_path
from featstore.contract.naming import PRIMARY_FEATURE_SET, feature_set_label
from featstore.errors import FeatstoreError
from featstore.store.layout import check_fingerprint, existing_manifest, features_db, open_env

__all__ = ["split_plan", "split_units", "MISMATCH_ADVICE"]

# What a build on a store of another spec can do (the error lists every differing field first).
MISMATCH_ADVICE = ("Pass --force to rebuild this store in place (drops its entries), or --store PATH to build "
                   "a new store beside it.")


def split_units(ctx: BuildContext, units: list[Unit]) -> dict[str, list[Unit]]:
    """Split this build's `units` into fresh / missing / stale: all missing for a new store or
    set, all stale with --force, else entry by entry (`split_plan`).

    Raises:
        FingerprintMismatchError: the set holds another spec and --force was not given (the
            message names every differing field, with MISMATCH_ADVICE).
    """
    # Freshness is per set: another set of the store (other encoder, other spec) is not looked at.
    manifest = existing_manifest(ctx.store_path, ctx.feature_set)
    if manifest is None:
        return {"fresh": [], "missing": list(units), "stale": []}
    if ctx.opts.force:
        return {"fresh": [], "missing": [], "stale": list(units)}
    check_fingerprint(manifest, ctx.spec, path=feature_set_label(ctx.store_path, ctx.feature_set),
                      advice=MISMATCH_ADVICE)
    return split_plan(units, ctx.store_path, ctx.opts.data_root, ctx.fingerprint, feature_set=ctx.feature_set)


def split_plan(units: list[Unit], store_path: str, data_root: str, fingerprint: str, *,
               feature_set: str = PRIMARY_FEATURE_SET) -> dict[str, list[Unit]]:
    """Split `units` into fresh / missing / stale against `feature_set` of the store at
    `store_path` (all missing when the store or the set does not exist yet)."""
    split: dict[str, list[Unit]] = {"fresh": [], "missing": [], "stale": []}
    if existing_manifest(store_path, feature_set) is None:
        split["missing"] = list(units)
        return split
    env = open_env(store_path, readonly=True, lock=False)
    try:
        db = env.open_db(features_db(feature_set), create=False)
        with env.begin(db=db, buffers=True) as txn:
            for unit in units:
                value = txn.get(unit.key.encode("utf-8"))
                state = "missing" if value is None else _entry_state(value, unit, data_root, fingerprint)
                split[state].append(unit)
    finally:
        env.close()
    return split


def _entry_state(value, unit: Unit, data_root: str, fingerprint: str) -> str:
    """'fresh' or 'stale' for a stored value of `unit`."""
    from featstore.format.blob import decode_entry

    try:
        meta = decode_entry(value, key=unit.key).metadata
        frames = json.loads(meta.get("frames", "null"))
        sources = json.loads(meta.get("sources", "null"))
    except (FeatstoreError, ValueError):
        return "stale"  # undecodable: recompute it
    if meta.get("fingerprint") != fingerprint or frames != list(unit.frames):
        return "stale"
    if not isinstance(sources, list) or len(sources) != len(unit.frames):
        return "stale"
    for frame, src in zip(unit.frames, sources):
        try:
            st = os.stat(source_path(data_root, frame_file(frame)))  # a video frame: its video
        except OSError:
            return "stale"
        if not isinstance(src, dict) or src.get("size") != st.st_size or src.get("mtime_ns") != st.st_mtime_ns:
            return "stale"
    return "fresh"
