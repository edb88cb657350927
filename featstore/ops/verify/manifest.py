"""Check 2, manifest: its fingerprint is its encoder spec's, the build is complete, and no unit
failed in the last build. (Entry count and bytes are compared with what is stored by the
entries check, which counts them.)"""

from __future__ import annotations

from featstore.errors import FeatstoreError, ManifestError
from featstore.ops.verify.report import Report

__all__ = ["check_manifest"]


def check_manifest(fs, manifest: dict, report: Report) -> None:
    """Check `manifest`, the one of the set `fs` (a FeatureStore) reads, and the set's last build
    report, into `report`."""
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
    try:
        last = fs.last_build()
    except ManifestError:
        report.add("manifest", "the last build report is not valid JSON")
        return
    for f in (last.get("failed") or []) if isinstance(last, dict) else []:
        if isinstance(f, dict):
            report.add("failed", f"unit {f.get('key')!r} failed in the last build: {f.get('error')}", f.get("key"))
