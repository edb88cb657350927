"""Check 6, recompute (`--recompute N`): N random fresh units re-encoded and compared with the
stored features (max abs error relative to the tensor's scale, cosine similarity) within the
tolerance of the storage and compute dtypes (featstore.ops.compare). It checks what no
checksum can: that the weights and code that wrote the store are the ones named in its spec."""

from __future__ import annotations

import random

from featstore.errors import FeatstoreError
from featstore.contract.naming import labelled
from featstore.ops.verify.entries import Record
from featstore.ops.verify.report import Report
from featstore.store.layout import storage_dtype_of

__all__ = ["recompute"]


def recompute(fs, keys: list[str], records: dict[str, Record], data_root: str, n: int, seed: int,
              weights: str | None, device: str, report: Report, *, progress: bool = False) -> None:
    """Re-encode `n` of `keys` (chosen with `seed`) of the set `fs` (a FeatureStore) reads, on
    `device` with `weights`, and compare each with its stored features, into `report`."""
    from featstore.build.encode import encoder_for_manifest
    from featstore.progress import Progress

    manifest = fs.manifest
    chosen = random.Random(seed).sample(sorted(keys), min(n, len(keys)))
    report.notes.append(f"recompute: {len(chosen)} of {len(keys)} fresh entries (seed {seed}) on {device}")
    if not chosen:
        return
    try:
        encoder = encoder_for_manifest(manifest, weights=weights, device=device)
    except FeatstoreError as e:
        if not labelled([fs.feature_set]):
            raise
        # Name the set and how to give it weights: several sets may each need their own.
        raise type(e)(f"feature set {fs.feature_set!r}: {e} (pass --weights {fs.feature_set}=PATH)") from None
    with Progress(len(chosen), desc=report.progress_desc("recompute"), unit="unit", enabled=progress) as bar:
        for key in chosen:
            _recompute_one(fs, key, records, data_root, encoder, manifest, report)
            bar.update(1)


def _recompute_one(fs, key: str, records: dict[str, Record], data_root: str, encoder, manifest: dict,
                   report: Report) -> None:
    from featstore.build.encode import encode_unit
    from featstore.build.plan import Unit
    from featstore.ops.compare import compare_features

    unit = Unit(key, tuple(records[key].frames))
    stored = fs.get(key, copy=True).features
    try:
        feats, _ = encode_unit(encoder, data_root, unit)
    except FeatstoreError as e:
        report.add("recompute", f"entry {key!r}: cannot recompute ({e})", key)
        return
    spec = manifest.get("encoder") or {}
    result = dict(key=key, **compare_features(stored, feats, storage_dtype_of(manifest) or "bfloat16",
                                              spec.get("compute_dtype")))
    report.recomputed.append(result)
    if not result["ok"]:
        detail = result.get("error") or (
            f"max abs error {result['max_abs_error']:.4g} = {result['rel_error']:.3g} of max |x| "
            f"(tolerance {result['rel_tolerance']:g}), cosine {result['cosine']:.6f} "
            f"(tolerance {result['cosine_tolerance']})")
        report.add("recompute", f"entry {key!r}: {detail}", key)
