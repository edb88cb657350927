"""What a build reports (`BuildReport`): the plan's counts, the work done, failures, and the
host time of each pipeline stage (docs/BUILD.md, "Stage times"); `combine` sums the reports
of several ranks.

Example:
    >>> from featstore.build.report import BuildReport
    >>> a = BuildReport(planned=4, computed=2, frames=2, encode_s=1.0)
    >>> b = BuildReport(planned=4, computed=2, frames=3, encode_s=2.5)
    >>> total = BuildReport.combine(a, [a.to_dict(), b.to_dict()])
    >>> total.planned, total.computed, total.frames, total.encode_s
    (4, 4, 5, 2.5)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from featstore.contract.naming import PRIMARY_FEATURE_SET

__all__ = ["BuildReport", "STAGE_FIELDS"]

# The stage-time fields of BuildReport, one per pipeline stage.
STAGE_FIELDS = ("decode_wait_s", "encode_s", "d2h_wait_s", "serialise_s", "commit_s")


@dataclass
class BuildReport:
    feature_set: str = PRIMARY_FEATURE_SET
    planned: int = 0
    fresh: int = 0
    missing: int = 0
    stale: int = 0
    computed: int = 0
    frames: int = 0
    bytes: int = 0
    failed: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # annotation samples without images (e.g. video)
    elapsed_s: float = 0.0
    pipeline_s: float = 0.0  # decode + encode + commit, without model loading and planning
    # Frames/s from the first commit to the last: the pipeline's steady rate, without the start
    # (first decode, first forward); 0.0 for a single commit.
    steady_frames_per_s: float = 0.0
    # Host time per pipeline stage, in seconds (docs/BUILD.md, "Stage times"). Each thread's
    # stages add up to at most pipeline_s; threads overlap, so the busiest one binds:
    decode_wait_s: float = 0.0  # GPU loop waiting for the decode workers' next unit
    encode_s: float = 0.0  # GPU loop: stack, host->device, forward, cast, queue the device->host copy
    d2h_wait_s: float = 0.0  # serialiser waiting for a batch's device->host copy (and its kernels)
    serialise_s: float = 0.0  # serialiser: quantise (fp8), blob layout, one copy and CRC-32
    commit_s: float = 0.0  # writer: LMDB puts, commits and their fsync
    # Frame reuse (docs/BUILD.md, "Frame reuse"): the frames of the units encoded (a frame in
    # two units counts twice), the frames the patch embedding ran on, and their ratio.
    frame_instances: int = 0
    distinct_frames: int = 0
    frame_reuse: float = 1.0
    interrupted: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def count_frames(self, instances: int, distinct: int) -> None:
        """Add one batch's frame instances and the distinct frames embedded for them."""
        self.frame_instances += instances
        self.distinct_frames += distinct
        self.frame_reuse = self.frame_instances / self.distinct_frames if self.distinct_frames else 1.0

    def stage_summary(self) -> str:
        """One line of the stage times, e.g. for the build's summary on stderr."""
        return (f"stages: decode wait {self.decode_wait_s:.2f} s, encode {self.encode_s:.2f} s, device->host wait "
                f"{self.d2h_wait_s:.2f} s, serialise+CRC {self.serialise_s:.2f} s, commit+fsync {self.commit_s:.2f} s "
                f"(pipeline {self.pipeline_s:.2f} s; {self.steady_frames_per_s:.1f} frames/s from the first commit "
                "to the last)")

    @classmethod
    def combine(cls, mine: "BuildReport", parts: Sequence[dict]) -> "BuildReport":
        """The report of a build whose ranks reported `parts` (each rank's `to_dict()`, this
        rank's `mine` among them).

        Every rank plans every unit and splits them fresh/missing/stale alike; only the work is
        divided (a contiguous part of the to-do list per rank). So the plan counts are one rank's,
        the work counts a sum, the times the slowest rank's and the steady rates a sum (ranks run
        side by side); the frame reuse is that of the summed counts."""
        total = cls(feature_set=mine.feature_set, planned=mine.planned, fresh=mine.fresh, missing=mine.missing,
                    stale=mine.stale, skipped=mine.skipped)
        for p in parts:
            for k in ("computed", "frames", "bytes"):
                setattr(total, k, getattr(total, k) + p[k])
            # .get: the report of a rank of an older build has no frame counts
            total.count_frames(p.get("frame_instances", 0), p.get("distinct_frames", 0))
            total.failed.extend(p["failed"])
            total.interrupted |= p["interrupted"]
            for k in ("pipeline_s", *STAGE_FIELDS):
                setattr(total, k, max(getattr(total, k), p[k]))  # the slowest rank decides
            total.steady_frames_per_s += p["steady_frames_per_s"]
        total.elapsed_s = mine.elapsed_s
        return total
